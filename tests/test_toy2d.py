"""The paper's 2-D toy trains as the official ``2D_visual/main.py`` + ``demonet_2d.py`` do.

Official: every Linear trunc_normal(std 0.02, timm's absolute bounds +-2) with zero bias;
``DataLoader(batch_size=32, shuffle=True, drop_last=True)``; ``clip_grad_norm_(params, 1)`` every
step; ``SGD(model.parameters(), lr, momentum 0.9, weight_decay)``, so biases and LayerNorms decay too.
"""
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.starnet import toy2d as toy_config
from lib import zoo
from projects.starnet import toy2d


def _linears(model):
    layers = [model.stem, model.head]
    for block in model.blocks:
        layers += [block.f, block.g]
    return layers


def _params(model):
    return {"/".join(map(str, path)): np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("mode", ["mul", "sum"])
def test_toy_init_is_official_trunc_normal(mode):
    model = zoo.create_model(f"demonet_2d_{mode}", num_classes=2, rngs=0)
    layers = _linears(model)
    assert len(layers) == 2 + 2 * 4
    for layer in layers:
        kernel = np.asarray(layer.kernel[...])
        assert np.all(np.abs(kernel) <= 2.0)                            # timm's absolute truncation
        assert abs(kernel.mean()) < 0.004 and 0.016 < kernel.std() < 0.024, (kernel.shape, kernel.std())
        np.testing.assert_array_equal(np.asarray(layer.bias[...]), 0.0)  # nn.init.constant_(bias, 0)
    # Truncation at +-2 (absolute), not at +-2 std: about 4.6% of a normal lies beyond 2 std.
    big = np.concatenate([np.asarray(b.f.kernel[...]).ravel() for b in model.blocks])
    assert 0.03 < np.mean(np.abs(big) > 0.04) < 0.065
    assert 0.015 < np.abs(big).max() < 0.2
    for norm in [model.norm] + [b.norm for b in model.blocks]:          # nn.LayerNorm defaults
        np.testing.assert_array_equal(np.asarray(norm.scale[...]), 1.0)
        np.testing.assert_array_equal(np.asarray(norm.bias[...]), 0.0)


def test_toy_torch_init_still_reachable():
    model = zoo.create_model("demonet_2d_mul", num_classes=2, init="torch", rngs=0)
    stem = np.asarray(model.stem.kernel[...])                            # U(+-1/sqrt(2))
    assert stem.std() > 0.2 and np.abs(stem).max() <= 1 / np.sqrt(2)
    assert np.all(np.asarray(model.blocks[0].f.bias[...]) != 0)
    with pytest.raises(ValueError, match="init scheme"):
        zoo.create_model("demonet_2d_mul", num_classes=2, init="xavier", rngs=0)


def test_epoch_batches_drop_the_last_partial_batch():
    rng = np.random.default_rng(0)
    batches = toy2d.epoch_batches(rng, 100, 32, drop_last=True)
    assert [len(b) for b in batches] == [32, 32, 32]                    # 100 // 32 steps, 4 points left out
    assert len(set(np.concatenate(batches).tolist())) == 96
    again = toy2d.epoch_batches(rng, 100, 32, drop_last=True)          # reshuffled every epoch
    assert not np.array_equal(np.concatenate(batches), np.concatenate(again))
    assert [len(b) for b in toy2d.epoch_batches(rng, 100, 32, drop_last=False)] == [32, 32, 32, 4]
    assert toy2d.epoch_batches(rng, 64, 32, drop_last=True)[-1].shape == (32,)
    x, y = toy2d.moons()
    with pytest.raises(ValueError, match="no batch"):                   # fewer points than one batch
        toy2d.train("mul", epochs=1, data=(x[:20], y[:20]))


@functools.lru_cache(maxsize=None)
def _one_step(grad_clip=None, wd=0.0, decay_1d_params=True):
    """Parameters before and after one plain SGD step (no momentum, constant lr 0.1) on all 100
    points, scaled up so that the gradient's global norm is far above 1."""
    x, y = toy2d.moons()
    before = _params(zoo.create_model("demonet_2d_mul", num_classes=2, rngs=0))
    model, _, _ = toy2d.train("mul", seed=0, epochs=1, batch_size=100, lr=0.1, min_lr=0.1, momentum=0.0,
                              wd=wd, label_smoothing=0.0, grad_clip=grad_clip, decay_1d_params=decay_1d_params,
                              data=(x * 50.0, y))
    return before, _params(model)


def _distance(a, b):
    return np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a))


