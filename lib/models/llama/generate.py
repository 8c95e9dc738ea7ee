"""Batched generation with the KV cache: left-padded prompts, one prefill, then a jitted decode loop.

    out = generate(model, [tokenizer.encode(p) for p in prompts], max_new_tokens=64,
                   sampling=Sampling(temperature=0.7, top_p=0.9), stop_tokens=[eos_id])
    out.tokens   # [B, max_new_tokens] new tokens, pad after a row stops; out.lengths per row

:func:`generate` runs the whole loop inside one ``lax.while_loop`` (stops early when every row has
stopped); :func:`stream` runs the same compiled step from Python and yields each step's tokens, for a
chat that prints as it goes. Positions of left-padded prompts are ``cumsum(mask) - 1``; padding
slots carry segment 0, so no row ever attends to them.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib.models.llama.model import Llama, init_cache


class PromptTooLong(ValueError):
    """A prompt plus the token budget exceeds the positions the model supports."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; ``top_k`` 0 and ``top_p`` 1.0 disable those filters."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"bad sampling settings {self}: temperature >= 0, top_k >= 0, 0 < top_p <= 1")


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray        # [B, max_new_tokens] int32, pad_id after a row stopped
    lengths: np.ndarray       # [B] new tokens per row, the stop token included
    prompt_lengths: np.ndarray

    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens ``[B]`` from last-position ``logits [B, V]`` (float32)."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg = jnp.finfo(logits.dtype).min
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        cutoff_index = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < sampling.top_p, axis=-1) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index[:, None], axis=-1)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` ``[B, max_len]`` with the prompts right-aligned."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def _stop_array(stop_tokens: tuple[int, ...]) -> jax.Array:
    """Stop ids padded with -1 to a multiple of 8 (a dynamic argument: new stop ids, no recompile)."""
    width = 8 * max(1, -(-len(stop_tokens) // 8))
    return jnp.asarray(list(stop_tokens) + [-1] * (width - len(stop_tokens)), jnp.int32)


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, sampling: Sampling, max_new_tokens: int, pad_id: int):
    def prefill(state, ids, mask):
        model = nnx.merge(graphdef, state)
        cache = init_cache(model, ids.shape[0], ids.shape[1] + max_new_tokens)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        logits, cache = model(ids, positions=positions, segment_ids=mask, cache=cache)
        return logits[:, -1], cache, positions[:, -1]

    def step(state, carry, stops):
        """One token per row: sample from the last logits, feed it back, update the cache."""
        logits, cache, last_pos, done, key = carry
        key, sub = jax.random.split(key)
        token = sample(logits, sub, sampling)
        token = jnp.where(done, pad_id, token)
        model = nnx.merge(graphdef, state)
        b = token.shape[0]
        new_logits, cache = model(token[:, None], positions=(last_pos + 1)[:, None],
                                  segment_ids=jnp.ones((b, 1), jnp.int32), cache=cache)
        now_done = done | jnp.isin(token, stops)
        return token, (new_logits[:, -1], cache, last_pos + 1, now_done, key), done

    def run(state, ids, mask, key, stops):
        logits, cache, last_pos = prefill(state, ids, mask)
        b = ids.shape[0]
        out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
        lengths = jnp.zeros((b,), jnp.int32)
        carry = (logits, cache, last_pos, jnp.zeros((b,), bool), key)

        def cond(loop):
            i, _, _, carry = loop
            return (i < max_new_tokens) & ~jnp.all(carry[3])

        def body(loop):
            i, out, lengths, carry = loop
            token, carry, was_done = step(state, carry, stops)
            out = out.at[:, i].set(token)
            return i + 1, out, lengths + (~was_done).astype(jnp.int32), carry

        _, out, lengths, _ = jax.lax.while_loop(cond, body, (0, out, lengths, carry))
        return out, lengths

    return jax.jit(run), jax.jit(prefill), jax.jit(step, donate_argnums=(1,))


def _prepare(model: Llama, prompts, max_new_tokens: int, pad_id: int | None):
    cfg = model.config
    if pad_id is None:
        pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad_id)
    total = ids.shape[1] + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise PromptTooLong(f"prompt of {ids.shape[1]} tokens + {max_new_tokens} new tokens = {total} positions, "
                            f"but the model supports {cfg.max_position_embeddings} (max_position_embeddings)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: at least 1")
    return ids, mask, total, pad_id


def _stops(model: Llama, stop_tokens):
    if stop_tokens is None:
        eos = model.config.eos_token_id
        stop_tokens = () if eos is None else (eos if isinstance(eos, tuple) else (eos,))
    return tuple(int(t) for t in stop_tokens)


def generate(model: Llama, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             sampling: Sampling = Sampling(), stop_tokens: Sequence[int] | None = None, pad_id: int | None = None,
             seed: int = 0) -> Generation:
    """Generate for a batch of token-id prompts (different lengths are left-padded).

    ``stop_tokens`` default to the config's ``eos_token_id``; a row stops after emitting one.
    """
    ids, mask, _, pad_id = _prepare(model, prompts, max_new_tokens, pad_id)
    graphdef, state = nnx.split(model)
    run, _, _ = _compiled(graphdef, sampling, max_new_tokens, pad_id)
    out, lengths = run(state, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed),
                       _stop_array(_stops(model, stop_tokens)))
    return Generation(np.asarray(out), np.asarray(lengths), mask.sum(1))


def stream(model: Llama, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
           sampling: Sampling = Sampling(), stop_tokens: Sequence[int] | None = None, pad_id: int | None = None,
           seed: int = 0) -> Iterator[np.ndarray]:
    """As :func:`generate`, yielding each step's tokens ``[B]`` (pad for stopped rows) as they come."""
    ids, mask, _, pad_id = _prepare(model, prompts, max_new_tokens, pad_id)
    graphdef, state = nnx.split(model)
    _, prefill, step = _compiled(graphdef, sampling, max_new_tokens, pad_id)
    stops = _stop_array(_stops(model, stop_tokens))
    logits, cache, last_pos = prefill(state, jnp.asarray(ids), jnp.asarray(mask))
    carry = (logits, cache, last_pos, jnp.zeros((ids.shape[0],), bool), jax.random.key(seed))
    for _ in range(max_new_tokens):
        token, carry, _ = step(state, carry, stops)
        yield np.asarray(token)
        if bool(np.all(np.asarray(carry[3]))):
            return
