"""Mask Fine-Tuning's masks over a LLaMA decoder: which matrices, how they are masked, and baking.

Upstream (Ming-K9/MFT) swaps the seven projections of the chosen decoder layers for
``SupermaskLinearSparsity``: ``W_eff = W * mask(|scores|)``, keeping the ``n - int((1 - keep) * n)``
largest ``|scores|`` of each matrix, with a straight-through gradient ``sign(s) * W * dL/dW_eff``;
everything but the scores is frozen. Here the same layer is :class:`MaskedProjection` on
``lib.layers.masked`` (the STE top-k and threshold masks that PEMN also uses), over the decoder's
einsum kernels: a top-k over a whole matrix does not depend on its layout, so the masks are
upstream's exactly (the ``mft_llama_tiny`` fixture checks them bit for bit).

The decoder keeps its layers stacked (one ``lax.scan``); :func:`mask_layers` first cuts the stack
around the masked range (``lib.models.llama.model.split_stacks``), so only those layers carry
scores, and the mask of each layer is computed on its own slice inside the scan.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib import sharding
from lib.layers import masked
from lib.models.llama.model import Llama, Projection, split_stacks, stack_of_layer

MODULES = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
SUBNET_MODES = {"attn": MODULES["attn"], "mlp": MODULES["mlp"], "both": MODULES["attn"] + MODULES["mlp"]}


class MaskedProjection(nnx.Module):
    """A :class:`Projection` whose kernel is frozen and masked by trained ``scores`` (same shape and
    logical axes, float32). Stacked kernels (a leading ``layers`` axis) are masked per layer."""

    def __init__(self, proj: Projection, *, keep: float = 0.9, mode: str = "topk", threshold: float = 0.0,
                 rngs: nnx.Rngs):
        if mode not in masked.MASK_MODES:
            raise ValueError(f"unknown mask mode {mode!r}; expected one of {masked.MASK_MODES}")
        if mode == "topk" and not 0.0 < keep <= 1.0:
            raise ValueError(f"keep is the fraction of weights kept, in (0, 1]; got {keep}")
        names = tuple(proj.kernel.get_metadata()["out_sharding"])
        value = proj.kernel.get_value()
        self.kernel = masked.FrozenWeight(value, out_sharding=names, eager_sharding=False, source=None)
        # Upstream's scores start as LlamaPreTrainedModel._init_weights re-draws them: N(0, 0.02).
        self.scores = sharding.param(0.02 * jax.random.normal(rngs.params(), value.shape, jnp.float32), names)
        self.num_in, self.dtype = proj.num_in, proj.dtype
        self.keep, self.mode, self.threshold = float(keep), mode, float(threshold)
        self.stacked = names[0] == "layers"

    def _mask(self, scores: jax.Array) -> jax.Array:
        if self.mode == "topk":
            return masked.topk_mask(scores, self.keep)
        return masked.threshold_mask(scores, self.threshold)

    def mask(self) -> jax.Array:
        """The 0/1 mask (straight-through in gradient). Called on the stacked module it is computed per
        layer; inside the decoder's scan the module holds one layer's slice and one mask."""
        s = self.scores[...]
        whole_stack = self.stacked and s.ndim == len(self.kernel.get_metadata()["out_sharding"])
        return jax.vmap(self._mask)(s) if whole_stack else self._mask(s)

    def weight(self) -> jax.Array:
        """``W * mask``, the kernel the layer computes with (and :func:`bake` stores)."""
        w = self.kernel[...]
        return w * self.mask().astype(w.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.weight().astype(self.dtype)
        return jnp.tensordot(x.astype(self.dtype), k, axes=self.num_in)


def check_layers(model: Llama, layers: Sequence[int]) -> list[int]:
    n = model.config.num_hidden_layers
    layers = sorted({int(i) for i in layers})
    if not layers:
        raise ValueError("masked_layers is empty")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"masked_layers {bad} are outside 0..{n - 1} ({n} layers)")
    return layers


def mask_layers(model: Llama, layers: Sequence[int], *, subnet_mode: str = "both",
                modules: Sequence[str] | None = None, keep: float = 0.9, mode: str = "topk",
                threshold_attn: float = 0.0, threshold_mlp: float = 0.0, rngs: nnx.Rngs | int = 0) -> Llama:
    """Mask the projections of ``layers`` of ``model`` (in place; returns it).

    ``subnet_mode``: "attn" (q/k/v/o), "mlp" (gate/up/down) or "both" (upstream's name); or name the
    ``modules`` directly. ``mode="threshold"`` is upstream's "global" variant: ``scores >= threshold``
    (``threshold_attn`` / ``threshold_mlp``) instead of a per-matrix top-k.
    """
    layers = check_layers(model, layers)
    if modules is None:
        if subnet_mode not in SUBNET_MODES:
            raise ValueError(f"subnet_mode {subnet_mode!r}: expected one of {sorted(SUBNET_MODES)}")
        modules = SUBNET_MODES[subnet_mode]
    unknown = [m for m in modules if m not in SUBNET_MODES["both"]]
    if unknown:
        raise ValueError(f"unknown modules {unknown}; expected some of {list(SUBNET_MODES['both'])}")
    rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
    runs = _contiguous(layers)
    split_stacks(model, [b for a, z in runs for b in (a, z + 1)])
    for a, z in runs:
        stack = stack_of_layer(model, a)
        assert (stack.first, stack.count) == (a, z - a + 1)
        for name in modules:
            parent = stack.layer.self_attn if name in MODULES["attn"] else stack.layer.mlp
            proj = getattr(parent, name)
            if isinstance(proj, MaskedProjection):
                continue
            threshold = threshold_attn if name in MODULES["attn"] else threshold_mlp
            setattr(parent, name, MaskedProjection(proj, keep=keep, mode=mode, threshold=threshold, rngs=rngs))
    return model


def _contiguous(layers: list[int]) -> list[tuple[int, int]]:
    runs, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            runs.append((start, prev))
            start = cur
    return runs


def masked_projections(model: nnx.Module) -> dict[str, MaskedProjection]:
    """``{"model/blocks/1/layer/self_attn/q_proj": module}`` for every masked projection."""
    return {"/".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, MaskedProjection)}


def layer_masks(model: Llama) -> dict[str, np.ndarray]:
    """Every mask under upstream's module names (``model.layers.1.self_attn.q_proj``), as bool
    ``[out, in]`` arrays (torch layout, as upstream's ``masks.pt``)."""
    from lib.models.llama.hf import hf_targets
    out = {}
    for key, target in hf_targets(model).items():
        if not key.endswith(".scores"):
            continue
        module = _owner(model, target.path)
        m = np.asarray(jax.device_get(module.mask()))
        m = m[target.layer] if target.layer is not None else m
        out[key[:-len(".scores")]] = target.to_hf(m).astype(bool)
    return out


def _owner(model, path: str):
    obj = model
    for part in path.split(".")[:-1]:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def bake(model: Llama) -> Llama:
    """A copy of ``model`` whose masked projections are ordinary :class:`Projection` s with kernel
    ``W * mask`` (what upstream's ``apply_masks.py`` writes); the input model is unchanged."""
    model = nnx.clone(model)
    for path, m in list(nnx.iter_graph(model)):
        if not isinstance(m, MaskedProjection):
            continue
        names = tuple(m.kernel.get_metadata()["out_sharding"])
        shape = tuple(m.kernel.get_value().shape)
        stack = shape[0] if m.stacked else 0
        dims = shape[1:] if m.stacked else shape
        in_shape, out_shape = dims[:m.num_in], dims[m.num_in:]
        base_names = names[1:] if m.stacked else names
        shell = nnx.eval_shape(lambda: Projection(in_shape, out_shape, base_names, stack=stack,
                                                  param_dtype=m.kernel.dtype, dtype=m.dtype, rngs=nnx.Rngs(0)))
        shell.kernel = sharding.param(jax.lax.stop_gradient(m.weight()), names)
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        setattr(parent, path[-1], shell)
    return model


BASELINES = ("random", "l1")


def apply_baseline(model: Llama, layers: Sequence[int], *, kind: str, keep: float = 0.9, subnet_mode: str = "both",
                   seed: int = 0) -> dict[str, np.ndarray]:
    """Upstream's mask baselines, applied in place to a dense model's projections in ``layers``:
    ``"random"`` (each weight kept with probability ``keep``) or ``"l1"`` (the ``int((1 - keep) n)``
    smallest ``|w|`` of each matrix pruned). Returns the masks (upstream's names, bool ``[out, in]``)."""
    if kind not in BASELINES:
        raise ValueError(f"baseline {kind!r}: expected one of {BASELINES}")
    from lib.models.llama.hf import hf_targets
    layers = check_layers(model, layers)
    modules = SUBNET_MODES[subnet_mode]
    rng = np.random.default_rng(seed)
    targets = hf_targets(model)
    masks = {}
    for i in layers:
        for name in modules:
            group = "self_attn" if name in MODULES["attn"] else "mlp"
            key = f"model.layers.{i}.{group}.{name}"
            t = targets[key + ".weight"]
            full = np.array(jax.device_get(t.variable.get_value()))
            w = full[t.layer]
            if kind == "random":
                m = rng.random(w.shape) < keep
            else:
                drop = w.size - masked.kept_count(w.size, keep)
                order = np.argsort(np.abs(w).ravel(), kind="stable")
                m = np.ones(w.size, bool)
                m[order[:drop]] = False
                m = m.reshape(w.shape)
            full[t.layer] = w * m
            current = t.variable.get_value()
            t.variable.set_value(jax.device_put(full.astype(current.dtype), current.sharding))
            masks[key] = t.to_hf(m)
    return masks
