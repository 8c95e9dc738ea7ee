"""Context Clusters: parity with the official PyTorch code, the Cluster mixer against an independent
re-implementation of upstream's formula, bfloat16 assignments, old checkpoints, variants, bad input."""
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib import sharding, zoo
from lib.layers import cluster as cluster_lib
from lib.layers.conv import conv_impl
from lib.layers.cluster import Cluster
from projects.coc import convert, models, visualize

FIXTURES = ["coc_tiny_224", "coc_tiny_plain_224"]

# Exact parameter counts of the official models (reference table, confirmed by running upstream).
PARAM_COUNTS = {
    "coc_tiny": 5_570_584, "coc_tiny2": 5_570_584, "coc_tiny_plain": 5_570_584, "coc_small": 14_657_024,
    "coc_medium": 29_290_520, "coc_base_dim64": 54_231_100, "coc_base_dim96": 53_054_904,
}


@pytest.fixture(scope="module")
def tiny_weights(golden, golden_dir):
    spec = golden.load(golden_dir / "coc_tiny_224.json")
    return spec, golden.state_dict(spec)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_parity_with_official_pytorch(check_golden_parity, fixture):
    check_golden_parity(fixture)


@pytest.mark.parametrize("name,count", sorted(PARAM_COUNTS.items()))
def test_exact_parameter_counts(name, count):
    assert zoo.count_params(zoo.create_model(name, abstract=True)) == count


@pytest.mark.parametrize("size", ["small", "medium"])
def test_dense_backbones(size):
    """feat2/5/7: the classifier's parameters minus norm + head, plus one GroupNorm per stage;
    four normalised maps at strides 4..32 (upstream fork_feat)."""
    dims = (64, 128, 320, 512)
    want = PARAM_COUNTS[f"coc_{size}"] - (2 * 512 + 512 * 1000 + 1000) + sum(2 * d for d in dims)
    for p in (2, 5, 7):
        assert models.COC_VARIANTS[f"coc_{size}_feat{p}"]["proposal"] == p
    model = zoo.create_model(f"coc_{size}_feat5", abstract=True)
    assert zoo.count_params(model) == want
    assert model.stages[0].blocks[0].token_mixer.proposal == (5, 5)
    shapes = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 64, 96, 3), jnp.float32))
    assert [s.shape for s in shapes] == [(2, 16, 24, 64), (2, 8, 12, 128), (2, 4, 6, 320), (2, 2, 3, 512)]


def test_every_variant_is_listed():
    names = set(zoo.list_models("coc_*"))
    assert set(PARAM_COUNTS) | {f"coc_{s}_feat{p}" for s in ("small", "medium") for p in (2, 5, 7)} == names


def test_every_parameter_has_logical_axis_names():
    model = zoo.create_model("coc_tiny", abstract=True)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), path
        assert set(names) <= set(sharding.LOGICAL_AXES) | {None}, (path, names)


