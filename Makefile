# `make demo`: set up (first time only) and run the demo. `make test`: set up and run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-slow bench lint clean
setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/selftrain demo

test: setup
	@bash scripts/test-deps.sh  # chromium, for the report's browser test
	$(VENV)/bin/lint-imports --no-cache  # the layering contract in pyproject.toml
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q

test-slow: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/pretrain.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
