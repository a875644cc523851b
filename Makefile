# rdpfix.rdp - two commands matter on a fresh machine:
#   make demo   run fix_rdp.yml against a lab of simulated Windows hosts (check mode, apply, rerun)
#   make test   every check: ruff, mypy, pytest (unit, lab, system), ansible-test sanity, ansible-lint, Molecule
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.rdpfix-installed
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/.cache/collections
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: help setup system-packages demo test lint typecheck pytest unit system sanity ansible-lint molecule build docs-check clean pitfalls actionlint

help:
	@echo "make demo   - set up, start a lab fleet, run fix_rdp.yml (check, apply, rerun), show a summary, stop the lab"
	@echo "make test   - set up and run every check (the CI entry point)"

# --- environment ----------------------------------------------------------------------------------
$(STAMP): requirements/runtime.txt requirements/test.txt tests/lab/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/test.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e tests/lab
	touch $(STAMP)

setup: $(STAMP) system-packages
	@scripts/link-collection.sh

system-packages:
	@scripts/install-system-packages.sh

# --- the demo -------------------------------------------------------------------------------------
demo: setup
	@scripts/demo.sh

# --- checks ---------------------------------------------------------------------------------------
test: setup
	@scripts/run-tests.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check plugins tests

typecheck: $(STAMP)
	$(BIN)/mypy plugins tests/lab/rdplab

pitfalls: $(STAMP)
	$(BIN)/python scripts/ps_pitfalls.py plugins/plugin_utils/_agent.ps1

actionlint:
	scripts/actionlint.sh

unit: setup
	$(BIN)/python -m pytest -q tests/unit tests/lab/tests

system: setup
	$(BIN)/python -m pytest -q tests/system

sanity: setup
	@scripts/ansible-test-sanity.sh

ansible-lint: setup
	$(BIN)/ansible-lint

molecule: setup
	cd $(CURDIR) && $(BIN)/molecule test -s default

build: setup
	mkdir -p build && $(BIN)/ansible-galaxy collection build --force --output-path build .

clean:
	-$(BIN)/rdplab down --state-dir .lab 2>/dev/null
	rm -rf .cache build tests/output .pytest_cache .mypy_cache .ruff_cache
