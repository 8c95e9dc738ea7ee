"""Classification losses and metrics, computed in float32 whatever the compute dtype."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def smoothed_one_hot(labels, num_classes: int, smoothing: float = 0.0):
    """timm's targets: ``off = smoothing / num_classes``, ``on = 1 - smoothing + off`` (rows sum to 1)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) > 0, on, off).astype(jnp.float32)


def soft_target_cross_entropy(logits, targets):
    """Per-example ``-sum(targets * log_softmax(logits))`` (timm SoftTargetCrossEntropy)."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def cross_entropy(logits, labels, smoothing: float = 0.0):
    """Per-example cross-entropy with label smoothing (timm LabelSmoothingCrossEntropy)."""
    return soft_target_cross_entropy(logits, smoothed_one_hot(labels, logits.shape[-1], smoothing))


def topk_correct(logits, labels, k: int):
    """1.0 where the label is among the k highest logits (ties broken by index, as torch.topk)."""
    k = min(k, logits.shape[-1])
    _, idx = jax.lax.top_k(logits.astype(jnp.float32), k)
    return jnp.any(idx == labels[:, None], axis=-1).astype(jnp.float32)
