"""The README's promises where the field broke them, step by step through ansible-playbook against one small lab:

- a reboot is a session disruption: with users on the host it waits for rdpfix_server_allow_session_disruption, is
  reported with the users named, and the sessions are read at the reboot (a user who logs on after an earlier run
  still holds it); a TermService restart waits the same way;
- the fix summary tells the truth after the role rebooted;
- the role's final verification is real: it fails the host when RDP still does not connect after a repair that left
  nothing pending or unresolved, unless rdpfix_server_verify is false;
- the audit probes the listener's real port (PortNumber as the facts read it), not the inventory's.

(Every host file is covered by tests/system/test_server_role.py: no session dropped, no policy value written.)
"""

from __future__ import annotations

import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import HOSTS_DIR, Lab, PlaybookRun, run_playbook, start_lab
from role_results import results_of, run_summaries

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import probe

pytestmark = pytest.mark.system

HOSTS = [
    "sessions-tls12-disabled",  # needs a reboot; CORP\alice Active, CORP\bob Disconnected
    "sessions-firewall-tls12",  # firewall opened at once, the reboot waits for CORP\dave
    "tls-tls12-disabled",  # needs a reboot; nobody on it until a user logs on between two runs
    "active-sessions",  # expired certificate; restarting TermService would end two sessions
    "verify-connections-denied",  # the rules get enabled, fDenyTSConnections still refuses
    "firewall-moved-port",  # listener on 3390, closed until the firewall repair
]
ROLE = "rdpfix.rdp.rdpfix_server : "
TASK = {
    "tls": "tls",  # the concerns' results: role_results.results_of
    "certificate": "certificate",
    # The repair task's reboot (with the sessions it read right before it) and its final verification, after the
    # reboot when there was one: the loop's last items.
    "reboot": "reboot",
    "verification": "verification",
    "audit_probe": ROLE + "Probe each host's RDP port from the controller",
}
RDP_TCP = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations\\RDP-Tcp"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    started = start_lab(tmp_path_factory.mktemp("promises"), [HOSTS_DIR / f"{name}.yml" for name in HOSTS])
    try:
        yield started
    finally:
        started.down()


def snapshots(lab: Lab) -> dict[str, dict[str, t.Any]]:
    return {name: state["snapshot"] for name, state in lab.state().items()}


def users(snapshot: dict[str, t.Any]) -> list[tuple[int, str, str]]:
    return sorted((s["id"], s["user"], s["state"]) for s in snapshot["sessions"] if s["user"])


def port(snapshot: dict[str, t.Any]) -> int:
    for key, values in snapshot["registry"].items():
        if key.casefold() == RDP_TCP.casefold():
            return int(values["PortNumber"]["value"])
    return 3389


def connects(lab: Lab, name: str, snapshot: dict[str, t.Any]) -> bool:
    report = probe(lab.address(name), port(snapshot), checks=["tcp", "negotiation", "tls"], tls_versions=["TLSv1.2"])
    return report["connectable"] is True and "TLSv1.2" in ((report["tls"] or {}).get("accepted_versions") or [])


def failed(run: PlaybookRun) -> set[str]:
    return {host for host, stat in run.stats.items() if stat.get("failures", 0) or stat.get("unreachable", 0)}


def summary_line(run: PlaybookRun, name: str, module: str) -> str:
    lines = run_summaries(run)[name]
    return next(line for line in lines if line.startswith(f"{module}:"))


