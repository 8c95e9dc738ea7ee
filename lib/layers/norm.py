"""Normalisation layers with PyTorch defaults (eps 1e-5), always computed in float32.

The output is cast back to ``dtype`` (or the input's dtype), so bfloat16 models keep float32
statistics.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lib import sharding


def _ones(n, dtype):
    return sharding.param(jnp.ones((n,), dtype), ("channels",))


def _zeros(n, dtype):
    return sharding.param(jnp.zeros((n,), dtype), ("channels",))


class BatchNorm(nnx.Module):
    """``torch.nn.BatchNorm2d`` over the last (channel) axis of an NHWC tensor.

    ``momentum`` is PyTorch's (0.1: new = 0.9 * old + 0.1 * batch). As in PyTorch the running
    variance is updated with the unbiased batch variance while the output is normalised with the
    biased one. ``model.eval()`` sets ``use_running_average``.

    Under ``jax.jit`` with the batch sharded over devices the statistics are global (synchronised)
    batch statistics. ``batch_groups=G`` instead normalises each of G equal slices of the batch with
    its own statistics, as per-GPU BatchNorm under PyTorch DDP does (with G = the data-parallel size
    each device's slice is one group, no communication); the running statistics take the mean over
    groups, like timm's ``--dist-bn reduce``.
    """

    def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
                 use_running_average: bool = False, batch_groups: int = 1, dtype=None,
                 param_dtype=jnp.float32):
        self.num_features, self.momentum, self.epsilon = num_features, momentum, epsilon
        self.batch_groups = batch_groups
        self.use_running_average, self.dtype = use_running_average, dtype
        self.scale = _ones(num_features, param_dtype)
        self.bias = _zeros(num_features, param_dtype)
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32), out_sharding=("channels",),
                                  eager_sharding=False)
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32), out_sharding=("channels",),
                                 eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"BatchNorm expects {self.num_features} channels in the last axis, "
                             f"got shape {tuple(x.shape)}")
        out_dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            g = self.batch_groups
            if x.shape[0] % g:
                raise ValueError(f"BatchNorm batch_groups={g} does not divide the batch of {x.shape[0]}")
            x32 = x32.reshape((g, x.shape[0] // g) + x.shape[1:])    # [groups, batch/groups, ..., C]
            axes = tuple(range(1, x32.ndim - 1))
            mean = jnp.mean(x32, axes, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), axes, keepdims=True)
            n = x32[0].size // x32.shape[-1]
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * jnp.mean(mean.reshape(g, -1), 0)
            self.var[...] = (1 - m) * self.var[...] + m * jnp.mean(var.reshape(g, -1), 0) * (n / max(n - 1, 1))
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.reshape(x.shape).astype(out_dtype)


class LayerNorm(nnx.Module):
    """``torch.nn.LayerNorm(C)`` over the last axis (eps 1e-5), computed in float32."""

    def __init__(self, num_features: int, *, epsilon: float = 1e-5, dtype=None, param_dtype=jnp.float32):
        self.num_features, self.epsilon, self.dtype = num_features, epsilon, dtype
        self.scale = _ones(num_features, param_dtype)
        self.bias = _zeros(num_features, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"LayerNorm expects {self.num_features} features in the last axis, "
                             f"got shape {tuple(x.shape)}")
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, -1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


class GroupNorm(nnx.Module):
    """``torch.nn.GroupNorm(num_groups, C)`` on an NHWC tensor (eps 1e-5), computed in float32.

    Each sample is normalised over its spatial axes and the channels of each group; the affine
    scale/bias are per channel. ``GroupNorm(C)`` (one group) is the MetaFormer norm of Context
    Clusters and FCViT: it normalises over (H, W, C) per sample.
    """

    def __init__(self, num_features: int, num_groups: int = 1, *, epsilon: float = 1e-5, dtype=None,
                 param_dtype=jnp.float32):
        if num_features % num_groups:
            raise ValueError(f"GroupNorm: {num_groups} groups do not divide {num_features} channels")
        self.num_features, self.num_groups, self.epsilon, self.dtype = num_features, num_groups, epsilon, dtype
        self.scale = _ones(num_features, param_dtype)
        self.bias = _zeros(num_features, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim < 2 or x.shape[-1] != self.num_features:
            raise ValueError(f"GroupNorm expects [batch, ..., {self.num_features}] (channels last), "
                             f"got shape {tuple(x.shape)}")
        g = self.num_groups
        x32 = x.astype(jnp.float32).reshape(x.shape[:-1] + (g, x.shape[-1] // g))
        axes = tuple(range(1, x32.ndim - 2)) + (x32.ndim - 1,)  # spatial axes + channels in a group
        mean = jnp.mean(x32, axes, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axes, keepdims=True)
        y = ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)
