"""Test setup: 8 simulated CPU devices (set before JAX starts) and the golden fixtures."""
import os
import sys
from pathlib import Path

import jax

# Must run before any JAX computation initialises the backend.
jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

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


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A per-run persistent compilation cache: tests that rebuild the same jitted program (a resumed
    run, the same step on another model object) reuse the executable instead of recompiling."""
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield
