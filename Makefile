# Quick start (fresh Debian machine, fresh clone):
#   make run    # pretrain on Fashion-MNIST with a local Ray (creates .venv, installs the data)
#   make test   # the whole test suite
#   make test-fast  # the quick tests that need no Ray cluster: the inner loop while you work
# Extra arguments for the job: make run ARGS="objective.mode=center train.epochs=3"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-fast env env-peers data
run: env data
	$(PY) jobs/pretrain.py $(ARGS)

# The Ray tests, then the multi-node ones (one process: the session's single-node cluster, then a
# multi-node cluster of the last tests' own, never two at once; "[tiers]" lines give each tier's
# seconds) and, beside them at a lower CPU priority (nice 10; the test clusters' Ray workers run at
# nice 5: tests/cluster_settings.py), the rest: the Ray tests mostly wait on Ray's
# processes. The fast tier's report follows. (pytest's exit code 5, "no tests collected", is fine
# for one tier when PYTEST_ARGS selects files.)
test: env-peers data
	@nice -n 10 $(PY) -m pytest -q -p no:cacheprovider -m "not ray and not multinode" $(PYTEST_ARGS) > .test-fast.log 2>&1 & fast=$$!; \
	$(PY) -m pytest -q -m "ray or multinode" --durations=12 $(PYTEST_ARGS); ray=$$?; \
	wait $$fast; fast=$$?; echo "--- the tests that need no Ray cluster:"; cat .test-fast.log; \
	ok() { [ $$1 = 0 -o $$1 = 5 ]; }; ok $$ray && ok $$fast && [ $$ray$$fast != 55 ]

# The inner loop: the tests that need no Ray cluster (objective, models, TrainRun, config, k8s...) but
# those marked slow (a real server, a fault window, process groups: `make test` runs them), on two
# processes (pytest-xdist; PYTEST_ARGS="-n 0" for one; tests of one xdist_group share a process and its fixtures).
test-fast: env-peers data
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not ray and not multinode and not slow" $(PYTEST_ARGS)

env: $(STAMP)
$(STAMP): pyproject.toml constraints.txt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The tests also run benchmarks/peers.py's arms on a few hundred images (tests/test_peers.py): lightly, the
# peers extra, which `make run` does not need.
env-peers: $(STAMP) $(VENV)/.installed-peers
$(VENV)/.installed-peers: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,peers]'
	touch $@

data: $(FMNIST)
$(FMNIST):
	command -v apt-get >/dev/null || { echo "install Fashion-MNIST IDX files and set data.fashion_mnist_dir"; exit 1; }
	$(SUDO) apt-get install -y dataset-fashion-mnist || { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }
