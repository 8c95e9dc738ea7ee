"""lib.layers: PyTorch semantics of padding, init, BatchNorm, DropPath, and the star op."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib.layers.conv import Conv, depthwise_conv
from lib.layers.drop import DropPath, drop_path_rates
from lib.layers.metaformer import MetaFormerBlock
from lib.layers.norm import BatchNorm, GroupNorm
from lib.layers.star import gelu, star


def _torch_conv(x_nchw, w_oihw, stride, pad, groups):
    """What torch.nn.functional.conv2d computes, written in NCHW/OIHW with explicit padding."""
    return jax.lax.conv_general_dilated(x_nchw, w_oihw, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=groups)


@pytest.mark.parametrize("k,stride,pad,groups", [(3, 2, 1, 1), (7, 1, 3, 8), (1, 1, 0, 1), (7, 4, 3, 1)])
def test_conv_matches_torch_layout_and_padding(k, stride, pad, groups):
    conv = Conv(8, 16, k, stride=stride, padding=pad, groups=groups, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, 8, 16, 16)).astype(np.float32)
    w_oihw = np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1)
    want = _torch_conv(x, w_oihw, stride, pad, groups) + np.asarray(conv.bias[...])[None, :, None, None]
    got = conv(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if stride > 1:  # 'SAME' would pad asymmetrically here and differ
        same = jax.lax.conv_general_dilated(x.transpose(0, 2, 3, 1), conv.kernel[...], (stride, stride), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
        assert not np.allclose(same + conv.bias[...], got.transpose(0, 2, 3, 1), atol=1e-3)


def test_conv_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\[batch, height, width, 8\]"):
        Conv(8, 4, 3, rngs=nnx.Rngs(0))(jnp.zeros((1, 5, 5, 3)))


def test_torch_default_init_bounds_and_trunc_normal():
    conv = Conv(16, 32, 3, rngs=nnx.Rngs(0))  # fan_in 144 -> U(+-1/12)
    w = np.asarray(conv.kernel[...])
    assert np.abs(w).max() <= 1 / 12 and np.abs(w).max() > 0.95 / 12
    assert np.abs(np.asarray(conv.bias[...])).max() <= 1 / 12
    tn = np.asarray(Conv(64, 64, 3, init="trunc_normal", rngs=nnx.Rngs(0)).kernel[...])
    assert abs(tn.std() - 0.02) < 0.001 and np.all(np.asarray(Conv(64, 64, 3, init="trunc_normal", rngs=nnx.Rngs(0)).bias[...]) == 0)
    dw = depthwise_conv(8, 7, rngs=nnx.Rngs(0))
    assert dw.kernel.shape == (7, 7, 1, 8)
    assert dw.kernel.get_metadata()["out_sharding"] == ("kernel_h", "kernel_w", None, "out_channels")


def test_batchnorm_follows_torch_momentum_and_unbiased_running_var():
    bn = BatchNorm(3)
    x = np.random.default_rng(0).standard_normal((4, 5, 5, 3)).astype(np.float32) * 2 + 1
    y = np.asarray(bn(x))
    flat = x.reshape(-1, 3)
    want = (x - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.mean[...], 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
    bn.use_running_average = True
    np.testing.assert_allclose(bn(x), (x - bn.mean[...]) / np.sqrt(bn.var[...] + 1e-5), rtol=1e-4, atol=1e-5)
    assert BatchNorm(3, dtype=jnp.bfloat16)(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_drop_path_is_per_sample_and_rescales():
    dp = DropPath(0.5, rngs=nnx.Rngs(dropout=0))
    x = jnp.ones((256, 4, 4, 8))
    y = np.asarray(dp(x))
    per_sample = y.reshape(256, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(per_sample.min(1) == per_sample.max(1))  # all features of a sample share the draw
    assert 0.35 < (per_sample[:, 0] > 0).mean() < 0.65
    dp.deterministic = True
    np.testing.assert_array_equal(dp(x), x)
    assert drop_path_rates(0.1, [1, 2, 2]) == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    with pytest.raises(ValueError):
        DropPath(1.0)


def test_star_modes():
    a, b = jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0])
    np.testing.assert_array_equal(star(a, b, "mul"), [3.0, 8.0])
    np.testing.assert_array_equal(star(a, b, "sum"), [4.0, 6.0])
    with pytest.raises(ValueError, match="unknown star mode"):
        star(a, b, "max")


def test_gelu_is_exact_erf_gelu():
    """torch.nn.GELU(): 0.5 x (1 + erf(x / sqrt 2)), not the tanh approximation; value and gradient
    against float64, over the range where activations live (and far tails)."""
    from scipy.special import erf
    x = np.concatenate([np.linspace(-12, 12, 4001), [-40.0, 40.0]]).astype(np.float32)
    x64 = x.astype(np.float64)
    want = 0.5 * x64 * (1 + erf(x64 / np.sqrt(2)))
    want_grad = 0.5 * (1 + erf(x64 / np.sqrt(2))) + x64 * np.exp(-x64 ** 2 / 2) / np.sqrt(2 * np.pi)
    got, grad = jax.vmap(jax.value_and_grad(gelu))(jnp.asarray(x))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=2e-6, atol=2e-6)
    assert float(jnp.max(jnp.abs(got - jax.nn.gelu(jnp.asarray(x), approximate=True)))) > 1e-4  # not tanh
    # bfloat16 in, bfloat16 out, computed in float32: the negative tail keeps its value
    x_bf16 = jnp.asarray(x, jnp.bfloat16)
    x64 = np.asarray(x_bf16, np.float64)
    got_bf16 = gelu(x_bf16)
    assert got_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got_bf16, np.float64), 0.5 * x64 * (1 + erf(x64 / np.sqrt(2))),
                               rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 4])
def test_groupnorm_matches_torch_definition(groups):
    x = np.random.default_rng(0).normal(1.0, 3.0, (2, 5, 6, 8)).astype(np.float32)
    norm = GroupNorm(8, groups)
    norm.scale[...] = jnp.arange(8, dtype=jnp.float32)
    norm.bias[...] = jnp.full((8,), 0.5)
    # torch: view as [B, G, C/G * H * W] (channels first), normalise each row with the biased variance
    xt = x.transpose(0, 3, 1, 2).reshape(2, groups, -1)
    want = (xt - xt.mean(-1, keepdims=True)) / np.sqrt(xt.var(-1, keepdims=True) + 1e-5)
    want = want.reshape(2, 8, 5, 6).transpose(0, 2, 3, 1) * np.arange(8) + 0.5
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="GroupNorm expects"):
        norm(jnp.zeros((2, 5, 6, 7)))


def test_metaformer_block_is_two_scaled_residuals():
    class Double(nnx.Module):
        def __call__(self, x):
            return 2 * x

    rngs = nnx.Rngs(0)
    block = MetaFormerBlock(4, Double(), Double(), layer_scale_init=0.25, rngs=rngs)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 3, 4)), jnp.float32)
    h = x + 0.25 * 2 * block.norm1(x)
    np.testing.assert_allclose(block(x), h + 0.25 * 2 * block.norm2(h), rtol=1e-6, atol=1e-6)
