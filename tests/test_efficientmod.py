"""EfficientMod: parity with the official PyTorch code, variants, weights (EMA), layers, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.efficientmod import digits as digits_config
from configs.efficientmod import imagenet as imagenet_config
from lib import sharding, zoo
from lib.layers import conv as conv_lib
from lib.layers.attention import Attention, attention_head_dim
from lib.layers.modulation import ModulationBlock
from projects.efficientmod import convert
from projects.efficientmod.models import EfficientMod

# Exact parameter counts of the official models (reference table, confirmed by running upstream).
PARAM_COUNTS = {"efficientmod_xxs": 4_736_264, "efficientmod_xs": 6_627_544,
                "efficientmod_s": 12_897_184, "efficientmod_s_conv": 12_872_336}


def tiny_model(**kw):
    """Every layer kind of EfficientMod (ratio-1 and expanded blocks, an attention block in stage 3).

    The first build compiles each eager init op once (seconds); later builds reuse them."""
    return EfficientMod(dims=(8, 16, 24, 32), mlp_ratios=((3,), (1,), (2,), (1,)), attention_depths=(0, 0, 1, 0),
                        att_ratios=(2, 2, 2, 2), num_classes=kw.pop("num_classes", 5),
                        rngs=nnx.Rngs(params=0, dropout=1), **kw)


@pytest.fixture(autouse=True)
def xla_convs():
    """Plain XLA convolutions unless a test picks one: one op per conv, quick to compile on CPU. The
    fast depthwise path is checked by the parity test and tests/test_conv_impls.py."""
    with conv_lib.conv_impl("xla"):
        yield


def _images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("impl", ["fast", "xla"])
def test_parity_with_official_pytorch(check_golden_parity, impl):
    with conv_lib.conv_impl(impl):  # both depthwise-conv implementations must match
        check_golden_parity("efficientmod_xxs_224")


@pytest.mark.parametrize("name,count", sorted(PARAM_COUNTS.items()))
def test_exact_parameter_counts(name, count):
    assert zoo.count_params(zoo.create_model(name, abstract=True)) == count


def test_every_variant_is_listed_and_hybrid_layout():
    assert zoo.list_models("efficientmod_*") == sorted(PARAM_COUNTS)
    model = zoo.create_model("efficientmod_s", abstract=True)
    kinds = [[type(b).__name__ for b in stage.blocks] for stage in model.layers]
    assert kinds[2] == ["ModulationBlock"] * 8 + ["AttentionBlock"] * 4   # attention after the Mod blocks
    assert [b.mlp.mlp_ratio for b in model.layers[0].blocks] == [1, 6, 1, 6]
    assert model.layers[3].blocks[-1].mlp.fc1.out_features == 312 * 5        # att_ratio 5 in stage 4 of s
    assert model.layers[3].downsample is None
    # linspace(0, 0.02, 28) in block order, attention blocks after their stage's Mod blocks
    assert model.layers[3].blocks[4].drop_path.rate == pytest.approx(0.02 * 24 / 27)
    assert model.layers[3].blocks[-1].drop_path.rate == pytest.approx(0.02)
    conv = zoo.create_model("efficientmod_s_conv", abstract=True)
    assert all(type(b).__name__ == "ModulationBlock" for s in conv.layers for b in s.blocks)


def test_attention_head_dim_rule():
    # max(dim // 8, 32): the inner width differs from dim for the narrow stages.
    assert {d: 8 * attention_head_dim(d, 8) for d in (128, 144, 256, 288, 312)} == \
        {128: 256, 144: 256, 256: 256, 288: 288, 312: 312}


def test_attention_matches_a_direct_softmax_with_the_torch_qkv_layout():
    attn = Attention(16, num_heads=2, rngs=nnx.Rngs(0))          # head_dim 32, inner 64 != dim
    x = _images((2, 5, 16))
    w = np.asarray(attn.qkv.kernel[...]).reshape(16, 3, 2, 32)   # channel s*inner + h*hd + d
    q, k, v = (np.einsum("bnc,chd->bhnd", x, w[:, s]) for s in range(3))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    out = (p / p.sum(-1, keepdims=True)) @ v                       # [b, h, n, d]
    out = out.transpose(0, 2, 1, 3).reshape(2, 5, 64) @ np.asarray(attn.proj.kernel[...])
    np.testing.assert_allclose(np.asarray(attn(x)), out + np.asarray(attn.proj.bias[...]), rtol=1e-5, atol=1e-5)
    assert attn.qkv.bias is None


def test_modulation_tiles_the_context_and_skips_gelu_at_ratio_one():
    for ratio in (1, 3):
        block = ModulationBlock(4, ratio, layer_scale_init=1.0, rngs=nnx.Rngs(ratio))
        x = _images((1, 3, 3, 4), seed=ratio)
        y, ctx = block(x, return_context=True)
        mlp = block.mlp
        z = block.norm(x)
        v = mlp.fc1(z)
        v = jax.nn.gelu(v, approximate=False) if ratio > 1 else v
        tiled = np.concatenate([np.asarray(ctx)] * ratio, axis=-1)      # channel k uses ctx[k % dim]
        want = np.asarray(x) + np.asarray(mlp.fc2(v * tiled))
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)
        assert ctx.shape == (1, 3, 3, 4)
    with pytest.raises(ValueError, match="mlp_ratio must be a positive integer"):
        ModulationBlock(4, 1.5, rngs=nnx.Rngs(0))


def test_key_map():
    km = convert.efficientmod_key_map
    assert km("layers.2.blocks.5.mlp.context_layer.context_list.0") == "layers.2.blocks.5.mlp.context_layer.dwconv"
    assert km("layers.2.blocks.6.attn.qkv") == "layers.2.blocks.6.attn.qkv"
    assert km("layers.0.downsample.proj") == "layers.0.downsample.proj"
    assert km("patch_embed.norm") == "patch_embed.norm"
    assert km("head") == "head.fc"
    assert km("norm") == "norm"
    assert km("dist_head") is None and km("normal") is None


def test_ema_state_dict_is_loaded_with_use_ema(golden, golden_dir):
    state_dict = golden.state_dict(golden.load(golden_dir / "efficientmod_xxs_224.json"))
    ema = {k: v * 0.5 if v.dtype.kind == "f" else v for k, v in state_dict.items()}
    checkpoint = {"state_dict": state_dict, "state_dict_ema": ema, "epoch": 300}
    stem = state_dict["patch_embed.proj.weight"].transpose(2, 3, 1, 0)
    qkv = state_dict["layers.2.blocks.6.attn.qkv.weight"].T
    for use_ema, scale in ((True, 0.5), (False, 1.0)):
        model = zoo.create_model("efficientmod_xxs", abstract=True)
        report = zoo.load_torch_weights(model, checkpoint, use_ema=use_ema)
        assert report.ok and len(report.loaded) == len(state_dict)
        np.testing.assert_array_equal(np.asarray(model.patch_embed.proj.kernel[...]), stem * np.float32(scale))
        got_qkv = np.asarray(model.layers[2].blocks[6].attn.qkv.kernel[...])
        np.testing.assert_array_equal(got_qkv, qkv * np.float32(scale))


def test_mismatched_checkpoint_lists_every_problem(golden, golden_dir):
    state_dict = dict(golden.state_dict(golden.load(golden_dir / "efficientmod_xxs_224.json")))
    del state_dict["layers.3.blocks.2.attn.qkv.weight"]
    state_dict["layers.0.blocks.0.gamma_2"] = np.ones(32, np.float32)
    with pytest.raises(zoo.WeightConversionError, match=r"(?s)attn\.qkv\.kernel.*gamma_2"):
        zoo.load_torch_weights(zoo.create_model("efficientmod_xxs", abstract=True), state_dict)


def test_every_parameter_has_logical_axis_names():
    model = zoo.create_model("efficientmod_xxs", abstract=True)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), path
        assert set(names) <= set(sharding.LOGICAL_AXES) | {None}, (path, names)


def test_backbone_features_are_taken_before_each_downsampler():
    graphdef, state = nnx.split(zoo.create_model("efficientmod_xxs", num_classes=0, abstract=True))
    shapes = jax.eval_shape(lambda s, x: (nnx.merge(graphdef, s).forward_intermediates(x), nnx.merge(graphdef, s)(x)),
                            state, jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32))
    assert [f.shape for f in shapes[0]] == [(1, 16, 24, 32), (1, 8, 12, 64), (1, 4, 6, 128), (1, 2, 3, 256)]
    assert shapes[1].shape == (1, 256)   # num_classes=0: pooled features

    model = tiny_model(num_classes=0)
    model.eval()
    x = _images((1, 64, 64, 3))
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        feats = m.forward_intermediates(x)
        # the next stage starts from this stage's features after its downsampler
        return feats, m.layers[1](m.layers[0].downsample(feats[0]))[0]

    feats, stage1 = run(state, x)
    assert [f.shape for f in feats] == [(1, 16, 16, 8), (1, 8, 8, 16), (1, 4, 4, 24), (1, 2, 2, 32)]
    np.testing.assert_allclose(np.asarray(stage1), np.asarray(feats[1]), rtol=1e-5, atol=1e-5)


def _jit_call(model, x):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


def test_drop_path_and_eval_switch():
    model = tiny_model(drop_path_rate=0.5, layer_scale_init=1.0)
    x = _images((4, 32, 32, 3))

    def call_twice(model):  # two calls draw two masks from the module's dropout stream
        graphdef, state = nnx.split(model)

        def forward(state):
            m = nnx.merge(graphdef, state)
            return m(x), m(x)
        return jax.jit(forward)(state)

    a, b = call_twice(model)
    assert not np.allclose(np.asarray(a), np.asarray(b))   # stochastic in train mode
    model.eval()
    a, b = call_twice(model)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_compute_stays_close_to_float32():
    model, model_bf16 = tiny_model(layer_scale_init=1.0), tiny_model(layer_scale_init=1.0, dtype=jnp.bfloat16)
    nnx.update(model_bf16, nnx.state(model))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model_bf16)))
    x = _images((2, 32, 32, 3), seed=1)
    want, got = _jit_call(model, x), _jit_call(model_bf16, x)
    assert got.dtype == jnp.bfloat16
    rel = np.abs(np.asarray(got, np.float32) - np.asarray(want)).max() / np.abs(np.asarray(want)).max()
    assert 0 < rel < 0.05, rel


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 32, 32, 1), (2, 3, 32, 32)])
def test_bad_image_shapes_name_the_expected_shape(shape):
    with pytest.raises(ValueError, match=r"expected an NHWC image batch of shape \[batch, height, width, 3\]"):
        tiny_model()(jnp.zeros(shape))


def test_bad_stage_lists():
    with pytest.raises(ValueError, match="need one entry per stage"):
        EfficientMod(dims=(8, 16), mlp_ratios=((1,), (1,), (1,)), attention_depths=(0, 0), att_ratios=(4, 4),
                     rngs=nnx.Rngs(0))


def test_configs():
    c = imagenet_config.get_config("variant=s")
    assert (c.model.name, c.model.kwargs.drop_path_rate, c.input.batch_size, c.lr, c.ema_decay) == \
        ("efficientmod_s", 0.02, 2048, 4e-3, 0.9998)
    assert (c.input.auto_augment, c.mixup.mixup_alpha, c.mixup.cutmix_alpha) == ("rand-m9-mstd0.5-inc1", 0.8, 1.0)
    assert (c.distill.teacher, c.distill.alpha, c.distill.tau) == ("", 0.9, 1.0)
    with pytest.raises(ValueError, match="unknown EfficientMod variant 'm'"):
        imagenet_config.get_config("variant=m")
    assert zoo.model_info(digits_config.get_config().model.name).name == "efficientmod_xxs"
