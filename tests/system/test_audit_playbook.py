"""playbooks/audit_rdp.yml against a lab over real WinRM: findings per host, a report, and nothing changed."""

from __future__ import annotations

import json
import typing as t
from pathlib import Path

import pytest
import yaml
from harness import FLEETS_DIR, Lab, run_playbook
from role_results import results_of

pytestmark = pytest.mark.system

FACTS_TASK = "rdpfix.rdp.rdpfix_server : Gather Remote Desktop facts and findings (one WinRM command, read-only)"
# The role's concerns, by the module each runs (one result each: role_results.results_of).
ROLE_TASKS = {
    module: module
    for module in (
        "rdpfix.rdp.machinekeys",
        "rdpfix.rdp.certificate",
        "rdpfix.rdp.firewall",
        "rdpfix.rdp.transport",
        "rdpfix.rdp.tls",
    )
}


def without_counters(state: dict[str, t.Any]) -> dict[str, t.Any]:
    """Each host's model state, without the counters every read moves."""
    return {
        name: {key: value for key, value in host["snapshot"].items() if key != "counters"}
        for name, host in state.items()
    }


HOSTS = ("healthy", "expired-selfsigned", "firewall-block-rule", "tls-security-layer-rdp")


def test_audit_reads_every_host_once_writes_nothing_and_reports(
    lab_factory: t.Callable[..., Lab], tmp_path: Path
) -> None:
    lab = lab_factory(*HOSTS)
    lab.reset_counters()
    before = without_counters(lab.state())
    reports = tmp_path / "reports"
    run = run_playbook("playbooks/audit_rdp.yml", lab.inventory, extra_vars={"rdpfix_audit_report_dir": str(reports)})
    assert run.rc == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # Only the report changed (its files are new); every module task on the hosts reports no change.
    changed_tasks = {
        task["task"]["name"]
        for play in run.document["plays"]
        for task in play["tasks"]
        if any(result.get("changed") for result in task["hosts"].values())
    }
    assert changed_tasks == {"Write the fleet report"}
    counters = lab.counters()
    assert {name: (c["winrm_commands"], c["writes"]) for name, c in counters.items()} == dict.fromkeys(HOSTS, (1, 0))
    assert without_counters(lab.state()) == before

    facts = run.results(FACTS_TASK)
    critical = {name: [f["id"] for f in r["findings"] if f["severity"] == "critical"] for name, r in facts.items()}
    assert critical["healthy"] == []
    assert "certificate.self_signed_expired" in critical["expired-selfsigned"]
    assert "firewall.block_rule_tcp" in critical["firewall-block-rule"]
    assert "tls.security_layer_rdp" in {f["id"] for f in facts["tls-security-layer-rdp"]["findings"]}

    report = json.loads((reports / "report.json").read_text(encoding="utf-8"))
    statuses = {host["name"]: host["status"] for host in report["hosts"]}
    assert statuses == {name: facts[name]["status"] for name in HOSTS}
    assert (reports / "report.html").is_file() and (reports / "report.junit.xml").is_file()

    # A rerun over the unchanged fleet rewrites the report with new time stamps and reports nothing changed.
    rerun = run_playbook("playbooks/audit_rdp.yml", lab.inventory, extra_vars={"rdpfix_audit_report_dir": str(reports)})
    assert rerun.rc == 0 and rerun.changed_hosts() == set(), rerun.stdout[-3000:]
    assert json.loads((reports / "report.json").read_text(encoding="utf-8"))["generated_at"] != report["generated_at"]


def test_audit_gate_fails_the_run_on_critical_hosts(lab_factory: t.Callable[..., Lab], tmp_path: Path) -> None:
    lab = lab_factory("healthy", "expired-selfsigned")
    run = run_playbook(
        "playbooks/audit_rdp.yml",
        lab.inventory,
        extra_vars={"rdpfix_audit_report_dir": str(tmp_path / "r"), "rdpfix_audit_fail_on": "critical"},
    )
    assert run.rc != 0
    report = json.loads((tmp_path / "r" / "report.json").read_text(encoding="utf-8"))
    assert report["summary"]["failing_hosts"] == ["expired-selfsigned"]


def test_audit_with_the_handshake_probe(lab_factory: t.Callable[..., Lab], tmp_path: Path) -> None:
    lab = lab_factory("healthy", "expired-selfsigned")
    run = run_playbook(
        "playbooks/audit_rdp.yml",
        lab.inventory,
        extra_vars={"rdpfix_audit_report_dir": str(tmp_path / "r"), "rdpfix_server_audit_handshake": True},
    )
    assert run.rc == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text(encoding="utf-8"))
    verdicts = {host["name"]: (host.get("handshake") or {}).get("verdict") for host in report["hosts"]}
    assert (
        verdicts["healthy"] and verdicts["expired-selfsigned"] and verdicts["healthy"] != verdicts["expired-selfsigned"]
    )


def demo_fleet_hosts() -> list[Path]:
    fleet = yaml.safe_load((FLEETS_DIR / "demo.yml").read_text(encoding="utf-8"))
    return [(FLEETS_DIR / item).resolve() for item in fleet["hosts"]]


def test_audit_and_check_mode_agree_on_the_demo_fleet(lab_factory: t.Callable[..., Lab], tmp_path: Path) -> None:
    """With the role's defaults, a finding with a fix is exactly a module that ``fix_rdp.yml --check`` would change."""
    lab = lab_factory(*demo_fleet_hosts())
    audit = run_playbook(
        "playbooks/audit_rdp.yml", lab.inventory, extra_vars={"rdpfix_audit_report_dir": str(tmp_path)}
    )
    assert audit.rc == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
    check = run_playbook("playbooks/fix_rdp.yml", lab.inventory, check=True, diff=True)
    assert check.rc == 0, check.stdout[-3000:] + check.stderr[-3000:]

    facts = audit.results(FACTS_TASK)
    hosts = set(facts)
    assert hosts == {path.stem for path in demo_fleet_hosts()}
    assert not [name for name, result in facts.items() if result.get("failed") or result.get("unreachable")]
    fixable = {
        (name, item["fix"]["module"]) for name, result in facts.items() for item in result["findings"] if item["fix"]
    }
    would_change = {
        (name, module)
        for module, task in ROLE_TASKS.items()
        for name, result in results_of(check, task).items()
        if result.get("changed")
    }
    assert fixable == would_change
    # Not a vacuous equality: the demo fleet's broken hosts need fixes, and check mode wrote nothing.
    assert {name for name, _module in fixable} == check.changed_hosts() != set()
    # The role leaves the transport policy alone by default, so neither side mentions it.
    assert not [item["id"] for result in facts.values() for item in result["findings"] if item["cause"] == "transport"]

    for name in ("healthy", "healthy-legacy"):
        result = facts[name]
        serious = [item["id"] for item in result["findings"] if item["severity"] in ("critical", "warning")]
        assert result["status"] == "ok" or not serious, (name, serious)
        assert not [item["id"] for item in result["findings"] if item["fix"]], name
