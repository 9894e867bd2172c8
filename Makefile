# clipcurate — every target creates .venv and installs what it needs.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint install clean bench-match bench-download train-demo-models

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m demo.run_demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

train-demo-models: $(STAMP)
	$(BIN)/python -m demo.train_clip
	$(BIN)/python -m demo.train_lm

bench-match: $(STAMP)
	$(BIN)/python bench/match.py

bench-download: $(STAMP)
	$(BIN)/python bench/download.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
