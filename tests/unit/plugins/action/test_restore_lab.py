"""rdpfix.rdp.restore against the lab's simulated hosts, through DirectConnection.

For the manifest of every fixing module: fix a broken host, then restore, and the host is exactly as before the fix
(compared like tests/system/test_machinekeys_lab.py: everything but the backups, the event log and the counters). A
second restore changes nothing, check mode writes nothing, the list shows the manifests, and the restore's own manifest
undoes the restore.
"""

from __future__ import annotations

import copy
import importlib
import json
import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
BACKUPS = "C:\\ProgramData\\rdpfix"

# (host file, fixing module, its arguments): one broken host per kind of manifest.
CASES = [
    ("expired-selfsigned", "certificate", {}),  # removed certificate + key file copy; Windows created a new one
    ("missing-selfsigned", "certificate", {}),  # no item at all: only the certificate Windows created
    ("pinned-missing", "certificate", {}),  # the pinned value (registry) and a SessionEnv restart
    ("firewall-rules-disabled", "firewall", {}),  # changed rules
    ("firewall-moved-port", "firewall", {}),  # rules the run created
    ("transport-udp-vpn", "transport", {"mode": "tcp_only"}),
    ("tls-security-layer-rdp", "tls", {}),
    ("machinekeys-rdp-key-no-ns", "machinekeys", {}),  # ACLs
    ("machinekeys-rdp-key-no-ns", "machinekeys", {"strategy": "regenerate"}),  # moved key, removed certificate
    ("machinekeys-folder-acl", "machinekeys", {"strategy": "rename_store"}),  # the whole store moved
]
IDS = [f"{name}-{module}-{args.get('strategy', args.get('mode', 'default'))}" for name, module, args in CASES]


def load(name: str) -> t.Any:
    path = HOSTS / f"{name}.yml"
    if not path.exists():
        pytest.skip(f"lab host file {path.name} not available")
    return rdplab_fleet.load_fleet([path])[0]


def run(host: t.Any, module: str = "restore", check_mode: bool = False, **args: t.Any) -> dict[str, t.Any]:
    plugin = importlib.import_module(f"ansible_collections.rdpfix.rdp.plugins.action.{module}")
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=True, async_val=0, action=f"rdpfix.rdp.{module}")
    connection = rdplab_direct.DirectConnection(host)
    action = plugin.ActionModule(task, connection, SimpleNamespace(remote_addr="127.0.0.2"), None, None, None)
    result: dict[str, t.Any] = action.run(task_vars={"inventory_hostname": host.name})
    return result


def comparable(host: t.Any) -> dict[str, t.Any]:
    """The host state minus what a run legitimately adds: its backups, the event log, the counters."""
    state = copy.deepcopy(host.snapshot())
    state["files"]["entries"] = {
        path: entry for path, entry in state["files"]["entries"].items() if not path.lower().startswith(BACKUPS.lower())
    }
    for volatile in ("events", "counters"):
        state.pop(volatile, None)
    return t.cast(dict[str, t.Any], state)


def counted(host: t.Any) -> tuple[int, int]:
    return host.counters.winrm_commands, host.counters.writes


def fix(host: t.Any, module: str, args: dict[str, t.Any]) -> str:
    result = run(host, module, **args)
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is True and result["backup"], result
    return str(result["backup"]["manifest_id"])


