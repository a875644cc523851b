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

import typing as t
from dataclasses import dataclass, field

from ansible.errors import AnsibleError
from ansible.executor.module_common import modify_module
from ansible.plugins.shell.powershell import ShellModule as PowerShellShell

from ._agent import AGENT_PATH, AgentError, Batch, WireCommand

# The name the wrapper gives the agent script (its manifest entry is "<fqn>.ps1"; a module outside a collection's
# plugins/modules folder is named ansible.legacy.<name> by the builder).
AGENT_MODULE_NAME = "rdpfix_agent"

# The module argument that carries the batch (the agent reads $complex_args.batch).
BATCH_ARGUMENT = "batch"


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
    """Builds ``WireCommand``s for one task: its become plugin, its ``environment:``, its variables."""

    shell: t.Any = None
    become_plugin: t.Any = None
    environment: dict[str, t.Any] = field(default_factory=dict)
    task_vars: dict[str, t.Any] = field(default_factory=dict)

    def __call__(self, batch: Batch) -> WireCommand:
        try:
            built = modify_module(
                module_name=AGENT_MODULE_NAME,
                module_path=AGENT_PATH,
                module_args={BATCH_ARGUMENT: batch.to_json()},
                templar=None,
                task_vars=self.task_vars,
                environment=dict(self.environment),
                become_plugin=self.become_plugin,
            )
        except AnsibleError as exc:
            # A become method other than runas, for instance: Ansible's own message, before anything is sent.
            raise AgentError(f"the rdpfix agent cannot be sent: {exc.message}") from exc
        if built.module_style != "new" or built.shebang != "#!powershell":
            raise AgentError(f"{AGENT_PATH} is not recognised as a PowerShell module (style {built.module_style})")
        shell = self.shell if is_windows_shell(self.shell) else PowerShellShell()
        # Pipelining: the command is the bootstrap alone, the payload goes on stdin (ActionBase._execute_module does
        # the same when the connection pipelines, which winrm, psrp and ssh to Windows always do).
        command = shell.build_module_command("", built.shebang, "").strip()
        return WireCommand(command=command, stdin=built.b_module_data)


def wrapper_for(
    connection: object, task_vars: dict[str, t.Any] | None = None, environment: dict[str, t.Any] | None = None
) -> ModuleWrapper:
    """The builder for a task run over ``connection``: its shell, and its become plugin when the task has become."""
    return ModuleWrapper(
        shell=getattr(connection, "_shell", None),
        become_plugin=getattr(connection, "become", None),
        environment=dict(environment or {}),
        task_vars=dict(task_vars or {}),
    )
