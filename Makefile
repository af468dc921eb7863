# The two commands the README shows: `make demo` and `make test`. Each sets up a virtual
# environment on a fresh machine first (torch installs from the local wheel cache in ~90 s).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-lib lint bench venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/ruff check fisher_optim tests benchmarks examples
	$(BIN)/python -m pytest -q

# the library tier alone: everything but the benchmark and example smoke runs (marker `bench`)
test-lib: $(STAMP)
	$(BIN)/ruff check fisher_optim tests
	$(BIN)/python -m pytest -q -m "not bench"

bench: $(STAMP)
	$(BIN)/python benchmarks/estimators.py

clean:
	rm -rf $(VENV) build *.egg-info
