# `make demo` and `make test` do all their own set-up; set-up is skipped when already done.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: setup demo test test-quick lint mlflow-ui clean repro

setup: $(INSTALLED)

# Re-installs only when the pins or the package metadata change.
$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/llmops bootstrap
	$(BIN)/llmops run

test: setup lint
	$(BIN)/pytest -q

test-quick: setup
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf work mlflow.db mlartifacts

repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/llmops bootstrap
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
