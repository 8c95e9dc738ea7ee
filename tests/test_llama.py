"""The LLaMA decoder: golden parity, RoPE scaling, config parsing, KV-cache decoding, generation,
HF checkpoints in and out, and sharded loading on 8 simulated devices."""
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from lib import sharding, zoo
from lib.convert.torch_to_nnx import WeightConversionError
from lib.models import llama
from lib.models.llama import generate as gen
from lib.models.llama.config import LlamaConfig, UnsupportedConfig, rope_inv_freq

HF_DIR_NAME = "checkpoints/llama_tiny_hf"


@pytest.fixture(scope="module", params=["llama_tiny_mha", "llama_tiny_gqa"])
def fixture_model(request, golden, golden_dir):
    spec = golden.load(golden_dir / f"{request.param}.json")
    model = llama.from_config(spec["config"])
    llama.load_state_dict(model, golden.state_dict(spec))
    return spec, model


def test_golden_parity(fixture_model, golden):
    """transformers' LlamaForCausalLM logits, with and without right padding, within 2e-5 relative."""
    spec, model = fixture_model
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, ids, mask: nnx.merge(graphdef, st)(ids, mask))
    for mode in golden.modes(spec):
        kw = golden.named_inputs(spec, mode)
        mask = kw.get("attention_mask", np.ones_like(kw["input_ids"]))
        logits = np.asarray(forward(state, kw["input_ids"], mask))
        ok, err, tol = golden.compare(logits, spec, mode, name="logits")
        assert ok, (spec["canonical"], mode, err, tol)


