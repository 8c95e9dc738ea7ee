"""Shared pieces of the SoupLM demonstrations: fitting a learnable soup's alphas with the generic
train step, and small table helpers."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from lib import soup
from lib.train import step as step_lib


def fit_alphas(learn: soup.LearnableSoup, task: soup.SoupTask, batches, *, steps: int, lr: float = 0.05,
               seed: int = 0) -> tuple[soup.LearnableSoup, list[float]]:
    """Train only the alphas of ``learn`` with ``task`` (a :class:`lib.soup.SoupTask`) through the
    generic jitted step (``lib.train.step``: the experts are its frozen state); ``batches(i)`` gives
    step i's batch. Returns the trained soup and the loss per step."""
    tx = optax.adam(lr)
    graphdef, state, frozen = step_lib.init_train_state(learn, tx, ema=False, trainable=task.trainable)
    train_step = step_lib.make_train_step(graphdef, tx, task, frozen=frozen, base_key=jax.random.key(seed),
                                          trainable=task.trainable, donate=False)
    losses = []
    for i in range(steps):
        state, metrics = train_step(state, batches(i))
        losses.append(float(metrics["loss"]))
    return nnx.merge(graphdef, state["params"], frozen, state["rest"]), losses


def mean_std(values) -> str:
    v = np.asarray(values, np.float64)
    return f"{v.mean():.2f} ± {v.std():.2f}" if v.size > 1 else f"{v.mean():.2f}"


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, default=lambda x: np.asarray(x).tolist()))
