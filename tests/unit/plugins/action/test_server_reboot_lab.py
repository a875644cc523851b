"""rdpfix.rdp.server's ``reboot`` option against the lab's simulated hosts: after every concern ran, a change that
needs a reboot (TLS) reboots the host - only when allowed, with the sessions read right before it (check mode: from
the snapshot, no command), waiting for consent while users are on it - and the final verification follows the reboot.

The reboot itself is ansible.windows.win_reboot's action, which needs a real Ansible connection: here a stand-in
restarts the lab host as that action's commands do (rdplab.reboot.restart); the real action runs against the lab in
the system tests (tests/system/test_promises.py, test_server_role.py).
"""

from __future__ import annotations

import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")
rdplab_reboot = pytest.importorskip("rdplab.reboot")
rdplab_faults = pytest.importorskip("rdplab.model.faults")

from ansible_collections.rdpfix.rdp.plugins.action import server as server_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import tls as tls_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import AgentError, Batch  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._reboot_gate import DEFAULT_MSG  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
# Without the firewall concern, which would read the listener's port and have it probed.
CONCERNS: dict[str, dict[str, t.Any]] = {"machinekeys": {}, "certificate": {}, "tls": {}}
ALLOW = {"allow": True}


def load(name: str) -> t.Any:
    return rdplab_fleet.load_fleet([HOSTS / f"{name}.yml"])[0]


class Recorder:
    """What the task did after its batches, in order: the stand-in reboot and the probe."""

    def __init__(self, host: t.Any, reboot_result: dict[str, t.Any] | None = None) -> None:
        self.host = host
        self.steps: list[str] = []
        self.reboot_options: list[dict[str, t.Any]] = []
        self.reboot_result = reboot_result

    def reboot(self, options: dict[str, t.Any]) -> dict[str, t.Any]:
        self.steps.append("reboot")
        self.reboot_options.append(dict(options))
        if self.reboot_result is not None:
            return self.reboot_result
        rdplab_reboot.restart(self.host)
        return {"changed": True, "rebooted": True, "elapsed": 3}

    def probe(self, options: t.Any) -> dict[str, t.Any]:
        self.steps.append("probe")
        return {"connectable": True, "verdict": "ok", "summary": "RDP connects", "findings": [], "tls": {}}


def run(
    host: t.Any,
    recorder: Recorder,
    *,
    check_mode: bool = False,
    after_apply: t.Callable[[], None] | None = None,
    fail_sessions_read: bool = False,
    async_val: int = 0,
    **args: t.Any,
) -> dict[str, t.Any]:
    task = SimpleNamespace(
        args=args, check_mode=check_mode, diff=True, async_val=async_val, poll=5, action="rdpfix.rdp.server"
    )

    class Action(server_action.ActionModule):
        def reboot_host(self, options: dict[str, t.Any]) -> dict[str, t.Any]:
            return recorder.reboot(options)

        def probe(self, options: t.Any) -> dict[str, t.Any]:  # type: ignore[override]
            return recorder.probe(options)

        def send(self, batch: Batch, *, locked: bool = True) -> t.Any:
            if fail_sessions_read and [op["op"] for op in batch.ops] == ["session.list"]:
                raise AgentError(f"{host.name}: the connection dropped")
            answered = super().send(batch, locked=locked)
            if after_apply is not None and batch.writes:
                after_apply()
            return answered

    action = Action(
        task, rdplab_direct.DirectConnection(host), SimpleNamespace(remote_addr="127.0.0.2"), None, None, None
    )
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name}))


def verify() -> dict[str, t.Any]:
    return {"host": "127.0.0.1", "fallback_port": 3389}


def test_not_allowed_the_reboot_is_reported_pending_and_nothing_is_read_for_it() -> None:
    host = load("tls-tls12-disabled")
    booted = host.system.boot_time
    recorder = Recorder(host)
    result = run(host, recorder, reboot={"allow": False}, verify=verify(), **CONCERNS)
    assert not result.get("failed"), result.get("msg")
    reboot = result["reboot"]
    assert reboot["required_by"] == ["tls"] and reboot["rebooted"] is False and reboot["pending"] is True
    assert reboot["changed"] is False
    assert "reboot.allow (the role: rdpfix_server_allow_reboot=true)" in reboot["msg"]
    assert reboot["warnings"] == [reboot["msg"]]
    assert result["concerns"]["tls"]["reboot_required"] is True
    # The TLS module's own warning asking for a reboot stays (a reboot that happens removes it).
    assert tls_action.REBOOT_WARNING in result["concerns"]["tls"]["warnings"]
    assert reboot["users"] is None, "the sessions were not read"
    # The read and the apply batch; no sessions read, no reboot; the verification excused by the pending reboot.
    assert host.counters.winrm_commands == 2 == result["round_trips"]
    assert recorder.steps == ["probe"] and host.system.boot_time == booted
    assert "tls: a reboot is required" in result["verification"]["pending"]


