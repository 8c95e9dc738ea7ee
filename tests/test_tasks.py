"""The task interface and trainable subsets: what the one step and loop promise every task.

Only the trainable subset has optimizer state (accumulation with unequal counts per micro-batch:
tests/test_train.py); frozen state is bitwise untouched and never donated; a task
may own trained modules (dropped by ``unwrap`` for best/) and constants; bad filters fail early.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib import tasks, zoo
from lib.layers.linear import Linear
from lib.tasks import losses
from lib.tasks.classification import Classification
from lib.train import loop, optim, step as step_lib
from lib.train.task import Task, weighted
from tests.test_train import read_metrics, tiny_config


def test_weighted_pairs_broadcast_row_weights_over_tokens():
    values = jnp.arange(6.0).reshape(2, 3)
    assert [float(x) for x in weighted(values)] == [15.0, 6.0]
    assert [float(x) for x in weighted(values, jnp.array([0.0, 1.0]))] == [12.0, 3.0]


def test_with_one_percent_trainable_the_optimizer_holds_exactly_those_moments():
    # Abstract shapes only: starnet_s1 at full size costs no memory.
    model = zoo.create_model("starnet_s1", abstract=True)
    trainable = step_lib.trainable_filter(nnx.Param, ["^stages/3/blocks/.*/dwconv/"])   # 1.04%
    _, params, frozen, _ = step_lib.split_model(model, trainable)
    n_trained = sum(x.size for x in jax.tree.leaves(params))
    n_all = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert 0.005 < n_trained / n_all < 0.02
    opt = jax.eval_shape(optim.make_optimizer(lambda s: 1e-3).init, params)
    # AdamW: mu and nu of exactly the trained leaves (same paths, shapes, dtypes); the rest scalars.
    moments = [x for x in jax.tree.leaves(opt) if x.ndim > 0]
    want = sorted((x.shape, x.dtype) for x in jax.tree.leaves(params)) * 2
    assert sorted((x.shape, x.dtype) for x in moments) == sorted(want)
    assert sum(x.size for x in moments) == 2 * n_trained
    assert sum(x.size for x in jax.tree.leaves(frozen)) == n_all - n_trained


def test_frozen_state_is_bitwise_unchanged_after_10_donated_steps():
    model = zoo.create_model("test_starnet_tiny", num_classes=10, rngs=0)
    trainable = step_lib.trainable_filter(nnx.Param, ["^head/"])
    tx = optim.make_optimizer(lambda s: 1e-2, weight_decay=0.5)   # decay would move frozen weights if applied
    graphdef, state, frozen = step_lib.init_train_state(model, tx, ema=False, trainable=trainable)
    before = jax.tree.map(np.array, frozen)
    train = step_lib.make_train_step(graphdef, tx, Classification(10), frozen=frozen, trainable=trainable,
                                     base_key=jax.random.key(0), donate=True)
    rng = np.random.default_rng(0)
    head_before = np.array(state["params"]["head"]["fc"]["kernel"][...])
    for _ in range(10):
        batch = {"image": rng.standard_normal((8, 16, 16, 3)).astype(np.float32),
                 "label": rng.integers(0, 10, 8).astype(np.int32)}
        state, _ = train(state, batch)
    # Not donated (a donated array would be deleted) and bitwise equal.
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), train.frozen, before)
    assert not np.allclose(np.asarray(state["params"]["head"]["fc"]["kernel"][...]), head_before)


class AuxHead(nnx.Module):
    def __init__(self, model, num_classes, rngs):
        self.model = model
        self.aux = Linear(num_classes, num_classes, rngs=rngs)


class AuxHeadTask(Classification):
    """A task that owns a trained module (an auxiliary head over the logits, dropped at export) and
    a constant (a logit bias, passed to the step as a non-donated input)."""

    def wrap(self, model, rngs):
        return AuxHead(model, self.num_classes, rngs)

    def unwrap(self, wrapped):
        return wrapped.model

    def constants(self):
        return {"bias": jnp.linspace(-1.0, 1.0, self.num_classes)}

    def loss(self, model, batch, key, consts):
        logits = model.model(batch["image"])
        aux = model.aux(logits) + consts["bias"]
        ce, n = weighted(losses.cross_entropy(logits, batch["label"]))
        aux_ce, _ = weighted(losses.cross_entropy(aux, batch["label"]))
        return (ce + 0.5 * aux_ce, n), {"aux_ce": (aux_ce, n)}

    def evaluate(self, model, batch, consts):
        return super().evaluate(model.model, batch, consts)


def test_a_task_owns_modules_and_constants_and_best_weights_drop_them(tmp_path, capsys):
    tasks.register_task("test_aux_head", lambda config, **_: AuxHeadTask(config.num_classes))
    with pytest.raises(ValueError, match="already registered"):
        tasks.register_task("test_aux_head", lambda config, **_: None)
    cfg = tiny_config(task="test_aux_head", total_steps=2, eval_every=1, checkpoint_every=0)
    cfg.model.name = "test_demonet_tiny"
    result = loop.run(cfg, tmp_path / "run")
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"final: top1={result['top1']:.4f} step=2")
    rows = [r for r in read_metrics(tmp_path / "run") if "aux_ce" in r]
    assert len(rows) == 2 and all(np.isfinite(r["aux_ce"]) for r in rows)
    # best/ holds the plain model: it loads into the zoo model, which has no aux head.
    plain = zoo.create_model("test_demonet_tiny", num_classes=10, weights=tmp_path / "run" / "best")
    assert not hasattr(plain, "aux")
    with pytest.raises(loop.ConfigError, match="unknown task 'test_aux_haed'; did you mean: test_aux_head"):
        loop.run(tiny_config(task="test_aux_haed"), tmp_path / "typo")


def test_a_trainable_filter_matching_nothing_fails_before_compiling(tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(step_lib, "make_train_step", lambda *a, **k: compiled.append(1))
    with pytest.raises(loop.ConfigError, match=re.escape("trainable=['^blocks/9/']: ") + ".*matches no parameter.*head/fc/kernel"):
        loop.run(tiny_config(trainable=["^blocks/9/"]), tmp_path / "run")
    assert not compiled and not (tmp_path / "run").exists()   # nothing compiled, nothing written


def test_the_base_task_names_what_a_subclass_must_define():
    with pytest.raises(NotImplementedError):
        Task().loss(None, {}, None, None)
    assert Task().is_better(1.0, 2.0) and not Classification(3).is_better(1.0, 2.0)
