# latefusion: every target builds the .venv it needs from a Python >= 3.12 that
# tools/find-python locates (on PATH or under pyenv). Override with PYTHON=/path/to/python.

PYTHON ?= $(shell tools/find-python)
VENV := .venv
BIN := $(VENV)/bin
OUT ?= demo-output

.PHONY: help demo test lint bench clean

help:
	@echo "make demo   run the late-fusion pipeline on Project STAR (79 schools) into $(OUT)/"
	@echo "make test   lint and run the test suite"
	@echo "make bench  run the benchmarks in benchmarks/"

$(BIN)/python:
	@test -n "$(PYTHON)" || { tools/find-python >/dev/null; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# One stamp per extra set, so that `make demo` does not install the test tools.
$(VENV)/.installed-data: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[data]"
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@ $(VENV)/.installed-data

demo: $(VENV)/.installed-data
	$(BIN)/latefusion demo --out $(OUT) --sampler pymc

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

test: lint
	@# pytest -n 2 already fills both cores: one BLAS/OpenMP thread per process avoids oversubscription
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadgroup

$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	@touch $@

bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
