"""StarNet, the isotropic DemoNet and the 2-D toy network of "Rewrite the Stars" (CVPR 2024).

Faithful ports of ``imagenet/starnet.py``, ``imagenet/demonet.py`` and ``2D_visual`` from
ma-xu/Rewrite-the-Stars, in NHWC; logits match the official code to float32 round-off
(``tests/test_parity.py``). Importing this module registers every variant in ``lib.zoo``.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lib import zoo
from lib.layers import initializers
from lib.layers.backbone import check_image_batch, run_stage
from lib.layers.conv import Conv, ConvBN
from lib.layers.drop import drop_path_rates
from lib.layers.head import ClassifierHead
from lib.layers.linear import Linear
from lib.layers.norm import BatchNorm, LayerNorm
from lib.layers.star import DemoBlock, StarBlock, ToyStarBlock
from projects.starnet import convert

STEM_WIDTH = 32


class StarStage(nnx.Module):
    """A stride-2 ConvBN downsampler followed by ``depth`` star blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, mlp_ratio: int, drop_paths: Sequence[float],
                 *, init: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.downsample = ConvBN(in_dim, dim, 3, stride=2, padding=1, **kw)
        self.blocks = nnx.List([StarBlock(dim, mlp_ratio, drop_paths[j], **kw) for j in range(depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class StarNet(nnx.Module):
    """StarNet: stem (ConvBN 3->32, s2, ReLU6), 4 stages of widths ``base_dim * 2**i``, BatchNorm,
    global average pool, linear head. No layer scale, as upstream.

    Args:
      init: ``"torch"`` (upstream: convs keep PyTorch's default init, linears trunc_normal(.02)) or
        ``"trunc_normal"`` (timm's StarNet: trunc_normal(.02) for convs too).
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision); norms stay float32.
      remat: recompute each stage's activations in the backward pass (``nnx.remat``) instead of
        storing them: less memory for more compute.
    """

    torch_key_map = staticmethod(convert.starnet_key_map)

    def __init__(self, base_dim: int = 32, depths: Sequence[int] = (3, 3, 12, 5), mlp_ratio: int = 4,
                 drop_path_rate: float = 0.0, num_classes: int = 1000, *, init: str = "torch", dtype=None,
                 param_dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        kw = dict(init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_classes, self.remat = num_classes, remat
        self.stem = ConvBN(3, STEM_WIDTH, 3, stride=2, padding=1, **kw)
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, in_dim, start = [], STEM_WIDTH, 0
        for i, depth in enumerate(depths):
            dim = base_dim * 2 ** i
            stages.append(StarStage(in_dim, dim, depth, mlp_ratio, dpr[start:start + depth], **kw))
            in_dim, start = dim, start + depth
        self.stages = nnx.List(stages)
        self.num_features = in_dim
        self.feature_widths = tuple(base_dim * 2 ** i for i in range(len(depths)))
        self.norm = BatchNorm(in_dim, dtype=dtype, param_dtype=param_dtype)
        self.head = ClassifierHead(in_dim, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def forward_intermediates(self, x: jax.Array) -> list[jax.Array]:
        """Per-stage feature maps (strides 4, 8, 16, 32), for use as a backbone."""
        check_image_batch(x)
        x = jax.nn.relu6(self.stem(x))
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


class DemoNet(nnx.Module):
    """The paper's isotropic DemoNet: 16x16 patch stem, ``depth`` DemoBlocks of width ``dim``,
    LayerNorm of the spatial mean, linear head. ``mode`` is "mul" (star) or "sum" (ablation)."""

    torch_key_map = staticmethod(convert.demonet_key_map)

    def __init__(self, dim: int = 192, depth: int = 12, mode: str = "mul", drop_path_rate: float = 0.0,
                 layer_scale_init: float = 1e-6, num_classes: int = 1000, *, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.num_classes, self.num_features = num_classes, dim
        self.stem = Conv(3, dim, 16, stride=16, init="trunc_normal", rngs=rngs, **kw)
        dpr = drop_path_rates(drop_path_rate, [depth])
        self.blocks = nnx.List([DemoBlock(dim, mode, dpr[i], layer_scale_init, rngs=rngs, **kw)
                                for i in range(depth)])
        self.head = ClassifierHead(dim, num_classes, norm="layernorm", rngs=rngs, **kw)

    def forward_features(self, x: jax.Array) -> jax.Array:
        check_image_batch(x)
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.forward_features(x))


class DemoNet2D(nnx.Module):
    """The 2-D toy of the paper (``2D_visual/demonet_2d.py``): points ``[B, 2]`` -> logits.

    Linear(2, width) stem, ``depth`` ToyStarBlocks, LayerNorm, Linear(width, num_classes).

    ``init``: ``"trunc_normal"`` (default) is the official ``_init_weights``: every Linear
    (stem, each block's f and g, head) trunc_normal(std 0.02, timm's absolute bounds +-2) with zero
    bias; LayerNorms at weight 1, bias 0. ``"torch"`` keeps PyTorch's default Linear init instead.
    """

    def __init__(self, width: int = 100, depth: int = 4, mode: str = "mul", num_classes: int = 2,
                 *, init: str = "trunc_normal", rngs: nnx.Rngs):
        if init not in initializers.INIT_SCHEMES:
            raise ValueError(f"unknown init scheme {init!r}; expected one of {initializers.INIT_SCHEMES}")
        self.num_classes = num_classes
        self.stem = Linear(2, width, init=init, rngs=rngs)
        self.blocks = nnx.List([ToyStarBlock(width, mode, rngs=rngs) for _ in range(depth)])
        if init != "torch":  # ToyStarBlock builds its Linears with the torch default: redraw them
            for block in self.blocks:
                for layer in (block.f, block.g):
                    kernel_init, bias_init = initializers.kernel_and_bias_init(init, layer.in_features)
                    layer.kernel[...] = kernel_init(rngs.params(), layer.kernel.shape, layer.kernel.dtype)
                    layer.bias[...] = bias_init(rngs.params(), layer.bias.shape, layer.bias.dtype)
        self.norm = LayerNorm(width)
        self.head = Linear(width, num_classes, init=init, out_axis="classes", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 2 or x.shape[-1] != 2:
            raise ValueError(f"expected points of shape [batch, 2], got shape {tuple(x.shape)}")
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
# name: (base_dim, depths, mlp_ratio); the default drop path rates are those of the official recipe.
STARNET_VARIANTS = {
    "starnet_s050": (16, (1, 1, 3, 1), 3),
    "starnet_s100": (20, (1, 2, 4, 1), 4),
    "starnet_s150": (24, (1, 2, 4, 2), 3),
    "starnet_s1": (24, (2, 2, 8, 3), 4),
    "starnet_s2": (32, (1, 2, 6, 2), 4),
    "starnet_s3": (32, (2, 2, 8, 4), 4),
    "starnet_s4": (32, (3, 3, 12, 5), 4),
}
_RELEASE = "https://github.com/ma-xu/Rewrite-the-Stars/releases/download/checkpoints_v1/{}.pth.tar"
_RELEASED = ("starnet_s1", "starnet_s2", "starnet_s3", "starnet_s4")  # s050/s100/s150: none upstream
DEMONET_WIDTHS = tuple(range(32, 449, 32))
DEMONET_DEPTHS = tuple(range(6, 25, 2))


def _starnet_factory(base_dim, depths, mlp_ratio):
    def factory(*, num_classes=1000, rngs, **kw):
        return StarNet(base_dim, depths, mlp_ratio, num_classes=num_classes, rngs=rngs, **kw)
    return factory


def _demonet_factory(dim, depth, mode):
    def factory(*, num_classes=1000, rngs, **kw):
        return DemoNet(dim, depth, mode, num_classes=num_classes, rngs=rngs, **kw)
    return factory


def _toy_factory(mode):
    def factory(*, num_classes=1000, rngs, **kw):
        return DemoNet2D(mode=mode, num_classes=num_classes, rngs=rngs, **kw)
    return factory


for _name, (_dim, _depths, _ratio) in STARNET_VARIANTS.items():
    zoo.register_model(_name, _starnet_factory(_dim, _depths, _ratio), key_map=convert.starnet_key_map,
                       example_input=zoo.IMAGE_224, pretrained=_RELEASE.format(_name) if _name in _RELEASED else None)

_demonet_shapes = {(12, w) for w in DEMONET_WIDTHS} | {(d, 192) for d in DEMONET_DEPTHS}
for _depth, _width in sorted(_demonet_shapes):
    for _mode in ("sum", "mul"):
        zoo.register_model(f"demonet_d{_depth}_w{_width}_{_mode}", _demonet_factory(_width, _depth, _mode),
                           key_map=convert.demonet_key_map, example_input=zoo.IMAGE_224)

for _mode in ("sum", "mul"):
    zoo.register_model(f"demonet_2d_{_mode}", _toy_factory(_mode),  # points [B, 2]
                       example_input=jax.ShapeDtypeStruct((2,), jnp.float32))
