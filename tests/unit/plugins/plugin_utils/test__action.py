"""RdpfixAction: argument validation before the connection, error mapping, round-trip counting, result assembly."""

from __future__ import annotations

import json
import typing as t
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from ansible.errors import AnsibleConnectionFailure
from ansible.plugins.loader import become_loader, shell_loader

from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import (
    COMMON_ARGUMENT_SPEC,
    SESSION_ARGUMENT_SPEC,
    ActionFailed,
    BackupSet,
    RdpfixAction,
    backup_root,
    new_manifest_id,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch


def batch_of(stdin: bytes) -> dict[str, t.Any]:
    """The batch inside Ansible's module wrapper payload: the module argument ``batch`` of module_wrapper.ps1."""
    manifest = json.loads(stdin.decode("utf-8").split("\n")[2])
    module = manifest["actions"][-1]["params"]
    return t.cast(dict[str, t.Any], json.loads(module["Variables"][0]["Value"]["batch"]))


class EchoConnection:
    """Answers every operation with ok, or with an error for the op named in ``fail``; or raises ``exc``."""

    def __init__(self, fail: str | None = None, exc: Exception | None = None) -> None:
        self.fail = fail
        self.exc = exc
        self.commands = 0

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        self.commands += 1
        if self.exc is not None:
            raise self.exc
        batch = batch_of(in_data or b"")
        results = [
            {"op": item["op"], "ok": False, "error": {"type": "AccessDenied", "message": "no"}}
            if item["op"] == self.fail
            else {"op": item["op"], "ok": True, "data": {"hostname": "WEB01"}}
            for item in batch["ops"]
        ]
        return 0, json.dumps({"v": 1, "results": results}).encode(), b""


class Sample(RdpfixAction):
    MODULE_NAME = "sample"
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {
        **COMMON_ARGUMENT_SPEC,
        **SESSION_ARGUMENT_SPEC,
        "batches": {"type": "int", "default": 1},
        "mode": {"type": "str", "choices": ["ok", "fail", "strict"], "default": "ok"},
    }

    def validate_params(self, params: dict[str, t.Any]) -> None:
        if params["batches"] < 0:
            raise ActionFailed("batches must not be negative")

    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        for _batch in range(params["batches"]):
            batch = Batch(on_error="continue")
            batch.add("system.info")
            result = self.run_batch(batch)
            if params["mode"] == "strict":
                result.raise_for_errors()
        self.warn("careful")
        self.warn("careful")
        if params["mode"] == "fail":
            raise ActionFailed("it broke", manifest_id="X")
        return {"changed": True, "diff": {"before": {}, "after": {}}, "check": self.check_mode, "host": self.host}


def run(
    connection: t.Any, check_mode: bool = False, diff: bool = False, async_val: int = 0, **args: t.Any
) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=diff, async_val=async_val, action="rdpfix.rdp.sample")
    return Sample(task, connection, SimpleNamespace(remote_addr="127.0.0.9"), None, None, None).run(
        task_vars={"inventory_hostname": "web07"}
    )


def test_success_counts_round_trips_and_keeps_diff_only_in_diff_mode() -> None:
    connection = EchoConnection()
    result = run(connection, batches=3)
    assert result["round_trips"] == connection.commands == 3
    assert result["changed"] is True and result["host"] == "web07"
    assert result["warnings"] == ["careful"]
    assert "diff" not in result
    assert "diff" in run(EchoConnection(), diff=True)


def test_check_mode_flag_reaches_the_task() -> None:
    assert run(EchoConnection(), check_mode=True)["check"] is True


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({"batches": "many"}, "batches"),
        ({"mode": "loud"}, "mode"),
        ({"surprise": True}, "surprise"),
        ({"batches": -1}, "must not be negative"),
        ({"allow_session_disruption": "perhaps"}, "allow_session_disruption"),
    ],
)
def test_invalid_arguments_fail_without_touching_the_connection(args: t.Any, fragment: t.Any) -> None:
    connection = EchoConnection()
    result = run(connection, **args)
    assert result["failed"] is True and fragment in result["msg"]
    assert result["msg"].startswith("Invalid arguments")
    assert connection.commands == 0 and result["round_trips"] == 0


def test_action_failed_keeps_its_result_keys() -> None:
    result = run(EchoConnection(), mode="fail")
    assert result == {
        "changed": False,
        "failed": True,
        "msg": "it broke",
        "manifest_id": "X",
        "round_trips": 1,
        "warnings": ["careful"],
    }


def test_operation_error_names_host_and_operation() -> None:
    result = run(EchoConnection(fail="system.info"), mode="strict")
    assert result["failed"] is True
    assert result["msg"].startswith("system.info failed on web07: AccessDenied")
    assert result["failed_operation"] == "system.info"


def test_connection_failure_is_unreachable() -> None:
    result = run(EchoConnection(exc=AnsibleConnectionFailure("timed out")))
    assert result["unreachable"] is True and "web07" in result["msg"] and "timed out" in result["msg"]


