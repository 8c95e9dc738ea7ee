"""Pieces every vision backbone shares: the input check and the per-stage remat switch."""
from __future__ import annotations

import jax
from flax import nnx


def check_image_batch(x: jax.Array, channels: int = 3) -> None:
    """Models take NHWC image batches; say so clearly instead of failing deep inside a conv."""
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"expected an NHWC image batch of shape [batch, height, width, {channels}], "
                         f"got shape {tuple(x.shape)}")


def _call(module, x):
    return module(x)


def run_stage(stage: nnx.Module, x, remat: bool = False):
    """``stage(x)``; with ``remat`` its activations are recomputed in the backward pass
    (``nnx.remat``) instead of being stored: less memory for one more forward of the stage."""
    return nnx.remat(_call)(stage, x) if remat else stage(x)
