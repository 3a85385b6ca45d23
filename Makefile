# Two commands do everything on a fresh machine:
#   make demo   - set up, then run `hesd demo` on the embedded digits data set
#   make test   - set up, then run the test suite
# Set-up installs the pinned CPU build of torch first, so that the project's normal torch range
# (pyproject.toml) does not pull a multi-GB CUDA build. Override TORCH_SPEC / TORCH_PIP_ARGS to change it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?= $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
EXTRAS ?= dev

.PHONY: setup demo test lint typecheck docs check bench clean

setup: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	touch $@

demo: setup
	$(BIN)/hesd demo

test: setup
	$(BIN)/python -m pytest

# The checks CI runs beside the tests: lint and format (ruff, docstring rules on src/), types (mypy on
# src/), and the API reference built from the docstrings with warnings as errors (Sphinx, not published).
lint: setup
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/ruff format --check src tests benchmarks experiments

typecheck: setup
	$(BIN)/mypy

docs: setup
	$(BIN)/sphinx-build -E -W --keep-going -q -b html docs build/docs

check: lint typecheck docs

# The competitors (PyHessian, curvlinops, hessian-eigenthings) are the `bench` extra, never a runtime
# dependency. curvlinops pulls torchvision through backpack-for-pytorch; hesd does not use it and
# PyPI's torchvision wheel does not import beside the pinned CPU torch, so it is removed again.
bench: setup
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS) -e ".[$(EXTRAS),bench]" "$(TORCH_SPEC)"
	-$(BIN)/python -m pip uninstall --yes --quiet torchvision
	$(BIN)/python benchmarks/hvp.py
	$(BIN)/python benchmarks/compare.py
	$(BIN)/python benchmarks/distributed.py

clean:
	rm -rf $(VENV) hesd-demo .pytest_cache build
