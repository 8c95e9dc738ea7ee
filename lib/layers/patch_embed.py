"""Overlapping patch embedding: a strided conv, optionally followed by a channels-last LayerNorm.

EfficientMod's ``PatchEmbed`` (stem k7 s4 p3, downsamplers k3 s2 p1). Children are named
``proj`` and ``norm`` as in the PyTorch checkpoints.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lib.layers.conv import Conv
from lib.layers.norm import LayerNorm


class PatchEmbed(nnx.Module):
    """``Conv2d(in, out, kernel, stride, padding)`` -> ``LayerNorm(out)`` (eps 1e-5) on NHWC tensors.

    Args:
      norm: ``True`` adds the LayerNorm over channels (upstream ``patch_norm=True``).
      init: conv init scheme (``"torch"``: PyTorch's default, kept by the upstream models).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int, padding: int,
                 norm: bool = True, init: str = "torch", dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.proj = Conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding, init=init,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = LayerNorm(out_channels, dtype=dtype, param_dtype=param_dtype) if norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)
        return self.norm(x) if self.norm is not None else x
