# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Build the command that runs one agent batch the way Ansible runs a PowerShell module.

The agent script (``_agent.ps1``) is handed to ansible-core's own module builder (``module_common.modify_module``, what
``ActionBase._execute_module`` uses through ``_configure_module``) as a PowerShell module whose only argument is the
batch. What comes out is Ansible's exec wrapper payload: the command line is the shell plugin's bootstrap (the same one
every ansible.windows module runs), standard input carries the exec wrapper, the module wrapper, the agent and the
batch, and - when the task has ``become`` - Ansible's runas wrapper with the become user and password. winrm, psrp and
ssh (with a PowerShell shell) all run that pipelined, through stdin: one ``exec_command`` per batch. See
docs/architecture.md ("How a batch reaches the host") and docs/agent-protocol.md ("Transport").

This module imports ansible-core's executor; ``_agent.py`` does not, so the batch runner stays importable where
Ansible cannot run (the local runner of the Windows CI).
"""

from __future__ import annotations

import json
import time
import typing as t
from dataclasses import dataclass, field

from ansible.errors import AnsibleError
from ansible.executor.module_common import modify_module
from ansible.plugins.loader import module_loader
from ansible.plugins.shell.powershell import ShellModule as PowerShellShell

from ._agent import AGENT_PATH, AgentError, Batch, WireCommand

# The name the wrapper gives the agent script (its manifest entry is "<fqn>.ps1"; a module outside a collection's
# plugins/modules folder is named ansible.legacy.<name> by the builder).
AGENT_MODULE_NAME = "rdpfix_agent"

# The module argument that carries the batch (the agent reads $complex_args.batch).
BATCH_ARGUMENT = "batch"

# Ansible's job folder on Windows hosts (the powershell shell plugin's async_dir default) and the module that reads a
# job's result file (what Ansible's own polling of an async task runs on Windows).
DEFAULT_ASYNC_DIR = "%USERPROFILE%\\.ansible_async"
ASYNC_STATUS = "ansible.windows.async_status"


class NotWindows(AnsibleError):
    """The connection does not reach a Windows host (its shell is not PowerShell or cmd)."""


def is_windows_shell(shell: object) -> bool:
    """Ansible's PowerShell and cmd shell plugins mark themselves with ``_IS_WINDOWS``."""
    return bool(getattr(shell, "_IS_WINDOWS", False))


def shell_name(connection: object) -> str:
    shell = getattr(connection, "_shell", None)
    return str(getattr(shell, "SHELL_FAMILY", None) or getattr(shell, "_load_name", None) or "none")


@dataclass
class ModuleWrapper:
    """Builds ``WireCommand``s for one task: its become plugin, its ``environment:``, its variables, and - for an
    ``async`` task - the async timeout and job folder (Ansible's async wrapper and watchdog then run the module as a
    background job on the host)."""

    shell: t.Any = None
    become_plugin: t.Any = None
    environment: dict[str, t.Any] = field(default_factory=dict)
    task_vars: dict[str, t.Any] = field(default_factory=dict)
    async_timeout: int = 0
    async_dir: str = DEFAULT_ASYNC_DIR

    def __call__(self, batch: Batch) -> WireCommand:
        return self.build(AGENT_MODULE_NAME, AGENT_PATH, {BATCH_ARGUMENT: batch.to_json()}, self.async_timeout)

    def async_status(self, jid: str, mode: str = "status") -> WireCommand:
        """ansible.windows.async_status for one job (what Ansible's own async polling runs), never as a job itself."""
        arguments = {"jid": jid, "mode": mode, "_async_dir": self.async_dir}
        return self.build(ASYNC_STATUS, async_status_path(), arguments, 0)

    def build(self, name: str, path: str, arguments: dict[str, t.Any], async_timeout: int) -> WireCommand:
        environment = dict(self.environment)
        if async_timeout:
            # The async wrapper takes its job folder from here (ActionBase._execute_module sets it the same way).
            environment["ANSIBLE_ASYNC_DIR"] = self.async_dir
        try:
            built = modify_module(
                module_name=name,
                module_path=path,
                module_args=arguments,
                templar=None,
                task_vars=self.task_vars,
                environment=environment,
                async_timeout=async_timeout,
                become_plugin=self.become_plugin,
            )
        except AnsibleError as exc:
            # A become method other than runas, for instance: Ansible's own message, before anything is sent.
            raise AgentError(f"the rdpfix agent cannot be sent: {exc.message}") from exc
        if built.module_style != "new" or built.shebang != "#!powershell":
            raise AgentError(f"{path} is not recognised as a PowerShell module (style {built.module_style})")
        shell = self.shell if is_windows_shell(self.shell) else PowerShellShell()
        # Pipelining: the command is the bootstrap alone, the payload goes on stdin (ActionBase._execute_module does
        # the same when the connection pipelines, which winrm, psrp and ssh to Windows always do).
        command = shell.build_module_command("", built.shebang, "").strip()
        return WireCommand(command=command, stdin=built.b_module_data)


