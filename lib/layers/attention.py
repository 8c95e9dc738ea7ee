"""Multi-head self-attention and the pre-norm ViT block, on NHWC feature maps or token sequences.

Follows the attention of EfficientMod's hybrid stages (timm's ``Attention`` with one change): the
head width is ``max(dim // num_heads, 32)``, so the inner width ``num_heads * head_dim`` may differ
from ``dim``; ``qkv`` has no bias. The fused ``qkv`` output channel ``s*inner + h*head_dim + d``
holds part s (q, k, v), head h, dimension d, the layout of the PyTorch weights (they are never
re-ordered). Softmax is computed in float32 whatever the compute dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lib.layers.drop import DropPath
from lib.layers.linear import Linear
from lib.layers.mlp import Mlp
from lib.layers.norm import LayerNorm


def attention_head_dim(dim: int, num_heads: int) -> int:
    """EfficientMod's head width rule: ``max(dim // num_heads, 32)``."""
    return max(dim // num_heads, 32)


class Attention(nnx.Module):
    """Global self-attention over the tokens of ``[B, N, dim]``: qkv -> softmax(q k^T / sqrt(hd)) v -> proj."""

    def __init__(self, dim: int, num_heads: int = 8, head_dim: int | None = None, *, qkv_bias: bool = False,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = head_dim or attention_head_dim(dim, num_heads)
        inner = num_heads * self.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Linear(dim, 3 * inner, use_bias=qkv_bias, **kw)
        self.proj = Linear(inner, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 3:
            raise ValueError(f"Attention expects tokens [batch, tokens, channels], got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)   # channel s*inner + h*hd + d
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                  # [B, N, heads, hd]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.head_dim ** -0.5
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(out)


class AttentionBlock(nnx.Module):
    """Pre-norm transformer block without layer scale or position embedding, on NHWC maps:

        x = x + drop_path(attn(norm1(x)));  x = x + drop_path(mlp(norm2(x)))

    The H*W positions are the tokens. Children ``norm1``, ``attn``, ``norm2``, ``mlp`` (``fc1``,
    ``fc2``) as in the PyTorch checkpoints.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, num_heads: int = 8, drop_path: float = 0.0, *,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(dim, **kw)
        self.attn = Attention(dim, num_heads, rngs=rngs, **kw)
        self.norm2 = LayerNorm(dim, **kw)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs, **kw)
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"AttentionBlock expects NHWC input, got shape {tuple(x.shape)}")
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.reshape(b, h, w, c)
