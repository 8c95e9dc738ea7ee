"""Proteus (lib/tasks/proteus.py): the golden losses of one official step, the masks, training through
the generic loop (loss falls, only the student and its heads are optimised), export, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.proteus import digits as digits_config
from lib import tasks, zoo
from lib.models import dinov2
from lib.tasks import proteus
from lib.train import loop


def test_golden_losses_and_tokens(golden, golden_dir):
    spec = golden.load(golden_dir / "proteus_losses.json")
    sd = golden.state_dict(spec)
    teacher = zoo.create_model("dinov2_tiny", abstract=True)    # shapes only: the strict load fills every array
    zoo.load_torch_weights(teacher, {k[len("teacher.backbone."):]: v for k, v in sd.items()
                                     if k.startswith("teacher.backbone.")})
    task = proteus.Proteus(teacher)
    student = zoo.create_model("dinov2_tiny", abstract=True, img_size=224, embed_dim=32)   # MetaArch: img_size 224 -> 16x16 grid
    wrapped = nnx.eval_shape(lambda: task.wrap(student, nnx.Rngs(0)))
    report = zoo.load_torch_weights(wrapped, {k: v for k, v in sd.items() if not k.startswith("teacher.")})
    assert report.ok
    kw = golden.named_inputs(spec, "train_step")
    x = jnp.asarray(kw["collated_global_crops"].transpose(0, 2, 3, 1))
    masks = kw["collated_masks"]
    np.testing.assert_array_equal(np.flatnonzero(masks), kw["mask_indices_list"])

    @jax.jit
    def run(consts, x, masks):
        t_cls, t_patch = task.teacher_tokens(x, consts)
        terms = proteus.proteus_terms(wrapped, x, masks, t_cls, t_patch)
        return t_cls, t_patch, terms

    t_cls, t_patch, terms = run(task.constants(), x, masks)
    got = {"token_loss": terms["token"].mean(), "fea_loss": terms["fea"].mean(), "patch_loss": terms["patch"].mean(),
           "loss": terms["loss"].mean(), "teacher.x_norm_clstoken": t_cls, "teacher.x_norm_patchtokens": t_patch,
           **{k: v for k, v in terms.items() if "." in k}}
    for name in golden.outputs(spec, "train_step"):
        ok, err, tol = golden.compare(np.asarray(got[name]), spec, "train_step", name=name)
        assert ok and err <= tol / 4, (name, err, tol)


def test_masks_first_half_exact_count_uniform():
    s = proteus.ProteusSettings()
    masks = np.asarray(jax.jit(jax.vmap(lambda k: proteus.draw_masks(k, 8, 16, s)))(
        jax.random.split(jax.random.key(0), 64)))
    assert masks.shape == (64, 8, 16)
    assert (masks[:, :4].sum(-1) == 8).all() and not masks[:, 4:].any()
    freq = masks[:, :4].mean((0, 1))                      # each position masked about half the time
    assert np.abs(freq - 0.5).max() < 0.15
    assert not np.array_equal(masks[0], masks[1])


def test_bad_settings_fail_before_compiling():
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        proteus.ProteusSettings(mask_ratio=1.0)
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        tasks.from_config(_with(mask_ratio=-0.1))
    c = _with()
    c.input.image_size = 30
    with pytest.raises(ValueError, match="not a multiple of the patch size 7"):
        tasks.from_config(c)
    task = tasks.from_config(_with())
    with pytest.raises(ValueError, match="patch size 14 differs from the teacher's 7"):
        task.wrap(zoo.create_model("dinov2_tiny", abstract=True), nnx.Rngs(0))
    c = _with()
    c.model.kwargs.patch_size = 4
    with pytest.raises(ValueError, match="differs from the teacher's"):
        loop.setup(c, "/tmp/never-written-proteus")


def test_bfloat16_teacher(golden_dir):
    pth = str(golden_dir / "checkpoints" / "dinov2_tiny_pretrain.pth")
    t16 = proteus.load_teacher("dinov2_tiny", pth, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(t16, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    task = proteus.Proteus(t16)
    t_cls, t_patch = jax.eval_shape(task.teacher_tokens, jax.ShapeDtypeStruct((2, 56, 56, 3), jnp.float32),
                                    task.constants())
    assert t_cls.dtype == t_patch.dtype == jnp.float32 and t_patch.shape == (2, 16, 64)
    with pytest.raises(ValueError, match="teacher_dtype"):
        proteus.load_teacher("dinov2_tiny", dtype="float16")


def test_trains_through_the_loop_only_student_and_heads_optimised(tmp_path):
    c = digits_config.get_config()
    c.input.batch_size, c.total_steps, c.log_every, c.checkpoint_every, c.eval_every = 16, 10, 1, 0, 0
    c.lr, c.warmup_epochs = 3e-3, 0
    c.mesh = [("data", 1)]                                # one device: the sharded step is tested elsewhere
    c.model.kwargs.depth = c.proteus.teacher_kwargs.depth = 1     # the step compiles in half the time
    run = loop.setup(c, tmp_path / "run")
    # only the student and its three heads have parameters and optimizer moments; the teacher is a constant
    tops = {str(p[0]) for p, _ in nnx.to_flat_state(run.state["params"])}
    assert tops == {"student", "token_head", "fea_head", "patch_head"}
    n_params = sum(x.size for x in jax.tree.leaves(run.state["params"]))
    student = zoo.create_model("dinov2_tiny", abstract=True, **c.model.kwargs)
    heads = 3 * (2 * 32 + 32 * 64 + 64)
    assert n_params == zoo.count_params(student) + heads
    mu = [x for x in jax.tree.leaves(run.state["opt"]) if getattr(x, "ndim", 0) > 0]
    assert sum(x.size for x in mu) == 2 * n_params         # AdamW: mu and nu, nothing for the teacher
    assert sum(x.size for x in jax.tree.leaves(run.train_step.consts)) == zoo.count_params(
        zoo.create_model("dinov2_tiny", abstract=True, **c.proteus.teacher_kwargs))
    assert loop.train(run, loop._MetricsLog(run))
    rows = [r for r in map(eval_json, open(tmp_path / "run" / "metrics.jsonl")) if "loss" in r]
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.8 * first, (first, last)
    for name in ("token_loss", "fea_loss", "patch_loss"):
        assert rows[-1][name] < rows[0][name]
    # export: the student alone, official DINOv2 keys, loadable into a plain backbone
    from projects.proteus.export import export_backbone
    backbone = run.model()
    assert isinstance(backbone, dinov2.DinoVisionTransformer)
    sd = export_backbone(backbone, tmp_path / "student.safetensors")
    assert "patch_embed.proj.weight" in sd and not any("head" in k for k in sd)
    fresh = zoo.create_model("dinov2_tiny", abstract=True, **c.model.kwargs)
    assert zoo.load_torch_weights(fresh, str(tmp_path / "student.safetensors")).ok
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(fresh, nnx.Param)),
                              nnx.to_flat_state(nnx.state(backbone, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))


def _with(**proteus_overrides):
    c = digits_config.get_config()
    c.proteus.update(dict(abstract_teacher=True, **proteus_overrides))   # shapes suffice for the checks
    return c


def eval_json(line):
    import json
    return json.loads(line)


# ------------------------------------------------------------------------------------------------
# frozen-feature evaluation (lib/probe.py, projects/proteus/eval.py) on digits at tiny size
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digit_features(golden_dir):
    from projects.proteus.eval import input_config
    from lib import probe
    model = zoo.create_model("dinov2_tiny", abstract=True)
    zoo.load_torch_weights(model, golden_dir / "checkpoints" / "dinov2_tiny_pretrain.pth")
    cfg = input_config("digits", image_size=28, batch_size=512)     # 2x2 patches: the 4x4 pos-embed interpolated
    return probe.extract(model, cfg, split="train", batch_size=512), probe.extract(model, cfg, split="validation",
                                                                                   batch_size=512)


def test_probes_on_digits(digit_features):
    from lib import probe
    train, val = digit_features
    assert train.cls.shape == (1497, 2, 64) and train.avgpool.shape == (1497, 64) and val.labels.shape == (300,)
    assert train.linear_input(2, True).shape == (1497, 3 * 64)
    lr = probe.logistic_regression(train, val, val, wds=(1e-1, 1e1), max_iter=100)
    assert lr["val_top1"] > 0.5 and 0 <= lr["test_top1"] <= 1 and len(lr["grid"]) == 2
    kn = probe.knn(train, val, ks=(10, 20))
    assert kn["top1"] > 0.4 and set(kn) == {"top1", "top1_k10", "top1_k20"}
    lin = probe.linear_probe(train, val, lrs=(1e-3, 0.1), n_blocks=(2,), avgpool=(True,), epochs=2)
    assert len(lin["table"]) == 2 and lin["top1"] > 0.2          # chance is 0.1
    with pytest.raises(ValueError, match="n_blocks=5"):
        train.linear_input(5)


def test_imagenet_recipe_and_pairs():
    from configs.proteus import imagenet
    pairs = {s: (imagenet.get_config(f"student={s}").model.name, imagenet.get_config(f"student={s}").proteus.teacher)
             for s in ("ti", "s", "b", "l")}
    assert pairs == {"ti": ("dinov2_vitti14", "dinov2_vits14"), "s": ("dinov2_vits14", "dinov2_vitb14"),
                     "b": ("dinov2_vitb14", "dinov2_vitl14"), "l": ("dinov2_vitl14", "dinov2_vitg14")}
    c = imagenet.get_config("student=l")
    assert (c.task, c.input.batch_size, c.lr, c.wd, c.min_lr, c.warmup_lr, c.warmup_epochs, c.total_epochs) == (
        "proteus", 1024, 1e-3, 0.05, 1e-5, 1e-6, 5, 300)
    assert c.input.auto_augment == "rand-m9-mstd0.5-inc1" and c.input.reprob == 0.25 and c.ema_decay == 0.99996
    assert c.mixup.mixup_alpha == c.mixup.cutmix_alpha == 0.0 and c.model.kwargs.img_size == 224
    assert (c.proteus.mask_ratio, c.proteus.mask_probability, c.proteus.teacher_dtype) == (0.5, 0.5, "bfloat16")
    assert imagenet.get_config("student=s,batch_size=512").lr == 5e-4
    with pytest.raises(ValueError, match="student must be one of"):
        imagenet.get_config("student=h")
