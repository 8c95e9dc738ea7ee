"""Mask Fine-Tuning: the official fixture (logits, loss, the seven score gradients, exact masks),
training only the scores through the generic loop, baking/export equal to the masked model, the
baselines, and bad input."""
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jax
import jax.numpy as jnp

from configs.mft import tiny
from lib.layers import masked
from lib.models import llama
from lib.models.llama.hf import hf_targets
from lib.train import loop
from projects.mft import export, masking, task


@pytest.fixture(scope="module")
def fixture(golden, golden_dir):
    spec = golden.load(golden_dir / "mft_llama_tiny.json")
    model = llama.from_config(spec["config"])
    masking.mask_layers(model, spec["config"]["masked_layers"], subnet_mode=spec["config"]["subnet_mode"],
                        keep=spec["config"]["sparsity_attn"])
    llama.load_state_dict(model, golden.state_dict(spec))
    return spec, model


def test_official_fixture_every_output(fixture, golden):
    spec, model = fixture
    kw = golden.named_inputs(spec, "train")
    graphdef, scores, rest = nnx.split(model, task.only_scores, ...)

    @jax.jit
    def loss_fn(scores):
        logits = nnx.merge(graphdef, scores, rest)(kw["input_ids"])
        return jnp.sum(logits * kw["loss_weights"]), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(scores)
    outputs = {"logits": np.asarray(logits), "loss": np.asarray(loss)}
    for key, target in hf_targets(nnx.merge(graphdef, grads, rest)).items():
        if key.endswith(".scores"):
            outputs[f"grad_scores.{key}"] = target.to_hf(np.asarray(target.variable.get_value())[target.layer])
    outputs.update({f"mask.{k}": v for k, v in masking.layer_masks(model).items()})
    assert set(outputs) == set(golden.outputs(spec, "train"))
    for name, value in outputs.items():
        ok, err, tol = golden.compare(value, spec, "train", name=name)
        assert ok, (name, err, tol)
    # upstream's count, int((1 - 0.9) n) pruned in float64: 409 of 4096, 1126 of 11264
    masks = masking.layer_masks(model)
    assert (~masks["model.layers.1.self_attn.q_proj"]).sum() == 409
    assert (~masks["model.layers.1.mlp.up_proj"]).sum() == 1126


def test_bake_equals_the_masked_model_and_only_masked_layers_change(fixture, golden):
    spec, model = fixture
    ids = golden.named_inputs(spec, "train")["input_ids"]
    baked = masking.bake(model)
    assert not masking.masked_projections(baked)
    np.testing.assert_array_equal(np.asarray(baked(ids)), np.asarray(model(ids)))
    dense = dict(llama.hf_state_dict(baked))
    original = golden.state_dict(spec, groups=False)
    masks = masking.layer_masks(model)
    for key, value in dense.items():
        module = key[:-len(".weight")]
        want = original[key] * masks[module] if module in masks else original[key]
        np.testing.assert_array_equal(value, want, err_msg=key)


def test_baselines_keep_the_fraction_in_the_chosen_layers(golden, golden_dir):
    spec = golden.load(golden_dir / "llama_tiny_mha.json")
    sd = golden.state_dict(spec)
    for kind in ("l1", "random"):
        model = llama.from_config(spec["config"])
        llama.load_state_dict(model, sd)
        masks = masking.apply_baseline(model, [1], kind=kind, keep=0.9, subnet_mode="mlp", seed=0)
        assert sorted(masks) == [f"model.layers.1.mlp.{m}" for m in ("down_proj", "gate_proj", "up_proj")]
        dense = dict(llama.hf_state_dict(model))
        for key, m in masks.items():
            w = sd[key + ".weight"]
            np.testing.assert_array_equal(dense[key + ".weight"], w * m)
            if kind == "l1":   # exactly the int(0.1 n) smallest |w| pruned
                drop = w.size - masked.kept_count(w.size, 0.9)
                assert (~m).sum() == drop and np.abs(w[~m]).max() <= np.abs(w[m]).min()
            else:
                assert abs(m.mean() - 0.9) < 0.02
        np.testing.assert_array_equal(dense["model.layers.0.mlp.up_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"])


