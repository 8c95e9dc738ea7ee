"""DINOv2-style ViTs (lib/models/dinov2.py): golden parity in four modes, the official checkpoint
layout, position-embedding resampling, registers, intermediate layers, the zoo family and bad input.

Only the tiny model (56x56, dim 64, depth 2) is ever run; the big entries are built abstractly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib import sharding, zoo
from lib.models import dinov2


@pytest.fixture(scope="module")
def spec(golden, golden_dir):
    return golden.load(golden_dir / "dinov2_tiny.json")


def _features(model, x, masks=None):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x, m: nnx.merge(graphdef, s).forward_features(x, m))(state, x, masks)


@pytest.mark.parametrize("mode", ["eval", "masked", "interp70", "interp70_aa"])
def test_golden_parity(golden, spec, mode):
    overrides = golden.case(spec, mode).get("constructor_overrides", {})
    model = zoo.create_model("dinov2_tiny", abstract=True, **overrides)   # the strict load fills every array
    zoo.load_torch_weights(model, golden.state_dict(spec))
    kw = golden.named_inputs(spec, mode)
    # train() and eval() lay attention's matmuls out differently (Attention.deterministic): both match
    for set_mode in (model.train, model.eval):
        set_mode()
        out = _features(model, kw["x"].transpose(0, 2, 3, 1), kw.get("masks"))
        for name in golden.outputs(spec, mode):
            ok, err, tol = golden.compare(np.asarray(out[name]), spec, mode, name=name)
            assert ok, (mode, set_mode.__name__, name, err, tol)
            assert err <= 5e-6 * max(1.0, float(np.abs(golden.output(spec, name, mode)).max())), (mode, name, err)
    assert zoo.count_params(model) == spec["num_params"]


def test_official_pth_checkpoint_gives_the_same_outputs(golden, golden_dir, spec):
    model = zoo.create_model("dinov2_tiny", abstract=True)
    report = zoo.load_torch_weights(model, golden_dir / "checkpoints" / "dinov2_tiny_pretrain.pth")
    assert report.ok and len(report.loaded) == len(spec["state_dict"])
    out = _features(model, golden.named_inputs(spec, "eval")["x"].transpose(0, 2, 3, 1))
    for name in golden.outputs(spec, "eval"):
        assert golden.compare(np.asarray(out[name]), spec, "eval", name=name)[0]
    # the inverse: official names, layouts and order, back into a fresh model
    sd = dinov2.official_state_dict(model)
    assert list(sd) == [k for k, _ in spec["state_dict"]]
    fresh = zoo.create_model("dinov2_tiny", abstract=True)
    zoo.load_torch_weights(fresh, sd)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(fresh, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))


def _torch_bicubic_reference(x, out, scale_factor):
    """Direct transcription of upsample_bicubic2d (align_corners=False, a=-0.75), one axis."""
    a, n = -0.75, len(x)
    c1 = lambda t: ((a + 2) * t - (a + 3)) * t * t + 1
    c2 = lambda t: ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    y = []
    for i in range(out):
        src = (i + 0.5) / scale_factor - 0.5
        f = int(np.floor(src))
        t = src - f
        taps = [c2(t + 1), c1(t), c1(1 - t), c2(2 - t)]
        y.append(sum(w * x[min(max(f - 1 + k, 0), n - 1)] for k, w in enumerate(taps)))
    return np.array(y)


def test_position_resampling_is_pytorchs_bicubic_not_jax_image_resize():
    x = np.random.default_rng(0).standard_normal(40)
    for m, out, sf in ((4, 5, 5.1 / 4), (16, 4, 4.1 / 16), (37, 16, 16.1 / 37)):
        np.testing.assert_allclose(dinov2.bicubic_matrix(m, out, sf) @ x[:m], _torch_bicubic_reference(x[:m], out, sf),
                                   atol=1e-12)
    # jax.image.resize's cubic (Keys a=-0.5, size-derived scale) is not the default DINOv2 path...
    grid = np.random.default_rng(1).standard_normal((4, 4))
    w = dinov2.bicubic_matrix(4, 5, 5.1 / 4)
    assert np.abs(w @ grid @ w.T - np.asarray(jax.image.resize(grid, (5, 5), "cubic"))).max() > 1e-2
    # ...while the antialiased size path (the *_reg models) upsampling is a=-0.5 with normalised borders
    w = dinov2.bicubic_matrix(4, 5, None, antialias=True)
    np.testing.assert_allclose(w @ grid @ w.T, np.asarray(jax.image.resize(grid, (5, 5), "cubic", antialias=True)),
                               atol=1e-6)
    # antialiased downsampling widens the filter: each output row sums to 1 over > 4 taps
    w = dinov2.bicubic_matrix(37, 16, None, antialias=True)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    assert (np.count_nonzero(w, axis=1) > 4).all()


@pytest.fixture(scope="module")
def tiny_reg(golden_dir):
    model = zoo.create_model("dinov2_tiny", abstract=True, num_register_tokens=4, interpolate_antialias=True,
                             interpolate_offset=0.0)
    report = zoo.load_torch_weights(model, golden_dir / "checkpoints" / "dinov2_tiny_pretrain.pth", strict=False)
    assert report.missing == ["register_tokens"]
    model.register_tokens.set_value(jax.random.normal(jax.random.key(3), (1, 4, 64)))
    return model


def test_registers_intermediate_layers_and_call(tiny_reg):
    x = jax.random.normal(jax.random.key(0), (2, 42, 70, 3))    # non-square: a 3x5 grid, interpolated
    graphdef, state = nnx.split(tiny_reg)

    @jax.jit
    def run(state, x):
        model = nnx.merge(graphdef, state)
        return (model.get_intermediate_layers(x, n=[0, 1], reshape=True, return_class_token=True),
                model(x), model.prepare_tokens_with_masks(x),
                model.forward_features([x, x], [jnp.ones((2, 15), bool), None]))

    layers, called, tokens, both = run(state, x)
    out = both[1]
    assert out["x_norm_clstoken"].shape == (2, 64)
    assert out["x_norm_regtokens"].shape == (2, 4, 64)
    assert out["x_norm_patchtokens"].shape == (2, 15, 64)
    assert out["x_prenorm"].shape == (2, 1 + 4 + 15, 64) and out["masks"] is None
    assert len(layers) == 2 and layers[1][0].shape == (2, 3, 5, 64) and layers[1][1].shape == (2, 64)
    np.testing.assert_allclose(layers[1][0].reshape(2, 15, 64), out["x_norm_patchtokens"], atol=1e-5)
    np.testing.assert_allclose(layers[1][1], out["x_norm_clstoken"], atol=1e-5)
    np.testing.assert_allclose(called, out["x_norm_clstoken"], atol=1e-6)
    # registers sit right after CLS and get no position embedding
    np.testing.assert_array_equal(tokens[:, 1:5], jnp.broadcast_to(tiny_reg.register_tokens[...], (2, 4, 64)))
    # a list of crops gives a list of dicts (Proteus' masked + unmasked student pass)
    assert len(both) == 2 and not np.allclose(both[0]["x_norm_patchtokens"], both[1]["x_norm_patchtokens"])


def _timm_convert_dinov2(sd):
    """timm's ``_convert_dinov2`` (how the hf-hub:timm/*dinov2* checkpoints were made from the official ones)."""
    sd = dict(sd)
    sd.pop("mask_token", None)
    out = {}
    if "register_tokens" in sd:
        out["reg_token"] = sd.pop("register_tokens")
        out["cls_token"] = sd.pop("cls_token") + sd["pos_embed"][:, 0]
        out["pos_embed"] = sd.pop("pos_embed")[:, 1:]
    for k, v in sd.items():
        out[k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = v
    return out


def test_timm_layout_loads_to_the_same_tokens(tiny_reg):
    timm_sd = _timm_convert_dinov2(dinov2.official_state_dict(tiny_reg))
    assert "reg_token" in timm_sd and "mask_token" not in timm_sd and timm_sd["pos_embed"].shape == (1, 16, 64)
    model = zoo.create_model("dinov2_tiny", abstract=True, num_register_tokens=4, interpolate_antialias=True,
                             interpolate_offset=0.0)
    assert zoo.load_torch_weights(model, timm_sd).ok
    x = jax.random.normal(jax.random.key(2), (1, 70, 70, 3))
    np.testing.assert_allclose(model.prepare_tokens_with_masks(x), tiny_reg.prepare_tokens_with_masks(x), atol=1e-6)
    # ViT-g's SwiGLU: timm's fc1 / fc2 are the official w12 / w3 (same chunk order)
    names = dinov2.from_timm_state_dict({"blocks.3.mlp.fc1.weight": 0, "blocks.3.mlp.fc2.bias": 0}, swiglu=True)
    assert set(names) == {"blocks.3.mlp.w12.weight", "blocks.3.mlp.w3.bias"}


def test_zoo_family_abstract_shapes_and_logical_axes():
    names = zoo.list_models("dinov2_*")
    assert set(names) >= {f"dinov2_vit{a}14{r}" for a in "sblg" for r in ("", "_reg")} | {"dinov2_tiny"}
    assert zoo.count_params(zoo.create_model("dinov2_vits14", abstract=True)) == 22_056_576
    g = zoo.create_model("dinov2_vitg14_reg", abstract=True, depth=2)     # (the 40-block count: README, test_zoo)
    assert g.blocks[0].mlp.w12.kernel.shape == (1536, 8192)   # SwiGLUFFNFused: (int(6144*2/3)+7)//8*8 = 4096
    assert g.register_tokens.shape == (1, 4, 1536) and g.interpolate_antialias and g.interpolate_offset == 0.0
    assert g.pos_embed.shape == (1, 37 * 37 + 1, 1536)
    for path, var in nnx.to_flat_state(nnx.state(g, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and set(names) <= set(sharding.LOGICAL_AXES) | {None}, (path, names)
    # DINOv2's constructor arguments as overrides
    m = zoo.create_model("dinov2_vits14", abstract=True, embed_dim=96, depth=3, num_heads=3, patch_size=8,
                         img_size=64, init_values=None, ffn_layer="swiglufused")
    assert m.pos_embed.shape == (1, 65, 96) and len(m.blocks) == 3 and m.blocks[0].ls1 is None


def test_bad_input(golden_dir):
    model = zoo.create_model("dinov2_tiny", abstract=True)     # every check comes before any computation
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model.forward_features(jnp.zeros((1, 60, 56, 3)))
    with pytest.raises(ValueError, match="masks must be"):
        model.forward_features(jnp.zeros((1, 56, 56, 3)), jnp.zeros((1, 9), bool))
    with pytest.raises(ValueError, match="ffn_layer"):
        zoo.create_model("dinov2_tiny", ffn_layer="swish")
    with pytest.raises(zoo.WeightConversionError, match="another DINOv2 size: embed_dim 64 in the checkpoint vs 384"):
        zoo.load_torch_weights(zoo.create_model("dinov2_vits14", abstract=True),
                               golden_dir / "checkpoints" / "dinov2_tiny_pretrain.pth")
