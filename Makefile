# Quick start (fresh Debian machine, fresh clone):
#   make run    # pretrain on Fashion-MNIST with a local Ray (creates .venv, installs the data)
#   make test   # the whole test suite
#   make test-fast  # the tests that need no Ray cluster: the inner loop while you work
# Extra arguments for the job: make run ARGS="objective.mode=center train.epochs=3"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-fast env data
run: env data
	$(PY) jobs/pretrain.py $(ARGS)

# The Ray tests (one process, one Ray cluster) and, beside them at a lower CPU priority, the rest:
# the Ray tests mostly wait on Ray's processes. The fast tier's report follows the Ray tier's.
# (pytest's exit code 5, "no tests collected", is fine for one tier when PYTEST_ARGS selects files.)
test: env data
	@nice -n 10 $(PY) -m pytest -q -p no:cacheprovider -m "not ray" $(PYTEST_ARGS) > .test-fast.log 2>&1 & fast=$$!; \
	$(PY) -m pytest -q -m ray --durations=10 $(PYTEST_ARGS); ray=$$?; \
	wait $$fast; fast=$$?; echo "--- the tests that need no Ray cluster:"; cat .test-fast.log; \
	[ $$ray = 0 -o $$ray = 5 ] && [ $$fast = 0 -o $$fast = 5 ] && [ $$ray$$fast != 55 ]

# The inner loop: every test that needs no Ray cluster (objective, models, TrainRun, config, k8s...).
test-fast: env data
	$(PY) -m pytest -q -m "not ray" $(PYTEST_ARGS)

env: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

data: $(FMNIST)
$(FMNIST):
	command -v apt-get >/dev/null || { echo "install Fashion-MNIST IDX files and set data.fashion_mnist_dir"; exit 1; }
	$(SUDO) apt-get install -y dataset-fashion-mnist || { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }
