"""Run every notebook in ``colabs/`` top to bottom, as a reader would, with its quick settings.

Conventions a notebook follows (``colabs/starnet.ipynb`` is the model):

* one code cell tagged ``parameters`` holds the knobs; the test adds a cell after it that sets
  ``QUICK = True`` and ``WORKDIR`` (a pytest temporary directory), as papermill would;
* cells declare what they must show in their metadata, under ``"expect"``:
  ``{"image": true}`` (an ``image/png`` output) and/or ``{"stdout": "<regex>"}`` (searched in the
  cell's stdout, multi-line mode). Every notebook declares at least one expectation.

The kernel is this interpreter (a ``python3`` kernelspec written to a temporary ``JUPYTER_PATH``),
started in the repository root with the root on ``PYTHONPATH``, ``JAX_PLATFORMS=cpu`` and XLA's
backend optimisation off (the runs are dominated by compilation).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Point Jupyter at a ``python3`` kernelspec that runs ``sys.executable`` (the test venv)."""
    jupyter_path = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    # XLA:CPU at LLVM -O0 compiles 3-4x faster (creating a model under jit alone takes ~30 s at the
    # default level); these runs are compile-bound, and nothing here depends on the last ulp.
    xla_flags = os.environ.get("XLA_FLAGS", "")   # conftest.py already asks for -O0, unless told not to
    if "--xla_backend_optimization_level" not in xla_flags:
        xla_flags = " ".join(f for f in (xla_flags, "--xla_backend_optimization_level=0") if f)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)",
        "language": "python",
        "env": {"JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath, "XLA_FLAGS": xla_flags},
    }))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", os.pathsep.join(
            p for p in (str(jupyter_path), os.environ.get("JUPYTER_PATH", "")) if p))
        from jupyter_client.kernelspec import KernelSpecManager
        spec = KernelSpecManager().get_kernel_spec("python3")
        assert spec.argv[0] == sys.executable, f"the python3 kernelspec resolves to {spec.resource_dir}"
        yield


def _inject_parameters(nb, workdir: Path) -> None:
    tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged 'parameters', found {len(tagged)}"
    source = f"# Injected by tests/test_notebooks.py\nQUICK = True\nWORKDIR = {str(workdir)!r}\n"
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, cell)


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stdout")


def _has_image(cell) -> bool:
    return any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, kernel_env, tmp_path):
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "notebooks use the python3 kernel"
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{path.name} is saved with outputs; clear them before committing"
    _inject_parameters(nb, tmp_path / "workdir")

    start = time.perf_counter()
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()  # raises CellExecutionError (with the traceback) if a cell fails
    finally:
        nbformat.write(nb, tmp_path / path.name)  # the executed copy, for a look after a failure
    print(f"{path.name}: executed in {time.perf_counter() - start:.1f} s")

    checked = 0
    for index, cell in enumerate(nb.cells):
        expect = cell.metadata.get("expect") or {}
        where = f"{path.name} cell {index} ({cell.source.splitlines()[0] if cell.source else ''!r})"
        if expect.get("image"):
            assert _has_image(cell), f"{where} showed no image/png output"
            checked += 1
        if expect.get("stdout"):
            assert re.search(expect["stdout"], _stdout(cell), re.M), \
                f"{where} printed nothing matching {expect['stdout']!r}:\n{_stdout(cell)[-2000:]}"
            checked += 1
    assert checked, f"{path.name} declares no expectations (cell metadata 'expect')"
