"""Masked layers (lib/layers/masked.py): exact top-k counts, the straight-through gradient, dense
equivalence at keep=1, mask_model / bake on an existing model, and frozen weights kept out of the
optimizer and (when regenerable) out of checkpoints.

These tests are bound by XLA:CPU compilation, so they keep it small: tiny shapes, shared where they
can be (each new shape of a random draw or a mask is one more program), random draws with the
non-partitionable threefry (as ``zoo.create_model``: it compiles ~3x faster), whole forward and
backward passes jitted once instead of run op by op, and structural checks on abstract modules."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lib.layers import masked
from lib.layers.conv import Conv, conv2d
from lib.layers.linear import Linear
from lib.tasks.classification import Classification
from lib.train import checkpoint, optim, step as step_lib
from projects.pemn.models import ConvMixer
from projects.starnet.models import StarNet

FAST_COMPILE = {"xla_backend_optimization_level": 0}   # for the test-only jitted passes


@pytest.fixture(autouse=True)
def _non_partitionable_draws():
    with jax.threefry_partitionable(False):
        yield


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _numpy_filled(make, seed=0):
    """``make()`` built abstractly, its parameters (and positive BatchNorm statistics) then drawn by
    numpy: a concrete module without a random-number program compiled per shape."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(v):
        value = 0.3 * rng.standard_normal(v.shape) if isinstance(v, nnx.Param) else rng.uniform(0.5, 1.5, v.shape)
        return v.replace(jnp.asarray(value, v.dtype))
    return nnx.merge(graphdef, jax.tree.map(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


@jax.jit(static_argnums=0, compiler_options=FAST_COMPILE)
def _apply_split(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def _apply(model, x):
    """``model(x)`` as one compiled program (cached per model structure)."""
    graphdef, state = nnx.split(model)
    return _apply_split(graphdef, state, x)


@pytest.mark.parametrize("n,keep", [(10, 0.7), (1000, 0.5), (37, 0.9), (64, 0.01), (5, 1.0), (100, 0.3)])
def test_kept_count_is_exact(n, keep):
    s = _normal(n, (n,))
    m = np.asarray(masked.topk_mask(s, keep))
    assert set(np.unique(m).tolist()) <= {0.0, 1.0}
    assert int(m.sum()) == n - int((1 - keep) * n) == masked.kept_count(n, keep)
    # the kept entries are the largest |s|
    kept, dropped = np.abs(s)[m == 1], np.abs(s)[m == 0]
    assert dropped.size == 0 or kept.min() >= dropped.max()


def test_keep_fraction_matches_reference_rounding():
    # (1 - 0.7) * 10 = 3.0000000000000004 -> int 3: 7 kept, as torch's GetSubnet
    assert masked.kept_count(10, 0.7) == 7
    assert masked.kept_count(3, 0.5) == 2          # j = int(1.5) = 1 dropped
    with pytest.raises(ValueError, match="fraction of weights kept"):
        masked.topk_mask(jnp.ones(4), 0.0)


def test_mask_is_invariant_to_score_scaling():
    s = _normal(0, (8, 16))
    m = masked.topk_mask(s, 0.4)
    for c in (1e-4, 3.7, 1e3, -2.0):                # |.| makes the sign irrelevant too
        np.testing.assert_array_equal(masked.topk_mask(np.float32(c) * s, 0.4), m)


def _grad_pair(layer, x):
    """(dL/dscores, dL/dW_eff, mask) for L = sum(sin(layer(x))), dL/dW_eff taken on the same network
    computed with W_eff as the free variable. One compiled program per layer."""
    graphdef, scores, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit(compiler_options=FAST_COMPILE)
    def pair(scores, rest, x):
        def loss(p):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest)(x)))

        def loss_of_weff(w):
            if isinstance(layer, masked.MaskedLinear):
                return jnp.sum(jnp.sin(x @ w))
            return jnp.sum(jnp.sin(conv2d(x, w, layer.stride, layer.padding, layer.groups)))

        twin = nnx.merge(graphdef, scores, rest)
        return jax.grad(loss)(scores)["scores"][...], jax.grad(loss_of_weff)(twin.effective_kernel()), twin.mask()
    return pair(scores, rest, x)


