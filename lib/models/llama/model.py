"""The LLaMA-family decoder in Flax NNX, laid out as transformers' ``LlamaForCausalLM``.

* Module names follow HF (``model.embed_tokens``, ``self_attn.q_proj``, ``mlp.gate_proj``,
  ``post_attention_layernorm``, ``lm_head``), so a parameter's path says which HF tensor it is.
* Split-half RoPE (``rotate_half``), as HF: HF checkpoints load by transpose/reshape only.
* Projections are einsum kernels: q ``[embed, heads, head_dim]``, k/v ``[embed, kv_heads, head_dim]``,
  o ``[heads, head_dim, embed]``, so tensor parallelism splits whole heads.
* The decoder layers are *stacked*: every parameter of a :class:`LayerStack` has a leading
  ``layers`` axis and the forward pass is one ``lax.scan`` over it, so a 32-layer model compiles as
  fast as a 1-layer one. ``model.model.blocks`` is a list of stacks covering consecutive layer
  ranges (one stack normally; Mask Fine-Tuning splits off the layers it masks, which then have a
  different structure).
* Attention is one masked einsum path for everything: training on packed rows (segment ids: a
  token sees earlier tokens of its own segment), HF's ``attention_mask`` (padding = segment 0), and
  decoding with the KV cache (the cache's slots carry a segment too). Softmax, norms and the logits
  are float32 whatever the compute dtype.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lib import sharding
from lib.models.llama.config import LlamaConfig, rope_inv_freq

# Logical axis names of the decoder's parameters (mapped to mesh axes by rules, see RULES).
LOGICAL_AXES = ("layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm")

# Sharding rules by strategy; mesh axes "data" (batch, and FSDP over it) and "model" (tensor parallel).
RULES = {
    "dp": (("batch", "data"),),
    "fsdp": (("batch", "data"), ("embed", "data")),
    "tp": (("batch", "data"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"), ("vocab", "model")),
    "fsdp_tp": (("batch", "data"), ("embed", "data"), ("heads", "model"), ("kv_heads", "model"),
                ("mlp", "model"), ("vocab", "model")),
}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _normal(key, shape, dtype, std=0.02):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


class Projection(nnx.Module):
    """``y = x . kernel`` contracting the trailing ``len(in_shape)`` dims of ``x`` (no bias, as LLaMA).

    With ``stack > 0`` the kernel gets a leading ``layers`` axis (a :class:`LayerStack` slices it).
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], names: tuple[str, ...], *,
                 stack: int = 0, param_dtype=jnp.float32, dtype=jnp.float32, rngs: nnx.Rngs):
        shape = (*in_shape, *out_shape)
        if stack:
            shape, names = (stack, *shape), ("layers", *names)
        self.kernel = sharding.param(_normal(rngs.params(), shape, param_dtype), names)
        self.num_in = len(in_shape)
        self.dtype = dtype

    def weight(self) -> jax.Array:
        """The kernel used in the product (Mask Fine-Tuning overrides this with a masked kernel)."""
        return self.kernel[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.weight().astype(self.dtype)
        return jnp.tensordot(x.astype(self.dtype), k, axes=self.num_in)


class Embed(nnx.Module):
    """Token embedding ``[vocab, embed]`` (also the output head when the embeddings are tied)."""

    def __init__(self, vocab_size: int, dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = sharding.param(_normal(rngs.params(), (vocab_size, dim), param_dtype), ("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class RMSNorm(nnx.Module):
    """HF's LlamaRMSNorm: normalised in float32, cast back, then scaled."""

    def __init__(self, dim: int, eps: float, *, stack: int = 0, param_dtype=jnp.float32):
        shape, names = ((stack, dim), ("layers", "norm")) if stack else ((dim,), ("norm",))
        self.scale = sharding.param(jnp.ones(shape, param_dtype), names)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * h.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Split-half RoPE on ``x [B, T, heads, head_dim]`` at ``positions [B, T]`` (HF ``rotate_half``)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, T, head_dim/2]
    cos, sin = jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def make_attention_mask(q_segments: jax.Array, q_slots: jax.Array, kv_segments: jax.Array,
                   kv_slots: jax.Array) -> jax.Array:
    """``[B, T, S]``: query t may read key s when s is not later, in the same segment, and not padding."""
    causal = kv_slots[:, None, :] <= q_slots[:, :, None]
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    return causal & same & (kv_segments[:, None, :] != 0)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention: ``q [B,T,N,H]``, ``k/v [B,S,K,H]``; query head h reads kv head
    ``h // (N / K)`` (transformers' ``repeat_kv``). Scores and softmax in float32."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    # A fully masked row (a padding query) gets a uniform softmax instead of NaN.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
    return out.reshape(b, t, n, h)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, stack: int = 0, param_dtype=jnp.float32, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        kw = dict(stack=stack, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.q_proj = Projection((d,), (n, h), ("embed", "heads", "head_dim"), **kw)
        self.k_proj = Projection((d,), (k, h), ("embed", "kv_heads", "head_dim"), **kw)
        self.v_proj = Projection((d,), (k, h), ("embed", "kv_heads", "head_dim"), **kw)
        self.o_proj = Projection((n, h), (d,), ("heads", "head_dim", "embed"), **kw)

    def __call__(self, x, positions, inv_freq, mask, cache=None):
        q = apply_rope(self.q_proj(x), positions, inv_freq)
        k = apply_rope(self.k_proj(x), positions, inv_freq)
        v = self.v_proj(x)
        if cache is not None:  # write this chunk at the cache's slot index, attend over the whole cache
            ck, cv, index = cache
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=1)
            cache = (k, v)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, stack: int = 0, param_dtype=jnp.float32, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(stack=stack, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.gate_proj = Projection((d,), (f,), ("embed", "mlp"), **kw)
        self.up_proj = Projection((d,), (f,), ("embed", "mlp"), **kw)
        self.down_proj = Projection((f,), (d,), ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """One LLaMA layer (pre-norm attention and SwiGLU MLP with residuals); stacked when ``stack > 0``."""

    def __init__(self, cfg: LlamaConfig, *, stack: int = 0, param_dtype=jnp.float32, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(stack=stack, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, stack=stack, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, stack=stack,
                                                param_dtype=param_dtype)
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x, positions, inv_freq, mask, cache=None):
        h, cache = self.self_attn(self.input_layernorm(x), positions, inv_freq, mask, cache)
        x = x + h.astype(x.dtype)
        x = x + self.mlp(self.post_attention_layernorm(x)).astype(x.dtype)
        return x, cache


class LayerStack(nnx.Module):
    """Layers ``first .. first + count - 1``, their parameters stacked on a leading ``layers`` axis and
    run by one ``lax.scan`` (optionally rematerialised per layer)."""

    def __init__(self, cfg: LlamaConfig, first: int, count: int, *, param_dtype=jnp.float32, dtype=jnp.float32,
                 remat: str = "full", rngs: nnx.Rngs | None = None, layer: DecoderLayer | None = None):
        """``layer``: an already stacked :class:`DecoderLayer` (``count`` on its leading axis) to wrap."""
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        self.first, self.count, self.remat = first, count, remat
        self.layer = layer if layer is not None else DecoderLayer(cfg, stack=count, param_dtype=param_dtype,
                                                                  dtype=dtype, rngs=rngs)

    def __call__(self, x, positions, inv_freq, mask, cache=None):
        graphdef, state = nnx.split(self.layer)

        def body(h, xs):
            layer_state, layer_cache = xs
            h, new_cache = nnx.merge(graphdef, layer_state)(h, positions, inv_freq, mask, layer_cache)
            return h, new_cache

        if self.remat != "none" and cache is None:
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        layer_cache = None if cache is None else (cache[0], cache[1], jnp.broadcast_to(cache[2], (self.count,)))
        x, new_cache = jax.lax.scan(body, x, (state, layer_cache))
        return x, new_cache


class LlamaModel(nnx.Module):
    """The decoder without its head (HF ``LlamaModel``)."""

    def __init__(self, cfg: LlamaConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, remat: str = "full",
                 rngs: nnx.Rngs):
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List([LayerStack(cfg, 0, cfg.num_hidden_layers, param_dtype=param_dtype, dtype=dtype,
                                           remat=remat, rngs=rngs)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)


class Llama(nnx.Module):
    """``LlamaForCausalLM``. ``model(input_ids, attention_mask=None) -> logits [B, T, vocab]`` (float32).

    Keyword arguments for training and decoding:
      positions: ``[B, T]`` RoPE positions (default ``0..T-1``, as HF's forward; packed rows restart
        at 0 per segment; left-padded prompts use ``cumsum(mask) - 1``).
      segment_ids: ``[B, T]``, 0 = padding, tokens attend within their segment (default:
        ``attention_mask``, or all ones).
      cache: a :func:`init_cache` dict; the call then writes this chunk's keys/values at
        ``cache["index"]`` and returns ``(logits, new_cache)``.
    """

    def __init__(self, cfg: LlamaConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, remat: str = "full",
                 rngs: nnx.Rngs):
        self.config = cfg
        self.dtype = dtype
        self.model = LlamaModel(cfg, param_dtype=param_dtype, dtype=dtype, remat=remat, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Projection((cfg.hidden_size,), (cfg.vocab_size,), ("embed", "vocab"),
                                      param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        else:
            self.lm_head = None

    @property
    def blocks(self):
        return self.model.blocks

    @staticmethod
    def open_checkpoint(path):
        """The tensor source of an HF directory, ``.gguf`` file or cached hub id (for ``zoo.load_pretrained``)."""
        from lib.models.llama import open_checkpoint
        return open_checkpoint(path, tokenizer=False)[1]

    def load_state_dict(self, source, *, strict: bool = True):
        """HF-named tensors (a mapping or a tensor source) into this model; see ``hf.load_state_dict``."""
        from lib.models.llama.hf import load_state_dict
        return load_state_dict(self, source, strict=strict)

    def hidden_states(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, cache=None):
        """The final-norm hidden states ``[B, T, D]`` (and the new cache when one is given)."""
        b, t = input_ids.shape
        if segment_ids is None:
            segment_ids = (jnp.ones((b, t), jnp.int32) if attention_mask is None
                           else jnp.asarray(attention_mask, jnp.int32))
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache is None:
            slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            mask = make_attention_mask(segment_ids, slots, segment_ids, slots)
        else:
            index = cache["index"]
            kv_segments = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids.astype(jnp.int32),
                                                              index, axis=1)
            s = kv_segments.shape[1]
            q_slots = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
            kv_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            mask = make_attention_mask(segment_ids, q_slots, kv_segments, kv_slots)
        x = self.model.embed_tokens(input_ids).astype(self.dtype)
        inv_freq = jnp.asarray(rope_inv_freq(self.config))   # a constant of the config, not state
        new_k, new_v = [], []
        for stack in self.model.blocks:
            layer_cache = None
            if cache is not None:
                sl = slice(stack.first, stack.first + stack.count)
                layer_cache = (cache["k"][sl], cache["v"][sl], cache["index"])
            x, written = stack(x, positions, inv_freq, mask, layer_cache)
            if cache is not None:
                new_k.append(written[0])
                new_v.append(written[1])
        x = self.model.norm(x)
        if cache is None:
            return x
        new_cache = {"k": jnp.concatenate(new_k) if len(new_k) > 1 else new_k[0],
                     "v": jnp.concatenate(new_v) if len(new_v) > 1 else new_v[0],
                     "segment_ids": kv_segments, "index": cache["index"] + t}
        return x, new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        h = hidden.astype(self.dtype)
        if self.lm_head is None:   # tied: the embedding matrix, transposed
            emb = self.model.embed_tokens.embedding[...].astype(self.dtype)
            return jnp.einsum("btd,vd->btv", h, emb, preferred_element_type=jnp.float32)
        kernel = self.lm_head.weight().astype(self.dtype)
        return jnp.einsum("btd,dv->btv", h, kernel, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, attention_mask=None, *, positions=None, segment_ids=None, cache=None):
        out = self.hidden_states(input_ids, attention_mask, positions=positions, segment_ids=segment_ids,
                                 cache=cache)
        if cache is None:
            return self.logits(out)
        hidden, new_cache = out
        return self.logits(hidden), new_cache


def _slice_layers(value, start: int, stop: int):
    if isinstance(value, jax.ShapeDtypeStruct):   # abstract models split too (shapes only)
        return jax.ShapeDtypeStruct((stop - start, *value.shape[1:]), value.dtype, sharding=value.sharding)
    return value[start:stop]


def split_stacks(model: Llama, boundaries) -> Llama:
    """Cut the layer stacks at the layer indices ``boundaries`` (in place; returns the model), so a
    range of layers can take a different structure (Mask Fine-Tuning's masked layers). The forward
    pass is unchanged: stacks run in order, each one scan."""
    cuts = sorted({int(b) for b in boundaries} - {0, model.config.num_hidden_layers})
    for b in cuts:
        if not 0 < b < model.config.num_hidden_layers:
            raise ValueError(f"layer boundary {b} is outside 1..{model.config.num_hidden_layers - 1}")
    new = []
    for stack in model.model.blocks:
        edges = [stack.first] + [c for c in cuts if stack.first < c < stack.first + stack.count] + \
                [stack.first + stack.count]
        if len(edges) == 2:
            new.append(stack)
            continue
        graphdef, state = nnx.split(stack.layer)
        for a, b in zip(edges[:-1], edges[1:]):
            part = jax.tree.map(lambda v: _slice_layers(v, a - stack.first, b - stack.first), state)
            new.append(LayerStack(model.config, a, b - a, remat=stack.remat, layer=nnx.merge(graphdef, part)))
    model.model.blocks = nnx.List(new)
    return model


def stack_of_layer(model: Llama, index: int) -> LayerStack:
    for stack in model.model.blocks:
        if stack.first <= index < stack.first + stack.count:
            return stack
    raise ValueError(f"layer {index} is outside 0..{model.config.num_hidden_layers - 1}")


def init_cache(model: Llama, batch_size: int, max_length: int, dtype=None) -> dict[str, Any]:
    """An empty KV cache: ``k``/``v [layers, B, max_length, kv_heads, head_dim]``, the segment id of
    every slot (0 = empty or padding) and the next slot to write."""
    cfg = model.config
    dtype = dtype or model.dtype
    shape = (cfg.num_hidden_layers, batch_size, max_length, cfg.num_key_value_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch_size, max_length), jnp.int32), "index": jnp.zeros((), jnp.int32)}
