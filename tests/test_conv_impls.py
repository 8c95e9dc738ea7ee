"""Fast paths against the plain lax.conv reference (forward and gradients), remat, export."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib import export, zoo
from lib.layers import conv as conv_lib
from lib.layers.conv import Conv, conv_impl, fused_pointwise


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


def _value_and_grads(f, *args):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize("k,pad,c", [(7, 3, 24), (3, 1, 8), (5, (1, 3), 6), (7, 0, 4)])
def test_depthwise_shifted_matches_lax_conv(k, pad, c):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 13, 11, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 1, c)) / k, jnp.float32)
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    padding = ((ph, ph), (pw, pw))
    outs = {}
    for impl in ("xla", "fast"):
        with conv_impl(impl):
            outs[impl] = _value_and_grads(lambda x, w: conv_lib.conv2d(x, w, (1, 1), padding, c), x, kernel)
    (v_ref, g_ref), (v_fast, g_fast) = outs["xla"], outs["fast"]
    assert _rel(v_fast, v_ref) < 1e-5
    for a, b in zip(g_fast, g_ref):
        assert _rel(a, b) < 1e-5


def test_depthwise_kernel_gradient_blocked_over_images_matches_lax_conv(monkeypatch):
    # A tiny block target makes this small batch go through the image-block loop (6 images, blocks
    # of 2), the path large maps take; the gradients must not change.
    monkeypatch.setattr(conv_lib, "_KERNEL_GRAD_BLOCK_ELEMENTS", 2 * 9 * 9 * 4)
    assert conv_lib._kernel_grad_block(6, 9 * 9 * 4) == 2
    assert conv_lib._kernel_grad_block(4, 9 * 9 * 4) == 4      # fits in two blocks: unsplit
    assert conv_lib._kernel_grad_block(7, 9 * 9 * 4) == 1      # prime batch: image by image
    assert conv_lib._kernel_grad_block(6, 10 ** 6) == 1        # one image over the target
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((6, 9, 9, 4)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((7, 7, 1, 4)) / 7, jnp.float32)
    outs = {}
    for impl in ("xla", "fast"):
        with conv_impl(impl):
            outs[impl] = _value_and_grads(lambda x, w: conv_lib.conv2d(x, w, (1, 1), ((3, 3), (3, 3)), 4), x, kernel)
    for a, b in zip(outs["fast"][1], outs["xla"][1]):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("hw,k,stride,pad", [
    ((16, 16), 3, 2, 1),       # StarNet's downsampler geometry
    ((15, 17), 3, 2, 1),       # odd sizes: the phases have different lengths
    ((13, 12), 7, 2, 3),       # more taps per phase than shifts
    ((16, 16), 4, 4, 0),       # patchify (stride = kernel)
    ((11, 11), 3, 3, (0, 2)),  # asymmetric padding, stride 3
    ((10, 10), 2, 3, 0),       # kernel smaller than stride: some phases get no tap
])
def test_strided_custom_gradients_match_lax_conv(hw, k, stride, pad):
    """The phase-matmul input gradient and the im2col kernel gradient, against XLA's own."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, *hw, 5)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 5, 3)) / k, jnp.float32)
    lo, hi = (pad, pad) if isinstance(pad, int) else pad
    padding, strides = ((lo, hi), (lo, hi)), (stride, stride)
    v_ref, g_ref = _value_and_grads(lambda x, w: conv_lib._xla_conv(x, w, strides, padding, 1), x, kernel)
    v_fast, g_fast = _value_and_grads(lambda x, w: conv_lib._strided_conv(x, w, strides, padding, True, True),
                                      x, kernel)
    assert _rel(v_fast, v_ref) < 1e-6
    for a, b in zip(g_fast, g_ref):
        assert _rel(a, b) < 1e-5


