"""The star operation and the blocks built on it ("Rewrite the Stars", CVPR 2024).

The star operation is an element-wise product of two linear branches, ``act(W1 x) * (W2 x)``;
its "sum" twin ``act(W1 x) + (W2 x)`` is the paper's ablation.

Parameter layout when fusing: the two branches are stored as two separate weights (``f1``,
``f2`` in StarNet; DemoNet's ``f`` is already one weight whose output halves are the branches),
exactly as the PyTorch checkpoints store them. A fast path may concatenate ``f1``/``f2`` into one
matmul at call time; the stored layout, the converter and checkpoints never change.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import sharding
from lib.layers.conv import ConvBN, depthwise_conv, fused_pointwise
from lib.layers.drop import DropPath
from lib.layers.linear import Linear
from lib.layers.norm import LayerNorm

STAR_MODES = ("mul", "sum")


def gelu(x):
    """Exact (erf) GELU, as ``torch.nn.GELU()``: ``0.5 * x * (1 + erf(x / sqrt(2)))``, PyTorch's own
    formula. (jax's default is the tanh approximation; ``jax.nn.gelu(approximate=False)`` computes
    ``erfc`` instead, as accurate here but 2.6x slower on XLA:CPU: 15 vs 5.8 ms forward, 24 vs 16 ms
    with its gradient, on a 32x56x56x192 map.) Computed in at least float32, as PyTorch does for
    bfloat16 inputs: in bfloat16, ``1 + erf`` would cancel in the negative tail."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (0.5 * x32 * (1 + jax.lax.erf(x32 * np.sqrt(0.5).astype(x32.dtype)))).astype(x.dtype)


def star(a: jax.Array, b: jax.Array, mode: str = "mul") -> jax.Array:
    """Combine the activated branch ``a`` with the linear branch ``b``: ``a * b`` or ``a + b``."""
    if mode == "mul":
        return a * b
    if mode == "sum":
        return a + b
    raise ValueError(f"unknown star mode {mode!r}; expected one of {STAR_MODES}")


class StarBlock(nnx.Module):
    """StarNet block: DW7x7+BN -> (ReLU6(f1) * f2) -> g+BN -> DW7x7 -> residual + DropPath.

    Children mirror the official ``Block`` (``dwconv``, ``f1``, ``f2``, ``g``, ``dwconv2``).
    """

    def __init__(self, dim: int, mlp_ratio: int = 4, drop_path: float = 0.0, *, init: str = "torch",
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = mlp_ratio * dim
        self.dwconv = ConvBN(dim, dim, 7, padding=3, groups=dim, with_bn=True, **kw)
        self.f1 = ConvBN(dim, hidden, 1, with_bn=False, **kw)
        self.f2 = ConvBN(dim, hidden, 1, with_bn=False, **kw)
        self.g = ConvBN(hidden, dim, 1, with_bn=True, **kw)
        self.dwconv2 = ConvBN(dim, dim, 7, padding=3, groups=dim, with_bn=False, **kw)
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.dwconv(x)
        a, b = fused_pointwise([self.f1.conv, self.f2.conv], y)  # one matmul on the fast path
        y = star(jax.nn.relu6(a), b, "mul")
        y = self.dwconv2(self.g(y))
        return x + self.drop_path(y)


class DemoBlock(nnx.Module):
    """DemoNet block (channels-last, pre-norm): LN -> DW7x7 -> f (dim -> 6 dim) -> split into two
    3 dim halves -> GELU(x1) (*|+) x2 -> g -> layer scale ``gamma`` -> residual + DropPath."""

    def __init__(self, dim: int, mode: str = "mul", drop_path: float = 0.0, layer_scale_init: float = 1e-6,
                 *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if mode not in STAR_MODES:
            raise ValueError(f"unknown star mode {mode!r}; expected one of {STAR_MODES}")
        self.mode = mode
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm = LayerNorm(dim, **kw)
        self.dwconv = depthwise_conv(dim, 7, init="trunc_normal", rngs=rngs, **kw)
        self.f = Linear(dim, 6 * dim, rngs=rngs, **kw)
        self.g = Linear(3 * dim, dim, rngs=rngs, **kw)
        self.gamma = sharding.param(jnp.full((dim,), layer_scale_init, param_dtype), ("channels",))
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.f(self.dwconv(self.norm(x)))
        x1, x2 = jnp.split(y, 2, axis=-1)  # torch: reshape(..., 2, 3*dim).unbind(-2)
        y = self.g(star(gelu(x1), x2, self.mode))
        return x + self.drop_path(self.gamma[...].astype(y.dtype) * y)


class ToyStarBlock(nnx.Module):
    """Block of the paper's 2-D toy network: LN -> Linear(w, 6w) -> ReLU(x1) (*|+) x2 -> Linear -> +x."""

    def __init__(self, width: int, mode: str = "mul", *, rngs: nnx.Rngs):
        if mode not in STAR_MODES:
            raise ValueError(f"unknown star mode {mode!r}; expected one of {STAR_MODES}")
        self.mode = mode
        self.norm = LayerNorm(width)
        self.f = Linear(width, 6 * width, init="torch", rngs=rngs)
        self.g = Linear(3 * width, width, init="torch", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x1, x2 = jnp.split(self.f(self.norm(x)), 2, axis=-1)
        return x + self.g(star(jax.nn.relu(x1), x2, self.mode))
