"""GGUF (llama.cpp) LLaMA checkpoints as a lazy tensor source in Hugging Face naming, and a writer.

``GGUFCheckpoint(path)`` reads the file's header once (a small parser of the GGUF v2/v3 layout,
0.25 s for SmolLM2-135M where ``gguf.GGUFReader`` takes 2.7 s building a memmap view per token string;
tested to agree with it key for key; the tensor data stay memory-mapped) and presents the model the
way a transformers ``LlamaForCausalLM`` checkpoint looks:

* ``.config``: a ``config.json`` dict built from the ``llama.*`` metadata;
* ``.keys()`` / ``.shape(name)`` / ``.get(name)``: HF parameter names and ``[out, in]`` shapes;
  ``get`` dequantizes one tensor to float32 with ``gguf.quants`` and undoes the q/k row
  permutation that llama.cpp's ``convert_hf_to_gguf.py`` applies (HF rotates the two halves of each
  head, GGUF adjacent pairs), so the result is exactly the HF layout;
* ``.tokenizer_parts()``: a ``tokenizers.Tokenizer`` rebuilt from the ``tokenizer.ggml.*`` metadata
  (byte-level BPE with the GPT-2, SmolLM/StarCoder or LLaMA 3 pre-tokenizer; SentencePiece BPE of
  LLaMA 1/2) and the special tokens / chat template.

Every tensor type is checked when the file is opened: an unsupported quantisation, an unknown tensor
name or an unsupported architecture / RoPE variant raises :class:`GGUFError` naming it, before any
weight is read.

``write_gguf(path, hf_config, state_dict, types=...)`` writes an HF LLaMA state dict as llama.cpp
would (q/k permuted, norms in F32, the chosen type for the matrices), with the tokenizer when given.
"""
from __future__ import annotations

import json
import math
import mmap
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUFCheckpoint", "GGUFError", "open_gguf", "write_gguf", "SUPPORTED_TYPES",
           "permute_qk", "unpermute_qk"]


class GGUFError(ValueError):
    """A GGUF file this loader cannot represent faithfully (the message names what and where)."""


def _gguf():
    import gguf
    return gguf


# Tensor types get() dequantizes. The first eight round-trip through gguf.quants' own quantize
# (tested exactly); the K-quants are dequantize-only in gguf.quants (the byte plumbing is tested).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF tensor name -> HF name ({} is the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_HF_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}
_HF_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_BLK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_to_hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _BLK.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def hf_to_gguf_name(name: str) -> str | None:
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    m = _HF_BLK.match(name)
    if m and m.group(2) in _HF_LAYER:
        return f"blk.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
    return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF (split-half RoPE) rows -> GGUF (interleaved pairs), as llama.cpp's ``LlamaModel.permute``."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF rows -> HF, the exact inverse of :func:`permute_qk` (transformers' ``reverse_permute_weights``)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------------
# the header parser
# ------------------------------------------------------------------------------------------------
# GGUFValueType -> struct format (little-endian); 8 = STRING, 9 = ARRAY.
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP_SCALAR = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
              6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


