# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""How a batch is wrapped: Ansible's own PowerShell module exec wrapper, with the agent as the module."""

from __future__ import annotations

import base64
import json
import pkgutil
import typing as t

import pytest
from ansible.executor.powershell.module_manifest import _get_powershell_script
from ansible.plugins.loader import become_loader, shell_loader
from ansible.plugins.shell.powershell import _common_args

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _agent, _wrapper
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import AgentError, Batch

SEPARATOR = "\0\0\0\0"


def system_info() -> Batch:
    batch = Batch(on_error="continue")
    batch.add("system.info")
    return batch


def runas(user: str, password: str | None = None) -> t.Any:
    plugin = become_loader.get("runas")
    plugin.set_options(direct={"become_user": user} | ({"become_pass": password} if password else {}))
    return plugin


def parts(stdin: bytes) -> tuple[dict[str, t.Any], dict[str, t.Any]]:
    """The exec wrapper line and the exec manifest, as bootstrap_wrapper.ps1 reads them (lines, a separator)."""
    lines = stdin.decode("utf-8").split("\n")
    assert len(lines) == 3 and lines[1] == SEPARATOR
    return json.loads(lines[0]), json.loads(lines[2])


def agent_bytes() -> bytes:
    with open(_agent.AGENT_PATH, "rb") as handle:
        return handle.read()


def test_the_command_line_is_ansibles_module_bootstrap() -> None:
    wire = _wrapper.ModuleWrapper()(system_info())
    shell = shell_loader.get("powershell")
    assert wire.command == shell.build_module_command("", "#!powershell", "").strip()
    arguments = wire.command.split(" ")
    assert arguments[:-1] == [*_common_args, "-EncodedCommand"]
    script = base64.b64decode(arguments[-1]).decode("utf-16-le")
    assert "ConvertFrom-Json" in script and "$input" in script
    # The winrm connection passes it on unchanged (it is already encoded)...
    assert wire.command.startswith(shell._encode_script("", as_list=False, strict_mode=False, preserve_rc=False))
    # ...and the psrp connection recognises its own bootstrap and runs the script in the runspace.
    assert wire.command.startswith(" ".join(_common_args) + " -EncodedCommand")


def test_the_payload_is_the_exec_wrapper_then_a_manifest_carrying_the_agent_and_the_batch() -> None:
    batch = system_info()
    wire = _wrapper.ModuleWrapper()(batch)
    wrapper, manifest = parts(wire.stdin)
    assert wrapper["name"] == "exec_wrapper"
    assert wrapper["script"] == _get_powershell_script("exec_wrapper.ps1").decode("utf-8")
    # The agent's #Requires line reaches the wrapper, which checks the PowerShell version before anything runs.
    assert wrapper["params"]["MinPSVersion"] == "5.1"
    [action] = manifest["actions"]
    assert action["name"] == "module_wrapper.ps1"
    params = action["params"]
    assert params["ForModule"] is True
    assert params["Variables"] == [{"Name": "complex_args", "Value": {"batch": batch.to_json()}, "Scope": "Global"}]
    assert base64.b64decode(manifest["scripts"][params["Script"]]["script"]) == agent_bytes()


def test_the_agent_loads_no_module_utility() -> None:
    # Nothing but the module wrapper and the agent travel: no Ansible.Basic (80 KB of C# compiled on every batch).
    wire = _wrapper.ModuleWrapper()(system_info())
    _wrapper_line, manifest = parts(wire.stdin)
    params = manifest["actions"][0]["params"]
    assert sorted(manifest["scripts"]) == sorted(["module_wrapper.ps1", params["Script"]])
    assert (params["CSharpModules"], params["PowerShellModules"]) == ([], [])


def test_bytes_per_batch_are_the_wrapper_the_agent_and_the_batch() -> None:
    # docs/architecture.md states the measured sizes; this is the composition they come from.
    batch = system_info()
    wire = _wrapper.ModuleWrapper()(batch)
    wrapper, _manifest = parts(wire.stdin)
    agent_b64 = len(base64.b64encode(agent_bytes()))
    module_wrapper_b64 = len(base64.b64encode(_get_powershell_script("module_wrapper.ps1")))
    exec_wrapper = len(json.dumps(wrapper, ensure_ascii=True))
    overhead = len(wire.stdin) - agent_b64 - module_wrapper_b64 - exec_wrapper - len(json.dumps(batch.to_json()))
    # What is left: the separator, JSON punctuation and key names, the script names and the module parameters.
    assert 0 < overhead < 1024


