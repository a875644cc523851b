"""Manifests that say what was done, per item, against the lab's simulated hosts (DirectConnection, in-process).

- Every kind of manifest (certificate, machinekeys, firewall, tls, transport, restore) and rdpfix.rdp.server's shared
  batch: the apply batch is cut right after the first item it carries out (a terminate between two operations, as
  the lab models it). The manifest on the host says ``planned`` for what the batch carries out (it never reached its
  done-record), the host shows the first item done, and restoring every manifest newest first gives back the exact
  pre-run state (rdplab.restore_view).
- A run that completes leaves the done-record: every carried-out item ``done`` on the host and in the result.
- A restored key file regains the ACL and owner its manifest recorded.
- A batch that stopped at a failed operation is followed by the manifest written once more with what it did of each
  item (done, failed, not_run), and the restore puts back exactly the done part.
- rdpfix.rdp.machinekeys state=restored skips a move that never happened (failed, or cut before it), like
  rdpfix.rdp.restore, and puts the rest back.
"""

from __future__ import annotations

import base64
import importlib
import json
import threading
import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")
transport_faults = pytest.importorskip("rdplab.transport_faults")
restore_view = pytest.importorskip("rdplab.restore_view")

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
BACKUPS = "C:\\ProgramData\\rdpfix\\backups"
MACHINE_KEYS = "C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys"

# (host file, module, its arguments): one broken host per kind of manifest whose run carries out items.
KINDS = [
    ("expired-selfsigned", "certificate", {}),
    ("pinned-missing", "certificate", {}),
    ("firewall-rules-disabled", "firewall", {}),
    ("tls-security-layer-rdp", "tls", {}),
    ("transport-udp-vpn", "transport", {"mode": "tcp_only"}),
    ("machinekeys-rdp-key-no-ns", "machinekeys", {}),
    ("machinekeys-rdp-key-no-ns", "machinekeys", {"strategy": "regenerate"}),
]
KIND_IDS = [f"{name}-{module}-{args.get('strategy', args.get('mode', 'default'))}" for name, module, args in KINDS]


def load(name: str) -> t.Any:
    return rdplab_fleet.load_fleet([HOSTS / f"{name}.yml"])[0]


def run(host: t.Any, module: str, check_mode: bool = False, **args: t.Any) -> dict[str, t.Any]:
    plugin = importlib.import_module(f"ansible_collections.rdpfix.rdp.plugins.action.{module}")
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=True, async_val=0, action=f"rdpfix.rdp.{module}")
    connection = rdplab_direct.DirectConnection(host)
    action = plugin.ActionModule(task, connection, SimpleNamespace(remote_addr="127.0.0.2"), None, None, None)
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name}))


def state(host: t.Any) -> dict[str, t.Any]:
    return t.cast(dict[str, t.Any], restore_view.comparable(host.snapshot()))


class _Terminated(threading.Event):
    """A terminate that arrives as soon as the batch stalls: the cut costs no waiting."""

    def wait(self, timeout: float | None = None) -> bool:
        self.set()
        return True


def manifest_writes(ops: list[dict[str, t.Any]]) -> list[int]:
    """Positions of each manifest's first write (not its done-record), in batch order."""
    seen: set[str] = set()
    found: list[int] = []
    for position, item in enumerate(ops):
        path = str((item.get("args") or {}).get("path") or "").lower()
        if item.get("op") == "file.write" and path.endswith("\\manifest.json") and path not in seen:
            seen.add(path)
            found.append(position)
    return found


def arm_cut(host: t.Any, after: int = 1, manifest: int = 1) -> dict[str, t.Any]:
    """Cut the next batch that writes its ``manifest``-th manifest: the batch stops ``after`` operations past that
    manifest (1: right after the first change), as a terminate between two operations stops it."""
    original = host.run_batch
    seen: dict[str, t.Any] = {"cut_before": None}

    def run_batch(batch: dict[str, t.Any]) -> dict[str, t.Any]:
        ops = batch.get("ops") or []
        writes = manifest_writes(ops)
        if seen["cut_before"] is not None or len(writes) < manifest:
            return t.cast(dict[str, t.Any], original(batch))
        seen["cut_before"] = writes[manifest - 1] + 1 + after
        seen["ops"] = ops
        fault = transport_faults.TransportFault(kind="cut_at_op", op=seen["cut_before"], seconds=0)
        context = transport_faults.CommandContext(fault=fault, cancel=_Terminated())
        with transport_faults.running(context):
            return t.cast(dict[str, t.Any], original(batch))

    host.run_batch = run_batch
    return seen


def manifest_on_host(host: t.Any, manifest_id: str) -> dict[str, t.Any]:
    entry = host.filesystem.get(f"{BACKUPS}\\{manifest_id}\\manifest.json")
    assert entry is not None, f"no manifest {manifest_id} on the host"
    return t.cast(dict[str, t.Any], json.loads(entry.content))


