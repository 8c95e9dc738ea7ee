"""Masked dense and convolution layers over frozen weights (edge-popup / PEMN / Mask Fine-Tuning).

A masked layer computes with ``W_eff = W * mask(scores)``:

* ``W`` is a :class:`FrozenWeight`, an ``nnx.Variable`` that is *not* an ``nnx.Param``: the train
  step differentiates only ``nnx.Param`` state, so ``W`` gets no gradient and no optimizer moments.
* ``scores`` is an ``nnx.Param`` of ``W``'s shape and logical axis names (so a masked layer shards
  exactly like its dense twin); it is what training changes.
* the mask is binary in the forward pass and a straight-through estimator (STE) in the backward
  pass, as edge-popup's ``GetSubnet`` (identical in PEMN and MFT):

  - ``"topk"`` (PEMN, MFT "local"): keep the ``n - int((1 - keep) * n)`` largest ``|scores|`` of the
    layer (``keep`` is the KEEP fraction, although the upstream flag is called ``sparsity``). The
    STE passes ``dL/dmask`` straight to ``|scores|``; the ``abs`` sits outside it, so
    ``dL/dscores = sign(scores) * W * dL/dW_eff``.
  - ``"threshold"`` (MFT "global"): ``mask = scores >= threshold`` on the raw, signed scores;
    ``dL/dscores = W * dL/dW_eff``. :func:`threshold_for_keep` gives the threshold that keeps a
    fraction of all scores of a model.

Frozen weights either are regenerated from a seed and a weight-sharing strategy (PEMN: their
``source`` metadata is a :class:`WeightSource`, see ``lib.layers.prototypes``) and then never stored
in checkpoints, or are ordinary weights that must be stored (``source=None``: Mask Fine-Tuning of
an existing model, :func:`mask_model`). :func:`frozen_manifest` / :func:`check_frozen_manifest` record
and check them for ``lib.train.checkpoint`` and ``lib.zoo``'s weights directories.

:func:`bake` multiplies the masks into the weights and returns an ordinary model (``Linear`` /
``Conv`` with ``nnx.Param`` kernels).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import sharding
from lib.layers import initializers
from lib.layers.conv import Conv, conv2d, init_conv_geometry
from lib.layers.linear import Linear

MASK_MODES = ("topk", "threshold")


# ------------------------------------------------------------------------------------------------
# frozen weights
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WeightSource:
    """How a model's frozen weights are regenerated: recorded on every :class:`FrozenWeight` so a
    checkpoint can leave the weights out and still detect a different regeneration."""
    seed: int
    strategy: str                 # "iid" | "one_layer" | "mp" | "rp" (lib.layers.prototypes.STRATEGIES)
    ratio: float = 1.0            # RP ratio r (unique values = int(N_max * r) + 1)
    tiling: str = "copy"          # RP tiling: "copy" (periodic) or "rand" (permuted)
    rng_impl: str = "threefry2x32"  # jax's PRNG implementation and mode the draws used
    partitionable: bool = False

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class FrozenWeight(nnx.Variable):
    """A weight that is used but never trained (not an ``nnx.Param``: no gradient, no optimizer
    state). Metadata: ``out_sharding`` (logical axis names), ``source`` (a :class:`WeightSource` when
    the value can be regenerated, else None)."""


def frozen(value: jax.Array, names, source: WeightSource | None = None) -> FrozenWeight:
    """A :class:`FrozenWeight` with logical axis names (placement decided later, as ``sharding.param``)."""
    if len(names) != len(value.shape):
        raise ValueError(f"{len(names)} axis names {tuple(names)} for a frozen weight of shape {value.shape}")
    return FrozenWeight(value, out_sharding=tuple(names), eager_sharding=False, source=source)


def kaiming_normal(fan_in: int):
    """PyTorch ``kaiming_normal_(mode='fan_in', nonlinearity='relu')``: N(0, 2 / fan_in), PEMN's weights."""
    std = math.sqrt(2.0 / fan_in)

    def init(key, shape, dtype=jnp.float32):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return init


def _score_init(name: str, fan_in: int):
    if name == "kaiming_uniform":      # PEMN / edge-popup: kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in))
        return initializers.torch_default_kernel(fan_in)
    if name == "normal":               # MFT: scores.normal_(0, 0.02)
        return lambda key, shape, dtype=jnp.float32: (0.02 * jax.random.normal(key, shape)).astype(dtype)
    raise ValueError(f"unknown score init {name!r}; expected 'kaiming_uniform' or 'normal'")


# ------------------------------------------------------------------------------------------------
# scores -> mask, with the straight-through estimator
# ------------------------------------------------------------------------------------------------
def kept_count(n: int, keep: float) -> int:
    """Entries a top-k mask keeps out of ``n``: ``n - int((1 - keep) * n)``, exactly as GetSubnet."""
    return n - int((1 - keep) * n)


