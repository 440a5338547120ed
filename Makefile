VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test check lock bench clean

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

# The JS client (clients/js): installed from its lock file with `npm ci` (no install scripts) and
# built with tsc. Without node and npm it is left unbuilt and tests/test_node_client.py skips (fails
# under CI=true); nothing here needs root.
JS := clients/js
JS_SOURCES := $(JS)/package.json $(JS)/scripts/build.mjs $(wildcard $(JS)/tsconfig*.json $(JS)/src/*.ts)
.PHONY: js-client
js-client:
	@if command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory $(JS)/dist/.built; \
	else \
	  echo "make: node or npm not found: $(JS) is not built, so its tests skip (and fail under CI=true)"; \
	fi
$(JS)/node_modules/.installed: $(JS)/package-lock.json $(JS)/package.json
	cd $(JS) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@
$(JS)/dist/.built: $(JS)/node_modules/.installed $(JS_SOURCES)
	cd $(JS) && npm run --silent build
	touch $@

## make run: serve the webhook and the stream on 127.0.0.1:8000 (SQLite, in-process transport)
run: $(VENV)/.installed
	BROKER_DEV=1 $(VENV)/bin/license-broker serve --host 127.0.0.1 --port 8000

## make test: the whole suite, against Postgres and Redis on 127.0.0.1
test: $(VENV)/.installed $(VENV)/.client-installed js-client
	$(PY) -m pytest $(PYTEST_ARGS)

## make check: lint, format, types, and known vulnerabilities in the locked versions
check: $(VENV)/.installed $(VENV)/.client-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	@if $(PY) -c "import urllib.request as r; r.urlopen('https://pypi.org/pypi/pip/24.0/json', timeout=10)" 2>/dev/null; then \
		echo "$(VENV)/bin/pip-audit --strict --require-hashes --disable-pip -r requirements.lock"; \
		$(VENV)/bin/pip-audit --strict --require-hashes --disable-pip -r requirements.lock --progress-spinner off; \
	else \
		echo "pip-audit SKIPPED: PyPI's vulnerability data (https://pypi.org/pypi/<name>/<version>/json) is not reachable from here;"; \
		echo "  requirements.lock was not audited. Run make check where PyPI is reachable."; \
	fi

## make lock: pin the exact versions (with hashes) that the image installs, from pyproject.toml
lock: $(VENV)/.installed
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --quiet --generate-hashes --strip-extras \
		--allow-unsafe --all-build-deps --no-emit-find-links --no-emit-index-url --no-emit-trusted-host \
		-o requirements.lock pyproject.toml

## make bench: Redis against polling, latency and throughput (needs Postgres and Redis)
bench: $(VENV)/.installed
	$(PY) -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache $(JS)/node_modules $(JS)/dist
