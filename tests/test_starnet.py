"""StarNet / DemoNet: parity with the official PyTorch code, variants, sharding, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib import sharding, zoo
from lib.layers import conv as conv_lib
from projects.starnet import models

FIXTURES = ["starnet_s050_224", "starnet_s1_224", "demonet_d12_w64_mul_224", "demonet_d12_w64_sum_224"]

# Exact parameter counts of the official models (reference table, confirmed by running upstream).
PARAM_COUNTS = {
    "starnet_s050": 542_728, "starnet_s100": 1_043_280, "starnet_s150": 1_560_616,
    "starnet_s1": 2_869_168, "starnet_s2": 3_682_024, "starnet_s3": 5_750_792, "starnet_s4": 7_482_728,
}
# DemoNet d12 widths (upstream prints them rounded to 10k params).
DEMONET_D12_PARAMS_M = {64: 0.60, 128: 2.09, 192: 4.46, 256: 7.72, 320: 11.86, 384: 16.88, 448: 22.79}


@pytest.mark.parametrize("impl", ["fast", "xla"])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_parity_with_official_pytorch(check_golden_parity, fixture, impl):
    with conv_lib.conv_impl(impl):  # both convolution implementations must match the official code
        check_golden_parity(fixture)


@pytest.mark.parametrize("name,count", sorted(PARAM_COUNTS.items()))
def test_exact_parameter_counts(name, count):
    assert zoo.count_params(zoo.create_model(name, abstract=True)) == count


@pytest.mark.parametrize("width,millions", sorted(DEMONET_D12_PARAMS_M.items()))
def test_demonet_parameter_counts(width, millions):
    for mode in ("sum", "mul"):
        n = zoo.count_params(zoo.create_model(f"demonet_d12_w{width}_{mode}", abstract=True))
        assert round(n / 1e6, 2) == millions


def test_every_variant_is_listed():
    names = zoo.list_models()
    assert set(PARAM_COUNTS) <= set(names)
    assert {f"demonet_d12_w{w}_{m}" for w in range(32, 449, 32) for m in ("sum", "mul")} <= set(names)
    assert {f"demonet_d{d}_w192_{m}" for d in range(6, 25, 2) for m in ("sum", "mul")} <= set(names)
    assert {"demonet_2d_mul", "demonet_2d_sum"} <= set(names)
    assert all(n == n.lower() for n in names)
    assert zoo.list_models("starnet_s?") == ["starnet_s1", "starnet_s2", "starnet_s3", "starnet_s4"]


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'starnet_s5'.*Did you mean: .*starnet_s"):
        zoo.create_model("starnet_s5")


def test_every_parameter_has_logical_axis_names():
    model = zoo.create_model("starnet_s050", abstract=True)
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), path
        assert set(names) <= set(sharding.LOGICAL_AXES) | {None}, (path, names)


def test_sharded_batch_forward_equals_single_device():
    assert jax.device_count() == 8
    model = zoo.create_model("starnet_s050", num_classes=10, rngs=1)
    model.eval()
    x = np.random.default_rng(0).standard_normal((8, 64, 64, 3)).astype(np.float32)
    want = np.asarray(model(x))
    mesh = sharding.make_mesh()
    xs = jax.device_put(x, sharding.batch_sharding(mesh))
    graphdef, state = nnx.split(model)
    got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, xs)
    assert got.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_train_mode_batchnorm_uses_global_batch_statistics_when_sharded():
    graphdef, state = nnx.split(zoo.create_model("starnet_s050", num_classes=10, rngs=1))
    x = np.random.default_rng(0).standard_normal((8, 32, 32, 3)).astype(np.float32)

    @jax.jit
    def forward(s, x):
        m = nnx.merge(graphdef, s)
        return m(x), nnx.state(m, nnx.BatchStat)

    want, want_stats = forward(state, jax.device_put(x, jax.devices()[0]))
    got, got_stats = forward(state, jax.device_put(x, sharding.batch_sharding(sharding.make_mesh())))
    assert not np.allclose(np.asarray(want_stats["norm"]["mean"].get_value()), 0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_abstract_creation_allocates_nothing():
    model = zoo.create_model("starnet_s4", abstract=True)
    leaves = jax.tree.leaves(nnx.state(model))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def test_sharded_creation_under_a_mesh():
    mesh = sharding.make_mesh([("data", 2), ("model", 4)])
    rules = (("batch", "data"), ("out_channels", "model"), ("classes", "model"))
    model = zoo.create_model("starnet_s050", num_classes=10, mesh=mesh, sharding_rules=rules)
    f1 = model.stages[3].blocks[0].f1.conv.kernel.get_value()
    assert f1.sharding.spec == jax.P(None, None, None, "model")
    assert f1.addressable_shards[0].data.shape == (1, 1, 128, 384 // 4)
    # 10 classes do not divide over 4 devices: that dimension falls back to replication.
    assert model.head.fc.kernel.get_value().sharding.spec == jax.P(None, None)
    # Same values as the unsharded model from the same seed.
    plain = zoo.create_model("starnet_s050", num_classes=10)
    np.testing.assert_array_equal(np.asarray(f1), np.asarray(plain.stages[3].blocks[0].f1.conv.kernel.get_value()))
    abstract = zoo.create_model("starnet_s050", num_classes=12, abstract=True, mesh=mesh, sharding_rules=rules)
    assert abstract.stages[3].blocks[0].f1.conv.kernel.get_value().sharding.spec == jax.P(None, None, None, "model")
    assert abstract.head.fc.kernel.get_value().sharding.spec == jax.P(None, "model")


def test_mesh_errors():
    with pytest.raises(ValueError, match="needs 16 devices, but only 8 exist"):
        sharding.make_mesh([("data", 16)])
    with pytest.raises(ValueError, match="at most one axis may have size -1"):
        sharding.make_mesh([("data", -1), ("model", -1)])
    assert sharding.make_mesh([("data", -1), ("model", 2)]).shape == {"data": 4, "model": 2}


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 32, 32, 1), (2, 3, 32, 32)])
def test_bad_image_shapes_name_the_expected_shape(shape):
    model = zoo.create_model("starnet_s050", num_classes=10)
    with pytest.raises(ValueError, match=r"expected an NHWC image batch of shape \[batch, height, width, 3\]"):
        model(jnp.zeros(shape))


def test_bfloat16_compute_stays_close_to_float32():
    model = zoo.create_model("starnet_s050", num_classes=10, rngs=3)
    model_bf16 = zoo.create_model("starnet_s050", num_classes=10, rngs=3, dtype=jnp.bfloat16)
    nnx.update(model_bf16, nnx.state(model))
    model.eval(), model_bf16.eval()
    x = np.random.default_rng(1).standard_normal((4, 64, 64, 3)).astype(np.float32)
    want = np.asarray(model(x))
    got = model_bf16(x)
    assert got.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model_bf16)))
    rel = np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max()
    assert 0 < rel < 0.05, rel


def test_drop_path_and_eval_switch():
    model = zoo.create_model("demonet_d6_w192_mul", num_classes=10, drop_path_rate=0.5, layer_scale_init=1.0)
    x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
    a, b = np.asarray(model(x)), np.asarray(model(x))
    assert not np.allclose(a, b)  # stochastic in train mode
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))


def test_backbone_features():
    model = zoo.create_model("starnet_s1", num_classes=0)
    x = jnp.zeros((1, 64, 96, 3))
    feats = model.forward_intermediates(x)
    assert [f.shape for f in feats] == [(1, 16, 24, 24), (1, 8, 12, 48), (1, 4, 6, 96), (1, 2, 3, 192)]
    assert model(x).shape == (1, 192)


def test_toy_network():
    model = zoo.create_model("demonet_2d_mul", num_classes=2)
    assert model(jnp.zeros((5, 2))).shape == (5, 2)
    with pytest.raises(ValueError, match=r"\[batch, 2\]"):
        model(jnp.zeros((5, 3)))
