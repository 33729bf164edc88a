# Bootstrap and everyday commands. Every target makes the virtualenv first if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint venv clean

$(BIN)/ocsp-responder: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/ocsp-responder

## The main job: demo CA + embedded PostgreSQL + responder on 127.0.0.1:8080
demo: venv
	$(BIN)/ocsp-responder demo

## The whole test suite against a real PostgreSQL (throwaway cluster, or $$DATABASE_URL)
test: venv
	$(BIN)/python -m pytest -q

## Static checks run by CI before the tests
lint: venv
	$(BIN)/ruff check responder signer tests benchmarks
	$(BIN)/ruff format --check responder signer tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
