"""DINOv2-style vision transformers (facebookresearch/dinov2 ``DinoVisionTransformer``), NHWC.

    from lib import zoo
    model = zoo.create_model("dinov2_vits14")                       # hub settings: img 518, LayerScale 1.0
    zoo.load_torch_weights(model, "dinov2_vits14_pretrain.pth")     # official checkpoint, no torch
    out = model.forward_features(x)                                 # x: float32 NHWC [B, H, W, 3]
    out["x_norm_clstoken"], out["x_norm_patchtokens"]               # [B, D], [B, H/14 * W/14, D]
    feats = model.get_intermediate_layers(x, n=4, return_class_token=True)
    model(x)                                                        # = x_norm_clstoken (head is Identity)

Overrides are DINOv2's own constructor arguments (``img_size``, ``patch_size``, ``embed_dim``,
``depth``, ``num_heads``, ``mlp_ratio``, ``qkv_bias``, ``proj_bias``, ``ffn_bias``,
``drop_path_rate``, ``drop_path_uniform``, ``init_values``, ``ffn_layer`` in {"mlp", "swiglu",
"swiglufused", "identity"}, ``block_chunks`` (accepted; the blocks are never chunked here, chunked
checkpoints load all the same), ``num_register_tokens``, ``interpolate_antialias``,
``interpolate_offset``), plus ``dtype`` / ``param_dtype`` and ``remat`` (recompute each block in
the backward pass).

What the official model does and this one reproduces (``tests/test_dinov2.py``, golden
``dinov2_tiny``): LayerNorm eps 1e-6, exact-erf GELU, LayerScale ``gamma`` on both branches,
``masks`` (bool [B, N], True = masked) replacing patch embeddings by ``mask_token`` before the CLS
token and the position embedding; registers inserted after CLS *after* the position embedding;
the position embedding interpolated as ``interpolate_pos_encoding`` does: PyTorch's bicubic
(align_corners=False) through ``scale_factor = (grid + interpolate_offset) / M`` (Keys a=-0.75,
border indices clamped) or, with ``interpolate_offset=0``, through ``size`` (with
``interpolate_antialias``: PyTorch's antialiased separable filter, a=-0.5, widened when
downsampling and normalised per output pixel). ``jax.image.resize``'s cubic is Keys a=-0.5 with
renormalised borders and a size-derived scale: it matches neither, so the resampling matrices are
built here in numpy (float64) and applied as two small matmuls.

Differences: an image whose size is not a multiple of the patch size is an error (upstream's conv
silently drops the remainder); ``get_intermediate_layers(reshape=True)`` gives NHWC maps.
"""
from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import sharding, zoo
from lib.layers.backbone import check_image_batch, run_stage
from lib.layers.conv import Conv
from lib.layers.drop import DropPath
from lib.layers.linear import Linear
from lib.layers.norm import LayerNorm
from lib.layers.star import gelu

LN_EPS = 1e-6
FFN_LAYERS = ("mlp", "swiglu", "swiglufused", "identity")


# ------------------------------------------------------------------------------------------------
# position-embedding resampling (PyTorch's bicubic, as matrices)
# ------------------------------------------------------------------------------------------------
def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None = None,
                   antialias: bool = False) -> np.ndarray:
    """``[out_size, in_size]`` float64 weights of ``F.interpolate(mode="bicubic", align_corners=False)``
    along one axis; ``scale_factor`` as passed to ``interpolate`` (the kernel then samples at
    ``(i + 0.5) / scale_factor - 0.5``), else the size-derived ``in/out``."""
    if out_size == in_size:   # PyTorch copies an axis whose size does not change
        return np.eye(in_size)
    scale = 1.0 / scale_factor if scale_factor else in_size / out_size     # input pixels per output pixel
    w = np.zeros((out_size, in_size))
    if not antialias:   # upsample_bicubic2d: Keys a=-0.75 at 4 taps, indices clamped to the border
        for i in range(out_size):
            src = scale * (i + 0.5) - 0.5
            base = math.floor(src)
            t = src - base
            taps = _keys_cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
            for k, tap in enumerate(taps):
                w[i, min(max(base - 1 + k, 0), in_size - 1)] += tap
        return w
    # _upsample_bicubic2d_aa: a=-0.5, support widened by the scale when downsampling, normalised
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        js = np.arange(xmin, xmax)
        taps = _keys_cubic((js - center + 0.5) * invscale, -0.5)
        total = taps.sum()
        w[i, xmin:xmax] = taps / total if total != 0 else taps
    return w