def topk_mask(scores: jax.Array, keep: float) -> jax.Array:
    """Binary mask keeping the ``kept_count(n, keep)`` largest ``|scores|`` (ties: sort order).

    Forward value: exactly 0/1. Gradient: the identity to ``|scores|`` (STE), so
    ``d mask / d scores = sign(scores)``.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep is the fraction of weights kept, in (0, 1]; got {keep}")
    return _topk_mask(scores, float(keep))


# The masks are jitted (inlined when called under jit): computed eagerly (bake, a mask shown in a
# notebook) they are then one compiled program per shape instead of one per operation.
@functools.partial(jax.jit, static_argnums=1)
def _topk_mask(scores: jax.Array, keep: float) -> jax.Array:
    a = jnp.abs(scores)
    n = a.size
    drop = n - kept_count(n, keep)
    order = jnp.argsort(jax.lax.stop_gradient(a).ravel())           # ascending: the first `drop` go
    hard = jnp.zeros((n,), a.dtype).at[order[drop:]].set(1).reshape(a.shape)
    return hard + (a - jax.lax.stop_gradient(a))                     # value: hard; gradient: identity


def threshold_mask(scores: jax.Array, threshold: float | jax.Array) -> jax.Array:
    """Binary mask ``scores >= threshold`` on the raw (signed) scores; gradient: the identity."""
    return _threshold_mask(scores, threshold)


@jax.jit
def _threshold_mask(scores: jax.Array, threshold: jax.Array) -> jax.Array:
    hard = (jax.lax.stop_gradient(scores) >= threshold).astype(scores.dtype)
    return hard + (scores - jax.lax.stop_gradient(scores))


def threshold_for_keep(scores: list[jax.Array], keep: float) -> jax.Array:
    """The global threshold keeping ``kept_count(n, keep)`` of all ``scores`` (for ``mode="threshold"``).

    Ties aside, ``threshold_mask(s, t)`` over every array then keeps that many entries in total.
    """
    flat = jnp.sort(jnp.concatenate([jnp.ravel(s) for s in scores]))
    return flat[flat.size - kept_count(flat.size, keep)]


class _Masked(nnx.Module):
    """What MaskedLinear and MaskedConv share: the frozen kernel, its scores and the mask."""

    def _init_mask(self, kernel: jax.Array, names, *, fan_in: int, keep: float, mode: str, threshold: float,
                   score_init: str, source: WeightSource | None, param_dtype, rngs: nnx.Rngs):
        if mode not in MASK_MODES:
            raise ValueError(f"unknown mask mode {mode!r}; expected one of {MASK_MODES}")
        if mode == "topk" and not 0.0 < keep <= 1.0:
            raise ValueError(f"keep is the fraction of weights kept, in (0, 1]; got {keep}")
        self.keep, self.mode, self.threshold = float(keep), mode, float(threshold)
        self.kernel = frozen(kernel.astype(param_dtype), names, source)
        self.scores = sharding.param(_score_init(score_init, fan_in)(rngs.params(), kernel.shape, param_dtype),
                                     names)

    def mask(self) -> jax.Array:
        """The current mask: exactly 0/1 in value, straight-through in gradient."""
        s = self.scores[...]
        return topk_mask(s, self.keep) if self.mode == "topk" else threshold_mask(s, self.threshold)

    def effective_kernel(self, dtype=None) -> jax.Array:
        """``W * mask``: the kernel the layer computes with (and :func:`bake` stores)."""
        w = self.kernel[...] * self.mask().astype(self.kernel.dtype)
        return w if dtype is None else w.astype(dtype)


class MaskedLinear(_Masked):
    """``Linear`` whose kernel ``[in, out]`` is frozen and masked by trained scores.

    Args:
      keep: fraction of the kernel kept (``mode="topk"``); 1.0 is the dense layer.
      mode: ``"topk"`` (per-layer top-k of ``|scores|``) or ``"threshold"`` (``scores >= threshold``).
      kernel: an existing kernel to mask (e.g. a trained model's, Mask Fine-Tuning); default: a
        Kaiming-normal draw (PEMN).
      bias: an existing bias, kept frozen (trained models); masked layers otherwise have none.
      score_init: ``"kaiming_uniform"`` (PEMN) or ``"normal"`` (N(0, 0.02), MFT).
      source: how ``kernel`` is regenerated (:class:`WeightSource`), or None when it must be stored.
    """

    def __init__(self, in_features: int, out_features: int, *, keep: float = 0.5, mode: str = "topk",
                 threshold: float = 0.0, kernel: jax.Array | None = None, bias: jax.Array | None = None,
                 score_init: str = "kaiming_uniform", out_axis: str = "out_channels",
                 source: WeightSource | None = None, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_features, self.out_features, self.out_axis, self.dtype = in_features, out_features, out_axis, dtype
        shape = (in_features, out_features)
        if kernel is None:
            kernel = kaiming_normal(in_features)(rngs.params(), shape, param_dtype)
        if tuple(kernel.shape) != shape:
            raise ValueError(f"MaskedLinear({in_features}, {out_features}) got a kernel of shape {kernel.shape}")
        self._init_mask(kernel, ("in_channels", out_axis), fan_in=in_features, keep=keep, mode=mode,
                        threshold=threshold, score_init=score_init, source=source, param_dtype=param_dtype,
                        rngs=rngs)
        self.bias = frozen(bias, (out_axis,)) if bias is not None else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"MaskedLinear expects {self.in_features} input features in the last axis, "
                             f"got shape {tuple(x.shape)}")
        dtype = self.dtype or jnp.result_type(x.dtype, self.kernel.dtype)
        y = jnp.matmul(x.astype(dtype), self.effective_kernel(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class MaskedConv(_Masked):
    """``Conv`` (NHWC, HWIO kernel, explicit symmetric padding, groups) with a frozen, masked kernel.

    Same arguments as :class:`lib.layers.conv.Conv` plus those of :class:`MaskedLinear`; it runs
    through ``conv2d``, so the fast 1x1 / depthwise paths apply.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, *, stride=1, padding=0,
                 groups: int = 1, keep: float = 0.5, mode: str = "topk", threshold: float = 0.0,
                 kernel: jax.Array | None = None, bias: jax.Array | None = None,
                 score_init: str = "kaiming_uniform", source: WeightSource | None = None, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        shape, names, fan_in = init_conv_geometry(self, in_channels, out_channels, kernel_size, stride=stride,
                                                  padding=padding, groups=groups)
        self.dtype = dtype
        if kernel is None:
            kernel = kaiming_normal(fan_in)(rngs.params(), shape, param_dtype)
        if tuple(kernel.shape) != shape:
            raise ValueError(f"MaskedConv expects a kernel of shape {shape}, got {kernel.shape}")
        self._init_mask(kernel, names, fan_in=fan_in, keep=keep,
                        mode=mode, threshold=threshold, score_init=score_init, source=source,
                        param_dtype=param_dtype, rngs=rngs)
        self.bias = frozen(bias, ("out_channels",)) if bias is not None else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"MaskedConv expects NHWC input [batch, height, width, {self.in_channels}], "
                             f"got shape {tuple(x.shape)}")
        dtype = self.dtype or jnp.result_type(x.dtype, self.kernel.dtype)
        y = conv2d(x.astype(dtype), self.effective_kernel(dtype), self.stride, self.padding, self.groups)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


