"""Learning-rate schedules: timm's ``CosineLRScheduler`` and ConvMixer/PEMN's piecewise-linear ramp.

``kind="cosine"`` (timm 0.6 semantics, the upstream recipes of most papers): cosine from ``lr`` to ``min_lr`` over ``epochs``; a linear warmup from ``warmup_lr`` over the
first ``warmup_epochs`` laid *over* the cosine (``warmup_prefix=False``); then ``cooldown_epochs``
at ``min_lr``. ``per_epoch=True`` steps the rate once per epoch as the official scripts do;
``per_epoch=False`` evaluates the same curve at fractional epochs (smoother, same shape).

``kind="piecewise_linear"`` (:func:`piecewise_linear_lr`): PEMN's ``src/convmixer/train.py`` (from
ConvMixer's CIFAR script), per optimizer step, ``np.interp([t], [0, E*2//5, E*4//5, E], [0, lr,
lr/20, 0])`` with integer-division knots, at ``t = epoch + (i+1)/len(loader)`` for batch ``i``: the
``s``-th update (optax count ``s``, from 0) uses ``t = (s+1)/steps_per_epoch``.
"""
from __future__ import annotations

import math

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


def piecewise_linear_lr(epoch, *, lr: float, epochs: int):
    """PEMN/ConvMixer's ramp at (fractional) ``epoch``, exactly ``np.interp`` over the upstream knots.

    Linear 0 -> ``lr`` over ``[0, epochs*2//5]``, -> ``lr/20`` at ``epochs*4//5``, -> 0 at ``epochs``;
    0 from ``epochs`` on. The knots use Python's integer division, as upstream, so they can coincide
    for small ``epochs`` (``epochs=2``: ``[0, 0, 1, 2]``, the ramp up vanishes); where they do, the
    value right of the knot is the later segment's, as ``np.interp`` gives.
    """
    epoch = jnp.asarray(epoch, jnp.float32)
    knots = (0, epochs * 2 // 5, epochs * 4 // 5, epochs)
    values = (0.0, lr, lr / 20.0, 0.0)
    out = jnp.zeros_like(epoch)                  # np.interp: fp[0] left of 0, fp[-1] from epochs on
    for k in range(3):
        x0, x1, y0, y1 = knots[k], knots[k + 1], values[k], values[k + 1]
        if x1 > x0:
            seg = y0 + (epoch - x0) * ((y1 - y0) / (x1 - x0))
            out = jnp.where((epoch >= x0) & (epoch < x1), seg, out)
    return out


def linear_warmup_decay(step, *, lr: float, total_steps: int, warmup_steps: int):
    """transformers' ``get_linear_schedule_with_warmup`` (open-instruct, Mask Fine-Tuning): ``lr *
    step / warmup`` for the first ``warmup_steps`` updates (the very first update at 0), then linear
    decay to 0 at ``total_steps``."""
    step = jnp.asarray(step, jnp.float32)
    warm = step / max(1, warmup_steps)
    decay = jnp.maximum(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return lr * jnp.where(step < warmup_steps, warm, decay)


SCHEDULES = ("cosine", "piecewise_linear", "linear")


def make_schedule(*, lr: float, min_lr: float, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0,
                  warmup_lr: float = 1e-6, per_epoch: bool = True, kind: str = "cosine",
                  warmup_ratio: float = 0.0, total_steps: int | None = None) -> optax.Schedule:
    """An optax schedule (step -> lr); ``kind`` names it (one of :data:`SCHEDULES`).

    ``"cosine"``: :func:`cosine_lr`; cooldown epochs simply run at min_lr.
    ``"linear"``: :func:`linear_warmup_decay` over ``total_steps`` (default ``epochs *
    steps_per_epoch``), warmup over ``warmup_ratio`` of them (or ``warmup_epochs``), per step;
    ``min_lr``/``warmup_lr``/``per_epoch`` are ignored.
    ``"piecewise_linear"``: :func:`piecewise_linear_lr` at ``(step + 1) / steps_per_epoch`` (upstream
    sets the rate for batch ``i`` of an epoch at ``epoch + (i+1)/len(loader)`` before its update). It
    has its own warmup and ends at 0: ``min_lr`` and ``warmup_lr`` are ignored, and ``warmup_epochs``
    must be 0 and ``per_epoch`` False (upstream is per step), else ``ValueError``.
    """
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {kind!r}; expected one of {SCHEDULES}")
    if kind == "linear":   # per step; warmup over a fraction of all steps (HF: ceil(ratio * total))
        total = int(total_steps) if total_steps else int(round(epochs * steps_per_epoch))
        warmup = math.ceil(warmup_ratio * total) if warmup_ratio else int(round(warmup_epochs * steps_per_epoch))
        return lambda step: linear_warmup_decay(step, lr=lr, total_steps=total, warmup_steps=warmup)
    if kind == "piecewise_linear":
        if warmup_epochs:
            raise ValueError(f"lr_schedule 'piecewise_linear' ramps up by itself; warmup_epochs must be 0, "
                             f"got {warmup_epochs}")
        if per_epoch:
            raise ValueError("lr_schedule 'piecewise_linear' is per step; set per_epoch (schedule_per_epoch) False")
        if epochs <= 0:
            raise ValueError(f"epochs must be positive, got {epochs}")
        return lambda step: piecewise_linear_lr((jnp.asarray(step, jnp.float32) + 1) / steps_per_epoch,
                                                lr=lr, epochs=epochs)

    def schedule(step):
        epoch = jnp.asarray(step, jnp.float32) / steps_per_epoch
        if per_epoch:
            epoch = jnp.floor(epoch)
        return cosine_lr(epoch, lr=lr, min_lr=min_lr, epochs=epochs, warmup_epochs=warmup_epochs,
                         warmup_lr=warmup_lr)
    return schedule
