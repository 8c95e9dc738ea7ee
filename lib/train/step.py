"""The jitted train and eval steps: pure functions over split NNX state.

The model is split once into ``graphdef`` (static structure) and state pytrees; the step merges
them inside ``jax.jit``, differentiates the ``nnx.Param`` state only (taking ``jax.grad`` over a
whole module would silently drop the BatchNorm statistic updates) and returns the new state.
In/out shardings are explicit and the state is donated.

The train state is a plain dict, which is also exactly what a checkpoint holds:
``params`` (nnx.Param), ``rest`` (BatchNorm statistics, RNG stream state), ``opt`` (optax),
``ema`` (an EMA of params, or None), ``step`` (int32 scalar).
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lib.train import distill as distill_lib
from lib.train import losses


@dataclasses.dataclass(frozen=True)
class StepConfig:
    num_classes: int
    label_smoothing: float = 0.0
    ema_decay: float = 0.0                 # 0 disables the EMA
    grad_accum_steps: int = 1              # micro-batches per optimizer step
    mixup: Callable | None = None          # (key, images, labels, extra=None) -> (images, soft targets[, extra])
    distill: distill_lib.Distillation | None = None  # soft distillation: needs a teacher or teacher logits


def _stream_policy(path, key, shape):
    """Reseed each RNG stream with its own key: the step key folded with a hash of its path."""
    return jax.random.fold_in(key, zlib.crc32(repr(path).encode()) & 0x7FFFFFFF)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, ema: bool):
    """Split ``model`` into ``(graphdef, state)``; the optimizer moments inherit the parameters'
    shardings, and leaves with no sharding of their own (counters, the step) are replicated over
    the parameters' mesh."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    meshes = {x.sharding.mesh for x in jax.tree.leaves(params) if isinstance(x.sharding, NamedSharding)}
    if meshes:
        # Moments are sharded exactly like their parameters; counters are replicated.
        replicated = NamedSharding(next(iter(meshes)), P())
        opt_shardings = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params),
                                              jax.tree.map(lambda x: x.sharding, params),
                                              transform_non_params=lambda _: replicated)
        opt = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    else:
        opt = jax.jit(tx.init)(params)
    state = {"params": params, "rest": rest, "opt": opt,
             "ema": jax.tree.map(jnp.copy, params) if ema else None,
             "step": jnp.zeros((), jnp.int32)}
    if meshes:
        state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
                             state)
    return graphdef, state


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: StepConfig, *, base_key: jax.Array,
                    state_shardings, batch_shardings, donate: bool = True, teacher: nnx.Module | None = None):
    """``step(state, batch) -> (state, metrics)``; ``batch`` has ``image`` [B,H,W,C] and ``label`` [B].

    Distillation (``cfg.distill``) takes its teacher from ``teacher`` (a model in eval mode, run on
    the same mixed images; its state is a non-donated input of the jitted step, not part of
    ``state``) or from precomputed logits in ``batch["teacher_logits"]`` [B, K].
    """
    k = cfg.grad_accum_steps
    dcfg = cfg.distill
    teacher_graphdef, teacher_state = nnx.split(teacher) if teacher is not None else (None, None)
    if dcfg is not None and teacher is None and distill_lib.TEACHER_LOGITS_KEY not in (batch_shardings or {}):
        raise ValueError("cfg.distill is set but there is no teacher: pass teacher=<model> or batches with "
                         f"{distill_lib.TEACHER_LOGITS_KEY!r}")

    def mix_and_teach(batch, key, teacher_state):
        """Mixed images, soft targets and (when distilling) the teacher's log-probabilities."""
        images, labels = batch["image"], batch["label"]
        stored = batch.get(distill_lib.TEACHER_LOGITS_KEY) if dcfg is not None else None
        teacher_probs = None if stored is None else jnp.exp(distill_lib.teacher_log_probs(stored, dcfg.tau))
        if cfg.mixup is not None and teacher_probs is not None:
            images, targets, teacher_probs = cfg.mixup(jax.random.fold_in(key, 0), images, labels, extra=teacher_probs)
        elif cfg.mixup is not None:
            images, targets = cfg.mixup(jax.random.fold_in(key, 0), images, labels)
        else:
            targets = losses.smoothed_one_hot(labels, cfg.num_classes, cfg.label_smoothing)
        if dcfg is None:
            return images, targets, None
        if teacher_probs is not None:
            return images, targets, jnp.log(teacher_probs)
        return images, targets, distill_lib.teacher_log_probs(nnx.merge(teacher_graphdef, teacher_state)(images),
                                                              dcfg.tau)

    def loss_and_grads(params, rest, batch, key, teacher_state):
        images, targets, teacher_lp = mix_and_teach(batch, key, teacher_state)

        def loss_fn(p):  # copy: fresh Variables at this trace level, so BatchNorm may update them
            model = nnx.merge(graphdef, p, rest, copy=True)
            nnx.reseed(model, dropout=jax.random.fold_in(key, 1), policy=_stream_policy)
            logits = model(images)
            loss = jnp.mean(losses.soft_target_cross_entropy(logits, targets))
            kl = jnp.zeros(())
            if dcfg is not None:
                kl = jnp.mean(distill_lib.kl_divergence(logits, teacher_lp, dcfg.tau))
                loss = distill_lib.combine(loss, kl, dcfg)
            return loss, (logits, kl, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (logits, kl, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        correct = losses.topk_correct(logits, batch["label"], 1)
        return loss, grads, new_rest, {"top1": jnp.mean(correct), "distill_kl": kl}

    def step(state, batch, teacher_state):
        key = jax.random.fold_in(base_key, state["step"])
        params, rest = state["params"], state["rest"]
        if k == 1:
            loss, grads, rest, extra = loss_and_grads(params, rest, batch, key, teacher_state)
        else:  # equal micro-batches, gradients averaged: the same as one k-times larger batch
            micro = batch["image"].shape[0] // k
            loss, grads = 0.0, jax.tree.map(jnp.zeros_like, params)
            extra = {"top1": 0.0, "distill_kl": 0.0}
            for i in range(k):
                part = {name: v[i * micro:(i + 1) * micro] for name, v in batch.items()}
                l, g, rest, e = loss_and_grads(params, rest, part, jax.random.fold_in(key, 2 + i), teacher_state)
                loss = loss + l / k
                extra = jax.tree.map(lambda s, x: s + x / k, extra, e)
                grads = jax.tree.map(lambda s, x: s + x / k, grads, g)
        updates, opt = tx.update(grads, state["opt"], params)
        params = optax.apply_updates(params, updates)
        ema = state["ema"]
        if ema is not None:
            ema = jax.tree.map(lambda e, p: cfg.ema_decay * e + (1 - cfg.ema_decay) * p, ema, params)
        metrics = {"loss": loss, "top1": extra["top1"], "grad_norm": optax.tree.norm(grads),
                   "param_norm": optax.tree.norm(params)}
        if dcfg is not None:
            metrics["distill_kl"] = extra["distill_kl"]
        new_state = {"params": params, "rest": rest, "opt": opt, "ema": ema, "step": state["step"] + 1}
        return new_state, metrics

    if teacher is None:
        return jax.jit(lambda state, batch: step(state, batch, None),
                       in_shardings=(state_shardings, batch_shardings),
                       out_shardings=(state_shardings, None), donate_argnums=(0,) if donate else ())
    jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings, shardings_of(teacher_state)),
                     out_shardings=(state_shardings, None), donate_argnums=(0,) if donate else ())
    return lambda state, batch: jitted(state, batch, teacher_state)


def make_eval_step(graphdef, *, state_shardings=None, batch_shardings=None):
    """``evaluate(params, rest, batch) -> sums`` of loss, top-1, top-5 and example count (masked)."""
    def evaluate(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        model.eval()
        logits = model(batch["image"])
        mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
        ce = losses.cross_entropy(logits, batch["label"])
        return {"loss": jnp.sum(ce * mask), "top1": jnp.sum(losses.topk_correct(logits, batch["label"], 1) * mask),
                "top5": jnp.sum(losses.topk_correct(logits, batch["label"], 5) * mask), "count": jnp.sum(mask)}
    if state_shardings is None:
        return jax.jit(evaluate)
    return jax.jit(evaluate, in_shardings=(state_shardings["params"], state_shardings["rest"], batch_shardings))
