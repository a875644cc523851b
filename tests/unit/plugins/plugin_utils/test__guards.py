"""Guard builders against a lab host: each guard built from what was read holds on the unchanged host, and stops the
batch before its write once the thing it guards changed (plugins/plugin_utils/_guards.py)."""

from __future__ import annotations

import json
import typing as t
from pathlib import Path

import pytest

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _guards as guards
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch, BatchResult, parse_output

rdplab_host = pytest.importorskip("rdplab.model.host")

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
RDP_TCP = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations\\RDP-Tcp"
STORE = "Remote Desktop"


def run(host: t.Any, batch: Batch) -> BatchResult:
    document = host.run_batch(json.loads(batch.to_json()))
    return parse_output(host.name, 0, json.dumps(document).encode(), b"", expected=len(batch.ops))


def read_guards(host: t.Any) -> list[guards.Guard]:
    """Every builder, from one read of the host as a planner would make it."""
    batch = Batch(on_error="continue")
    sessions = batch.add("session.list")
    certs = batch.add("cert.list", store=STORE)
    listener = batch.add("listener.get")
    registry = batch.add("registry.get", path=RDP_TCP, names=["SecurityLayer", "UserAuthentication", "Absent"])
    services = batch.add("service.get", names=["TermService", "CertPropSvc"])
    read = run(host, batch)
    [cert] = read.data(certs)["certificates"]
    key_path = cert["key"]["path"]
    stat_batch = Batch(on_error="stop")
    stat = stat_batch.add("file.stat", path=key_path)
    key_stat = run(host, stat_batch).data(stat)
    return [
        guards.sessions_unchanged(read.data(sessions)["sessions"]),
        guards.certificate_unchanged(STORE, cert),
        guards.listener_binding(read.data(listener)["ssl_certificate_sha1_hash"]),
        guards.file_unchanged(key_path, key_stat),
        guards.registry_values(
            RDP_TCP, ["SecurityLayer", "UserAuthentication", "Absent"], read.data(registry)["values"]
        ),
        guards.services_unchanged(read.data(services)["services"]),
        guards.certificate_absent("My", "AB" * 20),
    ]


def guarded_write(built: list[guards.Guard]) -> tuple[Batch, list[int], int]:
    batch = Batch(on_error="stop")
    positions = guards.add_guards(batch, built)
    write = batch.add("registry.set", path=RDP_TCP, name="rdpfixProbe", type="REG_DWORD", value=1)
    return batch, positions, write


def test_guards_built_from_a_read_hold_on_the_unchanged_host() -> None:
    host = rdplab_host.WindowsHost.from_file(HOSTS / "expired-selfsigned.yml")
    batch, positions, write = guarded_write(read_guards(host))
    result = run(host, batch)
    assert all(result[position].ok for position in positions), [r.error_message for r in result.results]
    assert result[write].ok
    assert guards.guard_failure(result, positions) is None


def _add_session(host: t.Any) -> None:
    host.inject_fault("add_session", {"user": "CORP\\late"})


def _remove_cert(host: t.Any) -> None:
    [cert] = host.stores.entries(STORE)
    host.stores.remove(STORE, cert.thumbprint)


def _replace_key_acl(host: t.Any) -> None:
    host.inject_fault("break_selfsigned_key", {"mode": "deny_network_service"})


def _set_security_layer(host: t.Any) -> None:
    op = {"op": "registry.set", "args": {"path": RDP_TCP, "name": "SecurityLayer", "type": "REG_DWORD", "value": 1}}
    assert host.run_batch({"v": 1, "ops": [op]})["results"][0]["ok"]


def _stop_certprop(host: t.Any) -> None:
    host.inject_fault("stop_service", {"name": "CertPropSvc"})


@pytest.mark.parametrize(
    ("change", "first_failing", "message"),
    [
        (
            _add_session,
            0,
            "the Remote Desktop sessions are the ones the plan saw: sessions: expected a list of 3 items",
        ),
        (_remove_cert, 1, "expected a list of 1 item, found a list of 0 items"),
        (_replace_key_acl, 1, ".key.sddl: expected"),
        (_set_security_layer, 4, "values.SecurityLayer.value: expected"),
        (_stop_certprop, 5, 'services.CertPropSvc.status: expected "Running", found "Stopped"'),
    ],
)
def test_a_change_after_the_read_stops_the_batch_before_its_write(
    change: t.Callable[[t.Any], None], first_failing: int, message: str
) -> None:
    host = rdplab_host.WindowsHost.from_file(HOSTS / "expired-selfsigned.yml")
    batch, positions, write = guarded_write(read_guards(host))
    change(host)
    writes = host.counters.writes
    result = run(host, batch)
    failure = guards.guard_failure(result, positions)
    assert failure is not None
    assert failure.position == positions[first_failing]
    assert message in failure.message
    assert result[write].skipped and host.counters.writes == writes


def test_guards_go_first_in_a_stopping_batch() -> None:
    guard = guards.sessions_unchanged([])
    written = Batch(on_error="stop")
    written.add("registry.set", path=RDP_TCP, name="x", type="REG_DWORD", value=1)
    with pytest.raises(ValueError, match="before the first write"):
        guards.add_guards(written, [guard])
    with pytest.raises(ValueError, match="on_error: stop"):
        guards.add_guards(Batch(on_error="continue"), [guard])
    with pytest.raises(ValueError, match="read operation"):
        guards.Guard(label="x", op="registry.set", args={}, expect=None)


def test_a_guard_whose_read_failed_is_not_a_changed_host() -> None:
    host = rdplab_host.WindowsHost.from_file(HOSTS / "healthy.yml")
    batch = Batch(on_error="stop")
    position = guards.add_guard(batch, guards.Guard(label="x", op="dir.list", args={"path": "nope"}, expect=None))
    result = run(host, batch)
    assert result[position].error_type == "InvalidArgument"
    assert guards.guard_failure(result) is None
