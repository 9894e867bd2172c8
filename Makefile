# clipcurate — every target creates .venv and installs what it needs.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast test-cluster lint install clean bench-match bench-download bench-download-web bench-scale bench-value demo-eval train-demo-models

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m demo.run_demo

# clipcurate eval on the demo output (run `make demo` first): a few minutes on 2 cores
demo-eval: $(STAMP)
	$(BIN)/python -m demo.evalset demo_out/evalset
	$(BIN)/python -m pipeline eval demo_out/output --config workflows/eval_demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# unit tests only (no Ray, no subprocess runs): under 2 minutes
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration" tests

# A two-node Ray cluster on this machine + an S3-compatible server (moto) on 127.0.0.1; ~3 minutes.
test-cluster: $(STAMP)
	CLIPCURATE_CLUSTER_TESTS=1 $(BIN)/python -m pytest -q tests/pipeline/test_cluster.py -k two_node

lint: $(STAMP)
	$(BIN)/ruff check .

train-demo-models: $(STAMP)
	$(BIN)/python -m demo.train_clip
	$(BIN)/python -m demo.train_clip --preset dedup
	$(BIN)/python -m demo.train_head
	$(BIN)/python -m demo.train_lm

bench-match: $(STAMP)
	$(BIN)/python bench/match.py

bench-download: $(STAMP)
	$(BIN)/python bench/download.py

bench-download-web: $(STAMP)
	$(BIN)/python bench/download_web.py

bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py

bench-value: $(STAMP)
	$(BIN)/python bench/curation_value.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