# ------------------------------------------------------------------------------------------------
# the building blocks against independent NumPy versions of the upstream code
# ------------------------------------------------------------------------------------------------
def _np_adaptive_pool(x, out):
    """torch AdaptiveAvgPool2d on NCHW, written from its definition (float64)."""
    b, c, h, w = x.shape
    y = np.zeros((b, c) + tuple(out))
    for i in range(out[0]):
        r0, r1 = math.floor(i * h / out[0]), math.ceil((i + 1) * h / out[0])
        for j in range(out[1]):
            c0, c1 = math.floor(j * w / out[1]), math.ceil((j + 1) * w / out[1])
            y[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean((2, 3))
    return y


def _np_cluster(mixer: Cluster, x: np.ndarray) -> np.ndarray:
    """Upstream ``Cluster.forward`` step by step in NCHW float64, with its [B, M, N, D] broadcasts."""
    p = lambda v: np.asarray(v[...], np.float64)
    lin = lambda layer, t: t @ p(layer.kernel) + p(layer.bias)
    value = lin(mixer.v, x).transpose(0, 3, 1, 2)
    feat = lin(mixer.f, x).transpose(0, 3, 1, 2)
    e, (fw, fh) = mixer.heads, mixer.fold
    b0, ec, h0, w0 = feat.shape
    feat, value = (t.reshape(b0 * e, ec // e, h0, w0) for t in (feat, value))   # b (e c) w h -> (b e) c w h
    folded = fw > 1 and fh > 1
    if folded:  # b c (f1 w) (f2 h) -> (b f1 f2) c w h
        feat, value = (t.reshape(b0 * e, -1, fw, h0 // fw, fh, w0 // fh).transpose(0, 2, 4, 1, 3, 5)
                       .reshape(b0 * e * fw * fh, -1, h0 // fw, w0 // fh) for t in (feat, value))
    b, c, h, w = feat.shape
    centers = _np_adaptive_pool(feat, mixer.proposal).reshape(b, c, -1).transpose(0, 2, 1)
    value_centers = _np_adaptive_pool(value, mixer.proposal).reshape(b, c, -1).transpose(0, 2, 1)
    points = feat.reshape(b, c, -1).transpose(0, 2, 1)
    unit = lambda t: t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    sim = 1 / (1 + np.exp(-(p(mixer.sim_beta) + p(mixer.sim_alpha) * unit(centers) @ unit(points).transpose(0, 2, 1))))
    mask = np.zeros_like(sim)
    np.put_along_axis(mask, sim.argmax(1)[:, None], 1.0, axis=1)
    sim = sim * mask
    value2 = value.reshape(b, c, -1).transpose(0, 2, 1)
    denom = (sim if mixer.normalize == "sim_sum" else mask).sum(-1, keepdims=True)
    out = ((value2[:, None] * sim[..., None]).sum(2) + value_centers) / (denom + 1.0)
    out = (out[:, :, None] * sim[..., None]).sum(1).transpose(0, 2, 1).reshape(b, c, h, w)
    if folded:
        out = out.reshape(b0 * e, fw, fh, c, h, w).transpose(0, 3, 1, 4, 2, 5).reshape(b0 * e, c, h0, w0)
    out = out.reshape(b0, ec, h0, w0).transpose(0, 2, 3, 1)
    return lin(mixer.proj, out)


def test_adaptive_pool_uses_torch_overlapping_bins():
    assert cluster_lib.adaptive_bins(7, 2) == [(0, 4), (3, 7)]
    assert cluster_lib.adaptive_bins(7, 4) == [(0, 2), (1, 4), (3, 6), (5, 7)]
    x = np.random.default_rng(0).standard_normal((2, 7, 9, 3))
    for out in [(2, 2), (4, 3), (7, 9), (3, 5), (9, 11)]:   # incl. more bins than points
        got = cluster_lib.adaptive_avg_pool(jnp.asarray(x, jnp.float32), out)
        want = _np_adaptive_pool(x.transpose(0, 3, 1, 2), out).transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


def test_coordinate_channels():
    pos = np.asarray(cluster_lib.coordinate_channels(3, 5))
    assert pos.shape == (3, 5, 2) and pos.dtype == np.float32
    np.testing.assert_array_equal(pos[:, 0, 0], [-0.5, 0.0, 0.5])       # row: varies along H
    np.testing.assert_array_equal(pos[0, :, 1], [-0.5, -0.25, 0.0, 0.25, 0.5])
    assert np.all(pos[:, :, 0] == pos[:, :1, 0]) and np.all(pos[:, :, 1] == pos[:1, :, 1])
    with pytest.raises(ValueError, match="at least 2x2"):
        cluster_lib.coordinate_channels(1, 5)


@pytest.mark.parametrize("normalize", ["sim_sum", "point_count"])
@pytest.mark.parametrize("fold,proposal", [((2, 3), (2, 2)), ((1, 1), (4, 2)), ((2, 1), (3, 3))])
def test_cluster_matches_upstream_formula(fold, proposal, normalize):
    """Folded (non-square, overlapping bins), unfolded, and a half fold (2, 1) that upstream ignores."""
    mixer = Cluster(8, heads=2, head_dim=5, proposal=proposal, fold=fold, normalize=normalize, rngs=nnx.Rngs(0))
    mixer.sim_alpha[...] = jnp.array([3.0])
    mixer.sim_beta[...] = jnp.array([-0.5])
    x = np.random.default_rng(1).standard_normal((2, 6, 9, 8)).astype(np.float32)
    want = _np_cluster(mixer, x.astype(np.float64))
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(mixer, x)), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape,fold,proposal,normalize", [
    ((2, 14, 14, 8), 2, 2, "sim_sum"),            # 7x7 regions, overlapping 2x2 bins (coc_tiny)
    ((2, 6, 6, 8), 1, 4, "point_count"),          # unfolded, 4x4 overlapping bins over 6
])   # (non-square folds and bins: test_cluster_matches_upstream_formula runs this path on CPU)
def test_cluster_fast_path_matches_reference_forward_and_gradients(shape, fold, proposal, normalize):
    """The XLA:CPU form (conv_impl "fast") against the reference form ("xla"): the output, and the
    gradients of every parameter and the input (the fast path differentiates the reference form
    through a custom VJP), to float32 round-off."""
    mixer = Cluster(shape[-1], heads=2, head_dim=5, proposal=proposal, fold=fold, normalize=normalize,
                    rngs=nnx.Rngs(0))
    mixer.sim_alpha[...] = jnp.array([3.0])
    mixer.sim_beta[...] = jnp.array([-0.5])
    graphdef, params = nnx.split(mixer)
    x = jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)

    def loss(p, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)))
    results, outputs = {}, {}
    for impl in ("xla", "fast"):
        with conv_impl(impl):
            assert nnx.merge(graphdef, params)._fast_path_applies(x) == (impl == "fast")
            outputs[impl] = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x)
            results[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
    rel = lambda a, b: np.abs(np.asarray(a, np.float64) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30)
    assert rel(outputs["fast"], outputs["xla"]) < 1e-5
    assert rel(results["fast"][0], results["xla"][0]) < 1e-5
    fast, ref = jax.tree.leaves(results["fast"][1]), jax.tree.leaves(results["xla"][1])
    assert len(fast) == len(ref) == 9                     # 3 kernels, 3 biases, alpha, beta, the input
    for a, b in zip(fast, ref):
        assert rel(a, b) < 1e-5


def test_normalize_modes_differ_and_bad_values_are_refused():
    kw = dict(heads=2, head_dim=4, proposal=2, fold=1)
    a = Cluster(8, normalize="sim_sum", rngs=nnx.Rngs(0), **kw)
    b = Cluster(8, normalize="point_count", rngs=nnx.Rngs(0), **kw)
    x = np.random.default_rng(0).standard_normal((1, 4, 4, 8)).astype(np.float32)
    run = nnx.jit(lambda m, x: m(x))
    assert not np.allclose(np.asarray(run(a, x)), np.asarray(run(b, x)), atol=1e-4)
    with pytest.raises(ValueError, match="unknown normalize='mask_sum'"):
        Cluster(8, normalize="mask_sum", rngs=nnx.Rngs(0), **kw)


def test_fold_must_divide_the_feature_map():
    mixer = Cluster(8, heads=2, head_dim=4, proposal=2, fold=(4, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"a 6x8 feature map cannot be cut into 4x4 regions"):
        mixer(jnp.zeros((1, 6, 8, 8)))
    with pytest.raises(ValueError, match="Cluster expects NHWC"):
        mixer(jnp.zeros((6, 8, 8)))


def test_bfloat16_similarity_and_assignment_run_in_float32():
    """Under bfloat16 compute the features are bfloat16, but the similarity and argmax must equal a
    float32 computation on those same (bfloat16-rounded) features."""
    mixer = Cluster(32, heads=4, head_dim=16, proposal=4, fold=(2, 2), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 32)).astype(np.float32)
    maps, feat = nnx.jit(lambda m, x: (m.assignments(x), m._split(m.f(x))))(mixer, x)
    assert feat.dtype == jnp.bfloat16
    feat = np.asarray(feat, np.float32)                               # the bf16 features, widened
    pooled = _np_adaptive_pool(feat.transpose(0, 3, 1, 2).astype(np.float64), (4, 4)).astype(np.float32)
    centers = pooled.reshape(len(feat), feat.shape[-1], -1).transpose(0, 2, 1)
    points = feat.reshape(len(feat), -1, feat.shape[-1])
    unit = lambda t: t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), np.float32(1e-12))
    sim32 = 1 / (1 + np.exp(-(unit(centers) @ unit(points).transpose(0, 2, 1))))    # alpha 1, beta 0
    want = np.asarray(mixer._merge(jnp.asarray(sim32.argmax(1).reshape(len(feat), 8, 8, 1)), 16, 16))
    got_local = np.asarray(maps["assignment"]) % 16                  # drop the region offset
    np.testing.assert_array_equal(got_local, want.transpose(0, 3, 1, 2))
    assert maps["similarity"].dtype == jnp.float32
    # The same computation in bfloat16 flips assignments: the float32 path is not a formality.
    bf = lambda t: t.astype(jnp.bfloat16)
    cos16 = jnp.einsum("bmd,bnd->bmn", bf(unit(centers)), bf(unit(points)), preferred_element_type=jnp.bfloat16)
    assert np.any(np.asarray(jnp.argmax(cos16, 1)) != sim32.argmax(1))


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def _old_style(state_dict):
    """The golden weights in the pre-May-2023 layout: fc1/fc2/fc_v, conv-shaped MLP, fea_pos."""
    back = {v: k for k, v in convert.OLD_MIXER_NAMES.items()}
    old = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-3] == "token_mixer" and parts[-2] in back:
            key = ".".join(parts[:-2] + [back[parts[-2]], parts[-1]])
        if ".mlp.fc" in key and key.endswith(".weight"):
            value = value[:, :, None, None]
        old[key] = value
    old["fea_pos"] = np.zeros((224, 224, 2), np.float32)
    return old