def test_the_promises_step_by_step(lab: Lab) -> None:
    before = snapshots(lab)

    # 0. Without permission to reboot: tls-tls12-disabled gets its registry fix and a pending reboot (nobody on it).
    first = run_playbook("playbooks/fix_rdp.yml", lab.inventory, limit="tls-tls12-disabled")
    assert first.rc == 0, first.stdout[-3000:] + first.stderr
    assert results_of(first, TASK["tls"])["tls-tls12-disabled"]["reboot_required"] is True
    # Then a user logs on. The next run changes nothing in the registry: only a read at the reboot can see him.
    lab.fault("tls-tls12-disabled", "add_session", user="CORP\\frank", state="Active")

    # 1. Reboots allowed, session disruption not, TermService asked for the certificate renewal.
    run = run_playbook(
        "playbooks/fix_rdp.yml",
        lab.inventory,
        extra_vars={"rdpfix_server_allow_reboot": True, "rdpfix_server_restart_service": "TermService"},
    )
    after = snapshots(lab)
    # Only the verification fails a host: RDP is still refused where nothing was left pending or for a decision.
    assert failed(run) == {"verify-connections-denied"}, run.stdout[-3000:] + run.stderr
    denied = results_of(run, TASK["verification"])["verify-connections-denied"]
    assert denied["failed"] is True and denied["connectable"] is False
    assert (
        "RDP still does not connect after the repair" in denied["msg"] and "rdpfix_server_verify=false" in denied["msg"]
    )
    # No reboot on any host: each one that needs it waits for the users the repair task read right before it.
    waiting = {"sessions-tls12-disabled": "CORP\\alice", "sessions-firewall-tls12": "CORP\\dave"}
    waiting["tls-tls12-disabled"] = "CORP\\frank"
    reboots = results_of(run, TASK["reboot"])
    assert set(reboots) == set(waiting), reboots
    for name, user in waiting.items():
        assert users(after[name]) == users(before[name]) or name == "tls-tls12-disabled", name
        assert user in reboots[name]["users"], reboots[name]
        assert reboots[name]["rebooted"] is False and reboots[name]["pending"] is True, reboots[name]
        assert after[name]["system"]["boot_time"] == before[name]["system"]["boot_time"], f"{name} was rebooted"
        assert user in reboots[name]["waits_for_sessions"] and user in reboots[name]["msg"]
        assert "rdpfix_server_allow_session_disruption=true" in reboots[name]["msg"]
        line = summary_line(run, name, "tls")
        assert "reboot required" in line and f"waiting for the session(s) of {user}" in line, line
    assert [u for _id, u, _state in users(after["tls-tls12-disabled"])] == ["CORP\\frank"]
    assert users(after["sessions-tls12-disabled"]) == [(2, "CORP\\alice", "Active"), (3, "CORP\\bob", "Disconnected")]
    # The firewall repair opened the port, the TLS repair waits for the reboot: the verification ran and, with the
    # reboot pending, did not fail the host.
    probed = results_of(run, TASK["verification"])["sessions-firewall-tls12"]
    assert probed["connectable"] is False and not probed.get("failed")
    assert "tls: a reboot is required" in probed["pending"]
    # A TermService restart that would end sessions waits too.
    certificate = results_of(run, TASK["certificate"])["active-sessions"]
    assert certificate["restart_pending"] is True
    assert users(after["active-sessions"]) == users(before["active-sessions"]) != []
    # The moved listener: the verification probed 3390, where the firewall repair opened it.
    moved = results_of(run, TASK["verification"])["firewall-moved-port"]
    assert moved["connectable"] is True and moved["target"]["port"] == 3390

    # 2. Told not to verify (a controller that cannot reach RDP), the same host passes.
    unverified = run_playbook(
        "playbooks/fix_rdp.yml",
        lab.inventory,
        limit="verify-connections-denied",
        extra_vars={"rdpfix_server_verify": False},
    )
    assert unverified.rc == 0, unverified.stdout[-3000:] + unverified.stderr

    # 3. With consent: the reboots happen, they end the sessions, TLS 1.2 works, and the summary says "rebooted".
    consent = run_playbook(
        "playbooks/fix_rdp.yml",
        lab.inventory,
        limit="sessions-tls12-disabled,tls-tls12-disabled",
        extra_vars={"rdpfix_server_allow_reboot": True, "rdpfix_server_allow_session_disruption": True},
    )
    assert consent.rc == 0, consent.stdout[-3000:] + consent.stderr
    rebooted = snapshots(lab)
    for name in ("sessions-tls12-disabled", "tls-tls12-disabled"):
        assert results_of(consent, TASK["reboot"])[name]["rebooted"] is True
        assert rebooted[name]["system"]["boot_time"] != before[name]["system"]["boot_time"]
        assert users(rebooted[name]) == [], "a reboot ends every session"
        assert connects(lab, name, rebooted[name])
        # Verified after the reboot, with nothing pending any more.
        verified = results_of(consent, TASK["verification"])[name]
        assert verified["connectable"] is True and verified["pending"] == [], verified
        line = summary_line(consent, name, "tls")
        assert "rebooted" in line and "reboot required" not in line, line


def test_the_audit_probes_the_listeners_real_port(lab: Lab) -> None:
    # The inventory may say 3389 (a default, or stale); the facts read PortNumber 3390, and the probe follows them.
    audit = run_playbook(
        "playbooks/audit_rdp.yml",
        lab.inventory,
        limit="firewall-moved-port",
        extra_vars={
            "rdpfix_server_audit_handshake": True,
            "rdpfix_server_rdp_port": 3389,
            "rdpfix_audit_report_dir": str(Path(lab.state_dir).parent / "report"),
        },
    )
    assert audit.rc == 0, audit.stdout[-3000:] + audit.stderr
    result = results_of(audit, TASK["audit_probe"])["firewall-moved-port"]
    assert result["target"]["port"] == 3390, result["target"]