def masked_depthwise_conv(channels: int, kernel_size: int, **kw) -> MaskedConv:
    """A stride-1 masked depthwise conv with 'same' symmetric padding (odd kernel sizes)."""
    if kernel_size % 2 != 1:
        raise ValueError(f"masked_depthwise_conv needs an odd kernel size, got {kernel_size}")
    return MaskedConv(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, **kw)


MASKED_TYPES = (MaskedLinear, MaskedConv)


# ------------------------------------------------------------------------------------------------
# whole models: mask an existing model, bake the masks in, list the masked layers
# ------------------------------------------------------------------------------------------------
def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


def masked_layers(model: nnx.Module) -> dict[str, _Masked]:
    """``{"a/b/0/c": layer}`` for every masked layer, in nnx graph order."""
    return {_path_str(p): m for p, m in nnx.iter_graph(model) if isinstance(m, MASKED_TYPES)}


def _replace(model: nnx.Module, path, new) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def _select(model, filter_) -> list:
    if isinstance(filter_, str):
        pattern = re.compile(filter_)
        filter_ = lambda path, module: pattern.search(path) is not None  # noqa: E731
    return [(p, m) for p, m in list(nnx.iter_graph(model))
            if isinstance(m, (Linear, Conv)) and p and filter_(_path_str(p), m)]


