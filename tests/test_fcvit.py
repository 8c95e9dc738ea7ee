"""FCViT: parity with the official PyTorch code, the global context against a numpy reference,
parameter counts, key map, init, backbone features, configs, bad input."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.fcvit import digits as digits_config
from configs.fcvit import imagenet as imagenet_config
from lib import sharding, zoo
from lib.layers import conv as conv_lib
from lib.layers.global_context import GlobalContext, GlobalContextMixer
from projects.fcvit import models
from projects.fcvit.convert import fcvit_key_map

# fcvit_tiny is exact: the sum of the fixture state_dict's parameter tensors (the golden
# "num_params", produced by the official code). The others: the reference table's rounded counts,
# in millions (1e6) and in 2^20 units (the README's "#params").
TINY_PARAMS = 4_784_752
ROUNDED_PARAMS = {"fcvit_tiny": (4.78, 4.56), "fcvit_b12": (14.70, 14.02), "fcvit_b24": (26.96, 25.71),
                  "fcvit_b48": (51.48, 49.09)}


def _tiny_fcvit(**kw):
    """A complete but small FCViT: two stages (every layer kind), 3x3 token-mixer convs (fast to compile).
    Built with the threefry variant ``zoo.create_model`` uses: its init ops compile faster."""
    with jax.threefry_partitionable(False):
        return models.FCViT((1, 1), (16, 32), (2, 2), num_classes=10, kernel_size=3, rngs=nnx.Rngs(0), **kw)


# ------------------------------------------------------------------------------------------------
# parity
# ------------------------------------------------------------------------------------------------
def test_parity_with_official_pytorch(check_golden_parity, golden):
    # XLA's convolutions: they compile 2-3x faster than the CPU fast path's 121-tap shifted form of
    # the 11x11 depthwise convs; tests/test_conv_impls.py checks the two forms agree.
    with conv_lib.conv_impl("xla"):
        spec = check_golden_parity("fcvit_tiny_224")
    assert spec["num_params"] == TINY_PARAMS
    assert golden.modes(spec) == ["eval", "train"]   # its train-mode (dropout-free) logits were checked too


def _global_context_reference(x_nchw, p, heads, ddof=1):
    """Upstream ``GlobalContext.forward`` (weighted, compete) transcribed to numpy, NCHW, float64."""
    b, c, h, w = x_nchw.shape
    x = x_nchw.reshape(b, c, h * w)
    gap = x.mean(-1)                                                       # [b, c]
    q, g = x.reshape(b, heads, c // heads, h * w), gap.reshape(b, heads, c // heads)
    sim = np.einsum("bhdn,bhd->bhn", q, g) * (c // heads) ** -0.5
    std = sim.std(axis=(1, 2), ddof=ddof, keepdims=True)                   # torch.std: ddof=1
    sim = (sim - sim.mean(axis=(1, 2), keepdims=True)) / (std + 1e-5)
    sim = sim * p["rescale_weight"][None, :, None] + p["rescale_bias"][None, :, None]
    gc = (gap @ p["fc1.weight"].T + p["fc1.bias"]).reshape(b, 2, -1).max(axis=1)   # compete: [b, 2, C/r]
    gc = gc @ p["fc2.weight"].T + p["fc2.bias"]
    return (sim[:, :, None, :] * gc.reshape(b, heads, c // heads, 1)).reshape(b, c, h, w)


def test_global_context_matches_numpy_reference_with_unbiased_std():
    rng = np.random.default_rng(0)
    dim, heads = 32, 8
    gc = GlobalContext(dim, heads=heads, rngs=nnx.Rngs(0))
    p = {"fc1.weight": rng.standard_normal((8, dim)) / np.sqrt(dim), "fc1.bias": 0.1 * rng.standard_normal(8),
         "fc2.weight": rng.standard_normal((dim, 4)) / 2, "fc2.bias": 0.1 * rng.standard_normal(dim),
         "rescale_weight": 1 + 0.1 * rng.standard_normal(heads), "rescale_bias": 0.1 * rng.standard_normal(heads)}
    gc.fc1.kernel[...] = p["fc1.weight"].T.astype(np.float32)
    gc.fc1.bias[...] = p["fc1.bias"].astype(np.float32)
    gc.fc2.kernel[...] = p["fc2.weight"].T.astype(np.float32)
    gc.fc2.bias[...] = p["fc2.bias"].astype(np.float32)
    gc.rescale_weight[...] = p["rescale_weight"].astype(np.float32)
    gc.rescale_bias[...] = p["rescale_bias"].astype(np.float32)
    x = rng.standard_normal((2, dim, 5, 6)).astype(np.float32)               # NCHW, as upstream
    got = np.asarray(gc(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    want = _global_context_reference(x.astype(np.float64), p, heads)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 2e-6 * scale
    # The biased std (numpy's and jnp's default) is a different function, far outside that tolerance.
    biased = _global_context_reference(x.astype(np.float64), p, heads, ddof=0)
    assert np.abs(got - biased).max() > 100 * np.abs(got - want).max()
    assert np.abs(got - biased).max() > 2e-5 * scale


# ------------------------------------------------------------------------------------------------
# variants, key map, init
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ROUNDED_PARAMS))
def test_parameter_counts(name):
    n = zoo.count_params(zoo.create_model(name, abstract=True))
    assert (round(n / 1e6, 2), round(n / 2 ** 20, 2)) == ROUNDED_PARAMS[name]
    if name == "fcvit_tiny":
        assert n == TINY_PARAMS


def test_every_variant_is_listed_with_its_weights():
    assert zoo.list_models("fcvit_*") == ["fcvit_b12", "fcvit_b24", "fcvit_b48", "fcvit_tiny"]
    assert all(zoo.model_info(n).pretrained.startswith("https://drive.google.com/") for n in zoo.list_models("fcvit_*"))


@pytest.mark.parametrize("torch_prefix,ours", [
    ("patch_embed.proj", "stem.conv"),
    ("patch_embed.norm", "stem.bn"),
    ("network.0.2", "stages.0.blocks.2"),
    ("network.4.1.token_mixer.gc2.fc1", "stages.2.blocks.1.token_mixer.gc2.fc1"),
    ("network.6.0.token_mixer.fc1.0", "stages.3.blocks.0.token_mixer.fc1.fc1"),
    ("network.6.0.token_mixer.fc2.2", "stages.3.blocks.0.token_mixer.fc2.fc2"),
    ("network.2.0.channel_mixer.dwconv", "stages.1.blocks.0.channel_mixer.dwconv"),
    ("network.1.proj", "stages.1.downsample.conv"),
    ("network.5.norm", "stages.3.downsample.bn"),
    ("norm", "norm"),
    ("head", "head.fc"),
    ("network.3.something", None),
    ("patch_embed.other", None),
    ("pos_embed", None),
])
def test_key_map(torch_prefix, ours):
    assert fcvit_key_map(torch_prefix) == ours


def test_checkpoint_errors_are_reported_together(golden, golden_dir):
    spec = golden.load(golden_dir / "fcvit_tiny_224.json")
    state_dict = dict(golden.state_dict(spec))
    del state_dict["network.0.0.token_mixer.gc1.rescale_bias"]
    state_dict["network.6.1.token_mixer.dw2.weight"] = np.zeros((320, 1, 7, 7), np.float32)
    state_dict["network.0.0.token_mixer.spatial_att.0.weight"] = np.zeros((32, 1, 3, 3), np.float32)
    model = zoo.create_model("fcvit_tiny", abstract=True)
    with pytest.raises(zoo.WeightConversionError) as err:
        zoo.load_torch_weights(model, state_dict)
    msg = str(err.value)
    assert "stages.0.blocks.0.token_mixer.gc1.rescale_bias" in msg
    assert "network.6.1.token_mixer.dw2.weight (320, 1, 7, 7)" in msg and "(11, 11, 1, 320)" in msg
    assert "network.0.0.token_mixer.spatial_att.0.weight" in msg


def test_upstream_initialisation():
    model = _tiny_fcvit()
    block = model.stages[1].blocks[0]

    def std(v):
        return float(np.std(np.asarray(v.get_value())))
    # Convs (1x1 ones too): normal(0, sqrt(2 / fan_out)), fan_out = kh * kw * out / groups; zero bias.
    # (PyTorch's default, std 1/sqrt(3 fan_in), would give 0.19, 0.10 and 0.10 here.)
    assert std(block.token_mixer.dw1.kernel) == pytest.approx(np.sqrt(2 / (3 * 3)), rel=0.15)
    assert std(block.token_mixer.fc1.fc1.kernel) == pytest.approx(np.sqrt(2 / 16), rel=0.15)
    assert std(block.channel_mixer.fc1.kernel) == pytest.approx(np.sqrt(2 / 64), rel=0.1)
    for conv in (model.stem.conv, model.stages[1].downsample.conv, block.token_mixer.dw2, block.channel_mixer.dwconv):
        assert not np.any(np.asarray(conv.bias.get_value()))
    # The global context's linears: trunc_normal(.02); rescale 1 / 0; layer scales 1e-5.
    assert std(block.token_mixer.gc1.fc1.kernel) == pytest.approx(0.02, rel=0.2)
    np.testing.assert_array_equal(np.asarray(block.token_mixer.gc2.rescale_weight.get_value()), np.ones(8))
    np.testing.assert_array_equal(np.asarray(block.layer_scale_2.get_value()), np.full(32, 1e-5, np.float32))
    with pytest.raises(ValueError, match="unknown init scheme 'kaiming'"):
        zoo.create_model("fcvit_tiny", init="kaiming", abstract=True)


def test_every_parameter_has_logical_axis_names():
    model = zoo.create_model("fcvit_tiny", abstract=True)
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), path
        assert set(names) <= set(sharding.LOGICAL_AXES) | {None}, (path, names)


# ------------------------------------------------------------------------------------------------
# behaviour: backbone, bf16, errors (remat: tests/test_conv_impls.py, the shared lib.layers.backbone.run_stage)
# ------------------------------------------------------------------------------------------------
def test_backbone_features():
    model = zoo.create_model("fcvit_tiny", num_classes=0, abstract=True)
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
    with conv_lib.conv_impl("xla"):   # shapes only: the one-op form traces fastest
        feats = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).forward_intermediates(x), state, x)
        pooled = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    assert [f.shape for f in feats] == [(1, 16, 24, 32), (1, 8, 12, 64), (1, 4, 6, 160), (1, 2, 3, 320)]
    assert pooled.shape == (1, 320)


def test_drop_path_schedule():
    """Block j of stage i drops with ``rate * (j + sum(depths[:i])) / (sum(depths) - 1)``, as upstream."""
    model = zoo.create_model("fcvit_tiny", drop_path_rate=0.1, abstract=True)
    rates = [block.drop_path.rate for stage in model.stages for block in stage.blocks]
    np.testing.assert_allclose(rates, [0.1 * i / 12 for i in range(13)], rtol=1e-12)
    model.eval()
    assert all(block.drop_path.deterministic for stage in model.stages for block in stage.blocks)


def test_bfloat16_compute_stays_close_to_float32():
    model = _tiny_fcvit(layer_scale_init=1.0)
    model_bf16 = _tiny_fcvit(layer_scale_init=1.0, dtype=jnp.bfloat16)
    model.eval(), model_bf16.eval()
    forward = nnx.jit(lambda m, x: m(x))
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    want, got = np.asarray(forward(model, x)), forward(model_bf16, x)
    assert got.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model_bf16)))
    rel = np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max()
    assert 0 < rel < 0.05, rel


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 32, 32, 1), (2, 3, 32, 32)])
def test_bad_image_shapes_name_the_expected_shape(shape):
    model = _tiny_fcvit()
    with pytest.raises(ValueError, match=r"expected an NHWC image batch of shape \[batch, height, width, 3\]"):
        model(jnp.zeros(shape))


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match=r"dim 20 must divide by heads \(8\)"):
        GlobalContext(20, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"GlobalContext expects NHWC input \[batch, height, width, 16\]"):
        GlobalContextMixer(16, kernel_size=3, rngs=nnx.Rngs(0))(jnp.zeros((1, 4, 4, 8)))
    with pytest.raises(ValueError, match="one entry per stage"):
        models.FCViT((1, 1), (16, 16, 16), (2, 2), rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------------------
# configs
# ------------------------------------------------------------------------------------------------
def test_imagenet_configs_match_the_recipe(golden_dir):
    recipe = json.load(open(golden_dir / "schedules.json"))["schedules"]["fcvit"]
    for variant, drop_path, crop in [("tiny", 0.1, 0.9), ("b12", 0.1, 0.9), ("b24", 0.1, 0.95), ("b48", 0.2, 0.95)]:
        c = imagenet_config.get_config(f"variant={variant}")
        assert c.model.name == f"fcvit_{variant}" and c.model.name in zoo.list_models()
        assert (c.model.kwargs.drop_path_rate, c.input.crop_pct) == (drop_path, crop)
        assert (c.input.batch_size, c.lr, c.min_lr, c.wd) == (1024, recipe["lr"], recipe["min_lr"], 0.05)
        assert (c.total_epochs, c.warmup_epochs, c.warmup_lr, c.cooldown_epochs) == (300, 5, 1e-6, 10)
        assert c.input.auto_augment == "rand-m9-mstd0.5-inc1" and c.input.reprob == 0.25
        assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.label_smoothing) == (0.8, 1.0, 0.1)
    assert models.FCVIT_VARIANTS["fcvit_b24"][3] == imagenet_config.get_config("variant=b24").input.crop_pct
    with pytest.raises(ValueError, match="unknown FCViT variant 'b36'"):
        imagenet_config.get_config("variant=b36")
    c = digits_config.get_config()
    assert (c.model.name, c.num_classes, c.input.dataset) == ("fcvit_tiny", 10, "digits")
