"""The EfficientMod block ("Efficient Modulation for Vision Networks", ICLR 2024), channels-last.

    z   = LayerNorm(x)
    ctx = g(GELU(DW7x7(f(z))))               # the context branch (``context_layer``)
    v   = fc1(z), then GELU unless mlp_ratio == 1
    x   = x + drop_path(gamma_1 * fc2(v * tile(ctx, mlp_ratio)))

The value branch is ``mlp_ratio`` times wider than the context; upstream multiplies with
``ctx.repeat(1, 1, 1, r)`` on a channels-last tensor, i.e. **tiling** (channel k of ``v`` meets
``ctx[k % dim]``), never ``jnp.repeat``. Upstream's grouping factor ``conv_group_dim`` equals the
mlp ratio in every released model, which makes the context branch ``dim`` wide; that is the only
case built here. Children mirror the PyTorch checkpoint (``norm``, ``mlp.fc1``,
``mlp.context_layer.{f, dwconv, g}``, ``mlp.fc2``, ``gamma_1``); upstream's one-element
``context_layer.context_list.0`` is ``dwconv`` here (the project's key map renames it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lib.layers.conv import depthwise_conv
from lib.layers.drop import DropPath
from lib.layers.linear import Linear
from lib.layers.metaformer import layer_scale
from lib.layers.norm import LayerNorm
from lib.layers.star import gelu


class ContextLayer(nnx.Module):
    """The context branch: ``Linear(dim, dim) -> depthwise kxk conv -> GELU -> Linear(dim, dim)``."""

    def __init__(self, dim: int, kernel_size: int = 7, *, conv_init: str = "torch", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.f = Linear(dim, dim, **kw)
        self.dwconv = depthwise_conv(dim, kernel_size, init=conv_init, **kw)
        self.g = Linear(dim, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.g(gelu(self.dwconv(self.f(x))))


class ModulationMlp(nnx.Module):
    """The modulation itself (upstream ``Mlp``): value ``fc1`` times the tiled context, then ``fc2``."""

    def __init__(self, dim: int, mlp_ratio: int, kernel_size: int = 7, *, conv_init: str = "torch",
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if int(mlp_ratio) != mlp_ratio or mlp_ratio < 1:
            raise ValueError(f"EfficientMod mlp_ratio must be a positive integer (it is also the number of "
                             f"context tiles), got {mlp_ratio}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp_ratio = int(mlp_ratio)
        self.fc1 = Linear(dim, dim * self.mlp_ratio, **kw)
        self.context_layer = ContextLayer(dim, kernel_size, conv_init=conv_init, **kw)
        self.fc2 = Linear(dim * self.mlp_ratio, dim, **kw)

    def __call__(self, x: jax.Array, return_context: bool = False):
        ctx = self.context_layer(x)
        v = self.fc1(x)
        if self.mlp_ratio > 1:  # upstream: no activation when the value branch is not expanded
            v = gelu(v)
        y = self.fc2(v * jnp.tile(ctx, (1,) * (ctx.ndim - 1) + (self.mlp_ratio,)))
        return (y, ctx) if return_context else y


class ModulationBlock(nnx.Module):
    """``x + drop_path(gamma_1 * ModulationMlp(LayerNorm(x)))`` on NHWC tensors.

    ``return_context=True`` also returns the context map ``[B, H, W, dim]`` (for visualisation).
    """

    def __init__(self, dim: int, mlp_ratio: int = 4, drop_path: float = 0.0, *, kernel_size: int = 7,
                 layer_scale_init: float = 1e-4, conv_init: str = "torch", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm = LayerNorm(dim, dtype=dtype, param_dtype=param_dtype)
        self.mlp = ModulationMlp(dim, mlp_ratio, kernel_size, conv_init=conv_init, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
        self.gamma_1 = layer_scale(dim, layer_scale_init, param_dtype)
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array, return_context: bool = False):
        if x.ndim != 4:
            raise ValueError(f"ModulationBlock expects NHWC input, got shape {tuple(x.shape)}")
        y, ctx = self.mlp(self.norm(x), return_context=True)
        x = x + self.drop_path(self.gamma_1[...].astype(y.dtype) * y)
        return (x, ctx) if return_context else x
