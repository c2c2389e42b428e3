# Every target creates and uses .venv itself: a fresh clone needs only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# checkov pins an old botocore that breaks aiobotocore, so the IaC scanner gets its own venv.
IAC_STAMP := .venv-iac/.installed-stamp

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev,deploy,bench]'
	touch $(STAMP)

$(IAC_STAMP):
	$(PYTHON) -m venv .venv-iac
	.venv-iac/bin/python -m pip install --quiet --upgrade pip
	.venv-iac/bin/python -m pip install --quiet 'checkov==3.3.30'  # exact: new checks land often
	touch $(IAC_STAMP)

demo: $(STAMP)
	$(BIN)/snowball-aggregator demo --output var/demo

test: $(STAMP) $(IAC_STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check aggregator tests
	$(BIN)/ruff format --check aggregator tests
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks
	$(BIN)/python -m tests.scale_bench
	$(BIN)/python -m tests.benchmarks.daemon_bench

clean:
	rm -rf $(VENV) .venv-iac var .pytest_cache .mypy_cache .ruff_cache
