"""Streamed merges of LLaMA-family checkpoints (HF directories or GGUF files), tensor by tensor.

    from lib import merge
    merge.merge_checkpoints(["A", "B", "C.gguf"], "OUT", method="ties", base="BASE", weights=[1, 1, 1],
                            density=0.5)
    python -m projects.souplm.merge --method ties --models A B C --base BASE --out OUT --density 0.5

Every input is opened lazily (``lib.models.llama.open_checkpoint``: safetensors memory-mapped, GGUF
dequantized one tensor at a time); for each HF tensor name the K (and base) tensors are read,
merged in float32 NumPy and handed to ``lib.models.llama.hf.write_checkpoint``, which writes
shards of at most ``max_shard_bytes`` and renames the result into place at the end. Peak host
memory: the K + 1 input tensors of one name, their float32 copies and one output shard.

Methods (mergekit's semantics, per tensor; ``w`` = the models' weights, ``d_i = x_i - base``):

* ``linear``: ``sum_i w_i x_i``; the weights must sum to 1 (the paper's vanilla soup) unless
  ``normalize=True`` (mergekit's default), which divides by ``sum w``.
* ``uniform``: linear with ``w_i = 1/K``.
* ``task_arithmetic``: ``base + lambda * sum_i w_i d_i`` (mergekit: no normalisation).
* ``ties``: each ``d_i`` keeps its top ``density`` fraction by magnitude (``int(density * n)``
  entries; mergekit's ``magnitude`` sparsification), ``D_i = w_i d_i``; the elected sign per entry is
  ``sign(sum_i D_i)`` (0 counts as +); ``base + lambda * sum_i D_i m_i / sum_i w_i m_i`` with
  ``m_i = [sign(D_i) == elected]`` (divisor 0 -> 1), i.e. mergekit's ``ties`` (normalize=True).
* ``slerp``: exactly 2 models, the first being ``base``'s side (mergekit: the base model is v0):
  the whole tensors are normalised, ``theta = arccos(dot)``; ``|dot| > 0.9995`` falls back to lerp;
  ``sin((1-t) theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1`` on the unnormalised tensors.
* ``soup``: a learned soup baked from its alphas file (``projects.souplm.train`` writes
  ``soup_weights.json``): every tensor mixed with the weights of its group, per layer for
  stacked groups (``[K, L]``).

Bad input is refused before any tensor is read or anything written (:class:`MergeError`, one error
listing every problem): inputs of different architectures (config keys, tensor names or shapes),
different tokenizers, weights that do not match the number of models or (linear) do not sum to 1,
an output directory that exists and is not empty (unless ``overwrite``), an output that is one of
the inputs.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

METHODS = ("linear", "uniform", "task_arithmetic", "ties", "slerp", "soup")
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "head_dim", "rms_norm_eps",
             "rope_theta")


class MergeError(ValueError):
    """Inputs that cannot be merged as asked (raised before any work)."""


# ------------------------------------------------------------------------------------------------
# per-tensor methods (NumPy, float32)
# ------------------------------------------------------------------------------------------------
def linear(tensors: Sequence[np.ndarray], weights: Sequence[float], *, normalize: bool = False) -> np.ndarray:
    w = np.asarray(weights, np.float32)
    out = sum(np.float32(wi) * np.asarray(t, np.float32) for wi, t in zip(w, tensors))
    return out / np.float32(w.sum()) if normalize else out


def task_arithmetic(base: np.ndarray, tensors, weights, *, lam: float = 1.0) -> np.ndarray:
    base = np.asarray(base, np.float32)
    mixed = sum(np.float32(w) * (np.asarray(t, np.float32) - base) for w, t in zip(weights, tensors))
    return base + np.float32(lam) * mixed


def magnitude_prune(delta: np.ndarray, density: float) -> np.ndarray:
    """Keep the ``int(density * n)`` largest-magnitude entries (mergekit's ``magnitude``)."""
    if density >= 1:
        return delta
    k = int(density * delta.size)
    if k <= 0:
        raise MergeError(f"density={density} keeps no entry of a tensor of {delta.size}")
    flat = delta.reshape(-1)
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def ties(base: np.ndarray, tensors, weights, *, density: float = 1.0, lam: float = 1.0) -> np.ndarray:
    base = np.asarray(base, np.float32)
    deltas = np.stack([magnitude_prune(np.asarray(t, np.float32) - base, density) for t in tensors])
    w = np.asarray(weights, np.float32).reshape((-1,) + (1,) * base.ndim)
    weighted = deltas * w
    elected = np.where(weighted.sum(0) >= 0, np.float32(1), np.float32(-1))
    mask = (np.sign(weighted) == elected).astype(np.float32)
    divisor = (w * mask).sum(0)
    divisor[divisor == 0] = 1
    return base + np.float32(lam) * (weighted * mask).sum(0) / divisor


def slerp(t: float, v0: np.ndarray, v1: np.ndarray, *, dot_threshold: float = 0.9995, eps: float = 1e-8) -> np.ndarray:
    v0, v1 = np.asarray(v0, np.float32), np.asarray(v1, np.float32)

    def unit(v):
        n = np.linalg.norm(v)
        return v / n if n > eps else v
    dot = np.sum(unit(v0) * unit(v1))
    if np.abs(dot) > dot_threshold:
        return (1 - t) * v0 + t * v1
    theta = np.arccos(dot)
    s = np.sin(theta)
    return (np.sin(theta - theta * t) / s) * v0 + (np.sin(theta * t) / s) * v1


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------
class _Input:
    def __init__(self, path):
        from lib.models.llama import open_checkpoint
        from lib.text.tokenizer import Tokenizer
        self.path = Path(path)
        self.config, self.source, _ = open_checkpoint(path, tokenizer=False)
        self.names = list(self.source.keys())
        self.tokenizer = None   # a checkpoint without one (tiny test models) merges with others without
        if self.path.suffix == ".gguf":
            if self.source.metadata.get("tokenizer.ggml.model") is not None:
                self.tokenizer = Tokenizer(*self.source.tokenizer_parts())
        elif (self.path / "tokenizer.json").exists():
            self.tokenizer = Tokenizer.from_pretrained(self.path)

    def vocab(self):
        if self.tokenizer is None:
            return None
        return (self.tokenizer.backend.get_vocab(with_added_tokens=True),)

    def close(self):
        close = getattr(self.source, "close", None)
        if close:
            close()


def _ignored(name: str) -> bool:
    return bool(re.fullmatch(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", name))


def _check_inputs(inputs: Sequence[_Input], labels: Sequence[str]) -> None:
    problems = []
    ref = inputs[0]
    ref_names = {n for n in ref.names if not _ignored(n)}
    for inp, label in zip(inputs[1:], labels[1:]):
        for k in ARCH_KEYS:
            a, b = ref.config.get(k), inp.config.get(k)
            if a != b and not (k in ("head_dim", "rope_theta", "rms_norm_eps") and (a is None or b is None)):
                problems.append(f"{label}: config {k}={b!r}, {labels[0]} has {a!r}")
        names = {n for n in inp.names if not _ignored(n)}
        for n in sorted(ref_names - names):
            problems.append(f"{label}: lacks tensor {n}")
        for n in sorted(names - ref_names):
            problems.append(f"{label}: has extra tensor {n}")
        for n in sorted(names & ref_names):
            if tuple(ref.source.shape(n)) != tuple(inp.source.shape(n)):
                problems.append(f"{label}: {n} is {tuple(inp.source.shape(n))}, {labels[0]} has "
                                f"{tuple(ref.source.shape(n))}")
        va, vb = ref.vocab(), inp.vocab()
        if (va is None) != (vb is None):
            problems.append(f"{label}: {'no tokenizer' if vb is None else 'a tokenizer'}, {labels[0]} has "
                            f"{'none' if va is None else 'one'}")
        elif va is not None and va != vb:
            diff = set(va[0].items()) ^ set(vb[0].items())
            problems.append(f"{label}: a different tokenizer than {labels[0]} ({len(diff)} vocabulary entries "
                            f"differ, e.g. {sorted(diff)[:3]})")
    if problems:
        raise MergeError(f"cannot merge: {len(problems)} problem(s):\n  " + "\n  ".join(problems))


def _check_out(out: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    for p in inputs:
        if out.resolve() == Path(p).resolve():
            raise MergeError(f"the output {out} is one of the inputs")
    if out.exists() and not overwrite:
        if out.is_file() or any(out.iterdir()):
            raise MergeError(f"{out} already exists and is not empty; refusing to replace it "
                             "(choose a new directory or pass overwrite)")


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def load_soup_weights(path) -> dict:
    """A learned soup's weights file (``soup_weights.json``, see ``projects.souplm.train``)."""
    d = json.loads(Path(path).read_text())
    for k in ("num_experts", "groups", "variables"):
        if k not in d:
            raise MergeError(f"{path}: not a soup weights file (no {k!r})")
    return d


def _soup_table(config: dict, soup: dict) -> dict[str, tuple[np.ndarray, int | None]]:
    """HF tensor name -> (weights [K] or [K, L], layer column or None) from a soup weights file."""
    from lib.models import llama
    from lib.models.llama.hf import hf_targets
    model = llama.from_config(config, abstract=True)
    table = {}
    missing = []
    for name, t in hf_targets(model).items():
        path = t.path.replace(".", "/")
        group = soup["variables"].get(path)
        if group is None:
            missing.append(path)
            continue
        w = np.asarray(soup["groups"][group], np.float64)
        table[name] = (w, t.layer if w.ndim == 2 else None)
    if missing:
        raise MergeError(f"the soup weights name no group for {len(missing)} parameter(s), e.g. {missing[:3]}")
    return table


# ------------------------------------------------------------------------------------------------
# the merge
# ------------------------------------------------------------------------------------------------
def merge_checkpoints(models: Sequence[str | os.PathLike], out: str | os.PathLike, *, method: str = "linear",
                      weights: Sequence[float] | None = None, base: str | os.PathLike | None = None,
                      t: float = 0.5, density: float = 1.0, lam: float = 1.0, normalize: bool = False,
                      soup_weights: str | os.PathLike | dict | None = None, dtype: str | None = None,
                      overwrite: bool = False, max_shard_bytes: int = 2 ** 30) -> Path:
    """Merge K checkpoints (HF directories or ``.gguf`` files) into the HF directory ``out``.

    ``dtype``: of the written tensors (default: the first model's config ``torch_dtype``, else
    float32; GGUF inputs default to float32). The output's config, generation config and tokenizer
    are the first model's (``base``'s for task arithmetic / TIES).
    """
    if method not in METHODS:
        raise MergeError(f"unknown method {method!r}; expected one of {METHODS}")
    models = [Path(m) for m in models]
    out = Path(out)
    k = len(models)
    if k < 1 or (method in ("slerp",) and k != 2) or (method in ("linear", "uniform", "soup") and k < 2):
        raise MergeError(f"method {method} takes {'exactly 2' if method == 'slerp' else 'at least 2'} models, got {k}")
    needs_base = method in ("task_arithmetic", "ties")
    if needs_base and base is None:
        raise MergeError(f"method {method} needs a base model (--base)")
    if method == "uniform":
        weights = [1.0 / k] * k
    if method in ("linear", "task_arithmetic", "ties"):
        if weights is None:
            weights = [1.0 / k] * k if method == "linear" else [1.0] * k
        w = np.asarray(weights, np.float64).reshape(-1)
        if w.size != k:
            raise MergeError(f"{w.size} weights {w.tolist()} for {k} models")
        if not np.all(np.isfinite(w)):
            raise MergeError(f"weights must be finite, got {w.tolist()}")
        if method == "linear" and not normalize and abs(w.sum() - 1) > 1e-6:
            raise MergeError(f"linear weights {w.tolist()} sum to {w.sum():.8g}, not 1 (or pass normalize)")
        if method == "linear" and normalize and abs(w.sum()) < 1e-12:
            raise MergeError(f"linear weights {w.tolist()} sum to 0; cannot normalise")
        weights = w
    if method == "slerp" and not 0.0 <= t <= 1.0:
        raise MergeError(f"slerp t={t} must lie in [0, 1]")
    if method == "ties" and not 0.0 < density <= 1.0:
        raise MergeError(f"ties density={density} must lie in (0, 1]")
    if dtype is not None and dtype not in _DTYPES:
        raise MergeError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}")
    paths = [*models, *([Path(base)] if base is not None else [])]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise MergeError(f"not found: {', '.join(missing)}")
    _check_out(out, paths, overwrite)

    inputs = [_Input(p) for p in models]
    base_in = _Input(base) if base is not None else None
    try:
        everything = inputs + ([base_in] if base_in else [])
        labels = [str(p) for p in models] + ([f"base {base}"] if base_in else [])
        _check_inputs(everything, labels)
        soup_table = None
        if method == "soup":
            sw = soup_weights if isinstance(soup_weights, dict) else load_soup_weights(soup_weights)
            if sw["num_experts"] != k:
                raise MergeError(f"the soup weights are for {sw['num_experts']} experts, got {k} models")
            soup_table = _soup_table(inputs[0].config, sw)
        ref = base_in if needs_base else inputs[0]
        config = dict(ref.config)
        out_dtype = dtype or (config.get("torch_dtype") if config.get("torch_dtype") in _DTYPES else "float32")
        config["torch_dtype"] = out_dtype
        cast = _DTYPES[out_dtype]
        names = sorted((n for n in ref.names if not _ignored(n)), key=_natural)

        def tensors() -> Iterator[tuple[str, np.ndarray]]:
            for name in names:
                xs = [inp.source.get(name) for inp in inputs]
                if method in ("linear", "uniform"):
                    y = linear(xs, weights, normalize=normalize)
                elif method == "task_arithmetic":
                    y = task_arithmetic(base_in.source.get(name), xs, weights, lam=lam)
                elif method == "ties":
                    y = ties(base_in.source.get(name), xs, weights, density=density, lam=lam)
                elif method == "slerp":
                    y = slerp(t, xs[0], xs[1])
                else:
                    w, layer = soup_table[name]
                    y = linear(xs, w[:, layer] if layer is not None else w)
                yield name, np.ascontiguousarray(np.asarray(y, np.float32).astype(cast))

        gen = {}
        gen_file = ref.path / "generation_config.json" if ref.path.is_dir() else None
        if gen_file is not None and gen_file.exists():
            gen = json.loads(gen_file.read_text())
        else:
            gen = {k2: config[k2] for k2 in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k2) is not None}
        from lib.models.llama.hf import write_checkpoint

        def record(path: Path):
            path.write_text(json.dumps({"method": method, "models": [str(m) for m in models],
                                        "base": str(base) if base else None,
                                        "weights": None if weights is None else [float(x) for x in weights],
                                        "t": t, "density": density, "lambda": lam, "normalize": normalize,
                                        "dtype": out_dtype}, indent=1) + "\n")
        return write_checkpoint(out, tensors(), config=config, generation_config=gen, tokenizer=ref.tokenizer,
                                max_shard_bytes=max_shard_bytes, overwrite=True,
                                extra_files={"merge_config.json": record})
    finally:
        for inp in inputs + ([base_in] if base_in else []):
            inp.close()
