"""HF checkpoints in and out: the one table between HF tensor names and the decoder's parameters.

Loading fills a concrete, sharded or abstract model (``lib.zoo.create_model(..., abstract=True,
mesh=...)``) one HF tensor at a time: each tensor is read (from safetensors, memory-mapped, or
dequantized from GGUF), transformed to the kernel layout, and placed with its parameter's sharding
through ``jax.make_array_from_callback``, so only the slices a process's devices hold are copied to
them and the model is never whole on one host. Every missing, unexpected and mis-shaped key is
reported at once (:class:`lib.convert.torch_to_nnx.WeightConversionError`), before anything is
written into the model.

Exporting writes what transformers' ``LlamaForCausalLM.from_pretrained`` reads: ``config.json``,
``generation_config.json``, sharded ``model-0000k-of-0000n.safetensors`` with
``model.safetensors.index.json`` (``format: pt`` metadata), and the tokenizer files. It writes into a
temporary directory beside the target and renames it into place at the end, so a failed export
leaves an existing directory untouched.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from lib.convert.torch_to_nnx import ConversionReport, WeightConversionError
from lib.models.llama.model import Llama

# HF per-layer tensor -> (module path inside a DecoderLayer, kind). "linear": torch [out, in].
_LAYER_TENSORS = {
    "input_layernorm.weight": ("input_layernorm.scale", "vector"),
    "post_attention_layernorm.weight": ("post_attention_layernorm.scale", "vector"),
    **{f"self_attn.{p}.weight": (f"self_attn.{p}.kernel", "linear") for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"mlp.{p}.weight": (f"mlp.{p}.kernel", "linear") for p in ("gate_proj", "up_proj", "down_proj")},
}
# Keys older checkpoints carry that hold no parameter.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


class TensorSource(Protocol):
    """What the loader reads: HF names, shapes, and one tensor at a time as NumPy."""

    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...


class MappingSource:
    """A dict of arrays as a :class:`TensorSource`."""

    def __init__(self, tensors: Mapping[str, Any]):
        self._t = tensors

    def keys(self):
        return list(self._t)

    def shape(self, name):
        return tuple(np.shape(self._t[name]))

    def get(self, name):
        return np.asarray(self._t[name])


class SafetensorsSource:
    """An HF safetensors checkpoint: one ``*.safetensors`` file, or a directory with
    ``model.safetensors`` or ``model.safetensors.index.json`` and its shards (memory-mapped)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open
        path = Path(path)
        if path.is_file():
            files = {None: path}
            weight_map = None
        elif (path / "model.safetensors.index.json").exists():
            index = json.loads((path / "model.safetensors.index.json").read_text())
            weight_map = index["weight_map"]
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (path / n).exists()]
            if missing:
                raise FileNotFoundError(f"{path}: model.safetensors.index.json names shards that are not there: "
                                        f"{missing}")
            files = {n: path / n for n in names}
        elif (path / "model.safetensors").exists():
            files, weight_map = {None: path / "model.safetensors"}, None
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                    "(an HF checkpoint directory was expected)")
        self._files = {n: safe_open(str(f), framework="np") for n, f in files.items()}
        if weight_map is None:
            (handle,) = self._files.values()
            self._where = {k: None for k in handle.keys()}
        else:
            self._where = dict(weight_map)
            for name, handle in self._files.items():   # the index must agree with the shards
                listed = {k for k, v in weight_map.items() if v == name}
                absent = sorted(listed - set(handle.keys()))
                if absent:
                    raise ValueError(f"{path / name}: lacks {len(absent)} tensors the index lists, e.g. {absent[:3]}")

    def keys(self):
        return list(self._where)

    def shape(self, name):
        return tuple(self._files[self._where[name]].get_slice(name).get_shape())

    def get(self, name):
        return self._files[self._where[name]].get_tensor(name)


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Target:
    path: str                 # the parameter's path in the model ("model.blocks.0.layer.mlp.up_proj.kernel")
    variable: nnx.Variable
    layer: int | None         # index along the stack's layers axis, or None
    kind: str                 # "vector" / "embedding": as is; "linear": torch [out, in] -> kernel
    num_in: int = 1           # leading kernel dims that are the input (Projection.num_in)

    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.variable.get_value().shape)
        return shape[1:] if self.layer is not None else shape

    def hf_shape(self) -> tuple[int, ...]:
        shape = self.shape()
        if self.kind != "linear":
            return shape
        return (int(np.prod(shape[self.num_in:])), int(np.prod(shape[:self.num_in])))

    def to_param(self, tensor: np.ndarray) -> np.ndarray:
        return tensor.T.reshape(self.shape()) if self.kind == "linear" else tensor

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        if self.kind != "linear":
            return value
        return value.reshape(self.hf_shape()[1], self.hf_shape()[0]).T


