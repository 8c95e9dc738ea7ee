"""Soft logit distillation (DeiT's ``DistillationLoss``, ``--distillation-type soft``) as a task, for every project.

    loss = (1 - alpha) * CE(student, mixed targets) + alpha * tau^2 * KL(p_teacher || p_student)

with ``p = softmax(logits / tau)`` and the KL summed over classes and averaged over the batch,
exactly ``F.kl_div(log_softmax(s/tau), log_softmax(t/tau), reduction='batchmean', log_target=True)``.
EfficientMod's recipe uses alpha 0.9 and tau 1 with a RegNetY-160 teacher.

The teacher comes from one of two places (``config.distill``):

* ``teacher``: any zoo model name, with ``teacher_weights`` (an official PyTorch checkpoint or a
  directory written by ``zoo.save_weights``) and ``teacher_kwargs`` (the zoo model's overrides). It runs in eval mode inside the train step on the
  same (mixed-up) images the student sees, as upstream; its weights are the task's constants (a
  non-donated input of the step), never part of the train state or its checkpoints.
* ``teacher_logits``: a ``.npy`` file ``[num_train_examples, num_classes]`` of precomputed logits
  in the training source's order (write one with :func:`compute_teacher_logits`). The task wraps
  the training source (:meth:`LogitDistillation.wrap_source`) so each example carries its row
  through the pipeline; mixup/cutmix mix the teacher's *probabilities* with the
  same weights as the labels. That approximates the teacher on the mixed image, for a teacher too
  large (or too slow) to run beside the student.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib.tasks import losses
from lib.tasks.classification import Classification
from lib.train.task import Weighted, weighted

TEACHER_LOGITS_KEY = "teacher_logits"  # per-example side data: the pipeline passes it through unchanged


@dataclasses.dataclass(frozen=True)
class Distillation:
    """The distillation term's weight and temperature (upstream defaults)."""

    alpha: float = 0.9
    tau: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"distill.alpha must be in [0, 1], got {self.alpha}")
        if self.tau <= 0:
            raise ValueError(f"distill.tau must be positive, got {self.tau}")


def kl_divergence(student_logits: jax.Array, teacher_log_probs: jax.Array, tau: float) -> jax.Array:
    """Per-example ``KL(p_t || softmax(s / tau))``, summed over classes, in float32.

    ``teacher_log_probs`` are ``log_softmax(t / tau)`` (already temperature-scaled); zero
    probabilities contribute zero, as ``kl_div`` with ``log_target=True``.
    """
    log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / tau, axis=-1)
    log_p_t = teacher_log_probs.astype(jnp.float32)
    p_t = jnp.exp(log_p_t)
    log_p_t = jnp.where(p_t > 0, log_p_t, 0.0)  # 0 * log 0 = 0, without a NaN in any gradient
    return jnp.sum(p_t * (log_p_t - log_p_s), axis=-1)


def teacher_log_probs(teacher_logits: jax.Array, tau: float) -> jax.Array:
    return jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / tau, axis=-1)


def combine(base_loss: jax.Array, kl: jax.Array, cfg: Distillation) -> jax.Array:
    """``(1 - alpha) * base + alpha * tau^2 * KL`` (per example, or both averaged over the batch)."""
    return (1.0 - cfg.alpha) * base_loss + cfg.alpha * cfg.tau ** 2 * kl


class LogitDistillation(Classification):
    """Classification whose loss adds the teacher's soft targets: ``(1 - alpha) CE + alpha tau^2 KL``.

    Give either ``teacher`` (a model in eval mode: its state becomes the task's constants) or
    ``teacher_logits`` (a ``.npy`` file; the training source is wrapped to carry its rows), or
    neither when the batches already carry ``teacher_logits``.
    """

    def __init__(self, num_classes: int, settings: Distillation, *, teacher: nnx.Module | None = None,
                 teacher_logits: str | None = None, label_smoothing: float = 0.0, mixup=None):
        super().__init__(num_classes, label_smoothing=label_smoothing, mixup=mixup)
        if teacher is not None and teacher_logits is not None:
            raise ValueError("logit distillation takes a teacher model or a teacher_logits file, not both")
        self.settings, self.teacher_logits_file = settings, teacher_logits
        self.teacher_graphdef, self.teacher_state = nnx.split(teacher) if teacher is not None else (None, None)

    def constants(self):
        return self.teacher_state

    def wrap_source(self, source, *, train: bool):
        if self.teacher_logits_file is None or not train:
            return source
        return TeacherLogitsSource(source, np.load(self.teacher_logits_file), num_classes=self.num_classes)

    def loss(self, model, batch, key, consts) -> tuple[Weighted, dict[str, Weighted]]:
        tau = self.settings.tau
        stored = batch.get(TEACHER_LOGITS_KEY)
        # Precomputed logits: the teacher's probabilities are mixed like the labels.
        teacher_probs = None if stored is None else jnp.exp(teacher_log_probs(stored, tau))
        images, targets, teacher_probs = self.mix(key, batch, extra=teacher_probs)
        if teacher_probs is not None:
            teacher_lp = jnp.log(teacher_probs)
        elif self.teacher_graphdef is None:
            raise ValueError(f"logit distillation without a teacher model needs batches with {TEACHER_LOGITS_KEY!r}; "
                             f"got keys {sorted(batch)}")
        else:
            teacher_lp = teacher_log_probs(nnx.merge(self.teacher_graphdef, consts)(images), tau)
        logits = model(images)
        ce = losses.soft_target_cross_entropy(logits, targets)
        kl = kl_divergence(logits, teacher_lp, tau)
        return (weighted(combine(ce, kl, self.settings)),
                {"top1": weighted(losses.topk_correct(logits, batch["label"], 1)), "distill_kl": weighted(kl)})


