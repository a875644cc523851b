# rdpfix.rdp - two commands matter on a fresh machine (`make help` lists every target):
#   make demo   run fix_rdp.yml against a lab of simulated Windows hosts (check mode, apply, rerun)
#   make test   every check: ruff, mypy, pytest (unit, lab, system), ansible-test sanity, ansible-lint, build, Molecule
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.rdpfix-installed
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/.cache/collections
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: help setup system-packages demo test lint typecheck unit system sanity ansible-lint molecule build changelog clean pitfalls actionlint

help:
	@echo "make demo          set up, start a lab fleet, audit it, fix it (check, apply, rerun), show the outcome, stop the lab"
	@echo "make test          set up and run every check (the CI entry point, scripts/run-tests.sh)"
	@echo ""
	@echo "make setup         create .venv from requirements/*.txt, install the Debian test packages, link the collection"
	@echo "make lint          ruff check and ruff format --check"
	@echo "make typecheck     mypy (strict on plugins/plugin_utils and the lab)"
	@echo "make unit          pytest: unit and lab tests"
	@echo "make system        pytest: system tests (labs, ansible-playbook, real RDP servers, a browser)"
	@echo "make sanity        ansible-test sanity (scripts/ansible-test-sanity.sh)"
	@echo "make ansible-lint  ansible-lint, production profile"
	@echo "make pitfalls      the agent's PowerShell checked for Windows PowerShell 5.1 pitfalls"
	@echo "make actionlint    the GitHub workflows checked (scripts/actionlint.sh)"
	@echo "make molecule      the Molecule scenario against a lab"
	@echo "make build         build the collection tarball into build/ and check it (scripts/check-build.sh)"
	@echo "make changelog     release notes: CHANGELOG.rst from changelogs/ (antsibull-changelog)"
	@echo "make clean         stop the lab, remove build output and caches"
	@echo ""
	@echo "Commands outside make: use .venv/bin/<tool>, or 'source .venv/bin/activate' first."

# --- environment ----------------------------------------------------------------------------------
# The Debian packages first: pywinrm[kerberos] builds pykerberos against the Kerberos headers.
$(STAMP): requirements/runtime.txt requirements/test.txt tests/lab/pyproject.toml | system-packages
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements/test.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e tests/lab
	touch $(STAMP)

# azure.azcollection.azure_rm beside this collection (requirements/azure-rm.txt, docs/azure.md): a virtualenv of its
# own, so that .venv does not carry its hundred Azure packages; only the Azure system test runs from it.
AZURE_RM_VENV ?= .venv-azure-rm
AZURE_RM_STAMP := $(AZURE_RM_VENV)/.rdpfix-installed
$(AZURE_RM_STAMP): requirements/runtime.txt requirements/azure-rm.txt | system-packages
	test -x $(AZURE_RM_VENV)/bin/python || $(PYTHON) -m venv $(AZURE_RM_VENV)
	$(AZURE_RM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip==25.3
	$(AZURE_RM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
	  -r requirements/runtime.txt -r requirements/azure-rm.txt
	touch $(AZURE_RM_STAMP)

setup: $(STAMP) $(AZURE_RM_STAMP) system-packages
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
	$(BIN)/ruff format --check plugins tests benchmarks scripts

typecheck: $(STAMP)
	$(BIN)/mypy plugins tests/lab/rdplab

pitfalls: $(STAMP)
	$(BIN)/python scripts/ps_pitfalls.py plugins/plugin_utils/_agent.ps1

actionlint:
	scripts/actionlint.sh

unit: setup
	$(BIN)/python -m pytest -q tests/unit tests/lab/tests

system: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests/system

sanity: setup
	@scripts/ansible-test-sanity.sh

ansible-lint: setup
	$(BIN)/ansible-lint --offline

molecule: setup
	cd $(CURDIR) && $(BIN)/molecule test -s default

build: setup
	mkdir -p build && $(BIN)/ansible-galaxy collection build --force --output-path build .
	@scripts/check-build.sh

changelog: $(STAMP)
	$(BIN)/antsibull-changelog lint && $(BIN)/antsibull-changelog generate

clean:
	-$(BIN)/rdplab down --state-dir .lab 2>/dev/null
	rm -rf .cache build tests/output .pytest_cache .mypy_cache .ruff_cache
