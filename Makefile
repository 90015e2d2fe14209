# `make demo` and `make test` do all set-up on a fresh machine: a virtual environment in .venv, then the run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) workflows/annotate.py $(ARGS)

test: install
	$(PY) -m pytest -q tests $(ARGS)

.PHONY: install demo test
