"""Weight soups (lib.soup): fixed soups, the learnable soup at every granularity, its gradients, and
an alpha-only train step through the generic step. Tiny LLaMA (stacked layers) and tiny StarNet."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lib import sharding, soup, zoo
from lib.tasks.causal_lm import CausalLM
from lib.train import step as step_lib


def random_model(name, seed, **overrides):
    """A zoo model with random float values filled in from NumPy (no init compile: fast tests)."""
    graphdef, state = nnx.split(zoo.create_model(name, abstract=True, **overrides))
    rng = np.random.default_rng(seed)

    def fill(v):
        if not jnp.issubdtype(v.dtype, jnp.floating):
            return v
        return v.replace(jnp.asarray((1.0 if v.shape and len(v.shape) == 1 else 0.0) +
                                     0.1 * rng.standard_normal(v.shape), v.dtype))
    return nnx.merge(graphdef, jax.tree.map(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


@pytest.fixture(scope="module")
def llamas():
    return [random_model("llama_tiny_mha", i) for i in range(3)]


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(0), (2, 12), 0, 320)


@pytest.fixture(scope="module")
def forward():
    """One jitted forward for any model of the tiny-LLaMA family (compiled per structure)."""
    @jax.jit
    def run(graphdef, state, x):
        return nnx.merge(graphdef, state)(x)
    return lambda model, x: np.asarray(run(*nnx.split(model), x))


def _params(model):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_one_hot_and_uniform_alpha_per_layer_exact(llamas, tokens, forward):
    a, b = llamas[:2]
    learn = soup.LearnableSoup([a, b], granularity="layer")
    for k, expert in enumerate((a, b)):
        learn.set_weights(np.eye(2)[k])
        assert np.array_equal(forward(learn.bake(), tokens), forward(expert, tokens))
        baked = _params(learn.bake())
        assert all(np.array_equal(baked[p], v) for p, v in _params(expert).items())
    learn.set_weights([0.5, 0.5])
    mean = soup.uniform_soup([a, b])
    np.testing.assert_array_equal(forward(learn.bake(), tokens), forward(mean, tokens))
    pa, pb = _params(a), _params(b)
    for p, v in _params(mean).items():
        np.testing.assert_allclose(v, (pa[p] + pb[p]) / 2, rtol=1e-6, atol=1e-7)
    # per layer: layer 0 from expert 0, layer 1 from expert 1, everything else from expert 0
    learn.set_weights([1.0, 0.0])
    (stack,) = [i for i, n in enumerate(learn.group_names) if n.endswith("layers")]
    learn.alphas[stack][...] = jnp.asarray([[0.0, -1e9], [-1e9, 0.0]])
    want = {p: (np.concatenate([v[:1], pb[p][1:]]) if "blocks" in str(p) else v) for p, v in pa.items()}
    got = _params(learn.bake())
    assert all(np.array_equal(got[p], want[p]) for p in want)
    assert forward(learn.bake(), tokens).shape == (2, 12, 320)


def test_number_of_alphas_matches_granularity(llamas):
    a, b = llamas[:2]
    L = a.config.num_hidden_layers
    n_stacked_modules = 9   # q k v o gate up down + 2 norms, each stacked over the layers
    n_plain = 3             # embed_tokens, final norm, lm_head (untied)
    counts = {}
    for g in ("model", "layer", "module", "matrix"):
        learn = soup.LearnableSoup([a, b], granularity=g)
        counts[g] = (len(learn.alphas), learn.num_alphas(), [tuple(x[...].shape) for x in learn.alphas])
        for x in learn.alphas:
            assert x[...].shape[0] == 2
    assert counts["model"][:2] == (1, 1)
    assert counts["layer"][:2] == (n_plain + 1, n_plain + L)          # one [K, L] for the stack
    assert (2, L) in counts["layer"][2]
    assert counts["module"][:2] == (n_plain + n_stacked_modules, n_plain + n_stacked_modules * L)
    assert counts["matrix"] == counts["module"]
    # every parameter belongs to a group of its own module at "module" granularity
    groups = soup.LearnableSoup([a, b], granularity="module").variable_groups()
    assert groups["model/blocks/0/layer/self_attn/q_proj/kernel"] == "model/blocks/0/layer/self_attn/q_proj/layers"
    assert len(groups) == len(_params(a))


def test_starnet_groups_and_batchnorm_statistics_mixed():
    ms = [zoo.create_model("starnet_s050", num_classes=10, rngs=i, abstract=True) for i in range(2)]
    learn = nnx.eval_shape(lambda: soup.LearnableSoup(ms, granularity="layer"))   # shapes only
    assert {"stages/2/blocks/1", "stages/2", "stem/conv", "head/fc", "norm"} <= set(learn.group_names)
    groups = learn.variable_groups()
    assert groups["stages/2/blocks/1/dwconv/bn/mean"] == groups["stages/2/blocks/1/dwconv/conv/kernel"]
    assert learn.experts.norm.mean.get_value().shape == (2, 128)   # BatchNorm statistics are stacked and mixed
    module = nnx.eval_shape(lambda: soup.LearnableSoup(ms, granularity="module"))
    assert module.variable_groups()["norm/mean"] == "norm" and len(module.group_names) > len(learn.group_names)


def test_alpha_gradients_match_finite_differences(llamas, tokens):
    learn = soup.LearnableSoup(llamas[:2], granularity="layer")      # alpha [2, L] on the stack
    rng = np.random.default_rng(0)
    for x in learn.alphas:
        x[...] = jnp.asarray(rng.normal(size=x[...].shape), jnp.float32)
    graphdef, alphas, rest = nnx.split(learn, soup.SoupAlpha, ...)
    task = CausalLM()
    ids = tokens[:, :-1]
    batch = {"input_ids": ids, "targets": tokens[:, 1:], "loss_mask": jnp.ones(ids.shape),
             "segment_ids": jnp.ones(ids.shape, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)}

    @jax.jit
    def loss_and_grad(alphas):   # one compile: the finite differences use its value
        def loss(alphas):
            model = nnx.merge(graphdef, alphas, rest)
            return step_lib.mean_of(task.loss(model, batch, None, None)[0]) + model.regularizer(0.3, 0.2)
        return jax.value_and_grad(loss)(alphas)

    _, grads = loss_and_grad(alphas)
    leaves, treedef = jax.tree.flatten(alphas)
    g_leaves = jax.tree.leaves(grads)
    eps = 1e-2
    checked = 0
    for i, (leaf, g) in enumerate(zip(leaves, g_leaves)):
        flat = np.asarray(leaf).reshape(-1)
        for j in range(flat.size):
            def at(d):
                v = flat.copy()
                v[j] += d
                new = list(leaves)
                new[i] = jnp.asarray(v.reshape(leaf.shape))
                return float(loss_and_grad(jax.tree.unflatten(treedef, new))[0])
            fd = (at(eps) - at(-eps)) / (2 * eps)
            assert np.asarray(g).reshape(-1)[j] == pytest.approx(fd, rel=3e-2, abs=2e-4), (i, j)
            checked += 1
    assert checked == learn.num_alphas() * 2
    assert float(jnp.abs(jnp.concatenate([x.reshape(-1) for x in g_leaves])).max()) > 1e-4


def test_mismatch_is_one_error_listing_every_key():
    a = zoo.create_model("llama_tiny_mha", abstract=True)
    b = zoo.create_model("llama_tiny_mha", abstract=True, intermediate_size=128, vocab_size=300)
    with pytest.raises(soup.SoupMismatchError) as e:
        soup.LearnableSoup([a, b])
    msg = str(e.value)
    for key in ("mlp/gate_proj/kernel", "mlp/up_proj/kernel", "mlp/down_proj/kernel", "embed_tokens/embedding",
                "lm_head/kernel"):
        assert key in msg, key
    assert msg.startswith("5 difference(s)")
    c = zoo.create_model("llama_tiny_gqa", abstract=True)   # tied embeddings: lm_head missing, k/v shapes differ
    with pytest.raises(soup.SoupMismatchError, match=r"missing lm_head/kernel[\s\S]*k_proj"):
        soup.check_compatible([a, c])


def test_fixed_soups_and_bad_weights(llamas):
    a, b, c = llamas
    with pytest.raises(ValueError, match="2 weights .* for 3 models"):
        soup.interpolate([a, b, c], [0.5, 0.5])
    with pytest.raises(ValueError, match="sum to 0.9"):
        soup.interpolate([a, b], [0.4, 0.5])
    mixed = _params(soup.interpolate([a, b, c], [0.2, 0.3, 0.5]))
    pa, pb, pc = _params(a), _params(b), _params(c)
    for p, v in mixed.items():
        np.testing.assert_allclose(v, 0.2 * pa[p] + 0.3 * pb[p] + 0.5 * pc[p], rtol=1e-5, atol=1e-7)
    # greedy: the score prefers soups close to c+b; a (worst alone... ) is tried and dropped
    target = {p: (pb[p] + pc[p]) / 2 for p in pa}
    score = lambda m: -sum(float(np.sum((v - target[p]) ** 2)) for p, v in _params(m).items())
    result = soup.greedy_soup([a, b, c], score)
    assert result.chosen[0] in (1, 2) and sorted(result.chosen) == [1, 2]
    assert [h[0] for h in result.history][-1] == 0 and not result.history[-1][2]
    assert result.score == pytest.approx(0.0, abs=1e-6)
    points = soup.interpolation_sweep([a, b], lambda m: float(_params(m)[("lm_head", "kernel")][0, 0]))
    assert len(points) == 11
    np.testing.assert_allclose([s for _, s in points], np.linspace(pa[("lm_head", "kernel")][0, 0],
                                                                    pb[("lm_head", "kernel")][0, 0], 11), rtol=1e-5)


def test_alpha_only_train_step_and_expert_axis_sharding(llamas, tokens):
    a, b = llamas[:2]
    task = soup.SoupTask(CausalLM(), granularity="module", num_experts=2, reg_uniform=0.1, reg_entropy=0.01)
    learn = soup.LearnableSoup([a, b], granularity="module")
    graphdef, state, frozen = step_lib.init_train_state(learn, optax.adam(0.1), ema=False, trainable=task.trainable)
    n_alpha = sum(x.size for x in jax.tree.leaves(state["params"]))
    assert n_alpha == 2 * learn.num_alphas()
    assert sum(x.size for x in jax.tree.leaves(state["opt"])) == 2 * n_alpha + 1   # adam mu, nu + count
    assert sum(x.size for x in jax.tree.leaves(frozen)) == 2 * zoo.count_params(a)
    ids = tokens[:, :-1]
    batch = {"input_ids": ids, "targets": tokens[:, 1:], "loss_mask": jnp.ones(ids.shape),
             "segment_ids": jnp.ones(ids.shape, jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)}
    train_step = step_lib.make_train_step(graphdef, optax.adam(0.1), task, frozen=frozen, base_key=jax.random.key(0))
    before = jax.tree.map(np.asarray, state["params"])
    frozen_before = jax.tree.map(np.asarray, frozen)
    state, metrics = train_step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and "soup_reg" in metrics
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"])))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(train_step.frozen)))
    # the expert axis is a logical axis like any other
    mesh = sharding.make_mesh([("expert", 2), ("data", 4)])
    placed = sharding.place(nnx.state(learn), mesh, (("expert", "expert"), ("batch", "data")))
    kernel = placed["experts"]["model"]["blocks"][0]["layer"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.get_value().sharding.spec[0] == "expert" and kernel.get_value().shape[0] == 2


def test_aot_memory_plan_of_a_learnable_soup(tmp_path):
    """``projects.souplm.aot`` (the Vicuna+LLaVA memory plan) on a tiny LLaMA, in its own process (it
    sets the number of simulated devices): K frozen experts FSDP-sharded, only the alphas trained."""
    import json
    import subprocess
    import sys
    out = tmp_path / "aot.json"
    subprocess.run([sys.executable, "-m", "projects.souplm.aot", "--model", "llama_tiny_gqa", "--batch", "8",
                    "--seq", "16", "--granularity", "layer", "--json", str(out)], check=True, capture_output=True)
    r = json.loads(out.read_text())
    n = zoo.count_params(zoo.create_model("llama_tiny_gqa", abstract=True))
    assert r["frozen_values"] == 2 * n and r["devices"] == 8
    layers = zoo.create_model("llama_tiny_gqa", abstract=True).config.num_hidden_layers
    assert r["alpha_values"] == 2 * (layers + 2)     # [K, L] for the stack, one column each for embeddings and norm
    assert 0 < r["total_per_device_bytes"] and r["argument_size_in_bytes"] < 4 * n   # sharded bf16, not whole
