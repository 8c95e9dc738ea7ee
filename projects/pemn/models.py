"""PEMN (Parameter-Efficient Masking Networks, NeurIPS 2022): ConvMixer and a small ViT whose weights
are frozen random draws, selected by trained masks (``lib.layers.masked``), with weight sharing
across layers (``lib.layers.prototypes``: one-layer, max-layer padding, random-vector padding).

ConvMixer follows ``yueb17/PEMN`` (locuslab's ConvMixer with every conv and the head masked, no
biases): stem ``Conv(patch, stride patch) -> GELU -> BN``; blocks
``x + BN(GELU(DWConv(x)))`` then ``BN(GELU(PWConv(x)))``; mean pool; linear head. Only the
scores and the BatchNorm affine parameters are trained. ``masked=False`` builds the same network
with ordinary trainable layers (the "dense" point of the paper's curves).

The ViT has no released PEMN code; ours masks the patch embedding, qkv, projection, MLP and head
linears and trains the scores, the LayerNorm affine parameters and the position embedding.

Frozen weights are regenerated in the constructor from ``weight_seed`` and the strategy, so they
are never stored (checkpoints keep a hash; see ``lib.layers.masked``). Importing this module
registers the variants in ``lib.zoo``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lib import sharding, zoo
from lib.layers import initializers, prototypes
from lib.layers.backbone import check_image_batch
from lib.layers.conv import Conv
from lib.layers.linear import Linear
from lib.layers.masked import MaskedConv, MaskedLinear, masked_depthwise_conv
from lib.layers.norm import BatchNorm, LayerNorm
from lib.layers.star import gelu


class _LayerFactory:
    """Builds masked layers (PEMN) or their ordinary dense twins from one set of arguments."""

    def __init__(self, masked: bool, keep: float, dtype, param_dtype, rngs: nnx.Rngs):
        self.masked, self.rngs, self.param_dtype = masked, rngs, param_dtype
        self.kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mask_kw = dict(keep=keep) if masked else dict(use_bias=False, init="torch")

    def _placeholder(self, shape) -> dict:
        """A masked layer's kernel is redrawn by ``prototypes.regenerate`` at the end of the model's
        constructor, so the layer's own Kaiming draw (a random-number program compiled per shape) is
        skipped. Its key is still taken, so the scores get the key, hence the values, they had."""
        self.rngs.params()
        return dict(kernel=jnp.zeros(shape, self.param_dtype))

    def conv(self, cin, cout, k, **kw):
        if self.masked:
            return MaskedConv(cin, cout, k, **self._placeholder((k, k, cin, cout)), **kw, **self.mask_kw, **self.kw)
        return Conv(cin, cout, k, **kw, **self.mask_kw, **self.kw)

    def depthwise(self, channels, k):
        if self.masked:
            return masked_depthwise_conv(channels, k, **self._placeholder((k, k, 1, channels)), **self.mask_kw,
                                         **self.kw)
        # PEMN's regular ConvMixer: nn.Conv2d(dim, dim, k, groups=dim, padding="same", bias=False)
        return Conv(channels, channels, k, padding=k // 2, groups=channels, **self.mask_kw, **self.kw)

    def linear(self, cin, cout, out_axis="out_channels"):
        if self.masked:
            return MaskedLinear(cin, cout, out_axis=out_axis, **self._placeholder((cin, cout)), **self.mask_kw,
                                **self.kw)
        return Linear(cin, cout, out_axis=out_axis, **self.mask_kw, **self.kw)


def _regenerate(model, masked, weight_seed, weight_strategy, rp_ratio, rp_tiling):
    if masked:
        prototypes.regenerate(model, weight_seed, weight_strategy, ratio=rp_ratio, tiling=rp_tiling)
    elif weight_strategy != "iid":
        raise ValueError(f"weight_strategy={weight_strategy!r} needs masked=True (a dense model trains its weights)")


class MixerBlock(nnx.Module):
    """``x + BN(GELU(depthwise(x)))`` then ``BN(GELU(pointwise(x)))``."""

    def __init__(self, dim: int, kernel_size: int, layers: _LayerFactory, *, dtype, param_dtype):
        self.dw = layers.depthwise(dim, kernel_size)
        self.bn1 = BatchNorm(dim, dtype=dtype, param_dtype=param_dtype)
        self.pw = layers.conv(dim, dim, 1)
        self.bn2 = BatchNorm(dim, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x):
        x = x + self.bn1(gelu(self.dw(x)))
        return self.bn2(gelu(self.pw(x)))


class ConvMixer(nnx.Module):
    """ConvMixer-``dim``/``depth`` as in PEMN.

    Args:
      masked: frozen random weights selected by trained masks (PEMN) or a dense trainable network.
      keep: fraction of each layer's weights kept (PEMN's ``--sparsity``, default 0.5).
      weight_strategy: ``iid`` (PEMN's "Mask"), ``one_layer``, ``mp`` or ``rp``; ``rp_ratio`` r and
        ``rp_tiling`` (``copy`` / ``rand``) for RP.
      weight_seed: seed the frozen weights are regenerated from (independent of ``rngs``, which
        initialises the scores).
    """

    def __init__(self, dim: int = 256, depth: int = 8, kernel_size: int = 5, patch_size: int = 2,
                 num_classes: int = 10, *, masked: bool = True, keep: float = 0.5, weight_strategy: str = "iid",
                 rp_ratio: float = 1.0, rp_tiling: str = "copy", weight_seed: int = 0, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        layers = _LayerFactory(masked, keep, dtype, param_dtype, rngs)
        norm = dict(dtype=dtype, param_dtype=param_dtype)
        self.num_classes, self.num_features = num_classes, dim
        self.stem = layers.conv(3, dim, patch_size, stride=patch_size)
        self.stem_bn = BatchNorm(dim, **norm)
        self.blocks = nnx.List([MixerBlock(dim, kernel_size, layers, **norm) for _ in range(depth)])
        self.head = layers.linear(dim, num_classes, out_axis="classes") if num_classes > 0 else None
        _regenerate(self, masked, weight_seed, weight_strategy, rp_ratio, rp_tiling)

    def forward_intermediates(self, x: jax.Array) -> list[jax.Array]:
        """The feature map after the stem and after every block (all at stride ``patch_size``)."""
        check_image_batch(x)
        x = self.stem_bn(gelu(self.stem(x)))
        features = [x]
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features

    def forward_features(self, x: jax.Array) -> jax.Array:
        return self.forward_intermediates(x)[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.mean(self.forward_features(x).astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
        return x if self.head is None else self.head(x)


class Attention(nnx.Module):
    """Multi-head self-attention over tokens ``[B, N, dim]``; softmax in float32."""

    def __init__(self, dim: int, num_heads: int, layers: _LayerFactory):
        if dim % num_heads:
            raise ValueError(f"dim {dim} does not divide into {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = layers.linear(dim, 3 * dim)
        self.proj = layers.linear(dim, dim)

    def __call__(self, x):
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(b, n, 3, h, d // h), 2, 0)      # [B, N, heads, d/h] each
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(d // h).astype(jnp.float32)
        attn = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        return self.proj(jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d))


class ViTBlock(nnx.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, layers: _LayerFactory, *, dtype, param_dtype):
        norm = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1, self.attn = LayerNorm(dim, **norm), Attention(dim, num_heads, layers)
        self.norm2 = LayerNorm(dim, **norm)
        self.fc1, self.fc2 = layers.linear(dim, mlp_ratio * dim), layers.linear(mlp_ratio * dim, dim)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(gelu(self.fc1(self.norm2(x))))


class ViT(nnx.Module):
    """A small pre-norm ViT (mean-pooled, no class token) with masked linears; same masking
    arguments as :class:`ConvMixer`. ``img_size`` fixes the learned position embedding."""

    def __init__(self, dim: int = 192, depth: int = 6, num_heads: int = 3, mlp_ratio: int = 2, patch_size: int = 4,
                 img_size: int = 32, num_classes: int = 10, *, masked: bool = True, keep: float = 0.5,
                 weight_strategy: str = "iid", rp_ratio: float = 1.0, rp_tiling: str = "copy", weight_seed: int = 0,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        layers = _LayerFactory(masked, keep, dtype, param_dtype, rngs)
        norm = dict(dtype=dtype, param_dtype=param_dtype)
        self.num_classes, self.num_features, self.img_size = num_classes, dim, img_size
        self.patch_embed = layers.conv(3, dim, patch_size, stride=patch_size)
        tokens = (img_size // patch_size) ** 2
        self.pos_embed = sharding.param(initializers.trunc_normal(0.02)(rngs.params(), (1, tokens, dim), param_dtype),
                                        (None, None, "channels"))
        self.blocks = nnx.List([ViTBlock(dim, num_heads, mlp_ratio, layers, **norm) for _ in range(depth)])
        self.norm = LayerNorm(dim, **norm)
        self.head = layers.linear(dim, num_classes, out_axis="classes") if num_classes > 0 else None
        _regenerate(self, masked, weight_seed, weight_strategy, rp_ratio, rp_tiling)

    def forward_features(self, x: jax.Array) -> jax.Array:
        """Normalised tokens ``[B, N, dim]``."""
        check_image_batch(x)
        if x.shape[1] != self.img_size or x.shape[2] != self.img_size:
            raise ValueError(f"this ViT was built for {self.img_size}x{self.img_size} images, got {x.shape[1:3]}")
        x = self.patch_embed(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.pos_embed[...].astype(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.mean(self.forward_features(x).astype(jnp.float32), axis=1).astype(x.dtype)
        return x if self.head is None else self.head(x)


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
# ConvMixer (dim, depth): the paper's sizes, plus small ones for the digits runs (patch 2, kernel 5).
CONVMIXER_VARIANTS = {(256, 6), (256, 8), (512, 6), (512, 8), (32, 4), (64, 4)}
# ViT (dim, depth, heads, patch): the paper's sizes at 32x32, plus a small one for digits.
VIT_VARIANTS = {"pemn_vit_256_6": (256, 6, 4, 4), "pemn_vit_512_6": (512, 6, 8, 4), "pemn_vit_64_4": (64, 4, 4, 2)}
CIFAR_INPUT = jax.ShapeDtypeStruct((32, 32, 3), jnp.float32)   # the paper's CIFAR images


def _convmixer_factory(dim, depth):
    def factory(*, num_classes=1000, rngs, **kw):
        return ConvMixer(dim, depth, num_classes=num_classes, rngs=rngs, **kw)
    return factory


def _vit_factory(dim, depth, heads, patch):
    def factory(*, num_classes=1000, rngs, **kw):
        return ViT(dim, depth, heads, patch_size=patch, num_classes=num_classes, rngs=rngs, **kw)
    return factory


for _dim, _depth in sorted(CONVMIXER_VARIANTS):
    zoo.register_model(f"pemn_convmixer_{_dim}_{_depth}", _convmixer_factory(_dim, _depth), example_input=CIFAR_INPUT)
for _name, _args in VIT_VARIANTS.items():
    zoo.register_model(_name, _vit_factory(*_args), example_input=CIFAR_INPUT)
