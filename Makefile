# `make demo` and `make test` do all their own set-up; set-up is skipped when already done.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
# The UI test drives the Debian package's Chromium (never a downloaded browser).
CHROMIUM := /usr/bin/chromium

.PHONY: setup demo test test-quick bench lint mlflow-ui clean repro platform platform-stop

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

test: setup lint $(CHROMIUM)
	$(BIN)/pytest -q

$(CHROMIUM):
	$$(command -v sudo) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $$(command -v sudo) apt-get install -y -qq chromium

test-quick: setup
	$(BIN)/pytest -q -m "not slow"

# Side-by-side measurements (not tests): writes docs/BENCHMARKS.md and bench/results.json; ~8 min on 2 cores.
# `make bench ONLY=gptq,flow` re-measures some groups and keeps the other rows.
bench: setup
	$(BIN)/llmops bootstrap
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python bench/run.py $(if $(ONLY),--only $(ONLY))

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Prefect server + worker + MLflow UI on 127.0.0.1, deployments and drift automation registered; Ctrl-C stops all.
platform: setup
	$(BIN)/llmops bootstrap
	$(BIN)/llmops platform up --port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

platform-stop:
	$(BIN)/llmops platform down

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf work mlflow.db mlflow.db.locks mlartifacts

repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/llmops bootstrap
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