class _Header:
    """The metadata and tensor directory of a GGUF file (little-endian v2/v3)."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos = buf, path, 4
        if bytes(buf[:4]) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r})")
        version = self._u("I")
        if version not in (2, 3):
            raise GGUFError(f"{path}: GGUF version {version} is not supported (2 and 3 are; "
                            f"a big-endian file reads as a huge version)")
        n_tensors, n_kv = self._u("Q"), self._u("Q")
        self.version = version
        self.fields: dict[str, Any] = {}
        self.field_types: dict[str, int] = {}
        for _ in range(n_kv):
            key = self._str()
            vtype = self._u("I")
            self.field_types[key] = vtype
            self.fields[key] = self._value(vtype)
        self.tensors: list[tuple[str, tuple[int, ...], int, int]] = []   # name, ne (GGUF order), type, offset
        for _ in range(n_tensors):
            name = self._str()
            n_dims = self._u("I")
            ne = struct.unpack_from(f"<{n_dims}Q", buf, self.pos)
            self.pos += 8 * n_dims
            ttype, offset = self._u("I"), self._u("Q")
            self.tensors.append((name, tuple(int(d) for d in ne), ttype, offset))
        align = int(self.fields.get("general.alignment", 32))
        self.data_offset = (self.pos + align - 1) // align * align

    def _u(self, fmt):
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def _str(self):
        n = self._u("Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="surrogateescape")
        self.pos += n
        return s

    def _value(self, vtype):
        if vtype in _SCALAR:
            return self._u(_SCALAR[vtype])
        if vtype == 8:
            return self._str()
        if vtype == 9:
            etype, n = self._u("I"), self._u("Q")
            if etype in _NP_SCALAR:
                dt = np.dtype(_NP_SCALAR[etype]).newbyteorder("<")
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
                self.pos += n * dt.itemsize
                return arr.tolist()
            return [self._value(etype) for _ in range(n)]
        raise GGUFError(f"{self.path}: unknown GGUF metadata value type {vtype} at byte {self.pos}")


def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(x)))


# llama.cpp's tokenizer.ggml.pre -> the tokenizers pre-tokenizer HF's tokenizer.json uses for it.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_GPT2 = ("default", "gpt-2", "gpt2")
_PRE_DIGITS = ("smollm", "starcoder", "refact")
_PRE_LLAMA3 = ("llama-bpe", "llama3", "llama-v3")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers as P
    if pre in _PRE_GPT2:
        return P.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True), False
    if pre in _PRE_DIGITS:
        return P.Sequence([P.Digits(individual_digits=True),
                           P.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]), False
    if pre in _PRE_LLAMA3:
        return P.Sequence([P.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
                           P.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)]), True
    raise GGUFError(f"tokenizer.ggml.pre = {pre!r} is not supported (supported: "
                    f"{', '.join(_PRE_GPT2 + _PRE_DIGITS + _PRE_LLAMA3)})")


def _pre_name(pre_tokenizer: dict | None) -> str:
    """The llama.cpp pre-tokenizer name of a tokenizer.json ``pre_tokenizer`` (for writing)."""
    def bytelevel(d, regex):
        return d.get("type") == "ByteLevel" and not d.get("add_prefix_space", False) and d.get("use_regex", True) == regex
    if pre_tokenizer and bytelevel(pre_tokenizer, True):
        return "gpt-2"
    if pre_tokenizer and pre_tokenizer.get("type") == "Sequence":
        seq = pre_tokenizer["pretokenizers"]
        if (len(seq) == 2 and seq[0].get("type") == "Digits" and seq[0].get("individual_digits")
                and bytelevel(seq[1], True)):
            return "smollm"
        if (len(seq) == 2 and seq[0].get("type") == "Split" and seq[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
                and bytelevel(seq[1], False)):
            return "llama-bpe"
    raise GGUFError(f"no llama.cpp pre-tokenizer matches {json.dumps(pre_tokenizer)}")


def _llama3_factors(theta: float, head_dim: int, scaling: Mapping) -> np.ndarray:
    """llama.cpp's ``rope_freqs.weight`` for llama3 RoPE scaling (convert_hf_to_gguf: per frequency the
    divisor of the unscaled inverse frequency)."""
    factor = float(scaling.get("factor", 8.0))
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old = float(scaling.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low_wl, high_wl = old / low, old / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / float(f)
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old / wl - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _fit_llama3(factors: np.ndarray, theta: float, head_dim: int, context_length: int) -> dict | None:
    """The llama3 ``rope_scaling`` whose factors are ``factors`` (searched over the values real models
    use; several settings can give the same factors, which then define the same model)."""
    factor = float(np.max(factors))
    olds = [8192, context_length] + [2 ** k for k in range(4, 21)]
    # (old, low, high) and (s*old, s*low, s*high) give the same factors: low_freq_factor 1 first
    for low in (1.0, 2.0, 0.5):
        for high in (4.0, 2.0, 8.0):
            if high <= low:
                continue
            for old in olds:
                cand = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": int(old)}
                if np.allclose(_llama3_factors(theta, head_dim, cand), factors, rtol=1e-5, atol=0):
                    return cand
    return None


def _merges_from_scores(tokens, scores, path) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece vocabulary (llama.cpp stores none): every split of a piece into
    two pieces of the vocabulary, ranked by the merged piece's score (transformers'
    ``GGUFTokenizerSkeleton``, the rule SentencePiece's BPE applies)."""
    if scores is None:
        raise GGUFError(f"{path}: a 'llama' tokenizer needs tokenizer.ggml.scores (or merges)")
    rank = {}
    for i, t in enumerate(tokens):
        rank.setdefault(t, i)
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in rank and piece[i:] in rank]
        local.sort(key=lambda m: (rank[m[0]], rank[m[1]]), reverse=True)
        merges.extend(local)
    merges.sort(key=lambda m: m[2], reverse=True)
    return [(a, b) for a, b, _ in merges]


