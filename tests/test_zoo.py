"""The whole zoo, as timm tests its registry: every registered model builds abstractly, has
parameters and traces its example input; the cheap ones also run. Plus the registry's contract:
models without classes, the example input, name suggestions, and lib never naming a project.

Abstract forwards trace with ``conv_impl("xla")``: output shapes do not depend on the convolution
form, and the CPU fast forms take ~5x longer to trace (FCViT's depthwise convolutions).
"""
import ast
import gc
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib import sharding, zoo
from lib.layers import conv

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# a model without classes: token ids in, next-token logits out
# ------------------------------------------------------------------------------------------------
class TinyTokenModel(nnx.Module):
    """Embedding, one tanh layer, logits over the vocabulary: ``[B, seq] int32 -> [B, seq, vocab]``."""

    def __init__(self, vocab_size: int = 32, dim: int = 8, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.hidden = nnx.Linear(dim, dim, rngs=rngs)
        self.out = nnx.Linear(dim, vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"token ids must be integers, got {tokens.dtype}")
        return self.out(jnp.tanh(self.hidden(self.embed(tokens))))


TOKEN_MODEL = "test_zoo_tiny_tokens"
if TOKEN_MODEL not in zoo.list_models():
    zoo.register_model(TOKEN_MODEL, lambda *, rngs, **kw: TinyTokenModel(rngs=rngs, **kw),
                       example_input=jax.ShapeDtypeStruct((16,), jnp.int32))

ALL_MODELS = zoo.list_models()


@pytest.fixture(scope="module", autouse=True)
def _no_cyclic_gc():
    """Tracing ~90 models allocates millions of short-lived objects, and the cyclic collector's
    passes over JAX's and Flax's live objects cost ~15-20% of this file's time: collect once, at
    the end, instead."""
    enabled = gc.isenabled()
    gc.disable()
    yield
    if enabled:
        gc.enable()
    gc.collect()


def _assert_finite_shapes(out, batch: int):
    leaves = jax.tree.leaves(out)
    assert leaves, "the forward returned nothing"
    for leaf in leaves:
        assert all(isinstance(d, int) and 0 < d < 2**31 for d in leaf.shape), leaf.shape
        assert leaf.ndim >= 1 and leaf.shape[0] == batch, leaf.shape


def _abstract_forward(model, example):
    model.eval()
    with conv.conv_impl("xla"):
        return nnx.eval_shape(lambda m, x: m(x), model, example)


# ------------------------------------------------------------------------------------------------
# every registered model
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_MODELS)
def test_every_model_builds_and_traces_abstractly(name):
    info = zoo.model_info(name)
    assert isinstance(info.example_input, jax.ShapeDtypeStruct) and info.input_size == info.example_input.shape
    model = zoo.create_model(name, abstract=True)
    assert zoo.count_params(model) > 0
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    example = zoo.example_input(name, 1)
    assert example.shape == (1, *info.example_input.shape) and example.dtype == info.example_input.dtype
    _assert_finite_shapes(_abstract_forward(model, example), batch=1)


