# tq — the two set-up commands of README.md live here.
#   make run   create .venv, install tq, start a broker with a local worker (tq up)
#   make test  create .venv, install tq with its test tools, run lint, types and the suite
#   make build the one-file executable dist/tq (PyInstaller, pyinstaller.spec)
#   make quick the suite without slow tests and without building the executable
#   make completions  regenerate shell-completions/ from the CLI (a test checks they are current)
#   make docs  regenerate docs/PROTOCOL.md's field tables from the declarations (a test checks)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test venv lint typecheck pytest quick build completions docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

run: venv
	$(BIN)/tq up

lint: venv
	$(BIN)/ruff check tq tests benchmarks examples
	$(BIN)/ruff format --check tq tests benchmarks examples

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

quick: venv
	$(BIN)/python -m pytest -q -m 'not slow and not executable' -x

build: venv
	PYTHON=$(BIN)/python scripts/build-executable

completions: venv
	$(BIN)/python scripts/gen-completions

docs: venv
	$(BIN)/python -m tq.protocol.docgen --write

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
