"""Learning-rate schedules with timm's ``CosineLRScheduler`` semantics (timm 0.6, upstream recipes).

Cosine from ``lr`` to ``min_lr`` over ``epochs``; a linear warmup from ``warmup_lr`` over the
first ``warmup_epochs`` laid *over* the cosine (``warmup_prefix=False``); then ``cooldown_epochs``
at ``min_lr``. ``per_epoch=True`` steps the rate once per epoch as the official scripts do;
``per_epoch=False`` evaluates the same curve at fractional epochs (smoother, same shape).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax


def cosine_lr(epoch, *, lr: float, min_lr: float, epochs: int, warmup_epochs: float = 0,
              warmup_lr: float = 1e-6):
    """The learning rate at (possibly fractional) ``epoch``; works on numbers and jax arrays."""
    epoch = jnp.asarray(epoch, jnp.float32)
    # 0.5 * (1 + cos(pi t / T)) written as cos^2(pi t / 2T): no float32 cancellation near min_lr.
    cosine = min_lr + (lr - min_lr) * jnp.cos(0.5 * jnp.pi * jnp.minimum(epoch, epochs) / epochs) ** 2
    cosine = jnp.where(epoch >= epochs, min_lr, cosine)
    if warmup_epochs > 0:
        warm = warmup_lr + epoch * (lr - warmup_lr) / warmup_epochs
        cosine = jnp.where(epoch < warmup_epochs, warm, cosine)
    return cosine


SCHEDULES = ("cosine",)


def make_schedule(*, lr: float, min_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0,
                  warmup_lr: float = 1e-6, per_epoch: bool = True, kind: str = "cosine") -> optax.Schedule:
    """An optax schedule (step -> lr) for :func:`cosine_lr`; cooldown epochs simply run at min_lr.

    ``kind`` names the schedule (one of :data:`SCHEDULES`).
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {kind!r}; expected one of {SCHEDULES}")

    def schedule(step):
        epoch = jnp.asarray(step, jnp.float32) / steps_per_epoch
        if per_epoch:
            epoch = jnp.floor(epoch)
        return cosine_lr(epoch, lr=lr, min_lr=min_lr, epochs=epochs, warmup_epochs=warmup_epochs,
                         warmup_lr=warmup_lr)
    return schedule
