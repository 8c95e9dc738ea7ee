"""The model zoo: one registry for every model of every project, timm-style.

    from lib import zoo
    zoo.list_models("starnet_*")
    model = zoo.create_model("starnet_s1", num_classes=1000, rngs=0)
    zoo.load_torch_weights(model, "starnet_s1.pth.tar")     # official checkpoint, no torch needed
    zoo.save_weights(model, "/ckpt/starnet_s1")             # the project's own format (orbax)
    model = zoo.create_model("starnet_s1", weights="/ckpt/starnet_s1")   # either format

The contract: a registered model is an ``nnx.Module`` called on one batched array, the batch of
the model's example input (``model_info(name).example_input``, a ``jax.ShapeDtypeStruct``
without the batch axis): e.g. float32 NHWC images ``(224, 224, 3)`` for the vision
classifiers, int32 token ids ``(seq,)`` for a language model, float32 points ``(2,)`` for the
2-D toy. What it returns is the model's own business (logits, features, a pytree of them).
The zoo knows nothing of classes: ``num_classes`` is an ordinary constructor argument, passed
to the factory only when the caller gives it (classifiers have their own default, 1000).
``model.eval()`` / ``model.train()`` switch BatchNorm and DropPath where a model has them.

Projects register their models with :func:`register_model` in a module named by an entry
point of the group ``starjax.models`` (``setup.cfg``, ``[options.entry_points]``); the registry
is filled, on first use, by loading every entry point of that group. ``lib`` names no project.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import importlib.metadata
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lib import sharding
from lib.convert import torch_to_nnx
from lib.convert.torch_to_nnx import ConversionReport, WeightConversionError  # noqa: F401 (re-export)
from lib.layers import masked

# The entry-point group whose modules register models when imported. A package adds its models
# with e.g. ``starnet = projects.starnet.models`` under ``starjax.models`` in its setup.cfg.
ENTRY_POINT_GROUP = "starjax.models"

# The example input a model gets when its registration states none: one 224x224 RGB image.
IMAGE_224 = jax.ShapeDtypeStruct((224, 224, 3), jnp.float32)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    factory: Callable[..., nnx.Module]
    key_map: Callable[[str], str | None] | None   # torch module path -> NNX module path
    example_input: jax.ShapeDtypeStruct            # one example's shape and dtype (no batch axis)
    pretrained: str | None                        # where official weights come from, if any

    @property
    def input_size(self) -> tuple[int, ...]:
        """The example input's shape, e.g. (H, W, C) or (features,) (the older name; the dtype is in
        :attr:`example_input`)."""
        return tuple(self.example_input.shape)


_REGISTRY: dict[str, ModelInfo] = {}
_loaded = False


def register_model(name: str, factory: Callable[..., nnx.Module], *, key_map=None,
                   example_input: jax.ShapeDtypeStruct | None = None, input_size: tuple[int, ...] | None = None,
                   pretrained: str | None = None) -> None:
    """Register ``factory(*, rngs=nnx.Rngs, **overrides) -> nnx.Module``.

    Args:
      factory: builds the model from keyword arguments only; ``rngs`` always, plus whatever the
        caller of :func:`create_model` overrides (a classifier takes ``num_classes`` and gives it
        its own default; a model without classes does not take it).
      key_map: torch module path -> NNX module path, for official PyTorch checkpoints.
      example_input: the shape and dtype of one input without the batch axis, as a
        ``jax.ShapeDtypeStruct``: ``(224, 224, 3) float32`` images (the default, :data:`IMAGE_224`),
        ``(seq,) int32`` token ids, ``(2,) float32`` points.
      input_size: the older form, a float32 ``example_input`` of this shape.
      pretrained: where official weights come from, if anywhere.
    """
    if name != name.lower():
        raise ValueError(f"model names are lowercase, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    if input_size is not None:
        if example_input is not None:
            raise ValueError(f"{name}: give example_input or input_size, not both")
        example_input = jax.ShapeDtypeStruct(tuple(input_size), jnp.float32)
    example_input = IMAGE_224 if example_input is None else example_input
    if not (hasattr(example_input, "shape") and hasattr(example_input, "dtype")):
        raise TypeError(f"{name}: example_input must be a jax.ShapeDtypeStruct, got {example_input!r}")
    example_input = jax.ShapeDtypeStruct(tuple(int(d) for d in example_input.shape), example_input.dtype)
    _REGISTRY[name] = ModelInfo(name, factory, key_map, example_input, pretrained)


def _ensure_loaded() -> None:
    """Import every module named by an entry point of :data:`ENTRY_POINT_GROUP` (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        try:
            ep.load()
        except Exception as e:
            _loaded = False   # the next call tries again (and fails again) rather than list a partial zoo
            raise ImportError(f"loading the models of entry point {ep.name} = {ep.value} "
                              f"(group {ENTRY_POINT_GROUP!r}) failed: {e}") from e


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    _ensure_loaded()
    natural = lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)]  # s2 before s10
    return sorted((n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern)), key=natural)


