"""Soft knowledge distillation: the KL term, the student-as-its-own-teacher identity, precomputed
teacher logits through the pipeline, and the loop wiring."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib import data, zoo
from lib.tasks import distillation as distill, losses, mixup
from lib.tasks.classification import Classification
from lib.train import loop, optim, step as step_lib
from tests.test_train import tiny_config


def _torch_kl_batchmean(student, teacher, tau):
    """``F.kl_div(log_softmax(s/tau), log_softmax(t/tau), reduction='batchmean', log_target=True)``."""
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    ls, lt = log_softmax(student / tau), log_softmax(teacher / tau)
    return np.sum(np.exp(lt) * (lt - ls)) / student.shape[0]


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_kl_matches_the_reference_definition(tau):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(4, 7)).astype(np.float32) * 3, rng.normal(size=(4, 7)).astype(np.float32) * 3
    got = float(jnp.mean(distill.kl_divergence(s, distill.teacher_log_probs(t, tau), tau)))
    np.testing.assert_allclose(got, _torch_kl_batchmean(s, t, tau), rtol=1e-5)
    cfg = distill.Distillation(alpha=0.9, tau=tau)
    np.testing.assert_allclose(distill.combine(2.0, got, cfg), 0.1 * 2.0 + 0.9 * tau ** 2 * got, rtol=1e-6)


def test_distillation_config_errors(tmp_path):
    with pytest.raises(ValueError, match="alpha"):
        distill.Distillation(alpha=1.5)
    c = tiny_config()
    assert distill.config_from(c) is None  # off by default
    c.distill.teacher, c.distill.teacher_logits = "test_demonet_tiny", "logits.npy"
    with pytest.raises(loop.ConfigError, match="either teacher"):
        loop.run(c, tmp_path / "run")   # the task's config check, before anything is written
    assert not (tmp_path / "run").exists()
    c.distill.teacher = ""
    with pytest.raises(loop.ConfigError, match="teacher_logits=logits.npy is not a file"):
        loop.run(c, tmp_path / "run")


def _demonet_step(alpha, lr, *, teacher=False, teacher_logits=None):
    """One SGD step of the tiny DemoNet (LayerNorm only: train and eval mode compute the same)."""
    model = zoo.create_model("test_demonet_tiny", num_classes=10, rngs=0)
    tx = optim.make_optimizer(lambda s: lr, name="sgd", weight_decay=0.0)
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((8, 16, 16, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
    if teacher_logits is not None:
        batch[distill.TEACHER_LOGITS_KEY] = teacher_logits
    task = Classification(10)
    if teacher:  # the student itself, as a separate copy in eval mode
        teacher_model = nnx.clone(model)
        teacher_model.eval()
        task = distill.LogitDistillation(10, distill.Distillation(alpha, 1.0), teacher=teacher_model)
    elif alpha:
        task = distill.LogitDistillation(10, distill.Distillation(alpha, 1.0))  # logits come with the batch
    graphdef, state, frozen = step_lib.init_train_state(model, tx, ema=False)
    train = step_lib.make_train_step(graphdef, tx, task, frozen=frozen, base_key=jax.random.key(0), donate=False)
    new_state, metrics = train(state, batch)
    return new_state, metrics, model, batch


def test_student_as_its_own_teacher_has_zero_kl_and_zero_kl_gradient():
    # With the student as teacher, loss = 0.1 * CE + 0.9 * KL(p || p) and d KL = 0, so one SGD step
    # with lr equals one step without distillation at 0.1 * lr.
    got, metrics, _, _ = _demonet_step(0.9, 1.0, teacher=True)
    want, plain, _, _ = _demonet_step(0.0, 0.1)
    assert abs(float(metrics["distill_kl"])) < 1e-6
    np.testing.assert_allclose(float(metrics["loss"]), 0.1 * float(plain["loss"]), rtol=1e-5)
    moved = 0.0
    for a, b, p0 in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(want["params"]),
                        jax.tree.leaves(_demonet_step(0.0, 0.0)[0]["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        moved = max(moved, float(np.abs(np.asarray(a) - np.asarray(p0)).max()))
    assert moved > 1e-4  # the step did update the parameters


def test_precomputed_teacher_logits_equal_a_live_teacher():
    _, _, model, batch = _demonet_step(0.0, 0.0)
    other = zoo.create_model("test_demonet_tiny", num_classes=10, rngs=7)  # a different teacher
    other.eval()
    logits = other(batch["image"])
    from_logits, m1, _, _ = _demonet_step(0.5, 0.1, teacher_logits=logits)
    model = zoo.create_model("test_demonet_tiny", num_classes=10, rngs=0)
    tx = optim.make_optimizer(lambda s: 0.1, name="sgd", weight_decay=0.0)
    graphdef, state, frozen = step_lib.init_train_state(model, tx, ema=False)
    task = distill.LogitDistillation(10, distill.Distillation(0.5), teacher=other)
    train = step_lib.make_train_step(graphdef, tx, task, frozen=frozen, base_key=jax.random.key(0), donate=False)
    live, m2 = train(state, {"image": batch["image"], "label": batch["label"]})
    assert float(m1["distill_kl"]) > 1e-3  # a different teacher: the KL term is active
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(from_logits["params"]), jax.tree.leaves(live["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_mixup_mixes_teacher_probabilities_like_the_targets():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((6, 8, 8, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, 6), jnp.int32)
    extra = losses.smoothed_one_hot(labels, 5, 0.1)
    for seed in range(4):
        _, targets, mixed_extra = mixup.mixup_cutmix(jax.random.key(seed), images, labels, num_classes=5,
                                                     label_smoothing=0.1, extra=extra)
        np.testing.assert_allclose(mixed_extra, targets, rtol=1e-6)


def test_teacher_logits_ride_through_the_train_pipeline():
    cfg = tiny_config().input
    source = data.make_source(cfg, "train")
    labels = np.array([source[i]["label"] for i in range(len(source))])
    logits = 5.0 * np.eye(10, dtype=np.float32)[labels]  # argmax = the example's own label
    wrapped = distill.TeacherLogitsSource(source, logits, num_classes=10)
    batch = next(iter(data.make_pipeline(cfg, train=True, batch_size=16, seed=0, process_index=0, process_count=1,
                                         source=wrapped)))
    assert batch[distill.TEACHER_LOGITS_KEY].shape == (16, 10)
    np.testing.assert_array_equal(batch[distill.TEACHER_LOGITS_KEY].argmax(-1), batch["label"])
    with pytest.raises(ValueError, match=r"teacher logits must be \[num_examples="):
        distill.TeacherLogitsSource(source, logits[:-1])


@pytest.mark.parametrize("teacher_from", ["zoo", "logits"])
def test_loop_distils(tmp_path, teacher_from):
    c = tiny_config()
    c.model.name = "test_demonet_tiny"
    c.total_steps, c.log_every, c.checkpoint_every = 2, 1, 0
    teacher = zoo.create_model("test_demonet_tiny", num_classes=10, rngs=3)
    if teacher_from == "zoo":
        zoo.save_weights(teacher, tmp_path / "teacher")
        c.distill.teacher, c.distill.teacher_weights = "test_demonet_tiny", str(tmp_path / "teacher")
    else:
        np.save(tmp_path / "logits.npy", distill.compute_teacher_logits(teacher, c.input, batch_size=64))
        c.distill.teacher_logits = str(tmp_path / "logits.npy")
    result = loop.run(c, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["distill_kl"] > 0 for r in rows if "distill_kl" in r] == [True, True]
    assert result["count"] == 300  # the evaluation ran (its batches carry no teacher logits)


def test_teacher_kwargs_build_the_teacher_the_weights_were_saved_from(tmp_path):
    # A teacher of another shape than the zoo entry's default: without teacher_kwargs the strict load fails.
    from lib.tasks import classification
    kwargs = dict(img_size=28, patch_size=7, embed_dim=32, depth=1, num_heads=2)
    teacher = zoo.create_model("dinov2_tiny", num_classes=10, rngs=5, **kwargs)
    zoo.save_weights(teacher, tmp_path / "teacher")
    c = tiny_config()
    c.distill.teacher, c.distill.teacher_weights = "dinov2_tiny", str(tmp_path / "teacher")
    with pytest.raises(Exception, match="shape"):
        classification.from_config(c)
    c.distill.teacher_kwargs = kwargs
    task = classification.from_config(c)
    loaded = nnx.merge(task.teacher_graphdef, task.constants())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 28, 28, 3)), jnp.float32)
    teacher.eval()
    np.testing.assert_array_equal(loaded(x), teacher(x))
