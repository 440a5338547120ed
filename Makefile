VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: run test check lock bench clean

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

## make check: lint, format, types, and known vulnerabilities in the locked versions
check: $(VENV)/.installed
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
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