@pytest.mark.parametrize("channels,size,max_elements,want", [
    (16, 112, 1 << 24, (True, True)),    # StarNet's first downsampler at batch 1: both custom gradients
    (16, 112, 1 << 10, (True, False)),   # patch matrix over the limit: XLA's kernel gradient
    (3, 112, 1 << 24, (False, True)),    # the stem: 3 channels, kernel gradient only
    (16, 56, 1 << 24, (False, True)),    # smaller maps: kernel gradient only
    (16, 56, 1 << 10, None),             # neither: XLA's conv
])
def test_conv2d_routes_strided_convs_to_the_custom_gradients(channels, size, max_elements, want, monkeypatch):
    monkeypatch.setattr(conv_lib, "_IM2COL_MAX_ELEMENTS", max_elements)
    routed = []
    real = conv_lib._strided_conv
    monkeypatch.setattr(conv_lib, "_strided_conv", lambda x, w, s, p, phase, im2col: (
        routed.append((phase, im2col)), real(x, w, s, p, phase, im2col))[1])
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, size, size, channels)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, channels, 4)) / 3, jnp.float32)
    conv = lambda x, w: conv_lib.conv2d(x, w, (2, 2), ((1, 1), (1, 1)))
    with conv_impl("xla"):
        v_ref, g_ref = _value_and_grads(conv, x, kernel)
    assert routed == []
    with conv_impl("fast"):   # the routed form still equals the reference, gradients included
        v_fast, g_fast = _value_and_grads(conv, x, kernel)
    assert (routed[0] if routed else None) == want
    assert _rel(v_fast, v_ref) < 1e-6
    for a, b in zip(g_fast, g_ref):
        assert _rel(a, b) < 1e-5


def test_pointwise_and_fused_branches_match():
    rngs = nnx.Rngs(0)
    f1, f2 = Conv(8, 24, 1, rngs=rngs), Conv(8, 24, 1, rngs=rngs)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 5, 8)), jnp.float32)
    with conv_impl("xla"):
        want = [f1(x), f2(x)]
    with conv_impl("fast"):
        got = fused_pointwise([f1, f2], x)
        single = f1(x)
    for a, b in zip(got, want):
        assert _rel(a, b) < 1e-6
    assert _rel(single, want[0]) < 1e-6


def test_auto_uses_the_fast_path_on_cpu_only():
    with conv_impl("auto"):
        assert conv_lib.use_fast_path() == (jax.default_backend() == "cpu")
    with pytest.raises(ValueError, match="unknown conv implementation"):
        conv_lib.set_conv_impl("cudnn")


def test_whole_starnet_fast_equals_reference_forward_and_gradients():
    model = zoo.create_model("starnet_s050", num_classes=10, rngs=2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)

    def loss(p, x):
        return jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x) ** 2)
    results = {}
    for impl in ("xla", "fast"):
        with conv_impl(impl):
            results[impl] = jax.jit(jax.value_and_grad(loss))(params, x)
    assert _rel(results["fast"][0], results["xla"][0]) < 1e-5
    # Relative to the largest gradient: conv biases feeding a BatchNorm have a true gradient of 0,
    # so theirs is pure round-off and cannot be compared to itself.
    fast, ref = jax.tree.leaves(results["fast"][1]), jax.tree.leaves(results["xla"][1])
    scale = max(float(np.abs(np.asarray(b)).max()) for b in ref)
    for a, b in zip(fast, ref):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * scale


def test_remat_gives_the_same_gradients_and_batch_stats():
    outs = []
    for remat in (False, True):
        model = zoo.create_model("test_starnet_tiny", num_classes=10, rngs=0, remat=remat)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)

        def loss(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            return jnp.sum(m(x) ** 2), nnx.state(m, nnx.BatchStat)
        (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        outs.append((value, stats, grads))
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_export_round_trip_any_batch(tmp_path):
    model = zoo.create_model("test_starnet_tiny", num_classes=10, rngs=0)
    model.eval()
    blob = export.export_inference(model, (None, 32, 32, 3))
    (tmp_path / "m.bin").write_bytes(blob)
    serve = export.load_inference((tmp_path / "m.bin").read_bytes())
    for batch in (1, 3):
        x = jnp.asarray(np.random.default_rng(batch).standard_normal((batch, 32, 32, 3)), jnp.float32)
        np.testing.assert_allclose(np.asarray(serve(x)), np.asarray(model(x)), rtol=1e-5, atol=1e-6)