def config_from(config) -> Distillation | None:
    """The ``config.distill`` section as a :class:`Distillation`, or None when no teacher is set."""
    d = config.get("distill")
    if not d or not (d.get("teacher") or d.get("teacher_logits")):
        return None
    if d.get("teacher") and d.get("teacher_logits"):
        raise ValueError("distill: set either teacher (a zoo model) or teacher_logits (a .npy file), not both")
    if d.get("teacher_logits") and not Path(d.teacher_logits).is_file():
        raise ValueError(f"distill.teacher_logits={d.teacher_logits} is not a file")
    return Distillation(alpha=float(d.get("alpha", 0.9)), tau=float(d.get("tau", 1.0)))


def load_teacher(name: str, weights: str | None, *, num_classes: int, kwargs: dict | None = None, mesh=None,
                 sharding_rules=()) -> nnx.Module:
    """A zoo model (``kwargs``: its overrides) in eval mode with ``weights`` loaded strictly (no
    classifier re-initialisation: a teacher whose head does not fit the task is an error, not a
    silent random head)."""
    from lib import zoo
    model = zoo.create_model(name, num_classes=num_classes, rngs=0, mesh=mesh, sharding_rules=sharding_rules,
                             **dict(kwargs or {}))
    if weights:
        zoo.load_pretrained(model, weights, strict=True)
    model.eval()
    return model


class TeacherLogitsSource:
    """A random-access source that adds row ``i`` of ``logits`` to example ``i`` of ``source``."""

    def __init__(self, source: Any, logits: np.ndarray, num_classes: int | None = None):
        logits = np.asarray(logits, np.float32)
        if logits.ndim != 2 or logits.shape[0] != len(source):
            raise ValueError(f"teacher logits must be [num_examples={len(source)}, num_classes], got shape "
                             f"{logits.shape}; compute them in the training source's order "
                             f"(lib.tasks.distillation.compute_teacher_logits)")
        if num_classes is not None and logits.shape[1] != num_classes:
            raise ValueError(f"teacher logits have {logits.shape[1]} classes, the task has {num_classes}")
        self.source, self.logits = source, logits
        self.num_classes = getattr(source, "num_classes", None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.source[index], TEACHER_LOGITS_KEY: self.logits[index]}


def compute_teacher_logits(model: nnx.Module, input_cfg, *, batch_size: int = 256) -> np.ndarray:
    """Logits of ``model`` (eval mode, eval transform) for every training example, in source order.

    Save them with ``np.save`` and point ``config.distill.teacher_logits`` at the file.
    """
    from lib import data
    cfg = input_cfg.copy_and_resolve_references()
    cfg.val_split = cfg.get("train_split", "train")
    pipeline = data.make_pipeline(cfg, train=False, batch_size=batch_size, seed=0, process_index=0, process_count=1)
    model.eval()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    rows = []
    for batch in pipeline:
        logits = np.asarray(forward(state, batch["image"]), np.float32)
        rows.append(logits[batch[data.VALID_KEY] > 0])  # drop the eval padding at the end
    return np.concatenate(rows)


def main(argv=None):
    """``python -m lib.tasks.distillation --teacher NAME --weights PATH --config CFG --out logits.npy``:
    precompute a teacher's logits over the training split of a config's input (eval transform)."""
    import argparse
    import importlib.util
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--teacher", required=True, help="zoo model name")
    parser.add_argument("--weights", required=True, help="official .pth or a zoo.save_weights directory")
    parser.add_argument("--config", required=True, help="config file (its input section), e.g. configs/x.py:arg")
    parser.add_argument("--out", required=True, help="where to write the [N, num_classes] float32 .npy")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    path, _, arg = args.config.partition(":")  # the same ``file.py:arg`` form as --config in training
    spec = importlib.util.spec_from_file_location("teacher_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    model = load_teacher(args.teacher, args.weights, num_classes=config.num_classes)
    logits = compute_teacher_logits(model, config.input, batch_size=args.batch_size)
    np.save(args.out, logits)
    print(f"wrote {logits.shape} teacher logits to {args.out}")


if __name__ == "__main__":
    main()
