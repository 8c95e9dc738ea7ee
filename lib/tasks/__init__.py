"""Tasks: what a run optimises and measures (``lib.train.task.Task``), chosen by ``config.task``.

    task = tasks.from_config(config, mesh=mesh, sharding_rules=rules)

Built in: ``"classification"`` (with mixup/cutmix and label smoothing; logit distillation when
``config.distill`` names a teacher or its logits); ``"causal_lm"`` (token cross-entropy for LLM pre-training and SFT:
``lib.tasks.causal_lm``); ``"proteus"`` (feature distillation from a
frozen ViT, no labels: ``lib.tasks.proteus``); ``"soup"`` (a learnable weight soup of frozen experts
around any inner task, only the mixing weights trained: ``lib.soup``). A project adds its own with
:func:`register_task` when its module is imported.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable

from lib.train.task import Task

_BUILDERS: dict[str, Callable[..., Task]] = {}


def register_task(name: str, builder: Callable[..., Task]) -> None:
    """``builder(config, *, mesh, sharding_rules) -> Task`` becomes ``config.task = name``."""
    if name in _BUILDERS:
        raise ValueError(f"task {name!r} is already registered")
    _BUILDERS[name] = builder


def from_config(config, *, mesh=None, sharding_rules=()) -> Task:
    name = config.get("task", "classification")
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, list(_BUILDERS), n=3)
        raise ValueError(f"unknown task {name!r}{'; did you mean: ' + ', '.join(close) if close else ''}; "
                         f"known: {sorted(_BUILDERS)}")
    return _BUILDERS[name](config, mesh=mesh, sharding_rules=sharding_rules)


def _register_builtin() -> None:
    from lib.tasks import classification
    register_task("classification", classification.from_config)
    from lib.tasks import causal_lm
    register_task("causal_lm", causal_lm.from_config)
    from lib.tasks import proteus  # noqa: F401  (registers "proteus")
    from lib import soup
    register_task("soup", soup.from_config)


_register_builtin()