def interpolate_pos_embed(pos_embed: jax.Array, grid: tuple[int, int], *, offset: float = 0.1,
                          antialias: bool = False) -> jax.Array:
    """DINOv2's ``interpolate_pos_encoding`` for a ``grid = (h0, w0)`` of patches: ``pos_embed``
    ``[1, 1 + M*M, D]`` -> ``[1, 1 + h0*w0, D]`` in float32 (the CLS entry untouched)."""
    n = pos_embed.shape[1] - 1
    m = int(math.isqrt(n))
    if m * m != n:
        raise ValueError(f"pos_embed has {n} patch entries, not a square grid")
    h0, w0 = grid
    if offset:
        wh = bicubic_matrix(m, int(math.floor(m * ((h0 + offset) / m))), (h0 + offset) / m, antialias)
        ww = bicubic_matrix(m, int(math.floor(m * ((w0 + offset) / m))), (w0 + offset) / m, antialias)
    else:
        wh, ww = bicubic_matrix(m, h0, None, antialias), bicubic_matrix(m, w0, None, antialias)
    if (wh.shape[0], ww.shape[0]) != (h0, w0):
        raise ValueError(f"interpolating the {m}x{m} position grid gave {wh.shape[0]}x{ww.shape[0]}, not {h0}x{w0}")
    pe = pos_embed.astype(jnp.float32)
    patches = pe[0, 1:].reshape(m, m, -1)
    hi = jax.lax.Precision.HIGHEST
    patches = jnp.einsum("ai,ijd->ajd", jnp.asarray(wh, jnp.float32), patches, precision=hi)
    patches = jnp.einsum("bj,ajd->abd", jnp.asarray(ww, jnp.float32), patches, precision=hi)
    return jnp.concatenate([pe[:, :1], patches.reshape(1, h0 * w0, -1)], axis=1)


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------
class LayerScale(nnx.Module):
    """``x * gamma`` per channel (DINOv2's ``LayerScale``, parameter ``gamma``)."""

    def __init__(self, dim: int, init_values: float, *, param_dtype=jnp.float32):
        self.gamma = sharding.param(jnp.full((dim,), init_values, param_dtype), ("channels",))

    def __call__(self, x):
        return x * self.gamma[...].astype(x.dtype)


