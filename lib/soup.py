"""Weight soups of models fine-tuned from one start, for any zoo model (SoupLM, model soups).

Fixed soups (plain functions over ``nnx.Module``\\ s of one architecture):

    soup.check_compatible(models)                     # one SoupMismatchError listing every differing key
    mixed = soup.interpolate(models, [0.3, 0.7])      # sum_k w_k theta_k, weights sum to 1 (checked)
    mixed = soup.uniform_soup(models)                 # the mean (the paper's vanilla soup at 1/K)
    result = soup.greedy_soup(models, score)          # Wortsman et al. 2022: add in order of score, keep if no drop
    points = soup.interpolation_sweep(models, score)  # score a grid of mixing weights; plot_sweep draws it

Every floating variable is mixed, BatchNorm running statistics included (as the model-soups
code averages the whole state dict); non-floating state (RNG counters) is taken from model 0.
Mixing runs in float32 and is cast back to each variable's dtype.

The learnable soup (SoupLM; LL3M's ``soupLMM``):

    learn = soup.LearnableSoup(models, granularity="layer")   # "model" | "layer" | "module" ("matrix")
    logits = learn(x)          # materialises sum_k softmax(alpha)_k W_k and calls the architecture

The K frozen experts are one copy of the architecture module (``learn.experts``) whose every
mixed variable has a new leading ``expert`` axis (logical name ``"expert"``, so sharding rules
place it like any other axis, e.g. ``("expert", "data")`` or nothing: replicated). The mixing
logits are :class:`SoupAlpha` parameters (an ``nnx.Param`` subclass), initialised to 0 (uniform
after the softmax over K, as LL3M's constant init). Only they are trained:
:class:`SoupTask` sets ``trainable = SoupAlpha``, so the generic step puts the experts in its
frozen state (no gradient, no optimizer state, not in checkpoints).

Granularity (one alpha vector of K logits per group; the weights are ``softmax`` over K):

* ``"model"``: one group for everything: ``alpha [K]``.
* ``"layer"``: one group per layer. A variable stacked over layers (its first logical axis is
  ``"layers"``, as the LLaMA decoder's ``LayerStack``) gets ``alpha [K, L]`` broadcast over that
  axis: alpha[:, i] mixes layer ``stack.first + i``; every variable of one stack shares it. Other
  variables are grouped by their path up to the deepest integer index (``stages/2/blocks/1`` of
  StarNet), or, with none, by their module (``model/embed_tokens``, ``model/norm``, ``lm_head``,
  ``stem``, ``head/fc``).
* ``"module"`` (alias ``"matrix"``): one group per module, LL3M's per-mapping soup: a linear's
  kernel and bias share one alpha, a norm's scale (and BatchNorm's statistics) one; a stacked
  module gets ``alpha [K, L]`` (one per weight matrix per layer).

Regularised soup (the paper gives no formula; this is our choice, documented in the README):
``R = uniform * mean_g ||w_g - 1/K||^2 - entropy * mean_g H(w_g)`` with ``w_g = softmax(alpha_g)``
per column, ``H = -sum_k w log w``. ``uniform > 0`` pulls toward the uniform soup; ``entropy > 0``
rewards spread (stability), ``entropy < 0`` rewards committing to one expert per group.
:class:`SoupTask` adds ``R`` to the inner task's mean loss and logs it as ``soup_reg``.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lib.train.task import Task, Weighted

GRANULARITIES = ("model", "layer", "module")
_ALIASES = {"matrix": "module", "per_matrix": "module", "mapping": "module", "per_layer": "layer",
            "per_model": "model"}
EXPERT_AXIS = "expert"
LAYER_AXIS = "layers"


class SoupMismatchError(ValueError):
    """Models that cannot be souped together: every differing key is listed."""


class SoupAlpha(nnx.Param):
    """Mixing logits of a learnable soup (softmax over the leading expert axis)."""


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


def _flat(model: nnx.Module):
    graphdef, state = nnx.split(model)
    return graphdef, {tuple(p): v for p, v in nnx.to_flat_state(state)}


def _value(var):
    return var.get_value() if isinstance(var, nnx.Variable) else var


def _is_float(var) -> bool:
    return jnp.issubdtype(_value(var).dtype, jnp.floating)


def _names(var) -> tuple:
    names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
    return tuple(names) if names else (None,) * len(_value(var).shape)


def _is_abstract(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def check_compatible(models: Sequence[nnx.Module], names: Sequence[str] | None = None) -> None:
    """Raise one :class:`SoupMismatchError` listing every key that is missing, extra, or of another
    shape or dtype in any model compared with model 0 (and a differing module structure)."""
    models = list(models)
    if len(models) < 1:
        raise SoupMismatchError("a soup needs at least one model")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    ref_graph, ref = _flat(models[0])
    problems = []
    for name, m in zip(names[1:], models[1:]):
        graph, flat = _flat(m)
        if type(m) is not type(models[0]):
            problems.append(f"{name}: type {type(m).__name__} vs {type(models[0]).__name__} ({names[0]})")
        for p in sorted(set(ref) - set(flat), key=_path_str):
            problems.append(f"{name}: missing {_path_str(p)} {tuple(_value(ref[p]).shape)}")
        for p in sorted(set(flat) - set(ref), key=_path_str):
            problems.append(f"{name}: unexpected {_path_str(p)} {tuple(_value(flat[p]).shape)}")
        for p in sorted(set(flat) & set(ref), key=_path_str):
            a, b = _value(ref[p]), _value(flat[p])
            if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
                problems.append(f"{name}: {_path_str(p)} is {tuple(b.shape)} {b.dtype}, "
                                f"{names[0]} has {tuple(a.shape)} {a.dtype}")
        if not problems and graph != ref_graph:
            problems.append(f"{name}: same variables but a different module structure (static attributes) "
                            f"than {names[0]}")
    if problems:
        raise SoupMismatchError(f"{len(problems)} difference(s) between the models to soup:\n  " +
                                "\n  ".join(problems))


def check_weights(weights: Sequence[float], k: int, *, sum_to_one: bool = True, what: str = "weights") -> np.ndarray:
    """``weights`` as a float64 vector of length ``k`` (finite; summing to 1 within 1e-6 when asked)."""
    w = np.asarray(weights, np.float64).reshape(-1)
    if w.size != k:
        raise ValueError(f"{w.size} {what} {w.tolist()} for {k} models")
    if not np.all(np.isfinite(w)):
        raise ValueError(f"{what} must be finite, got {w.tolist()}")
    if sum_to_one and abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"{what} {w.tolist()} sum to {w.sum():.8g}, not 1")
    return w


def _mix(values: Sequence[Any], w: np.ndarray):
    """sum_k w_k values_k in float32, cast back to the dtype of values[0]."""
    dtype = values[0].dtype
    out = sum(jnp.float32(wk) * jnp.asarray(v, jnp.float32) for wk, v in zip(w, values) if wk != 0.0)
    if isinstance(out, int):   # all weights 0 cannot happen when they sum to 1; kept for sum_to_one=False
        out = jnp.zeros(values[0].shape, jnp.float32)
    return out.astype(dtype)


def interpolate(models: Sequence[nnx.Module], weights: Sequence[float], *, sum_to_one: bool = True) -> nnx.Module:
    """A new model ``sum_k weights[k] * models[k]`` (every floating variable; others from model 0).

    Weights must match the number of models and sum to 1 (``sum_to_one=False`` allows any
    combination, e.g. task arithmetic over deltas)."""
    models = list(models)
    check_compatible(models)
    w = check_weights(weights, len(models), sum_to_one=sum_to_one)
    graphdef, ref = _flat(models[0])
    flats = [ref] + [_flat(m)[1] for m in models[1:]]
    out = {}
    for p, var in ref.items():
        if _is_float(var):
            out[p] = var.replace(_mix([_value(f[p]) for f in flats], w))
        else:
            out[p] = var.replace(jnp.asarray(_value(var)))
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def uniform_soup(models: Sequence[nnx.Module]) -> nnx.Module:
    """The mean of the models (every floating variable)."""
    k = len(models)
    return interpolate(models, [1.0 / k] * k, sum_to_one=False)


@dataclasses.dataclass
class GreedyResult:
    model: nnx.Module
    chosen: list[int]                 # indices into the given models, in the order added
    individual: list[float]           # each model's own held-out score
    history: list[tuple[int, float, bool]]   # (candidate, soup score with it, kept)
    score: float                      # the final soup's held-out score


def greedy_soup(models: Sequence[nnx.Module], score: Callable[[nnx.Module], float], *, maximize: bool = True,
                individual: Sequence[float] | None = None) -> GreedyResult:
    """Wortsman et al.'s greedy soup: sort the models by held-out ``score``, start from the best,
    and add each next one to the (uniform) soup only if the held-out score does not drop."""
    models = list(models)
    check_compatible(models)
    scores = [float(score(m)) for m in models] if individual is None else [float(s) for s in individual]
    order = sorted(range(len(models)), key=lambda i: -scores[i] if maximize else scores[i])
    chosen, best = [order[0]], scores[order[0]]
    current = models[order[0]]
    history = []
    for i in order[1:]:
        candidate = uniform_soup([models[j] for j in chosen + [i]])
        s = float(score(candidate))
        keep = s >= best if maximize else s <= best
        history.append((i, s, keep))
        if keep:
            chosen.append(i)
            best, current = s, candidate
    return GreedyResult(current, chosen, scores, history, best)


def default_grid(k: int, steps: int = 10) -> list[np.ndarray]:
    """K=2: ``[1-t, t]`` for t = 0, 1/steps, ..., 1 (the vanilla soup's grid, step 0.1); K>2: the
    simplex lattice with denominator ``steps``."""
    if k == 2:
        return [np.array([1 - t, t]) for t in np.linspace(0, 1, steps + 1)]

    def compositions(n, parts):
        if parts == 1:
            yield (n,)
            return
        for i in range(n + 1):
            for rest in compositions(n - i, parts - 1):
                yield (i, *rest)
    return [np.array(c, np.float64) / steps for c in compositions(steps, k)]


def interpolation_sweep(models: Sequence[nnx.Module], score: Callable[[nnx.Module], Any],
                        grid: Sequence[Sequence[float]] | None = None) -> list[tuple[np.ndarray, Any]]:
    """``[(weights, score(interpolate(models, weights)))]`` over ``grid`` (default :func:`default_grid`).
    ``score`` may return a float or a dict of metrics."""
    models = list(models)
    check_compatible(models)
    grid = default_grid(len(models)) if grid is None else [check_weights(g, len(models)) for g in grid]
    return [(np.asarray(w), score(interpolate(models, w))) for w in grid]


def plot_sweep(points, path=None, *, metric: str | None = None, label: str = "", ax=None, xlabel=None):
    """Draw a K=2 sweep (x = weight of model 1) from :func:`interpolation_sweep`; returns the axes.
    With dict scores, ``metric`` picks one (every metric when None)."""
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    x = [float(w[1]) for w, _ in points]
    first = points[0][1]
    keys = ([metric] if metric else sorted(first)) if isinstance(first, dict) else [None]
    for k in keys:
        y = [float(s[k]) if k is not None else float(s) for _, s in points]
        ax.plot(x, y, marker="o", label=f"{label} {k or ''}".strip())
    ax.set_xlabel(xlabel or "weight of model 1")
    ax.legend()
    ax.grid(alpha=0.3)
    if path is not None:
        ax.figure.tight_layout()
        ax.figure.savefig(path, dpi=120)
    return ax


# ------------------------------------------------------------------------------------------------
# the learnable soup
# ------------------------------------------------------------------------------------------------
def _canonical(granularity: str) -> str:
    g = _ALIASES.get(granularity, granularity)
    if g not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r}: expected one of {GRANULARITIES} (or 'matrix')")
    return g


def _layer_key(path: tuple) -> tuple:
    """Path up to its deepest integer component, or the module (path minus the variable's name)."""
    ints = [i for i, p in enumerate(path[:-1]) if isinstance(p, int)]
    return tuple(path[:ints[-1] + 1]) if ints else tuple(path[:-1])


def _stacked_size(var, names) -> int | None:
    return int(_value(var).shape[0]) if names and names[0] == LAYER_AXIS else None


def _stack(values: Sequence[Any]):
    if any(_is_abstract(v) for v in values):
        # Shapes only (creation inside nnx.eval_shape, e.g. the loop's trainable-filter check).
        return jnp.zeros((len(values), *values[0].shape), values[0].dtype)
    return jnp.stack([jnp.asarray(v) for v in values])


@jax.custom_vjp
def mix_stacked(stacked: jax.Array, w: jax.Array) -> jax.Array:
    """``sum_k w[k] * stacked[k]`` (``w [K]`` or ``[K, L]`` broadcast on the next axis) accumulated in
    float32 and cast to ``stacked.dtype``. The backward pass is written out so that neither the float32
    mixture nor a ``[K, ...]`` float32 copy of the experts is materialised: ``d/dw[k] = sum(g * W_k)``
    as one fused reduction per expert (the experts are constants: no gradient for them)."""
    return _mix_fwd(stacked, w)[0]


def _bcast(w, ndim):
    return w.reshape(w.shape + (1,) * (ndim - w.ndim))


def _mix_fwd(stacked, w):
    k = stacked.shape[0]
    out = sum(_bcast(w[i], stacked.ndim - 1) * stacked[i].astype(jnp.float32) for i in range(k))
    return out.astype(stacked.dtype), (stacked, w)


def _mix_bwd(res, g):
    stacked, w = res
    g = g.astype(jnp.float32)
    axes = tuple(range(w.ndim - 1, stacked.ndim - 1))   # all but the layer axis of [K, L] weights
    dw = jnp.stack([jnp.sum(g * stacked[i].astype(jnp.float32), axis=axes) for i in range(stacked.shape[0])])
    return None, dw.astype(w.dtype)


mix_stacked.defvjp(_mix_fwd, _mix_bwd)


class LearnableSoup(nnx.Module):
    """K frozen experts of one architecture mixed by learned softmax weights (see the module doc).

    Args:
      experts: K models of one architecture (:func:`check_compatible`), concrete or abstract.
      granularity: ``"model"``, ``"layer"`` or ``"module"`` (alias ``"matrix"``).
      init: initial mixing weights ``[K]`` (sum 1; default uniform); logits are ``log(w)``.
      mode: ``"eval"`` (default): the materialised model runs in eval mode (BatchNorm uses the
        mixed running statistics, no dropout) in training too, the experts being frozen;
        ``"as_is"`` leaves the mode to the caller (``learn.train()``/``eval()``).
    """

    def __init__(self, experts: Sequence[nnx.Module], *, granularity: str = "model",
                 init: Sequence[float] | None = None, mode: str = "eval"):
        experts = list(experts)
        check_compatible(experts)
        if mode not in ("eval", "as_is"):
            raise ValueError(f"mode={mode!r}: expected 'eval' or 'as_is'")
        self.k = k = len(experts)
        self.granularity = _canonical(granularity)
        self.mode = mode
        graphdef, ref = _flat(experts[0])
        flats = [ref] + [_flat(m)[1] for m in experts[1:]]
        stacked, assign, groups = {}, [], {}
        for p, var in sorted(ref.items(), key=lambda kv: _path_str(kv[0])):
            if not _is_float(var) or isinstance(var, nnx.RngState):
                stacked[p] = var.replace(_value(var))
                continue
            names = _names(var)
            stacked[p] = var.replace(_stack([_value(f[p]) for f in flats]), out_sharding=(EXPERT_AXIS, *names))
            layers = _stacked_size(var, names)
            if self.granularity == "model":
                key, shape = ("model",), (k,)
            elif self.granularity == "layer":
                key = _layer_key(p)
                shape = (k,) if layers is None else (k, layers)
            else:
                key = tuple(p[:-1])
                shape = (k,) if layers is None else (k, layers)
            key = key + (("layers",) if len(shape) == 2 and self.granularity != "model" else ())
            if key in groups and groups[key][1] != shape:
                raise ValueError(f"group {_path_str(key)}: variables stacked over {groups[key][1][1:]} and "
                                 f"{shape[1:]} layers")
            groups.setdefault(key, (len(groups), shape))
            assign.append((p, groups[key][0]))
        self.experts = nnx.merge(graphdef, nnx.from_flat_state(stacked))
        w0 = check_weights(init, k, what="init weights") if init is not None else np.full(k, 1.0 / k)
        logits0 = np.zeros(k) if init is None else np.where(w0 > 0, np.log(np.maximum(w0, 1e-300)), -1e9)
        alphas = []
        for key, (_, shape) in sorted(groups.items(), key=lambda kv: kv[1][0]):
            value = jnp.asarray(np.broadcast_to(logits0.reshape((k,) + (1,) * (len(shape) - 1)), shape), jnp.float32)
            alphas.append(SoupAlpha(value, out_sharding=(EXPERT_AXIS,) + (LAYER_AXIS,) * (len(shape) - 1),
                                    eager_sharding=False))
        self.alphas = nnx.List(alphas)
        self.group_names = tuple(_path_str(key) for key, _ in sorted(groups.items(), key=lambda kv: kv[1][0]))
        self.assign = tuple(assign)

    # -- the mixing weights -------------------------------------------------------------------
    def weights(self) -> list[jax.Array]:
        """Per group, the mixing weights ``softmax(alpha, axis=0)``: ``[K]`` or ``[K, L]``."""
        return [jax.nn.softmax(a[...].astype(jnp.float32), axis=0) for a in self.alphas]

    def coefficients(self) -> dict[str, np.ndarray]:
        """``{group name: weights}`` as NumPy (for plots and for baking HF checkpoints)."""
        return {name: np.asarray(jax.device_get(w)) for name, w in zip(self.group_names, self.weights())}

    def variable_groups(self) -> dict[str, str]:
        """``{variable path: group name}`` of every mixed variable."""
        return {_path_str(p): self.group_names[g] for p, g in self.assign}

    def set_weights(self, weights: Sequence[float] | np.ndarray, group: int | None = None) -> None:
        """Set the logits so that the weights are ``weights`` ([K], sum 1; zeros give exactly 0)."""
        w = check_weights(weights, self.k)
        logits = np.where(w > 0, np.log(np.maximum(w, 1e-300)), -1e9).astype(np.float32)
        for i, a in enumerate(self.alphas):
            if group is None or group == i:
                shape = a[...].shape
                a[...] = jnp.asarray(np.broadcast_to(logits.reshape((self.k,) + (1,) * (len(shape) - 1)), shape))

    def regularizer(self, uniform: float = 0.0, entropy: float = 0.0) -> jax.Array:
        """``uniform * mean ||w - 1/K||^2 - entropy * mean H(w)`` over every group's columns."""
        total = jnp.float32(0.0)
        if not uniform and not entropy:
            return total
        ws = self.weights()
        if uniform:
            total += uniform * sum(jnp.mean(jnp.sum((w - 1.0 / self.k) ** 2, axis=0)) for w in ws) / len(ws)
        if entropy:
            h = [jnp.mean(-jnp.sum(w * jnp.log(jnp.maximum(w, 1e-30)), axis=0)) for w in ws]
            total -= entropy * sum(h) / len(ws)
        return total

    # -- the forward pass ---------------------------------------------------------------------
    def materialize(self) -> nnx.Module:
        """The architecture module with the mixed weights (traceable; differentiable in alpha)."""
        graphdef, state = nnx.split(self.experts)
        flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
        ws = self.weights()
        for p, g in self.assign:
            var = flat[p]
            stacked = var.get_value()
            mixed = mix_stacked(stacked, ws[g])
            flat[p] = var.replace(mixed, out_sharding=_names(var)[1:])
        model = nnx.merge(graphdef, nnx.from_flat_state(flat))
        if self.mode == "eval":
            model.eval()
        return model

    def __call__(self, *args, **kwargs):
        return self.materialize()(*args, **kwargs)

    def bake(self) -> nnx.Module:
        """The mixed model as an ordinary (concrete) model of the architecture, in its default mode
        (computed by one jitted function: eager mixing would dispatch op by op)."""
        graphdef, state = nnx.split(self)
        return nnx.merge(nnx.graphdef(self.experts), _bake(graphdef, state))

    def expert(self, i: int) -> nnx.Module:
        """Expert ``i`` as an ordinary model (a slice of the stacked weights)."""
        graphdef, state = nnx.split(self.experts)
        flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
        for p, _ in self.assign:
            var = flat[p]
            flat[p] = var.replace(var.get_value()[i], out_sharding=_names(var)[1:])
        return nnx.merge(graphdef, nnx.from_flat_state(flat))

    def num_alphas(self) -> int:
        """Number of mixing-weight vectors (groups times their layer columns)."""
        return int(sum(int(np.prod(a[...].shape[1:])) for a in self.alphas))


@jax.jit
def _bake(graphdef, state):
    return nnx.state(nnx.merge(graphdef, state).materialize())


# ------------------------------------------------------------------------------------------------
# the task: a learnable soup trained through the generic loop with any inner task
# ------------------------------------------------------------------------------------------------
class SoupTask(Task):
    """The learnable soup on any task: ``wrap`` stacks the experts (weights loaded from ``experts``,
    one path per model, into copies of the loop's model) into a :class:`LearnableSoup`; only
    :class:`SoupAlpha` is trained; ``loss`` is the inner task's plus the regulariser; ``unwrap``
    bakes the mixed model (so ``best/`` and exports hold an ordinary model)."""

    trainable = SoupAlpha

    def __init__(self, inner: Task, *, experts: Sequence[str] = (), granularity: str = "model",
                 init: Sequence[float] | None = None, reg_uniform: float = 0.0, reg_entropy: float = 0.0,
                 num_experts: int | None = None, mode: str = "eval"):
        self.inner = inner
        self.experts = list(experts)
        self.num_experts = num_experts or len(self.experts)
        if self.num_experts < 2 and not self.experts:
            raise ValueError("a soup needs experts: give soup.experts (one weights path per model)")
        if self.experts and num_experts and num_experts != len(self.experts):
            raise ValueError(f"num_experts={num_experts} but {len(self.experts)} expert paths")
        self.granularity = _canonical(granularity)
        self.init = None if init is None else check_weights(init, self.num_experts, what="soup.init")
        self.reg_uniform, self.reg_entropy = float(reg_uniform), float(reg_entropy)
        self.mode = mode
        self.best = inner.best

    def model_kwargs(self):
        return self.inner.model_kwargs()

    def constants(self):
        return self.inner.constants()

    def wrap_source(self, source, *, train):
        return self.inner.wrap_source(source, train=train)

    def wrap(self, model, rngs):
        leaves = jax.tree.leaves(nnx.state(model))
        if any(_is_abstract(x) or isinstance(x, jax.core.Tracer) for x in leaves) or not self.experts:
            # shapes only: the loop's trainable check (traced), AOT plans (abstract)
            copies = [model] * self.num_experts
        else:
            from lib import zoo
            copies = []
            for path in self.experts:
                m = nnx.clone(model)
                zoo.load_pretrained(m, path)
                copies.append(m)
        return LearnableSoup(copies, granularity=self.granularity, init=self.init, mode=self.mode)

    def unwrap(self, wrapped):
        return wrapped.bake() if isinstance(wrapped, LearnableSoup) else wrapped

    def _reg(self, model):
        if isinstance(model, LearnableSoup) and (self.reg_uniform or self.reg_entropy):
            return model.regularizer(self.reg_uniform, self.reg_entropy)
        return None

    def loss(self, model, batch, key, consts) -> tuple[Weighted, dict[str, Weighted]]:
        (total, count), metrics = self.inner.loss(model, batch, key, consts)
        reg = self._reg(model)
        if reg is not None:   # added to the mean: sum + R * count
            total = total + reg * count
            metrics = {**metrics, "soup_reg": (reg * count, count)}
        return (total, count), metrics

    def evaluate(self, model, batch, consts):
        return self.inner.evaluate(model, batch, consts)

    def derived(self, means):
        return self.inner.derived(means)


def from_config(config, *, mesh=None, sharding_rules=()) -> SoupTask:
    """``config.task = "soup"`` with ``config.soup``: ``task`` (the inner task's name, e.g.
    "classification", "causal_lm"), ``experts`` (weights paths), ``granularity``, ``init``,
    ``reg_uniform``, ``reg_entropy``."""
    from lib import tasks
    s = config.soup
    inner_cfg = config.copy_and_resolve_references()
    with inner_cfg.unlocked():
        inner_cfg.task = s.get("task", "classification")
    if inner_cfg.task == "soup":
        raise ValueError("soup.task must name the inner task (e.g. 'classification'), not 'soup'")
    inner = tasks.from_config(inner_cfg, mesh=mesh, sharding_rules=sharding_rules)
    init = s.get("init", None)
    return SoupTask(inner, experts=list(s.get("experts", ())), granularity=s.get("granularity", "model"),
                    init=list(init) if init else None, reg_uniform=s.get("reg_uniform", 0.0),
                    reg_entropy=s.get("reg_entropy", 0.0), num_experts=s.get("num_experts", None),
                    mode=s.get("mode", "eval"))
