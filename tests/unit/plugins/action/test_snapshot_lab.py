"""Planning from a snapshot, guarded writes and one apply batch, against the lab's simulated hosts (DirectConnection).

- A fixing module given rdpfix.rdp.facts' result plans from it: the same result as its own read, and nothing sent.
- rdpfix.rdp.server carries the changes of every concern in one apply batch (the key store and then the certificate
  are two: the certificate is planned from the repaired store).
- Never acting on stale data: the host is changed between the snapshot and the write; the guards stop the apply batch
  before its first write, the module reads again and plans anew once, and says so; changed again, it fails and
  writes nothing.
- A snapshot of another host, of another format, or not a snapshot at all is refused before anything is sent.
"""

from __future__ import annotations

import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")
rdplab_ops = pytest.importorskip("rdplab.ops")

from ansible_collections.rdpfix.rdp.plugins.action import certificate as certificate_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import facts as facts_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import firewall as firewall_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import machinekeys as machinekeys_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import server as server_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import tls as tls_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import transport as transport_action  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
TLS12 = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\SecurityProviders\\SCHANNEL\\Protocols\\TLS 1.2\\Server"
MODULES: dict[str, tuple[t.Any, dict[str, t.Any]]] = {
    "machinekeys": (machinekeys_action.ActionModule, {}),
    "certificate": (certificate_action.ActionModule, {}),
    "firewall": (firewall_action.ActionModule, {}),
    "transport": (transport_action.ActionModule, {"mode": "tcp_only"}),
    "tls": (tls_action.ActionModule, {}),
}
ALL_CONCERNS = {"machinekeys": {}, "certificate": {}, "firewall": {}, "tls": {}}


class Meddling:
    """A DirectConnection that lets someone else change the host right before chosen commands (1 = the first)."""

    def __init__(self, host: t.Any, before: dict[int, t.Callable[[], None]]) -> None:
        self.inner = rdplab_direct.DirectConnection(host)
        self.before = before
        self._shell = getattr(self.inner, "_shell", None)
        self.become = None
        self.count = 0

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        self.count += 1
        meddle = self.before.get(self.count)
        if meddle is not None:
            meddle()
        return t.cast(tuple[int, bytes, bytes], self.inner.exec_command(cmd, in_data, sudoable))

    def close(self) -> None:
        self.inner.close()


def load(name: str) -> t.Any:
    return rdplab_fleet.load_fleet([HOSTS / f"{name}.yml"])[0]


def run(
    action_class: t.Any, host: t.Any, connection: t.Any = None, check_mode: bool = False, **args: t.Any
) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=True, async_val=0, action="rdpfix.rdp.test")
    action = action_class(
        task,
        connection or rdplab_direct.DirectConnection(host),
        SimpleNamespace(remote_addr="127.0.0.2"),
        None,
        None,
        None,
    )
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name}))


def snapshot_of(host: t.Any) -> dict[str, t.Any]:
    result = run(facts_action.ActionModule, host, gather_events=False)
    assert result["round_trips"] == 1 and "snapshot" in result, result.get("msg")
    return result


def set_dword(host: t.Any, path: str, name: str, value: int) -> None:
    """What an administrator's own change does: the lab's registry.set, outside any rdpfix batch."""
    rdplab_ops.OPS["registry.set"].func(host, {"path": path, "name": name, "type": "REG_DWORD", "value": value})


def comparable(result: dict[str, t.Any]) -> dict[str, t.Any]:
    return {k: v for k, v in result.items() if k not in ("round_trips", "snapshot", "replanned")}


@pytest.mark.parametrize("name", ["combined-all", "machinekeys-rdp-key-deleted-folder-acl", "tls-tls12-disabled"])
def test_modules_plan_from_the_snapshot_as_from_their_own_read(name: str) -> None:
    host = load(name)
    facts = snapshot_of(host)
    for module, (action, args) in MODULES.items():
        own = run(action, host, check_mode=True, **args)
        before = host.counters.winrm_commands
        planned = run(action, host, check_mode=True, snapshot=facts, **args)
        assert host.counters.winrm_commands == before, f"{module} read the host although given a snapshot"
        assert planned["round_trips"] == 0 and planned["replanned"] is None
        assert comparable(planned) == comparable(own), module