def manifest_ids(host: t.Any) -> list[str]:
    listed = run(host, "restore")
    assert not listed.get("failed"), listed.get("msg")
    return [entry["id"] for entry in listed["manifests"] if "error" not in entry and not entry["restored"]]


def assert_exact(before: dict[str, t.Any], host: t.Any) -> None:
    after = state(host)
    assert after == before, "\n".join(restore_view.differences(before, after))


def assert_restored_to(before: dict[str, t.Any], host: t.Any) -> None:
    """Restore every manifest not restored yet, newest first (as the list gives them): the host is ``before``."""
    host.filesystem.faults.clear()
    for manifest_id in manifest_ids(host):
        restored = run(host, "restore", manifest_id=manifest_id)
        assert not restored.get("failed"), restored.get("msg")
    assert_exact(before, host)


@pytest.mark.parametrize(("name", "module", "args"), KINDS, ids=KIND_IDS)
def test_a_batch_cut_after_its_first_item_is_restored_exactly(name: str, module: str, args: dict[str, t.Any]) -> None:
    host = load(name)
    original = state(host)
    cut = arm_cut(host)
    result = run(host, module, **args)
    assert cut["cut_before"] is not None, "the apply batch was never sent"
    assert result.get("failed") or result.get("unreachable"), result
    [manifest_id] = manifest_ids(host)
    manifest = manifest_on_host(host, manifest_id)
    carried = [item for item in manifest["items"] if "status" in item]
    # The batch never reached its done-record: what it carries out is only planned, and says so.
    assert manifest["v"] == 2 and carried and {item["status"] for item in carried} == {"planned"}
    # ... and the first item was done: the host is not as it was.
    assert state(host) != original
    assert_restored_to(original, host)


@pytest.mark.parametrize(("name", "module", "args"), KINDS[2:5], ids=KIND_IDS[2:5])
def test_a_complete_run_leaves_its_done_record(name: str, module: str, args: dict[str, t.Any]) -> None:
    host = load(name)
    result = run(host, module, **args)
    assert not result.get("failed") and result["changed"], result.get("msg")
    manifest = manifest_on_host(host, result["backup"]["manifest_id"])
    statuses = [item.get("status") for item in manifest["items"]]
    assert manifest["v"] == 2 and statuses and set(statuses) == {"done"}
    assert [item.get("status") for item in result["backup"]["items"]] == statuses


def test_a_restore_cut_after_its_first_item_is_undone_exactly() -> None:
    host = load("firewall-rules-disabled")
    original = state(host)
    fixed_id = run(host, "firewall")["backup"]["manifest_id"]
    fixed = state(host)
    cut = arm_cut(host)
    stopped = run(host, "restore", manifest_id=fixed_id)
    assert cut["cut_before"] is not None and (stopped.get("failed") or stopped.get("unreachable")), stopped
    [restore_id] = [manifest_id for manifest_id in manifest_ids(host) if manifest_id != fixed_id]
    manifest = manifest_on_host(host, restore_id)
    assert {item["status"] for item in manifest["items"] if "status" in item} == {"planned"}
    assert state(host) not in (original, fixed)
    # Newest first: the cut restore is undone (the host as the fix left it), then the fix (as before it).
    first = run(host, "restore", manifest_id=restore_id)
    assert not first.get("failed"), first.get("msg")
    assert_exact(fixed, host)
    assert_restored_to(original, host)


def test_a_shared_batch_cut_inside_its_second_concern_is_restored_exactly() -> None:
    host = load("combined-firewall-tls-expired")
    original = state(host)
    facts = run(host, "facts", gather_events=False)
    cut = arm_cut(host, manifest=2)
    result = run(host, "server", snapshot=facts, certificate={}, firewall={}, tls={})
    assert cut["cut_before"] is not None and (result.get("failed") or result.get("unreachable")), result
    concerns = {
        json.loads(base64.b64decode(cut["ops"][position]["args"]["content_b64"]))["id"]: position
        for position in manifest_writes(cut["ops"])
    }
    first, second, *rest = concerns
    # The first concern's changes ran to their end: its done-record says so. The second stopped after its first item.
    assert {item["status"] for item in manifest_on_host(host, first)["items"] if "status" in item} == {"done"}
    assert {item["status"] for item in manifest_on_host(host, second)["items"] if "status" in item} == {"planned"}
    assert all(host.filesystem.get(f"{BACKUPS}\\{later}\\manifest.json") is None for later in rest)
    assert_restored_to(original, host)


