"""Mixup / CutMix with label smoothing in pure JAX, timm's ``Mixup(mode='batch')`` semantics.

It runs on device inside the jitted train step (after the batch is sharded), so it is written with
``lax.switch`` / ``jnp.where`` and static shapes; the only Python branches are on the static
hyper-parameters. One mixing coefficient is drawn per (global) batch, and each example is mixed
with its mirror ``images[::-1]``, exactly as timm does. Under a data-parallel sharding the flip
pairs examples across devices; XLA inserts the (small) collective permute for that.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lib.tasks.losses import smoothed_one_hot


def cutmix_box(key: jax.Array, height: int, width: int, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """timm's ``rand_bbox`` + area correction: a ``[H, W]`` bool mask of the box and the new lam.

    The box has sides ``int(H * sqrt(1 - lam))`` x ``int(W * sqrt(1 - lam))`` around a uniform
    centre, clipped to the image; lam becomes ``1 - box_area / image_area`` so that the targets
    match the pixels actually pasted.
    """
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    key_y, key_x = jax.random.split(key)
    cy = jax.random.randint(key_y, (), 0, height)
    cx = jax.random.randint(key_x, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
    return box, lam


def mixup_cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, extra: jax.Array | None = None):
    """Mix a batch ``images [B, H, W, C]``, ``labels [B]`` (int) with its flipped copy.

    With probability ``prob`` the batch is mixed: when both alphas are positive CutMix is chosen
    with ``switch_prob``, otherwise the enabled one; lam ~ Beta(alpha, alpha) (CutMix: corrected by
    the box area). Targets are ``lam * y + (1 - lam) * y[::-1]`` with smoothed one-hot ``y``.
    With both alphas 0 (or ``prob`` 0) the images come back unchanged with smoothed one-hot targets.

    Returns ``(mixed_images, soft_targets [B, num_classes] float32)``. With ``extra`` (per-example
    soft vectors, e.g. a teacher's probabilities ``[B, K]``) it returns a third value, ``extra``
    mixed with the same weights as the targets.
    """
    targets = smoothed_one_hot(labels, num_classes, label_smoothing)
    if (mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0:
        return (images, targets) if extra is None else (images, targets, extra)

    key_apply, key_switch, key_mix, key_cut, key_box = jax.random.split(key, 5)
    _, height, width, _ = images.shape
    flipped = images[::-1]

    def no_mix():
        return images, jnp.float32(1.0)

    def mixup():
        lam = jax.random.beta(key_mix, mixup_alpha, mixup_alpha).astype(jnp.float32)
        mixed = lam * images + (1.0 - lam) * flipped
        return mixed.astype(images.dtype), lam

    def cutmix():
        lam = jax.random.beta(key_cut, cutmix_alpha, cutmix_alpha).astype(jnp.float32)
        box, lam = cutmix_box(key_box, height, width, lam)
        return jnp.where(box[None, :, :, None], flipped, images), lam

    # Branch index: 0 no mixing, 1 mixup, 2 cutmix (decided on device, one draw per batch).
    apply = jax.random.uniform(key_apply) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(key_switch) < switch_prob
        branch = jnp.where(apply, jnp.where(use_cutmix, 2, 1), 0)
    else:
        branch = jnp.where(apply, 2 if cutmix_alpha > 0 else 1, 0)
    mixed, lam = jax.lax.switch(branch, (no_mix, mixup, cutmix))
    targets = lam * targets + (1.0 - lam) * targets[::-1]
    if extra is None:
        return mixed, targets
    return mixed, targets, lam * extra + (1.0 - lam) * extra[::-1]