def model_info(name: str) -> ModelInfo:
    _ensure_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name.lower(), list(_REGISTRY), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        if not importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            hint += (f" No package declares models (entry-point group {ENTRY_POINT_GROUP!r}): install this one "
                     f"(pip install -e .) so its models register.")
        raise ValueError(f"unknown model {name!r}.{hint} See lib.zoo.list_models() for all "
                         f"{len(_REGISTRY)} models.")
    return _REGISTRY[name]


def example_input(name: str, batch_size: int = 1, *, resolution: int | None = None) -> jax.ShapeDtypeStruct:
    """The shape and dtype of a batch for model ``name``: its example input with a leading batch axis.

    ``resolution`` replaces the height and width of an image input ``(H, W, C)``; other inputs
    refuse it.
    """
    ex = model_info(name).example_input
    shape = tuple(ex.shape)
    if resolution is not None:
        if len(shape) != 3:
            raise ValueError(f"{name} takes {shape} {ex.dtype} inputs, not (H, W, C) images; resolution does not apply")
        shape = (resolution, resolution, shape[2])
    return jax.ShapeDtypeStruct((batch_size, *shape), ex.dtype)


def _rngs_key(rngs: int | jax.Array | nnx.Rngs) -> jax.Array:
    if isinstance(rngs, nnx.Rngs):
        return rngs.params()
    if isinstance(rngs, (int, np.integer)):
        return jax.random.key(int(rngs))
    return rngs


def create_model(name: str, *, rngs: int | jax.Array | nnx.Rngs = 0,
                 abstract: bool = False, mesh: Mesh | None = None,
                 sharding_rules=sharding.DEFAULT_RULES, weights: str | Path | None = None,
                 **overrides) -> nnx.Module:
    """Build a registered model.

    Args:
      rngs: an int seed, a key or an ``nnx.Rngs`` (its ``params`` stream gives the init key;
        DropPath streams are derived from the same key).
      abstract: return the model with ``jax.ShapeDtypeStruct`` leaves (shapes only, no memory);
        with ``mesh``, the structs carry the shardings the parameters would have.
      mesh: create the parameters directly sharded over ``mesh`` (per ``sharding_rules``), so a
        large model never exists whole on one device.
      weights: a directory written by :func:`save_weights` (restored straight into the sharded
        parameters), an official PyTorch checkpoint file or a ``"hf-hub:org/name"`` id of timm
        weights, loaded strictly (:func:`load_pretrained`).
      **overrides: model constructor arguments, passed to the factory as given, e.g.
        ``num_classes=10`` (a classifier's size; 0 gives a backbone returning pooled features;
        left out, the factory's own default, 1000 for the ImageNet classifiers),
        ``drop_path_rate=0.1`` or ``dtype=jnp.bfloat16``. Models without classes take no
        ``num_classes``.
    """
    info = model_info(name)
    model = create_from_factory(functools.partial(info.factory, **overrides), rngs=rngs, abstract=abstract,
                                mesh=mesh, sharding_rules=sharding_rules)
    if weights is not None and not abstract:  # restored over the (sharded) initial values, shard by shard
        load_pretrained(model, weights, mesh=mesh, sharding_rules=sharding_rules)
    return model