def _module(root, dotted: str):
    for part in dotted.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def hf_targets(model: Llama) -> dict[str, _Target]:
    """Every HF tensor name the model has, with the parameter (and layer slot) it lives in."""
    cfg = model.config
    table: dict[str, _Target] = {
        "model.embed_tokens.weight": _Target("model.embed_tokens.embedding", model.model.embed_tokens.embedding,
                                             None, "embedding"),
        "model.norm.weight": _Target("model.norm.scale", model.model.norm.scale, None, "vector"),
    }
    if not cfg.tie_word_embeddings:
        table["lm_head.weight"] = _Target("lm_head.kernel", model.lm_head.kernel, None, "linear", 1)
    for s, stack in enumerate(model.model.blocks):
        for i in range(stack.count):
            for hf_leaf, (path, kind) in _LAYER_TENSORS.items():
                module_path, _, leaf = path.rpartition(".")
                module = _module(stack.layer, module_path)
                num_in = getattr(module, "num_in", 1)
                table[f"model.layers.{stack.first + i}.{hf_leaf}"] = _Target(
                    f"model.blocks.{s}.layer.{path}", getattr(module, leaf), i, kind, num_in)
                if kind == "linear" and hasattr(module, "scores"):   # Mask Fine-Tuning's scores, as upstream names them
                    table[f"model.layers.{stack.first + i}.{hf_leaf[:-len('weight')]}scores"] = _Target(
                        f"model.blocks.{s}.layer.{module_path}.scores", module.scores, i, kind, num_in)
    return table


def _check(model: Llama, source: TensorSource, targets: dict[str, _Target]) -> ConversionReport:
    keys = [k for k in source.keys() if not _IGNORED.fullmatch(k)]
    if model.config.tie_word_embeddings and "lm_head.weight" in keys:
        keys.remove("lm_head.weight")   # some tied checkpoints store the copy anyway
    unexpected = sorted((k for k in keys if k not in targets), key=_natural)
    missing = sorted((k for k in targets if k not in set(keys)), key=_natural)
    mismatched = []
    for k in keys:
        if k in targets and tuple(source.shape(k)) != targets[k].hf_shape():
            mismatched.append(f"{k}: checkpoint {tuple(source.shape(k))}, model expects {targets[k].hf_shape()}")
    loaded = [k for k in keys if k in targets]
    return ConversionReport(loaded, missing, unexpected, mismatched)


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _sharding_of(value) -> jax.sharding.Sharding:
    s = getattr(value, "sharding", None)
    return s if s is not None else SingleDeviceSharding(jax.devices()[0])


def _layer_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer's slice of a stacked parameter (the layers axis dropped)."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
    return sharding


def load_state_dict(model: Llama, source: TensorSource | Mapping[str, Any], *, strict: bool = True
                    ) -> ConversionReport:
    """Write HF-named tensors into ``model`` (concrete, sharded or abstract) in place.

    ``source``: a mapping of HF names to arrays, or a :class:`TensorSource` (safetensors, GGUF).
    With ``strict`` (default) any missing, unexpected or mis-shaped key raises one
    :class:`WeightConversionError` listing all of them, before any parameter is written.
    """
    if isinstance(source, Mapping):
        source = MappingSource(source)
    targets = hf_targets(model)
    report = _check(model, source, targets)
    if strict and not report.ok:
        raise WeightConversionError(f"the checkpoint does not match {type(model).__name__} "
                                    f"({len(report.loaded)} tensors matched):\n{report.summary()}")
    bad = {m.split(":")[0] for m in report.mismatched}
    by_variable: dict[int, list[tuple[str, _Target]]] = {}
    for k in report.loaded:
        if k not in bad:
            by_variable.setdefault(id(targets[k].variable), []).append((k, targets[k]))
    for entries in by_variable.values():
        var = entries[0][1].variable
        current = var.get_value()
        sharding, dtype = _sharding_of(current), current.dtype
        if entries[0][1].layer is None:
            (k, t), = entries
            var.set_value(_place(t.to_param(source.get(k)), tuple(current.shape), sharding, dtype))
            continue
        # A stacked parameter. On one device: stacked on the host, then copied. Sharded: each layer's
        # slice placed with the layer sharding (the host holds one tensor), then stacked on device.
        count = current.shape[0]
        layers = {t.layer: (k, t) for k, t in entries}
        old = None
        if len(layers) != count and not isinstance(current, jax.ShapeDtypeStruct):
            old = np.asarray(jax.device_get(current))   # non-strict load with layers missing: keep theirs

        def layer_value(i):
            if i in layers:
                k, t = layers[i]
                return np.asarray(t.to_param(source.get(k))).astype(dtype)
            return old[i] if old is not None else np.zeros(current.shape[1:], dtype)

        if not isinstance(sharding, NamedSharding) or sharding.num_devices == 1:
            var.set_value(jax.device_put(np.stack([layer_value(i) for i in range(count)]), sharding))
            continue
        layer_sharding = _layer_sharding(sharding)
        slices = [_place(layer_value(i), tuple(current.shape[1:]), layer_sharding, dtype) for i in range(count)]
        var.set_value(_stacker(sharding)(*slices))
    return report


