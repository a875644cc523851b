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

from ._agent import AGENT_PATH, AgentError, Batch, WireCommand, last_json

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


# How Ansible's async watchdog (async_watchdog.ps1) reports a failure once it has started the module: "failure during
# async watchdog: <reason>", with no module result. Its timeout: it stopped the module wherever it was.
WATCHDOG_FAILURE = "failure during async watchdog"
WATCHDOG_TIMEOUT = "timed out waiting for module completion"


class JobLost(AgentError):
    """An async job ended without its module's answer (Ansible's watchdog failed after starting the module - its
    output could not be read, for instance): what its batch did on the host is not known. Not a refusal, so a write
    batch that ends this way is reported as outcome unknown, with its manifest (``_agent.transport_failure``)."""


class JobTimeout(JobLost):
    """An async job did not finish within the task's ``async`` seconds (the controller stopped waiting, or Ansible's
    watchdog stopped the module)."""


class AsyncJobs:
    """A connection stand-in that runs each command as an Ansible async job and waits for it.

    ``exec_command`` sends the command (built with the async wrapper: the job starts in the background and the
    command returns at once with the job id), then polls the job's result file with ansible.windows.async_status every
    ``poll`` seconds until ``timeout`` seconds (wall time) have passed, removes the result file (async_status
    ``mode=cleanup``) and returns the job's result as the command's output - so ``_agent.run_batch`` parses it as it
    parses a direct answer, and a connection failure at any point goes through the same classification. A job that
    ran out of time (the controller's deadline, or Ansible's watchdog) raises JobTimeout. A cleanup that fails once
    the result is in hand is a warning (``warn``), not a failure. The polls and cleanups it sends are counted in
    ``commands`` (the start is the batch's own round trip).
    """

    def __init__(
        self,
        connection: t.Any,
        wrapper: ModuleWrapper,
        poll: float,
        timeout: float,
        *,
        sleep: t.Callable[[float], None] = time.sleep,
        clock: t.Callable[[], float] = time.monotonic,
        warn: t.Callable[[str], None] | None = None,
    ) -> None:
        self.connection = connection
        self.wrapper = wrapper
        self.poll = poll
        self.timeout = timeout
        self.sleep = sleep
        self.clock = clock
        self.warn = warn
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
        return self.run_job(WireCommand(command=cmd, stdin=in_data or b""))

    def run_job(self, wire: WireCommand, cleanup: bool = True) -> tuple[int, bytes, bytes]:
        """Start ``wire`` as a job and wait for it; ``cleanup=False`` leaves its result file on the host."""
        # The start is the batch's own round trip (counted by the caller); polls and the cleanup are extra.
        deadline = self.clock() + self.timeout
        rc, stdout, stderr = self._exec(wire, counted=False)
        started = last_json(stdout)
        if rc != 0 or not started or not started.get("ansible_job_id") or started.get("failed"):
            return rc, stdout, stderr  # the job did not start: its answer says why
        jid, results_file = str(started["ansible_job_id"]), str(started.get("results_file") or "")
        problem: str | None = None
        finished: dict[str, t.Any] | None = None
        while finished is None:
            self.sleep(self.poll)
            polled = self._poll(jid)
            if isinstance(polled, str):
                # As Ansible's own polling does: a connection failure while polling (a network bounce) is retried
                # on a new connection until the deadline; the job runs on regardless.
                problem = polled
            else:
                problem = None
                status_rc, status_out, status_err = polled
                status = last_json(status_out)
                if status is None or (status.get("failed") and "results" not in status and not status.get("finished")):
                    detail = (status or {}).get("msg") or status_err.decode("utf-8", errors="replace") or "no answer"
                    raise AgentError(f"async job {jid}: async_status failed (rc={status_rc}): {str(detail)[:500]}")
                if status.get("finished") in (1, True):
                    finished = status
                    break
            if self.clock() >= deadline:
                break
        if finished is None:
            # Raised outside any handler: the failure is the job's, sent and started, whatever broke the polls.
            polls = f"; its last poll failed: {problem}" if problem is not None else ""
            raise JobTimeout(
                f"async job {jid} did not finish within {self.timeout:g} seconds (the task's async), as far as the "
                f"controller could see{polls}; its result file {results_file} on the host will say how it ended"
            )
        status = finished
        message = str(status.get("msg") or "")
        if status.get("failed") and "results" not in status and message.startswith(WATCHDOG_FAILURE):
            # The watchdog had started the module: its changes may be made in full, in part or not at all.
            self._cleanup(jid, results_file)
            if WATCHDOG_TIMEOUT in message:
                raise JobTimeout(
                    f"async job {jid}: Ansible's async watchdog stopped it after {self.timeout:g} seconds (the "
                    f"task's async) before it answered ({message[:300]})"
                )
            raise JobLost(f"async job {jid}: it ended without the module's answer ({message[:300]})")
        self.last_job = (jid, results_file)
        if cleanup:
            self._cleanup(jid, results_file)
        return (1 if status.get("failed") else 0), json.dumps(status).encode("utf-8"), b""

    def _poll(self, jid: str) -> tuple[int, bytes, bytes] | str:
        """One async_status poll: its answer, or what broke the connection (which is then reset)."""
        try:
            return self._exec(self.wrapper.async_status(jid))
        except Exception as exc:  # the connection's own failures and requests/pywinrm/pypsrp transport errors
            problem = f"{type(exc).__name__}: {exc}"[:300]
        reset = getattr(self.connection, "reset", None)
        if callable(reset):
            try:
                reset()
            except Exception as exc:  # the next poll fails and says it again
                problem += f" (reconnecting failed: {type(exc).__name__}: {exc})"[:300]
        return problem

    def _cleanup(self, jid: str, results_file: str) -> None:
        """Remove a finished job's result file; the result is in hand, so a failure here only leaves the file."""
        try:
            rc, stdout, stderr = self._exec(self.wrapper.async_status(jid, mode="cleanup"))
        except Exception as exc:  # any failure of the connection: the job's result is already known
            problem = f"{type(exc).__name__}: {exc}"
        else:
            answer = last_json(stdout)
            if rc == 0 and answer is not None and not answer.get("failed"):
                return
            problem = str((answer or {}).get("msg") or stderr.decode("utf-8", errors="replace").strip() or f"rc={rc}")
        if self.warn is not None:
            self.warn(
                f"async job {jid}: its result file {results_file or '(unknown)'} could not be removed from the host "
                f"({problem[:300]}); the job's result was received and is used"
            )


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