def test_transport_exception_is_unreachable() -> None:
    result = run(EchoConnection(exc=ConnectionResetError("reset by peer")))
    assert result["unreachable"] is True and "reset by peer" in result["msg"]


def test_async_is_refused() -> None:
    connection = EchoConnection()
    result = run(connection, async_val=10)
    assert result["failed"] is True and "async" in result["msg"] and connection.commands == 0


def test_manifest_id_and_backup_root() -> None:
    moment = datetime(2026, 11, 25, 10, 30, 0, tzinfo=UTC)
    assert new_manifest_id("certificate", moment, "1a2b") == "20261125T103000Z-certificate-1a2b"
    assert backup_root({}, "D:\\ProgramData") == "D:\\ProgramData\\rdpfix\\backups"
    assert backup_root({"backup_root": "E:\\keep"}, "D:\\ProgramData") == "E:\\keep"


def test_backup_set_orders_backup_before_manifest() -> None:
    backup = BackupSet.create("sample", "WEB07", "C:\\b", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    batch = Batch()
    backup.begin(batch)
    backup.save_content(batch, "a.bin", b"\x00\x01", "blob", origin="x")
    backup.save_file_copy(batch, "C:\\key", "k.key", "private_key_file")
    backup.record("registry_value", path="HKLM:\\X", name="Y", previous=None)
    backup.finish(batch)
    assert [item["op"] for item in batch.ops] == ["dir.create", "file.write", "file.copy", "file.write"]
    assert backup.summary()["items"] == [
        {"kind": "blob", "file": "a.bin", "origin": "x"},
        {"kind": "private_key_file", "file": "k.key", "source": "C:\\key"},
        {"kind": "registry_value", "path": "HKLM:\\X", "name": "Y", "previous": None},
    ]
    assert backup.manifest()["created"] == "2026-01-02T03:04:05Z"


# --- how the batches reach the host: become, delegation, async ----------------------------------------------------


class WindowsEcho(EchoConnection):
    """EchoConnection with what Ansible's Windows connections carry: a PowerShell shell and maybe a become plugin."""

    def __init__(self, become: t.Any = None, shell: str = "powershell") -> None:
        super().__init__()
        self._shell = shell_loader.get(shell)
        self.become = become
        self.sent: list[tuple[str, bytes, bool]] = []

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        self.sent.append((cmd, in_data or b"", sudoable))
        return super().exec_command(cmd, in_data, sudoable)


def run_task(connection: t.Any, task_vars: dict[str, t.Any], **task: t.Any) -> dict[str, t.Any]:
    fields = {"args": {"batches": 2}, "check_mode": False, "diff": False, "async_val": 0, "action": "rdpfix.rdp.sample"}
    action = Sample(SimpleNamespace(**(fields | task)), connection, SimpleNamespace(remote_addr="x"), None, None, None)
    return action.run(task_vars=task_vars)


def test_become_rides_in_each_batch_and_costs_no_extra_command() -> None:
    runas = become_loader.get("runas")
    runas.set_options(direct={"become_user": "SYSTEM"})
    connection = WindowsEcho(become=runas)
    result = run_task(connection, {"inventory_hostname": "web07"})
    assert result["round_trips"] == len(connection.sent) == 2
    for command, stdin, sudoable in connection.sent:
        manifest = json.loads(stdin.decode("utf-8").split("\n")[2])
        assert [item["name"] for item in manifest["actions"]] == ["become_wrapper.ps1", "module_wrapper.ps1"]
        assert manifest["actions"][0]["params"]["BecomeUser"] == "SYSTEM"
        assert command == connection._shell.build_module_command("", "#!powershell", "").strip()
        assert sudoable is True


def test_delegation_to_a_host_without_a_windows_shell_is_refused_before_anything_is_sent() -> None:
    connection = WindowsEcho(shell="sh")
    task_vars = {
        "inventory_hostname": "web07",
        "ansible_delegated_vars": {"localhost": {"inventory_hostname": "localhost"}},
    }
    result = run_task(connection, task_vars, delegate_to="localhost")
    assert result["failed"] is True
    assert "runs on Windows hosts only" in result["msg"]
    assert "localhost is reached with the 'sh' shell" in result["msg"]
    assert (connection.sent, result["round_trips"]) == ([], 0)


def test_results_of_a_delegated_task_name_the_host_contacted() -> None:
    connection = WindowsEcho()
    task_vars = {"inventory_hostname": "web07", "ansible_delegated_vars": {"jump01": {"inventory_hostname": "jump01"}}}
    result = run_task(connection, task_vars, delegate_to="jump01")
    assert result["host"] == "jump01"
    assert len(connection.sent) == result["round_trips"] == 2


def test_fire_and_forget_async_is_refused_with_the_reason_before_anything_is_sent() -> None:
    connection = WindowsEcho()
    result = run_task(connection, {"inventory_hostname": "web07"}, async_val=60)
    assert result["failed"] is True
    assert result["msg"].startswith("rdpfix.rdp.sample does not support async with poll: 0: it decides on the")
    assert (connection.sent, result["round_trips"]) == ([], 0)