@functools.lru_cache(maxsize=64)
def _stacker(sharding):
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


def _place(array: np.ndarray, shape: tuple[int, ...], sharding, dtype) -> jax.Array:
    array = np.asarray(array)
    if array.dtype != dtype:
        array = array.astype(dtype)
    assert array.shape == shape, (array.shape, shape)
    return jax.make_array_from_callback(shape, sharding, lambda index: array[index])


# ------------------------------------------------------------------------------------------------
# out
# ------------------------------------------------------------------------------------------------
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def hf_state_dict(model: Llama, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """The model's tensors under their HF names, one at a time, as NumPy (``[out, in]`` linears).

    A stacked parameter is fetched one layer's slice at a time, so the host holds one tensor.
    """
    cast = _DTYPES[dtype] if dtype else None
    targets = hf_targets(model)
    for key in sorted(targets, key=_natural):
        t = targets[key]
        value = t.variable.get_value()
        value = np.asarray(jax.device_get(value[t.layer] if t.layer is not None else value))
        out = np.ascontiguousarray(t.to_hf(value))
        yield key, out.astype(cast) if cast is not None else out


_ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")


def _check_target(directory: Path, config: Mapping[str, Any], overwrite: bool) -> None:
    """An existing, non-empty ``directory`` is replaced only when it holds a checkpoint of the same
    architecture (a re-export), or when ``overwrite`` says so; anything else is one clear error."""
    if overwrite or not directory.exists() or not any(directory.iterdir()):
        return
    existing = directory / "config.json"
    if not existing.exists():
        raise FileExistsError(f"{directory} exists and is not an HF checkpoint (no config.json); refusing to "
                              "replace it (pass overwrite=True, or choose an empty directory)")
    old = json.loads(existing.read_text())
    differ = {k: (old.get(k), config.get(k)) for k in _ARCH_KEYS if old.get(k) != config.get(k)}
    if differ:
        raise FileExistsError(f"{directory} holds a different model ({', '.join(f'{k}: {a} there, {b} here' for k, (a, b) in differ.items())}); "
                              "refusing to replace it (pass overwrite=True, or choose another directory)")


def write_checkpoint(directory: str | Path, tensors: Iterable[tuple[str, np.ndarray]], *, config: Mapping[str, Any],
                     generation_config: Mapping[str, Any] | None = None, tokenizer=None,
                     max_shard_bytes: int = 3 * 2 ** 30, overwrite: bool = False,
                     extra_files: Mapping[str, Callable[[Path], None]] | None = None) -> Path:
    """Write HF-named tensors (streamed: one shard in memory at a time) as an HF checkpoint directory:
    ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` + index (``format: pt``),
    ``config.json``, ``generation_config.json``, tokenizer files and ``extra_files``
    (``{name: writer(path)}``).

    Everything is written into a temporary directory beside ``directory`` and renamed into place at
    the end, so a failure leaves what was there untouched. An existing non-empty directory is only
    replaced by a checkpoint of the same architecture, unless ``overwrite``.
    """
    from safetensors.numpy import save_file
    directory = Path(directory)
    _check_target(directory, config, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        weight_map, shard, shard_bytes, shard_files, total = {}, {}, 0, [], 0

        def flush():
            nonlocal shard, shard_bytes
            if shard:
                name = f"shard-{len(shard_files):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata={"format": "pt"})
                shard_files.append((name, list(shard)))
                shard, shard_bytes = {}, 0

        for key, value in tensors:
            if shard and shard_bytes + value.nbytes > max_shard_bytes:
                flush()
            shard[key] = value
            shard_bytes += value.nbytes
            total += value.nbytes
        flush()
        n = len(shard_files)
        for i, (name, keys) in enumerate(shard_files):   # HF's names need the shard count
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp / name, tmp / final)
            weight_map.update({k: final for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": dict(sorted(weight_map.items(), key=lambda kv: _natural(kv[0])))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(dict(config), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(dict(generation_config or {}), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def generation_config_of(cfg, extra: Mapping[str, Any] | None = None) -> dict:
    gen = dict(extra or {})
    gen.setdefault("_from_model_config", True)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(cfg, key)
        if value is not None:
            gen.setdefault(key, list(value) if isinstance(value, tuple) else value)
    return gen


def export_hf(model: Llama, directory: str | Path, tokenizer=None, dtype: str = "bfloat16", *,
              max_shard_bytes: int = 3 * 2 ** 30, generation_config: Mapping[str, Any] | None = None,
              overwrite: bool = False, extra_files=None) -> Path:
    """Write ``model`` as an HF LLaMA checkpoint directory that transformers loads unchanged
    (see :func:`write_checkpoint`: atomic, never replaces a different model unless ``overwrite``)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
    return write_checkpoint(directory, hf_state_dict(model, dtype), config=model.config.to_hf(dtype),
                            generation_config=generation_config_of(model.config, generation_config),
                            tokenizer=tokenizer, max_shard_bytes=max_shard_bytes, overwrite=overwrite,
                            extra_files=extra_files)
