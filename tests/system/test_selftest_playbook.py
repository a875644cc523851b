"""playbooks/selftest_rdp.yml against a lab of every host file, over real WinRM: every read operation answers in its
documented shape, a report per host, and nothing changed."""

from __future__ import annotations

import json
import typing as t
from pathlib import Path

import pytest
from harness import HOSTS_DIR, Lab, run_playbook

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _agent

pytestmark = pytest.mark.system

ALL_HOSTS = sorted(path.stem for path in HOSTS_DIR.glob("*.yml"))
TASK = "Run every read operation once and check each answer against its schema"


def without_counters(state: dict[str, t.Any]) -> dict[str, t.Any]:
    return {
        name: {key: value for key, value in host["snapshot"].items() if key != "counters"}
        for name, host in state.items()
    }


def test_selftest_is_green_on_every_lab_host_file(lab_factory: t.Callable[..., Lab], tmp_path: Path) -> None:
    lab = lab_factory(*ALL_HOSTS)
    lab.reset_counters()
    before = without_counters(lab.state())
    reports = tmp_path / "selftest"
    run = run_playbook(
        "playbooks/selftest_rdp.yml",
        lab.inventory,
        extra_vars={"rdpfix_hosts": "all", "rdpfix_selftest_report_dir": str(reports)},
        timeout=900,
    )
    assert run.rc == 0, run.stdout[-4000:] + run.stderr[-3000:]
    assert run.changed_hosts() == set()
    results = run.results(TASK)
    assert sorted(results) == ALL_HOSTS
    assert {name: result["status"] for name, result in results.items()} == dict.fromkeys(ALL_HOSTS, "ok")
    # Two WinRM commands per host, no write, no change to any host.
    counters = lab.counters()
    assert {name: (c["winrm_commands"], c["writes"]) for name, c in counters.items()} == dict.fromkeys(
        ALL_HOSTS, (2, 0)
    )
    assert without_counters(lab.state()) == before
    # The report on the controller, one per host, every read operation answered and valid.
    for name in ALL_HOSTS:
        report = json.loads((reports / f"{name}.json").read_text(encoding="utf-8"))
        assert report["host"] == name and report["status"] == "ok"
        assert {record["op"] for record in report["operations"]} == set(_agent.READ_OPERATIONS)
        assert report["environment"]["language_mode"] == "FullLanguage"


def test_check_mode_writes_no_report(lab_factory: t.Callable[..., Lab], tmp_path: Path) -> None:
    lab = lab_factory("healthy")
    reports = tmp_path / "selftest"
    run = run_playbook(
        "playbooks/selftest_rdp.yml", lab.inventory, check=True, extra_vars={"rdpfix_selftest_report_dir": str(reports)}
    )
    assert run.rc == 0, run.stdout[-3000:]
    assert run.results(TASK)["healthy"]["status"] == "ok"
    assert not reports.exists()
