"""playbooks/fix_rdp.yml through Ansible's own winrm connection against the lab: audit, fix, rerun.

These are the spine's end-to-end promises: check mode writes nothing and shows a diff, a real run repairs every host
so a TLS handshake succeeds from outside, a second run changes nothing, round trips are few and counted, bad input is
rejected before any host is contacted, and a host that refuses our credentials is reported unreachable.
"""

from __future__ import annotations

import typing as t

import pytest
import yaml
from harness import Lab, PlaybookRun, run_playbook
from role_results import APPLY_TASK, concern_results, results_of, run_summaries

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import probe

pytestmark = pytest.mark.system

BROKEN = ["expired-selfsigned", "missing-selfsigned", "pinned-missing", "active-sessions"]
HEALTHY = ["healthy"]
# The repair task's own final verification, shown as the last item of the per-concern results.
VERIFY_TASK = "verification"


def summary(run: PlaybookRun, host: str) -> list[str]:
    """A host's summary, which the playbook prints last: one line per module, one indented line per finding."""
    return run_summaries(run)[host]


def tls_handshake_ok(lab: Lab, host: str) -> bool:
    """What a client sees: does the host's RDP port complete a TLS handshake?"""
    report = probe(lab.address(host), 3389, checks=["tcp", "negotiation", "tls"], tls_versions=["TLSv1.2"])
    return bool(report["connectable"]) and bool((report["tls"] or {}).get("accepted_versions"))


def writes(lab: Lab) -> dict[str, int]:
    return {name: counters["writes"] for name, counters in lab.counters().items()}


def commands(lab: Lab) -> dict[str, int]:
    return {name: counters["winrm_commands"] for name, counters in lab.counters().items()}


@pytest.fixture
def fleet(lab_factory: t.Callable[..., Lab]) -> Lab:
    return lab_factory(*HEALTHY, *BROKEN)


def task_runs(run: PlaybookRun) -> dict[str, int]:
    """Task runs per host, as the PLAY RECAP counts them (a loop counts once); the run's one summary task (run once)
    counts on one host only, so it is left out here."""
    summary_host = next(iter(run.results("Show what was found and done")))
    return {
        host: sum(stats.get(key, 0) for key in ("ok", "failed", "skipped", "ignored", "unreachable"))
        - (host == summary_host)
        for host, stats in run.stats.items()
    }


def test_audit_fix_rerun(fleet: Lab) -> None:
    before = fleet.state()
    for host in ["expired-selfsigned", "missing-selfsigned"]:
        assert not tls_handshake_ok(fleet, host), f"{host} should fail the handshake before the fix"

    # 1. Audit: check mode reports what it would change, with a diff, and writes nothing: one read per host.
    fleet.reset_counters()
    audit = run_playbook("playbooks/fix_rdp.yml", fleet.inventory, check=True, diff=True)
    assert audit.rc == 0, audit.stdout + audit.stderr
    assert writes(fleet) == dict.fromkeys(before, 0)
    assert commands(fleet) == dict.fromkeys(before, 1)
    # Each task run costs the controller a forked worker: the argument validation, the read + repair + verification
    # and the results loop - nothing else per host (docs/architecture.md, "Fewer task runs").
    assert task_runs(audit) == dict.fromkeys(before, 3)
    assert audit.changed_hosts() == set(BROKEN)
    cert_results = concern_results(audit, "certificate")
    assert cert_results["expired-selfsigned"]["changed"] is True
    assert "diff" in cert_results["expired-selfsigned"], "--diff must show before/after"
    assert cert_results["healthy"]["changed"] is False
    lines = summary(audit, "expired-selfsigned")
    assert lines[0] == "machinekeys: ok"
    certificate_line = next(line for line in lines if line.startswith("certificate:"))
    assert certificate_line.startswith("certificate: changed (check mode: would change); listener presents self_signed")
    assert any(line.startswith("  - [critical] The self-signed certificate") for line in lines), lines
    assert "certificate: changed (check mode: would change); the listener has no certificate" in summary(
        audit, "missing-selfsigned"
    )
    state_after_audit = fleet.state()
    for name in before:
        for part in ("certificates", "registry", "files", "services", "sessions"):
            assert state_after_audit[name]["snapshot"][part] == before[name]["snapshot"][part], (name, part)

    # 2. Fix: one read per host (the snapshot), and one apply batch on a host with something to change.
    fleet.reset_counters()
    fix = run_playbook("playbooks/fix_rdp.yml", fleet.inventory)
    assert fix.rc == 0, fix.stdout + fix.stderr
    assert fix.changed_hosts() == set(BROKEN)
    assert commands(fleet) == {name: 2 if name in BROKEN else 1 for name in before}
    assert task_runs(fix) == dict.fromkeys(before, 3)
    for host in BROKEN + HEALTHY:
        assert tls_handshake_ok(fleet, host), f"{host} must complete a TLS handshake after the fix"
    results = concern_results(fix, "certificate")
    for host in BROKEN:
        assert results[host]["backup"]["manifest_id"], f"{host}: a change must leave a backup manifest"
    # Round trips as the task counts them: the snapshot's read, then the apply batch the certificate's changes
    # travelled in; nothing planned from the snapshot reads again.
    applied = fix.results(APPLY_TASK)
    assert {host: result["round_trips"] for host, result in applied.items()} == {
        name: 2 if name in BROKEN else 1 for name in before
    }
    assert results["healthy"]["round_trips"] == 0
    assert results["expired-selfsigned"]["round_trips"] == 1
    assert all(result["replanned_concerns"] == [] for result in applied.values())
    # Sessions survived: the default restart (SessionEnv) keeps them.
    sessions = fleet.host("active-sessions")["snapshot"]["sessions"]
    assert any(s["state"] == "Active" for s in sessions), sessions

    # 3. Rerun: nothing left to change, nothing written, one command per host (the snapshot's read).
    fleet.reset_counters()
    rerun = run_playbook("playbooks/fix_rdp.yml", fleet.inventory)
    assert rerun.rc == 0
    assert rerun.changed_hosts() == set()
    assert writes(fleet) == dict.fromkeys(before, 0)
    assert commands(fleet) == dict.fromkeys(before, 1)
    assert task_runs(rerun) == dict.fromkeys(before, 3)
    # A rerun that changes nothing still verifies from outside (no WinRM command: the probe runs on the controller).
    probed = results_of(rerun, VERIFY_TASK)
    assert {host: result.get("connectable") for host, result in probed.items()} == dict.fromkeys(before, True)
    assert [line.split(":")[0] for line in summary(rerun, "healthy") if not line.startswith(" ")] == [
        "machinekeys",
        "certificate",
        "firewall",
        "tls",
    ]
    assert all(
        line.endswith(": ok") or line.startswith(("certificate: ok;", "  - "))
        for host in BROKEN + HEALTHY
        for line in summary(rerun, host)
    )


