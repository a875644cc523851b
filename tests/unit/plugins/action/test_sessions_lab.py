"""rdpfix.rdp.sessions (the gate rdpfix.rdp.server reads right before a reboot) and the ``unresolved`` list every fixing
module returns (what the role's final verification relies on), against the lab's simulated hosts."""

from __future__ import annotations

import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")
rdplab_reboot = pytest.importorskip("rdplab.reboot")

from ansible_collections.rdpfix.rdp.plugins.action import firewall as firewall_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import sessions as sessions_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import tls as tls_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _sessions  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"


def load(name: str) -> t.Any:
    return rdplab_fleet.load_fleet([HOSTS / f"{name}.yml"])[0]


def run(action_class: t.Any, host: t.Any, module: str, check_mode: bool = False, **args: t.Any) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=False, async_val=0, action=module)
    action = action_class(
        task, rdplab_direct.DirectConnection(host), SimpleNamespace(remote_addr="127.0.0.2"), None, None, None
    )
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name}))


@pytest.mark.parametrize("check_mode", [False, True])
def test_the_sessions_a_reboot_would_end_are_read_in_one_command(check_mode: bool) -> None:
    host = load("sessions-tls12-disabled")
    result = run(sessions_action.ActionModule, host, "rdpfix.rdp.sessions", check_mode=check_mode)
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is False and result["round_trips"] == 1
    assert (host.counters.winrm_commands, host.counters.writes) == (1, 0)
    assert [(s["user"], s["state"]) for s in result["user_sessions"]] == [
        ("CORP\\alice", "Active"),
        ("CORP\\bob", "Disconnected"),
    ]
    assert result["users"] == "CORP\\alice (Active, session 2), CORP\\bob (Disconnected, session 3)"
    # Session 0, the console without a user and the listener are never counted.
    assert len(result["sessions"]) == 5


def test_the_gate_reads_the_sessions_as_they_are_now() -> None:
    host = load("healthy")
    assert run(sessions_action.ActionModule, host, "rdpfix.rdp.sessions")["user_sessions"] == []
    with host.lock:
        host.sessions.add("CORP\\erin", "Active")
    assert run(sessions_action.ActionModule, host, "rdpfix.rdp.sessions")["users"].startswith("CORP\\erin (Active")


def test_a_lab_reboot_ends_every_user_session() -> None:
    host = load("sessions-tls12-disabled")
    rdplab_reboot.restart(host)
    after = run(sessions_action.ActionModule, host, "rdpfix.rdp.sessions")
    assert after["user_sessions"] == []


def test_user_sessions_rule() -> None:
    records = [
        {"id": 0, "user": "", "state": "Disconnected", "station": "Services"},
        {"id": 1, "user": "", "state": "Connected", "station": "Console"},
        {"id": 1, "user": "CORP\\ops", "state": "Active", "station": "Console"},
        {"id": 4, "user": "CORP\\x", "state": "Connected", "station": "RDP-Tcp#4"},
        {"id": 65536, "user": "", "state": "Listen", "station": "RDP-Tcp"},
    ]
    assert [s["user"] for s in _sessions.user_sessions(records)] == ["CORP\\ops", "CORP\\x"]


def test_unresolved_names_what_a_run_leaves_for_someone_to_decide() -> None:
    # Group Policy values: reported, their fix needs override_policy, so they stay unresolved in a default run...
    host = load("policy-security-layer-both")
    result = run(tls_action.ActionModule, host, "rdpfix.rdp.tls")
    assert result["changed"] is True  # the listener's own value is repaired
    assert result["unresolved"] == ["tls.security_layer_rdp_policy"]
    # ... and resolved when the run is given the option.
    forced = run(tls_action.ActionModule, load("policy-security-layer-both"), "rdpfix.rdp.tls", override_policy=True)
    assert forced["unresolved"] == [] and forced["warnings"]
    # The active profile that stays closed without the options is unresolved; a plain disabled rule is not.
    public = run(firewall_action.ActionModule, load("firewall-public-profile"), "rdpfix.rdp.firewall")
    assert public["unresolved"] == [
        "firewall.rdp_tcp_blocked_active_profile",
        "firewall.rdp_udp_blocked_active_profile",
    ]
    disabled = run(firewall_action.ActionModule, load("verify-connections-denied"), "rdpfix.rdp.firewall")
    assert disabled["changed"] is True and disabled["unresolved"] == []
