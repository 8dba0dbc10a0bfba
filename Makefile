# Entry points: `make run` (the main job on the embedded default), `make test` and `make test-slow`.
# Each creates .venv from constraints.txt on first use, so a fresh clone needs nothing else.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c constraints.txt torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

.PHONY: install run test test-slow lint
install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python -m crystaltune.search perovskites

# the default run (well under 20 minutes on 2 cores); the long end-to-end scenarios are marked slow
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check crystaltune tests
