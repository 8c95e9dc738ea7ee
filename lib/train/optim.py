"""Optimizers as the official recipes build them: AdamW or SGD, weight-decay groups, clipping."""
from __future__ import annotations

import jax
import optax


def make_optimizer(schedule: optax.Schedule, *, name: str = "adamw", weight_decay: float = 0.05,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, momentum: float = 0.9,
                   grad_clip: float | None = None, decay_1d_params: bool = False) -> optax.GradientTransformation:
    """AdamW (or SGD with momentum) with optional global-norm clipping.

    Weight decay skips 1-D parameters (biases, norms, layer scales), as timm's
    ``param_groups_weight_decay``, unless ``decay_1d_params`` (plain ``torch.optim.SGD(model.parameters(),
    weight_decay=...)`` decays every parameter).
    """
    def decay_mask(params):
        return jax.tree.map(lambda p: decay_1d_params or p.ndim > 1, params)
    if name == "adamw":
        opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    elif name == "sgd":  # torch SGD: decay added to the gradient before momentum
        opt = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                          optax.sgd(schedule, momentum=momentum))
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected 'adamw' or 'sgd'")
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip else opt
