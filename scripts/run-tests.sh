#!/usr/bin/env bash
# Every check of the project, in one run. Each stage runs even when an earlier one failed, so one run shows every
# problem; the exit code is non-zero when any stage failed.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
bin="$root/.venv/bin"
export PATH="$bin:$PATH"
export ANSIBLE_COLLECTIONS_PATH="$root/.cache/collections"
export ANSIBLE_CONFIG="$root/ansible.cfg"
export ANSIBLE_NOCOLOR=1 PY_COLORS=0

failed=()
stage() {
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name"
  if "$@"; then
    echo "=== $name: ok ($((SECONDS - start)) s)"
  else
    echo "=== $name: FAILED ($((SECONDS - start)) s)"
    failed+=("$name")
  fi
}

stage "ruff" "$bin/ruff" check .
stage "ruff format" "$bin/ruff" format --check plugins tests benchmarks scripts
stage "changelog fragments" "$bin/antsibull-changelog" lint
stage "mypy" "$bin/mypy" plugins tests/lab/rdplab
stage "mypy (tools)" "$bin/mypy" --strict scripts/ps_pitfalls.py tests/windows
# Windows PowerShell 5.1 pitfalls in the agent (rules and suppressions: scripts/ps_pitfalls.py).
stage "powershell pitfalls" "$bin/python" scripts/ps_pitfalls.py plugins/plugin_utils/_agent.ps1
# The Windows CI workflow (.github/workflows/windows.yml), checked here since it cannot run here.
stage "actionlint" scripts/actionlint.sh
# Unit and lab tests in two processes. The system tests in two processes too, a test module per process at a time
# (--dist loadfile: a module's shared lab and playbook runs happen once), longest modules first (tests/system/conftest.py
# orders them; --no-loadscope-reorder keeps that order); each process starts its labs on its own 127.0.N networks.
stage "pytest unit+lab" "$bin/python" -m pytest -p no:cacheprovider -q -n 2 tests/unit tests/lab/tests
stage "pytest system" "$bin/python" -m pytest -p no:cacheprovider -q -rs -n 2 --dist loadfile --no-loadscope-reorder \
  tests/system
stage "ansible-test sanity" scripts/ansible-test-sanity.sh
stage "ansible-lint" "$bin/ansible-lint" --offline
stage "collection build, install, galaxy-importer, ansible-builder" scripts/check-build.sh
stage "molecule" "$bin/molecule" test -s default

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED stages: ${failed[*]}"
  exit 1
fi
echo "all stages passed"