class Attention(nnx.Module):
    """qkv -> softmax(q k^T / sqrt(hd)) v -> proj, head width ``dim // num_heads`` (softmax in float32).

    Logical axes: ``qkv`` kernel ``(in_channels, heads)``, ``proj`` kernel ``(heads, out_channels)``,
    so tensor parallelism maps ``heads`` to the model axis (Megatron's split)."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, proj_bias: bool = True,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} does not divide into num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Linear(dim, 3 * dim, use_bias=qkv_bias, out_axis="heads", **kw)
        self.proj = Linear(dim, dim, use_bias=proj_bias, in_axis="heads", **kw)
        # Set by model.eval() / model.train() (nnx's ``deterministic``; there is no dropout here): it
        # picks the layout of the two attention matmuls, not the result (equal to float32 round-off). Forward
        # only, heads-major [B, H, N, hd] runs faster on XLA:CPU (ViT-S, 32 x 257 tokens: 26 vs 37 ms a
        # layer; PyTorch's SDPA 29); under a backward pass the token-major view does (the train step
        # 4.0 vs 3.8 img/s with heads-major).
        self.deterministic = False

    def __call__(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        if self.deterministic:   # q, k, v as [B, H, N, hd]
            q, k, v = qkv.transpose(2, 0, 3, 1, 4)
            layout = "bh{}d"
        else:                    # q, k, v as [B, N, H, hd]
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            layout = "b{}hd"
        qs, ks = layout.format("q"), layout.format("k")
        logits = jnp.einsum(f"{qs},{ks}->bhqk", q * self.head_dim ** -0.5, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum(f"bhqk,{ks}->{qs}", weights, v)
        if self.deterministic:   # back to token-major for the projection
            out = out.transpose(0, 2, 1, 3)
        return self.proj(out.reshape(b, n, -1))


class Mlp(nnx.Module):
    """``fc1 -> exact GELU -> fc2``; hidden axis ``mlp``."""

    def __init__(self, dim: int, hidden: int, *, bias: bool = True, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(dim, hidden, use_bias=bias, out_axis="mlp", **kw)
        self.fc2 = Linear(hidden, dim, use_bias=bias, in_axis="mlp", **kw)

    def __call__(self, x):
        return self.fc2(gelu(self.fc1(x)))


class SwiGLUFFN(nnx.Module):
    """DINOv2's ``SwiGLUFFNFused`` (ViT-g): hidden ``(int(h * 2/3) + 7) // 8 * 8``;
    ``w12`` -> ``silu(x1) * x2`` -> ``w3``."""

    def __init__(self, dim: int, hidden: int, *, bias: bool = True, fused_width: bool = True, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if fused_width:
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.w12 = Linear(dim, 2 * hidden, use_bias=bias, out_axis="mlp", **kw)
        self.w3 = Linear(hidden, dim, use_bias=bias, in_axis="mlp", **kw)

    def __call__(self, x):
        x1, x2 = jnp.split(self.w12(x), 2, axis=-1)
        return self.w3(jax.nn.silu(x1) * x2)


class Block(nnx.Module):
    """``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))`` with DropPath on both branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, qkv_bias: bool, proj_bias: bool,
                 ffn_bias: bool, ffn_layer: str, init_values: float | None, drop_path: float, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = LayerNorm(dim, epsilon=LN_EPS, **kw)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, rngs=rngs, **kw)
        self.ls1 = LayerScale(dim, init_values, param_dtype=param_dtype) if init_values else None
        self.norm2 = LayerNorm(dim, epsilon=LN_EPS, **kw)
        hidden = int(dim * mlp_ratio)
        if ffn_layer == "mlp":
            self.mlp = Mlp(dim, hidden, bias=ffn_bias, rngs=rngs, **kw)
        elif ffn_layer in ("swiglu", "swiglufused"):   # upstream maps both names to SwiGLUFFNFused
            self.mlp = SwiGLUFFN(dim, hidden, bias=ffn_bias, rngs=rngs, **kw)
        else:
            self.mlp = None
        self.ls2 = LayerScale(dim, init_values, param_dtype=param_dtype) if init_values else None
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x):
        y = self.attn(self.norm1(x))
        x = x + self.drop_path(self.ls1(y) if self.ls1 is not None else y)
        y = self.mlp(self.norm2(x)) if self.mlp is not None else self.norm2(x)
        return x + self.drop_path(self.ls2(y) if self.ls2 is not None else y)


