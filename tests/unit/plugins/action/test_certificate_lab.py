"""The certificate action plugin against the lab's simulated Windows hosts, through DirectConnection.

Each test loads a ready host file, runs the real action plugin (real agent batches, real certificates) and checks the
host's own state and counters: WinRM commands, writes, the certificate a new RDP connection would meet.
"""

from __future__ import annotations

import hashlib
import json
import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")

from ansible_collections.rdpfix.rdp.plugins.action.certificate import ActionModule  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
BROKEN = [
    "expired-selfsigned",
    "expiring-selfsigned",
    "missing-selfsigned",
    "pinned-missing",
    "pinned-expired",
    "pinned-wrong-eku",
    "pinned-no-private-key",
    "ca-cert-available",
    "active-sessions",
    "connection-broker",
]


def load(name: str) -> t.Any:
    path = HOSTS / f"{name}.yml"
    if not path.exists():
        pytest.skip(f"lab host file {path.name} not available")
    return rdplab_fleet.load_fleet([path])[0]


def run(host: t.Any, check_mode: bool = False, **args: t.Any) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=True, async_val=0, action="rdpfix.rdp.certificate")
    connection = rdplab_direct.DirectConnection(host)
    action = ActionModule(task, connection, SimpleNamespace(remote_addr="127.0.0.2"), None, None, None)
    return action.run(task_vars={"inventory_hostname": host.name})


