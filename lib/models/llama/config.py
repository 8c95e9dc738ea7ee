"""LLaMA configuration, read from (and written back to) an HF ``config.json``.

Both RoPE spellings are accepted: the older top-level ``rope_theta`` + ``rope_scaling`` and
transformers v5's ``rope_parameters``. The dict that was read is kept, so an export writes back the
form it came in.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
# Keys of config.json that change the network in ways this decoder does not implement.
_UNSUPPORTED = {
    "attention_bias": lambda v: bool(v),
    "mlp_bias": lambda v: bool(v),
    "sliding_window": lambda v: v is not None,
    "pretraining_tp": lambda v: v not in (None, 1),
    "hidden_act": lambda v: v not in ("silu", "swish"),
}


class UnsupportedConfig(ValueError):
    """A config.json asks for something this decoder does not implement (named in the message)."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None   # a dict, frozen (hashable config)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    hf: tuple[tuple[str, Any], ...] = ()   # the config.json it was read from (frozen), for export

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def rope(self) -> dict:
        return dict(self.rope_scaling or ())

    @property
    def hf_dict(self) -> dict:
        return _thaw(self.hf)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "LlamaConfig":
        """Parse an HF ``config.json`` dict; unsupported features raise :class:`UnsupportedConfig`."""
        d = dict(d)
        arch = d.get("architectures") or ["LlamaForCausalLM"]
        model_type = d.get("model_type", "llama")
        if model_type not in ("llama", "mistral") or not all(a in ("LlamaForCausalLM", "MistralForCausalLM")
                                                            for a in arch):
            raise UnsupportedConfig(f"model_type {model_type!r} / architectures {arch}: only LLaMA-family "
                                    "decoders (LlamaForCausalLM) are supported")
        bad = [f"{k}={d[k]!r}" for k, unsupported in _UNSUPPORTED.items() if k in d and unsupported(d[k])]
        if bad:
            raise UnsupportedConfig(f"config.json asks for features this decoder does not implement: {', '.join(bad)}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise UnsupportedConfig(f"config.json lacks {missing}")
        heads = int(d["num_attention_heads"])
        kv = int(d.get("num_key_value_heads") or heads)
        if heads % kv:
            raise UnsupportedConfig(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        head_dim = int(d.get("head_dim") or d["hidden_size"] // heads)
        # RoPE: v5 `rope_parameters` (theta inside) or the older rope_theta + rope_scaling.
        params = d.get("rope_parameters")
        if params is not None:
            params = dict(params)
            theta = float(params.pop("rope_theta", d.get("rope_theta", 10000.0)))
            scaling = params if params.get("rope_type", "default") != "default" else None
        else:
            scaling = dict(d["rope_scaling"]) if d.get("rope_scaling") else None
            theta = float(d.get("rope_theta", (scaling or {}).get("rope_theta", 10000.0)))
            if scaling is not None:
                scaling.pop("rope_theta", None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedConfig(f"rope scaling type {kind!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
            scaling = {**scaling, "rope_type": kind}
            scaling.pop("type", None)
            if kind == "default":
                scaling = None
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]), num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            rope_scaling=_freeze(scaling) if scaling else None,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"), hf=_freeze(d))

    def to_hf(self, dtype: str | None = None) -> dict:
        """An HF ``config.json`` dict: the one read, or a fresh one in the older RoPE form."""
        d = self.hf_dict or {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope or None, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        d.setdefault("architectures", ["LlamaForCausalLM"])
        d.setdefault("model_type", "llama")
        if dtype is not None:
            d["torch_dtype"] = dtype
            if "dtype" in d:
                d["dtype"] = dtype
        return d

    def num_params(self) -> int:
        v, dm, f, n, k, h = (self.vocab_size, self.hidden_size, self.intermediate_size,
                             self.num_attention_heads, self.num_key_value_heads, self.head_dim)
        layer = dm * n * h * 2 + 2 * dm * k * h + 3 * dm * f + 2 * dm
        return v * dm * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + dm


def _freeze(x):
    if isinstance(x, Mapping):
        return tuple((k, _freeze(v)) for k, v in x.items())
    if isinstance(x, list):
        return ("__list__", tuple(_freeze(v) for v in x))
    return x


def _thaw(x):
    if isinstance(x, tuple) and len(x) == 2 and x[0] == "__list__":
        return [_thaw(v) for v in x[1]]
    if isinstance(x, tuple) and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in x):
        return {k: _thaw(v) for k, v in x}
    return x


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """The RoPE inverse frequencies [head_dim / 2] in float32, computed as transformers does.

    llama3 scaling (Meta's ``apply_scaling``): wavelengths below ``original / high_freq_factor`` are
    kept, above ``original / low_freq_factor`` divided by ``factor``, and in between interpolated
    ``(1 - s) f / factor + s f`` with ``s = (original / wavelength - low) / (high - low)``.
    """
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    rope = cfg.rope
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        return (inv_freq / np.float32(rope["factor"])).astype(np.float32)
    if kind != "llama3":
        return inv_freq
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)
