"""The jitted train and eval steps: pure functions over split NNX state, for every task.

The model is split once, outside ``jit``, three ways (:func:`split_model`):

* ``params``: what is trained, the task's ``trainable`` filter narrowed by the config's path regexes.
  Only these are differentiated and only these have optimizer state.
* ``frozen``: every other ``nnx.Param`` and every ``FrozenWeight``. A non-donated input of the step:
  never differentiated, never in optimizer state, never in checkpoints (only their manifest).
* ``rest``: mutable non-trained state (BatchNorm statistics, RNG streams), carried through the step.

The step merges them inside ``jax.jit`` (taking ``jax.grad`` over a whole module would silently drop
the BatchNorm updates), asks the task for its loss as ``(sum, count)`` and differentiates the mean
``sum / count``; with gradient accumulation each micro-batch's gradient is weighted by its share of
the total count, so micro-batches of any weighting (token counts) equal one large batch. In/out shardings are explicit; the state is donated.

The train state is a plain dict, which is also exactly what a checkpoint holds:
``params``, ``rest``, ``opt`` (optax), ``ema`` (an EMA of params, or None), ``step`` (int32 scalar).
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lib.layers.masked import FrozenWeight
from lib.train.task import Task, mean_of

# What is never trained: parameters outside the trainable subset and weights that are frozen by kind.
FROZEN = nnx.Any(nnx.Param, FrozenWeight)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    ema_decay: float = 0.0                 # 0 disables the EMA
    grad_accum_steps: int = 1              # micro-batches per optimizer step


def path_string(path) -> str:
    return "/".join(str(p) for p in path)


def trainable_filter(base: Any = nnx.Param, patterns: Sequence[str] = ()):
    """``base`` (an nnx filter, a task's ``trainable``) narrowed to the variables whose path
    ``"a/b/0/kernel"`` matches one of ``patterns`` (``re.search``); all of ``base`` when empty."""
    if not patterns:
        return base
    compiled = [re.compile(p) for p in patterns]
    return nnx.All(base, lambda path, value: any(c.search(path_string(path)) for c in compiled))


class NothingTrainable(ValueError):
    """The trainable filter matches no parameter."""


def split_model(model: nnx.Module, trainable: Any = nnx.Param):
    """``(graphdef, params, frozen, rest)``: trained / frozen / mutable state (see the module doc)."""
    graphdef, params, frozen, rest = nnx.split(model, trainable, FROZEN, ...)
    if not jax.tree.leaves(params):
        names = [path_string(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        raise NothingTrainable(f"the trainable filter matches no parameter of {type(model).__name__}; its "
                               f"{len(names)} parameters include: {', '.join(names[:8])}"
                               f"{', ...' if len(names) > 8 else ''}")
    return graphdef, params, frozen, rest


def _stream_policy(path, key, shape):
    """Reseed each RNG stream with its own key: the step key folded with a hash of its path."""
    return jax.random.fold_in(key, zlib.crc32(repr(path).encode()) & 0x7FFFFFFF)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, ema: bool,
                     trainable: Any = nnx.Param):
    """Split ``model`` and build its train state; returns ``(graphdef, state, frozen)``.

    The optimizer moments inherit the trained parameters' shardings; leaves with no sharding of their
    own (counters, the step) are replicated over the parameters' mesh.
    """
    graphdef, params, frozen, rest = split_model(model, trainable)
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
    return graphdef, state, frozen


def abstract_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, ema: bool = False,
                         trainable: Any = nnx.Param):
    """:func:`init_train_state` for an abstract model (``jax.ShapeDtypeStruct`` leaves carrying their
    shardings, e.g. ``zoo.create_model(..., abstract=True, mesh=mesh)``): the state's shapes and
    shardings without memory, for ahead-of-time compilation (``step.lower(state, batch).compile()``)
    of models this machine cannot hold. The moments shard like their parameters."""
    graphdef, params, frozen, rest = split_model(model, trainable)
    meshes = {x.sharding.mesh for x in jax.tree.leaves(params) if isinstance(x.sharding, NamedSharding)}
    if len(meshes) != 1:
        raise ValueError("abstract_train_state needs a model whose parameters are sharded over one mesh")
    replicated = NamedSharding(next(iter(meshes)), P())
    opt_shapes = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, shardings_of(params),
                                          transform_non_params=lambda _: replicated)
    opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_shapes, opt_shardings)
    state = {"params": params, "rest": rest, "opt": opt, "ema": params if ema else None,
             "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)}
    return graphdef, state, frozen


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _leading_size(batch) -> int:
    return jax.tree.leaves(batch)[0].shape[0]


class TrainStep:
    """``step(state, batch) -> (state, metrics)``: the jitted step with the frozen state and the
    task's constants bound as non-donated arguments. ``lower(state, batch)`` compiles ahead of time
    (abstract inputs are fine), e.g. to read XLA's memory analysis."""

    def __init__(self, jitted, frozen, consts):
        self.jitted, self.frozen, self.consts = jitted, frozen, consts

    def __call__(self, state, batch):
        return self.jitted(state, self.frozen, batch, self.consts)

    def lower(self, state, batch):
        return self.jitted.lower(state, self.frozen, batch, self.consts)


_TASK_CONSTANTS = object()


def make_train_step(graphdef, tx: optax.GradientTransformation, task: Task, *, frozen, base_key: jax.Array,
                    options: StepOptions = StepOptions(), trainable: Any = nnx.Param, consts: Any = _TASK_CONSTANTS,
                    state_shardings=None, batch_shardings=None, donate: bool = True) -> TrainStep:
    """The train step of ``task`` over a model split by :func:`init_train_state`.

    ``consts``: the task's constants as placed for this run (default ``task.constants()``). With
    ``state_shardings`` (the train state's) the outputs have explicit shardings and so do the inputs:
    the frozen state and the constants keep their own; the batch takes ``batch_shardings``, or the
    shardings its arrays arrive with when that is None.
    """
    k = options.grad_accum_steps
    consts = task.constants() if consts is _TASK_CONSTANTS else consts

    def micro_step(params, rest, batch, key, frozen, consts):
        """Loss (sum, count), metrics, new mutable state and the gradient of the micro-batch's mean."""
        def loss_fn(p):  # copy: fresh Variables at this trace level, so BatchNorm may update them
            model = nnx.merge(graphdef, p, frozen, rest, copy=True)
            nnx.reseed(model, dropout=jax.random.fold_in(key, 1), policy=_stream_policy)
            (total, count), metrics = task.loss(model, batch, key, consts)
            new_rest = nnx.split(model, trainable, FROZEN, ...)[3]
            return mean_of((total, count)), (total, count, metrics, new_rest)

        (_, (total, count, metrics, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return (total, count), metrics, rest, grads

    def step(state, frozen, batch, consts):
        key = jax.random.fold_in(base_key, state["step"])
        params, rest = state["params"], state["rest"]
        if k == 1:
            loss, metrics, rest, grads = micro_step(params, rest, batch, key, frozen, consts)
        else:  # equal micro-batches: the gradient of the mean over all of them, weighted by their counts
            micro = _leading_size(batch) // k
            outs = []
            for i in range(k):
                part = jax.tree.map(lambda v: v[i * micro:(i + 1) * micro], batch)
                outs.append(micro_step(params, rest, part, jax.random.fold_in(key, 2 + i), frozen, consts))
                rest = outs[-1][2]
            loss, metrics = jax.tree.map(lambda *x: sum(x), *[(o[0], o[1]) for o in outs])
            grads = jax.tree.map(jnp.zeros_like, params)
            for (_, count), _, _, g in outs:
                share = mean_of((count, loss[1]))   # this micro-batch's share of the whole count
                grads = jax.tree.map(lambda s, x: s + x * share, grads, g)
        updates, opt = tx.update(grads, state["opt"], params)
        params = optax.apply_updates(params, updates)
        ema = state["ema"]
        if ema is not None:
            ema = jax.tree.map(lambda e, p: options.ema_decay * e + (1 - options.ema_decay) * p, ema, params)
        logged = {"loss": mean_of(loss), **{name: mean_of(pair) for name, pair in metrics.items()},
                  "grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}
        new_state = {"params": params, "rest": rest, "opt": opt, "ema": ema, "step": state["step"] + 1}
        return new_state, logged

    donate_argnums = (0,) if donate else ()
    if state_shardings is None:
        jitted = jax.jit(step, donate_argnums=donate_argnums)
    elif batch_shardings is None:  # inputs keep the shardings they arrive with
        jitted = jax.jit(step, out_shardings=(state_shardings, None), donate_argnums=donate_argnums)
    else:
        jitted = jax.jit(step, in_shardings=(state_shardings, shardings_of(frozen), batch_shardings,
                                             shardings_of(consts)),
                         out_shardings=(state_shardings, None), donate_argnums=donate_argnums)
    return TrainStep(jitted, frozen, consts)


class EvalStep:
    """``evaluate(params, rest, batch) -> {metric: (sum, count)}`` with the frozen state and the
    task's constants bound; sum the pairs over batches (:func:`lib.train.loop.evaluate`)."""

    def __init__(self, jitted, frozen, consts, task=None):
        self.jitted, self.frozen, self.consts, self.task = jitted, frozen, consts, task

    def __call__(self, params, rest, batch):
        return self.jitted(params, self.frozen, rest, batch, self.consts)


def make_eval_step(graphdef, task: Task, *, frozen, consts: Any = _TASK_CONSTANTS) -> EvalStep:
    """The eval step of ``task``; its inputs keep the shardings they arrive with."""
    consts = task.constants() if consts is _TASK_CONSTANTS else consts

    def evaluate(params, frozen, rest, batch, consts):
        model = nnx.merge(graphdef, params, frozen, rest)
        model.eval()
        return task.evaluate(model, batch, consts)

    return EvalStep(jax.jit(evaluate), frozen, consts, task)