def test_mft_run_trains_only_scores_and_exports_a_dense_checkpoint(tmp_path):
    """MFT straight from the tiny HF checkpoint (2 steps), exported: the dense HF checkpoint gives the
    masked model's logits, the masks file holds upstream's names, and only the scores moved."""
    cfg = tiny.get_config("stage=mft,steps=2")
    cfg.checkpoint_every = 2
    loop.run(cfg, tmp_path / "mft")
    run = loop.setup(cfg, tmp_path / "mft")
    trained = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(run.state["params"])}
    assert trained and all(p.endswith("scores") for p in trained) and len(trained) == 7
    n_scores = sum(x.size for x in jax.tree.leaves(run.state["params"]))
    n_opt = sum(x.size for x in jax.tree.leaves(run.state["opt"]) if x.ndim)   # AdamW moments only
    assert n_scores == 50176 and n_opt == 2 * n_scores
    masked_model = run.model()
    out = export.export_run(run, tmp_path / "mft_hf", dtype="float32")
    dense, _ = llama.from_pretrained(out)
    ids = np.random.default_rng(0).integers(0, 320, (2, 16)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(dense(ids)), np.asarray(masked_model(ids)), atol=1e-5)
    masks = load_file(str(out / "masks.safetensors"))
    assert sorted(masks) == sorted(f"model.layers.1.{g}.{m}" for g, ms in (("self_attn", masking.MODULES["attn"]),
                                                                         ("mlp", masking.MODULES["mlp"])) for m in ms)
    assert masks["model.layers.1.mlp.up_proj"].shape == (176, 64)
    # the frozen weights did not move: unmasked layers equal the starting checkpoint
    start, _ = llama.from_pretrained(tiny.TINY_HF)
    a, b = dict(llama.hf_state_dict(start)), dict(llama.hf_state_dict(dense))
    np.testing.assert_array_equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("arg, message", [
    ("stage=mft,layers=2", r"masked_layers \[2\] are outside 0..1"),
    ("stage=mft,keep=1.5", r"keep is the fraction"),
])
def test_bad_mft_settings_fail_before_anything_is_written(tmp_path, arg, message):
    with pytest.raises(loop.ConfigError, match=message):
        loop.run(tiny.get_config(arg), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_mft_from_a_checkpoint_of_another_architecture(tmp_path, golden_dir):
    cfg = tiny.get_config("stage=mft")
    cfg.model.name = "llama_tiny_gqa"      # the checkpoint is the MHA model
    with pytest.raises(loop.ConfigError, match=r"(?s)init_from=.*does not fit.*shape mismatch"):
        loop.run(cfg, tmp_path / "run")


def test_unknown_modules_and_subnet_mode(fixture):
    _, model = fixture
    with pytest.raises(ValueError, match="unknown modules"):
        masking.mask_layers(nnx.clone(model), [0], modules=["qkv_proj"])
    with pytest.raises(ValueError, match="subnet_mode"):
        masking.mask_layers(nnx.clone(model), [0], subnet_mode="everything")


def test_aot_memory_plan_on_simulated_devices():
    """The 7B plan's code path on the tiny model: scores and moments sharded over 8 devices."""
    from projects.mft import memory
    row = memory.plan("llama_tiny_mha", "1-1", devices=8, mesh_kind="fsdp", batch=8, seq=16)
    assert row["scores"] == 50176 and row["frozen_values"] == 191808 - 50176
    per_device = row["bytes_per_device"]
    # FSDP splits the embed axis (64) 8 ways: each device holds 1/8 of the scores and of both moments
    assert per_device["scores"] == 50176 * 4 / 8
    assert 0 <= per_device["adam_moments"] - 2 * 50176 * 4 / 8 <= 64      # + AdamW's step counters
    assert row["argument_size_in_bytes"] >= per_device["scores"] + per_device["adam_moments"] + per_device["frozen"]
    assert row["total_per_device_bytes"] > per_device["scores"] + per_device["adam_moments"] + per_device["frozen"]
