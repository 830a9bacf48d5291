# Two commands a new user needs: `make run` and `make test` (see README.md).
# The interpreter: see scripts/pick-python (the distribution's optimised build first).
#
# What each target installs into .venv, one stamp per layer, so nothing is installed
# twice and a layer is redone only when pyproject.toml changed:
#   .venv/.made           the virtualenv itself (rebuilt with --clear when another
#                         interpreter made it)
#   .venv/.installed      the relay and its runtime dependencies (`pip install -e .`):
#                         all that `make run` and a deployment need
#   .venv/.installed-test + the test tools (`.[test]`: pytest, ruff, atheris, ...)
#   .venv/.installed-bench + the benchmark tools (`.[bench]`: matplotlib, ...)
PYTHON ?= $(shell scripts/pick-python)
VENV   := .venv
BIN    := $(VENV)/bin
MADE   := $(VENV)/.made
STAMP  := $(VENV)/.installed
STAMP_TEST  := $(VENV)/.installed-test
STAMP_BENCH := $(VENV)/.installed-bench
CONFIG ?= conf/relay.toml

.PHONY: setup setup-test setup-bench sysdeps haraka run test lint bench fuzz clean

# A venv made by another interpreter than $(PYTHON) is rebuilt (--clear) on it, and
# every layer above it with it.
REALPY := import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
PYTHON_EXE := $(shell $(PYTHON) -c '$(REALPY)' 2>/dev/null)
VENV_EXE   := $(shell $(BIN)/python -c '$(REALPY)' 2>/dev/null)
ifneq ($(PYTHON_EXE),$(VENV_EXE))
.PHONY: $(MADE)
endif

$(MADE):
	$(PYTHON) -m venv $(if $(filter $(PYTHON_EXE),$(VENV_EXE)),,--clear) $(VENV)
	$(BIN)/pip install -q --upgrade pip
	touch $@

$(STAMP): $(MADE) pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP_TEST): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(STAMP_BENCH): $(STAMP)
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

## setup: the virtualenv with the relay and its runtime dependencies only
setup: $(STAMP)
setup-test: $(STAMP_TEST)
setup-bench: $(STAMP_BENCH) haraka

## sysdeps: system packages the tests and benchmarks use (postfix, dnsmasq, swaks, ...)
sysdeps:
	@bash scripts/install-sysdeps

## haraka: Haraka, the bench's second peer, into bench/haraka/node_modules (npm ci from
## the committed package-lock.json; nothing to do when it is installed)
haraka:
	@bash scripts/install-haraka

## run: start the relay on the embedded default config (127.0.0.1:2525, spool in var/)
run: setup
	$(BIN)/relay serve --config $(CONFIG)

## test: the test tools, system packages and Haraka, lint, then the whole suite
test: setup-test sysdeps haraka lint
	$(BIN)/pytest

lint: setup-test
	$(BIN)/ruff check relay bench tests

## bench: the benchmark suite; PEERS=postfix runs Postfix side by side (PEERS=postfix,haraka:
## Haraka as well)
bench: setup-bench sysdeps
	$(BIN)/python -m bench $(if $(PEERS),--peers $(PEERS)) $(BENCH_ARGS)

## fuzz: coverage-guided fuzzing (atheris), FUZZ_SECONDS per target, new coverage merged
## into tests/fuzz/corpus/ (commit it); FUZZ_TARGETS=server,client picks targets
FUZZ_SECONDS ?= 600
fuzz: setup-test
	$(BIN)/python -m tests.fuzz --merge --seconds $(FUZZ_SECONDS) $(if $(FUZZ_TARGETS),--target $(FUZZ_TARGETS))

clean:
	rm -rf $(VENV) var build *.egg-info bench/haraka/node_modules