@pytest.mark.parametrize(("name", "module", "args"), CASES, ids=IDS)
def test_restore_puts_the_host_back_exactly(name: str, module: str, args: dict[str, t.Any]) -> None:
    host = load(name)
    original = comparable(host)
    manifest_id = fix(host, module, args)
    fixed = comparable(host)
    assert fixed != original

    # The list: one read of every manifest folder with its files; nothing written.
    commands, writes = counted(host)
    listed = run(host)
    assert not listed.get("failed"), listed.get("msg")
    assert listed["changed"] is False and listed["round_trips"] == 1
    assert counted(host) == (commands + 1, writes)
    [entry] = listed["manifests"]
    assert entry["id"] == manifest_id and entry["module"] == f"rdpfix.rdp.{module}"
    assert entry["restored"] is False and entry["actions"]

    # Check mode: what would come back, before and after; zero writes.
    commands, writes = counted(host)
    planned = run(host, check_mode=True, manifest_id=manifest_id)
    assert not planned.get("failed"), planned.get("msg")
    assert planned["changed"] is True and planned["round_trips"] == 2
    assert counted(host) == (commands + 2, writes)
    assert planned["actions"] and {action["status"] for action in planned["actions"]} == {"planned"}
    assert planned["diff"]["before"][manifest_id] != planned["diff"]["after"][manifest_id]
    assert comparable(host) == fixed

    # The restore: read manifests, read state, apply; the host is as it was before the fix.
    commands, _writes = counted(host)
    restored = run(host, manifest_id=manifest_id)
    assert not restored.get("failed"), restored.get("msg")
    assert restored["changed"] is True and restored["round_trips"] == 3
    assert host.counters.winrm_commands == commands + 3
    assert [item["status"] for item in restored["manifests"]] == ["restored"]
    assert comparable(host) == original
    assert host.rdp_view(connect=False).failure == load(name).rdp_view(connect=False).failure
    [backup] = restored["backup"]
    assert backup["manifest_id"].split("-")[1] == "restore"

    # A second restore is a no-op: one read, no write.
    commands, writes = counted(host)
    again = run(host, manifest_id=manifest_id)
    assert not again.get("failed"), again.get("msg")
    assert again["changed"] is False and again["round_trips"] == 1
    assert counted(host) == (commands + 1, writes)
    assert [item["status"] for item in again["manifests"]] == ["already_restored"]

    # The list shows both manifests, the original restored by the new one.
    listed = run(host)
    by_id = {item["id"]: item for item in listed["manifests"]}
    assert by_id[manifest_id]["restored"] is True
    assert by_id[manifest_id]["restored_by"] == backup["manifest_id"]
    assert by_id[backup["manifest_id"]]["restores"] == manifest_id

    # The restore is itself restorable: undoing it gives the fixed host back, and the original can be restored again.
    undone = run(host, manifest_id=backup["manifest_id"])
    assert not undone.get("failed"), undone.get("msg")
    assert undone["changed"] is True
    assert comparable(host) == fixed
    if name == "machinekeys-folder-acl":
        # machinekeys' restore moves the saved store back into place: the restore's own manifest holds it now.
        return
    redone = run(host, manifest_id=manifest_id)
    assert not redone.get("failed"), redone.get("msg")
    assert redone["changed"] is True
    assert comparable(host) == original


def test_several_manifests_are_restored_newest_first_one_command_each() -> None:
    host = load("combined-firewall-tls-expired")
    original = comparable(host)
    ids = [fix(host, "certificate", {}), fix(host, "firewall", {})]
    commands, _writes = counted(host)
    restored = run(host, manifest_id=ids)
    assert not restored.get("failed"), restored.get("msg")
    assert restored["round_trips"] == 2 + len(ids)
    assert host.counters.winrm_commands == commands + 2 + len(ids)
    assert comparable(host) == original
    # Newest first: the firewall run's restore manifest was written before the certificate run's.
    written = [backup["manifest_id"] for backup in restored["backup"]]
    assert written == sorted(written)
    assert restored["actions"][0]["manifest_id"] == ids[1]

    undone = run(host, manifest_id=written)
    assert not undone.get("failed"), undone.get("msg")
    assert undone["changed"] is True
    assert run(host, "certificate")["changed"] is False
    assert run(host, "firewall")["changed"] is False


def test_a_registry_key_the_run_created_stays_empty() -> None:
    """The known limit: values come back exactly, a key the run created remains (the agent cannot remove keys)."""
    host = load("tls-tls12-disabled")
    original = comparable(host)
    manifest_id = fix(host, "tls", {})
    restored = run(host, manifest_id=manifest_id)
    assert not restored.get("failed"), restored.get("msg")
    assert restored["reboot_required"] is True
    after = comparable(host)
    left = {key: values for key, values in after["registry"].items() if key not in original["registry"]}
    assert left == {"HKLM:\\SOFTWARE\\rdpfix": {}, "HKLM:\\SOFTWARE\\rdpfix\\rdp": {}}
    for key in left:
        del after["registry"][key]
    assert after == original


def test_a_pin_restart_that_would_end_sessions_waits() -> None:
    host = load("pinned-missing")
    original = comparable(host)
    manifest_id = fix(host, "certificate", {})
    host.sessions.add("CORP\\alice", "Active")
    writes = host.counters.writes
    pending = run(host, manifest_id=manifest_id, restart_service="TermService")
    assert not pending.get("failed"), pending.get("msg")
    assert pending["changed"] is False and pending["restart_pending"] is True
    assert host.counters.writes == writes
    assert any("CORP\\alice" in warning for warning in pending["warnings"])
    assert [item["status"] for item in pending["manifests"]] == ["pending"]

    kept = run(host, manifest_id=manifest_id)  # SessionEnv: the session stays
    assert not kept.get("failed"), kept.get("msg")
    assert kept["changed"] is True
    assert any(session["user"] == "CORP\\alice" for session in host.snapshot()["sessions"])
    snapshot = comparable(host)
    snapshot["sessions"] = original["sessions"]
    assert snapshot == original


