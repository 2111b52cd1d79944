# One entry point per README command. PY is the interpreter that creates the virtualenv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-browser demo test lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: on these CPU machines 2.13.0 is the local CPU wheel; elsewhere it is PyPI's CUDA build
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,cluster,s3]'

# the browser tests drive Debian's chromium (never `playwright install`: nothing downloads a browser at run time)
install-browser:
	@test -x /usr/bin/chromium || apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)

demo: install
	$(BIN)/workbench demo

lint:
	$(BIN)/ruff check workbench kernels tests benchmarks examples
	$(BIN)/mypy
	test -d extensions/node_modules || (cd extensions && npm ci --no-audit --no-fund)
	cd extensions && npm run lint

test: install install-browser lint
	$(BIN)/pytest
