"""Context Clusters ("Image as Set of Points", ICLR 2023 oral): every ImageNet variant and the
dense-prediction backbones of ma-xu/Context-Cluster ``models/context_cluster.py``, in NHWC.

Logits match the official code to float32 round-off (``tests/test_coc.py``). Importing this
module registers every variant in ``lib.zoo``.

Layout: RGB + two position channels (``lib.layers.cluster.coordinate_channels``) -> point reducer
(4x4 conv, stride 4) -> 4 stages of MetaFormer blocks (GroupNorm, ``Cluster`` token mixer, MLP,
layer scales), with a 3x3 stride-2 point reducer before stages 1-3 -> GroupNorm -> mean -> linear.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lib import zoo
from lib.layers.backbone import check_image_batch, run_stage
from lib.layers.cluster import Cluster, coordinate_channels
from lib.layers.conv import Conv
from lib.layers.drop import drop_path_rates
from lib.layers.head import ClassifierHead
from lib.layers.metaformer import MetaFormerBlock
from lib.layers.mlp import Mlp
from lib.layers.norm import GroupNorm
from projects.coc import convert


def _per_stage(v, n: int = 4) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


class PointReducer(nnx.Module):
    """Upstream ``PointRecuder``: one conv (no norm), child ``proj`` as in the checkpoints."""

    def __init__(self, in_dim: int, dim: int, kernel_size: int, stride: int, padding: int, *, dtype,
                 param_dtype, rngs: nnx.Rngs):
        self.proj = Conv(in_dim, dim, kernel_size, stride=stride, padding=padding, init="torch",
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


class ClusterStage(nnx.Module):
    """An optional 3x3 stride-2 point reducer, then ``depth`` context-cluster blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, *, downsample: bool, mlp_ratio: float,
                 drop_paths: Sequence[float], layer_scale_init: float, cluster_kw: dict, dtype,
                 param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.downsample = PointReducer(in_dim, dim, 3, 2, 1, **kw) if downsample else None
        self.blocks = nnx.List([
            MetaFormerBlock(dim, Cluster(dim, **cluster_kw, **kw), Mlp(dim, int(dim * mlp_ratio), **kw),
                            drop_path=drop_paths[j], layer_scale_init=layer_scale_init, **kw)
            for j in range(depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return x


class ContextCluster(nnx.Module):
    """Context Cluster (CoC) network.

    Args:
      depths, dims, heads, head_dim, proposal, fold, mlp_ratios: per stage (an int means the same
        for every stage); ``proposal`` / ``fold`` entries are ints or ``(rows, cols)``.
      fork_feat: the dense-prediction backbone of upstream: no ``norm``/``head``; ``__call__``
        returns the four stage outputs, each through its own GroupNorm (``norm0/2/4/6`` upstream,
        ``feature_norms`` here).
      normalize: ``"sim_sum"`` (current checkpoints) or ``"point_count"`` (checkpoints released
        before May 2023, see ``projects.coc.convert``).
      dtype: compute dtype; the clustering's similarity/assignment and all norms stay float32.
      remat: recompute each stage's activations in the backward pass instead of storing them.
    """

    torch_key_map = staticmethod(convert.coc_key_map)

    def __init__(self, depths: Sequence[int] = (3, 4, 5, 2), dims: Sequence[int] = (32, 64, 196, 320),
                 heads=(4, 4, 8, 8), head_dim=24, proposal=2, fold=(8, 4, 2, 1), mlp_ratios=(8, 8, 4, 4),
                 drop_path_rate: float = 0.0, layer_scale_init: float = 1e-5, num_classes: int = 1000,
                 fork_feat: bool = False, normalize: str = "sim_sum", *, dtype=None,
                 param_dtype=jnp.float32, remat: bool = False, rngs: nnx.Rngs):
        n = len(depths)
        heads, head_dim, proposal, fold, mlp_ratios = (
            _per_stage(v, n) for v in (heads, head_dim, proposal, fold, mlp_ratios))
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_classes = 0 if fork_feat else num_classes
        self.fork_feat, self.normalize, self.remat = fork_feat, normalize, remat
        self.feature_widths, self.num_features = tuple(dims), dims[-1]
        self.patch_embed = PointReducer(5, dims[0], 4, 4, 0, **kw)   # RGB + (row, col) -> C0, stride 4
        dpr = drop_path_rates(drop_path_rate, depths)
        stages, start = [], 0
        for i, depth in enumerate(depths):
            cluster_kw = dict(heads=heads[i], head_dim=head_dim[i], proposal=proposal[i], fold=fold[i],
                              normalize=normalize)
            stages.append(ClusterStage(dims[i - 1] if i else dims[0], dims[i], depth, downsample=i > 0,
                                       mlp_ratio=mlp_ratios[i], drop_paths=dpr[start:start + depth],
                                       layer_scale_init=layer_scale_init, cluster_kw=cluster_kw, **kw))
            start += depth
        self.stages = nnx.List(stages)
        if fork_feat:
            self.feature_norms = nnx.List([GroupNorm(d, dtype=dtype, param_dtype=param_dtype) for d in dims])
            self.norm = self.head = None
        else:
            self.feature_norms = None
            self.norm = GroupNorm(dims[-1], dtype=dtype, param_dtype=param_dtype)
            self.head = ClassifierHead(dims[-1], num_classes, **kw)

    def embed(self, x: jax.Array) -> jax.Array:
        """Append the position channels to the (normalised) RGB image and apply the stem."""
        check_image_batch(x)
        pos = coordinate_channels(x.shape[1], x.shape[2]).astype(x.dtype)
        pos = jnp.broadcast_to(pos[None], x.shape[:3] + (2,))
        return self.patch_embed(jnp.concatenate([x, pos], axis=-1))

    def forward_intermediates(self, x: jax.Array) -> list[jax.Array]:
        """Per-stage feature maps (strides 4, 8, 16, 32), before any output norm."""
        x = self.embed(x)
        features = []
        for stage in self.stages:
            x = run_stage(stage, x, self.remat)
            features.append(x)
        return features

    def forward_features(self, x: jax.Array) -> jax.Array:
        """The normalised last feature map, ``[B, H/32, W/32, num_features]``."""
        if self.fork_feat:
            raise ValueError("a fork_feat backbone has no final norm; call it for its four feature maps")
        return self.norm(self.forward_intermediates(x)[-1])

    def __call__(self, x: jax.Array):
        if self.fork_feat:
            return [norm(f) for norm, f in zip(self.feature_norms, self.forward_intermediates(x))]
        return self.head(self.forward_features(x))


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
_TINY = dict(depths=(3, 4, 5, 2), dims=(32, 64, 196, 320), heads=(4, 4, 8, 8), head_dim=24)
_SMALL = dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512), heads=(4, 4, 8, 8), head_dim=32)
_MEDIUM = dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512), heads=(6, 6, 12, 12), head_dim=32)
COC_VARIANTS = {
    "coc_tiny": dict(_TINY, proposal=2, fold=(8, 4, 2, 1)),
    "coc_tiny2": dict(_TINY, proposal=(4, 2, 7, 4), fold=(7, 7, 1, 1)),
    "coc_tiny_plain": dict(_TINY, proposal=(4, 4, 2, 2), fold=1),
    "coc_small": dict(_SMALL, proposal=2, fold=(8, 4, 2, 1)),
    "coc_medium": dict(_MEDIUM, proposal=2, fold=(8, 4, 2, 1)),
    "coc_base_dim64": dict(depths=(6, 6, 24, 6), dims=(64, 128, 320, 512), heads=(8, 8, 16, 16), head_dim=32,
                           proposal=2, fold=(8, 4, 2, 1)),
    "coc_base_dim96": dict(depths=(4, 4, 12, 4), dims=(96, 192, 384, 768), heads=(8, 8, 16, 16), head_dim=32,
                           proposal=2, fold=(8, 4, 2, 1)),
}
# Upstream ``context_cluster_{small,medium}_feat{2,5,7}`` (mmdet/mmseg backbones): 2/5/7 centers per side.
for _size, _base in (("small", _SMALL), ("medium", _MEDIUM)):
    for _p in (2, 5, 7):
        COC_VARIANTS[f"coc_{_size}_feat{_p}"] = dict(_base, proposal=_p, fold=(8, 4, 2, 1), fork_feat=True)


def _factory(spec):
    def factory(*, num_classes=1000, rngs, **kw):  # overrides may replace the variant's own settings
        return ContextCluster(**{**spec, **kw}, num_classes=num_classes, rngs=rngs)
    return factory


for _name, _spec in COC_VARIANTS.items():
    # The official weights are Google Drive folders (no direct URL): see the project README.
    zoo.register_model(_name, _factory(_spec), key_map=convert.coc_key_map, example_input=zoo.IMAGE_224)
