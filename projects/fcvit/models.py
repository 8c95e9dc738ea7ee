"""FCViT ("A Close Look at Spatial Modeling: From Attention to Convolution", arXiv 2212.12552).

A faithful port of ``models/fcvit.py`` from ma-xu/FCViT, in NHWC; logits match the official
code to float32 round-off (``tests/test_fcvit.py``). The network is a MetaFormer (the layout of
Context Clusters): a 7x7 stride-4 conv + BatchNorm stem, four stages of
:class:`lib.layers.metaformer.MetaFormerBlock` with FCViT's global-context token mixer and
depthwise-conv MLP (``lib.layers.global_context``), 3x3 stride-2 conv + BatchNorm reducers between
stages, GroupNorm, global average pool, linear head. Importing this module registers the variants
in ``lib.zoo``.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lib import zoo
from lib.layers.backbone import check_image_batch, run_stage
from lib.layers.conv import ConvBN
from lib.layers.drop import drop_path_rates
from lib.layers.global_context import DWConvMlp, GlobalContextMixer, base_init, check_init, fan_out_init
from lib.layers.head import ClassifierHead
from lib.layers.metaformer import MetaFormerBlock
from lib.layers.norm import GroupNorm
from projects.fcvit import convert


def fcvit_block(dim: int, mlp_ratio: float, drop_path: float, *, kernel_size: int = 11,
                layer_scale_init: float = 1e-5, init: str = "fcvit", dtype=None, param_dtype=jnp.float32,
                rngs: nnx.Rngs) -> MetaFormerBlock:
    """FCViT's ``BasicBlock``: the shared MetaFormer block around FCViT's two mixers."""
    kw = dict(init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return MetaFormerBlock(dim, GlobalContextMixer(dim, kernel_size=kernel_size, **kw),
                           DWConvMlp(dim, int(dim * mlp_ratio), **kw),
                           drop_path=drop_path, layer_scale_init=layer_scale_init, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)


class FCViTStage(nnx.Module):
    """An optional 3x3 stride-2 conv + BatchNorm reducer (upstream ``OverlapPatchEmbed``), then
    ``len(drop_paths)`` FCViT blocks."""

    def __init__(self, in_dim: int | None, dim: int, mlp_ratio: float, drop_paths: Sequence[float], *,
                 kernel_size: int, layer_scale_init: float, init: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        downsample = None
        if in_dim is not None:
            downsample = ConvBN(in_dim, dim, 3, stride=2, padding=1, init=base_init(init), dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
            fan_out_init(downsample.conv, init, rngs)
        self.downsample = nnx.data(downsample)   # None in the first stage (the stem downsamples)
        self.blocks = nnx.List([fcvit_block(dim, mlp_ratio, dp, kernel_size=kernel_size,
                                            layer_scale_init=layer_scale_init, **kw) for dp in drop_paths])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class FCViT(nnx.Module):
    """FCViT: stem (7x7 s4 conv + BN), four stages (strides 4, 8, 16, 32), GroupNorm, pool, head.

    Args:
      kernel_size: of the token mixer's depthwise convs (11 in every released model).
      layer_scale_init: 1e-5 for classification (upstream ``BaseFormer`` default); the upstream
        detection/segmentation backbones use 1e-6.
      init: ``"fcvit"`` (upstream: convs normal(0, sqrt(2/fan_out)) with zero bias, linears
        trunc_normal(.02)), ``"torch"`` or ``"trunc_normal"``.
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision); norms and the global-context
        statistics stay float32.
      remat: recompute each stage's activations in the backward pass (``nnx.remat``) instead of
        storing them: less memory for more compute.
    """

    torch_key_map = staticmethod(convert.fcvit_key_map)

    def __init__(self, depths: Sequence[int] = (3, 3, 5, 2), dims: Sequence[int] = (32, 64, 160, 320),
                 mlp_ratios: Sequence[float] = (8, 8, 4, 4), drop_path_rate: float = 0.0,
                 num_classes: int = 1000, *, kernel_size: int = 11, layer_scale_init: float = 1e-5, init: str = "fcvit",
                 dtype=None, param_dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        check_init(init)
        if not len(depths) == len(dims) == len(mlp_ratios):
            raise ValueError(f"depths {tuple(depths)}, dims {tuple(dims)} and mlp_ratios {tuple(mlp_ratios)} "
                             "must have one entry per stage")
        kw = dict(init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_classes, self.remat = num_classes, remat
        self.stem = ConvBN(3, dims[0], 7, stride=4, padding=3, init=base_init(init),
                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        fan_out_init(self.stem.conv, init, rngs)
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, start = [], 0
        for i, depth in enumerate(depths):
            stages.append(FCViTStage(dims[i - 1] if i else None, dims[i], mlp_ratios[i], dpr[start:start + depth],
                                     kernel_size=kernel_size, layer_scale_init=layer_scale_init, **kw))
            start += depth
        self.stages = nnx.List(stages)
        self.num_features = dims[-1]
        self.feature_widths = tuple(dims)
        self.norm = GroupNorm(dims[-1], dtype=dtype, param_dtype=param_dtype)
        self.head = ClassifierHead(dims[-1], num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def forward_intermediates(self, x: jax.Array) -> list[jax.Array]:
        """Per-stage feature maps (strides 4, 8, 16, 32), for use as a backbone. (The upstream
        dense-prediction backbones add a GroupNorm per output; those norms are not part of the
        classification checkpoints.)"""
        check_image_batch(x)
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = run_stage(stage, x, self.remat)
            features.append(x)
        return features

    def forward_features(self, x: jax.Array) -> jax.Array:
        """The normalised last feature map, ``[B, H/32, W/32, num_features]``."""
        return self.norm(self.forward_intermediates(x)[-1])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.forward_features(x))


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
# name: (depths, dims, mlp_ratios, eval crop_pct of the upstream default_cfg).
FCVIT_VARIANTS = {
    "fcvit_tiny": ((3, 3, 5, 2), (32, 64, 160, 320), (8, 8, 4, 4), 0.9),
    "fcvit_b12": ((2, 2, 6, 2), (64, 128, 320, 512), (8, 8, 4, 4), 0.9),
    "fcvit_b24": ((4, 4, 12, 4), (64, 128, 320, 512), (8, 8, 4, 4), 0.95),
    "fcvit_b48": ((8, 8, 24, 8), (64, 128, 320, 512), (8, 8, 4, 4), 0.95),
}
# Official weights: Google Drive folders linked from the ma-xu/FCViT README (no direct file URLs).
_DRIVE = "https://drive.google.com/drive/folders/{}"
FCVIT_WEIGHTS = {
    "fcvit_tiny": _DRIVE.format("1YSa8tkXkUQT94mgo-L7q4pv5KiHRTAaR"),
    "fcvit_b12": _DRIVE.format("1QuyalIGhJeD2pxcVxR0_gJNrk2mZ8WEb"),
    "fcvit_b24": _DRIVE.format("1II2v1rhNe9sgLJtoSR-cgSh2mpPQMt4t"),
    "fcvit_b48": _DRIVE.format("16joP1cQwbx4oICL-WbPC1SqGNoc4-NZm"),
}


def _fcvit_factory(depths, dims, mlp_ratios):
    def factory(*, num_classes=1000, rngs, **kw):
        return FCViT(depths, dims, mlp_ratios, num_classes=num_classes, rngs=rngs, **kw)
    return factory


for _name, (_depths, _dims, _ratios, _crop) in FCVIT_VARIANTS.items():
    zoo.register_model(_name, _fcvit_factory(_depths, _dims, _ratios), key_map=convert.fcvit_key_map,
                       example_input=zoo.IMAGE_224, pretrained=FCVIT_WEIGHTS[_name])