class PatchEmbed(nnx.Module):
    """Non-overlapping patches: ``proj`` = Conv2d(in, dim, patch, stride=patch) (PyTorch's default init)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.proj = Conv(in_chans, embed_dim, patch_size, stride=patch_size, padding=0, init="torch", dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.proj(x)


def _normal(key, shape, std, dtype):
    return std * jax.random.normal(key, shape, dtype)


def _trunc_normal(key, shape, std, dtype):
    return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)


class DinoVisionTransformer(nnx.Module):
    """The DINOv2 ViT on NHWC images; see the module docstring for the arguments."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 ffn_bias: bool = True, proj_bias: bool = True, drop_path_rate: float = 0.0,
                 drop_path_uniform: bool = False, init_values: float | None = None, ffn_layer: str = "mlp",
                 block_chunks: int = 1, num_register_tokens: int = 0, interpolate_antialias: bool = False,
                 interpolate_offset: float = 0.1, *, num_classes: int = 0, dtype=None, param_dtype=jnp.float32,
                 remat: bool = False, rngs: nnx.Rngs):
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"ffn_layer must be one of {FFN_LAYERS}, got {ffn_layer!r}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        if isinstance(img_size, (tuple, list)):
            img_size = img_size[0]
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.img_size, self.patch_size, self.in_chans = int(img_size), int(patch_size), in_chans
        self.embed_dim = self.num_features = embed_dim
        self.n_blocks, self.num_heads = depth, num_heads
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias, self.interpolate_offset = bool(interpolate_antialias), float(interpolate_offset)
        self.block_chunks, self.remat, self.dtype = block_chunks, remat, dtype
        # Optional sharding of the [B, T, D] token activations (e.g. NamedSharding(mesh, P("data"))),
        # constrained after the embedding and every block: under FSDP (kernels split over "data"),
        # propagation alone may shard activations by features and gather the batch.
        self.token_sharding = None
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cls_token = sharding.param(_normal(rngs.params(), (1, 1, embed_dim), 1e-6, param_dtype),
                                        (None, None, "channels"))
        self.pos_embed = sharding.param(_trunc_normal(rngs.params(), (1, grid * grid + 1, embed_dim), 0.02,
                                                      param_dtype), (None, None, "channels"))
        self.register_tokens = (sharding.param(_normal(rngs.params(), (1, num_register_tokens, embed_dim), 1e-6,
                                                       param_dtype), (None, None, "channels"))
                                if num_register_tokens else None)
        self.mask_token = sharding.param(jnp.zeros((1, embed_dim), param_dtype), (None, "channels"))
        dpr = ([drop_path_rate] * depth if drop_path_uniform
               else [float(r) for r in np.linspace(0, drop_path_rate, depth)])
        self.blocks = nnx.List([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias, ffn_bias=ffn_bias,
                  ffn_layer=ffn_layer, init_values=init_values, drop_path=dpr[i], dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs) for i in range(depth)])
        self.norm = LayerNorm(embed_dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype)
        # DINOv2's head is Identity; num_classes > 0 adds a linear classifier on the class token
        # (supervised fine-tuning, or a small teacher trained here)
        self.num_classes = num_classes
        self.head = (Linear(embed_dim, num_classes, out_axis="classes", dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs) if num_classes else None)

    # --- tokens ---------------------------------------------------------------------------------
    def _grid(self, x) -> tuple[int, int]:
        check_image_batch(x, self.in_chans)
        _, h, w, _ = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def interpolate_pos_encoding(self, grid: tuple[int, int], height: int, width: int) -> jax.Array:
        n = self.pos_embed.shape[1] - 1
        if grid[0] * grid[1] == n and height == width:
            return self.pos_embed[...]
        return interpolate_pos_embed(self.pos_embed[...], grid, offset=self.interpolate_offset,
                                     antialias=self.interpolate_antialias)

    def prepare_tokens_with_masks(self, x, masks=None):
        grid = self._grid(x)
        b = x.shape[0]
        if masks is not None and tuple(masks.shape) != (b, grid[0] * grid[1]):
            raise ValueError(f"masks must be bool [batch, patches] = {(b, grid[0] * grid[1])}, got {tuple(masks.shape)}")
        t = self.patch_embed(x)
        dtype = t.dtype
        t = t.reshape(b, grid[0] * grid[1], self.embed_dim)
        if masks is not None:
            masks = jnp.asarray(masks)
            t = jnp.where(masks[..., None].astype(bool), self.mask_token[...].astype(dtype)[None], t)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (b, 1, self.embed_dim))
        t = jnp.concatenate([cls, t], axis=1)
        t = (t + self.interpolate_pos_encoding(grid, x.shape[1], x.shape[2]).astype(dtype)).astype(dtype)
        if self.register_tokens is not None:
            reg = jnp.broadcast_to(self.register_tokens[...].astype(dtype), (b, self.num_register_tokens, self.embed_dim))
            t = jnp.concatenate([t[:, :1], reg, t[:, 1:]], axis=1)
        return t

    def _constrain(self, t):
        return t if self.token_sharding is None else jax.lax.with_sharding_constraint(t, self.token_sharding)

    def _run_blocks(self, t, take: Sequence[int] = ()):
        outs = []
        t = self._constrain(t)
        for i, blk in enumerate(self.blocks):
            t = self._constrain(run_stage(blk, t, self.remat))
            if i in take:
                outs.append(t)
        return t, outs

    def _split(self, x_norm, x_prenorm, masks):
        r = self.num_register_tokens
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_regtokens": x_norm[:, 1:r + 1],
                "x_norm_patchtokens": x_norm[:, r + 1:], "x_prenorm": x_prenorm, "masks": masks}

    def forward_features(self, x, masks=None):
        """DINOv2's dict: ``x_norm_clstoken`` [B, D], ``x_norm_regtokens`` [B, R, D],
        ``x_norm_patchtokens`` [B, N, D], ``x_prenorm`` [B, 1 + R + N, D], ``masks``. A list of
        image batches (with a list of masks) gives a list of dicts, as upstream."""
        if isinstance(x, (list, tuple)):
            masks = [None] * len(x) if masks is None else masks
            return [self.forward_features(xi, mi) for xi, mi in zip(x, masks)]
        t, _ = self._run_blocks(self.prepare_tokens_with_masks(x, masks))
        return self._split(self.norm(t), t, masks)

    def get_intermediate_layers(self, x, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True):
        """Outputs of the last ``n`` blocks (or of the blocks listed in ``n``), optionally normed;
        patch tokens [B, N, D] (``reshape``: NHWC maps [B, h, w, D]), with the class tokens when
        ``return_class_token`` (a tuple of (patches, cls) pairs), as DINOv2."""
        total = len(self.blocks)
        take = list(range(total - n, total)) if isinstance(n, int) else list(n)
        if any(not 0 <= i < total for i in take):
            raise ValueError(f"blocks {take} out of range for a model of {total} blocks")
        grid = self._grid(x)
        _, outs = self._run_blocks(self.prepare_tokens_with_masks(x), take)
        if norm:
            outs = [self.norm(o) for o in outs]
        cls = [o[:, 0] for o in outs]
        patches = [o[:, 1 + self.num_register_tokens:] for o in outs]
        if reshape:
            patches = [p.reshape(p.shape[0], grid[0], grid[1], -1) for p in patches]
        return tuple(zip(patches, cls)) if return_class_token else tuple(patches)

    def __call__(self, x, masks=None):
        """``head(forward_features(x)["x_norm_clstoken"])``: the class token itself (DINOv2's ``head``
        is Identity), or logits with ``num_classes``."""
        cls = self.forward_features(x, masks)["x_norm_clstoken"]
        return self.head(cls) if self.head is not None else cls

    # --- official checkpoints ---------------------------------------------------------------------
    def adapt_torch_state_dict(self, state_dict, *, strict: bool = True):
        """Called by ``zoo.load_torch_weights`` first: timm's layout of the DINOv2 weights (the
        ``hf-hub:timm/vit_*_patch14_[reg4_]dinov2.lvd142m`` checkpoints) becomes the official one, and
        with ``strict`` a checkpoint of another size is one clear error before any tensor is written."""
        state_dict = from_timm_state_dict(state_dict, swiglu=isinstance(self.blocks[0].mlp, SwiGLUFFN))
        if strict:
            self.check_torch_state_dict(state_dict)
        return state_dict

    def check_torch_state_dict(self, state_dict) -> None:
        """A checkpoint of another ViT size (width, depth, patch, registers, FFN) is one clear error."""
        def shape(k):
            return tuple(state_dict[k].shape) if k in state_dict else None
        depth = len({m.group(1) for k in state_dict for m in [re.match(r"^blocks\.(?:\d+\.)?(\d+)\.norm1\.", k)] if m})
        pe, proj = shape("patch_embed.proj.weight"), shape("pos_embed")
        if pe is None or proj is None:
            return   # not a DINOv2 layout at all: the generic report says what is missing
        theirs = dict(embed_dim=pe[0], patch_size=pe[-1], depth=depth, pos_embed=proj,
                      registers=(shape("register_tokens") or (0, 0))[1],
                      ffn="swiglu" if any(".mlp.w12." in k for k in state_dict) else "mlp")
        ours = dict(embed_dim=self.embed_dim, patch_size=self.patch_size, depth=len(self.blocks),
                    pos_embed=tuple(self.pos_embed.shape), registers=self.num_register_tokens,
                    ffn="swiglu" if isinstance(self.blocks[0].mlp, SwiGLUFFN) else "mlp")
        diff = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
        if diff:
            from lib.convert.torch_to_nnx import WeightConversionError
            raise WeightConversionError(
                "the checkpoint is another DINOv2 size: " + ", ".join(f"{k} {a} in the checkpoint vs {b} in the model"
                                                                       for k, (a, b) in diff.items())
                + " (pick the zoo entry of the checkpoint's size, or pass its img_size / num_register_tokens)")

    @staticmethod
    def torch_key_map(prefix: str) -> str | None:
        """Official keys are our module paths; chunked checkpoints (``blocks.<chunk>.<i>.``) drop the chunk."""
        return re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", prefix + ".")[:-1]


