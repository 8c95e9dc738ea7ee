"""Training system: schedule, sharded step equivalences, resume, checkpoints, fine-tuning, bad input.

Models are the tiny registered test models (conftest) so each program compiles in seconds.
"""
import json
import logging
import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from configs.starnet import digits, imagenet
from lib import sharding, zoo
from lib.layers import masked
from lib.tasks import losses
from lib.tasks.classification import Classification
from lib.train import checkpoint, loop, optim, schedules, step as step_lib
from lib.train.task import weighted

FSDP_RULES = (("batch", "data"), ("out_channels", "data"), ("classes", "data"))


def tiny_config(**overrides):
    c = digits.get_config()
    c.model.name = "test_starnet_tiny"
    c.input.image_size = 16
    c.input.batch_size = 16
    c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 4, 1, 2, 0
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def read_metrics(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


# ------------------------------------------------------------------------------------------------
# schedule
# ------------------------------------------------------------------------------------------------
def test_schedules_match_the_official_recipes(golden_dir):
    ref = json.load(open(golden_dir / "schedules.json"))
    assert ref["schedules"]["starnet"]["lr"] == imagenet.get_config().lr
    for name, recipe in ref["schedules"].items():
        sched = schedules.make_schedule(lr=recipe["lr"], min_lr=recipe["min_lr"], epochs=ref["epochs"],
                                        steps_per_epoch=10, warmup_epochs=ref["warmup_epochs"],
                                        warmup_lr=ref["warmup_lr"], per_epoch=True)
        got = np.array([float(sched(10 * e + 3)) for e in range(len(recipe["per_epoch"]))])
        np.testing.assert_allclose(got, recipe["per_epoch"], rtol=1e-5, err_msg=name)
    assert len(recipe["per_epoch"]) == 310


def test_imagenet_config_matches_the_recipe():
    c = imagenet.get_config("variant=s4")
    assert (c.input.batch_size, c.lr, c.wd, c.total_epochs, c.warmup_epochs, c.cooldown_epochs) == (2048, 3e-3, 0.05, 300, 5, 10)
    assert c.input.auto_augment == "rand-m1-mstd0.5-inc1" and c.mixup.mixup_alpha == 0.8 and c.mixup.cutmix_alpha == 0.2
    assert c.model.kwargs.drop_path_rate == 0.02 and c.label_smoothing == 0.1
    with pytest.raises(ValueError, match="unknown config argument 'varient'"):
        imagenet.get_config("varient=s1")


# ------------------------------------------------------------------------------------------------
# one step: sharded == single device
# ------------------------------------------------------------------------------------------------
# The partial-training case of the step properties: the last stage and the classifier trained, the
# rest frozen (never differentiated, no optimizer state, not donated).
PARTIAL = ("^stages/3/", "^head/")


def _one_step(mesh=None, rules=sharding.DEFAULT_RULES, bn_groups=1, trainable=()):
    model = zoo.create_model("test_starnet_tiny", num_classes=10, rngs=0)
    if mesh is not None:
        sharding.shard_model(model, mesh, rules)
    if bn_groups > 1:
        for _, m in nnx.iter_graph(model):
            if hasattr(m, "batch_groups"):
                m.batch_groups = bn_groups
    # SGD: linear in the gradient. Adam's first step g/|g| would amplify round-off in near-zero gradients.
    tx = optim.make_optimizer(lambda s: 1e-2, name="sgd")
    trainable = step_lib.trainable_filter(nnx.Param, trainable)
    graphdef, state, frozen = step_lib.init_train_state(model, tx, ema=True, trainable=trainable)
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((16, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    if mesh is not None:
        batch_shardings = {"image": sharding.batch_sharding(mesh, rules, 4), "label": sharding.batch_sharding(mesh, rules, 1)}
        batch = {k: jax.device_put(v, batch_shardings[k]) for k, v in batch.items()}
        shardings = step_lib.shardings_of(state)
    else:
        batch_shardings = shardings = None
    train = step_lib.make_train_step(graphdef, tx, Classification(10), frozen=frozen, trainable=trainable,
                                     options=step_lib.StepOptions(ema_decay=0.9), base_key=jax.random.key(0),
                                     state_shardings=shardings, batch_shardings=batch_shardings)
    new_state, metrics = train(state, batch)
    return new_state, metrics, frozen


def _assert_states_close(a, b, rtol=1e-5, atol=1e-6):
    """Params, EMA, BatchNorm statistics and RNG state to round-off; optimizer moments (raw gradient
    sums, where reduction order shows most) to 1e-4 of their largest entry."""
    if isinstance(a, dict) and "opt" in a:
        a, b = dict(a), dict(b)
        opt_a, opt_b = a.pop("opt"), b.pop("opt")
        scale = max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(opt_b) if x.size)
        _assert_states_close(opt_a, opt_b, rtol=rtol, atol=max(atol, 1e-4 * scale))
    for (path, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=str(path))


@pytest.fixture(scope="module")
def single_device_step():
    return _one_step()[:2]


def test_train_step_on_8_devices_equals_single_device(single_device_step):
    want, want_metrics = single_device_step
    got, metrics, _ = _one_step(sharding.make_mesh())
    assert got["params"]["stem"]["conv"]["kernel"].get_value().sharding.is_fully_replicated
    assert not np.allclose(np.asarray(want["rest"]["norm"]["mean"].get_value()), 0)  # BN stats did move
    _assert_states_close(got, want)
    np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-6)


def test_fsdp_shards_kernels_and_matches_single_device(single_device_step):
    mesh = sharding.make_mesh()
    got, _, _ = _one_step(mesh, FSDP_RULES)
    _assert_states_close(got, single_device_step[0])
    kernel = got["params"]["stages"][3]["blocks"][0]["f1"]["conv"]["kernel"].get_value()
    assert kernel.sharding.spec == jax.P(None, None, None, "data")
    moments = [x for x in jax.tree.leaves(got["opt"]) if x.shape == kernel.shape]
    assert moments and all(x.sharding.spec == kernel.sharding.spec for x in moments)  # momentum sharded alike
    # 10 classes do not divide over 8 devices: replicated instead.
    assert got["params"]["head"]["fc"]["kernel"].get_value().sharding.spec == jax.P(None, None)
    # Per-device parameter bytes drop accordingly for a real model.
    dp = zoo.create_model("starnet_s050", abstract=True, mesh=mesh)
    fsdp = zoo.create_model("starnet_s050", abstract=True, mesh=mesh, sharding_rules=FSDP_RULES)

    def per_device_bytes(model):
        total = 0
        for x in jax.tree.leaves(nnx.state(model, nnx.Param)):
            shard = x.sharding.shard_shape(x.shape)
            total += int(np.prod(shard)) * x.dtype.itemsize
        return total
    assert per_device_bytes(fsdp) < per_device_bytes(dp) / 4


def test_per_shard_batchnorm_differs_from_global_and_matches_grouped_reference(single_device_step):
    # 2 groups of 8 examples (with groups of 2 the 1x1 last stage normalises 2 values: too ill-conditioned
    # to compare gradients across reduction orders).
    got, metrics, _ = _one_step(sharding.make_mesh(), bn_groups=2)
    want, _, _ = _one_step(bn_groups=2)
    _assert_states_close(got, want)
    assert abs(float(metrics["loss"]) - float(single_device_step[1]["loss"])) > 1e-4


def test_partial_training_on_8_devices_and_fsdp_equals_single_device():
    want, want_metrics, frozen = _one_step(trainable=PARTIAL)
    trained = {step_lib.path_string(p) for p, _ in nnx.to_flat_state(want["params"])}
    assert trained and all(t.startswith(("stages/3/", "head/")) for t in trained)
    assert {step_lib.path_string(p) for p, _ in nnx.to_flat_state(frozen)} >= {"stem/conv/kernel", "norm/scale"}
    assert not np.allclose(np.asarray(want["rest"]["norm"]["mean"].get_value()), 0)  # frozen BN still updates stats
    for mesh, rules in ((sharding.make_mesh(), sharding.DEFAULT_RULES), (sharding.make_mesh(), FSDP_RULES)):
        got, metrics, got_frozen = _one_step(mesh, rules, trainable=PARTIAL)
        _assert_states_close(got, want)
        np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got_frozen, frozen)


