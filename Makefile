# Two commands a new user needs: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= conf/relay.toml

.PHONY: setup sysdeps run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

## setup: the virtualenv with the relay and its test/bench dependencies
setup: $(STAMP)

## sysdeps: system packages the tests and benchmarks use (postfix, dnsmasq)
sysdeps:
	@bash scripts/install-sysdeps

## run: start the relay on the embedded default config (127.0.0.1:2525, spool in var/)
run: setup
	$(BIN)/relay serve --config $(CONFIG)

## test: everything set up, lint, then the whole suite
test: setup sysdeps lint
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check relay bench tests

## bench: the benchmark suite; PEERS=postfix runs Postfix side by side
bench: setup sysdeps
	$(BIN)/python -m bench $(if $(PEERS),--peers $(PEERS)) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