# Shapes shared by the layer tests below: Linear 4->5, Conv 4->6 3x3, depthwise 4 5x5.
def test_scores_gradient_is_sign_times_weight_times_weff_gradient():
    """GetSubnet's STE passes dL/dmask straight to |scores|; abs sits outside it, so
    dL/dscores = sign(s) * W * dL/dW_eff (topk) and W * dL/dW_eff (threshold on raw scores)."""
    rngs = nnx.Rngs(0)
    x = _normal(1, (3, 4))
    lin = masked.MaskedLinear(4, 5, keep=0.5, rngs=rngs)
    g, gw, mask = _grad_pair(lin, x)
    s, w = lin.scores[...], lin.kernel[...]
    np.testing.assert_allclose(g, jnp.sign(s) * w * gw, rtol=1e-6, atol=1e-7)
    assert float(jnp.abs(g).sum()) > 0
    # dropped weights get a gradient too (that is what lets a mask change)
    mask = np.asarray(mask)
    assert 0 < mask.sum() < mask.size and np.abs(np.asarray(g))[mask == 0].sum() > 0

    thr = masked.MaskedLinear(4, 5, mode="threshold", threshold=0.05, rngs=rngs)
    g, gw, _ = _grad_pair(thr, x)
    np.testing.assert_allclose(g, thr.kernel[...] * gw, rtol=1e-6, atol=1e-7)

    xc = _normal(2, (2, 7, 7, 4))
    for conv in (masked.MaskedConv(4, 6, 3, padding=1, keep=0.3, rngs=rngs),
                 masked.masked_depthwise_conv(4, 5, keep=0.6, rngs=rngs)):
        g, gw, _ = _grad_pair(conv, xc)
        np.testing.assert_allclose(g, jnp.sign(conv.scores[...]) * conv.kernel[...] * gw, rtol=1e-5, atol=1e-6)


def test_threshold_mode_and_global_threshold():
    rngs = nnx.Rngs(0)
    layers = [masked.MaskedLinear(4, 5, mode="threshold", rngs=rngs),
              masked.MaskedConv(4, 6, 3, mode="threshold", rngs=rngs)]
    tau = masked.threshold_for_keep([l.scores[...] for l in layers], 0.25)
    for l in layers:
        l.threshold = float(tau)
    kept = [int(l.mask().sum()) for l in layers]
    assert sum(kept) == masked.kept_count(20 + 216, 0.25) == 59
    assert kept[0] != masked.kept_count(20, 0.25)          # a global threshold, not a per-layer top-k
    for l in layers:
        np.testing.assert_array_equal(l.mask(), (l.scores[...] >= tau).astype(jnp.float32))
    with pytest.raises(ValueError, match="unknown mask mode"):
        masked.MaskedLinear(2, 2, mode="bernoulli", rngs=rngs)


