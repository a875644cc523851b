"""Guards at the write and the run lock, through the real action plugins against lab hosts: the host changes between a
module's read and its apply batch (a late logon, another run, a stopped service), two runs at once, another run's
lock (docs/agent-protocol.md, "Guards" and "The run lock")."""

from __future__ import annotations

import json
import threading
import typing as t
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")

from ansible_collections.rdpfix.rdp.plugins.action.certificate import ActionModule  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
BACKUPS = "C:\\ProgramData\\rdpfix\\backups"
LOCK_FILE = "C:\\ProgramData\\rdpfix\\run.lock"


class Between(rdplab_direct.DirectConnection):  # type: ignore[misc]
    """A connection that runs ``after_read`` once its first command (the module's read) has been answered."""

    def __init__(self, host: t.Any, after_read: Callable[[], None] | None) -> None:
        super().__init__(host)
        self.after_read = after_read

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        answer: tuple[int, bytes, bytes] = super().exec_command(cmd, in_data, sudoable)
        if self.after_read is not None:
            hook, self.after_read = self.after_read, None
            hook()
        return answer


def load(name: str) -> t.Any:
    return rdplab_fleet.load_fleet([HOSTS / f"{name}.yml"])[0]


def run(host: t.Any, after_read: Callable[[], None] | None = None, **args: t.Any) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=False, diff=False, async_val=0, action="rdpfix.rdp.certificate")
    action = ActionModule(task, Between(host, after_read), SimpleNamespace(remote_addr="127.0.0.2"), None, None, None)
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name}))


def manifests(host: t.Any) -> list[str]:
    return [entry.path for entry in host.filesystem.children(BACKUPS)] if host.filesystem.exists(BACKUPS) else []


def rdp_store(host: t.Any) -> list[dict[str, t.Any]]:
    certificates: list[dict[str, t.Any]] = host.snapshot()["certificates"]["Remote Desktop"]
    return certificates


def test_a_user_who_logs_on_between_read_and_apply_is_not_disconnected() -> None:
    host = load("expired-selfsigned")
    before = rdp_store(host)

    def logon() -> None:
        host.inject_fault("add_session", {"user": "CORP\\late", "state": "Active"})

    result = run(host, logon, restart_service="TermService")
    # The apply batch's guard saw the session and stopped before its first write; the module read again, and its
    # session gate holds the restart back exactly as it does when the user is there at the read.
    assert result.get("failed") is not True and result["changed"] is False, result.get("msg")
    assert result["restart_pending"] is True
    assert [action["status"] for action in result["actions"]] == ["pending", "pending"]
    assert any("CORP\\late (Active). Nothing was changed" in warning for warning in result["warnings"])
    assert any("changed since it was read" in warning for warning in result["warnings"]), result.get("warnings")
    assert [s["state"] for s in host.sessions.snapshot() if s["user"] == "CORP\\late"] == ["Active"]
    assert rdp_store(host) == before and manifests(host) == []
    assert result["round_trips"] == 3  # read, the guarded apply (stopped), read again
    assert not host.filesystem.exists(LOCK_FILE)


def test_a_certificate_another_run_replaced_between_read_and_apply_is_left_alone() -> None:
    host = load("expired-selfsigned")
    other: dict[str, t.Any] = {}

    def another_run() -> None:
        other.update(run(host))

    result = run(host, another_run)
    assert other["changed"] is True and result.get("failed") is not True, result.get("msg")
    # The other run regenerated the certificate; this one found its plan stale and, planning again, nothing to do.
    assert result["changed"] is False and result["compliant"] is True
    assert any("changed since it was read" in warning for warning in result["warnings"])
    [current] = rdp_store(host)
    assert current["key_usable"] is True and current["has_private_key"] is True
    assert len(manifests(host)) == 1


def test_a_service_stopped_between_read_and_apply_keeps_the_certificate_windows_could_not_regenerate() -> None:
    host = load("expired-selfsigned")
    before = rdp_store(host)

    def stop_certprop() -> None:
        host.inject_fault("stop_service", {"name": "CertPropSvc"})

    result = run(host, stop_certprop)
    assert result["changed"] is False
    assert any(item["id"] == "certificate.regeneration_blocked" for item in result["findings"])
    assert rdp_store(host) == before and manifests(host) == []


