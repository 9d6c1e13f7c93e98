# herd: `make serve` serves the embedded demo, `make test` runs the test suite.
# Both create .venv on first use. torch is pinned to 2.13.0 (a CPU wheel on these machines).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test test-fast bench proto schema clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/herd serve $(CONFIG)

# The tests without a Ray cluster run in TEST_WORKERS processes at once (pytest-xdist): on CI's 2 cores that takes
# ~65 s off their ~190 s. The slow ones (each starts its own Ray, Serve, gRPC) run one at a time after them, as
# two Ray clusters starting side by side on 2 cores risk Ray's fixed 30 s node start-up. Both halves always run;
# `make test` fails if either does. The slow half stops after SLOW_MAX_FAILURES failures: one broken cluster
# start fails every module after it, each after its own time-out, and a run that goes on would pass CI's time
# limit before printing why (tests/conftest.py also stops any run past its time budget).
TEST_WORKERS ?= 2
SLOW_MAX_FAILURES ?= 5

test: $(STAMP)
	@RAY_ENABLE_AUTO_CONNECT=0 $(PY) -m pytest -q -ra -m "not slow" -n $(TEST_WORKERS); fast=$$?; \
	RAY_ENABLE_AUTO_CONNECT=0 $(PY) -m pytest -q -ra -m slow --maxfail=$(SLOW_MAX_FAILURES); slow=$$?; \
	echo "make test: tests without a cluster exit $$fast, slow (cluster) tests exit $$slow"; \
	test $$fast -eq 0 && test $$slow -eq 0

test-fast: $(STAMP)
	RAY_ENABLE_AUTO_CONNECT=0 $(PY) -m pytest -q -ra -m "not slow" -n $(TEST_WORKERS)

proto: $(STAMP)
	$(PY) -m proto.build

# helm/herd/values.schema.json from the chart's own part and ClusterConfig (cluster/schema_gen.py)
schema: $(STAMP)
	$(PY) -m cluster.schema_gen

clean-venv:
	rm -rf $(VENV)

# make gpu-check: the CUDA path measured on one GPU (benchmarks/gpu_check.py), run with that machine's own
# python3 (its PyTorch and Triton): no venv, no Ray, no network. A package it lacks comes from .gpu-wheels/,
# which `make gpu-wheels` fills here (pip download) and which travels with the tree.
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= bench-out/gpu-check
GPU_WHEELS := .gpu-wheels
GPU_WHEELS_PYTHON_VERSION ?= 3.12

.PHONY: gpu-check gpu-wheels

gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m benchmarks.gpu_check --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

gpu-wheels: $(STAMP)
	mkdir -p $(GPU_WHEELS)
	$(PY) -m benchmarks.gpu_check --print-wheels > $(GPU_WHEELS)/requirements.txt
	$(PY) -m pip download -q --no-deps --only-binary=:all: --implementation cp \
		--python-version $(GPU_WHEELS_PYTHON_VERSION) --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_WHEELS) -r $(GPU_WHEELS)/requirements.txt