def test_become_runas_adds_ansibles_become_wrapper_with_the_account() -> None:
    wire = _wrapper.ModuleWrapper(become_plugin=runas("SYSTEM"))(system_info())
    _wrapper_line, manifest = parts(wire.stdin)
    become, module = manifest["actions"]
    assert (become["name"], module["name"]) == ("become_wrapper.ps1", "module_wrapper.ps1")
    assert become["params"] == {"BecomeUser": "SYSTEM"}
    assert become["secure_params"] == {}
    for name in ("become_wrapper.ps1", "Ansible.Become.cs", "Ansible.AccessToken.cs", "Ansible.Process.cs"):
        assert name in manifest["scripts"]
    reference = pkgutil.get_data("ansible.module_utils.csharp", "Ansible.Become.cs")
    assert base64.b64decode(manifest["scripts"]["Ansible.Become.cs"]["script"]) == reference


def test_become_password_travels_as_a_secure_parameter() -> None:
    wire = _wrapper.ModuleWrapper(become_plugin=runas("rdpadmin", "S3cret!"))(system_info())
    _wrapper_line, manifest = parts(wire.stdin)
    assert manifest["actions"][0]["params"] == {"BecomeUser": "rdpadmin"}
    assert manifest["actions"][0]["secure_params"] == {"BecomePassword": "S3cret!"}


def test_a_become_method_windows_does_not_have_is_refused_before_sending() -> None:
    sudo = become_loader.get("sudo")
    with pytest.raises(AgentError, match="not supported by the Windows exec wrapper"):
        _wrapper.ModuleWrapper(become_plugin=sudo)(system_info())


def test_the_task_environment_reaches_the_module() -> None:
    wire = _wrapper.ModuleWrapper(environment={"RDPFIX_TRACE": "1"})(system_info())
    _wrapper_line, manifest = parts(wire.stdin)
    assert manifest["actions"][0]["params"]["Environment"] == {"RDPFIX_TRACE": "1"}


def test_windows_shells_are_recognised() -> None:
    assert _wrapper.is_windows_shell(shell_loader.get("powershell"))
    assert _wrapper.is_windows_shell(shell_loader.get("cmd"))
    assert not _wrapper.is_windows_shell(shell_loader.get("sh"))
    assert not _wrapper.is_windows_shell(None)


def test_wrapper_for_takes_the_connections_shell_and_become() -> None:
    class Connection:
        _shell = shell_loader.get("cmd")
        become = runas("SYSTEM")

    built = _wrapper.wrapper_for(Connection(), {"inventory_hostname": "web01"}, {"A": "b"})
    assert built.shell is Connection._shell
    assert built.become_plugin is Connection.become
    assert built.environment == {"A": "b"}


class _SlowJobHost:
    """A connection to a host whose job never finishes and whose every command takes ``seconds`` of wall time."""

    connected = True

    def __init__(self, clock: list[float], seconds: float) -> None:
        self.clock, self.seconds, self.commands = clock, seconds, 0

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        self.commands += 1
        self.clock[0] += self.seconds
        if self.commands == 1:
            return 0, b'{"ansible_job_id": "j1.7100", "results_file": "C:\\\\r\\\\j1.7100", "started": 1}\r\n', b""
        return 0, b'{"ansible_job_id": "j1.7100", "started": 1, "finished": 0}\r\n', b""


def test_an_async_job_is_given_up_after_the_tasks_async_seconds_of_wall_time() -> None:
    # The deadline is wall time (time.monotonic), not the sum of the sleeps between polls: slow polls count too.
    now = [100.0]
    host = _SlowJobHost(now, seconds=4)
    jobs = _wrapper.AsyncJobs(
        host, _wrapper.ModuleWrapper(), poll=1, timeout=10, sleep=lambda _s: None, clock=lambda: now[0]
    )
    with pytest.raises(_wrapper.JobTimeout, match="did not finish within 10 seconds"):
        jobs.exec_command("start", b"")
    # Started at 100 (deadline 110): polls answered at 108, 112 - the second is past the deadline.
    assert host.commands == 3 and jobs.commands == 2


def test_one_helper_reads_the_last_json_line_of_any_module_output() -> None:
    assert _wrapper.last_json is _agent.last_json
    output = b'\xef\xbb\xbfnoise\r\n{"a": 1}\r\n{not json\r\n\xef\xbb\xbf{"b": 2}\r\ntrailing text\r\n'
    assert _agent.last_json(output) == {"b": 2}
    assert _agent.last_json(output.decode("utf-8")) == {"b": 2}
    assert _agent.last_json(b"no document\r\n") is None


class _WatchdogHost:
    """A job that ends the way Ansible's async watchdog reports a failure after it started the module."""

    connected = True

    def __init__(self, message: str) -> None:
        self.message = message
        self.commands: list[bytes] = []

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        self.commands.append(in_data or b"")
        if b'"jid"' not in (in_data or b""):  # the batch itself: the job starts
            return 0, b'{"ansible_job_id": "j2.7100", "results_file": "C:\\\\r\\\\j2.7100", "started": 1}\r\n', b""
        if b"cleanup" in (in_data or b""):
            return 0, b'{"ansible_job_id": "j2.7100", "erased": "C:\\\\r\\\\j2.7100"}\r\n', b""
        status = {"ansible_job_id": "j2.7100", "started": 1, "finished": 1, "failed": True, "msg": self.message}
        return 0, (json.dumps(status) + "\r\n").encode("utf-8"), b""