def _materialize(model, seed=0):
    """Concrete values for an abstract model, drawn on the host (running the initializers would
    cost more than the forward): small normals, BatchNorm statistics at 1, integers at 0."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(model)

    def fill(v):
        s = v.get_value()
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            value = jax.random.split(jax.random.key(seed), s.shape) if s.shape else jax.random.key(seed)
        elif not jnp.issubdtype(s.dtype, jnp.floating):
            value = np.zeros(s.shape, s.dtype)
        elif isinstance(v, nnx.BatchStat):
            value = np.ones(s.shape, s.dtype)
        else:
            value = (0.05 * rng.standard_normal(s.shape)).astype(s.dtype)
        return v.replace(jnp.asarray(value))
    state = jax.tree.map(fill, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


# The smallest of each family whose forward compiles in about a second on CPU, at a small
# resolution. EfficientMod, Context Clusters and FCViT take 4-8 s: their own tests run them
# against the official code.
CHEAP = {"starnet_s050": 32, "demonet_d6_w192_mul": 32, "demonet_2d_sum": None, "pemn_convmixer_32_4": None,
         "pemn_vit_64_4": None, TOKEN_MODEL: None}


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_cheap_models_run(name):
    model = _materialize(zoo.create_model(name, abstract=True))
    model.eval()
    example = zoo.example_input(name, 2, resolution=CHEAP[name])
    if jnp.issubdtype(example.dtype, jnp.integer):
        x = np.random.default_rng(1).integers(0, 8, example.shape).astype(example.dtype)
    else:
        x = np.random.default_rng(1).standard_normal(example.shape).astype(example.dtype)
    with conv.conv_impl("xla"):
        out = nnx.jit(lambda m, x: m(x))(model, x)
        expected = nnx.eval_shape(lambda m, x: m(x), model, x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), out) == jax.tree.map(lambda a: (a.shape, a.dtype), expected)
    _assert_finite_shapes(out, batch=2)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(out))


# ------------------------------------------------------------------------------------------------
# the contract
# ------------------------------------------------------------------------------------------------
def test_model_without_classes_creates_and_runs():
    info = zoo.model_info(TOKEN_MODEL)
    assert info.example_input == jax.ShapeDtypeStruct((16,), jnp.int32) and info.input_size == (16,)
    model = zoo.create_model(TOKEN_MODEL, rngs=0)           # no num_classes is forced on it
    tokens = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 32
    logits = model(tokens)
    assert logits.shape == (2, 16, 32) and bool(jnp.isfinite(logits).all())
    assert zoo.create_model(TOKEN_MODEL, vocab_size=64, abstract=True).embed.embedding.shape == (64, 8)
    with pytest.raises(TypeError, match="num_classes"):     # it has none, and says so
        zoo.create_model(TOKEN_MODEL, num_classes=10, abstract=True)
    assert zoo.example_input(TOKEN_MODEL, 4) == jax.ShapeDtypeStruct((4, 16), jnp.int32)
    with pytest.raises(ValueError, match="resolution"):
        zoo.example_input(TOKEN_MODEL, 4, resolution=32)


def test_num_classes_reaches_the_factory_only_when_given():
    seen = []

    def factory(*, rngs, **kw):
        seen.append(kw)
        return nnx.Linear(2, kw.get("num_classes", 3), rngs=rngs)
    if "test_zoo_kwargs" not in zoo.list_models():
        zoo.register_model("test_zoo_kwargs", factory, example_input=jax.ShapeDtypeStruct((2,), jnp.float32))
    zoo.create_model("test_zoo_kwargs", abstract=True)
    zoo.create_model("test_zoo_kwargs", num_classes=10, abstract=True)
    assert seen == [{}, {"num_classes": 10}]
    # classifiers keep their own default, 1000, and take num_classes as before
    assert _abstract_forward(zoo.create_model("demonet_2d_mul", abstract=True),
                             zoo.example_input("demonet_2d_mul")).shape == (1, 1000)
    assert _abstract_forward(zoo.create_model("demonet_2d_mul", num_classes=2, abstract=True),
                             zoo.example_input("demonet_2d_mul")).shape == (1, 2)


def test_example_inputs_of_the_projects():
    assert zoo.model_info("starnet_s1").example_input == zoo.IMAGE_224 == \
        jax.ShapeDtypeStruct((224, 224, 3), jnp.float32)
    assert zoo.model_info("starnet_s1").input_size == (224, 224, 3)            # the older name still reads
    assert zoo.model_info("pemn_vit_64_4").input_size == (32, 32, 3)
    assert zoo.model_info("demonet_2d_mul").example_input == jax.ShapeDtypeStruct((2,), jnp.float32)
    assert zoo.example_input("starnet_s1", 8, resolution=64) == jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.float32)


def test_register_model_input_forms():
    factory = lambda *, rngs, **kw: nnx.Linear(4, 2, rngs=rngs)
    zoo.register_model("test_zoo_input_size", factory, input_size=(4,))       # the older keyword
    assert zoo.model_info("test_zoo_input_size").example_input == jax.ShapeDtypeStruct((4,), jnp.float32)
    with pytest.raises(ValueError, match="not both"):
        zoo.register_model("test_zoo_both", factory, input_size=(4,),
                           example_input=jax.ShapeDtypeStruct((4,), jnp.float32))
    with pytest.raises(TypeError, match="ShapeDtypeStruct"):
        zoo.register_model("test_zoo_bad", factory, example_input=(4,))
    with pytest.raises(ValueError, match="already registered"):
        zoo.register_model("test_zoo_input_size", factory, input_size=(4,))


def test_typo_suggests_close_names():
    with pytest.raises(ValueError, match=r"unknown model 'starnet_s01'\. Did you mean: starnet_s1"):
        zoo.create_model("starnet_s01")
    with pytest.raises(ValueError, match="Did you mean: .*efficientmod_xxs"):
        zoo.model_info("efficentmod_xxs")


# ------------------------------------------------------------------------------------------------
# lib names no project; the projects' models arrive through the entry points
# ------------------------------------------------------------------------------------------------
_PROJECT_NAME = re.compile(r"^projects(\.|$)")


def _project_references(source: str) -> list[str]:
    """Imports of ``projects`` and module-name strings ``projects.*`` (importlib) in Python source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _PROJECT_NAME.match(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _PROJECT_NAME.match(node.module or ""):
            found.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _PROJECT_NAME.match(node.value):
            found.append(node.value)
    return found


def test_the_check_sees_project_references():
    assert _project_references("import projects.starnet.models") == ["projects.starnet.models"]
    assert _project_references("from projects.coc import models") == ["projects.coc"]
    assert _project_references("import importlib\nimportlib.import_module('projects.fcvit.models')") == \
        ["projects.fcvit.models"]
    assert _project_references("from . import projects_util\nx = 'projects are listed elsewhere'") == []


def test_lib_never_imports_projects():
    offenders = {str(p.relative_to(ROOT)): refs for p in sorted((ROOT / "lib").rglob("*.py"))
                 if (refs := _project_references(p.read_text()))}
    assert not offenders, f"lib names projects: {offenders}"
    code = ("import sys\nfrom lib import zoo\n"
            "before = sorted(m for m in sys.modules if m.split('.')[0] == 'projects')\n"
            "names = zoo.list_models()\n"
            "print(before, 'projects.starnet.models' in sys.modules, 'starnet_s1' in names)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "True", "True"], out.stdout


def test_every_models_module_is_an_entry_point():
    """setup.cfg declares each project's models module, and the installed metadata is current."""
    registering = {f"projects.{p.parent.name}.models" for p in (ROOT / "projects").glob("*/models.py")
                   if "zoo.register_model" in p.read_text()}
    for p in [*(ROOT / "lib" / "models").glob("*.py"), *(ROOT / "lib" / "models").glob("*/__init__.py")]:
        if "zoo.register_model" in p.read_text():   # models shared by several projects (LLaMA, DINOv2)
            module = p.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
            registering.add(module.removesuffix(".__init__"))
    declared = {ep.value for ep in importlib.metadata.entry_points(group=zoo.ENTRY_POINT_GROUP)}
    assert registering == declared, ("reinstall (pip install -e .) after editing [options.entry_points] "
                                     f"in setup.cfg: {registering ^ declared}")


def test_create_model_on_a_mesh_passes_overrides():   # the mesh path builds through the same factory call
    mesh = sharding.make_mesh((("data", 1),), devices=jax.devices()[:1])
    model = zoo.create_model(TOKEN_MODEL, vocab_size=24, abstract=True, mesh=mesh)
    assert model.out.kernel.shape == (8, 24)