def test_allowed_and_nobody_on_the_host_it_reboots_then_verifies() -> None:
    host = load("tls-tls12-disabled")
    booted = host.system.boot_time
    recorder = Recorder(host)
    result = run(host, recorder, reboot=ALLOW, verify=verify(), **CONCERNS)
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is True
    reboot = result["reboot"]
    assert reboot["rebooted"] is True and reboot["pending"] is False and reboot["changed"] is True
    assert reboot["elapsed"] == 3 and "warnings" not in reboot
    assert recorder.reboot_options == [
        {"allow": True, "allow_session_disruption": False, "msg": DEFAULT_MSG, "reboot_timeout": 600}
    ]
    # The probe comes after the reboot, and nothing is pending any more: it judges the host as a client meets it.
    assert recorder.steps == ["reboot", "probe"]
    assert result["verification"]["pending"] == []
    tls = result["concerns"]["tls"]
    assert tls["rebooted"] is True and tls["reboot_required"] is False
    assert tls_action.REBOOT_WARNING not in (tls.get("warnings") or [])
    # The read, the apply batch, the sessions read right before the reboot.
    assert host.counters.winrm_commands == 3 == result["round_trips"]
    assert host.system.boot_time != booted


def test_a_user_who_logs_on_after_the_read_is_seen_at_the_reboot_which_waits() -> None:
    host = load("tls-tls12-disabled")
    booted = host.system.boot_time
    recorder = Recorder(host)

    def logs_on() -> None:  # once, right after the apply batch
        if not any(session["user"] for session in host.sessions.snapshot()):
            rdplab_faults.add_session(host, {"user": "CORP\\frank", "state": "Active"})

    result = run(host, recorder, after_apply=logs_on, reboot=ALLOW, verify=verify(), **CONCERNS)
    assert not result.get("failed"), result.get("msg")
    reboot = result["reboot"]
    assert reboot["rebooted"] is False and reboot["pending"] is True
    assert "CORP\\frank" in reboot["waits_for_sessions"] and "CORP\\frank" in reboot["msg"]
    assert "rdpfix_server_allow_session_disruption=true" in reboot["warnings"][0]
    assert result["concerns"]["tls"]["reboot_waits_for_sessions"] == reboot["users"]
    assert result["concerns"]["tls"]["reboot_required"] is True
    assert recorder.steps == ["probe"] and host.system.boot_time == booted
    assert [session["user"] for session in host.sessions.snapshot() if session["user"]] == ["CORP\\frank"]


def test_with_consent_it_reboots_over_the_users_sessions() -> None:
    host = load("sessions-tls12-disabled")
    recorder = Recorder(host)
    result = run(host, recorder, reboot={"allow": True, "allow_session_disruption": True}, verify=verify(), **CONCERNS)
    assert not result.get("failed"), result.get("msg")
    assert result["reboot"]["rebooted"] is True
    assert "CORP\\alice" in result["reboot"]["users"]
    assert recorder.steps == ["reboot", "probe"]
    assert [session for session in host.sessions.snapshot() if session["user"]] == []


def test_check_mode_predicts_from_the_snapshot_with_one_command() -> None:
    waits, reboots = load("sessions-tls12-disabled"), load("tls-tls12-disabled")
    predicted = {}
    for host in (waits, reboots):
        recorder = Recorder(host)
        predicted[host.name] = run(host, recorder, check_mode=True, reboot=ALLOW, verify=verify(), **CONCERNS)
        assert recorder.steps == [], "check mode neither reboots nor probes"
        assert host.counters.winrm_commands == 1 == predicted[host.name]["round_trips"]
    # The concerns' results still say what the host needs: the summary shows "reboot required", as before a real run.
    tls = predicted["tls-tls12-disabled"]["concerns"]["tls"]
    assert tls["reboot_required"] is True and "rebooted" not in tls
    assert "CORP\\alice" in predicted["sessions-tls12-disabled"]["concerns"]["tls"]["reboot_waits_for_sessions"]
    waiting = predicted["sessions-tls12-disabled"]["reboot"]
    assert waiting["rebooted"] is False and "CORP\\alice" in waiting["waits_for_sessions"]
    rebooting = predicted["tls-tls12-disabled"]["reboot"]
    assert rebooting["rebooted"] is True and rebooting["changed"] is True and "check mode" in rebooting["msg"]
    # The real runs do what check mode said.
    for host in (waits, reboots):
        real = run(host, Recorder(host), reboot=ALLOW, verify=verify(), **CONCERNS)
        assert real["reboot"]["rebooted"] is predicted[host.name]["reboot"]["rebooted"]