def from_timm_state_dict(state_dict, *, swiglu: bool = False) -> dict:
    """Undo timm's ``_convert_dinov2``: ``reg_token`` -> ``register_tokens`` with the CLS position
    folded back out (timm stores ``cls_token + pos_embed[:, 0]`` and a position embedding without the
    CLS entry: here the CLS entry is 0 and ``cls_token`` keeps the sum, the same tokens), the dropped
    ``mask_token`` restored as zeros, and SwiGLU's ``mlp.fc1`` / ``mlp.fc2`` named ``w12`` / ``w3``.
    An official state_dict passes through unchanged."""
    sd = dict(state_dict)
    if "reg_token" in sd:
        sd["register_tokens"] = sd.pop("reg_token")
        pe = np.asarray(sd["pos_embed"])
        sd["pos_embed"] = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
    if "cls_token" in sd and "mask_token" not in sd:
        sd["mask_token"] = np.zeros((1, np.shape(sd["cls_token"])[-1]), np.asarray(sd["cls_token"]).dtype)
    if swiglu:
        sd = {re.sub(r"^(blocks\.\d+\.mlp\.)fc1\.", r"\1w12.", re.sub(r"^(blocks\.\d+\.mlp\.)fc2\.", r"\1w3.", k)): v
              for k, v in sd.items()}
    return sd


