"""The task interface: what a run optimises and measures. The step and the loop know nothing else.

A task receives the *model* (not its logits), so it can call it twice, beside a teacher, or on a
masked view; it returns every loss and metric as a ``Weighted`` pair ``(sum, count)``, so means stay
exact across gradient-accumulation micro-batches, devices and eval batches (token-weighted losses
included: the mean is ``sum of sums / sum of counts``, never a mean of means).

    class MyTask(Task):
        best = ("loss", "min")
        def loss(self, model, batch, key, consts):
            per_example = ...                                  # [B]
            return weighted(per_example), {"acc": weighted(correct)}
        def evaluate(self, model, batch, consts):
            return {"loss": weighted(..., batch["valid"])}

What a task may also own:

* ``trainable``: an nnx filter of the variables it trains (default every ``nnx.Param``); the
  config's ``trainable`` path regexes narrow it further (``lib.train.step.trainable_filter``).
* ``wrap(model, rngs)`` / ``unwrap(wrapped)``: extra trained modules (distillation heads) put
  around the model for training, dropped again for ``best/`` and exports.
* ``constants()``: untrained inputs of the step (a teacher's state), passed as non-donated jit
  arguments, never part of the train state or its checkpoints; they come back as ``consts``.
* ``model_kwargs()``: what the task needs from the model's constructor (``num_classes``).
* ``wrap_source(source, train=...)``: per-example side data joined to the data source (a teacher's
  precomputed logits); the pipeline passes unknown keys through its transforms unchanged.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Weighted = tuple[jax.Array, jax.Array]   # (sum, count)


def weighted(values: jax.Array, weights: jax.Array | None = None) -> Weighted:
    """``(sum(values * weights), sum(weights))`` in float32; ``weights`` default to ones.

    ``values`` may have more axes than ``weights`` (``[B, T]`` token losses with ``[B]`` row weights).
    """
    values = jnp.asarray(values, jnp.float32)
    if weights is None:
        return jnp.sum(values), jnp.asarray(values.size, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    weights = jnp.broadcast_to(weights.reshape(weights.shape + (1,) * (values.ndim - weights.ndim)), values.shape)
    return jnp.sum(values * weights), jnp.sum(weights)


def mean_of(pair: Weighted) -> jax.Array:
    """The mean a :data:`Weighted` pair stands for (0 when nothing was counted)."""
    total, count = pair
    return total / jnp.maximum(count, 1e-12)


class Task:
    """Base class: identity wrapping, no constants, every ``nnx.Param`` trained, best = lowest loss."""

    trainable: Any = nnx.Param
    best: tuple[str, str] = ("loss", "min")   # (eval metric, "min" | "max"): picks best/ and the final line

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def wrap(self, model: nnx.Module, rngs: nnx.Rngs) -> nnx.Module:
        return model

    def unwrap(self, wrapped: nnx.Module) -> nnx.Module:
        return wrapped

    def constants(self) -> Any:
        return None

    def wrap_source(self, source: Any, *, train: bool) -> Any:
        """The random-access data source of the train or eval split as the task wants it (e.g. with
        per-example side data added)."""
        return source

    def loss(self, model: nnx.Module, batch: dict[str, jax.Array], key: jax.Array,
             consts: Any) -> tuple[Weighted, dict[str, Weighted]]:
        """The training loss of one (micro-)batch and the metrics to log, all as (sum, count)."""
        raise NotImplementedError

    def evaluate(self, model: nnx.Module, batch: dict[str, jax.Array], consts: Any) -> dict[str, Weighted]:
        """Eval metrics of one batch (model already in eval mode); padded rows have ``valid`` 0."""
        raise NotImplementedError

    def derived(self, means: dict[str, float]) -> dict[str, float]:
        """Metrics computed from the eval means that are not means themselves (perplexity)."""
        return {}

    def is_better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best if self.best[1] == "min" else value > best