def async_status_path() -> str:
    """Where ansible.windows.async_status.ps1 is (ansible.windows is a dependency of this collection)."""
    found = module_loader.find_plugin_with_context(ASYNC_STATUS, mod_type=".ps1")
    if not found.resolved or not found.plugin_resolved_path:
        raise AgentError(f"{ASYNC_STATUS} is not installed: async tasks need the ansible.windows collection")
    return str(found.plugin_resolved_path)


def last_json(stdout: bytes) -> dict[str, t.Any] | None:
    """The last line of a module's output that is a JSON object (None when there is none)."""
    for raw_line in reversed(stdout.decode("utf-8", errors="replace").splitlines()):
        line = raw_line.strip().lstrip("\ufeff")
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            return value if isinstance(value, dict) else None
    return None


class JobTimeout(AgentError):
    """An async job did not finish within the task's ``async`` seconds."""


class AsyncJobs:
    """A connection stand-in that runs each command as an Ansible async job and waits for it.

    ``exec_command`` sends the command (built with the async wrapper: the job starts in the background and the
    command returns at once with the job id), then polls the job's result file with ansible.windows.async_status every
    ``poll`` seconds, at most ``timeout`` seconds, removes the result file (async_status ``mode=cleanup``) and returns
    the job's result as the command's output - so ``_agent.run_batch`` parses it as it parses a direct answer, and a
    connection failure at any point goes through the same classification. The polls and cleanups it sends are counted
    in ``commands`` (the start is the batch's own round trip).
    """

    def __init__(
        self,
        connection: t.Any,
        wrapper: ModuleWrapper,
        poll: float,
        timeout: float,
        sleep: t.Callable[[float], None] = time.sleep,
    ) -> None:
        self.connection = connection
        self.wrapper = wrapper
        self.poll = poll
        self.timeout = timeout
        self.sleep = sleep
        self.commands = 0
        # The last job: (job id, result file) - the action writes its final result there (docs/architecture.md).
        self.last_job: tuple[str, str] | None = None

    @property
    def connected(self) -> t.Any:
        return getattr(self.connection, "connected", None)

    def _exec(self, wire: WireCommand, counted: bool = True) -> tuple[int, bytes, bytes]:
        self.commands += int(counted)
        rc, stdout, stderr = self.connection.exec_command(wire.command, in_data=wire.stdin, sudoable=True)
        return int(rc or 0), stdout, stderr

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        del sudoable
        # The start is the batch's own round trip (counted by the caller); polls and the cleanup are extra.
        rc, stdout, stderr = self._exec(WireCommand(command=cmd, stdin=in_data or b""), counted=False)
        started = last_json(stdout)
        if rc != 0 or not started or not started.get("ansible_job_id") or started.get("failed"):
            return rc, stdout, stderr  # the job did not start: its answer says why
        jid, results_file = str(started["ansible_job_id"]), str(started.get("results_file") or "")
        waited = 0.0
        while True:
            self.sleep(self.poll)
            waited += self.poll
            status_rc, status_out, status_err = self._exec(self.wrapper.async_status(jid))
            status = last_json(status_out)
            if status is None or (status.get("failed") and "results" not in status and not status.get("finished")):
                detail = (status or {}).get("msg") or status_err.decode("utf-8", errors="replace") or "no answer"
                raise AgentError(f"async job {jid}: async_status failed (rc={status_rc}): {str(detail)[:500]}")
            if status.get("finished") in (1, True):
                break
            if waited >= self.timeout:
                raise JobTimeout(
                    f"async job {jid} did not finish within {self.timeout:g} seconds (the task's async); its "
                    f"result file {results_file} on the host will say how it ended"
                )
        self._exec(self.wrapper.async_status(jid, mode="cleanup"))
        self.last_job = (jid, results_file)
        return (1 if status.get("failed") else 0), json.dumps(status).encode("utf-8"), b""


def wrapper_for(
    connection: object,
    task_vars: dict[str, t.Any] | None = None,
    environment: dict[str, t.Any] | None = None,
    async_timeout: int = 0,
) -> ModuleWrapper:
    """The builder for a task run over ``connection``: its shell, its become plugin when the task has become, and,
    for an async task, the timeout and the shell's ``async_dir``."""
    shell = getattr(connection, "_shell", None)
    try:
        async_dir = str(shell.get_option("async_dir")) if shell is not None else DEFAULT_ASYNC_DIR
    except (AttributeError, KeyError):
        async_dir = DEFAULT_ASYNC_DIR
    return ModuleWrapper(
        shell=shell,
        become_plugin=getattr(connection, "become", None),
        environment=dict(environment or {}),
        task_vars=dict(task_vars or {}),
        async_timeout=async_timeout,
        async_dir=async_dir or DEFAULT_ASYNC_DIR,
    )
