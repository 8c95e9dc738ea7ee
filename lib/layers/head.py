"""Classifier head: global pooling, optional norm on the pooled vector, linear classifier."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lib.layers.linear import Linear
from lib.layers.norm import LayerNorm


class ClassifierHead(nnx.Module):
    """``[B, H, W, C] -> [B, num_classes]``: mean over H, W, then ``norm`` (optional), then ``fc``.

    ``num_classes=0`` makes the head return the pooled features (a backbone). ``norm="layernorm"``
    is DemoNet's norm of the spatial mean; StarNet normalises the feature map before pooling.
    """

    def __init__(self, in_features: int, num_classes: int, *, norm: str | None = None, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_features, self.num_classes = in_features, num_classes
        if norm not in (None, "layernorm"):
            raise ValueError(f"unknown head norm {norm!r}; expected None or 'layernorm'")
        self.norm = LayerNorm(in_features, dtype=dtype, param_dtype=param_dtype) if norm else None
        self.fc = (Linear(in_features, num_classes, out_axis="classes", dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs) if num_classes > 0 else None)

    def __call__(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        # Pool in float32: a mean over thousands of bfloat16 values loses precision.
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
        if self.norm is not None:
            x = self.norm(x)
        if pre_logits or self.fc is None:
            return x
        return self.fc(x)
