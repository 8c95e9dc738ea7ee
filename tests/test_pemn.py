"""PEMN (projects/pemn, lib/layers/prototypes.py): the weight-sharing strategies against the
reference's unique-value counts and flattening order, storage accounting, the models and configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib import zoo
from lib.layers import masked, prototypes
from projects.pemn.models import ConvMixer

# XLA:CPU compilation bounds these tests: the reference counts come from abstract models (shapes
# only), the models that need values are one tiny ConvMixer (the shapes test_masked.py uses too),
# drawn with the non-partitionable threefry (as zoo.create_model: it compiles ~3x faster).


@pytest.fixture(autouse=True)
def _non_partitionable_draws():
    with jax.threefry_partitionable(False):
        yield


def _tiny(**kw):
    """ConvMixer width 16, depth 2, kernel 3, patch 2: layers stem 2x2x3x16, dw 3x3x1x16 (twice),
    pw 1x1x16x16 (twice, the largest), head 16x10."""
    kw.setdefault("rngs", nnx.Rngs(0))
    return ConvMixer(16, 2, kernel_size=3, patch_size=2, num_classes=10, **kw)

# yueb17/PEMN, ConvMixer-256 depth 6, 10 classes, patch 2, kernel 5 (reference table, §1.2)
RP_COUNTS = {1e-1: 6554, 1e-2: 656, 1e-3: 66, 1e-4: 7, 1e-5: 1}


@pytest.fixture(scope="module")
def convmixer_256_6_shapes():
    model = zoo.create_model("pemn_convmixer_256_6", num_classes=10, abstract=True)
    return {name: tuple(l.kernel.shape) for name, l in masked.masked_layers(model).items()}, model


def test_unique_value_counts_match_the_reference_table(convmixer_256_6_shapes):
    shapes, model = convmixer_256_6_shapes
    assert sum(int(np.prod(s)) for s in shapes.values()) == 437_248          # masked params p
    assert prototypes.unique_value_count(shapes, "mp") == 65_536
    for r, count in RP_COUNTS.items():
        assert prototypes.unique_value_count(shapes, "rp", r) == count, r
    # one-layer: patch embed + one depthwise + one pointwise + head
    assert prototypes.unique_value_count(shapes, "one_layer") == 3 * 4 * 256 + 25 * 256 + 256 ** 2 + 2560
    report = prototypes.model_storage(model, "rp", 1e-5)
    assert report["mask_bits"] / 8 / 1024 == pytest.approx(53.4, abs=0.05)   # 53.4 KB of 1-bit masks
    assert report["masked_params"] * 4 / 1024 == pytest.approx(1708, abs=0.5)  # vs 1,708 KB dense
    assert report["other_params"] == 2 * 256 * 13                             # BatchNorm affine: stem + 2 per block
    assert report["total_bits"] == 32 * 1 + 437_248 + 32 * report["other_params"]


@pytest.fixture(scope="module")
def tiny_weights():
    with jax.threefry_partitionable(False):
        model = _tiny()
    return {name: l.kernel[...] for name, l in masked.masked_layers(model).items()}


def _torch_flat(w):
    return np.asarray(jnp.transpose(w, (3, 2, 0, 1)) if w.ndim == 4 else w.T).ravel()


def test_strategies_share_values_as_the_reference(tiny_weights):
    w = tiny_weights
    shapes = {k: v.shape for k, v in w.items()}
    largest = max(w, key=lambda k: w[k].size)
    v = _torch_flat(w[largest])
    for strategy in ("one_layer", "mp"):
        out = prototypes.apply_strategy(w, strategy)
        values = np.unique(np.concatenate([np.asarray(x).ravel() for x in out.values()]))
        assert values.size == prototypes.unique_value_count(shapes, strategy)
    one = prototypes.one_layer(w)
    assert largest == "blocks/0/pw" and w["stem"].size < w[largest].size
    np.testing.assert_array_equal(one["blocks/1/pw"], w["blocks/0/pw"])      # the first of each shape
    assert not np.array_equal(one["blocks/1/pw"], w["blocks/1/pw"])
    np.testing.assert_array_equal(one["head"], w["head"])                    # linears are not cloned
    mp = prototypes.max_layer_padding(w)
    np.testing.assert_array_equal(_torch_flat(mp["stem"]), v[: w["stem"].size])   # w_l <- w_max[:d_l], torch order
    for r in (1e-1, 1e-2):                                                    # periods 26 and 3
        rp = prototypes.random_vector_padding(w, r, "copy")
        length = prototypes.rp_length(v.size, r)
        flat = _torch_flat(rp[largest])
        np.testing.assert_array_equal(flat, np.resize(v[:length], v.size))  # periodic with period L
        np.testing.assert_array_equal(_torch_flat(rp["blocks/1/dw"]), flat[: w["blocks/1/dw"].size])
        rand = prototypes.random_vector_padding(w, r, "rand", key=jax.random.key(0))
        np.testing.assert_array_equal(np.sort(_torch_flat(rand[largest])), np.sort(flat))   # same multiset
        assert not np.array_equal(_torch_flat(rand[largest]), flat)
    with pytest.raises(ValueError, match="needs a key"):
        prototypes.random_vector_padding(w, 0.1, "rand")
    with pytest.raises(ValueError, match="unknown weight strategy"):
        prototypes.apply_strategy(w, "clone")


@pytest.mark.parametrize("strategy,ratio", [("iid", 1.0), ("one_layer", 1.0), ("mp", 1.0), ("rp", 1e-2), ("rp", 1e-5)])
def test_models_hold_the_counted_unique_values(strategy, ratio):
    model = _tiny(weight_strategy=strategy, rp_ratio=ratio)
    expected = prototypes.model_storage(model, strategy, ratio)["unique_values"]
    if expected > 2000:   # float32 normal draws collide now and then (about 2 in 8000 here)
        assert expected * 0.999 <= prototypes.count_unique(model) <= expected
    else:
        assert prototypes.count_unique(model) == expected


def test_frozen_weights_regenerate_from_seed_and_strategy_only():
    kw = dict(weight_strategy="rp", rp_ratio=1e-2, weight_seed=7)
    a = _tiny(**kw)
    with jax.threefry_partitionable(True):   # the caller's PRNG mode and score seed do not matter
        b = _tiny(rngs=nnx.Rngs(5), **kw)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(a, masked.FrozenWeight), nnx.state(b, masked.FrozenWeight))
    assert not np.array_equal(a.stem.scores[...], b.stem.scores[...])
    source = a.stem.kernel.get_metadata()["source"]
    assert (source.seed, source.strategy, source.ratio, source.rng_impl) == (7, "rp", 1e-2, "threefry2x32")
    c = _tiny(**{**kw, "weight_seed": 8})
    assert not np.array_equal(a.stem.kernel[...], c.stem.kernel[...])


def test_models_train_only_scores_and_norms_and_reject_bad_input():
    # abstract models and forward passes (shapes only): nothing is computed
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    forward = lambda m, x: m(x)  # noqa: E731
    model = zoo.create_model("pemn_convmixer_32_4", num_classes=10, weight_strategy="mp", abstract=True)
    assert nnx.eval_shape(forward, model, x).shape == (2, 10)
    names = {p[-1] for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert names == {"scores", "scale", "bias"}
    # 9 masked layers' scores (stem 3*4*32, 4 x (dw 25*32 + pw 32*32), head 32*10) + 9 BatchNorms
    assert zoo.count_params(model) == 384 + 4 * (800 + 1024) + 320 + 9 * 2 * 32
    dense = zoo.create_model("pemn_convmixer_32_4", num_classes=10, masked=False, abstract=True)
    assert nnx.eval_shape(forward, dense, x).shape == (2, 10) and not masked.masked_layers(dense)
    assert len(nnx.eval_shape(lambda m, x: m.forward_intermediates(x), model, x)) == 5
    vit = zoo.create_model("pemn_vit_64_4", num_classes=10, img_size=16, weight_strategy="rp", rp_ratio=1e-3,
                           abstract=True)
    assert nnx.eval_shape(forward, vit, x).shape == (2, 10)
    assert prototypes.model_storage(vit, "rp", 1e-3)["unique_values"] == int(64 * 192 * 1e-3) + 1
    with pytest.raises(ValueError, match="NHWC"):
        nnx.eval_shape(forward, model, jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.float32))
    with pytest.raises(ValueError, match="built for 16x16"):
        nnx.eval_shape(forward, vit, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    with pytest.raises(ValueError, match="needs masked=True"):
        zoo.create_model("pemn_convmixer_32_4", num_classes=10, masked=False, weight_strategy="rp", abstract=True)
    with pytest.raises(ValueError, match="unknown weight strategy"):
        zoo.create_model("pemn_convmixer_32_4", num_classes=10, weight_strategy="clone", abstract=True)


def test_digits_config():
    from configs.pemn import digits
    c = digits.get_config("strategy=rp,ratio=1e-4,tiling=rand,seed=2")
    assert c.model.name == "pemn_convmixer_64_4"
    assert dict(c.model.kwargs) == dict(masked=True, weight_seed=2, keep=0.5, weight_strategy="rp", rp_ratio=1e-4,
                                        rp_tiling="rand")
    assert dict(digits.get_config("strategy=dense").model.kwargs) == dict(masked=False, weight_seed=0)
    assert digits.get_config("strategy=mask").model.kwargs.weight_strategy == "iid"
    assert digits.get_config("model=vit,image_size=16").model.kwargs.img_size == 16
    with pytest.raises(ValueError, match="unknown strategy"):
        digits.get_config("strategy=clone")


def test_dense_twin_has_the_official_regular_convmixer_parameters():
    """PEMN's ``--model_type regular`` ConvMixer: every conv and the head ``bias=False`` (the
    depthwise convs included), PyTorch's default init, affine BatchNorms."""
    dense = nnx.eval_shape(lambda: ConvMixer(32, 2, num_classes=10, masked=False, rngs=nnx.Rngs(0)))
    params = {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(dense, nnx.Param))}
    assert not [p for p in params if p.endswith("bias") and "bn" not in p]
    # stem 3*4*32 (2x2 patches), 2 x (depthwise 25*32 + pointwise 32*32), head 32*10, 5 BatchNorms
    assert sum(int(np.prod(v.shape)) for v in params.values()) == 384 + 2 * (800 + 1024) + 320 + 5 * 2 * 32


