"""What an async task returns when things go wrong, through the action plugins driven in-process against the lab
(DirectConnection; each batch an Ansible async job the lab runs in the background, with the watchdog's timeout):

- ansible-core polls every async result that is not ``failed`` (task_executor): an unreachable result is failed too,
  and a run that sent no batch still returns a job holding its result;
- a write batch stopped by Ansible's async watchdog is an unknown outcome, naming its manifest;
- a lost answer while handing the result over, or a failed cleanup of a job's file, keeps the module's result;
- a plan made anew keeps the warnings about what happened on the host (a run lock taken over).
"""

from __future__ import annotations

import json
import typing as t
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from ansible.plugins.shell.powershell import ShellModule

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")
rdplab_bootstrap = pytest.importorskip("rdplab.bootstrap")
rdplab_client = pytest.importorskip("rdplab.ansible_client")

from ansible_collections.rdpfix.rdp.plugins.action import certificate as certificate_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import facts as facts_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import firewall as firewall_action  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
BACKUPS = "C:\\ProgramData\\rdpfix\\backups"
POLL = 0.05


def load(name: str) -> t.Any:
    return rdplab_fleet.load_fleet([HOSTS / f"{name}.yml"])[0]


def is_job(stdin: bytes) -> bool:
    return b"async_wrapper.ps1" in stdin


def is_cleanup(stdin: bytes) -> bool:
    return b'"mode": "cleanup"' in stdin or b'"mode":"cleanup"' in stdin


def is_handover(stdin: bytes) -> bool:
    """The plain (not a job) agent batch writing the task's result into a job's result file."""
    return not is_job(stdin) and b"file.write" in stdin and b".ansible_async" in stdin


class Faulty(rdplab_direct.DirectConnection):  # type: ignore[misc]
    """A DirectConnection whose answer to the first command ``fails`` picks is lost (the command ran)."""

    def __init__(self, host: t.Any, fails: Callable[[bytes], bool] | None = None) -> None:
        super().__init__(host)
        self.fails = fails
        self.lost: list[bytes] = []

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        answer: tuple[int, bytes, bytes] = super().exec_command(cmd, in_data, sudoable)
        if self.fails is not None and self.fails(in_data or b""):
            self.fails = None
            self.lost.append(in_data or b"")
            raise ConnectionResetError(104, "Connection reset by peer")
        return answer


class Refused:
    """A host nothing answers on: every command is refused before it starts."""

    _shell = ShellModule()
    become = None
    connected = False

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        raise ConnectionRefusedError(111, "Connection refused")


def run(
    module: t.Any,
    host: t.Any,
    connection: t.Any = None,
    *,
    async_val: int = 30,
    check_mode: bool = False,
    **args: t.Any,
) -> tuple[dict[str, t.Any], t.Any]:
    connection = connection if connection is not None else Faulty(host)
    task = SimpleNamespace(
        args=args,
        check_mode=check_mode,
        diff=False,
        async_val=async_val,
        poll=POLL if async_val else 0,
        action=f"rdpfix.rdp.{module.__name__.rsplit('.', 1)[-1]}",
    )
    action = module.ActionModule(task, connection, SimpleNamespace(remote_addr="127.0.0.2"), None, None, None)
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name})), connection


def handed_over(host: t.Any, result: dict[str, t.Any]) -> dict[str, t.Any]:
    """What Ansible's own polling after the task reads (ansible.windows.async_status on the host)."""
    assert set(result) == {"ansible_job_id", "results_file", "started", "finished", "changed"}, result
    status = rdplab_bootstrap.execute(host, *rdplab_client.async_status_command(result["ansible_job_id"]))
    return t.cast(dict[str, t.Any], json.loads(status.stdout))


def manifests(host: t.Any) -> list[str]:
    if not host.filesystem.exists(BACKUPS):
        return []
    return [entry.path.rsplit("\\", 1)[-1] for entry in host.filesystem.children(BACKUPS)]


def test_an_unreachable_async_result_is_failed_so_ansible_does_not_poll_it() -> None:
    host = load("healthy")
    result, _connection = run(facts_action, host, Refused())
    # Without failed, ansible-core would poll it and report "No job id was returned by the async task" instead.
    assert result["unreachable"] is True and result["failed"] is True
    assert "ansible_job_id" not in result
    assert result["msg"].startswith(f"{host.name}: ")


