VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test check bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

# The Python client is a distribution of its own (clients/python): built as a wheel and installed
# from it, so the tests exercise what `pip install license-broker-client` would give an app.
CLIENT_PY_SOURCES := clients/python/pyproject.toml $(wildcard clients/python/src/license_broker_client/*)
$(VENV)/.client-installed: $(VENV)/.installed $(CLIENT_PY_SOURCES)
	rm -rf clients/python/build
	tmp=$$(mktemp -d) && \
	  $(PY) -m pip wheel --quiet --no-deps --wheel-dir $$tmp ./clients/python && \
	  $(PY) -m pip install --quiet --force-reinstall --no-deps $$tmp/license_broker_client-*.whl && \
	  $(PY) -m pip install --quiet $$tmp/license_broker_client-*.whl && \
	  rm -rf $$tmp clients/python/build clients/python/src/*.egg-info
	touch $@

## make run: serve the webhook and the stream on 127.0.0.1:8000 (SQLite, in-process transport)
run: $(VENV)/.installed
	BROKER_DEV=1 $(VENV)/bin/license-broker serve

## make test: the whole suite, against Postgres and Redis on 127.0.0.1
test: $(VENV)/.installed $(VENV)/.client-installed
	$(PY) -m pytest $(PYTEST_ARGS)

## make check: lint, format and types
check: $(VENV)/.installed $(VENV)/.client-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## make bench: Redis against polling, latency and throughput (needs Postgres and Redis)
bench: $(VENV)/.installed
	$(PY) -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
