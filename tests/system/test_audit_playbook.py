"""playbooks/audit_rdp.yml against a lab over real WinRM: findings per host, a report, and nothing changed."""

from __future__ import annotations

import json
import typing as t
from pathlib import Path

import pytest
from harness import Lab, run_playbook

pytestmark = pytest.mark.system


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
    assert run.changed_hosts() == set()
    counters = lab.counters()
    assert {name: (c["winrm_commands"], c["writes"]) for name, c in counters.items()} == dict.fromkeys(HOSTS, (1, 0))
    assert without_counters(lab.state()) == before

    facts = run.results("Gather Remote Desktop facts and findings (one WinRM command, read-only)")
    critical = {name: [f["id"] for f in r["findings"] if f["severity"] == "critical"] for name, r in facts.items()}
    assert critical["healthy"] == []
    assert "certificate.self_signed_expired" in critical["expired-selfsigned"]
    assert "firewall.block_rule_tcp" in critical["firewall-block-rule"]
    assert "tls.security_layer_rdp" in {f["id"] for f in facts["tls-security-layer-rdp"]["findings"]}

    report = json.loads((reports / "report.json").read_text(encoding="utf-8"))
    statuses = {host["name"]: host["status"] for host in report["hosts"]}
    assert statuses == {name: facts[name]["status"] for name in HOSTS}
    assert (reports / "report.html").is_file() and (reports / "report.junit.xml").is_file()


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
        extra_vars={"rdpfix_audit_report_dir": str(tmp_path / "r"), "rdpfix_audit_handshake": True},
    )
    assert run.rc == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text(encoding="utf-8"))
    verdicts = {host["name"]: (host.get("handshake") or {}).get("verdict") for host in report["hosts"]}
    assert (
        verdicts["healthy"] and verdicts["expired-selfsigned"] and verdicts["healthy"] != verdicts["expired-selfsigned"]
    )
