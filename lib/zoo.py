"""The model zoo: one registry for every model of every project, timm-style.

    from lib import zoo
    zoo.list_models("starnet_*")
    model = zoo.create_model("starnet_s1", num_classes=1000, rngs=0)
    zoo.load_torch_weights(model, "starnet_s1.pth.tar")     # official checkpoint, no torch needed
    zoo.save_weights(model, "/ckpt/starnet_s1")             # the project's own format (orbax)
    model = zoo.create_model("starnet_s1", weights="/ckpt/starnet_s1")   # either format

Models take float32 NHWC images and return logits; ``model.eval()`` / ``model.train()`` switch
BatchNorm and DropPath. Projects register their models with :func:`register_model`; the
registry is filled by importing the project modules listed in ``_PROJECT_MODULES``.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lib import sharding
from lib.convert import torch_to_nnx
from lib.convert.torch_to_nnx import ConversionReport, WeightConversionError  # noqa: F401 (re-export)
from lib.layers import masked

# Project modules whose import registers models. A new paper adds its models module here.
_PROJECT_MODULES = ("projects.starnet.models", "projects.efficientmod.models", "projects.coc.models",
                    "projects.fcvit.models", "projects.pemn.models")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    factory: Callable[..., nnx.Module]
    key_map: Callable[[str], str | None] | None   # torch module path -> NNX module path
    input_size: tuple[int, ...]                   # (H, W, C) a model expects, or (features,)
    pretrained: str | None                        # where official weights come from, if any


_REGISTRY: dict[str, ModelInfo] = {}
_loaded = False


def register_model(name: str, factory: Callable[..., nnx.Module], *, key_map=None,
                   input_size: tuple[int, ...] = (224, 224, 3), pretrained: str | None = None) -> None:
    """Register ``factory(num_classes=..., rngs=nnx.Rngs, **overrides) -> nnx.Module``."""
    if name != name.lower():
        raise ValueError(f"model names are lowercase, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelInfo(name, factory, key_map, tuple(input_size), pretrained)


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _PROJECT_MODULES:
            importlib.import_module(module)


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
        raise ValueError(f"unknown model {name!r}.{hint} See lib.zoo.list_models() for all "
                         f"{len(_REGISTRY)} models.")
    return _REGISTRY[name]


def _rngs_key(rngs: int | jax.Array | nnx.Rngs) -> jax.Array:
    if isinstance(rngs, nnx.Rngs):
        return rngs.params()
    if isinstance(rngs, (int, np.integer)):
        return jax.random.key(int(rngs))
    return rngs


def create_model(name: str, *, num_classes: int = 1000, rngs: int | jax.Array | nnx.Rngs = 0,
                 abstract: bool = False, mesh: Mesh | None = None,
                 sharding_rules=sharding.DEFAULT_RULES, weights: str | Path | None = None,
                 **overrides) -> nnx.Module:
    """Build a registered model.

    Args:
      num_classes: size of the classifier; 0 gives a backbone returning pooled features.
      rngs: an int seed, a key or an ``nnx.Rngs`` (its ``params`` stream gives the init key;
        DropPath streams are derived from the same key).
      abstract: return the model with ``jax.ShapeDtypeStruct`` leaves (shapes only, no memory);
        with ``mesh``, the structs carry the shardings the parameters would have.
      mesh: create the parameters directly sharded over ``mesh`` (per ``sharding_rules``), so a
        large model never exists whole on one device.
      weights: a directory written by :func:`save_weights` (restored straight into the sharded
        parameters) or an official PyTorch checkpoint file, loaded strictly (:func:`load_pretrained`).
      **overrides: model constructor arguments, e.g. ``drop_path_rate=0.1`` or ``dtype=jnp.bfloat16``.
    """
    info = model_info(name)
    key = _rngs_key(rngs)

    def build(k):
        # Initial values use the non-partitionable threefry: the same numbers whatever the mesh, and
        # the init program compiles ~3x faster on XLA:CPU. (Training randomness keeps JAX's default.)
        with jax.threefry_partitionable(False):
            return info.factory(num_classes=num_classes, rngs=nnx.Rngs(params=k, dropout=jax.random.fold_in(k, 1)),
                                **overrides)

    abstract_model = nnx.eval_shape(lambda: build(key))
    graphdef, abstract_state = nnx.split(abstract_model)
    shardings = sharding.state_shardings(abstract_state, mesh, sharding_rules) if mesh is not None else None
    if abstract:
        if shardings is not None:
            abstract_state = jax.tree.map(
                lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                abstract_state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
        return nnx.merge(graphdef, abstract_state)
    if mesh is None:
        model = build(key)
    else:
        model = nnx.merge(graphdef, jax.jit(lambda k: nnx.split(build(k))[1], out_shardings=shardings)(key))
    if weights is not None:  # restored over the (sharded) initial values, shard by shard
        load_pretrained(model, weights, mesh=mesh, sharding_rules=sharding_rules)
    return model


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
    obj = torch_to_nnx.read_checkpoint(source) if isinstance(source, (str, Path)) else source
    state_dict = torch_to_nnx.unwrap_state_dict(obj, use_ema=use_ema)
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
    (:func:`load_torch_weights`, ``strict`` and ``use_ema`` apply). Returns the PyTorch conversion
    report, or None for a directory."""
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