def test_zoo_config_is_the_fixture_architecture(golden, golden_dir):
    for name in ("llama_tiny_mha", "llama_tiny_gqa"):
        spec = golden.load(golden_dir / f"{name}.json")
        mine, theirs = LlamaConfig.from_hf(llama.CONFIGS[name]), LlamaConfig.from_hf(spec["config"])
        fields = [f for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                              "rope_theta", "rope_scaling", "tie_word_embeddings")]
        assert {f: getattr(mine, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
        assert zoo.count_params(zoo.create_model(name, abstract=True)) == spec["num_params"] == mine.num_params()


def test_llama3_rope_interpolated_band_against_the_formula():
    """A config whose frequencies fall in all three llama3 bands (the fixture has none in the middle)."""
    cfg = LlamaConfig.from_hf({"vocab_size": 8, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
                               "num_attention_heads": 1, "rope_theta": 10000.0,
                               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})
    got = rope_inv_freq(cfg)
    base = 1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)
    bands = []
    for f, g in zip(base, got):
        wavelength = 2 * math.pi / f
        if wavelength < 64 / 4:
            want, band = f, "kept"
        elif wavelength > 64 / 1:
            want, band = f / 8, "divided"
        else:
            s = (64 / wavelength - 1) / (4 - 1)
            want, band = (1 - s) * f / 8 + s * f, "interpolated"
        bands.append(band)
        assert g == pytest.approx(want, rel=1e-6), band
    assert {"kept", "divided", "interpolated"} <= set(bands)
    assert bands.count("interpolated") >= 2


def test_config_forms_and_unsupported_features():
    old = dict(llama.CONFIGS["llama_tiny_gqa"])
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {"rope_theta": old["rope_theta"], **old["rope_scaling"]}
    a, b = LlamaConfig.from_hf(old), LlamaConfig.from_hf(new)
    assert (a.rope_theta, a.rope) == (b.rope_theta, b.rope)
    assert b.to_hf()["rope_parameters"] == new["rope_parameters"]     # written back in the form read
    plain = dict(new, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    assert LlamaConfig.from_hf(plain).rope_scaling is None and LlamaConfig.from_hf(plain).rope_theta == 1e4
    with pytest.raises(UnsupportedConfig, match="attention_bias=True"):
        LlamaConfig.from_hf(dict(old, attention_bias=True))
    with pytest.raises(UnsupportedConfig, match="'yarn'"):
        LlamaConfig.from_hf(dict(old, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(UnsupportedConfig, match="gemma"):
        LlamaConfig.from_hf(dict(old, model_type="gemma"))


@pytest.fixture(scope="module")
def tiny():
    return zoo.create_model("llama_tiny_gqa", rngs=0)


@pytest.fixture(scope="module")
def forward(tiny):
    """``forward(ids, positions=None, segment_ids=None, cache=None)``: the tiny model, jitted (one
    compile per shape instead of op-by-op dispatch)."""
    graphdef, state = nnx.split(tiny)

    @jax.jit
    def run(ids, positions, segment_ids, cache):
        return nnx.merge(graphdef, state)(ids, positions=positions, segment_ids=segment_ids, cache=cache)

    def call(ids, positions=None, segment_ids=None, cache=None):
        ids = np.asarray(ids, np.int32)
        if positions is None:
            positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
        if segment_ids is None:
            segment_ids = np.ones(ids.shape, np.int32)
        return run(ids, positions, segment_ids, cache)
    return call


def test_cached_decoding_equals_full_forward_with_left_padding(tiny, forward):
    """Prefill a prefix, then one token at a time: the logits at every real position equal one full
    forward pass, in a batch whose second row is left-padded."""
    rng = np.random.default_rng(0)
    b, t, prefix = 2, 12, 6
    ids = rng.integers(0, 320, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    mask[1, :4] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    full = np.asarray(forward(ids, pos, mask))
    cache = llama.init_cache(tiny, b, t)
    logits, cache = forward(ids[:, :prefix], pos[:, :prefix], mask[:, :prefix], cache)
    steps = [np.asarray(logits)]
    for i in range(prefix, t):
        logits, cache = forward(ids[:, i:i + 1], pos[:, i:i + 1], mask[:, i:i + 1], cache)
        steps.append(np.asarray(logits))
    incremental = np.concatenate(steps, axis=1)
    valid = mask.astype(bool)
    np.testing.assert_allclose(incremental[valid], full[valid], atol=2e-5 * np.abs(full).max())
    # the padded row equals the same tokens run alone, unpadded (right-padded to the same shape)
    alone = np.zeros((b, t), np.int32)
    alone[0, :8] = ids[1, 4:]
    np.testing.assert_allclose(full[1, 4:], np.asarray(forward(alone))[0, :8], atol=1e-5)


def test_packed_segments_do_not_attend_across(forward):
    """Two documents packed in one row give the logits each gives alone (rows 1 and 2)."""
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 320, 5), rng.integers(0, 320, 7)
    ids = np.zeros((3, 12), np.int32)
    ids[0] = np.concatenate([a, b])
    ids[1, :5], ids[2, :7] = a, b
    segments = np.array([[1] * 5 + [2] * 7] + [[1] * 12] * 2, np.int32)
    positions = np.array([list(range(5)) + list(range(7))] + [list(range(12))] * 2, np.int32)
    out = np.asarray(forward(ids, positions, segments))
    np.testing.assert_allclose(out[0, :5], out[1, :5], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:], out[2, :7], atol=1e-5)


def test_greedy_generation_matches_repeated_full_forwards(tiny, forward):
    prompts = [[5, 17, 33, 2, 9], [101, 7, 250]]
    out = gen.generate(tiny, prompts, max_new_tokens=5, stop_tokens=[])
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(5):   # causal: right padding to a fixed width changes nothing before it
            ids = np.zeros((2, 12), np.int32)
            ids[0, :len(seq)] = seq
            seq.append(int(np.argmax(np.asarray(forward(ids))[0, len(seq) - 1])))
        assert out.sequences()[row] == seq[len(prompt):]
    # stop tokens: a row stops after its first stop token (counted), later slots are padding
    stopped = gen.generate(tiny, prompts, max_new_tokens=5, stop_tokens=[int(out.tokens[0, 0])], pad_id=0)
    assert stopped.lengths[0] == 1 and stopped.tokens[0, 0] == out.tokens[0, 0]
    assert np.all(stopped.tokens[0, 1:] == 0)
    if out.tokens[0, 0] not in out.tokens[1]:
        assert stopped.lengths[1] == 5 and stopped.tokens[1].tolist() == out.tokens[1].tolist()
    streamed = np.stack(list(gen.stream(tiny, prompts, max_new_tokens=5, stop_tokens=[])), axis=1)
    np.testing.assert_array_equal(streamed, out.tokens)


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = jax.vmap(lambda k, s: gen.sample(logits, k, s), in_axes=(0, None))
    assert set(np.asarray(draw(keys, gen.Sampling(temperature=1.0, top_k=2))).ravel()) == {0, 1}
    assert set(np.asarray(draw(keys, gen.Sampling(temperature=1.0, top_p=0.7))).ravel()) == {0, 1}
    assert set(np.asarray(draw(keys, gen.Sampling(temperature=1.0, top_p=0.4))).ravel()) == {0}
    assert set(np.asarray(draw(keys, gen.Sampling(temperature=1.0))).ravel()) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_p"):
        gen.Sampling(top_p=0.0)


def test_prompt_longer_than_the_model_supports(tiny):
    with pytest.raises(gen.PromptTooLong, match="max_position_embeddings"):
        gen.generate(tiny, [[1] * 120], max_new_tokens=20)


# ------------------------------------------------------------------------------------------------
# HF checkpoints
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(golden_dir):
    return golden_dir / HF_DIR_NAME


def test_sharded_hf_directory_round_trips_bit_identical(hf_dir, tmp_path):
    model, _ = llama.from_pretrained(hf_dir, strict=True)
    out = llama.export_hf(model, tmp_path / "export", dtype="float32", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert (out / "generation_config.json").exists()
    original = {k: v for f in hf_dir.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    exported = {k: v for f in files for k, v in load_file(str(out / f)).items()}
    assert exported.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k].astype(np.float32), err_msg=k)
    again, _ = llama.from_pretrained(out)
    first, second = dict(llama.hf_state_dict(model)), dict(llama.hf_state_dict(again))
    assert first.keys() == second.keys() == original.keys()
    for k in first:
        np.testing.assert_array_equal(first[k], second[k], err_msg=k)


def test_bfloat16_export_and_failed_export_keeps_the_old_directory(hf_dir, tmp_path, monkeypatch):
    model, _ = llama.from_pretrained(hf_dir)
    target = llama.export_hf(model, tmp_path / "out")          # default bfloat16, one file
    assert (target / "model.safetensors").exists()
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == "bfloat16"
    before = sorted(p.name for p in target.iterdir())

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("safetensors.numpy.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        llama.export_hf(model, target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]       # no temporary left behind


def test_strict_report_lists_every_problem(hf_dir, golden, golden_dir):
    spec = golden.load(golden_dir / "llama_tiny_mha.json")
    sd = dict(golden.state_dict(spec))
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:32]
    sd["model.layers.7.mlp.extra.weight"] = np.zeros(3, np.float32)
    model = zoo.create_model("llama_tiny_mha", abstract=True)
    with pytest.raises(WeightConversionError) as err:
        zoo.load_torch_weights(model, sd)
    msg = str(err.value)
    assert "1 missing" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert "1 unexpected" in msg and "model.layers.7.mlp.extra.weight" in msg
    assert "shape mismatch" in msg and "model.layers.0.self_attn.q_proj.weight: checkpoint (32, 64)" in msg


def test_missing_shard_is_named(hf_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    (broken / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        llama.from_pretrained(broken)


def test_fsdp_load_on_8_devices_places_each_slice(hf_dir):
    """Loaded into an abstract model under an 8-device FSDP x TP mesh: every device holds exactly its
    slice of the checkpoint's tensor, and the sharded forward equals the single-device one."""
    mesh = sharding.make_mesh((("data", 4), ("model", 2)))
    model, _ = llama.from_pretrained(hf_dir, mesh=mesh, sharding_rules=llama.RULES["fsdp_tp"])
    single, _ = llama.from_pretrained(hf_dir)
    q = model.model.blocks[0].layer.self_attn.q_proj.kernel.get_value()
    assert tuple(q.sharding.spec)[:3] == (None, "data", "model")
    assert len({s.index for s in q.addressable_shards}) == 8
    full = np.asarray(single.model.blocks[0].layer.self_attn.q_proj.kernel.get_value())
    for s in q.addressable_shards:
        np.testing.assert_array_equal(np.asarray(s.data), full[s.index])
    ids = np.random.default_rng(0).integers(0, 320, (4, 8)).astype(np.int32)
    graphdef, state = nnx.split(model)
    sharded = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))(state, ids)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single(ids)), atol=1e-5)


def test_chat_command_completes_and_rejects_a_bad_path(hf_dir, capsys, tmp_path):
    from lib.models.llama import chat
    assert chat.main(["--model", str(hf_dir), "--complete", "Two plus two", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Two plus two")
    assert chat.main(["--model", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    assert "error:" in capsys.readouterr().err


def test_export_refuses_to_replace_something_else(hf_dir, tmp_path):
    model, _ = llama.from_pretrained(hf_dir)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "README.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an HF checkpoint"):
        llama.export_hf(model, other)
    assert [p.name for p in other.iterdir()] == ["README.txt"]
    bigger = tmp_path / "bigger"
    bigger.mkdir()
    (bigger / "config.json").write_text(json.dumps({**model.config.to_hf(), "num_hidden_layers": 32}))
    with pytest.raises(FileExistsError, match="num_hidden_layers: 32 there, 2 here"):
        llama.export_hf(model, bigger)
    llama.export_hf(model, bigger, overwrite=True)
    assert (bigger / "model.safetensors").exists()


def test_bfloat16_compute_keeps_float32_logits(hf_dir):
    """bfloat16 parameters and compute: logits stay float32 and near the float32 model's."""
    f32, _ = llama.from_pretrained(hf_dir)
    bf16, _ = llama.from_pretrained(hf_dir, dtype="bfloat16")
    assert bf16.model.blocks[0].layer.mlp.up_proj.kernel.get_value().dtype == jnp.bfloat16
    ids = np.random.default_rng(0).integers(0, 320, (2, 16)).astype(np.int32)
    a, b = np.asarray(f32(ids)), bf16(ids)
    assert b.dtype == jnp.float32
    assert np.abs(np.asarray(b) - a).max() < 0.05 * np.abs(a).max()
