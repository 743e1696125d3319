# Two commands matter: `make run` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The local EVM chain (ganache, pinned by its package-lock.json) for anchoring on a real chain.
CHAIN_DIR := certyo_demo/chain
GANACHE := $(CHAIN_DIR)/node_modules/ganache/package.json

.PHONY: run demo test lint format install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(GANACHE): $(CHAIN_DIR)/package-lock.json
	npm ci --prefix $(CHAIN_DIR) --no-audit --no-fund --loglevel=error
	touch $(GANACHE)

install: $(STAMP) $(GANACHE)

run: $(STAMP) $(GANACHE)
	$(BIN)/python -m certyo_demo.launcher --instance-config dagster.yaml --workspace workspace.yaml

# Non-interactive end to end: seed, ingest the last hours, anchor, verify, summary; non-zero
# exit when anything is missing. Data and logs: .certyo_run/make-demo
demo: $(STAMP)
	$(BIN)/python -m certyo_demo run --instance-config dagster.yaml

test: $(STAMP) $(GANACHE)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .dagster_home .certyo_run $(CHAIN_DIR)/node_modules
