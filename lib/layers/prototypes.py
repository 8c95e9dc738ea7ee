"""PEMN's weight-sharing strategies for frozen weights, and the storage accounting.

The strategies are pure functions over an ordered ``{name: kernel}`` dict (conv kernels HWIO,
linear kernels ``[in, out]``, as the library stores them) and return a new dict:

==============  ===============================================================================
``iid``         every layer its own Kaiming-normal draw (PEMN's plain "Mask" baseline)
``one_layer``   the first conv of each distinct shape is the prototype; every later conv of that
                shape gets a copy of it (linears are not cloned). Each layer keeps its own mask.
``mp``          max-layer padding: the largest layer's weights, flattened, are ``v``; every layer
                takes ``v[:numel]``
``rp``          random-vector padding: ``L = int(N_max * r) + 1`` values ``v[:L]``, tiled to
                ``N_max`` in order (``copy``, periodic) or then permuted (``rand``); every layer
                takes the first ``numel`` of that vector
==============  ===============================================================================

Flattening follows the reference (PyTorch) order, ``(out, in, kh, kw)`` / ``(out, in)``: kernels
are transposed to that layout before flattening and back afterwards, so the periodic RP pattern
and every count match ``yueb17/PEMN``. As there, no rescaling: after MP/RP every layer has the
largest layer's std (BatchNorm absorbs it).

:func:`regenerate` draws a model's frozen weights from a seed and applies a strategy, so they can
be rebuilt instead of stored; :func:`storage` / :func:`model_storage` report unique values and
bits (float32 weights + 1-bit masks) against the dense model.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib.layers import masked

STRATEGIES = ("iid", "one_layer", "mp", "rp")
TILINGS = ("copy", "rand")


def _to_torch(w: jax.Array) -> jax.Array:
    """HWIO -> OIHW, [in, out] -> [out, in]: the layout whose flattening the reference uses."""
    return jnp.transpose(w, (3, 2, 0, 1)) if w.ndim == 4 else (w.T if w.ndim == 2 else w)


def _from_torch(flat: jax.Array, shape: Sequence[int]) -> jax.Array:
    if len(shape) == 4:
        kh, kw, cin, cout = shape
        return jnp.transpose(flat.reshape(cout, cin, kh, kw), (2, 3, 1, 0))
    if len(shape) == 2:
        return flat.reshape(shape[1], shape[0]).T
    return flat.reshape(shape)


def _largest(weights: Mapping[str, jax.Array]) -> str:
    """Name of the layer with the most elements (the first one on ties, as the reference's ``>``)."""
    best = None
    for name, w in weights.items():
        if best is None or w.size > weights[best].size:
            best = name
    return best


def one_layer(weights: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """One prototype per distinct conv shape (the first in order); linear layers are left alone."""
    prototypes, out = {}, {}
    for name, w in weights.items():
        if w.ndim == 4:
            out[name] = prototypes.setdefault(tuple(w.shape), w)
        else:
            out[name] = w
    return out


def _pad_from(weights: Mapping[str, jax.Array], vector: jax.Array) -> dict[str, jax.Array]:
    return {name: _from_torch(vector[: w.size], w.shape).astype(w.dtype) for name, w in weights.items()}


def max_layer_padding(weights: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """MP: every layer takes the first ``numel`` values of the largest layer's flattened weights."""
    return _pad_from(weights, _to_torch(weights[_largest(weights)]).ravel())


def rp_length(n_max: int, ratio: float) -> int:
    """Number of distinct values RP keeps: ``int(N_max * r) + 1`` (the reference's formula)."""
    return int(n_max * ratio) + 1


def random_vector_padding(weights: Mapping[str, jax.Array], ratio: float, tiling: str = "copy",
                          key: jax.Array | None = None) -> dict[str, jax.Array]:
    """RP: ``v[:L]`` of the largest layer's weights, repeated ``ceil(N_max / L) + 1`` times and cut to
    ``N_max``; ``tiling="rand"`` then permutes it (``key`` required). Every layer takes its prefix."""
    if tiling not in TILINGS:
        raise ValueError(f"unknown RP tiling {tiling!r}; expected one of {TILINGS}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"RP ratio must be in (0, 1], got {ratio}")
    v = _to_torch(weights[_largest(weights)]).ravel()
    n_max = v.size
    length = rp_length(n_max, ratio)
    vector = jnp.tile(v[:length], math.ceil(n_max / length) + 1)[:n_max]
    if tiling == "rand":
        if key is None:
            raise ValueError("RP with tiling='rand' needs a key for the permutation")
        vector = vector[jax.random.permutation(key, n_max)]
    return _pad_from(weights, vector)


def apply_strategy(weights: Mapping[str, jax.Array], strategy: str, *, ratio: float = 1.0,
                   tiling: str = "copy", key: jax.Array | None = None) -> dict[str, jax.Array]:
    """Dispatch to one of :data:`STRATEGIES` (``iid`` returns the weights unchanged)."""
    if strategy == "iid":
        return dict(weights)
    if strategy == "one_layer":
        return one_layer(weights)
    if strategy == "mp":
        return max_layer_padding(weights)
    if strategy == "rp":
        return random_vector_padding(weights, ratio, tiling, key)
    raise ValueError(f"unknown weight strategy {strategy!r}; expected one of {STRATEGIES}")


def regenerate(model: nnx.Module, seed: int, strategy: str = "iid", *, ratio: float = 1.0,
               tiling: str = "copy") -> nnx.Module:
    """Redraw every masked layer's frozen kernel from ``seed`` and apply ``strategy``, in place.

    Layer ``i`` (nnx graph order) draws Kaiming-normal(fan_in) from ``fold_in(key(seed), i)`` with
    the non-partitionable threefry, whatever the caller's setting, so the same (seed, strategy)
    always gives the same weights. Each kernel's ``source`` metadata records how it was made:
    checkpoints then store the recipe and a hash instead of the weights. Works under
    ``nnx.eval_shape`` (abstract models).
    """
    layers = masked.masked_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no masked layers to regenerate")
    source = masked.WeightSource(seed=int(seed), strategy=strategy, ratio=float(ratio), tiling=tiling,
                                 rng_impl=str(jax.config.jax_default_prng_impl), partitionable=False)
    with jax.threefry_partitionable(False):
        key = jax.random.key(seed)
        draws = {}
        for i, (name, layer) in enumerate(layers.items()):
            shape = layer.kernel.shape
            draws[name] = masked.kaiming_normal(int(np.prod(shape[:-1])))(
                jax.random.fold_in(key, i), shape, layer.kernel.dtype)
        new = apply_strategy(draws, strategy, ratio=ratio, tiling=tiling, key=jax.random.fold_in(key, len(layers)))
    for name, layer in layers.items():
        layer.kernel[...] = new[name]
        layer.kernel.set_metadata(source=source)
    return model


# ------------------------------------------------------------------------------------------------
# accounting
# ------------------------------------------------------------------------------------------------
def unique_value_count(shapes: Mapping[str, Sequence[int]], strategy: str, ratio: float = 1.0) -> int:
    """Distinct float values the frozen weights hold (generically: ties of random draws aside)."""
    sizes = {name: int(np.prod(s)) for name, s in shapes.items()}
    if strategy in ("iid", "dense"):
        return sum(sizes.values())
    if strategy == "one_layer":
        convs = {tuple(s) for s in shapes.values() if len(s) == 4}
        return sum(int(np.prod(s)) for s in convs) + sum(n for name, n in sizes.items() if len(shapes[name]) != 4)
    n_max = max(sizes.values())
    if strategy == "mp":
        return n_max
    if strategy == "rp":
        return min(rp_length(n_max, ratio), n_max)
    raise ValueError(f"unknown weight strategy {strategy!r}; expected 'dense' or one of {STRATEGIES}")


def storage(shapes: Mapping[str, Sequence[int]], strategy: str, ratio: float = 1.0, *,
            other_params: int = 0) -> dict:
    """Storage of a PEMN network vs its dense twin (PEMN draft §4.3.1, ``C = C_w + C_m``).

    * dense: every masked-layer weight as float32;
    * PEMN (``strategy`` in :data:`STRATEGIES`): the unique values as float32 plus a 1-bit mask per
      weight (dense bitmaps: the ceiling is 32x smaller than dense).

    ``other_params`` (BatchNorm / LayerNorm affine, trained in both) counts 32 bits on both sides;
    BatchNorm running statistics are left out of both (the draft does not say; this is our choice).
    """
    p = sum(int(np.prod(s)) for s in shapes.values())
    unique = unique_value_count(shapes, strategy, ratio)
    dense_bits = 32 * (p + other_params)
    if strategy == "dense":
        weight_bits, mask_bits = 32 * p, 0
    else:
        weight_bits, mask_bits = 32 * unique, p
    total = weight_bits + mask_bits + 32 * other_params
    return {"masked_params": p, "unique_values": unique, "other_params": other_params, "weight_bits": weight_bits,
            "mask_bits": mask_bits, "total_bits": total, "dense_bits": dense_bits,
            "compression": 1.0 - total / dense_bits}


def model_storage(model: nnx.Module, strategy: str, ratio: float = 1.0) -> dict:
    """:func:`storage` of a (possibly abstract) masked model: shapes from its masked layers, other
    parameters = its ``nnx.Param`` elements that are not scores."""
    layers = masked.masked_layers(model)
    shapes = {name: tuple(layer.kernel.shape) for name, layer in layers.items()}
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    other = sum(int(np.prod(v.shape)) for path, v in params if path[-1] != "scores")
    return storage(shapes, strategy, ratio, other_params=other)


def count_unique(model: nnx.Module) -> int:
    """Distinct values actually held by a (concrete) model's masked kernels, counted with numpy."""
    values = [np.asarray(layer.kernel[...]).ravel() for layer in masked.masked_layers(model).values()]
    return int(np.unique(np.concatenate(values)).size)
