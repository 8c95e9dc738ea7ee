"""The transformer MLP (``fc1 -> GELU -> fc2`` over the channel axis), shared by every project."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lib.layers.linear import Linear
from lib.layers.star import gelu


class Mlp(nnx.Module):
    """timm's ``Mlp``: ``Linear(dim, hidden) -> exact GELU -> Linear(hidden, out)`` on the last axis.

    Dropout is omitted: every upstream recipe here uses ``drop_rate=0``. Children are named
    ``fc1`` / ``fc2`` as in the PyTorch checkpoints.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, *,
                 init: str = "trunc_normal", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(in_features, hidden_features, **kw)
        self.fc2 = Linear(hidden_features, out_features or in_features, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))
