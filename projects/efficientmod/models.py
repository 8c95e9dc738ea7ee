"""EfficientMod ("Efficient Modulation for Vision Networks", ICLR 2024): xxs, xs, s and s_conv.

A faithful NHWC port of ``models/EfficientMod.py`` from ma-xu/EfficientMod; logits match the
official code to float32 round-off (``tests/test_efficientmod.py``). The network:

* ``patch_embed``: Conv k7 s4 p3 -> LayerNorm (stride 4);
* four stages (``layers.i``): EfficientMod blocks (``lib.layers.modulation``), then in stages 3
  and 4 of the hybrid variants global attention blocks (``lib.layers.attention``), then, for
  stages 1-3, a Conv k3 s2 p1 -> LayerNorm downsampler **at the end of the stage** (as upstream);
* ``norm`` (LayerNorm on the last map), global average pool, linear ``head``.

Importing this module registers every variant in ``lib.zoo``.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lib import zoo
from lib.layers.backbone import check_image_batch, run_stage
from lib.layers.attention import AttentionBlock
from lib.layers.drop import drop_path_rates
from lib.layers.head import ClassifierHead
from lib.layers.modulation import ModulationBlock
from lib.layers.norm import LayerNorm
from lib.layers.patch_embed import PatchEmbed
from projects.efficientmod import convert


class EfficientModStage(nnx.Module):
    """EfficientMod blocks, then ``attention_depth`` attention blocks, then an optional downsampler.

    Calling it returns ``(features, next_input)``: the stage's output before the downsampler (what
    the detection backbone hands to its neck) and the input of the next stage.
    """

    def __init__(self, dim: int, out_dim: int | None, mlp_ratios: Sequence[int], attention_depth: int,
                 att_ratio: float, drop_paths: Sequence[float], *, layer_scale_init: float, kernel_size: int,
                 init: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        depth = len(mlp_ratios)
        blocks = [ModulationBlock(dim, r, drop_paths[j], kernel_size=kernel_size, layer_scale_init=layer_scale_init,
                                  conv_init=init, **kw) for j, r in enumerate(mlp_ratios)]
        blocks += [AttentionBlock(dim, att_ratio, drop_path=drop_paths[depth + j], **kw)
                   for j in range(attention_depth)]
        self.blocks = nnx.List(blocks)
        self.downsample = (PatchEmbed(dim, out_dim, 3, stride=2, padding=1, init=init, **kw)
                           if out_dim is not None else None)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for block in self.blocks:
            x = block(x)
        return x, (self.downsample(x) if self.downsample is not None else x)


class EfficientMod(nnx.Module):
    """EfficientMod classifier; see the module docstring for the layout.

    Args:
      dims: stage widths.
      mlp_ratios: per stage, the mlp ratio of each EfficientMod block (their number is the depth).
      attention_depths, att_ratios: attention blocks appended to each stage and their MLP ratios.
      drop_path_rate: stochastic depth, ``linspace(0, rate, all blocks)`` in block order (attention
        blocks after the EfficientMod blocks of their stage), as upstream.
      layer_scale_init: initial value of every block's ``gamma_1`` (upstream 1e-4).
      init: conv init, ``"torch"`` (upstream: PyTorch's default) or ``"trunc_normal"``; linears are
        always trunc_normal(.02) with zero bias, as upstream.
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision); norms and softmax stay float32.
      remat: recompute each stage's activations in the backward pass (``nnx.remat``).
    """

    torch_key_map = staticmethod(convert.efficientmod_key_map)

    def __init__(self, dims: Sequence[int] = (32, 64, 128, 256),
                 mlp_ratios: Sequence[Sequence[int]] = ((1, 6), (1, 6), (1, 6, 1, 6, 1, 6), (1, 6)),
                 attention_depths: Sequence[int] = (0, 0, 1, 2), att_ratios: Sequence[float] = (4, 4, 4, 4),
                 drop_path_rate: float = 0.0, num_classes: int = 1000, *, layer_scale_init: float = 1e-4,
                 kernel_size: int = 7, init: str = "torch", dtype=None, param_dtype=jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        if not len(dims) == len(mlp_ratios) == len(attention_depths) == len(att_ratios):
            raise ValueError(f"dims, mlp_ratios, attention_depths and att_ratios need one entry per stage, got "
                             f"{len(dims)}, {len(mlp_ratios)}, {len(attention_depths)} and {len(att_ratios)}")
        depths = [len(r) for r in mlp_ratios]
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_classes, self.remat = num_classes, remat
        self.num_features = dims[-1]
        self.feature_widths = tuple(dims)
        self.patch_embed = PatchEmbed(3, dims[0], 7, stride=4, padding=3, init=init, **kw)
        dpr = drop_path_rates(drop_path_rate, [d + a for d, a in zip(depths, attention_depths)])
        stages, start = [], 0
        for i, dim in enumerate(dims):
            n = depths[i] + attention_depths[i]
            out_dim = dims[i + 1] if i + 1 < len(dims) else None
            stages.append(EfficientModStage(dim, out_dim, mlp_ratios[i], attention_depths[i], att_ratios[i],
                                            dpr[start:start + n], layer_scale_init=layer_scale_init,
                                            kernel_size=kernel_size, init=init, **kw))
            start += n
        self.layers = nnx.List(stages)
        self.norm = LayerNorm(dims[-1], dtype=dtype, param_dtype=param_dtype)
        self.head = ClassifierHead(dims[-1], num_classes, **kw)

    def forward_intermediates(self, x: jax.Array) -> list[jax.Array]:
        """Per-stage feature maps (strides 4, 8, 16, 32; widths ``feature_widths``), each taken
        before the stage's downsampler, as upstream's detection/segmentation backbone does."""
        check_image_batch(x)
        x = self.patch_embed(x)
        features = []
        for stage in self.layers:
            feature, x = run_stage(stage, x, self.remat)
            features.append(feature)
        return features

    def forward_features(self, x: jax.Array) -> jax.Array:
        """The normalised last feature map, ``[B, H/32, W/32, num_features]``."""
        return self.norm(self.forward_intermediates(x)[-1])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.forward_features(x))


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
def _alternating(ratio: int, depth: int) -> tuple[int, ...]:
    """Upstream's per-block ratio lists ``[1, r, 1, r, ...]``, cut to the stage depth."""
    return tuple(1 if j % 2 == 0 else ratio for j in range(depth))


