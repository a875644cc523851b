"""The run summary of playbooks/fix_rdp.yml (filter rdpfix.rdp.run_summary): the lines for each kind of host, written
out as the playbook has always printed them (a normal host, check mode, findings, answers lost and read again, a
reboot, hosts that left the run unreachable or failed)."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest
import yaml
from ansible.errors import AnsibleFilterError

from ansible_collections.rdpfix.rdp.plugins.filter.run_summary import FilterModule, run_summaries, run_summary
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._summary import summary_lines

ROOT = Path(__file__).resolve().parents[4]

HEALTHY: dict[str, t.Any] = {
    "machinekeys": {"changed": False, "findings": []},
    "certificate": {
        "changed": False,
        "certificate": {"source": "selfsigned", "thumbprint": "3F2A9C", "days_left": 300},
        "findings": [],
    },
    "firewall": {"changed": False, "findings": []},
    "transport": {"changed": False},
    "tls": {"changed": False, "reboot_required": False},
}
HEALTHY_LINES = [
    "machinekeys: ok",
    "certificate: ok; listener presents selfsigned 3F2A9C, 300 day(s) left",
    "firewall: ok",
    "transport: ok",
    "tls: ok",
]

BROKEN: dict[str, t.Any] = {
    # In the role's order whatever order the results come in.
    "tls": {
        "changed": True,
        "reboot_required": True,
        "findings": [{"severity": "medium", "title": "TLS 1.2 is off", "fix": None}],
    },
    "certificate": {
        "changed": True,
        "certificate": None,
        "findings": [
            {
                "severity": "high",
                "title": "The listener's certificate expired",
                "fix": {"module": "rdpfix.rdp.certificate"},
            },
            {"severity": "low", "title": "No CA-issued certificate", "fix": None},
        ],
    },
    "firewall": {
        "failed": True,
        "changed": True,
        "findings": [{"severity": "high", "title": "Rules disabled", "fix": {"module": "rdpfix.rdp.firewall"}}],
    },
}


def test_a_healthy_host_one_line_per_concern_in_the_roles_order() -> None:
    assert summary_lines({"concerns": HEALTHY}) == HEALTHY_LINES
    assert summary_lines({"concerns": dict(reversed(HEALTHY.items()))}) == HEALTHY_LINES


def test_findings_states_and_what_check_mode_would_change() -> None:
    real = [
        "certificate: changed; the listener has no certificate",
        "  - [high] The listener's certificate expired (fix: rdpfix.rdp.certificate)",
        "  - [low] No CA-issued certificate",
        "firewall: FAILED",
        "  - [high] Rules disabled (fix: rdpfix.rdp.firewall)",
        "tls: reboot required",
        "  - [medium] TLS 1.2 is off",
    ]
    assert summary_lines({"concerns": BROKEN}) == real
    # A failed concern never says what it would change.
    assert summary_lines({"concerns": BROKEN}, check_mode=True) == [
        "certificate: changed (check mode: would change); the listener has no certificate",
        *real[1:5],
        "tls: reboot required (check mode: would change)",
        real[6],
    ]


def test_every_state_in_its_order_and_the_reboot() -> None:
    concerns = {
        "machinekeys": {"unreachable": True, "failed": True},
        "certificate": {"failed": True, "restart_pending": True, "certificate": {}},
        "firewall": {"restart_pending": True, "reboot_required": True, "changed": True},
        "transport": {"reboot_required": True, "changed": True},
        "tls": {"changed": True, "rebooted": True, "reboot_waits_for_sessions": "CORP\\alice (Active, session 2)"},
    }
    assert summary_lines({}, concerns) == [
        "machinekeys: UNREACHABLE",
        "certificate: FAILED; the listener has no certificate",
        "firewall: restart pending",
        "transport: reboot required",
        "tls: changed, rebooted, waiting for the session(s) of CORP\\alice (Active, session 2)",
    ]


def test_the_recorded_summary_wins_over_the_repairs_results() -> None:
    # A summary the play recorded itself (rdpfix_server_summary) wins over the repair task's concerns.
    rebooted = {"tls": {"changed": True, "reboot_required": False, "rebooted": True}}
    assert summary_lines({"concerns": BROKEN}, rebooted) == ["tls: changed, rebooted"]


def test_an_answer_lost_and_read_again_names_the_manifest() -> None:
    concerns = {
        "machinekeys": {
            "failed": True,
            "outcome": "unknown",
            "backup": {"manifest_id": "20261203T110000-machinekeys-ab12"},
        },
        "certificate": {
            "changed": True,
            "outcome": "made",
            "backup": {"manifest_id": "20261203T110000-certificate-cd34"},
            "certificate": {"source": "selfsigned", "thumbprint": "77AA", "days_left": 365},
        },
        "firewall": {"changed": False, "outcome": "not_made", "backup": None},
    }
    assert summary_lines({"concerns": concerns}, check_mode=True) == [
        "machinekeys: FAILED; answer lost, read again: unknown (backup manifest 20261203T110000-machinekeys-ab12)",
        "certificate: changed (check mode: would change); answer lost, read again: made (backup manifest"
        " 20261203T110000-certificate-cd34); listener presents selfsigned 77AA, 365 day(s) left",
        "firewall: ok; answer lost, read again: not made (backup manifest None)",
    ]


def test_hosts_that_left_the_run_say_why_first() -> None:
    refused = {"unreachable": True, "msg": "ntlm: the specified credentials were rejected by the server"}
    assert summary_lines(refused, left=True) == [
        "UNREACHABLE: ntlm: the specified credentials were rejected by the server; nothing of the repair is known"
        " to have run"
    ]
    assert summary_lines({"unreachable": True}, left=True) == [
        "UNREACHABLE: the host could not be reached; nothing of the repair is known to have run"
    ]
    assert summary_lines({"unreachable": True, "msg": "timed out", "concerns": HEALTHY}, left=True) == [
        "UNREACHABLE: timed out; what the run did before is below",
        *HEALTHY_LINES,
    ]
    shared = {
        "failed": True,
        "failed_concern": "machinekeys",
        "msg": "the answer to the apply batch the concerns shared was lost",
        "concerns": {
            "machinekeys": {"failed": True, "outcome": "unknown", "backup": {"manifest_id": "m-machinekeys-1"}}
        },
    }
    assert summary_lines(shared, left=True) == [
        "FAILED: the answer to the apply batch the concerns shared was lost",
        "machinekeys: FAILED; answer lost, read again: unknown (backup manifest m-machinekeys-1)",
    ]
    # The repair went through; the verification (or the reboot) after it failed the host.
    assert summary_lines({"changed": True, "unreachable": False, "concerns": HEALTHY}, left=True) == [
        "FAILED: a task after the repair failed (see it above)",
        *HEALTHY_LINES,
    ]
    assert summary_lines(None, left=True) == ["FAILED: a task after the repair failed (see it above)"]
    # The repair task's own final verification failed the host: its message.
    denied = "RDP still does not connect after the repair (refused): connection refused"
    verified = {"failed": True, "msg": denied, "concerns": HEALTHY, "verification": {"failed": True, "msg": denied}}
    assert summary_lines(verified, left=True) == [f"FAILED: {denied}", *HEALTHY_LINES]
    # The repair task's reboot failed the host: its message.
    timed_out = "web01: the reboot the changes of tls need failed: Timed out waiting for last boot time check"
    unbooted = {"failed": True, "msg": timed_out, "concerns": HEALTHY, "reboot": {"failed": True, "msg": timed_out}}
    assert summary_lines(unbooted, left=True) == [f"FAILED: {timed_out}", *HEALTHY_LINES]
    # The repair itself failed before any concern ran: its own message, not a later task's.
    unreadable = {"failed": True, "msg": "web01: the rdpfix agent failed: AccessDenied"}
    assert summary_lines(unreadable, left=True) == [
        "FAILED: web01: the rdpfix agent failed: AccessDenied; nothing of the repair is known to have run"
    ]


def test_a_host_on_which_no_concern_ran_has_no_lines() -> None:
    assert summary_lines({"changed": False}) == []
    assert summary_lines({"concerns": {}}, {}) == []


def test_the_filter() -> None:
    assert FilterModule().filters()["run_summary"] is run_summary
    assert run_summary({"concerns": BROKEN}, None, True) == summary_lines({"concerns": BROKEN}, check_mode=True)
    assert run_summary({"unreachable": True}, left=True)[0].startswith("UNREACHABLE: ")
    with pytest.raises(AnsibleFilterError, match="result must be a dictionary"):
        run_summary(["firewall: ok"])
    with pytest.raises(AnsibleFilterError, match="summary must be a dictionary"):
        run_summary({}, "firewall")


def test_the_playbook_summarises_every_host_in_one_task() -> None:
    plays = yaml.safe_load((ROOT / "playbooks" / "fix_rdp.yml").read_text())
    (task,) = plays[1]["tasks"]
    assert task["run_once"] is True
    message = task["ansible.builtin.debug"]["msg"]
    assert "rdpfix.rdp.run_summaries(ansible_play_hosts_all" in message
    assert "left=ansible_play_hosts_all | difference(ansible_play_hosts)" in message


def test_run_summaries_every_host_by_name_those_that_left_first_saying_why() -> None:
    hostvars = {
        "web01": {"rdpfix_server_result": {"concerns": HEALTHY}},
        "web02": {"rdpfix_server_result": {"unreachable": True, "msg": "timed out"}},
        # A reboot recorded its summary: it wins over the repair's results.
        "web03": {
            "rdpfix_server_result": {"concerns": {"tls": {"changed": True, "reboot_required": True}}},
            "rdpfix_server_summary": {"tls": {"changed": True, "rebooted": True}},
        },
    }
    summaries = run_summaries(hostvars, ["web01", "web02", "web03", "web04"], left=["web02"], check_mode=False)
    assert list(summaries) == ["web01", "web02", "web03", "web04"]
    assert summaries["web01"] == HEALTHY_LINES
    assert summaries["web02"] == ["UNREACHABLE: timed out; nothing of the repair is known to have run"]
    assert summaries["web03"] == ["tls: changed, rebooted"]
    # A host with no variables at all (none of the role ran on it) has no lines.
    assert summaries["web04"] == []

    # One host's variables that cannot be read cost that host its lines, not every host its summary.
    class Broken(dict[str, t.Any]):
        def get(self, key: str, default: t.Any = None) -> t.Any:
            raise RuntimeError(f"template error in {key}")

    broken = run_summaries({**hostvars, "web05": Broken()}, ["web01", "web05"])
    assert broken["web01"] == HEALTHY_LINES
    assert broken["web05"] == [
        "NO SUMMARY: its variables could not be read (RuntimeError: template error in rdpfix_server_result)"
    ]
    with pytest.raises(AnsibleFilterError, match="give hostvars"):
        run_summaries(["web01"], ["web01"])
    with pytest.raises(AnsibleFilterError, match="hosts must be a list of host names"):
        run_summaries(hostvars, "web01")
