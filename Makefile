# Two commands a new user needs: `make run` and `make test` (see README.md).
# The interpreter: see scripts/pick-python (the distribution's optimised build first).
PYTHON ?= $(shell scripts/pick-python)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= conf/relay.toml

.PHONY: setup sysdeps run test lint bench fuzz clean

# A venv made by another interpreter than $(PYTHON) is rebuilt (--clear) on it.
REALPY := import os, sys; print(os.path.realpath(getattr(sys, "_base_executable", sys.executable)))
PYTHON_EXE := $(shell $(PYTHON) -c '$(REALPY)' 2>/dev/null)
VENV_EXE   := $(shell $(BIN)/python -c '$(REALPY)' 2>/dev/null)
ifneq ($(PYTHON_EXE),$(VENV_EXE))
.PHONY: $(STAMP)
endif

$(STAMP): pyproject.toml
	$(PYTHON) -m venv --clear $(VENV)
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

## fuzz: coverage-guided fuzzing (atheris), FUZZ_SECONDS per target, new coverage merged
## into tests/fuzz/corpus/ (commit it); FUZZ_TARGETS=server,client picks targets
FUZZ_SECONDS ?= 600
fuzz: setup
	$(BIN)/python -m tests.fuzz --merge --seconds $(FUZZ_SECONDS) $(if $(FUZZ_TARGETS),--target $(FUZZ_TARGETS))

clean:
	rm -rf $(VENV) var build *.egg-info
