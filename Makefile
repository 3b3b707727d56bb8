# Two commands for a fresh machine: `make run` and `make test`. Both build their own virtualenv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TALLY_DATABASE_URL ?= sqlite:///./var/tally.db

.PHONY: run tour test chromium lint unit integration bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The main job on a fresh machine: the API on http://127.0.0.1:8000 over a SQLite ledger in ./var.
run: $(STAMP)
	bash scripts/run.sh

# The ledger from the command line: a scripted tour of grants, holds, captures and the audit.
tour: $(STAMP)
	$(BIN)/tally migrate
	bash scripts/tour.sh

# Chromium for the browser tests (Debian's package: Playwright drives the system browser).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium) || echo "no Chromium: the browser tests skip (and fail when CI is set)"

# Every test: lint, types, unit, integration (SQLite and PostgreSQL), end to end.
test: $(STAMP) chromium
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit

bench: $(STAMP)
	$(BIN)/python bench/ledger.py
	$(BIN)/python bench/sqlite_floor.py
	$(BIN)/python bench/http.py
	$(BIN)/python bench/commerce.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .hypothesis
