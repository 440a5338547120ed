VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test check bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

## make run: serve the webhook and the stream on 127.0.0.1:8000 (SQLite, in-process transport)
run: $(VENV)/.installed
	BROKER_DEV=1 $(VENV)/bin/license-broker serve --host 127.0.0.1 --port 8000

## make test: the whole suite, against Postgres and Redis on 127.0.0.1
test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

## make check: lint, format and types
check: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## make bench: Redis against polling, latency and throughput (needs Postgres and Redis)
bench: $(VENV)/.installed
	$(PY) -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
