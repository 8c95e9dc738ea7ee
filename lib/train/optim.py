"""Optimizers as the official recipes build them: AdamW or SGD, weight-decay groups, clipping."""
from __future__ import annotations

import jax
import optax


def decay_mask(params, decay_1d_params: bool = False):
    """True where a parameter is weight-decayed: every parameter with ``ndim > 1``.

    This is timm 0.6.13's ``param_groups_weight_decay`` (``ndim <= 1 or name.endswith('.bias')``
    exempt) for the models here: every PyTorch ``.bias`` is 1-D, and none of them defines
    ``no_weight_decay()``, so the 1-D parameters (biases, norm scales/shifts, layer scales,
    CoC's ``sim_alpha``/``sim_beta``, FCViT's ``rescale_*``) are exactly the exempt ones.
    ``decay_1d_params``: decay everything, as a plain ``torch.optim.AdamW/SGD(model.parameters(),
    weight_decay=...)`` (PEMN's script, StarNet's 2-D toy).
    """
    return jax.tree.map(lambda p: decay_1d_params or p.ndim > 1, params)


def make_optimizer(schedule: optax.Schedule, *, name: str = "adamw", weight_decay: float = 0.05,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, momentum: float = 0.9,
                   grad_clip: float | None = None, decay_1d_params: bool = False) -> optax.GradientTransformation:
    """AdamW (or SGD with momentum) with optional global-norm clipping.

    Weight decay skips 1-D parameters (biases, norms, layer scales), as timm's
    ``param_groups_weight_decay``, unless ``decay_1d_params`` (plain ``torch.optim.SGD(model.parameters(),
    weight_decay=...)`` decays every parameter). See :func:`decay_mask`.
    """
    mask = lambda params: decay_mask(params, decay_1d_params)  # noqa: E731
    if name == "adamw":
        opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask)
    elif name == "sgd":  # torch SGD: decay added to the gradient before momentum
        opt = optax.chain(optax.add_decayed_weights(weight_decay, mask=mask),
                          optax.sgd(schedule, momentum=momentum))
    else:
        raise ValueError(f"unknown optimizer {name!r}; expected 'adamw' or 'sgd'")
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip else opt