def test_keep_one_reproduces_the_dense_layers():
    x = _normal(3, (2, 9, 9, 4))
    for i, make in enumerate((lambda: Conv(4, 6, 3, stride=2, padding=1, use_bias=False, rngs=nnx.Rngs(0)),
                              lambda: Conv(4, 4, 5, padding=2, groups=4, use_bias=True, rngs=nnx.Rngs(0)),
                              lambda: Conv(4, 6, 1, rngs=nnx.Rngs(0)))):
        dense = _numpy_filled(make, i)
        m = masked.MaskedConv(4, dense.out_channels, dense.kernel_size, stride=dense.stride,
                              padding=dense.padding[0][0], groups=dense.groups, keep=1.0, kernel=dense.kernel[...],
                              bias=None if dense.bias is None else dense.bias[...], rngs=nnx.Rngs(0))
        np.testing.assert_array_equal(_apply(m, x), _apply(dense, x))
    lin = _numpy_filled(lambda: Linear(4, 5, rngs=nnx.Rngs(0)))
    m = masked.MaskedLinear(4, 5, keep=1.0, kernel=lin.kernel[...], bias=lin.bias[...], rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(_apply(m, x), _apply(lin, x))


def test_masked_layers_shard_like_their_dense_twins():
    pairs = nnx.eval_shape(lambda: (
        (Conv(4, 8, 3, rngs=nnx.Rngs(0)), masked.MaskedConv(4, 8, 3, rngs=nnx.Rngs(0))),
        (Conv(4, 4, 3, groups=4, rngs=nnx.Rngs(0)), masked.MaskedConv(4, 4, 3, groups=4, rngs=nnx.Rngs(0))),
        (Linear(4, 10, out_axis="classes", rngs=nnx.Rngs(0)),
         masked.MaskedLinear(4, 10, out_axis="classes", rngs=nnx.Rngs(0)))))
    for dense, twin in pairs:
        names = dense.kernel.get_metadata()["out_sharding"]
        assert twin.kernel.get_metadata()["out_sharding"] == names
        assert twin.scores.get_metadata()["out_sharding"] == names
        assert isinstance(twin.kernel, masked.FrozenWeight) and not isinstance(twin.kernel, nnx.Param)


def test_bad_inputs_raise():
    # traced only (nnx.eval_shape): the checks run before any computation
    with pytest.raises(ValueError, match="NHWC"):
        nnx.eval_shape(lambda: masked.MaskedConv(3, 4, 3, rngs=nnx.Rngs(0))(jnp.ones((2, 8, 8, 4))))
    with pytest.raises(ValueError, match="input features"):
        nnx.eval_shape(lambda: masked.MaskedLinear(3, 4, rngs=nnx.Rngs(0))(jnp.ones((2, 5))))
    with pytest.raises(ValueError, match="kernel of shape"):
        masked.MaskedLinear(3, 4, kernel=jnp.ones((4, 3)), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tiny_starnet():
    """A one-stage StarNet (every layer kind: strided, depthwise and fused 1x1 convs, BatchNorm, a
    linear head) with few distinct shapes, in eval mode."""
    model = _numpy_filled(lambda: StarNet(4, (1,), 1, num_classes=5, rngs=nnx.Rngs(0)))
    model.eval()
    return model


def test_mask_model_and_bake_on_an_existing_model(tiny_starnet):
    x = _normal(4, (2, 16, 16, 3))
    dense_out = _apply(tiny_starnet, x)
    # a filter picks layers by path
    part = masked.mask_model(nnx.clone(tiny_starnet), "stages/0/blocks/.*|head", keep=1.0, rngs=1)
    chosen = masked.masked_layers(part)
    assert chosen and all(p.startswith(("stages/0/blocks", "head")) for p in chosen)
    assert "head/fc" in chosen and isinstance(chosen["head/fc"], masked.MaskedLinear)
    assert "stages/0/blocks/0/dwconv/conv" in chosen and "stages/0/downsample/conv" not in chosen
    # frozen, stored weights (no regeneration recipe), trainable scores
    assert all(l.kernel.get_metadata()["source"] is None for l in chosen.values())

    # every layer masked, keep 1: nothing changes (strides, padding, groups, biases carried over)
    model = masked.mask_model(nnx.clone(tiny_starnet), ".*", keep=1.0, rngs=1)
    assert len(masked.masked_layers(model)) == 8      # stem, downsample, 5 in the block, head
    np.testing.assert_allclose(_apply(model, x), dense_out, rtol=1e-6, atol=1e-6)
    # keep 0.7 does change the output, and bake reproduces it with ordinary layers
    model = masked.mask_model(nnx.clone(tiny_starnet), ".*", keep=0.7, rngs=1)
    masked_out = _apply(model, x)
    assert not np.allclose(masked_out, dense_out, atol=1e-3)
    baked = masked.bake(model)
    assert not masked.masked_layers(baked)
    assert not jax.tree.leaves(nnx.state(baked, masked.FrozenWeight))
    np.testing.assert_allclose(_apply(baked, x), masked_out, rtol=1e-6, atol=1e-6)
    assert masked.masked_layers(model)                                 # the input model is unchanged
    with pytest.raises(ValueError, match="no Linear or Conv layer"):
        masked.mask_model(nnx.clone(tiny_starnet), "no_such_layer")


def _tiny_pemn(**kw):
    """The small PEMN ConvMixer of these tests (8x8 inputs; test_pemn.py uses the same shapes)."""
    return ConvMixer(16, 2, kernel_size=3, patch_size=2, num_classes=10, rngs=nnx.Rngs(0), **kw)


def test_frozen_weights_get_no_gradient_and_no_optimizer_state():
    model = _tiny_pemn(weight_strategy="rp", rp_ratio=1e-2)
    frozen_before = jax.tree.map(np.asarray, nnx.state(model, masked.FrozenWeight))
    tx = optim.make_optimizer(optax.constant_schedule(1e-2), weight_decay=5e-3)
    graphdef, state, frozen = step_lib.init_train_state(model, tx, ema=False)
    param_names = {p[-1] for p, _ in nnx.to_flat_state(state["params"])}
    assert param_names == {"scores", "scale", "bias"}                  # scores + BatchNorm affine only
    assert not nnx.to_flat_state(nnx.split_state(state["rest"], masked.FrozenWeight, ...)[0])  # not in the state
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen_before))
    adam_moments = sum(x.size for x in jax.tree.leaves(state["opt"]) if x.ndim > 0)
    assert adam_moments == 2 * n_params                                # mu and nu of params, nothing else
    assert n_frozen == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))
                           if x.ndim > 1)                              # one score per frozen weight
    shardings = step_lib.shardings_of(state)
    train = step_lib.make_train_step(graphdef, tx, Classification(10), frozen=frozen, base_key=jax.random.key(0),
                                     state_shardings=shardings, donate=False)
    batch = {"image": _normal(5, (8, 8, 8, 3)), "label": jnp.arange(8) % 10}
    new_state, metrics = train(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen_before)
    assert not np.allclose(new_state["params"]["stem"]["scores"][...], state["params"]["stem"]["scores"][...])


