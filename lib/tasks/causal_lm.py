"""Causal language modelling (pre-training and SFT) as a task: token cross-entropy over a loss mask.

Batches (``lib.data.text``) hold ``input_ids``, ``targets`` (the next token), ``loss_mask`` (1 where
a target is trained on: assistant tokens for chat SFT, every real token for plain text),
``segment_ids`` (packed documents; 0 = padding) and ``positions`` (restarting per document). The
loss is ``sum(masked token NLL) / number of masked tokens`` over the whole global batch, every
micro-batch and device (the ``(sum, count)`` pairs of ``lib.train.task``), never a mean of per-row
means. Optional z-loss (PaLM): ``z_loss * logsumexp(logits)^2`` on the same tokens.
Evaluation reports ``loss``, ``accuracy`` (next-token top-1) and ``perplexity`` = exp(loss).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from lib.train.task import Task, Weighted, weighted


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token NLL and log-normaliser ``[B, T]`` from float32 ``logits [B, T, V]``."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return nll, lse


class CausalLM(Task):
    best = ("loss", "min")

    def __init__(self, *, z_loss: float = 0.0):
        self.z_loss = float(z_loss)

    def _forward(self, model, batch):
        logits = model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        mask = batch["loss_mask"].astype(jnp.float32)
        if "valid" in batch:   # padded eval rows
            mask = mask * batch["valid"].astype(jnp.float32)[:, None]
        nll, lse = token_losses(logits, batch["targets"])
        correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
        return nll, lse, correct, mask

    def loss(self, model, batch, key, consts) -> tuple[Weighted, dict[str, Weighted]]:
        nll, lse, correct, mask = self._forward(model, batch)
        total = nll + self.z_loss * lse ** 2 if self.z_loss else nll
        metrics = {"accuracy": weighted(correct, mask), "nll": weighted(nll, mask)}
        if self.z_loss:
            metrics["z_loss"] = weighted(lse ** 2, mask)
        return weighted(total, mask), metrics

    def evaluate(self, model, batch, consts) -> dict[str, Weighted]:
        nll, _, correct, mask = self._forward(model, batch)
        return {"loss": weighted(nll, mask), "accuracy": weighted(correct, mask)}

    def derived(self, means: dict[str, float]) -> dict[str, float]:
        return {"perplexity": math.exp(min(means["loss"], 80.0))} if "loss" in means else {}


def from_config(config, *, mesh=None, sharding_rules=()) -> CausalLM:
    return CausalLM(z_loss=config.get("z_loss", 0.0))