# name: (dims, depths, mlp ratio r of the [1, r, ...] blocks, attention depths, att_ratios, drop path
# rate). The drop path rates are the ones upstream's factories hard-code; att_ratios of stages
# without attention blocks are unused.
EFFICIENTMOD_VARIANTS = {
    "efficientmod_xxs": ((32, 64, 128, 256), (2, 2, 6, 2), 6, (0, 0, 1, 2), (4, 4, 4, 4), 0.0),
    "efficientmod_xs": ((32, 64, 144, 288), (3, 3, 4, 2), 4, (0, 0, 3, 3), (4, 4, 4, 4), 0.0),
    "efficientmod_s": ((32, 64, 144, 312), (4, 4, 8, 4), 6, (0, 0, 4, 4), (4, 4, 4, 5), 0.02),
    "efficientmod_s_conv": ((40, 80, 160, 344), (4, 4, 12, 8), 6, (0, 0, 0, 0), (4, 4, 4, 4), 0.02),
}
# Distilled checkpoints and logs (Google Drive folders; no direct file links): official README.
_DRIVE = {
    "efficientmod_xxs": "https://drive.google.com/drive/folders/1c0dlnN7w1bHlAsKcJFhGVA2mIhoA6ZHz",
    "efficientmod_xs": "https://drive.google.com/drive/folders/1PPQFO891WfJRUiH58NlWOgHDEzDnwC0_",
    "efficientmod_s": "https://drive.google.com/drive/folders/1rJs8LcWmdTFmj-IJ0cmlVp_MxGfZFsFk",
    "efficientmod_s_conv": "https://drive.google.com/drive/folders/1EY637XRiDPL4AwrVGESJWsK-ZP2GhnaI",
}


def variant_kwargs(name: str) -> dict:
    """The constructor arguments of a registered variant (for building variations of it)."""
    dims, depths, ratio, attention, att_ratios, drop_path = EFFICIENTMOD_VARIANTS[name]
    return dict(dims=dims, mlp_ratios=tuple(_alternating(ratio, d) for d in depths), attention_depths=attention,
                att_ratios=att_ratios, drop_path_rate=drop_path)


def _factory(name):
    def factory(*, num_classes=1000, rngs, **overrides):
        return EfficientMod(**{**variant_kwargs(name), **overrides}, num_classes=num_classes, rngs=rngs)
    return factory


for _name in EFFICIENTMOD_VARIANTS:
    zoo.register_model(_name, _factory(_name), key_map=convert.efficientmod_key_map, example_input=zoo.IMAGE_224,
                       pretrained=_DRIVE[_name])