def test_checkpoints_leave_out_frozen_weights_and_check_them(tmp_path, tiny_starnet):
    tx = optim.make_optimizer(optax.constant_schedule(1e-2))
    _, state, frozen = step_lib.init_train_state(_tiny_pemn(weight_strategy="mp", weight_seed=3), tx, ema=False)
    ckpt = checkpoint.Checkpointer(tmp_path / "a", asynchronous=False, frozen=frozen, origin={"weight_seed": 3})
    ckpt.save(1, state, force=True)
    ckpt.close()
    stored = (tmp_path / "a" / "1" / "state").rglob("*")
    saved_metadata = "".join(p.read_text(errors="ignore") for p in stored if p.is_file() and "metadata" in p.name.lower())
    assert "scores" in saved_metadata and "kernel" not in saved_metadata   # weights absent, scores present

    # a model regenerated with the same recipe restores
    _, fresh, fresh_frozen = step_lib.init_train_state(_tiny_pemn(weight_strategy="mp", weight_seed=3), tx, ema=False)
    ckpt = checkpoint.Checkpointer(tmp_path / "a", asynchronous=False, frozen=fresh_frozen)
    restored, step = ckpt.restore_latest(fresh)
    assert step == 1
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    ckpt.close()
    # another seed: a clear error naming both origins, and the checkpoint is left where it is
    _, other, other_frozen = step_lib.init_train_state(_tiny_pemn(weight_strategy="mp", weight_seed=4), tx, ema=False)
    ckpt = checkpoint.Checkpointer(tmp_path / "a", asynchronous=False, frozen=other_frozen, origin={"weight_seed": 4})
    with pytest.raises(masked.FrozenWeightMismatch, match=r"(?s)seed 3 in the checkpoint vs 4 now.*'weight_seed': 3"):
        ckpt.restore_latest(other)
    assert ckpt.manager.all_steps() == [1]
    ckpt.close()

    # frozen weights that cannot be regenerated (mask_model over trained weights): not stored either,
    # but recorded by checksum; other base weights under the same scores are refused
    model = masked.mask_model(nnx.clone(tiny_starnet), "head", keep=0.9)
    _, state, frozen = step_lib.init_train_state(model, tx, ema=False)
    assert nnx.to_flat_state(nnx.split_state(frozen, masked.FrozenWeight, ...)[0])
    ckpt = checkpoint.Checkpointer(tmp_path / "b", asynchronous=False, frozen=frozen)
    ckpt.save(1, state, force=True)
    ckpt.close()
    other_base = masked.mask_model(StarNet(4, (1,), 1, num_classes=5, rngs=nnx.Rngs(1)), "head", keep=0.9)
    _, other_state, other_frozen = step_lib.init_train_state(other_base, tx, ema=False)
    ckpt = checkpoint.Checkpointer(tmp_path / "b", asynchronous=False, frozen=other_frozen)
    with pytest.raises(masked.FrozenWeightMismatch, match="sha256"):
        ckpt.restore_latest(other_state)
    ckpt.close()