@pytest.mark.parametrize(
    ("reason", "raised"),
    [
        ("timed out waiting for module completion", _wrapper.JobTimeout),
        ("No start of json char found in module result", _wrapper.JobLost),
    ],
)
def test_a_job_the_watchdog_ended_without_an_answer_is_a_write_of_unknown_outcome(reason: str, raised: type) -> None:
    host = _WatchdogHost(f"failure during async watchdog: {reason}")
    jobs = _wrapper.AsyncJobs(host, _wrapper.ModuleWrapper(), poll=0, timeout=60, sleep=lambda _s: None)
    batch = Batch(on_error="stop")
    batch.manifest_id, batch.manifest_dir = "20261203T110000Z-tls-00aa1", "C:\\ProgramData\\rdpfix\\backups\\x"
    batch.add("registry.set", path="HKLM:\\SOFTWARE\\X", name="Y", type="REG_DWORD", value=1)
    with pytest.raises(_agent.OutcomeUnknown, match="20261203T110000Z-tls-00aa1") as caught:
        _agent.run_batch(jobs, "web01", batch, _wrapper.ModuleWrapper())
    assert isinstance(caught.value.__cause__, raised) and reason in str(caught.value.__cause__)
    # The job's result file is removed all the same (async_status mode=cleanup).
    assert len(host.commands) == 3
    # A batch that only reads: the task fails with the reason, nothing was changed by it.
    read = Batch(on_error="continue")
    read.add("system.info")
    with pytest.raises(raised, match=reason):
        _agent.run_batch(jobs, "web01", read, _wrapper.ModuleWrapper())


class _BouncingHost:
    """A job that finishes; the connection drops under the first ``drops`` polls (refused: it looks like a host that
    was never reached) and is reset after each, as Ansible's own async polling does."""

    connected = True

    def __init__(self, clock: list[float], drops: int) -> None:
        self.clock, self.drops, self.resets, self.polls = clock, drops, 0, 0

    def reset(self) -> None:
        self.resets += 1

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        self.clock[0] += 1
        if b'"jid"' not in (in_data or b""):
            return 0, b'{"ansible_job_id": "j3.7100", "results_file": "C:\\\\r\\\\j3.7100", "started": 1}\r\n', b""
        if b"cleanup" in (in_data or b""):
            return 0, b'{"ansible_job_id": "j3.7100", "erased": "C:\\\\r\\\\j3.7100"}\r\n', b""
        self.polls += 1
        if self.polls <= self.drops:
            raise ConnectionRefusedError(111, "Connection refused")
        answer = {"v": 1, "results": [{"op": "registry.set", "ok": True, "data": {}}], "finished": 1}
        return 0, (json.dumps(answer) + "\r\n").encode("utf-8"), b""


def tls_write() -> Batch:
    batch = Batch(on_error="stop")
    batch.manifest_id, batch.manifest_dir = "20261203T110000Z-tls-00bb2", "C:\\ProgramData\\rdpfix\\backups\\y"
    batch.add("registry.set", path="HKLM:\\SOFTWARE\\X", name="Y", type="REG_DWORD", value=1)
    return batch


def test_a_connection_dropped_while_polling_a_job_is_retried_until_the_deadline() -> None:
    now = [0.0]
    host = _BouncingHost(now, drops=2)
    jobs = _wrapper.AsyncJobs(
        host, _wrapper.ModuleWrapper(), poll=1, timeout=60, sleep=lambda _s: None, clock=lambda: now[0]
    )
    result = _agent.run_batch(jobs, "web01", tls_write(), _wrapper.ModuleWrapper())
    assert result[0].ok and host.resets == 2 and host.polls == 3


def test_a_job_whose_polls_keep_failing_is_a_write_of_unknown_outcome_not_unreachable() -> None:
    # The job was started: a refused poll does not mean the changes were not sent.
    now = [0.0]
    host = _BouncingHost(now, drops=1000)
    jobs = _wrapper.AsyncJobs(
        host, _wrapper.ModuleWrapper(), poll=1, timeout=5, sleep=lambda _s: None, clock=lambda: now[0]
    )
    with pytest.raises(_agent.OutcomeUnknown, match="20261203T110000Z-tls-00bb2") as caught:
        _agent.run_batch(jobs, "web01", tls_write(), _wrapper.ModuleWrapper())
    assert isinstance(caught.value.__cause__, _wrapper.JobTimeout)
    assert "its last poll failed: ConnectionRefusedError" in str(caught.value.__cause__)
    # Each command takes a second: started at 0 (deadline 5), answered at 1, polls answered at 2, 3, 4 and 5.
    assert host.polls == 4 and host.resets == 4
