# ftsearch: every target creates the virtual environment first if it is missing.
#   make search STUDY=imdb ARGS="--n-trials 8"     run or resume a study (ARGS="--workers 2": in parallel)
#   make ui                                         MLflow UI on 127.0.0.1:$(PORT)
#   make dashboard                                  optuna-dashboard on 127.0.0.1:$(DASHBOARD_PORT)
#   make promote STUDY=imdb ARGS=--force            move the champion alias
#   make serve STUDY=imdb                           the champion over REST on 127.0.0.1:$(SERVE_PORT)
#   make report STUDY=imdb ARGS="--top 20"          leaderboard + HTML report (mlruns/reports/)
#   make test                                       the test suite (fast; ARGS="-m slow" for the slow ones)

PYTHON ?= python3
VENV ?= .venv
STUDY ?= imdb
ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 5000
DASHBOARD_PORT ?= 8080
SERVE_PORT ?= 5001
STATE := $${FTSEARCH_STATE_DIR:-$(CURDIR)/mlruns}
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: search ui dashboard promote serve report test env clean-env

env: $(STAMP)

# Re-installs when pyproject.toml changes. torch 2.14.1 is pinned: pip takes it from local files here.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

search: $(STAMP)
	$(BIN)/ftsearch search $(STUDY) $(ARGS)

promote: $(STAMP)
	$(BIN)/ftsearch promote $(STUDY) $(ARGS)

# The champion (or STUDY=models:/NAME@ALIAS) from this environment: `mlflow models serve` finds uvicorn.
serve: $(STAMP)
	$(BIN)/ftsearch serve $(STUDY) --host $(HOST) --port $(SERVE_PORT) $(ARGS)

# The HTML report also lands on the study's MLflow parent run as report.html.
report: $(STAMP)
	$(BIN)/ftsearch report $(STUDY) $(ARGS)

# Prints each study's link (its runs) first: MLflow's UI opens experiments on its GenAI view.
ui: $(STAMP)
	$(BIN)/ftsearch ui --host $(HOST) --port $(PORT)

# STORAGE= points it at another Optuna storage (what was given to --storage).
dashboard: $(STAMP)
	@echo "Optuna dashboard: http://$(HOST):$(DASHBOARD_PORT)/dashboard/"
	$(BIN)/optuna-dashboard "$${STORAGE:-$(STATE)/optuna.journal}" --host $(HOST) --port $(DASHBOARD_PORT)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

clean-env:
	rm -rf $(VENV)
