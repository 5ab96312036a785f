# GenCLS++ — the two commands: `make run` (main job) and `make test` (test suite).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true \
       DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false
export PREFECT_HOME ?= $(HOME)/.cache/gencls/prefect

.PHONY: install run test test-fast ui exp browser-check clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

run: $(STAMP)  ## build trec6, dvc repro the quick pipeline, register, print the summary
	$(BIN)/python -m flows.run_default

test: $(STAMP)  ## the whole suite (unit tests on tiny models + a few slow ones on real SmolLM2)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

ui: $(STAMP)  ## Prefect server + MLflow server on 127.0.0.1
	$(BIN)/gencls ui

# `dvc exp show` lists every dependency of every stage (46 columns: 34 code files, 12 data, report and checkpoint
# paths); this view keeps metrics and params.
exp: $(STAMP)  ## experiments side by side: metrics and the params the stages read
	$(BIN)/dvc exp show --no-pager --drop '^(components|flows|data|reports|checkpoints)/'

# The browser check (tests/test_browser.py, marker `browser`, left out of `make test` and CI): the tiny
# pipeline, then the Prefect, MLflow and Data Docs pages in headless Chromium; screenshots in reports/browser/.
# Playwright comes from the `browser` extra and drives Debian's chromium (no `playwright install` download).
CHROMIUM ?= /usr/bin/chromium
BROWSER_STAMP := $(VENV)/.browser-$(shell sha1sum pyproject.toml | cut -c1-12)

$(BROWSER_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,browser]'
	rm -f $(VENV)/.browser-* && touch $@

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
	  echo "installing chromium (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
	  echo "$(CHROMIUM) is missing: run 'sudo apt-get install -y chromium' (Debian/Ubuntu), or point" \
	       "CHROMIUM=/path/to/chromium at an installed Chromium, then run make browser-check again" >&2; \
	  exit 1; \
	fi
	@test -x $(CHROMIUM) || { echo "chromium installed, but not at $(CHROMIUM); set CHROMIUM=..." >&2; exit 1; }

browser-check: $(BROWSER_STAMP) $(CHROMIUM)  ## headless-Chromium check of the three UIs (a few minutes)
	GENCLS_CHROMIUM=$(CHROMIUM) $(BIN)/python -m pytest -q -m browser tests/test_browser.py

clean-venv:
	rm -rf $(VENV)