def official_state_dict(model: DinoVisionTransformer) -> dict[str, np.ndarray]:
    """The backbone's weights under the official key names and layouts (the inverse of loading):
    ``{"cls_token", "pos_embed", ["register_tokens"], "mask_token", "patch_embed.proj.weight", ...}``,
    float32 numpy, conv ``[O, I, kh, kw]``, linear ``[out, in]``. Save with safetensors."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(getattr(p, "key", p)) for p in path]
        leaf, value = names[-1], np.asarray(jax.device_get(var.get_value()), np.float32)
        if leaf == "kernel":
            leaf, value = "weight", (value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T)
        elif leaf == "scale":
            leaf = "weight"
        out[".".join(names[:-1] + [leaf])] = value
    return {k: out[k] for k in sorted(out, key=_official_order)}


_TOP = ["cls_token", "pos_embed", "register_tokens", "mask_token", "patch_embed", "blocks", "norm", "head"]
_IN_BLOCK = ["norm1", "attn.qkv", "attn.proj", "ls1", "norm2", "mlp.fc1", "mlp.fc2", "mlp.w12", "mlp.w3", "ls2"]


def _official_order(key: str):
    """``state_dict()`` order of the official model (module registration order, weight before bias)."""
    top = key.split(".")[0]
    leaf = 0 if key.endswith((".weight", ".gamma")) else 1
    if top == "blocks":
        _, i, rest = key.split(".", 2)
        sub = next(j for j, name in enumerate(_IN_BLOCK) if rest.startswith(name + "."))
        return (_TOP.index(top), int(i), sub, leaf)
    return (_TOP.index(top), 0, 0, leaf)


# ------------------------------------------------------------------------------------------------
# the zoo
# ------------------------------------------------------------------------------------------------
ARCHS = {   # DINOv2's vit_small / vit_base / vit_large / vit_giant2
    "s": dict(embed_dim=384, depth=12, num_heads=6),
    "b": dict(embed_dim=768, depth=12, num_heads=12),
    "l": dict(embed_dim=1024, depth=24, num_heads=16),
    "g": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"),
}
# dinov2/hub/backbones.py: img 518, patch 14, LayerScale 1.0, no chunks; the *_reg models add 4
# registers with antialiased, offset-free interpolation.
HUB = dict(img_size=518, patch_size=14, mlp_ratio=4, init_values=1.0, ffn_layer="mlp", block_chunks=0,
           num_register_tokens=0, interpolate_antialias=False, interpolate_offset=0.1)
REG = dict(num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
# the golden dinov2_tiny configuration (the test size)
TINY = dict(HUB, img_size=56, embed_dim=64, depth=2, num_heads=2)


def _factory(defaults: dict):
    def factory(*, rngs, **overrides):
        return DinoVisionTransformer(**{**defaults, **overrides}, rngs=rngs)
    return factory


def _register():
    url = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{a}14/dinov2_vit{a}14{r}_pretrain.pth"
    for a, arch in ARCHS.items():
        zoo.register_model(f"dinov2_vit{a}14", _factory({**HUB, **arch}), pretrained=url.format(a=a, r=""))
        zoo.register_model(f"dinov2_vit{a}14_reg", _factory({**HUB, **arch, **REG}),
                           pretrained=url.format(a=a, r="_reg4"))
    # ViT-Ti/14 (Proteus' smallest student; DINOv2 released none): DeiT-Ti widths, the hub settings
    zoo.register_model("dinov2_vitti14", _factory({**HUB, "embed_dim": 192, "depth": 12, "num_heads": 3}))
    zoo.register_model("dinov2_tiny", _factory(TINY), example_input=jax.ShapeDtypeStruct((56, 56, 3), jnp.float32))


_register()
