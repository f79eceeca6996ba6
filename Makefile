# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Exact versions of every package the venv holds: the ones the figures in README.md and
# BENCHMARKS.md were measured with. `make lock` re-resolves them.
CONSTRAINTS := constraints.txt
PIP := $(BIN)/python -m pip install --quiet --constraint $(CONSTRAINTS)

.PHONY: demo test test-fast install lock clean

# torch is installed first from the CPU build (a plain `pip install torch` pulls a
# multi-GB CUDA build); the project's own range then accepts it as it is. DeepSpeed
# (for the ZeRO-2/3 tests, on DeepSpeed's CPU accelerator) ships only as a source
# package whose setup imports torch: built without isolation, against that torch,
# or pip would fetch a CUDA torch into the build environment.
$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) pip
	$(PIP) torch
	$(PIP) --no-build-isolation deepspeed
	$(PIP) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/concise-rl run --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not slow"

# Resolve every dependency afresh (the newest versions pyproject.toml allows) in a scratch
# venv and write their exact versions to constraints.txt; then `make test` (and `make demo`
# where figures are quoted) and commit constraints.txt with what they showed.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet torch==2.13.0
	.venv-lock/bin/python -m pip install --quiet --no-build-isolation deepspeed
	.venv-lock/bin/python -m pip install --quiet -e '.[dev]'
	{ echo "# Exact versions for make install, written by make lock on $$(date -u +%Y-%m-%d)"; \
	  echo "# ($$(.venv-lock/bin/python --version), $$(uname -m)). torch is the CPU build there (2.13.0+cpu)."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; \
	} > $(CONSTRAINTS)
	rm -rf .venv-lock

clean:
	rm -rf .concise-rl