def test_one_apply_batch_carries_every_concern_and_the_rerun_reads_once() -> None:
    host = load("combined-firewall-tls-expired")
    facts = snapshot_of(host)
    before = host.counters.winrm_commands
    result = run(server_action.ActionModule, host, snapshot=facts, **ALL_CONCERNS)
    assert not result.get("failed"), result.get("msg")
    assert host.counters.winrm_commands - before == 1 == result["round_trips"]
    concerns = result["concerns"]
    assert [name for name, item in concerns.items() if item["changed"]] == ["certificate", "firewall", "tls"]
    assert all(item["backup"]["manifest_id"] for item in concerns.values() if item["changed"])
    # The snapshot it returns is the host after the batch: planning from it finds nothing left to do.
    again = run(server_action.ActionModule, host, check_mode=True, snapshot=result["snapshot"], **ALL_CONCERNS)
    assert again["changed"] is False and again["round_trips"] == 0
    fresh = run(server_action.ActionModule, host, check_mode=True, snapshot=snapshot_of(host), **ALL_CONCERNS)
    assert fresh["changed"] is False


def test_the_certificate_is_planned_after_the_key_store_repair() -> None:
    host = load("combined-all")
    facts = snapshot_of(host)
    result = run(server_action.ActionModule, host, snapshot=facts, **ALL_CONCERNS)
    assert not result.get("failed"), result.get("msg")
    # Keys, firewall and TLS in the first apply batch; the certificate, planned from the repaired store, in a second.
    assert result["round_trips"] == 2
    assert {name: item["round_trips"] for name, item in result["concerns"].items()} == dict.fromkeys(ALL_CONCERNS, 1)


def test_a_module_never_acts_on_a_snapshot_the_host_no_longer_matches() -> None:
    host = load("tls-tls12-disabled")
    facts = snapshot_of(host)
    writes = host.counters.writes

    def someone_fixes_it() -> None:
        set_dword(host, TLS12, "Enabled", 1)
        set_dword(host, TLS12, "DisabledByDefault", 0)

    meddling = Meddling(host, {1: someone_fixes_it})
    result = run(tls_action.ActionModule, host, connection=meddling, snapshot=facts)
    assert not result.get("failed"), result.get("msg")
    # The stale plan would have written TLS 1.2 on: the guard stopped its batch, the new read found nothing to do.
    # (someone else's changes are made outside any batch: the lab's write counter counts only the module's writes)
    assert host.counters.writes == writes
    assert result["changed"] is False and result["changes"] == []
    assert "TLS 1.2" in result["replanned"] and "Enabled" in result["replanned"]
    assert any("changed since the snapshot" in warning for warning in result["warnings"])
    assert result["round_trips"] == meddling.count == 2  # the stopped apply batch, the new read


def test_a_stale_concern_is_planned_anew_inside_the_one_batch() -> None:
    host = load("combined-firewall-tls-expired")
    facts = snapshot_of(host)
    meddling = Meddling(host, {1: lambda: set_dword(host, TLS12, "Enabled", 1)})
    result = run(server_action.ActionModule, host, connection=meddling, snapshot=facts, **ALL_CONCERNS)
    assert not result.get("failed"), result.get("msg")
    # The stopped batch, one read for the modules that plan anew, one apply batch.
    assert result["round_trips"] == meddling.count == 3
    assert "tls" in result["replanned_concerns"]
    assert result["concerns"]["tls"]["replanned"].startswith("registry.get")
    tls_changes = " ".join(result["concerns"]["tls"]["changes"])
    assert "Enabled" not in tls_changes, "the value someone else set is not written again"
    assert result["concerns"]["firewall"]["changed"] and result["concerns"]["certificate"]["changed"]
    fresh = run(server_action.ActionModule, host, check_mode=True, snapshot=snapshot_of(host), **ALL_CONCERNS)
    assert fresh["changed"] is False


def test_a_host_that_keeps_changing_is_left_alone() -> None:
    host = load("tls-tls12-disabled")
    facts = snapshot_of(host)
    writes = host.counters.writes
    meddling = Meddling(
        host,
        {1: lambda: set_dword(host, TLS12, "DisabledByDefault", 0), 3: lambda: set_dword(host, TLS12, "Enabled", 2)},
    )
    result = run(tls_action.ActionModule, host, connection=meddling, snapshot=facts)
    assert result["failed"] is True
    assert "changed again" in result["msg"] and "nothing was changed" in result["msg"]
    assert host.counters.writes == writes
    assert meddling.count == 3


POLICY = "HKLM:\\SOFTWARE\\Policies\\Microsoft\\Windows NT\\Terminal Services"


def registry_values(host: t.Any, path: str) -> dict[str, t.Any]:
    data = rdplab_ops.OPS["registry.get"].func(host, {"path": path})
    return t.cast(dict[str, t.Any], data["values"])


