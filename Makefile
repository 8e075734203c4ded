# The two commands of the README:
#   make run   - set up (if needed) and run the main job: `gradwatch demo`, a server and a real
#                training run streaming into it; serves http://127.0.0.1:8000/ until Ctrl-C
#                (DEMO_ARGS="--steps 50 --exit" ends by itself; any `gradwatch demo` flag goes there)
#   make test  - set up (if needed) and run the whole test suite
# Both build .venv on first use. torch 2.13.0 is installed before the project so that pip never
# resolves a multi-GB CUDA build for the CPU-only machines this runs on.

PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# `make run` needs only the demo's extra (server, dashboard, scikit-learn): a newcomer's first
# setup skips the test and integration tooling (lightning, transformers, playwright, mypy...).
RUN_STAMP := $(VENV)/.installed-run
# extra pip options, e.g. PIP_FLAGS=--no-compile (the fresh-clone test: skips byte-compiling ~2 GB)
PIP_FLAGS ?=
PIP := $(BIN)/python -m pip install -q $(PIP_FLAGS)

.PHONY: setup run test test-fast lint bench clean

# install EXTRA: the venv, pip, torch, the project with extra EXTRA, then the target's stamp
define install
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip setuptools wheel
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[$(1)]"
	touch $@
endef

$(STAMP): pyproject.toml
	$(call install,dev)

$(RUN_STAMP): pyproject.toml
	$(call install,demo)

setup: $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/gradwatch demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
