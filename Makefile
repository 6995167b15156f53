# Two entry points, each sets itself up in .venv on first use:
#   make report   runs the reproduction report (CPU default) and writes results/REPORT.md
#   make test     runs the test suite
# and the checks CI runs before the tests (also self-installing):
#   make check    = make typecheck dist docs
#   make typecheck  mypy spectral_peft
#   make dist       builds the sdist and wheel into dist/ and checks their metadata with twine
#   make docs       builds the API reference into docs/_build/html (warnings are errors)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= quick
PYTEST_ARGS ?=

.PHONY: report demo test check typecheck dist docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,experiments,docs,transformers,llm]"
	touch $(STAMP)

report: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BIN)/python -m experiments --preset $(PRESET)

demo: report

# pytest exits 5 when a selection collects no test: report it instead of failing the run.
test: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BIN)/python -m pytest -q -n auto $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no test selected"; rc=0; fi; exit $$rc

check: typecheck dist docs

typecheck: $(STAMP)
	$(BIN)/python -m mypy

# --no-isolation: build with the environment's setuptools (no download at build time).
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --quiet --no-isolation --outdir dist .
	$(BIN)/python -m twine check --strict dist/*

docs: $(STAMP)
	$(BIN)/python -m sphinx -W --keep-going -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) results .pytest_cache dist build docs/_build .mypy_cache
