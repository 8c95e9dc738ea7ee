"""An independent NumPy forward of Hugging Face ``LlamaForCausalLM`` (a test reference, no JAX).

Written from transformers' ``modeling_llama.py`` / ``modeling_rope_utils.py`` definitions:

* ``LlamaRMSNorm``: ``w * x / sqrt(mean(x^2) + eps)``;
* RoPE on the split halves of each head (``rotate_half``), ``inv_freq = theta^(-2i/d)`` with the
  ``default``, ``linear`` and ``llama3`` variants; positions ``0..T-1`` unless given;
* attention: ``softmax(q k^T / sqrt(d) + mask) v`` with a causal mask and the key padding mask
  (``attention_mask`` 0 = padding), GQA by repeating each kv head for ``n_heads / n_kv_heads``
  consecutive query heads (``repeat_kv``);
* ``down(silu(gate(x)) * up(x))`` MLP, pre-norm residual blocks, a final norm, and the tied or
  untied output head.

``forward(state_dict, hf_config, input_ids, attention_mask=None)`` returns logits ``[B, T, V]``.
Computation is in float64 by default (``dtype=np.float32`` for speed on real models).
"""
from __future__ import annotations

import contextlib
import math

import numpy as np


def _one_blas_thread():
    """BLAS on one thread: on the shared 2-core test machine a multi-threaded OpenBLAS under load is
    several times slower (and erratic) for these small matmuls."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def rope_config(cfg: dict) -> tuple[float, dict]:
    """``(theta, scaling)`` from either the old (``rope_theta``/``rope_scaling``) or the transformers
    v5 (``rope_parameters``) form; ``scaling`` has ``rope_type`` (``default`` when absent)."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(cfg.get("rope_theta", params.pop("rope_theta", 10000.0)))
    params.pop("rope_theta", None)
    scaling = dict(cfg.get("rope_scaling") or params or {})
    scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return theta, scaling


def inv_freq(cfg: dict) -> np.ndarray:
    """The per-pair inverse frequencies (float64, ``head_dim // 2``) HF's RoPE init computes."""
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    theta, scaling = rope_config(cfg)
    freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = scaling["rope_type"]
    if kind == "default":
        return freq
    if kind == "linear":
        return freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freq
        low_wl, high_wl = old / low, old / high
        divided = np.where(wavelen > low_wl, freq / factor, freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * divided / factor + smooth * divided
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return np.where(medium, smoothed, divided)
    raise NotImplementedError(f"rope_type {kind!r}")


def rms_norm(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def forward(state_dict, cfg: dict, input_ids, attention_mask=None, **kw) -> np.ndarray:
    """Logits ``[B, T, V]`` of HF LLaMA on ``input_ids`` ``[B, T]``; keywords ``position_ids``
    (default ``0..T-1``), ``dtype`` (default float64), ``keep`` (only the last ``keep`` positions'
    logits, the output head being the largest matmul of a small model)."""
    with _one_blas_thread():
        return _forward(state_dict, cfg, input_ids, attention_mask, **kw)


def _forward(state_dict, cfg: dict, input_ids, attention_mask=None, *, position_ids=None,
             dtype=np.float64, keep: int | None = None) -> np.ndarray:
    sd = state_dict
    W = lambda k: np.asarray(sd[k], dtype=dtype)  # noqa: E731
    ids = np.asarray(input_ids)
    B, T = ids.shape
    H = int(cfg["hidden_size"])
    N = int(cfg["num_attention_heads"])
    K = int(cfg.get("num_key_value_heads") or N)
    D = int(cfg.get("head_dim") or H // N)
    eps = float(cfg["rms_norm_eps"])
    pos = np.broadcast_to(np.arange(T) if position_ids is None else np.asarray(position_ids), (B, T))
    angles = pos[..., None].astype(np.float64) * inv_freq(cfg)            # [B, T, D/2]
    emb = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(emb).astype(dtype)[:, :, None, :], np.sin(emb).astype(dtype)[:, :, None, :]

    allowed = np.tril(np.ones((T, T), bool))[None]                         # [1, Tq, Tk]
    if attention_mask is not None:
        allowed = allowed & (np.asarray(attention_mask) != 0)[:, None, :]
    bias = np.where(allowed, 0.0, np.finfo(dtype).min).astype(dtype)[:, None]  # [B, 1, Tq, Tk]

    x = W("model.embed_tokens.weight")[ids]
    for n in range(int(cfg["num_hidden_layers"])):
        p = f"model.layers.{n}."
        h = rms_norm(x, W(p + "input_layernorm.weight"), eps)
        q = (h @ W(p + "self_attn.q_proj.weight").T).reshape(B, T, N, D)
        k = (h @ W(p + "self_attn.k_proj.weight").T).reshape(B, T, K, D)
        v = (h @ W(p + "self_attn.v_proj.weight").T).reshape(B, T, K, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = np.repeat(k, N // K, axis=2)                                     # repeat_kv
        v = np.repeat(v, N // K, axis=2)
        scores = np.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(D) + bias
        attn = np.einsum("bnqk,bknd->bqnd", softmax(scores), v).reshape(B, T, N * D)
        x = x + attn @ W(p + "self_attn.o_proj.weight").T
        h = rms_norm(x, W(p + "post_attention_layernorm.weight"), eps)
        mlp = silu(h @ W(p + "mlp.gate_proj.weight").T) * (h @ W(p + "mlp.up_proj.weight").T)
        x = x + mlp @ W(p + "mlp.down_proj.weight").T
    x = rms_norm(x, W("model.norm.weight"), eps)
    if keep is not None:
        x = x[:, -keep:]
    tied = cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in sd
    head = W("model.embed_tokens.weight") if tied else W("lm_head.weight")
    return x @ head.T


def greedy(state_dict, cfg: dict, input_ids, n_new: int, *, dtype=np.float32, stop=()) -> list[int]:
    """``n_new`` greedy tokens after one prompt (a full forward per token: fine for a handful)."""
    ids = list(np.asarray(input_ids).reshape(-1))
    out = []
    for _ in range(n_new):
        logits = forward(state_dict, cfg, np.asarray([ids]), dtype=dtype, keep=1)
        nxt = int(np.argmax(logits[0, -1]))
        out.append(nxt)
        ids.append(nxt)
        if nxt in stop:
            break
    return out
