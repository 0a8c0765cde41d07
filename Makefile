# octa3d: `make demo` and `make test` each create/reuse ./.venv, install everything, then run.
# GPU users: `make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"` (see README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Docker passes --system-site-packages to reuse the base image's CUDA torch.
VENV_FLAGS ?=
STAMP := $(VENV)/.octa3d-installed

.PHONY: install demo test test-all bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first: every other requirement admits this version, so pip keeps it.
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) main.py --mode demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.run

# docs/reference/cli.md from the argument parser (tests/test_docs.py fails while it is stale)
docs: $(STAMP)
	$(PY) docs/gen_cli.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