# ------------------------------------------------------------------------------------------------
# the checkpoint
# ------------------------------------------------------------------------------------------------
_MISSING = object()


class GGUFCheckpoint:
    """A GGUF LLaMA file as a lazy tensor source: HF parameter names to float32 arrays.

    ``get(name)`` (or ``ckpt[name]``) dequantizes one tensor on demand; nothing is read before.
    ``keys()`` and ``shape(name)`` need no dequantization, so a loader checks every name and shape
    first (this is deliberately not a ``Mapping``: generic mapping code would dequantize a tensor
    to learn its shape). Also
    ``.config`` (HF ``config.json`` dict), ``.metadata`` (every GGUF key/value), ``.shape(name)``,
    ``.tensor_type(name)`` (the GGML type name), ``.tokenizer_parts()``, ``.chat_template``.
    """

    def __init__(self, path: str | Path):
        gguf = _gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        if self.path.stat().st_size < 24:
            raise GGUFError(f"{self.path} is too short to be a GGUF file ({self.path.stat().st_size} bytes)")
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._open(gguf)
        except BaseException:
            self.close()
            raise

    def _open(self, gguf):
        try:
            header = _Header(self._mmap, self.path)
        except (struct.error, UnicodeDecodeError, ValueError) as e:
            if isinstance(e, GGUFError):
                raise
            raise GGUFError(f"{self.path}: unreadable GGUF header (truncated or corrupt file): {e}") from e
        self.metadata: dict[str, Any] = header.fields
        self.version = header.version
        self._data_offset = header.data_offset
        md = self.metadata
        arch = md.get("general.architecture")
        if arch != "llama":
            raise GGUFError(f"{self.path}: general.architecture = {arch!r}; only 'llama' is supported")

        self._tensors: dict[str, tuple[str, tuple[int, ...], Any, int, int]] = {}
        unknown, bad_types, extra = [], [], {}
        for name, ne, ttype, offset in header.tensors:
            try:
                qtype = gguf.GGMLQuantizationType(ttype)
            except ValueError:
                bad_types.append(f"{name}: unknown GGML type id {ttype}")
                continue
            if name == "rope_freqs.weight":
                extra[name] = (ne, qtype, offset)
                continue
            hf = gguf_to_hf_name(name)
            if hf is None:
                unknown.append(name)
                continue
            if qtype.name not in SUPPORTED_TYPES:
                bad_types.append(f"{name} ({hf}): {qtype.name}")
                continue
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            if ne[0] % block:
                raise GGUFError(f"{self.path}: {name}: inner size {ne[0]} is not a multiple of the {qtype.name} block {block}")
            shape = tuple(reversed(ne))     # numpy / HF order: [out, in]
            nbytes = int(np.prod(ne[1:], dtype=np.int64)) * (ne[0] // block) * type_size
            self._tensors[hf] = (name, shape, qtype, header.data_offset + offset, nbytes)
        if bad_types:
            raise GGUFError(f"{self.path}: unsupported GGUF tensor type for {len(bad_types)} tensor(s) "
                            f"(supported: {', '.join(SUPPORTED_TYPES)}):\n  " + "\n  ".join(bad_types))
        if unknown:
            raise GGUFError(f"{self.path}: {len(unknown)} tensor(s) with no LLaMA meaning: {', '.join(unknown[:20])}")
        for hf, (name, shape, qtype, off, nbytes) in self._tensors.items():
            if off + nbytes > len(self._mmap):
                raise GGUFError(f"{self.path}: {name} ends past the end of the file (truncated download?)")
        self.config = self._build_config(extra)
        self._check_shapes()

    # -- config ------------------------------------------------------------------------------------
    def _build_config(self, extra) -> dict:
        md = self.metadata

        def need(key):
            if key not in md:
                raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
            return md[key]

        hidden = int(need("llama.embedding_length"))
        n_head = int(need("llama.attention.head_count"))
        n_kv = int(md.get("llama.attention.head_count_kv", n_head))
        head_dim = int(md.get("llama.attention.key_length", hidden // n_head))
        if int(md.get("llama.attention.value_length", head_dim)) != head_dim:
            raise GGUFError(f"{self.path}: llama.attention.value_length != key_length is not supported")
        rot = int(md.get("llama.rope.dimension_count", head_dim))
        if rot != head_dim:
            raise GGUFError(f"{self.path}: llama.rope.dimension_count = {rot} (partial rotary) != head_dim {head_dim}: not supported")
        if "model.embed_tokens.weight" not in self._tensors:
            raise GGUFError(f"{self.path}: no token_embd.weight tensor")
        vocab = self._tensors["model.embed_tokens.weight"][1][0]   # the embedding decides (llama.vocab_size may lag)
        theta = _f32(md.get("llama.rope.freq_base", 10000.0))
        ctx = int(md.get("llama.context_length", 2048))
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(need("llama.feed_forward_length")),
            "num_hidden_layers": int(need("llama.block_count")),
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": ctx,
            "rms_norm_eps": _f32(md.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": theta,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "torch_dtype": "float32",
        }
        scaling_type = md.get("llama.rope.scaling.type", "none")
        if scaling_type == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": _f32(md["llama.rope.scaling.factor"])}
        elif scaling_type not in ("none", None):
            raise GGUFError(f"{self.path}: llama.rope.scaling.type = {scaling_type!r} is not supported (none, linear, "
                            f"and llama3 via rope_freqs.weight are)")
        if "rope_freqs.weight" in extra:
            ne, qtype, off = extra["rope_freqs.weight"]
            if qtype.name != "F32" or ne != (head_dim // 2,):
                raise GGUFError(f"{self.path}: rope_freqs.weight must be F32 [{head_dim // 2}], is {qtype.name} {list(ne)}")
            factors = np.frombuffer(self._mmap, np.float32, head_dim // 2, self._data_offset + off)
            if not np.all(factors == 1.0):
                if "rope_scaling" in cfg:
                    raise GGUFError(f"{self.path}: both rope_freqs.weight and llama.rope.scaling.type")
                fit = _fit_llama3(factors, theta, head_dim, ctx)
                if fit is None:
                    raise GGUFError(f"{self.path}: rope_freqs.weight {factors.tolist()} matches no llama3 RoPE scaling")
                cfg["rope_scaling"] = fit
        for key, field in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id"),
                           ("pad_token_id", "tokenizer.ggml.padding_token_id")):
            if field in md:
                cfg[key] = int(md[field])
        return cfg

    def _check_shapes(self):
        c = self.config
        h, i, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
        want = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
        if not c["tie_word_embeddings"]:
            want["lm_head.weight"] = (v, h)
        for n in range(c["num_hidden_layers"]):
            p = f"model.layers.{n}."
            want.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                         p + "self_attn.q_proj.weight": (c["num_attention_heads"] * hd, h),
                         p + "self_attn.k_proj.weight": (c["num_key_value_heads"] * hd, h),
                         p + "self_attn.v_proj.weight": (c["num_key_value_heads"] * hd, h),
                         p + "self_attn.o_proj.weight": (h, c["num_attention_heads"] * hd),
                         p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                         p + "mlp.down_proj.weight": (h, i)})
        have = {k: t[1] for k, t in self._tensors.items()}
        problems = [f"missing {k} {list(s)}" for k, s in want.items() if k not in have]
        problems += [f"unexpected {k}" for k in have if k not in want]
        problems += [f"{k}: {list(have[k])} != {list(s)}" for k, s in want.items() if k in have and have[k] != s]
        if problems:
            raise GGUFError(f"{self.path}: tensors do not match the metadata's config:\n  " + "\n  ".join(problems))

    # -- tensors -----------------------------------------------------------------------------------
    def keys(self):
        return self._tensors.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> np.dtype:
        self._entry(name)
        return np.dtype(np.float32)

    def tensor_type(self, name: str) -> str:
        """The stored GGML type (``'Q4_1'``, ``'F32'``, ...) of an HF-named tensor."""
        return self._entry(name)[2].name

    def gguf_name(self, name: str) -> str:
        return self._entry(name)[0]

    def _entry(self, name):
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in {self.path.name} (it has {len(self._tensors)} tensors, "
                           f"e.g. {next(iter(self._tensors))})") from None

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor as gguf.quants reads them (uint8, byte shape), no copy."""
        gguf = _gguf()
        gname, shape, qtype, off, nbytes = self._entry(name)
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        return np.frombuffer(self._mmap, np.uint8, nbytes, off).reshape(byte_shape)

    def __getitem__(self, name: str) -> np.ndarray:
        gguf = _gguf()
        gname, shape, qtype, off, nbytes = self._entry(name)
        w = gguf.quants.dequantize(self.raw(name), qtype)
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, self.config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, self.config["num_key_value_heads"])
        return w

    def get(self, name: str, default: Any = _MISSING) -> np.ndarray:
        """The float32 HF-layout tensor ``name`` (dequantized, q/k un-permuted). Unlike ``dict.get``,
        a missing name raises KeyError unless a ``default`` is given."""
        if name not in self._tensors and default is not _MISSING:
            return default
        return self[name]

    def state_dict(self) -> dict[str, np.ndarray]:
        """Every tensor dequantized (float32, HF names and layouts)."""
        return {k: self[k] for k in self._tensors}

    def close(self):
        try:
            self._mmap.close()
        except BufferError:   # arrays returned by get() still view the map; it closes with them
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        types = sorted({t[2].name for t in self._tensors.values()})
        return (f"GGUFCheckpoint({str(self.path)!r}, {len(self)} tensors, types {types}, "
                f"{self.config['num_hidden_layers']} layers, hidden {self.config['hidden_size']})")

    # -- tokenizer ---------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def tokenizer_parts(self):
        """``(tokenizers.Tokenizer, info)`` rebuilt from the metadata; ``info`` holds ``bos_token``,
        ``eos_token``, ``pad_token``, ``unk_token`` (strings or None), ``chat_template``,
        ``add_bos_token``, ``add_eos_token``. Byte-level BPE (``tokenizer.ggml.model = 'gpt2'``,
        LLaMA 3 / SmolLM / GPT-2 style) and SentencePiece BPE (``'llama'``, LLaMA 1/2, TinyLlama:
        merges rebuilt from the scores as transformers does, byte fallback) are supported."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, processors
        md = self.metadata
        kind = md.get("tokenizer.ggml.model")
        if kind is None:
            raise GGUFError(f"{self.path}: no tokenizer in the metadata (tokenizer.ggml.model missing)")
        if kind not in ("gpt2", "llama"):
            raise GGUFError(f"{self.path}: tokenizer.ggml.model = {kind!r} is not supported ('gpt2': byte-level BPE "
                            f"as in LLaMA 3 / SmolLM; 'llama': SentencePiece BPE as in LLaMA 1/2)")
        tokens = md["tokenizer.ggml.tokens"]
        types = md.get("tokenizer.ggml.token_type", [1] * len(tokens))
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        if "tokenizer.ggml.merges" in md:
            merges = [tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]
        elif kind == "llama":
            merges = _merges_from_scores(tokens, md.get("tokenizer.ggml.scores"), self.path)
        else:
            raise GGUFError(f"{self.path}: a 'gpt2' tokenizer without tokenizer.ggml.merges")
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise GGUFError(f"{self.path}: malformed merges such as {bad[:3]}")
        if kind == "gpt2":
            pre, ignore_merges = _pre_tokenizer(md.get("tokenizer.ggml.pre", "default"))
            tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                                       ignore_merges=ignore_merges))
            tok.pre_tokenizer = pre
            tok.decoder = decoders.ByteLevel()
        else:
            # SentencePiece BPE: spaces are U+2581, unknown characters fall back to <0xXX> bytes, and
            # (add_space_prefix) a space goes before the text and after every special token, as
            # llama.cpp's SPM tokenizer does (transformers' legacy LlamaTokenizerFast normalizer)
            from tokenizers import normalizers
            unk = md.get("tokenizer.ggml.unknown_token_id", 0)
            prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
            tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[int(unk)], fuse_unk=True,
                                       byte_fallback=True))
            steps = [normalizers.Prepend("\u2581")] if prefix else []
            tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
            steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
            tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        # CONTROL (and the UNKNOWN token) are special; USER_DEFINED are plain added tokens
        control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                   if ty == 3 or (ty == 2 and kind == "llama")]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
        if control:
            tok.add_special_tokens(control)
        if user:
            tok.add_tokens(user)

        def token(key):
            i = md.get(key)
            return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

        info = {"bos_token": token("tokenizer.ggml.bos_token_id"), "eos_token": token("tokenizer.ggml.eos_token_id"),
                "pad_token": token("tokenizer.ggml.padding_token_id"), "unk_token": token("tokenizer.ggml.unknown_token_id"),
                "chat_template": self.chat_template,
                "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False)),
                "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False))}
        single, pair, specials = "$A:0", "$A:0 $B:0", []
        if info["add_bos_token"] and info["bos_token"] is not None:
            b = info["bos_token"]
            single, pair = f"{b}:0 {single}", f"{b}:0 $A:0 {b}:0 $B:0"
            specials.append((b, vocab[b]))
        if info["add_eos_token"] and info["eos_token"] is not None:
            e = info["eos_token"]
            single, pair = f"{single} {e}:0", f"{pair} {e}:0"
            specials.append((e, vocab[e]))
        if specials:
            tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        # the ids the metadata names are the ids the tokenizer gives them (transformers once swapped bos/eos)
        for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                           ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
            if info[key] is not None and tok.token_to_id(info[key]) != int(md[f"tokenizer.ggml.{field}"]):
                raise GGUFError(f"{self.path}: {key} {info[key]!r} encodes to id {tok.token_to_id(info[key])}, "
                                f"the metadata says {md[f'tokenizer.ggml.{field}']} (duplicate tokens in the vocabulary?)")
        return tok, info


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    return GGUFCheckpoint(path)


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def _rope_of(cfg: Mapping) -> tuple[float, dict | None]:
    params = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling")
    if scaling is None and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        else:
            scaling = {**scaling, "rope_type": kind}
    return theta, scaling


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def write_gguf(path: str | Path, hf_config: Mapping, state_dict: Mapping[str, Any], *,
               types: str | Mapping[str, str] | Callable[[str, tuple], str] = "F32",
               tokenizer=None, tokenizer_config: Mapping | None = None, name: str | None = None,
               metadata: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write an HF LLaMA ``state_dict`` (numpy arrays, HF names) as a llama.cpp GGUF file.

    ``types`` picks the storage of the 2-D weights: one GGML type name for all, a dict
    ``{hf name: type}`` (others F32), or a function ``(hf_name, shape) -> type``. Norm weights are
    always F32 (as llama.cpp stores them); a matrix whose rows do not divide into the type's
    blocks falls back to F16 (as ``convert_hf_to_gguf`` does). q/k are permuted to GGUF's layout.
    ``tokenizer``: a ``tokenizers.Tokenizer`` or a ``tokenizer.json`` path (byte-level BPE), with
    ``tokenizer_config`` (``tokenizer_config.json`` dict: bos/eos/pad/unk tokens, chat_template,
    add_bos_token). ``metadata``: further GGUF keys written as they are (a str, bool, int
    (uint32), float (float32) or a list of one of these), e.g. a SentencePiece tokenizer's
    ``tokenizer.ggml.*`` keys. Returns ``{hf name: written type}``. The file is written to a temporary name
    and renamed, so a failure leaves nothing at ``path``.
    """
    gguf = _gguf()
    path = Path(path)
    cfg = dict(hf_config)
    for key, allowed in (("hidden_act", ("silu",)), ("attention_bias", (False, None)), ("mlp_bias", (False, None))):
        if cfg.get(key, allowed[0]) not in allowed:
            raise GGUFError(f"config {key} = {cfg[key]!r} cannot be written as a llama GGUF")
    hidden, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    theta, scaling = _rope_of(cfg)
    tied = bool(cfg.get("tie_word_embeddings", False))

    def type_for(hf_name, shape):
        if len(shape) == 1:
            return "F32"
        if isinstance(types, str):
            t = types
        elif callable(types):
            t = types(hf_name, shape)
        else:
            t = types.get(hf_name, "F32")
        qtype = gguf.GGMLQuantizationType[t]
        if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            return "F16"
        return t

    tmp = path.with_name(path.name + ".partial")
    written = {}
    w = gguf.GGUFWriter(str(tmp), "llama")
    try:
        w.add_name(name or cfg.get("_name_or_path") or "llama")
        w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        w.add_embedding_length(hidden)
        w.add_block_count(int(cfg["num_hidden_layers"]))
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_freq_base(theta)
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        w.add_vocab_size(int(cfg["vocab_size"]))
        w.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        rope_freqs = None
        if scaling is not None:
            kind = scaling["rope_type"]
            if kind == "linear":
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(float(scaling["factor"]))
            elif kind == "llama3":
                rope_freqs = _llama3_factors(theta, head_dim, scaling)
            else:
                raise GGUFError(f"rope_type {kind!r} cannot be written (default, linear, llama3 can)")
        if tokenizer is not None:
            _write_tokenizer(w, tokenizer, dict(tokenizer_config or {}), cfg)
        for key, value in (metadata or {}).items():
            if isinstance(value, (list, tuple)):
                w.add_array(key, list(value))
            elif isinstance(value, bool):
                w.add_bool(key, value)
            elif isinstance(value, int):
                w.add_uint32(key, value)
            elif isinstance(value, float):
                w.add_float32(key, value)
            else:
                w.add_string(key, str(value))
        keys = list(state_dict)
        order = sorted(keys, key=lambda k: (0, int(k.split(".")[2]), k) if k.startswith("model.layers.") else (-1 if "embed" in k else 1, 0, k))
        for key in order:
            if tied and key == "lm_head.weight":
                continue
            gname = hf_to_gguf_name(key)
            if gname is None:
                raise GGUFError(f"{key} has no GGUF llama name")
            arr = np.asarray(state_dict[key], dtype=np.float32)
            if key.endswith("self_attn.q_proj.weight"):
                arr = permute_qk(arr, n_head)
            elif key.endswith("self_attn.k_proj.weight"):
                arr = permute_qk(arr, n_kv)
            t = type_for(key, arr.shape)
            qtype = gguf.GGMLQuantizationType[t]
            if t == "F32":
                w.add_tensor(gname, np.ascontiguousarray(arr))
            elif t == "F16":
                w.add_tensor(gname, arr.astype(np.float16))
            else:
                q = gguf.quants.quantize(np.ascontiguousarray(arr), qtype)
                w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
            written[key] = t
        if rope_freqs is not None:
            w.add_tensor("rope_freqs.weight", rope_freqs)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return written


def _write_tokenizer(w, tokenizer, tcfg: dict, cfg: Mapping):
    from tokenizers import Tokenizer
    if isinstance(tokenizer, (str, Path)):
        tokenizer = Tokenizer.from_file(str(tokenizer))
    spec = json.loads(tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFError("only byte-level BPE tokenizers can be written to GGUF here")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [None] * size
    for t, i in vocab.items():
        tokens[i] = t
    if any(t is None for t in tokens):
        raise GGUFError("the tokenizer's ids are not contiguous")
    added = {a["content"]: a for a in spec.get("added_tokens", [])}
    ttypes = [(3 if added[t]["special"] else 4) if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab_size = int(cfg["vocab_size"])
    if size > vocab_size:
        raise GGUFError(f"the tokenizer has {size} tokens, more than the model's vocab_size {vocab_size}")
    for i in range(size, vocab_size):   # llama.cpp pads the vocabulary to the embedding's rows
        tokens.append(f"[PAD{i}]")
        ttypes.append(5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_name(spec.get("pre_tokenizer")))
    w.add_token_list(tokens)
    w.add_token_types(ttypes)
    w.add_token_merges(merges)

    def tid(key, cfg_key):
        tok = tcfg.get(key)
        if isinstance(tok, dict):
            tok = tok.get("content")
        if tok is not None and tok in vocab:
            return vocab[tok]
        v = _first(cfg.get(cfg_key))
        return None if v is None else int(v)

    for key, cfg_key, add in (("bos_token", "bos_token_id", w.add_bos_token_id), ("eos_token", "eos_token_id", w.add_eos_token_id),
                              ("unk_token", "unk_token_id", w.add_unk_token_id), ("pad_token", "pad_token_id", w.add_pad_token_id)):
        i = tid(key, cfg_key)
        if i is not None:
            add(i)
    post = spec.get("post_processor") or {}
    add_bos = tcfg.get("add_bos_token")
    if add_bos is None:
        add_bos = post.get("type") == "TemplateProcessing" and "SpecialToken" in post.get("single", [{}])[0]
    w.add_add_bos_token(bool(add_bos))
    if tcfg.get("chat_template"):
        w.add_chat_template(tcfg["chat_template"])
