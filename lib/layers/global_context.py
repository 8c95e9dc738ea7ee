"""FCViT's token mixer (global context + large depthwise convs) and its channel mixer.

From "A Close Look at Spatial Modeling: From Attention to Convolution" (ma-xu/FCViT,
``models/fcvit.py``), in the one configuration every released model uses (weighted global
context, "compete" bottleneck, 8 heads, two 11x11 mixing steps, no spatial/channel attention).
Both mixers plug into :class:`lib.layers.metaformer.MetaFormerBlock`. Child names follow the
PyTorch checkpoints (``gc1``, ``dw1``, ``fc1``, ...; the torch ``nn.Sequential`` ``fc1.0``/``fc1.2``
become ``fc1.fc1``/``fc1.fc2``). NHWC throughout; 1x1 convs are stored as linears ``[in, out]``.

``init``: ``"fcvit"`` reproduces upstream training from scratch: every conv (1x1 ones included)
``normal(0, sqrt(2 / fan_out))`` with zero bias, the global context's linears trunc_normal(.02);
``"torch"`` / ``"trunc_normal"`` are the library's usual schemes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lib import sharding
from lib.layers import initializers
from lib.layers.conv import Conv, depthwise_conv
from lib.layers.linear import Linear
from lib.layers.mlp import Mlp
from lib.layers.star import gelu

INIT_SCHEMES = ("fcvit", "torch", "trunc_normal")


def check_init(init: str) -> None:
    if init not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {init!r}; expected one of {INIT_SCHEMES}")


def base_init(init: str) -> str:
    """The scheme a Conv/Linear is built with; "fcvit" layers are redrawn by :func:`fan_out_init`."""
    return "torch" if init == "fcvit" else init


def fan_out_init(layer: Conv | Linear, init: str, rngs: nnx.Rngs):
    """With ``init="fcvit"``, redraw a conv's kernel as FCViT's ``_init_weights`` does:
    normal(0, sqrt(2 / fan_out)), fan_out = kh * kw * out / groups; bias 0.

    (Redrawing after construction keeps ``Conv``/``Linear``, whose schemes know only fan_in, as
    they are; the discarded first draw costs nothing that matters.)"""
    if init != "fcvit":
        return layer
    shape = layer.kernel.shape
    kh, kw, out = (shape[0], shape[1], shape[3]) if len(shape) == 4 else (1, 1, shape[1])
    groups = getattr(layer, "groups", 1)
    layer.kernel[...] = initializers.fan_out_normal(kh * kw * out // groups)(rngs.params(), shape, layer.kernel.dtype)
    if layer.bias is not None:
        layer.bias[...] = jnp.zeros_like(layer.bias[...])
    return layer


class GlobalContext(nnx.Module):
    """FCViT's weighted global context ``GC(x)``, ``[B, H, W, C] -> [B, H, W, C]``.

    1. ``gap = mean_HW(x)``; heads split the channels head-major (channel ``h * C/heads + d``).
    2. Per head, the similarity of every pixel to the pooled context:
       ``s[h, p] = <x_h(p), gap_h> / sqrt(C / heads)``.
    3. ``s`` is standardised per sample over (heads, pixels) with the **unbiased** std
       (``torch.std``), ``(s - mean) / (std + 1e-5)``, then rescaled per head
       (``rescale_weight``, ``rescale_bias``).
    4. The "compete" bottleneck turns ``gap`` into a per-channel context:
       ``gc = fc2(max(fc1(gap).reshape(2, C/r)))``, a maxout over the two halves of fc1's output.
    5. Output ``s[h, p] * gc[channels of head h]``.

    The similarity statistics are computed in float32 whatever the compute dtype.
    """

    def __init__(self, dim: int, *, heads: int = 8, reduction: int = 8, epsilon: float = 1e-5,
                 init: str = "fcvit", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_init(init)
        if dim % heads or dim % reduction:
            raise ValueError(f"GlobalContext: dim {dim} must divide by heads ({heads}) and reduction ({reduction})")
        self.dim, self.heads, self.epsilon, self.dtype = dim, heads, epsilon, dtype
        kw = dict(init="trunc_normal" if init == "fcvit" else init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(dim, 2 * dim // reduction, **kw)   # two competing groups of dim/r
        self.fc2 = Linear(dim // reduction, dim, **kw)
        self.rescale_weight = sharding.param(jnp.ones((heads,), param_dtype), (None,))
        self.rescale_bias = sharding.param(jnp.zeros((heads,), param_dtype), (None,))

    def context(self, gap: jax.Array) -> jax.Array:
        """The compete bottleneck: ``[B, C] -> [B, C]``. fc1's output is read as ``[2, C/r]``
        (torch ``reshape([b, 2, -1])``): the maxout pairs channel ``i`` with ``i + C/r``."""
        y = self.fc1(gap)
        y = jnp.max(y.reshape(y.shape[0], 2, -1), axis=1)
        return self.fc2(y)

    def similarity(self, x: jax.Array) -> jax.Array:
        """Steps 1-3: the standardised, rescaled per-head similarity ``[B, H, W, heads]`` (float32)
        of every pixel to the pooled context (the maps the paper visualises)."""
        if x.ndim != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"GlobalContext expects NHWC input [batch, height, width, {self.dim}], "
                             f"got shape {tuple(x.shape)}")
        b, h, w, c = x.shape
        x32 = x.astype(jnp.float32)
        head_dim = c // self.heads
        gap = jnp.mean(x32, axis=(1, 2)).reshape(b, self.heads, head_dim)
        sim = jnp.einsum("bxyhd,bhd->bxyh", x32.reshape(b, h, w, self.heads, head_dim), gap) * head_dim ** -0.5
        mean = jnp.mean(sim, axis=(1, 2, 3), keepdims=True)
        std = jnp.std(sim, axis=(1, 2, 3), keepdims=True, ddof=1)          # unbiased, as torch.std
        sim = (sim - mean) / (std + self.epsilon)
        return sim * self.rescale_weight[...].astype(jnp.float32) + self.rescale_bias[...].astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        sim = self.similarity(x)                                           # [B, H, W, heads]
        b, h, w, c = x.shape
        dtype = self.dtype or x.dtype
        gap = jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(dtype)
        gc = self.context(gap).reshape(b, 1, 1, self.heads, c // self.heads)
        out = sim.astype(dtype)[..., None] * gc                            # [B, H, W, heads, head_dim]
        return out.reshape(b, h, w, c)


class GlobalContextMixer(nnx.Module):
    """FCViT's ``TokenMixer``: two rounds of "add global context, then mix locally"::

        x = x + gc1(x);  x = GELU(fc1(dw1(x)))
        x = x + gc2(x);  x = GELU(fc2(dw2(x)))

    ``dw*`` are depthwise ``kernel_size`` convs (with bias, 'same' symmetric padding); ``fc*`` are
    ``1x1 (C -> max(C // 8, 16)) -> GELU -> 1x1 (-> C)`` bottlenecks (an :class:`Mlp`).
    """

    def __init__(self, dim: int, *, kernel_size: int = 11, heads: int = 8, fc_factor: int = 8,
                 fc_min: int = 16, init: str = "fcvit", dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_init(init)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = max(dim // fc_factor, fc_min)
        self.gc1 = GlobalContext(dim, heads=heads, init=init, **kw)
        self.dw1 = fan_out_init(depthwise_conv(dim, kernel_size, init=base_init(init), **kw), init, rngs)
        self.fc1 = self._bottleneck(dim, hidden, init, kw)
        self.gc2 = GlobalContext(dim, heads=heads, init=init, **kw)
        self.dw2 = fan_out_init(depthwise_conv(dim, kernel_size, init=base_init(init), **kw), init, rngs)
        self.fc2 = self._bottleneck(dim, hidden, init, kw)

    @staticmethod
    def _bottleneck(dim, hidden, init, kw) -> Mlp:
        mlp = Mlp(dim, hidden, init=base_init(init), **kw)
        fan_out_init(mlp.fc1, init, kw["rngs"])
        fan_out_init(mlp.fc2, init, kw["rngs"])
        return mlp

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.gc1(x)
        x = gelu(self.fc1(self.dw1(x)))
        x = x + self.gc2(x)
        return gelu(self.fc2(self.dw2(x)))


class DWConvMlp(nnx.Module):
    """FCViT's ``ChannelMixer``: ``1x1 (C -> hidden) -> DW3x3 -> GELU -> 1x1 (-> C)``.

    Children ``fc1``, ``dwconv``, ``fc2`` as upstream; the 1x1 convs are stored as linears.
    """

    def __init__(self, dim: int, hidden: int, *, kernel_size: int = 3, init: str = "fcvit", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        check_init(init)
        kw = dict(init=base_init(init), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = fan_out_init(Linear(dim, hidden, **kw), init, rngs)
        self.dwconv = fan_out_init(depthwise_conv(hidden, kernel_size, **kw), init, rngs)
        self.fc2 = fan_out_init(Linear(hidden, dim, **kw), init, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.dwconv(self.fc1(x))))