def test_a_restored_key_file_regains_its_recorded_acl_and_owner() -> None:
    host = load("expired-selfsigned")
    result = run(host, "certificate")
    assert not result.get("failed"), result.get("msg")
    [key] = [item for item in result["backup"]["items"] if item["kind"] == "private_key_file"]
    assert key["sddl"] and key["owner"]
    path = key["source"]
    recorded = host.filesystem.get(path).sddl
    assert recorded == key["sddl"]
    # Someone takes the key file over and locks NETWORK SERVICE out: owner Administrators, Administrators only.
    host.filesystem.set_sddl(path, "O:BAG:BAD:P(A;;FA;;;BA)")
    restored = run(host, "restore", manifest_id=result["backup"]["manifest_id"])
    assert not restored.get("failed"), restored.get("msg")
    assert host.filesystem.get(path).sddl == key["sddl"]
    stat = host.run_batch({"v": 1, "ops": [{"op": "file.stat", "args": {"path": path}}]})["results"][0]["data"]
    assert (stat["sddl"], stat["owner"]) == (key["sddl"], key["owner"])


@pytest.mark.parametrize("how", ["move-failed", "cut-before-move"])
def test_machinekeys_restored_skips_a_move_that_never_happened(how: str) -> None:
    host = load("machinekeys-rdp-key-no-ns")
    original = state(host)
    if how == "move-failed":
        host.filesystem.add_fault(MACHINE_KEYS, "AccessDenied")
    else:
        arm_cut(host, after=0)
    failed = run(host, "machinekeys", strategy="regenerate")
    assert failed.get("failed") or failed.get("unreachable"), failed
    host.filesystem.faults.clear()
    [manifest_id] = manifest_ids(host)
    manifest = manifest_on_host(host, manifest_id)
    # A failed move is recorded as failed (the manifest written again after the batch stopped); a cut batch could not
    # record anything after the cut: planned, judged on the host.
    expected = "failed" if how == "move-failed" else "planned"
    assert [item["status"] for item in manifest["items"] if item["kind"] == "key_moved"] == [expected]
    restored = run(host, "machinekeys", state="restored", manifest_id=manifest_id)
    assert not restored.get("failed"), restored.get("msg")
    assert any("was not moved" in warning for warning in restored.get("warnings", [])), restored.get("warnings")
    assert "an earlier restore" not in str(restored)
    assert_exact(original, host)


def test_a_failed_change_is_recorded_on_the_host_and_only_what_was_done_comes_back() -> None:
    # A restore of a certificate run: it removes the certificate Windows created (done), then cannot give the key
    # file its temporary ACL (AccessDenied on MachineKeys): the batch stops there.
    host = load("expired-selfsigned")
    original = state(host)
    fixed_id = run(host, "certificate")["backup"]["manifest_id"]
    host.filesystem.add_fault(MACHINE_KEYS, "AccessDenied")
    stopped = run(host, "restore", manifest_id=fixed_id)
    assert stopped["failed"] is True and stopped["changed"] is True, stopped
    [backup] = stopped["backup"]
    statuses = [item.get("status") for item in backup["items"]]
    assert "done" in statuses and "failed" in statuses, statuses
    # The manifest on the host was written again after the batch stopped: the same statuses as the result.
    manifest = manifest_on_host(host, backup["manifest_id"])
    assert [item.get("status") for item in manifest["items"]] == statuses
    assert stopped["round_trips"] == 4  # discovery, state, the apply batch, the manifest written again
    assert_restored_to(original, host)


def test_a_concern_that_fails_in_the_shared_batch_is_restored_exactly() -> None:
    # rdpfix.rdp.server: the key store's ACL write is refused; the firewall's operations, after it in the shared batch,
    # are skipped. The key store writes its manifest again with each item's status (one more round trip) before the
    # task names the module that failed: the key store, not the firewall that failed only because it was skipped.
    # Its result and the manifest on the host give the same statuses, and a restore gives the host back exactly.
    host = load("combined-machinekeys-firewall")
    original = state(host)
    facts = run(host, "facts", gather_events=False)
    host.filesystem.add_fault(MACHINE_KEYS, "AccessDenied")
    result = run(host, "server", snapshot=facts, machinekeys={}, firewall={})
    assert result["failed"] is True and result["failed_concern"] == "machinekeys", result.get("failed_concern")
    # The shared apply batch, then the key store's manifest written again (the firewall sent nothing more).
    assert result["round_trips"] == 2
    assert [result["concerns"][name]["round_trips"] for name in ("machinekeys", "firewall")] == [2, 1]
    backup = result["concerns"]["machinekeys"]["backup"]
    statuses = [item.get("status") for item in backup["items"]]
    assert statuses[0] == "failed" and statuses[1:] and set(statuses[1:]) == {"not_run"}, statuses
    recorded = [item.get("status") for item in manifest_on_host(host, backup["manifest_id"])["items"]]
    assert recorded == statuses
    assert manifest_ids(host) == [backup["manifest_id"]]
    assert_restored_to(original, host)
