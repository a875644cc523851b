"""An SSH server per simulated host, as Windows' OpenSSH server with PowerShell as its default shell.

Ansible's ssh connection with ``ansible_shell_type: powershell`` sends each command as the exec request of an SSH
session and pipes the module's input to it. Windows OpenSSH with ``DefaultShell`` set to powershell.exe runs an exec
request as ``powershell.exe -c "<command>"``; for the ``PowerShell -NoProfile ... -EncodedCommand ...`` line Ansible
sends, that outer shell starts the inner powershell.exe with exactly that command line and the session's stdin, and
returns its exit code. So the lab hands (the exec command, the session's stdin until EOF) to ``rdplab.bootstrap``
exactly like a WinRS command, and returns stdout as channel data, stderr as extended data and the exit code as the
exit status. An interactive shell (no command), a pseudo-terminal, subsystems (sftp), scp and forwarding are not
served: the collection needs none of them (Ansible pipelines PowerShell modules over ssh).

Authentication as a Windows OpenSSH administrator logs on: the host's local account (``user`` or ``HOSTNAME\\user``,
case-insensitive) with its password, or with a key listed in administrators_authorized_keys - the lab's client key,
whose private half ``rdplab up`` writes to the state directory. Each host has its own ed25519 host key; ``rdplab up``
writes them to a known_hosts file so clients can check them.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import typing as t

import asyncssh

from rdplab import bootstrap, transport_faults

if t.TYPE_CHECKING:
    from rdplab.winrm import HostSlot

LOG = logging.getLogger("rdplab.ssh")

SSH_PORT = 22
# A lab that cannot bind port 22 (not root, or a local sshd) serves SSH here instead; the inventory follows.
FALLBACK_SSH_PORT = 2222
SERVER_VERSION = "OpenSSH_for_Windows_9.5"


def generate_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def _account_matches(slot: HostSlot, username: str) -> bool:
    host = slot.host
    wanted = host.username.lower()
    given = username.lower()
    return given in (wanted, f"{host.system.hostname.lower()}\\{wanted}", f".\\{wanted}")


class _Server(asyncssh.SSHServer):
    def __init__(self, endpoint: SshEndpoint) -> None:
        self.endpoint = endpoint
        self.connection: asyncssh.SSHServerConnection | None = None
        self.method = ""

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.connection = conn

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connection is not None:
            self.endpoint.methods.pop(self.connection, None)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        host = self.endpoint.slot.host
        ok = _account_matches(self.endpoint.slot, username) and hmac.compare_digest(
            password.encode("utf-8"), host.password.encode("utf-8")
        )
        if not ok:
            LOG.info("%s: ssh password logon of %r refused", self.endpoint.slot.address, username)
        self.method = "password"
        return ok

    def public_key_auth_supported(self) -> bool:
        return bool(self.endpoint.authorized_keys)

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if not _account_matches(self.endpoint.slot, username):
            return False
        wanted = key.export_public_key("openssh").split()[:2]
        self.method = "publickey"
        return any(known.export_public_key("openssh").split()[:2] == wanted for known in self.endpoint.authorized_keys)

    def auth_completed(self) -> None:
        if self.connection is not None:
            self.endpoint.methods[self.connection] = self.method
        host = self.endpoint.slot.host
        with host.lock:
            host.counters.winrm_shells += 1


class SshEndpoint:
    """The SSH listener of one host, served by its own asyncio loop in a thread."""

    def __init__(
        self,
        slot: HostSlot,
        port: int = SSH_PORT,
        authorized_keys: t.Sequence[asyncssh.SSHKey] = (),
        host_key: asyncssh.SSHKey | None = None,
    ) -> None:
        self.slot = slot
        self.port = port
        self.authorized_keys = list(authorized_keys)
        self.host_key = host_key or generate_key()
        self.bound_port: int | None = None
        # The authentication method of each open connection ("password" or "publickey").
        self.methods: dict[asyncssh.SSHServerConnection, str] = {}
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._listener: asyncssh.SSHAcceptor | None = None

    def known_hosts_line(self) -> str:
        public = self.host_key.export_public_key("openssh").decode().split()[:2]
        name = self.slot.address if self.bound_port == SSH_PORT else f"[{self.slot.address}]:{self.bound_port}"
        return f"{name} {public[0]} {public[1]}"

    def bind(self) -> None:
        """Listen on port 22 or, without the right to bind it (not root, or a local sshd holds it), on the fallback
        port; raises OSError naming the address."""
        ports = [self.port] if self.port != SSH_PORT else [SSH_PORT, FALLBACK_SSH_PORT]
        for position, port in enumerate(ports):
            try:
                self._listener = self._loop.run_until_complete(self._listen(port))
            except OSError as exc:
                if position + 1 < len(ports):
                    LOG.info("%s: cannot listen for SSH on port %d (%s)", self.slot.address, port, exc.strerror)
                    continue
                where = f"{self.slot.address}:{port}"
                raise OSError(exc.errno, f"cannot listen for SSH on {where}: {exc.strerror}") from exc
            self.bound_port = port
            return

    async def _listen(self, port: int) -> asyncssh.SSHAcceptor:
        return await asyncssh.create_server(
            lambda: _Server(self),
            self.slot.address,
            port,
            server_host_keys=[self.host_key],
            server_version=SERVER_VERSION,
            process_factory=self._process,
            encoding=None,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=False,
            line_editor=False,
            keepalive_interval=0,
        )

    def start(self) -> None:
        if self._listener is None:
            self.bind()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"ssh-{self.slot.address}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._listener is not None:
            listener = self._listener

            async def close() -> None:
                listener.close()
                await listener.wait_closed()

            if self._thread is not None and self._thread.is_alive():
                asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=10)
            else:
                self._loop.run_until_complete(close())
            self._listener = None
        if not self._loop.is_closed() and not self._loop.is_running():
            self._loop.close()

    async def _process(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        command = process.command
        host = self.slot.host
        if not command:
            message = "rdplab: this simulated Windows OpenSSH server runs commands only; no interactive shell\r\n"
            process.stderr.write(message.encode("utf-8"))
            process.exit(1)
            return
        with host.lock:
            host.counters.winrm_commands += 1
        method = self.methods.get(process.get_extra_info("connection"), "")
        with self.slot.lock:
            self.slot.commands_by_channel[f"ssh/{method}"] += 1
        context = transport_faults.arm(host)
        connection = process.get_extra_info("connection")
        if context.kind() == "drop_before":
            # The exec request never reached a shell: the TCP connection is gone, nothing runs.
            connection.abort()
            return
        try:
            found = bootstrap.recognise(command)
        except Exception as exc:  # a bug in the lab: a failed command with its message, not a dead session
            message = f"rdplab: internal error: {type(exc).__name__}: {exc}\r\n"
            found = bootstrap.CommandOutcome(1, b"", message.encode("utf-8"))
        if isinstance(found, bootstrap.CommandOutcome):
            LOG.info("%s: refused ssh command %.120r", self.slot.address, command)
            outcome = found
        else:
            stdin = await process.stdin.read() if found.wants_stdin() else b""
            recogniser = found

            def run() -> bootstrap.CommandOutcome:
                with transport_faults.running(context):
                    return bootstrap.run_safely(recogniser, host, command, stdin)

            outcome = await asyncio.get_running_loop().run_in_executor(None, run)
            self.slot.changed()
        fault = context.fault
        if fault is not None and fault.kind in ("drop_after", "http500_after"):
            # The command has run to its end; the connection that would deliver its output and exit status is gone
            # (SSH has no HTTP status: an http500_after fault is met as a dropped connection).
            connection.abort()
            return
        if fault is not None and fault.kind == "delay_after":
            # The answer is held; OpenSSH has no read timeout of its own, so the client waits for it.
            await asyncio.sleep(fault.seconds)
        if outcome.stdout:
            process.stdout.write(outcome.stdout)
        if outcome.stderr:
            process.stderr.write(outcome.stderr)
        process.exit(outcome.rc)
