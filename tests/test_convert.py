"""Checkpoint reading (no torch), strict conversion reports, and the project's own weight format."""
import builtins

import jax
import numpy as np
import pytest
from flax import nnx

from lib import sharding, zoo
from lib.convert.torch_pickle import UnsafeCheckpointError, load_torch_file


@pytest.fixture(scope="module")
def s050(golden, golden_dir):
    spec = golden.load(golden_dir / "starnet_s050_224.json")
    return spec, golden.state_dict(spec)


def _params(model):
    return {str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))}


@pytest.fixture(scope="module")
def reference_model(s050):
    model = zoo.create_model("starnet_s050")
    zoo.load_torch_weights(model, s050[1])
    return _params(model)


@pytest.mark.parametrize("filename", ["starnet_s050_saver.pth.tar", "starnet_s050_ddp_ema.pth.tar",
                                      "starnet_s050_bare_legacy.pth"])
def test_reads_every_official_layout_without_torch(golden_dir, s050, reference_model, filename):
    _, state_dict = s050
    raw = load_torch_file(golden_dir / "checkpoints" / filename)
    inner = raw.get("state_dict", raw)
    inner = {k.removeprefix("module."): v for k, v in inner.items()}
    assert inner.keys() == state_dict.keys()
    for k, v in state_dict.items():
        np.testing.assert_array_equal(inner[k], v, err_msg=k)
    model = zoo.create_model("starnet_s050")
    report = zoo.load_torch_weights(model, golden_dir / "checkpoints" / filename)
    assert report.ok and len(report.loaded) == len([k for k in state_dict if "num_batches" not in k])
    got = _params(model)
    for k, v in reference_model.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_saver_checkpoint_metadata(golden_dir):
    raw = load_torch_file(golden_dir / "checkpoints" / "starnet_s050_saver.pth.tar")
    assert raw["arch"] == "starnet_s050" and raw["args"].lr == 0.003 and raw["epoch"] == 299


def test_ema_weights_are_selectable(golden_dir, reference_model):
    model = zoo.create_model("starnet_s050")
    zoo.load_torch_weights(model, golden_dir / "checkpoints" / "starnet_s050_ddp_ema.pth.tar", use_ema=True)
    got = _params(model)
    key = "('head', 'fc', 'kernel')"
    np.testing.assert_allclose(got[key], 0.5 * reference_model[key], rtol=1e-7)


def test_create_model_takes_official_files_too(golden_dir, reference_model):
    """``weights=`` (zoo.load_pretrained) reads a PyTorch file as strictly as load_torch_weights."""
    model = zoo.create_model("starnet_s050", rngs=7, weights=golden_dir / "checkpoints" / "starnet_s050_saver.pth.tar")
    got = _params(model)
    for k, v in reference_model.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    with pytest.raises(zoo.WeightConversionError, match="missing"):
        zoo.create_model("starnet_s1", weights=golden_dir / "checkpoints" / "starnet_s050_saver.pth.tar")
    report = zoo.load_pretrained(zoo.create_model("starnet_s050"), golden_dir / "checkpoints" / "starnet_s050_ddp_ema.pth.tar",
                                 use_ema=True)
    assert report.ok