def test_old_checkpoints_load_with_renamed_keys_and_warn(tiny_weights):
    _, state_dict = tiny_weights
    old = _old_style(state_dict)
    assert "network.0.0.token_mixer.fc1.weight" in old and old["network.0.0.mlp.fc1.weight"].ndim == 4
    with pytest.raises(zoo.WeightConversionError, match="token_mixer.fc1.weight"):   # not silently
        zoo.load_torch_weights(zoo.create_model("coc_tiny", abstract=True), old)

    current = zoo.create_model("coc_tiny", abstract=True)
    zoo.load_torch_weights(current, state_dict)
    legacy = zoo.create_model("coc_tiny", normalize="point_count", abstract=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # point_count model: no warning
        report = convert.load_old_torch_weights(legacy, {"state_dict": old})
    assert report.ok and len(report.loaded) == len(state_dict)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(current, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(legacy, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    block = legacy.stages[0].blocks[0]
    assert block.token_mixer.normalize == "point_count"
    np.testing.assert_array_equal(np.asarray(block.token_mixer.f.kernel.get_value()),
                                  state_dict["network.0.0.token_mixer.f.weight"][:, :, 0, 0].T)
    with pytest.warns(UserWarning, match="trained with the point-count normalisation.*normalize='point_count'"):
        convert.load_old_torch_weights(zoo.create_model("coc_tiny", abstract=True), old)


def test_key_map():
    km = convert.coc_key_map
    assert km("network.4.3.mlp.fc2") == "stages.2.blocks.3.channel_mixer.fc2"
    assert km("network.0.1.token_mixer.proj") == "stages.0.blocks.1.token_mixer.proj"
    assert km("network.5.proj") == "stages.3.downsample.proj"
    assert km("norm6") == "feature_norms.3" and km("head") == "head.fc" and km("norm1") is None
    assert km("network.3.0.mlp") is None and km("fea_pos") is None


# ------------------------------------------------------------------------------------------------
# visualisation, bad input
# ------------------------------------------------------------------------------------------------
def test_cluster_assignments_for_visualisation():
    model = zoo.create_model("coc_tiny", num_classes=10, depths=(1, 1, 1, 1), fold=(2, 1, 1, 1))
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    maps = nnx.jit(lambda m, x: visualize.cluster_assignments(m, x))(model, x)
    assert sorted(maps) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    m = maps[(0, 0)]                                                # 8x8 points, 2x2 regions, 2x2 centers
    assert m["assignment"].shape == (2, 4, 8, 8) and m["similarities"].shape == (2, 4, 8, 8, 4)
    np.testing.assert_array_equal(np.asarray(m["centers"])[:4], [[0.5, 0.5], [0.5, 2.5], [2.5, 0.5], [2.5, 2.5]])
    assign, sims = np.asarray(m["assignment"]), np.asarray(m["similarities"])
    # a point joins a center of its own region: region = (row // 4) * 2 + col // 4
    region = (np.arange(8)[:, None] // 4) * 2 + np.arange(8)[None, :] // 4
    np.testing.assert_array_equal(assign // 4, np.broadcast_to(region, assign.shape))
    np.testing.assert_array_equal(assign % 4, sims.argmax(-1))
    np.testing.assert_array_equal(np.asarray(m["similarity"]), sims.max(-1))
    some = nnx.jit(lambda m, x: visualize.cluster_assignments(m, x, blocks=[(1, 0)]))(model, x)
    assert list(some) == [(1, 0)]
    np.testing.assert_array_equal(np.asarray(some[(1, 0)]["assignment"]), np.asarray(maps[(1, 0)]["assignment"]))


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 32, 32, 5), (2, 3, 32, 32)])
def test_bad_image_shapes_name_the_expected_shape(shape):
    model = zoo.create_model("coc_tiny", num_classes=10, abstract=True)
    with pytest.raises(ValueError, match=r"expected an NHWC image batch of shape \[batch, height, width, 3\]"):
        model(jnp.zeros(shape))


def test_configs():
    from configs.coc import digits, imagenet
    c = imagenet.get_config("variant=small,batch=512")
    assert (c.model.name, c.lr, c.min_lr, c.input.batch_size) == ("coc_small", 5e-4, 1e-6, 512)
    assert c.model.kwargs.drop_path_rate == 0.1 and c.input.crop_pct == 0.9
    with pytest.raises(ValueError, match="unknown Context Cluster variant 'huge'"):
        imagenet.get_config("variant=huge")
    d = digits.get_config()
    model = zoo.create_model(d.model.name, num_classes=d.num_classes, abstract=True, **d.model.kwargs)
    x = jax.ShapeDtypeStruct((2, d.input.image_size, d.input.image_size, 3), jnp.float32)
    out = nnx.eval_shape(lambda m, x: m(x), model, x)
    assert out.shape == (2, 10)
