# herd: `make serve` serves the embedded demo, `make test` runs the test suite.
# Both create .venv on first use. torch is pinned to 2.13.0 (a CPU wheel on these machines).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test test-fast bench proto clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/herd serve $(CONFIG)

test: $(STAMP)
	RAY_ENABLE_AUTO_CONNECT=0 $(PY) -m pytest -q -ra

test-fast: $(STAMP)
	RAY_ENABLE_AUTO_CONNECT=0 $(PY) -m pytest -q -ra -m "not slow"

proto: $(STAMP)
	$(PY) -m proto.build

clean-venv:
	rm -rf $(VENV)
