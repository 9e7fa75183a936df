# Two commands on a fresh machine: `make run` and `make test` (see README).
SHELL := /bin/bash
PY := $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys' >/dev/null 2>&1 && echo python3.12 || echo python3.11)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install lint bench clean chromium

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The dashboard's browser tests drive Debian's chromium through Playwright (no browser download).
chromium:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)

install: $(STAMP) chromium

run: $(STAMP)
	$(BIN)/python -m authsvc.devrun

test: $(STAMP) chromium
	$(BIN)/python -m tests.run

lint: $(STAMP)
	$(BIN)/ruff check authsvc workers schemas tests bench
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) var .pytest_cache
