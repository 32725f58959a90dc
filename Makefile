# MagicFuse — two commands do everything on a fresh clone:
#   make run    set up .venv and run the whole default pipeline (dvc repro) on CPU
#   make test   set up .venv and run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline, local-only settings (DESIGN.md §5).
# DVC stage commands call `python`: make it the project environment's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup run test test-slow bench ui serve

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# The whole default pipeline (synthetic data, tiny profile, CPU): DVC runs every stage.
run: setup
	@git rev-parse --git-dir >/dev/null 2>&1 || { echo "make run needs a git checkout (DVC requires git)"; exit 1; }
	$(BIN)/dvc config --local core.analytics false
	$(BIN)/python -m magicfuse.tracking start
	$(BIN)/dvc repro || { $(BIN)/python -m magicfuse.tracking end --status FAILED; exit 1; }
	$(BIN)/python -m magicfuse.tracking end
	$(BIN)/dvc metrics show

test: setup
	$(BIN)/python -m pytest -q

# The slow tests only (end-to-end Prefect flow, torch.compile, 4K tiling, longer training).
test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_sampler.py
	$(BIN)/python benchmarks/bench_metrics.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_fuse.py

ui: setup
	$(BIN)/mlflow ui --workers 1 --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts

# Serve a registered pipeline over HTTP (MLflow's protocol) from the store `make run` writes
# (mlflow.db here, or $MLFLOW_TRACKING_URI). Override on the command line only, e.g.
# `make serve PORT=5002 MODEL=models:/magicfuse/3` (plain `=`: a HOST or PORT in the environment is ignored).
MODEL = models:/magicfuse@champion
HOST = 127.0.0.1
PORT = 5001
serve: setup
	$(BIN)/python -m magicfuse.serve --model '$(MODEL)' --host '$(HOST)' --port '$(PORT)'