def _upstream_lr(t, lr_max, epochs):
    """PEMN ``src/convmixer/train.py``'s ``lr_schedule`` verbatim (integer-division knots)."""
    return np.interp([t], [0, epochs*2//5, epochs*4//5, epochs], [0, lr_max, lr_max/20.0, 0])[0]


@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 5, 7, 8, 11, 15, 25])
@pytest.mark.parametrize("steps_per_epoch", [1, 3, 23])
def test_piecewise_linear_schedule_matches_upstream(epochs, steps_per_epoch):
    """Upstream sets the rate of batch ``i`` of ``epoch`` to ``lr_schedule(epoch + (i+1)/len(loader))``
    before its update: the ``s``-th update (optax count ``s``) gets ``t = (s+1)/steps_per_epoch``."""
    from lib.train import schedules
    lr = 0.05
    sched = schedules.make_schedule(lr=lr, min_lr=1e-5, epochs=epochs, steps_per_epoch=steps_per_epoch,
                                    per_epoch=False, kind="piecewise_linear")
    ref = [_upstream_lr(epoch + (i + 1) / steps_per_epoch, lr, epochs)
           for epoch in range(epochs) for i in range(steps_per_epoch)]
    steps = np.arange(epochs * steps_per_epoch + 5)          # past the end: 0, as np.interp's right value
    got = np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(steps)))
    np.testing.assert_allclose(got, ref + [0.0] * 5, rtol=1e-5, atol=1e-9)
    assert [float(sched(int(s))) for s in (0, len(ref) - 1)] == pytest.approx([ref[0], ref[-1]], rel=1e-5, abs=1e-9)