def test_a_malformed_id_is_refused_before_the_host_is_contacted() -> None:
    host = load("healthy")
    result = run(host, manifest_id="..\\..\\Windows\\System32")
    assert result["failed"] is True and "is not a manifest id" in result["msg"]
    assert counted(host) == (0, 0) and result["round_trips"] == 0


def test_an_unknown_id_fails_naming_the_host_and_changes_nothing() -> None:
    host = load("healthy")
    before = comparable(host)
    result = run(host, manifest_id="20261125T103000Z-certificate-1a2b")
    assert result["failed"] is True
    assert result["msg"].startswith(f"{host.name}: there is no backup manifest 20261125T103000Z-certificate-1a2b")
    assert "nothing was changed" in result["msg"] and "Traceback" not in result["msg"]
    assert counted(host) == (1, 0)
    assert comparable(host) == before


def test_an_empty_host_lists_nothing_in_one_command() -> None:
    host = load("healthy")
    result = run(host)
    assert not result.get("failed"), result.get("msg")
    assert result == {
        "changed": False,
        "backup_root": "C:\\ProgramData\\rdpfix\\backups",
        "manifests": [],
        "round_trips": 1,
    }
    assert counted(host) == (1, 0)


def test_a_backup_that_cannot_be_written_changes_nothing() -> None:
    host = load("transport-udp-vpn")
    manifest_id = fix(host, "transport", {"mode": "tcp_only"})
    host.filesystem.add_fault(BACKUPS + "\\backups", "DiskFull")
    fixed = comparable(host)
    writes = host.counters.writes
    result = run(host, manifest_id=manifest_id)
    assert result["failed"] is True
    assert "the backup could not be written" in result["msg"] and "nothing of" in result["msg"]
    assert host.counters.writes == writes
    assert comparable(host) == fixed


def test_a_restore_that_stops_part_way_is_undone_from_its_own_manifest() -> None:
    host = load("expired-selfsigned")
    original = comparable(host)
    manifest_id = fix(host, "certificate", {})
    fixed = comparable(host)
    # The key file cannot be written back (its temporary ACL first): the new certificate is already removed (after
    # its backup) when that fails.
    host.filesystem.add_fault("C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys", "AccessDenied")
    stopped = run(host, manifest_id=manifest_id)
    assert stopped["failed"] is True and stopped["changed"] is True
    assert f"restoring {manifest_id} stopped: acl.set failed: AccessDenied" in stopped["msg"]
    [backup] = stopped["backup"]
    assert backup["manifest_id"] in stopped["msg"]
    assert [item["status"] for item in stopped["manifests"]] == ["failed"]

    host.filesystem.faults.clear()
    undone = run(host, manifest_id=backup["manifest_id"])
    assert not undone.get("failed"), undone.get("msg")
    assert comparable(host) == fixed
    # The original was never marked restored: it can be restored now.
    restored = run(host, manifest_id=manifest_id)
    assert not restored.get("failed"), restored.get("msg")
    assert comparable(host) == original


def test_a_manifest_whose_key_move_failed_restores_what_was_done() -> None:
    # The manifest is written before the key file is moved aside; the move then fails. Nothing of the item was done:
    # the module's result says failed, and so does the manifest on the host (written again after the failed batch),
    # and the restore puts back the rest instead of refusing with a reason that never happened ("an earlier restore
    # put it back").
    host = load("machinekeys-rdp-key-no-ns")
    original = comparable(host)
    host.filesystem.add_fault("C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys", "AccessDenied")
    failed = run(host, "machinekeys", strategy="regenerate")
    assert failed["failed"] is True, failed
    manifest_id = failed["backup"]["manifest_id"]
    [item] = [entry for entry in failed["backup"]["items"] if entry["kind"] == "key_moved"]
    assert item["status"] == "failed"
    on_host = json.loads(host.filesystem.get(f"{BACKUPS}\\backups\\{manifest_id}\\manifest.json").content)
    assert on_host["v"] == 2
    assert [entry["status"] for entry in on_host["items"] if entry["kind"] == "key_moved"] == ["failed"]
    host.filesystem.faults.clear()
    restored = run(host, manifest_id=[manifest_id])
    assert not restored.get("failed"), restored.get("msg")
    assert "an earlier restore" not in str(restored)
    assert any("was not moved" in warning for warning in restored.get("warnings", [])), restored.get("warnings")
    assert comparable(host) == original
