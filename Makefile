# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean

DEEPSPEED := deepspeed==0.19.8

# torch is installed first from the CPU build (a plain `pip install torch` pulls a
# multi-GB CUDA build); the project's own range then accepts it as it is. DeepSpeed
# (for the ZeRO-2/3 tests, on DeepSpeed's CPU accelerator) ships only as a source
# package whose setup imports torch: built without isolation, against that torch,
# or pip would fetch a CUDA torch into the build environment.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-build-isolation $(DEEPSPEED)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/concise-rl run --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not slow"

clean:
	rm -rf .concise-rl