def test_a_policy_value_that_appeared_after_the_read_stops_the_batch_and_is_not_overwritten() -> None:
    # The transport policy key exists at the read (NLA is set there by Group Policy) without SelectTransport; Group
    # Policy creates SelectTransport before the apply. A guard that only looks for the values it read (subset) lets
    # the stale plan write over it, its manifest saying "absent" (a restore would delete Group Policy's value).
    host = load("policy-nla-listener-layer")
    facts = snapshot_of(host)
    assert "SelectTransport" not in registry_values(host, POLICY)
    writes = host.counters.writes
    meddling = Meddling(host, {1: lambda: set_dword(host, POLICY, "SelectTransport", 1)})
    result = run(transport_action.ActionModule, host, connection=meddling, snapshot=facts, mode="tcp_only")
    assert not result.get("failed"), result.get("msg")
    assert "values.SelectTransport: expected nothing, found an object" in result["replanned"]
    assert any("changed since the snapshot" in warning for warning in result["warnings"])
    assert result["changed"] is False and result["changes"] == [] and host.counters.writes == writes
    assert registry_values(host, POLICY)["SelectTransport"] == {"type": "REG_DWORD", "value": 1}
    assert result["round_trips"] == meddling.count == 2  # the stopped apply batch, the new read


def test_a_group_policy_security_layer_set_after_the_read_is_reported_and_left_alone() -> None:
    host = load("policy-nla-listener-layer")
    facts = snapshot_of(host)
    meddling = Meddling(host, {1: lambda: set_dword(host, POLICY, "SecurityLayer", 0)})
    result = run(tls_action.ActionModule, host, connection=meddling, snapshot=facts)
    assert not result.get("failed"), result.get("msg")
    assert "values.SecurityLayer: expected nothing, found an object" in result["replanned"]
    # The new plan sees Group Policy's value: reported as enforced by policy, never written (no override_policy).
    assert "tls.security_layer_rdp_policy" in [item["id"] for item in result["findings"]]
    assert not any(POLICY in change and "SecurityLayer" in change for change in result["changes"])
    assert registry_values(host, POLICY)["SecurityLayer"] == {"type": "REG_DWORD", "value": 0}


def test_a_schannel_value_created_after_the_read_is_planned_for_and_recorded() -> None:
    host = load("tls-tls12-disabled")
    rdplab_ops.OPS["registry.remove"].func(host, {"path": TLS12, "name": "DisabledByDefault"})
    facts = snapshot_of(host)
    meddling = Meddling(host, {1: lambda: set_dword(host, TLS12, "DisabledByDefault", 1)})
    result = run(tls_action.ActionModule, host, connection=meddling, snapshot=facts)
    assert not result.get("failed"), result.get("msg")
    assert "values.DisabledByDefault: expected nothing, found an object" in result["replanned"]
    # The stale plan would have set Enabled only and left TLS 1.2 disabled by default; the new one sees the value,
    # changes it and records what it was.
    assert registry_values(host, TLS12)["DisabledByDefault"]["value"] == 0
    assert any("DisabledByDefault" in change and "(was 1)" in change for change in result["changes"])


@pytest.mark.parametrize("data", [["not", "an", "object"], "text", 3])
def test_a_snapshot_read_whose_data_is_not_an_object_is_refused(data: object) -> None:
    facts = snapshot_of(load("tls-tls12-disabled"))
    facts["snapshot"]["reads"][0]["data"] = data
    host = load("tls-tls12-disabled")
    result = run(tls_action.ActionModule, host, snapshot=facts)
    assert result["failed"] is True and result["msg"].startswith("Invalid arguments: snapshot:"), result["msg"]
    assert f"is {type(data).__name__}, not an object" in result["msg"] and "Traceback" not in result["msg"]
    assert host.counters.winrm_commands == 0


@pytest.mark.parametrize(
    ("snapshot", "expected"),
    [
        ("other-host", "was taken on 'healthy', not on 'tls-tls12-disabled'"),
        ("old-format", "format 0, this collection reads format 1"),
        ("not-a-snapshot", "must be the registered result of rdpfix.rdp.facts"),
        ("failed-facts", "the task that should have taken it failed on this host"),
    ],
)
def test_a_snapshot_that_cannot_be_trusted_is_refused_before_anything_is_sent(snapshot: str, expected: str) -> None:
    other = snapshot_of(load("healthy"))
    given: t.Any = {
        "other-host": other,
        "old-format": dict(other["snapshot"], format=0),
        "not-a-snapshot": {"changed": False},
        "failed-facts": {"failed": True, "msg": "unreachable"},
    }[snapshot]
    host = load("tls-tls12-disabled")
    for action in (tls_action.ActionModule, server_action.ActionModule):
        args = {"tls": {}} if action is server_action.ActionModule else {}
        result = run(action, host, snapshot=given, **args)
        assert result["failed"] is True and result["msg"].startswith("Invalid arguments: snapshot:"), result["msg"]
        assert expected in result["msg"]
    assert host.counters.winrm_commands == 0