def mask_model(model: nnx.Module, filter_: str | Callable[[str, nnx.Module], bool] = ".*", keep: float = 0.9,
               *, mode: str = "topk", threshold: float = 0.0, score_init: str = "normal",
               rngs: nnx.Rngs | int = 0) -> nnx.Module:
    """Turn the chosen ``Linear`` / ``Conv`` layers of any model into masked layers over their current
    weights (in place; returns the model). What Mask Fine-Tuning needs.

    Args:
      filter_: a regex searched in each layer's path (``"blocks/[4-7]/.*"``) or a callable
        ``(path, module) -> bool``.
      keep: fraction kept per layer (MFT: 0.9). The kernels (and biases) become :class:`FrozenWeight`
        with ``source=None``: they are stored with the model, not regenerated.
    """
    rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
    chosen = _select(model, filter_)
    if not chosen:
        raise ValueError(f"mask_model: no Linear or Conv layer of {type(model).__name__} matches {filter_!r}")
    for path, m in chosen:
        kw = dict(keep=keep, mode=mode, threshold=threshold, kernel=m.kernel[...],
                  bias=None if m.bias is None else m.bias[...], score_init=score_init, dtype=m.dtype,
                  param_dtype=m.kernel.dtype, rngs=rngs)
        if isinstance(m, Linear):
            new = MaskedLinear(m.in_features, m.out_features, out_axis=m.kernel.get_metadata()["out_sharding"][1],
                               **kw)
        else:
            new = MaskedConv(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                             padding=(m.padding[0][0], m.padding[1][0]), groups=m.groups, **kw)
        _replace(model, path, new)
    return model


def bake(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` in which every masked layer is an ordinary ``Linear`` / ``Conv`` whose
    (trainable) kernel is ``W * mask``; the input model is unchanged."""
    model = nnx.clone(model)
    for path, m in list(nnx.iter_graph(model)):
        if not isinstance(m, MASKED_TYPES):
            continue
        use_bias = m.bias is not None
        if isinstance(m, MaskedLinear):
            shell = nnx.eval_shape(lambda: Linear(m.in_features, m.out_features, use_bias=use_bias,
                                                  out_axis=m.out_axis, dtype=m.dtype, rngs=nnx.Rngs(0)))
        else:
            shell = nnx.eval_shape(lambda: Conv(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                                                padding=(m.padding[0][0], m.padding[1][0]), groups=m.groups,
                                                use_bias=use_bias, dtype=m.dtype, rngs=nnx.Rngs(0)))
        shell.kernel = sharding.param(jax.lax.stop_gradient(m.effective_kernel()),
                                      m.kernel.get_metadata()["out_sharding"])
        if use_bias:
            shell.bias = sharding.param(m.bias[...], m.bias.get_metadata()["out_sharding"])
        _replace(model, path, shell)
    return model


# ------------------------------------------------------------------------------------------------
# checkpoints: regenerable frozen weights are not stored, but checked
# ------------------------------------------------------------------------------------------------
def is_regenerable(path, value) -> bool:
    """nnx filter: a FrozenWeight that can be rebuilt from its :class:`WeightSource`."""
    return isinstance(value, FrozenWeight) and value.get_metadata().get("source") is not None


def is_stored_frozen(path, value) -> bool:
    """nnx filter: a FrozenWeight that cannot be regenerated (Mask Fine-Tuning's), so it is stored."""
    return isinstance(value, FrozenWeight) and not is_regenerable(path, value)


def _sha256(x: jax.Array) -> str:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()


def frozen_manifest(parts: dict) -> dict:
    """``{"<key>/path/kernel": {shape, dtype, sha256[, seed, strategy, ratio, tiling, rng_impl,
    partitionable]}}`` for every leaf of the ``nnx.State`` values of ``parts``: what a checkpoint
    records instead of frozen weights (with the :class:`WeightSource` of those regenerated from a seed)."""
    out = {}
    for key, part in parts.items():
        for path, var in nnx.to_flat_state(part):
            source = var.get_metadata().get("source") if isinstance(var, nnx.Variable) else None
            entry = source.as_dict() if source is not None else {}
            entry.update(shape=list(var.shape), dtype=str(var.dtype), sha256=_sha256(var[...]))
            out[_path_str((key,) + tuple(path))] = entry
    return out


class FrozenWeightMismatch(ValueError):
    """A checkpoint's frozen weights were generated differently from the model's."""


def check_frozen_manifest(saved: dict, current: dict, where: str = "checkpoint") -> None:
    """Raise :class:`FrozenWeightMismatch` naming every difference between two manifests."""
    problems = []
    for name in sorted(set(saved) | set(current)):
        if name not in current:
            problems.append(f"{name}: in the {where} but not regenerated by the model")
        elif name not in saved:
            problems.append(f"{name}: regenerated by the model but not recorded in the {where}")
        elif saved[name] != current[name]:
            diff = {k: (saved[name].get(k), current[name].get(k)) for k in set(saved[name]) | set(current[name])
                    if saved[name].get(k) != current[name].get(k)}
            problems.append(f"{name}: " + ", ".join(f"{k} {a!r} in the {where} vs {b!r} now"
                                                    for k, (a, b) in sorted(diff.items())))
    if problems:
        shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise FrozenWeightMismatch(
            f"the frozen weights of this model differ from those the {where} was trained with (they are not "
            f"stored, only recorded: build the model as it was built then, with the same seed, weight "
            f"strategy, random-number implementation and initial weights):\n  {shown}")