def test_unsafe_pickle_is_refused_and_never_executed(golden_dir, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(builtins, "print", lambda *a, **k: calls.append(a))
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load global 'builtins.print'"):
        load_torch_file(golden_dir / "checkpoints" / "unsafe_reduce.pth.tar")
    with pytest.raises(UnsafeCheckpointError):
        zoo.load_torch_weights(zoo.create_model("starnet_s050", abstract=True),
                               golden_dir / "checkpoints" / "unsafe_reduce.pth.tar")
    assert calls == [] and "UNSAFE" not in capsys.readouterr().out


def test_checkpoint_of_another_architecture_gets_one_full_report(s050):
    _, state_dict = s050
    model = zoo.create_model("starnet_s1", abstract=True)
    with pytest.raises(zoo.WeightConversionError) as info:
        zoo.load_torch_weights(model, state_dict)
    msg = str(info.value)
    assert "missing (in the model, not in the checkpoint)" in msg
    assert "shape mismatch" in msg and "stages.0.0.conv.weight (16, 32, 3, 3)" in msg
    assert "stages.0.blocks.1.f1.conv.kernel" in msg  # s1 has 2 blocks in stage 0, s050 one


def test_unexpected_and_missing_keys_are_all_listed(s050):
    _, state_dict = s050
    broken = dict(state_dict)
    broken.pop("head.weight")
    broken.pop("stem.0.bn.running_var")
    broken["extra.weight"] = np.zeros(3, np.float32)
    broken["stages.0.1.f1.conv.weight"] = np.zeros((48, 16, 3, 3), np.float32)
    with pytest.raises(zoo.WeightConversionError) as info:
        zoo.load_torch_weights(zoo.create_model("starnet_s050", abstract=True), broken)
    msg = str(info.value)
    for needle in ["head.fc.kernel", "stem.bn.var", "extra.weight", "stages.0.1.f1.conv.weight (48, 16, 3, 3)"]:
        assert needle in msg, needle
    report = zoo.load_torch_weights(zoo.create_model("starnet_s050"), broken, strict=False)
    assert not report.ok and len(report.missing) == 3 and report.unexpected == ["extra.weight"]


def test_missing_file_and_unknown_format(tmp_path):
    model = zoo.create_model("starnet_s050", abstract=True)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        zoo.load_torch_weights(model, tmp_path / "nope.pth")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        zoo.load_torch_weights(model, tmp_path / "w.h5")


def test_safetensors_and_npz_sources(tmp_path, s050, reference_model):
    from safetensors.numpy import save_file
    _, state_dict = s050
    floats = {k: v for k, v in state_dict.items() if "num_batches" not in k}
    save_file(floats, str(tmp_path / "m.safetensors"))
    np.savez(tmp_path / "m.npz", **floats)
    for name in ("m.safetensors", "m.npz"):
        model = zoo.create_model("starnet_s050")
        zoo.load_torch_weights(model, tmp_path / name)
        got = _params(model)
        for k, v in reference_model.items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{name} {k}")


def test_conversion_into_an_abstract_sharded_model(s050, reference_model):
    mesh = sharding.make_mesh([("data", 2), ("model", 4)])
    rules = (("out_channels", "model"),)
    model = zoo.create_model("starnet_s050", abstract=True, mesh=mesh, sharding_rules=rules)
    zoo.load_torch_weights(model, s050[1])
    kernel = model.stages[3].blocks[0].f1.conv.kernel.get_value()
    assert isinstance(kernel, jax.Array) and kernel.sharding.spec == jax.P(None, None, None, "model")
    got = _params(model)
    for k, v in reference_model.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_own_format_round_trip(tmp_path, s050, reference_model):
    model = zoo.create_model("starnet_s050")
    zoo.load_torch_weights(model, s050[1])
    path = zoo.save_weights(model, tmp_path / "s050")
    with pytest.raises(FileExistsError):
        zoo.save_weights(model, tmp_path / "s050")
    restored = zoo.create_model("starnet_s050", rngs=7, weights=path)
    got = _params(restored)
    for k, v in reference_model.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    mesh = sharding.make_mesh([("data", 8)])
    sharded = zoo.create_model("starnet_s050", abstract=True, mesh=mesh, sharding_rules=(("out_channels", "data"),))
    zoo.load_weights(sharded, path, mesh=mesh, sharding_rules=(("out_channels", "data"),))
    assert sharded.stages[3].blocks[0].f1.conv.kernel.get_value().sharding.spec == jax.P(None, None, None, "data")
    with pytest.raises(FileNotFoundError, match="weights directory not found"):
        zoo.load_weights(zoo.create_model("starnet_s050", abstract=True), tmp_path / "missing")
    with pytest.raises(zoo.WeightConversionError):
        zoo.load_weights(zoo.create_model("starnet_s1", abstract=True), path)
