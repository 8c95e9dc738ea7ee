"""Convolutions in NHWC with explicit, PyTorch-style symmetric padding.

``conv2d`` is the one place a convolution is computed, so backend-specific fast paths (e.g. a
shifted multiply-add depthwise conv on XLA:CPU) can be slotted in behind it without touching the
models. Kernels are stored HWIO (``[kh, kw, in/groups, out]``), the layout the converter writes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lib import sharding
from lib.layers import initializers
from lib.layers.norm import BatchNorm


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv2d(x: jax.Array, kernel: jax.Array, stride=(1, 1), padding=((0, 0), (0, 0)),
           groups: int = 1) -> jax.Array:
    """NHWC x HWIO convolution; ``padding`` is explicit ((top, bottom), (left, right))."""
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=stride, padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


class Conv(nnx.Module):
    """``torch.nn.Conv2d`` in NHWC: same arguments, same padding, same default init.

    Args:
      padding: an int or (ph, pw) of symmetric padding, as in PyTorch; never 'SAME' (which pads
        strided convs asymmetrically and breaks ported weights).
      init: ``"torch"`` (PyTorch's default, kept by the upstream models) or ``"trunc_normal"``.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); ``None`` computes in the parameters' dtype.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, *, stride=1, padding=0,
                 groups: int = 1, use_bias: bool = True, init: str = "torch", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} do not divide into {groups} groups")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        ph, pw = _pair(padding)
        self.padding = ((ph, ph), (pw, pw))
        self.dtype = dtype
        kh, kw = self.kernel_size
        fan_in = (in_channels // groups) * kh * kw
        kernel_init, bias_init = initializers.kernel_and_bias_init(init, fan_in)
        shape = (kh, kw, in_channels // groups, out_channels)
        # A depthwise kernel has a size-1 input dimension: nothing there to shard.
        in_name = "in_channels" if in_channels // groups > 1 else None
        self.kernel = sharding.param(kernel_init(rngs.params(), shape, param_dtype),
                                     ("kernel_h", "kernel_w", in_name, "out_channels"))
        self.bias = (sharding.param(bias_init(rngs.params(), (out_channels,), param_dtype), ("out_channels",))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"Conv expects NHWC input [batch, height, width, {self.in_channels}], "
                             f"got shape {tuple(x.shape)}")
        dtype = self.dtype or jnp.result_type(x.dtype, self.kernel.dtype)
        y = conv2d(x.astype(dtype), self.kernel[...].astype(dtype), self.stride, self.padding, self.groups)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class ConvBN(nnx.Module):
    """Conv followed by an optional BatchNorm (eps 1e-5, torch momentum 0.1); no activation.

    Mirrors the ``ConvBN`` ``nn.Sequential`` of the StarNet code: children ``conv`` and ``bn``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, *, stride=1, padding=0,
                 groups: int = 1, with_bn: bool = True, init: str = "torch", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         groups=groups, init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn = BatchNorm(out_channels, dtype=dtype, param_dtype=param_dtype) if with_bn else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x


def depthwise_conv(channels: int, kernel_size: int, *, init: str = "torch", dtype=None,
                   param_dtype=jnp.float32, rngs: nnx.Rngs) -> Conv:
    """A stride-1 depthwise conv with 'same' symmetric padding (odd kernel sizes)."""
    if kernel_size % 2 != 1:
        raise ValueError(f"depthwise_conv needs an odd kernel size, got {kernel_size}")
    return Conv(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, init=init,
                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
