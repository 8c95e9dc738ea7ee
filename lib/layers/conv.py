"""Convolutions in NHWC with explicit, PyTorch-style symmetric padding.

``conv2d`` is the one place a convolution is computed, so backend-specific fast paths (e.g. a
shifted multiply-add depthwise conv on XLA:CPU) can be slotted in behind it without touching the
models. Kernels are stored HWIO (``[kh, kw, in/groups, out]``), the layout the converter writes.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from flax import nnx

from lib import sharding
from lib.layers import initializers
from lib.layers.norm import BatchNorm


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


# ------------------------------------------------------------------------------------------------
# implementations: one switch selects them for the whole library
# ------------------------------------------------------------------------------------------------
CONV_IMPLS = ("auto", "xla", "fast")
_conv_impl = "auto"


def set_conv_impl(impl: str) -> None:
    """Choose how convolutions are computed: ``"xla"`` (always ``lax.conv_general_dilated``),
    ``"fast"`` (the shifted multiply-add / im2col / matmul forms below) or ``"auto"`` (fast forms
    where they measured faster: XLA:CPU; plain XLA convolutions on GPU and TPU). The same switch
    selects the XLA:CPU form of the Context Clusters mixer (``lib/layers/cluster.py``).

    Read when a function is traced: set it before jitting (configs: ``conv_impl``).
    """
    global _conv_impl
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv implementation {impl!r}; expected one of {CONV_IMPLS}")
    _conv_impl = impl


class conv_impl:
    """Context manager form of :func:`set_conv_impl`."""

    def __init__(self, impl: str):
        self.impl, self.previous = impl, _conv_impl

    def __enter__(self):
        set_conv_impl(self.impl)

    def __exit__(self, *exc):
        set_conv_impl(self.previous)


def use_fast_path() -> bool:
    if _conv_impl == "auto":
        return jax.default_backend() == "cpu"
    return _conv_impl == "fast"


def _xla_conv(x, kernel, stride, padding, groups):
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=stride, padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _windows(xp, kh, kw, out_h, out_w):
    """The kh*kw shifted views of a padded input, in (i, j) row-major order."""
    for i in range(kh):
        for j in range(kw):
            yield i, j, jax.lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + out_h, j + out_w, xp.shape[3]))


def _out_size(size, k, pad, stride=1):
    return (size + pad[0] + pad[1] - k) // stride + 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_shifted(x, kernel, padding):
    """Stride-1 depthwise conv as kh*kw shifted multiply-adds (XLA:CPU's grouped conv is slow)."""
    kh, kw = kernel.shape[:2]
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out_h, out_w = _out_size(x.shape[1], kh, padding[0]), _out_size(x.shape[2], kw, padding[1])
    y = None
    for i, j, win in _windows(xp, kh, kw, out_h, out_w):
        term = win * kernel[i, j, 0]
        y = term if y is None else y + term
    # Materialise the sum: otherwise XLA fuses the kh*kw taps into every consumer (BatchNorm's mean,
    # its variance, the normalisation, ...), recomputing them there and compiling each copy.
    return jax.lax.optimization_barrier(y)


def _depthwise_shifted_fwd(x, kernel, padding):
    return _depthwise_shifted(x, kernel, padding), (x, kernel)


# Batch blocks of about this many dy elements for the depthwise kernel gradient (see below).
_KERNEL_GRAD_BLOCK_ELEMENTS = 1 << 20


def _kernel_grad_block(n: int, per_image: int) -> int:
    """Images per block: the largest divisor of the batch whose block stays within the target
    size; the whole batch when it already fits in two blocks (no gain from splitting then)."""
    if n * per_image <= 2 * _KERNEL_GRAD_BLOCK_ELEMENTS:
        return n
    return max((b for b in range(1, n + 1) if n % b == 0 and b * per_image <= _KERNEL_GRAD_BLOCK_ELEMENTS),
               default=1)


def _depthwise_kernel_grad(xp, dy, kh, kw):
    """[kh * kw, C] kernel gradient of the shifted depthwise form: one multiply-reduce per tap.

    The taps run in a loop (as fast as unrolled at run time, and it compiles in a fraction of the
    time: 49 unrolled reductions per conv made XLA:CPU slow; unrolled, XLA also fuses each slice
    into its own, slower, reduction instead of YNNPACK's). Large batches of large maps go through
    the taps block by block of images, which keeps each block's windows in cache: at
    32x56x56x24 (8 images per block) this took 26 ms instead of 43, and the starnet_s1 train step
    2-3% less; at 28x28 and below it made no difference, hence the size threshold."""
    n, out_h, out_w, c = dy.shape
    block = _kernel_grad_block(n, out_h * out_w * c)

    def taps(xb, db, dk):
        def tap(t, dk):
            win = jax.lax.dynamic_slice(xb, (0, t // kw, t % kw, 0), (xb.shape[0], out_h, out_w, c))
            return dk.at[t].add(jnp.sum(win * db, axis=(0, 1, 2), dtype=jnp.float32))
        return jax.lax.fori_loop(0, kh * kw, tap, dk)

    dk = jnp.zeros((kh * kw, c), jnp.float32)
    if block == n:
        return taps(xp, dy, dk)
    # Block k holds images k, k + n/block, k + 2n/block, ...: split the batch as [block, n/block]
    # and index the inner axis, so a batch sharded over devices stays sharded (each device keeps
    # taking its own images) instead of being gathered for a slice.
    xb, db = xp.reshape((block, n // block) + xp.shape[1:]), dy.reshape((block, n // block) + dy.shape[1:])
    pick = functools.partial(jax.lax.dynamic_index_in_dim, axis=1, keepdims=False)
    return jax.lax.fori_loop(0, n // block, lambda k, dk: taps(pick(xb, k), pick(db, k), dk), dk)


def _depthwise_shifted_bwd(padding, res, dy):
    x, kernel = res
    kh, kw = kernel.shape[:2]
    (pt, pb), (pl, pr) = padding
    # Input gradient: the same shifted form with the flipped kernel over dy padded by (k - 1 - p).
    dx = _depthwise_shifted(dy, kernel[::-1, ::-1], ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    dk = _depthwise_kernel_grad(xp, dy, kh, kw)
    dk = dk.reshape(kh, kw, 1, -1).astype(kernel.dtype)
    return dx.astype(x.dtype), dk


_depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


def _phase_taps(k: int, s: int, pad_lo: int):
    """For each output phase a (input rows s*m + a) of a stride-s conv's input gradient: the
    (kernel tap i, dy row offset d) pairs with dx[s*m + a] += dy[m + d] @ kernel[i].T."""
    return [[(i, (a + pad_lo - i) // s) for i in range(k) if (a + pad_lo - i) % s == 0] for a in range(s)]


def _strided_input_grad(dy, kernel, x_shape, stride, padding):
    """Input gradient of a dense strided conv as one matmul, then a phase interleave.

    Each of the stride_h x stride_w phases of dx (rows s*m + a, columns s*l + b) is a sum of
    shifted dy's times kernel taps. The shifted views of dy are concatenated on the channel axis
    and multiplied by one matrix whose (shift, phase) blocks hold the matching taps (zeros
    elsewhere), so every phase comes out of a single matmul."""
    n, h, w, ci = x_shape
    kh, kw, _, co = kernel.shape
    (sh, sw), ho, wo = stride, dy.shape[1], dy.shape[2]
    rows, cols = _phase_taps(kh, sh, padding[0][0]), _phase_taps(kw, sw, padding[1][0])
    m, l = -(-h // sh), -(-w // sw)                       # rows / columns per phase (padded up)
    row_offsets = sorted({d for taps in rows for _, d in taps})
    col_offsets = sorted({e for taps in cols for _, e in taps})
    # dy zero-padded so every view dy[m + d, l + e] over the phase grid is in range.
    top, left = max(0, -row_offsets[0]), max(0, -col_offsets[0])
    bottom, right = max(0, m + row_offsets[-1] - ho), max(0, l + col_offsets[-1] - wo)
    dyp = jnp.pad(dy, ((0, 0), (top, bottom), (left, right), (0, 0)))
    shifts = [(d, e) for d in row_offsets for e in col_offsets]
    views = jnp.concatenate([jax.lax.slice(dyp, (0, top + d, left + e, 0), (n, top + d + m, left + e + l, co))
                             for d, e in shifts], axis=-1)
    blocks = jnp.zeros((len(shifts), co, sh, sw, ci), kernel.dtype)
    for a, row_taps in enumerate(rows):
        for b, col_taps in enumerate(cols):
            for i, d in row_taps:
                for j, e in col_taps:
                    blocks = blocks.at[shifts.index((d, e)), :, a, b, :].set(kernel[i, j].T)
    phases = jnp.dot(views.reshape(-1, len(shifts) * co), blocks.reshape(len(shifts) * co, -1))
    dx = phases.reshape(n, m, l, sh, sw, ci).transpose(0, 1, 3, 2, 4, 5).reshape(n, m * sh, l * sw, ci)
    return dx[:, :h, :w]


def _strided_kernel_grad(x, dy, kernel_shape, stride, padding):
    """Kernel gradient of a dense strided conv as one matmul: the kh*kw strided views of the padded
    input stacked on the channel axis (im2col), contracted with dy over every output pixel."""
    kh, kw, ci, co = kernel_shape
    (sh, sw), (n, ho, wo, _) = stride, dy.shape
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    cols = jnp.concatenate([jax.lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, ci),
                                          (1, sh, sw, 1)) for i in range(kh) for j in range(kw)], axis=-1)
    return jnp.dot(cols.reshape(-1, kh * kw * ci).T, dy.reshape(-1, co)).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _strided_conv(x, kernel, stride, padding, phase_input_grad, im2col_kernel_grad):
    """A dense strided conv with XLA's forward; its input gradient as one phase matmul and/or its
    kernel gradient as one im2col matmul where those beat XLA's, XLA's own gradients otherwise."""
    return _xla_conv(x, kernel, stride, padding, 1)


def _strided_conv_fwd(x, kernel, stride, padding, phase_input_grad, im2col_kernel_grad):
    return _strided_conv(x, kernel, stride, padding, phase_input_grad, im2col_kernel_grad), (x, kernel)


def _strided_conv_bwd(stride, padding, phase_input_grad, im2col_kernel_grad, res, dy):
    x, kernel = res
    _, xla_vjp = jax.vjp(lambda x, k: _xla_conv(x, k, stride, padding, 1), x, kernel)
    dx, dk = xla_vjp(dy)   # XLA drops whichever of the two is not used below
    if phase_input_grad:
        dx = _strided_input_grad(dy, kernel, x.shape, stride, padding).astype(x.dtype)
    if im2col_kernel_grad:
        dk = _strided_kernel_grad(x, dy, kernel.shape, stride, padding).astype(kernel.dtype)
    return dx, dk


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)

# Where the phase-matmul input gradient wins on XLA:CPU (2-core CPU, batch 32): at 112x112x32 ->
# 56x56x24 (StarNet's first downsampler) 65 ms against XLA's 150 ms, and the starnet_s1 train step
# about 7% faster; at 56x56 it is about even and at 28x28 and below, or with a 3-channel input (the
# stem), slower. See benchmarks/RESULTS.md.
_PHASE_GRAD_MIN_PIXELS = 112 * 112
_PHASE_GRAD_MIN_CHANNELS = 16
# The im2col kernel gradient beats XLA's while its patch matrix stays small (micro-benchmarks,
# batch 32): StarNet's 3x3 stem 29 vs 72 ms, the 56x56x24 and 28x28x48 downsamplers 11 vs 15 and
# 5.4 vs 10 ms, the 7x7 stride-4 stems even (31 vs 31 ms); for the 112x112x32 downsampler, whose
# patches are 29M elements, it was slower (43 vs 37 ms).
_IM2COL_MAX_ELEMENTS = 1 << 24


def conv2d(x: jax.Array, kernel: jax.Array, stride=(1, 1), padding=((0, 0), (0, 0)),
           groups: int = 1) -> jax.Array:
    """NHWC x HWIO convolution; ``padding`` is explicit ((top, bottom), (left, right)).

    The one place a convolution is computed. With the fast path on (see :func:`set_conv_impl`):
    1x1 stride-1 convs are matmuls, depthwise stride-1 convs are shifted multiply-adds with a
    matching custom gradient, and dense strided convs keep XLA's forward but take their input
    gradient as one phase matmul (over large maps) and their kernel gradient as one im2col matmul
    (where the patch matrix is small); everything else (and the "xla" setting) uses
    ``lax.conv_general_dilated``. (An im2col forward measured slower than XLA's on CPU, so it is
    not used.) All forms agree to float32 round-off (``tests/test_conv_impls.py``).
    """
    stride, padding = tuple(stride), tuple(tuple(p) for p in padding)
    if use_fast_path():
        kh, kw, cin_g, cout = kernel.shape
        if groups == 1 and (kh, kw) == (1, 1) and stride == (1, 1) and padding == ((0, 0), (0, 0)):
            return jnp.matmul(x, kernel[0, 0])
        if groups == x.shape[-1] == cout and cin_g == 1 and stride == (1, 1) and \
                all(0 <= p < k for p, k in zip(sum(padding, ()), (kh, kh, kw, kw))):
            return _depthwise_shifted(x, kernel, padding)
        if groups == 1 and stride != (1, 1):
            phase = cin_g >= _PHASE_GRAD_MIN_CHANNELS and x.shape[1] * x.shape[2] >= _PHASE_GRAD_MIN_PIXELS
            patches = kh * kw * cin_g * _out_size(x.shape[1], kh, padding[0], stride[0]) * \
                _out_size(x.shape[2], kw, padding[1], stride[1])
            # (A symbolic batch, as in jax.export's inference functions, takes no gradient: skip.)
            im2col = isinstance(x.shape[0], int) and x.shape[0] * patches <= _IM2COL_MAX_ELEMENTS
            if phase or im2col:
                return _strided_conv(x, kernel, stride, padding, phase, im2col)
    return _xla_conv(x, kernel, stride, padding, groups)


def init_conv_geometry(layer, in_channels: int, out_channels: int, kernel_size, *, stride, padding, groups: int):
    """Set a conv layer's geometry attributes (``in_channels``, ``out_channels``, ``groups``,
    ``kernel_size``, ``stride``, explicit symmetric ``padding``) and return its HWIO kernel
    ``shape``, the kernel's logical axis ``names`` and ``fan_in``. Shared by :class:`Conv` and the
    masked conv, so a masked layer shards exactly like its dense twin."""
    if in_channels % groups or out_channels % groups:
        raise ValueError(f"channels {in_channels}->{out_channels} do not divide into {groups} groups")
    layer.in_channels, layer.out_channels, layer.groups = in_channels, out_channels, groups
    layer.kernel_size, layer.stride = _pair(kernel_size), _pair(stride)
    ph, pw = _pair(padding)
    layer.padding = ((ph, ph), (pw, pw))
    kh, kw = layer.kernel_size
    # A depthwise kernel has a size-1 input dimension: nothing there to shard.
    in_name = "in_channels" if in_channels // groups > 1 else None
    shape = (kh, kw, in_channels // groups, out_channels)
    return shape, ("kernel_h", "kernel_w", in_name, "out_channels"), (in_channels // groups) * kh * kw


class Conv(nnx.Module):
    """``torch.nn.Conv2d`` in NHWC: same arguments, same padding, same default init.

    Args:
      padding: an int or (ph, pw) of symmetric padding, as in PyTorch; never 'SAME' (which pads
        strided convs asymmetrically and breaks ported weights).
      init: ``"torch"`` (PyTorch's default, kept by the upstream models) or ``"trunc_normal"``.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); ``None`` computes in the parameters' dtype.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, *, stride=1, padding=0,
                 groups: int = 1, use_bias: bool = True, init: str = "torch", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        shape, names, fan_in = init_conv_geometry(self, in_channels, out_channels, kernel_size, stride=stride,
                                                  padding=padding, groups=groups)
        self.dtype = dtype
        kernel_init, bias_init = initializers.kernel_and_bias_init(init, fan_in)
        self.kernel = sharding.param(kernel_init(rngs.params(), shape, param_dtype), names)
        self.bias = (sharding.param(bias_init(rngs.params(), (out_channels,), param_dtype), ("out_channels",))
                     if use_bias else None)

    def compute_dtype(self, x: jax.Array):
        """Check ``x`` is NHWC with ``in_channels`` channels; the dtype to compute in."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"Conv expects NHWC input [batch, height, width, {self.in_channels}], "
                             f"got shape {tuple(x.shape)}")
        return self.dtype or jnp.result_type(x.dtype, self.kernel.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.compute_dtype(x)
        y = conv2d(x.astype(dtype), self.kernel[...].astype(dtype), self.stride, self.padding, self.groups)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class ConvBN(nnx.Module):
    """Conv followed by an optional BatchNorm (eps 1e-5, torch momentum 0.1); no activation.

    Mirrors the ``ConvBN`` ``nn.Sequential`` of the StarNet code: children ``conv`` and ``bn``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, *, stride=1, padding=0,
                 groups: int = 1, with_bn: bool = True, init: str = "torch", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         groups=groups, init=init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.bn = BatchNorm(out_channels, dtype=dtype, param_dtype=param_dtype) if with_bn else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x


def fused_pointwise(convs: list[Conv], x: jax.Array) -> list[jax.Array]:
    """Several 1x1 convs of the same input as ONE matmul on the fast path (e.g. the two star
    branches), split back per conv. The weights stay stored separately."""
    if not use_fast_path() or any(c.kernel_size != (1, 1) or c.stride != (1, 1) or c.groups != 1 for c in convs) \
            or not all(isinstance(c, Conv) for c in convs):   # e.g. masked convs compute their own kernel
        return [c(x) for c in convs]
    dtype = convs[0].compute_dtype(x)
    kernel = jnp.concatenate([c.kernel[...][0, 0] for c in convs], axis=-1).astype(dtype)
    y = jnp.matmul(x.astype(dtype), kernel)
    if all(c.bias is not None for c in convs):
        y = y + jnp.concatenate([c.bias[...] for c in convs]).astype(dtype)
    splits = list(itertools.accumulate(c.out_channels for c in convs))[:-1]
    return jnp.split(y, splits, axis=-1)


def depthwise_conv(channels: int, kernel_size: int, *, init: str = "torch", dtype=None,
                   param_dtype=jnp.float32, rngs: nnx.Rngs) -> Conv:
    """A stride-1 depthwise conv with 'same' symmetric padding (odd kernel sizes)."""
    if kernel_size % 2 != 1:
        raise ValueError(f"depthwise_conv needs an odd kernel size, got {kernel_size}")
    return Conv(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, init=init,
                dtype=dtype, param_dtype=param_dtype, rngs=rngs)
