"""PyTorch state_dict -> NNX model, with strict, all-at-once error reporting.

A project supplies only a *key map*: a function from a torch key prefix (the module path, e.g.
``stages.0.1.f1.conv``) to the NNX module path (``stages.0.blocks.0.f1.conv``). Everything else is
generic:

* leaf names: ``weight`` -> ``kernel`` (conv/linear) or ``scale`` (norms), ``running_mean`` ->
  ``mean``, ``running_var`` -> ``var``, anything else (``bias``, ``gamma``, ...) unchanged;
  ``num_batches_tracked`` is dropped;
* layouts: conv ``[O, I/g, kh, kw] -> [kh, kw, I/g, O]``; linear ``[O, I] -> [I, O]``; a 1x1 conv
  into a linear ``[O, I, 1, 1] -> [I, O]``; everything else as is;
* checks: every torch key must land on a parameter of identical shape and every parameter must be
  written; all violations are reported together in one :class:`WeightConversionError`.

The target model may be concrete or abstract (``nnx.eval_shape``); arrays are placed with the
target's sharding, so a model created sharded under a mesh is filled shard-wise, never built whole.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

KeyMap = Callable[[str], str | None]
_LEAF_RENAMES = {"running_mean": "mean", "running_var": "var"}
_IGNORED_LEAVES = ("num_batches_tracked",)


class WeightConversionError(ValueError):
    """A state_dict does not fit a model; the message lists every problem at once."""


@dataclasses.dataclass
class ConversionReport:
    loaded: list[str]
    missing: list[str]            # model parameters no torch key wrote
    unexpected: list[str]         # torch keys with no matching parameter
    mismatched: list[str]         # "key: torch shape -> expected shape"

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 50) -> str:
        lines = []
        for title, items in (("missing (in the model, not in the checkpoint)", self.missing),
                             ("unexpected (in the checkpoint, not in the model)", self.unexpected),
                             ("shape mismatch", self.mismatched)):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines += [f"  {i}" for i in items[:limit]]
                if len(items) > limit:
                    lines.append(f"  ... and {len(items) - limit} more")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def read_checkpoint(path) -> Any:
    """Read ``.pth``/``.pth.tar``/``.bin`` (no torch needed), ``.safetensors`` or ``.npz``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    name = path.name.lower()
    if name.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return load_file(str(path))
    if name.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if name.endswith((".pth", ".pth.tar", ".pt", ".bin", ".tar", ".ckpt")):
        from lib.convert.torch_pickle import load_torch_file
        return load_torch_file(path)
    raise ValueError(f"{path}: unknown checkpoint format; expected .pth, .pth.tar, .pt, .bin, "
                     f".safetensors or .npz")


def unwrap_state_dict(obj: Any, *, use_ema: bool = False) -> dict[str, np.ndarray]:
    """Find the state_dict inside a training checkpoint and strip DDP's ``module.`` prefix.

    Looks for ``state_dict_ema`` (only when ``use_ema``), ``state_dict``, ``model``, else takes
    ``obj`` itself as the state_dict.
    """
    if not isinstance(obj, Mapping):
        raise WeightConversionError(f"expected a state_dict (a mapping of names to arrays), got {type(obj).__name__}")
    if use_ema:
        if "state_dict_ema" not in obj:
            raise WeightConversionError(f"use_ema=True but the checkpoint has no 'state_dict_ema' "
                                        f"(top-level keys: {sorted(obj)[:10]})")
        obj = obj["state_dict_ema"]
    elif "state_dict" in obj:
        obj = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    sd = {str(k): v for k, v in obj.items()}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    not_arrays = [k for k, v in sd.items() if not hasattr(v, "shape")]
    if not_arrays:
        raise WeightConversionError(f"state_dict entries that are not arrays: {not_arrays[:10]}")
    return sd


# ------------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------------
def _path_str(path) -> str:
    return ".".join(str(getattr(p, "key", p)) for p in path)


def _transform(name: str, src: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    if name == "kernel" and src.ndim == 4 and len(target_shape) == 4:
        return src.transpose(2, 3, 1, 0)                     # OIHW -> HWIO
    if name == "kernel" and src.ndim == 2 and len(target_shape) == 2:
        return src.T                                         # [out, in] -> [in, out]
    if name == "kernel" and src.ndim == 4 and len(target_shape) == 2 and src.shape[2:] == (1, 1):
        return src[:, :, 0, 0].T                             # 1x1 conv stored into a linear
    return src


def assign_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], key_map: KeyMap,
                      *, strict: bool = True) -> ConversionReport:
    """Write a (unwrapped) torch state_dict into ``model`` in place; see the module docstring."""
    targets: dict[str, nnx.Variable] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        targets[_path_str(path)] = var
    written, unexpected, mismatched, loaded = set(), [], [], []
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in _IGNORED_LEAVES:
            continue
        module_path = key_map(prefix) if prefix else ""
        if module_path is None:
            unexpected.append(key)
            continue
        candidates = ([f"{module_path}.kernel", f"{module_path}.scale"] if leaf == "weight"
                      else [f"{module_path}.{_LEAF_RENAMES.get(leaf, leaf)}"])
        candidates = [c.lstrip(".") for c in candidates]
        target = next((c for c in candidates if c in targets), None)
        if target is None:
            unexpected.append(key)
            continue
        var = targets[target]
        src = np.asarray(value)
        arr = _transform(target.rpartition(".")[2], src, tuple(var.shape))
        if tuple(arr.shape) != tuple(var.shape):
            mismatched.append(f"{key} {tuple(src.shape)} -> {target} expects {tuple(var.shape)}")
            continue
        written.add(target)
        loaded.append(key)
        current = var.get_value() if hasattr(var, "get_value") else var.value
        sharding = getattr(current, "sharding", None)
        new = np.asarray(arr, dtype=current.dtype)
        var.set_value(jax.device_put(new, sharding) if sharding is not None else jax.numpy.asarray(new))
    missing = [t for t in targets if t not in written]
    report = ConversionReport(loaded, missing, unexpected, mismatched)
    if strict and not report.ok:
        raise WeightConversionError(
            f"the checkpoint does not match {type(model).__name__} "
            f"({len(loaded)} tensors matched):\n{report.summary()}")
    return report