class WeightedExamples(Classification):
    """Cross-entropy weighted per example by ``batch["w"]`` (zeros included): micro-batches of one
    step then carry different counts, as token-weighted language-model losses do."""

    def loss(self, model, batch, key, consts):
        logits = model(batch["image"])
        ce = losses.cross_entropy(logits, batch["label"])
        return weighted(ce, batch["w"]), {"top1": weighted(losses.topk_correct(logits, batch["label"], 1), batch["w"])}


@pytest.mark.parametrize("trainable", [(), ("^head/", "blocks/1/")], ids=["classification", "partial_weighted"])
def test_grad_accumulation_equals_one_large_batch(trainable):
    """Classification over the whole model, and a partial-training task whose 4 micro-batches carry
    unequal counts (4, 1, 3, 6 of 16 examples): both equal one large batch."""
    model = zoo.create_model("test_demonet_tiny", num_classes=10, rngs=0)
    tx = optim.make_optimizer(lambda s: 1e-2, name="sgd")
    rng = np.random.default_rng(0)
    batch = {"image": rng.standard_normal((16, 16, 16, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    task = Classification(10)
    if trainable:
        batch["w"] = np.array([1, 1, 1, 1, 0, 0, 0, 1, 2, 0, 1, 0, 3, 1, 1, 1], np.float32)
        task = WeightedExamples(10)
    trainable = step_lib.trainable_filter(nnx.Param, trainable)
    results = []
    for k in (1, 4):
        graphdef, state, frozen = step_lib.init_train_state(model, tx, ema=False, trainable=trainable)
        train = step_lib.make_train_step(graphdef, tx, task, frozen=frozen, trainable=trainable,
                                         options=step_lib.StepOptions(grad_accum_steps=k), base_key=jax.random.key(0),
                                         donate=False)
        results.append(train(state, batch))
    _assert_states_close(results[1][0]["params"], results[0][0]["params"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(results[1][1]["loss"], results[0][1]["loss"], rtol=1e-6)
    # The loss is the weighted mean over the whole batch, not a mean of per-micro-batch means.
    ce = np.asarray(losses.cross_entropy(model(batch["image"]), batch["label"]))   # LayerNorm only: no state
    w = batch.get("w", np.ones(16, np.float32))
    np.testing.assert_allclose(float(results[1][1]["loss"]), float((ce * w).sum() / w.sum()), rtol=1e-5)


def test_checkpoint_restores_onto_another_mesh_and_a_single_device(tmp_path):
    mesh = sharding.make_mesh()
    model = sharding.shard_model(zoo.create_model("test_starnet_tiny", num_classes=16, rngs=0), mesh, FSDP_RULES)
    tx = optim.make_optimizer(lambda s: 1e-2)
    _, state, _ = step_lib.init_train_state(model, tx, ema=False)
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    ckpt.save(5, state)
    ckpt.close()
    mesh2 = sharding.make_mesh([("data", 2), ("model", 4)])
    rules2 = (("batch", "data"), ("out_channels", "model"), ("classes", "model"))
    for target_model in (sharding.shard_model(zoo.create_model("test_starnet_tiny", num_classes=16, rngs=1), mesh2, rules2),
                         zoo.create_model("test_starnet_tiny", num_classes=16, rngs=1)):
        _, target, _ = step_lib.init_train_state(target_model, tx, ema=False)
        reader = checkpoint.Checkpointer(tmp_path / "ckpt")
        restored, step = reader.restore_latest(target)
        reader.close()
        assert step == 5
        _assert_states_close(restored, state, rtol=0, atol=0)
        kernel = restored["params"]["head"]["fc"]["kernel"].get_value()
        assert kernel.sharding == target["params"]["head"]["fc"]["kernel"].get_value().sharding


# ------------------------------------------------------------------------------------------------
# the loop: resume, preemption, failures
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainable", [(), PARTIAL], ids=["all", "partial"])
def test_resumed_run_matches_uninterrupted_bit_for_bit(tmp_path, trainable):
    full = loop.run(tiny_config(total_steps=6, checkpoint_every=3, trainable=trainable), tmp_path / "full")
    loop.run(tiny_config(total_steps=3, checkpoint_every=3, trainable=trainable), tmp_path / "resumed")
    resumed = loop.run(tiny_config(total_steps=6, checkpoint_every=3, trainable=trainable), tmp_path / "resumed")
    assert resumed == full
    a = [r for r in read_metrics(tmp_path / "full") if "loss" in r and "final" not in r]
    b = [r for r in read_metrics(tmp_path / "resumed") if "loss" in r and "final" not in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "param_norm", "lr"):
            assert x[key] == y[key], (x["step"], key)
    if trainable:
        # The frozen weights are not in the checkpoints, only their manifest: a run whose frozen
        # weights differ (another seed) is refused before anything is restored or written.
        files = sorted(str(p) for p in (tmp_path / "resumed" / "checkpoints").rglob("*"))
        with pytest.raises(masked.FrozenWeightMismatch, match=r"(?s)stages/0/blocks/0/f1/conv/kernel: sha256 .*'seed': 0.*'seed': 1"):
            loop.run(tiny_config(total_steps=9, checkpoint_every=3, trainable=trainable, seed=1), tmp_path / "resumed")
        assert sorted(str(p) for p in (tmp_path / "resumed" / "checkpoints").rglob("*")) == files


def test_sigterm_saves_and_exits(tmp_path, monkeypatch):
    real = loop._global_batch
    calls = []

    def preempt_on_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)
    monkeypatch.setattr(loop, "_global_batch", preempt_on_second_batch)
    result = loop.run(tiny_config(total_steps=50, checkpoint_every=0), tmp_path / "run")
    assert result == {"preempted": True, "step": 2}
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    loop.run(tiny_config(total_steps=2, checkpoint_every=2), tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"non-finite .* at step 3.*steps \[2\]"):
        loop.run(tiny_config(total_steps=6, lr=float("nan"), warmup_epochs=0, checkpoint_every=1), tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
    result = loop.run(tiny_config(total_steps=2, eval_only=True), tmp_path / "run")
    assert result["step"] == 2 and np.isfinite(result["loss"])


def test_unreadable_latest_checkpoint_falls_back_and_deletes_nothing(tmp_path, caplog):
    loop.run(tiny_config(total_steps=4, checkpoint_every=2), tmp_path / "run")
    for path in (tmp_path / "run" / "checkpoints" / "4").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        result = loop.run(tiny_config(total_steps=4, checkpoint_every=2), tmp_path / "run")
    assert "unreadable" in caplog.text and result["step"] == 4
    names = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    assert names == ["2", "4", "4.unreadable"]
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r and "final" not in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4]  # resumed from step 2


def test_best_weights_extra_evals_and_provenance(tmp_path):
    result = loop.run(tiny_config(total_steps=4, eval_every=2, ema_decay=0.5, final_evals=[(16, 1.0), (24, 0.875)]),
                      tmp_path / "run")
    assert {"top1", "top5", "ema_top1", "top1_16_crop1", "top1_24_crop0.875", "step"} <= set(result)
    assert result["top1_16_crop1"] == result["top1"]
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    assert best["step"] == 2 and best["weights"] == "ema"   # as timm: with an EMA, best/ holds the EMA
    val = [r for r in read_metrics(tmp_path / "run") if r.get("step") == 2 and "val_ema_top1" in r]
    assert len(val) == 1 and best["top1"] == val[0]["val_ema_top1"]
    model = zoo.create_model("test_starnet_tiny", num_classes=10, weights=tmp_path / "run" / "best")
    assert np.isfinite(np.asarray(model(jnp.zeros((1, 16, 16, 3))))).all()
    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())
    assert provenance["jax"] == jax.__version__ and len(provenance["devices"]) == 8
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["name"] == "test_starnet_tiny"


def test_finetune_from_official_weights_to_10_classes(tmp_path, golden, golden_dir, capsys):
    spec = golden.load(golden_dir / "starnet_s050_224.json")
    np.savez(tmp_path / "s050.npz", **golden.state_dict(spec))
    cfg = tiny_config(init_from=str(tmp_path / "s050.npz"), eval_only=True)
    cfg.model.name = "starnet_s050"
    cfg.input.image_size = 32
    result = loop.run(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    assert re.search(r"loaded 142 tensors .*; kept the fresh initial values of head\S* .*\(init_from_reinit='\^head'\)", out)
    assert out.strip().splitlines()[-1].startswith("final: top1=")
    assert result["count"] == 300
    wrong = tiny_config(init_from=str(tmp_path / "s050.npz"), eval_only=True)  # another architecture
    with pytest.raises(loop.ConfigError, match="init_from=.*does not fit the model"):   # one line from the CLI
        loop.run(wrong, tmp_path / "wrong")


@pytest.mark.parametrize("dataset", ["imagefolder", "tfds"])
def test_trains_on_generated_image_folder_and_array_record_data(tmp_path, dataset, image_folder, tiny_tfds_dir):
    # Same model, batch and classifier size as the other loop tests, so the programs are cached.
    if dataset == "imagefolder":
        cfg = tiny_config(**{"input.dataset": "imagefolder", "input.data_dir": str(image_folder[0])})
    else:
        cfg = tiny_config(**{"input.dataset": "tfds", "input.name": "tiny_shapes", "input.data_dir": str(tiny_tfds_dir)})
    result = loop.run(cfg, tmp_path / "run")
    assert result["step"] == 4 and np.isfinite(result["loss"])
    assert result["count"] == (40 if dataset == "imagefolder" else 7)


# ------------------------------------------------------------------------------------------------
# bad input: one clear error before anything compiles
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,error,match", [
    ({"input.batch_size": 12}, loop.ConfigError, "must divide by the data-parallel size 8"),
    ({"mesh": [("data", 16)]}, loop.ConfigError, "needs 16 devices, but only 8 exist"),
    ({"input.dataset": "imagefolder", "input.data_dir": "/no/such/dir"}, loop.ConfigError, "/no/such/dir"),
    ({"trainable": ["^no/such/param"]}, loop.ConfigError, "matches no parameter"),
    ({"lr_schedule": "cosnie"}, loop.ConfigError, "unknown lr_schedule 'cosnie'"),
    ({"bn_stats": "sometimes"}, loop.ConfigError, "bn_stats must be"),
    ({"compute_dtype": "float16"}, loop.ConfigError, "compute_dtype must be"),
])
def test_bad_configs_fail_early(tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        loop.run(tiny_config(**overrides), tmp_path / "run")


def test_missing_workdir_parent(tmp_path):
    with pytest.raises(loop.ConfigError, match="parent of workdir does not exist"):
        loop.run(tiny_config(), tmp_path / "no" / "run")


def test_parse_arg():
    arg = common.parse_arg("variant=s2,runlocal", variant="s1", runlocal=False, epochs=3)
    assert (arg.variant, arg.runlocal, arg.epochs) == ("s2", True, 3)
