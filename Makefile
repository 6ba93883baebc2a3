# The two commands: `make run` (the workbench) and `make test` (the checks CI runs).
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY := .venv/bin/python
# The cached venv may be shared by several clones: this clone's code, and its lab extension's server side (the
# venv holds the wheel of whichever clone set it up last), come first on the path.
export PYTHONPATH := $(CURDIR):$(CURDIR)/extensions/jupyterlab_bkg$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help venv run test lint bench clean-data

help:
	@echo "make run    set up .venv (cached) and run the workbench: the gateway + JupyterLab on notebooks/ (data dir ./data)"
	@echo "make test   set up .venv (cached) and run lint, type checks and the test suite"
	@echo "make bench  run the store benchmarks (bench/store.py; not part of make test)"

venv:
	@bash scripts/bootstrap.sh

run: venv
	$(PY) -m bkg_kernel.cli run

lint: venv
	.venv/bin/ruff check bkg_kernel tests bench deploy extensions/jupyterlab_bkg/jupyterlab_bkg
	.venv/bin/ruff format --check bkg_kernel tests bench deploy extensions/jupyterlab_bkg/jupyterlab_bkg
	.venv/bin/mypy --cache-dir .venv/.mypy_cache bkg_kernel  # the cache lives in the cached venv: 2 s warm, not 110 s

# Two workers, a test file to one worker at a time (its module fixtures start once; the files that start Jupyter
# kernels together, one after another), longest files first, each worker's model runtimes on its share of the cores
# (tests/conftest.py): 25 to 45 min on two cores with the speed of the machine (fresh clones, warm cache; the
# project's CI took 1,536 s and 2,863 s for whole runs), where one process took ~31 min when the suite was smaller.
# TEST_WORKERS=0 runs in one process; PYTEST_ARGS adds options (e.g. PYTEST_ARGS="-k hub").
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: venv
	$(PY) bench/store.py $(BENCH_ARGS)