def presented_thumbprint(host: t.Any) -> str | None:
    """The thumbprint of the certificate a new RDP connection would be shown."""
    view = host.rdp_view(connect=False)
    if view.cert_pem is None:
        return None
    der = x509.load_pem_x509_certificate(view.cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha1(der).hexdigest().upper()


def state_without_counters(host: t.Any) -> dict[str, t.Any]:
    snapshot: dict[str, t.Any] = host.snapshot()
    snapshot.pop("counters")
    return snapshot


def test_healthy_host_one_command_no_write() -> None:
    host = load("healthy")
    before = state_without_counters(host)
    result = run(host)
    assert (host.counters.winrm_commands, host.counters.writes) == (1, 0)
    assert result["changed"] is False and result["compliant"] is True
    assert result["certificate"]["thumbprint"] == presented_thumbprint(host)
    assert state_without_counters(host) == before


@pytest.mark.parametrize("name", BROKEN)
def test_check_mode_changes_nothing(name: str) -> None:
    host = load(name)
    before = json.dumps(state_without_counters(host), sort_keys=True)
    result = run(host, check_mode=True)
    assert "failed" not in result, result.get("msg")
    assert (host.counters.winrm_commands, host.counters.writes) == (1, 0)
    assert json.dumps(state_without_counters(host), sort_keys=True) == before
    assert result["compliant"] is False


@pytest.mark.parametrize("name", ["expired-selfsigned", "expiring-selfsigned", "missing-selfsigned"])
def test_self_signed_regenerated_in_two_commands(name: str) -> None:
    host = load(name)
    old = presented_thumbprint(host)
    result = run(host)
    assert "failed" not in result, result.get("msg")
    assert host.counters.winrm_commands == 2
    assert result["changed"] is True and result["compliant"] is True
    new = presented_thumbprint(host)
    assert new is not None and new != old
    assert result["certificate"]["thumbprint"] == new and result["certificate"]["days_left"] > 30
    # Everything removed was saved first, and the manifest lists it.
    files = host.snapshot()["files"]["entries"]
    manifest_path = f"{result['backup']['path']}\\manifest.json"
    assert manifest_path in files
    for item in result["backup"]["items"]:
        assert f"{result['backup']['path']}\\{item['file']}" in files
    # A second run finds nothing to do: one more command, no more writes.
    writes = host.counters.writes
    again = run(host)
    assert again["changed"] is False and host.counters.winrm_commands == 3 and host.counters.writes == writes


def test_termservice_restart_with_sessions_is_pending_and_sessions_survive() -> None:
    host = load("active-sessions")
    sessions = host.snapshot()["sessions"]
    result = run(host, restart_service="TermService")
    assert result["restart_pending"] is True and result["changed"] is False and "failed" not in result
    assert host.counters.writes == 0
    assert host.snapshot()["sessions"] == sessions
    assert any("allow_session_disruption" in warning for warning in result["warnings"])


def test_sessionenv_restart_keeps_sessions() -> None:
    host = load("active-sessions")
    sessions = host.snapshot()["sessions"]
    result = run(host)
    assert result["changed"] is True and result["compliant"] is True
    assert host.snapshot()["sessions"] == sessions


def test_termservice_restart_allowed_disconnects_sessions() -> None:
    host = load("active-sessions")
    result = run(host, restart_service="TermService", allow_session_disruption=True)
    assert result["changed"] is True and "failed" not in result, result.get("msg")
    users = {session["user"]: session["state"] for session in host.snapshot()["sessions"] if session["user"]}
    # Disconnected, not logged off: both users keep their sessions.
    assert users == {"CORP\\alice": "Disconnected", "CORP\\bob": "Disconnected"}


def test_missing_pin_removed_but_never_on_a_broker() -> None:
    host = load("pinned-missing")
    result = run(host)
    assert result["changed"] is True and result["certificate"]["pinned_thumbprint"] is None
    assert host.snapshot()["listener"]["pinned"] is None
    broker = load("connection-broker")
    pinned = broker.snapshot()["listener"]["pinned"]
    result = run(broker)
    assert result["changed"] is False and broker.counters.writes == 0
    assert broker.snapshot()["listener"]["pinned"] == pinned


def test_ca_certificate_pinned_on_request() -> None:
    host = load("ca-cert-available")
    candidates = [cert["thumbprint"] for cert in host.snapshot()["certificates"]["My"] if cert["key_usable"]]
    assert candidates, "the host file should hold a CA certificate in My"
    result = run(host, replacement_thumbprint=candidates[0], replace_when="always")
    assert "failed" not in result, result.get("msg")
    assert result["certificate"]["source"] == "pinned"
    assert presented_thumbprint(host) == candidates[0]


def test_stopped_key_isolation_blocks_regeneration() -> None:
    host = load("expired-selfsigned")
    host.inject_fault("stop_service", {"name": "KeyIso"})
    result = run(host)
    assert result["changed"] is False and host.counters.writes == 0
    assert any("KeyIso" in finding["title"] for finding in result["findings"])
    started = run(host, start_stopped_services=True)
    assert started["changed"] is True and started["compliant"] is True, started.get("msg")


def test_backup_that_cannot_be_written_changes_nothing() -> None:
    host = load("expired-selfsigned")
    host.inject_fault("fail_writes_under", {"path": "C:\\ProgramData\\rdpfix", "error": "DiskFull"})
    old = presented_thumbprint(host)
    result = run(host)
    assert result["failed"] is True and "nothing was changed" in result["msg"]
    assert presented_thumbprint(host) == old


def test_expired_pin_reported_with_the_certificate_the_listener_really_presents() -> None:
    # RCM 1053: an expired pin is not presented, the self-signed certificate is: module and lab agree on it.
    host = load("pinned-expired")
    result = run(host)
    assert result["certificate"]["source"] == "self_signed"
    assert result["certificate"]["thumbprint"] == presented_thumbprint(host)
    assert result["certificate"]["thumbprint"] != host.snapshot()["listener"]["pinned"]
    [pinned] = [item for item in result["findings"] if item["id"] == "certificate.pinned_expired"]
    assert "falls back to the self-signed certificate" in pinned["title"]
    # So an expired self-signed certificate matters there too: it is regenerated.
    host.inject_fault("expire_selfsigned", {})
    assert host.rdp_view(connect=False).failure == "reset_after_x224"
    repaired = run(host)
    assert repaired["changed"] is True, repaired.get("msg")
    assert host.rdp_view(connect=False).failure is None
    assert presented_thumbprint(host) == repaired["certificate"]["thumbprint"]
