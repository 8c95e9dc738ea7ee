"""lib.host_malloc: with it, a jitted op's large output no longer page-faults in fresh memory per call."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Counts the minor page faults of a jitted op writing a fresh 64 MB output, per call, in a new
# interpreter so that the malloc settings are made before JAX starts. Retained, the heap grows over
# the first few calls (about 6 here: the runtime frees old outputs late) and is then reused.
_SCRIPT = """
import json, resource, sys
if sys.argv[1] == "retain":
    from lib import host_malloc
    assert host_malloc.retain_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((16, 1024, 1024), jnp.float32)
double = jax.jit(lambda a: a * 2)
for _ in range(10):
    double(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    double(x).block_until_ready()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5))
"""
_PAGES = 16 * 1024 * 1024 * 4 // 4096


def _faults_per_call(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_retained_memory_is_reused_without_page_faults():
    default = _faults_per_call("default")
    if default < 0.9 * _PAGES:
        pytest.skip(f"glibc's defaults already reuse the buffer here ({default:.0f} faults per call)")
    retained = _faults_per_call("retain")
    # glibc's defaults map a fresh 64 MB block per call: one fault per 4 KB page. Retained, the freed
    # block is reused; the few faults left come from elsewhere in the runtime.
    assert retained < 0.5 * _PAGES, (default, retained)


def test_not_glibc_is_reported_not_an_error(monkeypatch):
    from lib import host_malloc
    monkeypatch.setattr(host_malloc.platform, "libc_ver", lambda: ("", ""))
    assert host_malloc.retain_freed_memory() is False
