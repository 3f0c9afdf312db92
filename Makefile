# Two commands: `make run` (install, migrate, demo model + data, web server + worker) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PORT ?= 8000
PG_TEST_URL ?= postgres://postgres@127.0.0.1:5432/trainyard
REDIS_TEST_URL ?= redis://127.0.0.1:6379/15
export HF_HUB_OFFLINE := 1

.PHONY: install run test lint test-unit test-e2e bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on this disk; an unpinned torch pulls several GB of CUDA.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py setup_demo
	$(PY) manage.py serve --port $(PORT) --login "demo / trainyard"

# The import contracts (pyproject's [tool.importlinter]: layers point down, training/ imports no web
# code) and ruff, then every test on the embedded default (SQLite + SqliteHuey), then the web tests
# again on PostgreSQL + Redis.
test: install lint
	$(PY) -m pytest -q tests
	DATABASE_URL=$(PG_TEST_URL) REDIS_URL=$(REDIS_TEST_URL) $(PY) -m pytest -q tests/web

lint: install
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .

test-unit: install
	$(PY) -m pytest -q tests/unit

test-e2e: install
	$(PY) -m pytest -q tests/e2e

bench: install
	$(PY) bench/preprocess.py

clean:
	rm -rf $(VENV) var .pytest_cache