def test_an_async_run_that_sends_no_batch_still_hands_its_result_over_in_a_job() -> None:
    host = load("healthy")
    facts, _connection = run(facts_action, host, async_val=0, gather_events=False)
    synchronous, _connection = run(firewall_action, host, async_val=0, check_mode=True, snapshot=facts)
    assert synchronous["round_trips"] == 0 and synchronous["changed"] is False
    before = host.counters.winrm_commands
    result, connection = run(firewall_action, host, check_mode=True, snapshot=facts)
    handed = handed_over(host, result)
    assert handed["finished"] == 1 and handed["changed"] is False and not handed.get("failed")
    assert handed["findings"] == synchronous["findings"]
    # One empty batch ran as a job to give the result a file: its start, its polls, then the result written.
    sent = [stdin for _command, stdin in connection.wire]
    assert [is_job(stdin) for stdin in sent].count(True) == 1 and is_job(sent[0])
    assert is_handover(sent[-1]) and not any(is_cleanup(stdin) for stdin in sent)
    assert handed["round_trips"] == len(sent) == host.counters.winrm_commands - before


def test_a_write_batch_stopped_by_the_async_watchdog_is_an_unknown_outcome_naming_its_manifest() -> None:
    host = load("firewall-rules-disabled")
    planned, _connection = run(firewall_action, load("firewall-rules-disabled"), async_val=0)
    assert planned["changed"] is True, planned.get("msg")
    # The read is the first job; the apply batch (the second) stalls after its manifest and first change, and the
    # watchdog stops it once the task's async second has passed.
    host.inject_fault("transport", {"kind": "cut_at_op", "skip": 1, "op": 6, "seconds": 30})
    result, _connection = run(firewall_action, host, async_val=1)
    assert result["failed"] is True, result
    [manifest_id] = manifests(host)
    # Not "the agent failed": the host was read again, and the manifest says what the cut batch did.
    assert result["msg"].startswith(f"{host.name}: the answer to the changes was lost (async job ")
    assert "async watchdog stopped it" in result["msg"] and manifest_id in result["msg"]
    assert result["outcome"] == "partial" and result["backup"]["manifest_id"] == manifest_id


def test_a_lost_answer_to_the_handover_keeps_the_modules_result() -> None:
    host = load("expired-selfsigned")
    result, connection = run(certificate_action, host, Faulty(host, is_handover), allow_session_disruption=True)
    assert len(connection.lost) == 1
    # The module's own result, not a job Ansible would poll (its file may not hold the result) nor "outcome unknown".
    assert "ansible_job_id" not in result and result["failed"] is True
    assert result["changed"] is True and result["backup"]["manifest_id"] in manifests(host)
    assert result["actions"] and result["findings"]
    assert "could not be handed over to Ansible's async polling" in result["msg"]
    assert any("could not be handed over" in warning for warning in result["warnings"])
    assert "outcome unknown" not in result["msg"]


def test_a_failed_cleanup_of_a_finished_job_is_a_warning() -> None:
    host = load("healthy")
    result, connection = run(facts_action, host, Faulty(host, is_cleanup), gather_events=False)
    assert len(connection.lost) == 1
    handed = handed_over(host, result)
    assert not handed.get("failed") and "unreachable" not in handed, handed.get("msg")
    assert handed["snapshot"]
    assert any("could not be removed from the host" in warning for warning in handed["warnings"])


def test_a_plan_made_anew_keeps_the_warning_about_the_run_lock_it_took_over() -> None:
    host = load("expired-selfsigned")
    owner = {"controller": "ctl02", "pid": 31337, "user": "awx", "module": "rdpfix.rdp.tls", "run": "job-9"}

    class AnotherRunMeanwhile(Faulty):
        """After the module's read: another run repairs the certificate, and a run lock is left by a cut run."""

        def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> t.Any:
            answer = super().exec_command(cmd, in_data, sudoable)
            if len(self.wire) == 1:
                other, _connection = run(certificate_action, host, async_val=0)
                assert other["changed"] is True, other.get("msg")
                host.inject_fault("hold_run_lock", {"seconds": 600, "owner": owner, "token": "job-9", "alive": False})
            return answer

    result, _connection = run(certificate_action, host, AnotherRunMeanwhile(host), async_val=0)
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is False
    warnings = result["warnings"]
    assert any("changed since it was read" in warning for warning in warnings), warnings
    assert any("took over the rdpfix run lock" in warning and "job-9" in warning for warning in warnings), warnings