def test_a_failed_reboot_fails_the_task_and_keeps_every_concerns_result() -> None:
    host = load("tls-tls12-disabled")
    recorder = Recorder(host, reboot_result={"failed": True, "msg": "Timed out waiting for last boot time check"})
    result = run(host, recorder, reboot=ALLOW, verify=verify(), **CONCERNS)
    assert result["failed"] is True and result["changed"] is True
    assert result["reboot"]["failed"] is True and result["reboot"]["pending"] is True
    assert "Timed out waiting" in result["msg"] and result["msg"] == result["reboot"]["msg"]
    assert result["concerns"]["tls"]["changed"] is True and result["concerns"]["tls"]["reboot_required"] is True
    assert "verification" not in result and recorder.steps == ["reboot"]


def test_a_reboot_that_began_and_then_timed_out_is_said_as_a_reboot() -> None:
    # win_reboot's answer when the host restarted but did not pass its test in time.
    host = load("tls-tls12-disabled")
    timed_out = {"failed": True, "changed": True, "rebooted": True, "msg": "Timed out waiting for post-reboot test"}
    recorder = Recorder(host, reboot_result=timed_out)
    result = run(host, recorder, reboot=ALLOW, verify=verify(), **CONCERNS)
    assert result["failed"] is True and result["changed"] is True
    reboot = result["reboot"]
    assert reboot["rebooted"] is True and reboot["changed"] is True and reboot["pending"] is False
    assert "the reboot began: the host restarted" in reboot["msg"] and "Timed out" in reboot["msg"]
    tls = result["concerns"]["tls"]
    assert tls["rebooted"] is True and tls["reboot_required"] is False


def test_a_host_win_reboot_cannot_reach_is_unreachable_with_every_concerns_result() -> None:
    # win_reboot's answer when its first command (before the reboot) cannot reach the host.
    host = load("tls-tls12-disabled")
    gone = {"changed": False, "unreachable": True, "rebooted": False, "msg": "tls-tls12-disabled: connection refused"}
    result = run(host, Recorder(host, reboot_result=gone), reboot=ALLOW, verify=verify(), **CONCERNS)
    assert result["unreachable"] is True and not result.get("failed")
    reboot = result["reboot"]
    assert reboot["unreachable"] is True and reboot["rebooted"] is False and reboot["pending"] is True
    assert "connection refused" in result["msg"] and "the host restarted" not in result["msg"]
    assert result["concerns"]["tls"]["changed"] is True and result["concerns"]["tls"]["reboot_required"] is True
    assert "verification" not in result


def test_sessions_that_cannot_be_read_stop_the_reboot_and_keep_every_concerns_result() -> None:
    host = load("tls-tls12-disabled")
    booted = host.system.boot_time
    recorder = Recorder(host)
    result = run(host, recorder, fail_sessions_read=True, reboot=ALLOW, verify=verify(), **CONCERNS)
    assert result["failed"] is True and result["reboot"]["failed"] is True
    assert "the sessions could not be read right before it, so it was not made" in result["msg"]
    assert "the connection dropped" in result["msg"]
    assert result["concerns"]["tls"]["changed"] is True
    assert recorder.steps == [] and host.system.boot_time == booted


def test_a_host_that_needs_no_reboot_has_no_reboot_result_and_no_extra_command() -> None:
    host = load("healthy")
    result = run(host, Recorder(host), reboot=ALLOW, verify=verify(), **CONCERNS)
    assert "reboot" not in result and host.counters.winrm_commands == 1


@pytest.mark.parametrize(
    ("reboot", "async_val", "message"),
    [
        ({"allow": True}, 60, "reboot.allow is not supported under async"),
        ({"allow": True, "reboot_timeout": 0}, 0, "reboot.reboot_timeout must be a positive number of seconds"),
        ({"allow": "perhaps"}, 0, "'allow' is of type str found in 'reboot'. and we were unable to convert to bool"),
        ({"allow": True, "msg": " "}, 0, "reboot.msg must not be empty"),
        ({"allow": True, "msg": "x" * 513}, 0, "reboot.msg is 513 characters long; Windows takes at most 512"),
    ],
)
def test_bad_reboot_options_are_refused_before_the_host_is_contacted(
    reboot: dict[str, t.Any], async_val: int, message: str
) -> None:
    host = load("tls-tls12-disabled")
    result = run(host, Recorder(host), async_val=async_val, reboot=reboot, **CONCERNS)
    assert result["failed"] is True and message in result["msg"] and result["msg"].startswith("Invalid arguments")
    assert host.counters.winrm_commands == 0


