VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Where `make run` listens (the README's "Try it").
PORT ?= 8000
# Where `make dist` puts the five packages.
DIST ?= dist

PIP := $(PY) -m pip

.PHONY: run test check lock bench dist clean mutants

# Two installs in one venv. .base: the project and what serving needs (`make run`). .installed:
# the test and bench extras too (pytest, playwright, mypy, matplotlib, pip-audit, build, twine),
# for test, check, lock, bench and dist; it implies .base.
DEV_EXTRAS := [test,bench]
define venv_install
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.$(1)'
endef

# setuptools tells every editable install that it is one ("Please be careful with folders in your
# working directory..."), through pip as a 10-line warning per build: that one notice is silenced,
# every other warning still shows.
$(VENV)/.base $(VENV)/.installed: export PYTHONWARNINGS = ignore::UserWarning:setuptools.command.editable_wheel

$(VENV)/.base: pyproject.toml
	$(call venv_install,)
	touch $@

$(VENV)/.installed: pyproject.toml
	$(call venv_install,$(DEV_EXTRAS))
	touch $@ $(VENV)/.base

# The Python client is a distribution of its own (clients/python): built as a wheel and installed
# from it, so the tests exercise what installing the package gives an app.
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
# under CI=true); nothing here needs root. The build's stamp lives in node_modules, not in dist/,
# which `npm pack` ships.
JS := clients/js
JS_SOURCES := $(JS)/package.json $(JS)/scripts/build.mjs $(wildcard $(JS)/tsconfig*.json $(JS)/src/*.ts)
.PHONY: js-client
js-client:
	@if command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory $(JS)/node_modules/.built; \
	else \
	  echo "make: node or npm not found: $(JS) is not built, so its tests skip (and fail under CI=true)"; \
	fi
$(JS)/node_modules/.installed: $(JS)/package-lock.json $(JS)/package.json
	cd $(JS) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@
$(JS)/node_modules/.built: $(JS)/node_modules/.installed $(JS_SOURCES)
	cd $(JS) && npm run --silent build
	touch $@

## make run: serve the webhook and the stream on 127.0.0.1:$(PORT) (SQLite, in-process transport);
## installs only what serving needs
run: $(VENV)/.base
	BROKER_DEV=1 $(VENV)/bin/license-broker serve --host 127.0.0.1 --port $(PORT)

## make test: the whole suite, against Postgres and Redis on 127.0.0.1
test: $(VENV)/.installed $(VENV)/.client-installed js-client
	$(PY) -m pytest $(PYTEST_ARGS)

## make check: lint, format, types, and known vulnerabilities in the locked versions (pip-audit,
## reported as skipped where its vulnerability service cannot be reached)
check: $(VENV)/.installed $(VENV)/.client-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m scripts.audit_lock requirements.lock

## make lock: pin the exact versions (with hashes) that the image installs, from pyproject.toml
lock: $(VENV)/.installed
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --quiet --generate-hashes --strip-extras \
		--allow-unsafe --all-build-deps --no-emit-find-links --no-emit-index-url --no-emit-trusted-host \
		-o requirements.lock pyproject.toml

## make dist: the server's and the Python client's wheel and sdist, and the npm tarball, in $(DIST)/,
## each checked (twine check --strict; the tarball against its package.json)
dist: $(VENV)/.installed
	@command -v npm >/dev/null 2>&1 || { echo "make dist: npm is needed for the npm tarball (Node >= 20)"; exit 1; }
	$(MAKE) --no-print-directory $(JS)/node_modules/.built
	rm -rf $(DIST) && mkdir -p $(DIST)
	$(PY) -m build --outdir $(DIST) . >$(DIST)/.build.log 2>&1 || { cat $(DIST)/.build.log; exit 1; }
	$(PY) -m build --outdir $(DIST) clients/python >$(DIST)/.build.log 2>&1 || { cat $(DIST)/.build.log; exit 1; }
	rm -f $(DIST)/.build.log
	rm -rf build clients/python/build clients/python/src/*.egg-info
	cd $(JS) && npm pack --ignore-scripts --silent --pack-destination $(abspath $(DIST)) >/dev/null
	$(VENV)/bin/twine check --strict $(DIST)/*.whl $(DIST)/*.tar.gz
	$(PY) -m scripts.check_npm_tarball $(DIST)/*.tgz
	@ls -1 $(DIST)

## make bench: Redis against polling and against Flask-SSE, latency and throughput (needs Postgres and Redis)
bench: $(VENV)/.installed
	$(PY) -m bench

## make mutants: mutation testing of the modules that keep the README's guarantees (docs/testing.md);
## slow, not in CI. MUTANTS='broker.transports.sweep.*' runs one module's mutants; MUTANT_JOBS workers
MUTANTS ?=
MUTANT_JOBS ?= 2
mutants: $(VENV)/.installed $(VENV)/.client-installed
	$(PIP) install --quiet -e '.[mutation]'
	nice -n 19 $(VENV)/bin/mutmut run --max-children $(MUTANT_JOBS) $(MUTANTS)
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) mutants *.egg-info .pytest_cache .mypy_cache .ruff_cache $(JS)/node_modules $(JS)/dist $(DIST)