def test_weights_directories_store_mft_frozen_weights_and_check_regenerated_ones(tmp_path, tiny_starnet):
    from lib import zoo
    # Mask Fine-Tuning over trained weights: the frozen weights are stored with the scores
    model = masked.mask_model(nnx.clone(tiny_starnet), "head", keep=0.9)
    x = _normal(6, (2, 8, 8, 3))
    zoo.save_weights(model, tmp_path / "mft")
    untrained = StarNet(4, (1,), 1, num_classes=5, rngs=nnx.Rngs(1))   # other base weights
    other = masked.mask_model(untrained, "head", keep=0.9, rngs=1)
    other.eval()
    assert not np.allclose(other(x), model(x))
    zoo.load_weights(other, tmp_path / "mft")
    np.testing.assert_array_equal(other.head.fc.kernel[...], model.head.fc.kernel[...])
    np.testing.assert_allclose(other(x), model(x), rtol=1e-6, atol=1e-6)
    assert not (tmp_path / "mft" / "frozen_weights.json").exists()

    # PEMN: weights rebuilt from a seed are recorded, not stored, and checked when loading
    pemn = _tiny_pemn(weight_strategy="mp", weight_seed=3)
    zoo.save_weights(pemn, tmp_path / "pemn")
    assert "seed" in (tmp_path / "pemn" / "frozen_weights.json").read_text()
    stored = "".join(p.read_text(errors="ignore") for p in (tmp_path / "pemn").rglob("*")
                     if p.is_file() and "metadata" in p.name.lower())
    assert "scores" in stored and "kernel" not in stored
    same = ConvMixer(16, 2, kernel_size=3, patch_size=2, num_classes=10, weight_strategy="mp", weight_seed=3,
                     rngs=nnx.Rngs(5))                                      # other scores, same frozen weights
    assert not np.allclose(same.head.scores[...], pemn.head.scores[...])
    zoo.load_weights(same, tmp_path / "pemn")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(same, nnx.Param), nnx.state(pemn, nnx.Param))
    reseeded = _tiny_pemn(weight_strategy="mp", weight_seed=4)
    before = jax.tree.map(np.asarray, nnx.state(reseeded))
    with pytest.raises(masked.FrozenWeightMismatch, match=r"seed 3 in the weights directory vs 4 now"):
        zoo.load_weights(reseeded, tmp_path / "pemn")
    jax.tree.map(np.testing.assert_array_equal, nnx.state(reseeded), before)   # nothing was loaded