def test_report_from_shows_the_reboot_by_name() -> None:
    host = load("tls-tls12-disabled")
    result = run(host, Recorder(host), reboot={"allow": False}, **CONCERNS)
    task = SimpleNamespace(
        args={"report": "reboot", "report_from": "repaired"}, check_mode=False, diff=False, async_val=0, action="x"
    )
    shown = server_action.ActionModule(
        task, rdplab_direct.DirectConnection(host), SimpleNamespace(remote_addr="127.0.0.2"), None, None, None
    ).run(task_vars={"inventory_hostname": host.name, "repaired": result})
    assert shown["pending"] is True and shown["warnings"] == result["reboot"]["warnings"]
    assert not shown.get("failed")


class FakeLoader:
    """An action loader that hands out a stand-in for ansible.windows.win_reboot's action, recording how it is built."""

    def __init__(self, answer: t.Callable[[], dict[str, t.Any]] | None) -> None:
        self.answer = answer
        self.built: list[dict[str, t.Any]] = []

    def has_plugin(self, name: str) -> bool:
        return self.answer is not None

    def get(self, name: str, **kwargs: t.Any) -> t.Any:
        self.built.append({"name": name, **kwargs})
        if self.answer is None:
            return None
        answer = self.answer
        return SimpleNamespace(run=lambda task_vars: answer())


class CopyableTask(SimpleNamespace):
    def copy(self, exclude_parent: bool = False, exclude_tasks: bool = False) -> CopyableTask:
        return CopyableTask(**vars(self))


def reboot_through(loader: FakeLoader, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, t.Any], t.Any, CopyableTask]:
    host = load("healthy")
    task = CopyableTask(args={}, check_mode=False, diff=False, async_val=0, action="rdpfix.rdp.server")
    connection = rdplab_direct.DirectConnection(host)
    action = server_action.ActionModule(task, connection, SimpleNamespace(), None, None, None)
    # The plugin loaders an action plugin reaches through its shared loader object (ansible.plugins.loader).
    monkeypatch.setattr(action._shared_loader_obj, "action_loader", loader)
    action.task_vars, action.host = {"inventory_hostname": host.name}, host.name
    options = {"allow": True, "allow_session_disruption": False, "msg": "going down", "reboot_timeout": 900}
    return action.reboot_host(options), connection, task


def test_reboot_host_runs_win_reboots_action_on_the_tasks_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    loader = FakeLoader(lambda: {"changed": True, "rebooted": True, "elapsed": 12})
    result, connection, task = reboot_through(loader, monkeypatch)
    assert result == {"changed": True, "rebooted": True, "elapsed": 12}
    (built,) = loader.built
    assert built["name"] == "ansible.windows.win_reboot" and built["connection"] is connection
    # A copy of the task, with win_reboot's own arguments only; the task itself is left as it was.
    assert built["task"] is not task and built["task"].args == {"msg": "going down", "reboot_timeout": 900}
    assert task.args == {}


def test_reboot_host_turns_every_failure_into_a_result(monkeypatch: pytest.MonkeyPatch) -> None:
    from ansible.errors import AnsibleConnectionFailure, AnsibleError

    def broken() -> dict[str, t.Any]:
        raise AnsibleError("win_reboot could not load")

    def gone() -> dict[str, t.Any]:
        raise AnsibleConnectionFailure("connection reset")

    failed = reboot_through(FakeLoader(broken), monkeypatch)[0]
    assert failed == {"failed": True, "msg": "AnsibleError: win_reboot could not load"}
    unreachable = reboot_through(FakeLoader(gone), monkeypatch)[0]
    assert unreachable == {"unreachable": True, "msg": "healthy: connection reset"}
    missing = reboot_through(FakeLoader(None), monkeypatch)[0]
    assert missing["failed"] is True and "ansible.windows" in missing["msg"]


def test_without_ansible_windows_a_reboot_allowed_is_refused_before_the_host_is_contacted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host = load("tls-tls12-disabled")
    probe = server_action.ActionModule(
        SimpleNamespace(args={}), rdplab_direct.DirectConnection(host), SimpleNamespace(), None, None, None
    )
    # The real loader finds win_reboot here (ansible.windows is installed with the collection's requirements).
    assert probe._shared_loader_obj.action_loader.has_plugin("ansible.windows.win_reboot")
    monkeypatch.setattr(probe._shared_loader_obj, "action_loader", FakeLoader(None))
    refused = run(host, Recorder(host), reboot=ALLOW, **CONCERNS)
    assert refused["failed"] is True and refused["msg"].startswith("Invalid arguments")
    assert "reboot.allow needs ansible.windows.win_reboot" in refused["msg"]
    assert host.counters.winrm_commands == 0
    # Not allowed, the reboot needs no action: the run goes on.
    assert not run(host, Recorder(host), reboot={"allow": False}, **CONCERNS).get("failed")