def test_limit_to_a_group(fleet: Lab) -> None:
    inventory = yaml.safe_load(fleet.inventory.read_text())
    groups = inventory["all"]["children"]
    assert "azure_vms" in groups, "the lab inventory carries the groups the host files declare"
    members = set(groups["azure_vms"]["hosts"])
    fleet.reset_counters()
    run = run_playbook("playbooks/fix_rdp.yml", fleet.inventory, check=True, limit="azure_vms")
    assert run.rc == 0
    touched = {name for name, count in commands(fleet).items() if count}
    assert touched == members


def _assert_rejected_before_contact(run: PlaybookRun, lab: Lab, expected: str) -> None:
    assert run.rc != 0
    assert expected in run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert set(commands(lab).values()) == {0}, "bad input must fail before any host is contacted"


def test_bad_role_variable_rejected_before_any_host(fleet: Lab) -> None:
    fleet.reset_counters()
    run = run_playbook(
        "playbooks/fix_rdp.yml",
        fleet.inventory,
        extra_vars={"rdpfix_server_restart_service": "Spooler"},
        json_output=False,
    )
    _assert_rejected_before_contact(run, fleet, "rdpfix_server_restart_service")


def test_bad_module_option_rejected_before_any_host(fleet: Lab, tmp_path: t.Any) -> None:
    playbook = tmp_path / "bad.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "hosts": "windows",
                    "gather_facts": False,
                    "tasks": [{"name": "bad", "rdpfix.rdp.certificate": {"expiry_threshold_days": -3}}],
                }
            ]
        )
    )
    fleet.reset_counters()
    run = run_playbook(playbook, fleet.inventory, json_output=False)
    _assert_rejected_before_contact(run, fleet, "expiry_threshold_days")


def test_wrong_credentials_are_unreachable(fleet: Lab, tmp_path: t.Any) -> None:
    inventory = yaml.safe_load(fleet.inventory.read_text())
    inventory["all"]["children"]["windows"]["hosts"]["healthy"]["ansible_password"] = "wrong"
    bad_inventory = tmp_path / "bad-inventory.yml"
    bad_inventory.write_text(yaml.safe_dump(inventory))
    run = run_playbook("playbooks/fix_rdp.yml", bad_inventory, limit="healthy")
    assert run.rc != 0
    assert run.stats["healthy"]["unreachable"] == 1
