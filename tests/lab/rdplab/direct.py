"""A connection object that reaches a simulated host without sockets.

Action-plugin tests use it in place of the winrm connection: the command line and stdin (Ansible's module exec wrapper
carrying the agent, built by the action plugin) go through the same verification and dispatch as over WinRM, and
``winrm_commands`` counts the same way, so round-trip assertions hold for both. Like Ansible's Windows connections it
has a PowerShell shell plugin (``_shell``) and, when given one, a become plugin (``become``).
"""

from __future__ import annotations

import typing as t

from ansible.plugins.shell.powershell import ShellModule

from rdplab import bootstrap

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost


class DirectConnection:
    """``exec_command`` straight into a WindowsHost, as if one WinRM shell were open on it."""

    def __init__(self, host: WindowsHost, become: object = None) -> None:
        self.host = host
        self._shell = ShellModule()
        self.become = become
        # Every (command line, stdin) sent, in order: what the tests count and inspect.
        self.wire: list[tuple[str, bytes]] = []
        with host.lock:
            # The winrm connection opens one shell per connection; do the same so the counters compare.
            host.counters.winrm_shells += 1

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        with self.host.lock:
            self.host.counters.winrm_commands += 1
        self.wire.append((cmd, in_data or b""))
        outcome = bootstrap.execute(self.host, cmd, in_data or b"")
        return outcome.rc, outcome.stdout, outcome.stderr

    def close(self) -> None:
        """Nothing to release; present so the object can stand in for a connection plugin."""
