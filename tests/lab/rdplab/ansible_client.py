"""The client side of Ansible's PowerShell module path, for the lab's own tests.

The collection's action plugins build their commands with ``plugins/plugin_utils/_wrapper.py``; the lab's transport
tests, which run without the collection's package, build the same command here from an agent file of their choice
with the same ansible-core function (``module_common.modify_module``), optionally with the runas become plugin.
"""

from __future__ import annotations

import json
import typing as t
from pathlib import Path

from ansible.executor.module_common import modify_module
from ansible.plugins.loader import become_loader, module_loader
from ansible.plugins.shell.powershell import ShellModule

from rdplab.bootstrap import AGENT_SOURCE


def runas(user: str, password: str | None = None) -> t.Any:
    """Ansible's runas become plugin, set up as ``become_user`` / ``become_password`` would set it."""
    plugin = become_loader.get("runas")
    options: dict[str, t.Any] = {"become_user": user}
    if password is not None:
        options["become_pass"] = password
    plugin.set_options(direct=options)
    return plugin


def module_command(
    batch: dict[str, t.Any] | str,
    *,
    agent: Path | None = None,
    become: t.Any = None,
    environment: dict[str, str] | None = None,
) -> tuple[str, bytes]:
    """(command line, stdin) that run ``agent`` (default: the collection's _agent.ps1) as a module with the batch."""
    text = batch if isinstance(batch, str) else json.dumps(batch, separators=(",", ":"))
    built = modify_module(
        module_name="rdpfix_agent",
        module_path=str(agent or AGENT_SOURCE.path()),
        module_args={"batch": text},
        templar=None,
        task_vars={},
        environment=dict(environment or {}),
        become_plugin=become,
    )
    command = str(ShellModule().build_module_command("", built.shebang, "")).strip()
    return command, built.b_module_data


def async_status_command(
    jid: str, *, mode: str = "status", async_dir: str = "%USERPROFILE%\\.ansible_async", become: t.Any = None
) -> tuple[str, bytes]:
    """(command line, stdin) of ansible.windows.async_status for a job, as Ansible's polling of async tasks sends it."""
    found = module_loader.find_plugin_with_context("ansible.windows.async_status", mod_type=".ps1")
    built = modify_module(
        module_name="ansible.windows.async_status",
        module_path=str(found.plugin_resolved_path),
        module_args={"jid": jid, "mode": mode, "_async_dir": async_dir},
        templar=None,
        task_vars={},
        environment={},
        become_plugin=become,
    )
    command = str(ShellModule().build_module_command("", built.shebang, "")).strip()
    return command, built.b_module_data
