"""The MetaFormer block (PoolFormer's pattern) shared by Context Clusters and FCViT.

    x = x + drop_path(layer_scale_1 * token_mixer(norm1(x)))
    x = x + drop_path(layer_scale_2 * channel_mixer(norm2(x)))

Both norms are ``GroupNorm(1, C)`` on NHWC tensors; the layer scales are per-channel vectors
(upstream initialises them to 1e-5). A project passes its own token mixer (CoC's ``Cluster``,
FCViT's global-context mixer) and channel mixer (an ``Mlp`` or FCViT's conv MLP) as modules; the
block itself knows nothing about either. Child names follow the PyTorch checkpoints
(``norm1``, ``token_mixer``, ``norm2``, ``layer_scale_1``, ``layer_scale_2``); the channel mixer is
``channel_mixer`` (CoC's converter maps its ``mlp`` key onto it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lib import sharding
from lib.layers.drop import DropPath
from lib.layers.norm import GroupNorm


def layer_scale(dim: int, init_value: float, param_dtype=jnp.float32) -> nnx.Param:
    """A per-channel residual scale (``gamma`` / ``layer_scale_*`` upstream), filled with ``init_value``."""
    return sharding.param(jnp.full((dim,), init_value, param_dtype), ("channels",))


class MetaFormerBlock(nnx.Module):
    """Pre-norm residual block around any token mixer and channel mixer (NHWC in, NHWC out)."""

    def __init__(self, dim: int, token_mixer: nnx.Module, channel_mixer: nnx.Module, *,
                 drop_path: float = 0.0, layer_scale_init: float = 1e-5, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(dim, dtype=dtype, param_dtype=param_dtype)
        self.token_mixer = token_mixer
        self.norm2 = GroupNorm(dim, dtype=dtype, param_dtype=param_dtype)
        self.channel_mixer = channel_mixer
        self.layer_scale_1 = layer_scale(dim, layer_scale_init, param_dtype)
        self.layer_scale_2 = layer_scale(dim, layer_scale_init, param_dtype)
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.token_mixer(self.norm1(x))
        x = x + self.drop_path(self.layer_scale_1[...].astype(y.dtype) * y)
        y = self.channel_mixer(self.norm2(x))
        return x + self.drop_path(self.layer_scale_2[...].astype(y.dtype) * y)
