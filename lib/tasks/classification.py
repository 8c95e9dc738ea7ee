"""Image classification as a task: soft-target cross-entropy with label smoothing and on-device
Mixup/CutMix (timm's recipe), top-1 while training, loss / top-1 / top-5 in evaluation.

    task = Classification(num_classes=1000, label_smoothing=0.1, mixup=dict(mixup_alpha=0.8, cutmix_alpha=1.0))

Batches hold ``image [B, H, W, C]`` and ``label [B]`` (eval batches also ``valid [B]``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from lib.tasks import losses, mixup as mixup_lib
from lib.train.task import Task, Weighted, weighted


class Classification(Task):
    best = ("top1", "max")

    def __init__(self, num_classes: int, *, label_smoothing: float = 0.0, mixup: Mapping[str, float] | None = None):
        """``mixup``: :func:`lib.tasks.mixup.mixup_cutmix` arguments (``mixup_alpha``, ``cutmix_alpha``,
        ``prob``, ``switch_prob``); None or both alphas 0 for none."""
        self.num_classes, self.label_smoothing = int(num_classes), float(label_smoothing)
        self.mixup = dict(mixup) if mixup and (mixup.get("mixup_alpha", 0) > 0 or mixup.get("cutmix_alpha", 0) > 0) \
            else None

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def mix(self, key: jax.Array, batch, extra: jax.Array | None = None):
        """``(images, soft targets [B, K], extra)``: the batch after Mixup/CutMix (drawn from
        ``fold_in(key, 0)``), per-example ``extra`` soft vectors mixed with the same weights."""
        images, labels = batch["image"], batch["label"]
        if self.mixup is None:
            return images, losses.smoothed_one_hot(labels, self.num_classes, self.label_smoothing), extra
        out = mixup_lib.mixup_cutmix(jax.random.fold_in(key, 0), images, labels, num_classes=self.num_classes,
                                     label_smoothing=self.label_smoothing, extra=extra, **self.mixup)
        return out if extra is not None else (*out, None)

    def loss(self, model, batch, key, consts) -> tuple[Weighted, dict[str, Weighted]]:
        images, targets, _ = self.mix(key, batch)
        logits = model(images)
        return (weighted(losses.soft_target_cross_entropy(logits, targets)),
                {"top1": weighted(losses.topk_correct(logits, batch["label"], 1))})

    def evaluate(self, model, batch, consts) -> dict[str, Weighted]:
        logits = model(batch["image"])
        labels, valid = batch["label"], batch.get("valid")
        return {"loss": weighted(losses.cross_entropy(logits, labels), valid),
                "top1": weighted(losses.topk_correct(logits, labels, 1), valid),
                "top5": weighted(losses.topk_correct(logits, labels, 5), valid)}


def from_config(config, *, mesh=None, sharding_rules=()) -> Classification:
    """Classification, or logit distillation when ``config.distill`` names a teacher or its logits."""
    from lib.tasks import distillation
    mixup = dict(config.mixup) if config.get("mixup") else None
    kwargs = dict(label_smoothing=config.get("label_smoothing", 0.0), mixup=mixup)
    settings = distillation.config_from(config)
    if settings is None:
        return Classification(config.num_classes, **kwargs)
    d = config.distill
    if d.get("teacher_logits"):
        return distillation.LogitDistillation(config.num_classes, settings, teacher_logits=d.teacher_logits, **kwargs)
    teacher = distillation.load_teacher(d.teacher, d.get("teacher_weights"), num_classes=config.num_classes,
                                        kwargs=d.get("teacher_kwargs"), mesh=mesh, sharding_rules=sharding_rules)
    return distillation.LogitDistillation(config.num_classes, settings, teacher=teacher, **kwargs)
