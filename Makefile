# Two entry points, each sets itself up in .venv on first use:
#   make report   runs the reproduction report (CPU default) and writes results/REPORT.md
#   make test     runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PRESET ?= quick
PYTEST_ARGS ?=

.PHONY: report demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,experiments]"
	touch $(STAMP)

report: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BIN)/python -m experiments --preset $(PRESET)

demo: report

# pytest exits 5 when a selection collects no test: report it instead of failing the run.
test: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(BIN)/python -m pytest -q -n auto $(PYTEST_ARGS); \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no test selected"; rc=0; fi; exit $$rc

clean:
	rm -rf $(VENV) results .pytest_cache
