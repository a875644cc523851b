"""rdpfix.rdp.machinekeys against simulated hosts (DirectConnection): every strategy, idempotence, restore, refusals."""

from __future__ import annotations

import copy
import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest

from ansible_collections.rdpfix.rdp.plugins.action.machinekeys import ActionModule
from rdplab.direct import DirectConnection
from rdplab.model.host import WindowsHost

HOSTS = Path(__file__).resolve().parents[1] / "lab" / "hosts"
MACHINE_KEYS = "C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys"
BACKUPS = "C:\\ProgramData\\rdpfix"
RDP_PREFIX = "f686aace6942fb7f7ceb231212eef4a4_"
FAULTS = ["machinekeys-folder-acl", "machinekeys-rdp-key-no-ns", "machinekeys-rdp-key-empty"]


def load(name: str) -> WindowsHost:
    return WindowsHost.from_file(HOSTS / f"{name}.yml")


def run(host: WindowsHost, check_mode: bool = False, **args: t.Any) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=True, async_val=0, action="rdpfix.rdp.machinekeys")
    action = ActionModule(task, DirectConnection(host), SimpleNamespace(remote_addr="127.0.0.9"), None, None, None)
    return action.run(task_vars={"inventory_hostname": host.name})


def comparable(snapshot: dict[str, t.Any]) -> dict[str, t.Any]:
    """The host state minus what a run legitimately adds: its backups, the event log, the counters."""
    state = copy.deepcopy(snapshot)
    state["files"]["entries"] = {
        path: entry for path, entry in state["files"]["entries"].items() if not path.lower().startswith(BACKUPS.lower())
    }
    for volatile in ("events", "counters"):
        state.pop(volatile, None)
    return state


def other_keys(host: WindowsHost) -> dict[str, tuple[str, str]]:
    """Every key file that is not the RDP key: name -> (sha256, sddl)."""
    return {
        entry.path.rsplit("\\", 1)[-1]: (entry.sha256, entry.sddl)
        for entry in host.filesystem.children(MACHINE_KEYS)
        if not entry.path.rsplit("\\", 1)[-1].startswith(RDP_PREFIX)
    }


def test_healthy_host_costs_one_command_and_changes_nothing() -> None:
    host = load("healthy")
    before = host.snapshot()
    result = run(host)
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is False
    assert result["round_trips"] == 1
    assert host.counters.winrm_commands == 1 and host.counters.writes == 0
    assert [item for item in result["findings"] if item["severity"] in ("critical", "warning")] == []
    assert comparable(host.snapshot()) == comparable(before)


@pytest.mark.parametrize("name", FAULTS)
def test_check_mode_reports_and_changes_nothing(name: str) -> None:
    host = load(name)
    before = host.snapshot()
    result = run(host, check_mode=True, strategy="regenerate")
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is True
    assert result["findings"] and all(item["id"].startswith("machinekeys.") for item in result["findings"])
    assert host.counters.writes == 0
    assert result["diff"]["before"] != result["diff"]["after"]
    assert comparable(host.snapshot()) == comparable(before)


CASES = [
    ("machinekeys-folder-acl", "permissions"),
    ("machinekeys-folder-acl", "regenerate"),
    ("machinekeys-folder-acl", "rename_store"),
    ("machinekeys-rdp-key-no-ns", "permissions"),
    ("machinekeys-rdp-key-no-ns", "regenerate"),
    ("machinekeys-rdp-key-no-ns", "rename_store"),
    ("machinekeys-rdp-key-empty", "regenerate"),
    ("machinekeys-rdp-key-empty", "rename_store"),
]


@pytest.mark.parametrize(("name", "strategy"), CASES)
def test_strategy_repairs_keeps_other_keys_and_restores_exactly(name: str, strategy: str) -> None:
    host = load(name)
    original = host.snapshot()
    keys_before = other_keys(host)
    was_broken = host.rdp_view(connect=False).failure is not None

    result = run(host, strategy=strategy)
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is True
    # Healthy: the RDP endpoint completes its handshake, the folder ACL is the default, nothing left to fix.
    assert host.rdp_view(connect=False).failure is None
    assert host.filesystem.get(MACHINE_KEYS).sddl == "O:SYG:SYD:PAI(A;;0x12019f;;;WD)(A;;FA;;;BA)"
    # Every other key file is still there, byte-identical, with its own ACL (no NETWORK SERVICE grant on it).
    assert other_keys(host) == keys_before
    manifest_id = result["backup"]["manifest_id"]
    kinds = {item["kind"] for item in result["backup"]["items"]}
    assert kinds & {"acl", "key_moved", "store_moved"}
    if strategy == "rename_store":
        assert "store_moved" in kinds
        assert host.filesystem.exists(f"{result['backup']['path']}\\MachineKeys")
    if was_broken and strategy == "regenerate":
        assert "key_moved" in kinds

    writes = host.counters.writes
    second = run(host, strategy=strategy)
    assert not second.get("failed"), second.get("msg")
    assert second["changed"] is False and second["round_trips"] == 1
    assert host.counters.writes == writes

    restored = run(host, state="restored", manifest_id=manifest_id)
    assert not restored.get("failed"), restored.get("msg")
    assert restored["changed"] is True
    after_restore = comparable(host.snapshot())
    expected = comparable(original)
    if name == "machinekeys-rdp-key-empty":
        # certutil -repairstore cannot re-link an empty key file: the certificate comes back without its key link.
        for state in (after_restore, expected):
            for entry in state["certificates"]["Remote Desktop"]:
                entry.pop("has_private_key")
                entry.pop("key_path")
    assert after_restore == expected
    assert host.rdp_view(connect=False).failure == original_failure(name)

    again = run(host, state="restored", manifest_id=manifest_id)
    assert again["changed"] is False and not again.get("failed")


def original_failure(name: str) -> str | None:
    return load(name).rdp_view(connect=False).failure


def test_permissions_refuses_an_empty_key_without_touching_anything() -> None:
    host = load("machinekeys-rdp-key-empty")
    before = host.snapshot()
    result = run(host)
    assert result["failed"] is True
    assert "strategy=regenerate" in result["msg"] and "nothing was changed" in result["msg"]
    assert host.counters.writes == 0
    assert comparable(host.snapshot()) == comparable(before)


@pytest.mark.parametrize("error", ["DiskFull", "AccessDenied"])
@pytest.mark.parametrize("strategy", ["permissions", "regenerate", "rename_store"])
def test_backup_that_cannot_be_written_changes_nothing(error: str, strategy: str) -> None:
    host = load("machinekeys-rdp-key-no-ns")
    host.inject_fault("fail_writes_under", {"path": BACKUPS, "error": error})
    before = host.snapshot()
    result = run(host, strategy=strategy)
    assert result["failed"] is True
    assert "nothing was changed" in result["msg"] and error in result["msg"]
    assert comparable(host.snapshot()) == comparable(before)


def test_bad_input_fails_before_the_host_is_touched() -> None:
    host = load("healthy")
    for args in (
        {"strategy": "delete_everything"},
        {"state": "restored"},
        {"state": "restored", "manifest_id": "..\\x"},
    ):
        result = run(host, **args)
        assert result["failed"] is True and result["msg"].startswith("Invalid arguments")
    assert host.counters.winrm_commands == 0