def create_from_factory(factory: Callable[..., nnx.Module], *, rngs: int | jax.Array | nnx.Rngs = 0,
                        abstract: bool = False, mesh: Mesh | None = None,
                        sharding_rules=sharding.DEFAULT_RULES, jit: bool = False) -> nnx.Module:
    """``factory(rngs=nnx.Rngs(...))`` built concretely, abstractly, or directly sharded over ``mesh``
    (see :func:`create_model`, which calls this for registered names). ``jit``: run the initialisers
    as one compiled program instead of op by op (faster for deep models; values may differ in the
    last bit from the eager build)."""
    key = _rngs_key(rngs)

    def build(k):
        # Initial values use the non-partitionable threefry: the same numbers whatever the mesh, and
        # the init program compiles ~3x faster on XLA:CPU. (Training randomness keeps JAX's default.)
        with jax.threefry_partitionable(False):
            return factory(rngs=nnx.Rngs(params=k, dropout=jax.random.fold_in(k, 1)))

    if mesh is None:
        if abstract:
            return nnx.eval_shape(lambda: build(key))
        if not jit:
            return build(key)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: build(key)))
        return nnx.merge(graphdef, jax.jit(lambda k: nnx.split(build(k))[1])(key))
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: build(key)))   # the shapes first, for the shardings
    shardings = sharding.state_shardings(abstract_state, mesh, sharding_rules)
    if abstract:
        abstract_state = jax.tree.map(
            lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
            abstract_state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
        return nnx.merge(graphdef, abstract_state)
    return nnx.merge(graphdef, jax.jit(lambda k: nnx.split(build(k))[1], out_shardings=shardings)(key))


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (``nnx.Param`` elements); BatchNorm statistics excluded."""
    return int(sum(np.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))))


# ------------------------------------------------------------------------------------------------
# PyTorch weights
# ------------------------------------------------------------------------------------------------
def _key_map_for(model: nnx.Module):
    key_map = getattr(type(model), "torch_key_map", None)
    if key_map is None:
        raise ValueError(f"{type(model).__name__} has no torch_key_map; it cannot load PyTorch weights")
    return key_map


def load_torch_weights(model: nnx.Module, source: str | Path | Mapping[str, Any], *, strict: bool = True,
                       use_ema: bool = False) -> ConversionReport:
    """Load official PyTorch weights into ``model`` in place (concrete, sharded or abstract).

    Args:
      source: a state_dict-like mapping of names to arrays, or a path to a ``.pth``/``.pth.tar``
        (read without torch, with a restricted unpickler), ``.safetensors`` or ``.npz`` file.
        Training checkpoints are unwrapped (``state_dict``/``model``; ``module.`` prefixes dropped).
      strict: raise one :class:`WeightConversionError` listing every missing, unexpected and
        mis-shaped key. With ``strict=False`` the matching tensors are loaded and the report says
        what was skipped.
      use_ema: take ``state_dict_ema`` (timm's EMA weights) instead of ``state_dict``.
    """
    if hasattr(model, "load_state_dict"):   # models with their own name table (the LLaMA decoder: HF names)
        return model.load_state_dict(source, strict=strict)
    obj = torch_to_nnx.read_checkpoint(source) if isinstance(source, (str, Path)) else source
    state_dict = torch_to_nnx.unwrap_state_dict(obj, use_ema=use_ema)
    adapt = getattr(type(model), "adapt_torch_state_dict", None)   # a model's other layouts, its one-line diagnosis
    if adapt is not None:
        state_dict = adapt(model, state_dict, strict=strict)
    return torch_to_nnx.assign_state_dict(model, state_dict, _key_map_for(model), strict=strict)


# ------------------------------------------------------------------------------------------------
# the project's own format (orbax)
# ------------------------------------------------------------------------------------------------
# The variables a weights directory holds: parameters, BatchNorm statistics, and frozen weights
# that cannot be regenerated (Mask Fine-Tuning's, over trained weights). Frozen weights rebuilt
# from a seed (PEMN) are not stored; a manifest of how they were generated is, and is checked.
_FROZEN_MANIFEST = "frozen_weights.json"


_STORED = (nnx.Param, nnx.BatchStat, masked.is_stored_frozen)


def _frozen_manifest(model: nnx.Module) -> dict:
    """The manifest of ``model``'s regenerable frozen weights ({} when it has none)."""
    regenerable = nnx.state(model, masked.is_regenerable)
    if not jax.tree.leaves(regenerable):
        return {}
    if any(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(regenerable)):
        raise ValueError(f"{type(model).__name__} regenerates its frozen weights from a seed; create it "
                         f"concretely (not abstract=True) to save or load its weights")
    return masked.frozen_manifest({"model": regenerable})


def save_weights(model: nnx.Module, path: str | Path) -> Path:
    """Save parameters, BatchNorm statistics and stored frozen weights as an orbax checkpoint directory.

    Frozen weights that the model regenerates from a seed (PEMN) are only recorded (seed, strategy,
    digest in ``frozen_weights.json``) and checked by :func:`load_weights`. The directory must not
    exist yet; converting an official checkpoint is then a one-time step.
    """
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose a new directory for the weights")
    manifest = _frozen_manifest(model)
    state = nnx.to_pure_dict(nnx.state(model, _STORED))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, state)
        ckptr.wait_until_finished()
    if manifest and jax.process_index() == 0:
        (path / _FROZEN_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return path


def load_pretrained(model: nnx.Module, path: str | Path, *, strict: bool = True, use_ema: bool = False,
                    mesh: Mesh | None = None, sharding_rules=sharding.DEFAULT_RULES) -> ConversionReport | None:
    """Weights in either format into ``model``: a :func:`save_weights` directory (:func:`load_weights`,
    ``mesh`` and ``sharding_rules`` apply) or an official PyTorch checkpoint file
    (:func:`load_torch_weights`, ``strict`` and ``use_ema`` apply). ``path`` may also be a hub id
    such as ``"hf-hub:timm/starnet_s1.in1k"``: its ``model.safetensors`` (timm's key names) from the
    local Hugging Face cache (:func:`lib.hub.resolve`; downloaded only when allowed). Returns the
    PyTorch conversion report, or None for a directory."""
    if hasattr(model, "open_checkpoint"):   # a model with its own checkpoint format (LLaMA: HF dirs, GGUF)
        p = Path(path)
        if p.suffix == ".gguf" or (p / "config.json").exists() or not p.exists():
            return model.load_state_dict(model.open_checkpoint(path), strict=strict)
    if isinstance(path, str) and path.startswith("hf-hub:"):
        from lib import hub
        path = hub.resolve(path, filename="model.safetensors")
    path = Path(path)
    if path.is_dir():
        load_weights(model, path, mesh=mesh, sharding_rules=sharding_rules)
        return None
    return load_torch_weights(model, path, strict=strict, use_ema=use_ema)


def load_weights(model: nnx.Module, path: str | Path, *, mesh: Mesh | None = None,
                 sharding_rules=sharding.DEFAULT_RULES) -> nnx.Module:
    """Restore :func:`save_weights` output into ``model`` (which may be abstract, unless it regenerates
    frozen weights from a seed); returns it.

    With ``mesh`` the arrays are restored directly into their shards; without, each array keeps the
    placement the model already has (a model created sharded stays sharded), and arrays of an
    abstract model land on the first device.
    """
    import orbax.checkpoint as ocp
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"weights directory not found: {path}")
    manifest_file = path / _FROZEN_MANIFEST
    regenerated = _frozen_manifest(model)
    if regenerated or manifest_file.exists():   # before anything is restored: a mismatch changes nothing
        saved = json.loads(manifest_file.read_text()) if manifest_file.exists() else {}
        masked.check_frozen_manifest(saved, regenerated, where="weights directory")
    graphdef, state, rest = nnx.split(model, _STORED, ...)
    if mesh is not None:
        shardings = sharding.state_shardings(state, mesh, sharding_rules)
    else:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def current(v):
            placed = getattr(v.get_value(), "sharding", None)
            return placed if isinstance(placed, jax.sharding.Sharding) else one
        shardings = jax.tree.map(current, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    target = nnx.to_pure_dict(jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                                           state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(path, target)
        except ValueError as e:
            raise WeightConversionError(f"{path} does not hold weights for {type(model).__name__}: {e}") from e
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model
