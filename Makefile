# fitfleet: the two commands of the README, and their parts.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV = $(shell scripts/venv.sh)
export PYTHONPATH := $(CURDIR)
PY = $(VENV)/bin/python

.PHONY: help demo test lint typecheck unit bench

help:
	@echo "make demo   set up, then train the notes' two-stage recipe on digits 3 vs 7"
	@echo "make test   set up, then lint, type-check and run every test"

demo:
	$(PY) -m cli demo

test: lint typecheck
	$(PY) -m pytest -q

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck:
	$(VENV)/bin/mypy shared workers cli

unit:
	$(PY) -m pytest -q -m "not slow and not integration"

bench:
	$(PY) bench/engine.py