def test_two_runs_at_once_on_one_host_change_it_once() -> None:
    host = load("expired-selfsigned")
    both_read = threading.Barrier(2, timeout=30)
    results: list[dict[str, t.Any]] = []

    def wait_for_the_other_read() -> None:
        both_read.wait()

    def one_run() -> None:
        results.append(run(host, wait_for_the_other_read))

    threads = [threading.Thread(target=one_run) for _twice in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 2
    assert sorted(bool(result["changed"]) for result in results) == [False, True], [r.get("msg") for r in results]
    assert not any(result.get("failed") for result in results), [r.get("msg") for r in results]
    [current] = rdp_store(host)
    assert current["key_usable"] is True
    assert len(manifests(host)) == 1
    assert not host.filesystem.exists(LOCK_FILE)


def test_another_runs_lock_fails_the_host_clearly_and_changes_nothing() -> None:
    host = load("expired-selfsigned")
    owner = {"controller": "ctl02", "pid": 31337, "user": "awx", "module": "rdpfix.rdp.machinekeys", "run": "job-9"}
    host.inject_fault("hold_run_lock", {"seconds": 600, "owner": owner, "token": "job-9"})
    before = rdp_store(host)
    result = run(host)
    assert result["failed"] is True
    assert "another rdpfix run holds this host's run lock" in result["msg"]
    assert "run job-9 of rdpfix.rdp.machinekeys from ctl02 (pid 31337, user awx)" in result["msg"]
    assert "nothing was changed" in result["msg"]
    assert rdp_store(host) == before and manifests(host) == []
    # A stale lock (that run's agent process is gone: its batch was cut) does not hold the next run up.
    host.inject_fault("hold_run_lock", {"seconds": 600, "owner": owner, "token": "job-9", "alive": False})
    host.other_agent_processes.clear()
    again = run(host)
    assert again["changed"] is True, again.get("msg")
    assert any("took over the rdpfix run lock" in warning for warning in again["warnings"])
    assert not host.filesystem.exists(LOCK_FILE)


def test_a_lock_left_by_a_stopped_batch_does_not_hold_the_rerun_although_its_psrp_process_lives_on() -> None:
    # Under psrp the agent runs in the runspace pool's host process (wsmprovhost.exe), alive for the whole
    # connection: a batch stopped before its release leaves a record naming a live process. The rerun must not wait
    # out the lock and fail naming its own controller: the stopped batch's handle on the file is closed.
    host_model = pytest.importorskip("rdplab.model.host")
    host = load("expired-selfsigned")
    pool = host.open_host_process()
    host.inject_fault("hold_run_lock", {"seconds": 600, "alive": False, "token": "cut-run"})
    record = json.loads(host.filesystem.get(LOCK_FILE).content)
    record["process"] = pool
    host.filesystem.get(LOCK_FILE).content = json.dumps(record).encode()
    assert host.agent_process_alive(pool)
    with host_model.hosted_by(pool):
        result = run(host)
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is True
    assert any("took over the rdpfix run lock left by run other-run" in warning for warning in result["warnings"])
    assert not host.filesystem.exists(LOCK_FILE)


def test_a_lock_a_standard_user_planted_is_taken_over_and_the_folder_closed_with_warnings() -> None:
    faults = pytest.importorskip("rdplab.model.faults")
    host = load("expired-selfsigned")
    host.inject_fault("plant_run_lock", {})
    result = run(host)
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is True
    warnings = " ".join(result["warnings"])
    assert f"which was owned by {faults.STANDARD_USER_SID}, not SYSTEM or Administrators" in warnings
    assert "let others than SYSTEM and Administrators create or change files in it (S-1-5-32-545)" in warnings
    assert "it now has the protected SYSTEM/Administrators DACL" in warnings
    with pytest.raises(Exception, match="Access to the path"):
        host.inject_fault("plant_run_lock", {})


def test_a_planted_lock_held_open_fails_the_run_naming_the_files_owner() -> None:
    faults = pytest.importorskip("rdplab.model.faults")
    host = load("expired-selfsigned")
    host.inject_fault("plant_run_lock", {"held_open": True})
    before = rdp_store(host)
    result = run(host)
    assert result["failed"] is True
    assert f"is owned by {faults.STANDARD_USER_SID}, not SYSTEM or Administrators" in result["msg"]
    assert "nothing was changed" in result["msg"]
    assert rdp_store(host) == before and manifests(host) == []
