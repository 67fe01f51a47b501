# napari-nir: the two set-up commands (see README.md, "Quick start").
#   make demo   create .venv, install napari-nir, fuse the built-in sample burst into nir-demo/
#   make test   install the Xvfb libraries (as root on Debian) and the test extras, lint with ruff, validate the
#               napari manifest, run the test suite (slow fits excluded; PYTEST_ARGS="-m slow" runs them) under a
#               virtual X display
# Both are idempotent: a second run skips everything already installed.
# Variables: PYTHON (python3), VENV (.venv), TORCH_SPEC (torch==2.13.0), TORCH_PIP_ARGS; PYTEST_ARGS for `make test`.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=
export PYTHON VENV

.PHONY: help demo test

help:
	@echo "make demo   set up .venv and fuse the sample burst into nir-demo/"
	@echo "make test   set up .venv with the test extras, ruff check, validate the napari manifest, run pytest (under Xvfb)"

demo:
	bash scripts/setup-env.sh
	$(VENV)/bin/napari-nir demo -o nir-demo --overwrite

test:
	bash scripts/setup-env.sh --gui-libs --extras testing
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/npe2 validate napari-nir --imports
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)