def test_toy_train_clips_the_gradient_norm():
    before, clipped = _one_step(grad_clip=1.0)
    np.testing.assert_allclose(_distance(clipped, before), 0.1, rtol=1e-3)  # exactly lr * max_norm
    before, free = _one_step()
    assert _distance(free, before) > 0.5


def test_toy_weight_decay_reaches_every_parameter():
    # Same data and seed, same gradient: the decay adds exactly -lr * wd * p to every parameter,
    # LayerNorm scales (p = 1) and biases included, as torch SGD over model.parameters() does.
    before, plain = _one_step()
    _, decayed = _one_step(wd=0.5)
    for name in before:
        np.testing.assert_allclose(decayed[name] - plain[name], -0.1 * 0.5 * before[name], atol=1e-5, err_msg=name)
    scale = next(k for k in before if k.startswith("norm") and "scale" in k)
    np.testing.assert_allclose(decayed[scale] - plain[scale], -0.05, atol=1e-5)


def test_toy_sgd_step_matches_torch_by_hand():
    # Two steps of torch's clip_grad_norm_(1) + SGD(momentum 0.9, weight_decay wd) on a 1-D and a
    # 2-D parameter, with the optimizer the toy builds (lib.train.optim with decay_1d_params).
    from lib.train import optim
    lr, wd, mom = 0.1, 0.05, 0.9
    tx = optim.make_optimizer(lambda step: lr, name="sgd", weight_decay=wd, momentum=mom, grad_clip=1.0,
                              decay_1d_params=True)
    params = {"bias": jnp.array([1.0, -2.0, 0.5]), "kernel": jnp.array([[0.3, -0.1], [0.2, 0.4]])}
    grads = [{"bias": jnp.array([3.0, 0.0, -4.0]), "kernel": jnp.zeros((2, 2))},
             {"bias": jnp.array([0.1, 0.2, 0.0]), "kernel": jnp.array([[0.1, 0.0], [0.0, -0.1]])}]
    opt = tx.init(params)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    buf = None
    for g in grads:
        updates, opt = tx.update(g, opt, params)
        params = jax.tree.map(lambda a, u: a + u, params, updates)
        g = {k: np.asarray(v, np.float64) for k, v in g.items()}
        norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
        coef = min(1.0, 1.0 / (norm + 1e-6))
        d = {k: g[k] * coef + wd * p[k] for k in p}
        buf = d if buf is None else {k: mom * buf[k] + d[k] for k in p}
        p = {k: p[k] - lr * buf[k] for k in p}
        for k in p:
            np.testing.assert_allclose(np.asarray(params[k]), p[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_toy_config_defaults_are_official():
    c = toy_config.get_config()
    assert (c.n_samples, c.noise, c.data_seed, c.epochs, c.batch_size) == (100, 0.4, 0, 30, 32)
    assert (c.lr, c.min_lr, c.momentum, c.wd, c.label_smoothing) == (0.1, 0.005, 0.9, 2e-4, 0.1)
    assert (c.grad_clip, c.drop_last, c.decay_1d_params, c.init) == (1.0, True, True, "trunc_normal")
    defaults = {k: p.default for k, p in inspect.signature(toy2d.train).parameters.items()}
    for key in ("epochs", "batch_size", "lr", "min_lr", "momentum", "label_smoothing", "grad_clip",
                "drop_last", "decay_1d_params", "init"):
        assert defaults[key] == c[key], key
    assert defaults["wd"] == c.wd


def test_toy2d_trains_and_plots(tmp_path):
    history = {}
    model, acc, curve = toy2d.train("mul", seed=0, epochs=10, history=history)
    assert acc > 0.75 and len(curve) == 10 and np.isfinite(curve).all()
    assert len(history["accuracy"]) == 10 and history["accuracy"][-1] == acc
    assert history["steps"] == 10 * (100 // 32)                          # drop_last: 3 steps per epoch
    png = toy2d.plot_boundaries({"mul": (model, acc)}, tmp_path / "b.png")
    assert png.stat().st_size > 10_000