def test_piecewise_linear_schedule_knots_and_validation():
    from lib.train import schedules
    # epochs 8: knots [0, 3, 6, 8]; epochs 2: [0, 0, 1, 2] (no ramp up: lr at t=0+, as np.interp)
    f = lambda t, e: float(schedules.piecewise_linear_lr(t, lr=1.0, epochs=e))  # noqa: E731
    assert [f(t, 8) for t in (0, 1.5, 3, 4.5, 6, 7, 8, 9)] == pytest.approx([0, .5, 1, .525, .05, .025, 0, 0])
    assert [f(t, 2) for t in (0.5, 1, 1.5)] == pytest.approx([_upstream_lr(t, 1.0, 2) for t in (0.5, 1, 1.5)])
    kw = dict(lr=1.0, min_lr=0.0, epochs=8, steps_per_epoch=10, kind="piecewise_linear")
    with pytest.raises(ValueError, match="warmup_epochs must be 0"):
        schedules.make_schedule(warmup_epochs=1, per_epoch=False, **kw)
    with pytest.raises(ValueError, match="per step"):
        schedules.make_schedule(per_epoch=True, **kw)
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        schedules.make_schedule(**{**kw, "kind": "triangle"})


def test_digits_config_uses_the_upstream_schedule():
    """The config's schedule, built with the arguments the loop passes, drives AdamW's first update
    with the upstream rate at t = 1/len(loader) (Adam's first step moves each weight by ~lr)."""
    import optax
    from configs.pemn import digits
    from lib.train import optim, schedules
    c = digits.get_config("epochs=8")
    assert (c.lr_schedule, c.warmup_epochs, c.schedule_per_epoch, c.total_epochs) == ("piecewise_linear", 0, False, 8)
    n = 23
    sched = schedules.make_schedule(lr=c.lr, min_lr=c.min_lr, epochs=c.total_epochs, steps_per_epoch=n,
                                    warmup_epochs=c.warmup_epochs, warmup_lr=c.warmup_lr,
                                    per_epoch=c.schedule_per_epoch, kind=c.get("lr_schedule", "cosine"))
    tx = optim.make_optimizer(sched, weight_decay=0.0, decay_1d_params=c.decay_1d_params)
    params = {"w": jnp.ones((4,))}
    updates, _ = tx.update({"w": jnp.full((4,), 0.3)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -_upstream_lr(1 / n, c.lr, 8), rtol=1e-4)
