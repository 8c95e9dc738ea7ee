"""Test setup: 8 simulated CPU devices and fast XLA compilation (set before JAX starts), and the golden
fixtures."""
import os
import sys
from pathlib import Path

# The suite is compile-bound: XLA:CPU's backend at LLVM -O0 compiles 2-4x faster, and nothing here
# depends on machine-code optimisation (numerics are compared with tolerances or run against
# themselves under the same flags). STARJAX_TEST_XLA_OPT=1 keeps XLA's default.
if not os.environ.get("STARJAX_TEST_XLA_OPT"):
    os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""),
                                                   "--xla_backend_optimization_level=0") if f)

import jax  # noqa: E402

# Must run before any JAX computation initialises the backend.
jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("GOLDEN_DIR", ROOT.parent / "shared" / "golden"))
sys.path.insert(0, str(GOLDEN_DIR))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN_DIR / "golden.py").exists():
        pytest.fail(f"golden fixtures not found at {GOLDEN_DIR} (expected ../shared/golden beside the repo)")
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def golden(golden_dir):
    import golden as golden_module
    return golden_module


@pytest.fixture(scope="session")
def check_golden_parity(golden, golden_dir):
    """``check(fixture)``: the zoo model named by a golden fixture, loaded with the fixture's seeded
    official weights, reproduces the official PyTorch logits in every recorded mode (eval, and
    train for BatchNorm models) and has the official parameter count. Returns the fixture."""
    from flax import nnx

    from lib import zoo

    def check(fixture: str) -> dict:
        spec = golden.load(golden_dir / f"{fixture}.json")
        state_dict = golden.state_dict(spec)
        x = golden.inputs(spec).transpose(0, 2, 3, 1)   # the fixture's NCHW input, channels last
        for mode in golden.modes(spec):
            model = zoo.create_model(spec["canonical"], num_classes=spec["num_classes"])
            zoo.load_torch_weights(model, state_dict)      # strict: every official key must map
            model.eval() if mode == "eval" else model.train()
            graphdef, state = nnx.split(model)
            logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
            ok, err, tol = golden.compare(np.asarray(logits), spec, mode)
            assert ok, f"{fixture} {mode}: max abs error {err:.3g} > {tol:.3g}"
            # A correct float32 port lands near 1e-6 relative; far above that hides a real mismatch
            # (one flipped cluster assignment in CoC moves logits by ~1e-3).
            assert err <= 5e-6 * max(1.0, float(np.abs(golden.expected(spec, mode)).max()))
        assert zoo.count_params(model) == spec["num_params"]
        return spec

    return check


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A per-run persistent compilation cache: tests that rebuild the same jitted program (a resumed
    run, the same step on another model object) reuse the executable instead of recompiling. Under
    pytest-xdist every worker shares one cache (the workers' temporary roots have one parent)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    cache = root / "jax_cache"
    cache.mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield


def _register_tiny_models():
    """Small but complete models (every layer kind) that compile in seconds, for training tests."""
    from lib import zoo
    from projects.starnet.models import DemoNet, StarNet
    if "test_starnet_tiny" not in zoo.list_models():
        zoo.register_model("test_starnet_tiny",
                           lambda *, num_classes=10, rngs, **kw: StarNet(8, (1, 1, 1, 1), 2, num_classes=num_classes,
                                                                         rngs=rngs, **kw),
                           example_input=jax.ShapeDtypeStruct((32, 32, 3), np.float32))
        zoo.register_model("test_demonet_tiny",  # LayerNorm only: no batch statistics
                           lambda *, num_classes=10, rngs, **kw: DemoNet(16, 2, "mul", num_classes=num_classes,
                                                                         layer_scale_init=1.0, rngs=rngs, **kw),
                           example_input=jax.ShapeDtypeStruct((32, 32, 3), np.float32))


_register_tiny_models()


# Generated datasets that exercise the real decoding paths (shared by data and training tests).
IMAGE_FOLDER_CLASSES = ("ant", "bee", "cat", "dog")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """~200 JPEG/PNG images of varied sizes and modes in root/{train,val}/<class>/."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    counts = {"train": 40, "val": 10}
    for split, per_class in counts.items():
        for label, name in enumerate(IMAGE_FOLDER_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = (int(v) for v in rng.integers(12, 48, 2))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                img = Image.fromarray(pixels)
                if i % 7 == 3:
                    img = img.convert("L")
                elif i % 7 == 5:
                    img = img.convert("RGBA")
                ext = (".jpg", ".png", ".JPEG")[i % 3] if img.mode != "RGBA" else ".png"
                img.save(folder / f"{i:03d}{ext}")
            (folder / "notes.txt").write_text("not an image")
    return root, counts


@pytest.fixture(scope="session")
def tiny_tfds_dir(tmp_path_factory):
    """Write a 3-class ArrayRecord TFDS dataset with tfds's own builder (PIL-encoded, no TF)."""
    import tensorflow_datasets as tfds

    with tfds.core.registered.skip_registration():   # readers find it from files, not the registry
        class TinyShapes(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=["a", "b", "c"])}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(18, 0), "validation": self._generate_examples(7, 1)}

            def _generate_examples(self, n, seed):
                rng = np.random.default_rng(seed)
                for i in range(n):
                    h, w = (int(v) for v in rng.integers(10, 40, 2))
                    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                    yield i, {"image": Image.fromarray(pixels), "label": i % 3}

    data_dir = tmp_path_factory.mktemp("tfds")
    TinyShapes(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir
