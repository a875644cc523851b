"""WindowsHost: one simulated Windows server, the object the transport talks to."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import typing as t
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rdplab import transport_faults
from rdplab.model import jsondepth, listener, schannel
from rdplab.model.errors import BatchError, Failed, NotFound, OpError
from rdplab.model.events import EventLog
from rdplab.model.filesystem import FileSystem
from rdplab.model.firewall import Firewall, rdp_blocked
from rdplab.model.registry import Registry
from rdplab.model.services import Service, Services
from rdplab.model.sessions import Sessions
from rdplab.model.stores import CertStores
from rdplab.model.system import SystemInfo
from rdplab.model.timeutil import Clock, iso, utc_now
from rdplab.model.token import AgentProcess, CallerToken

if t.TYPE_CHECKING:
    from collections.abc import Iterator
    from datetime import datetime

    from rdplab.model.certs import LabCA
    from rdplab.transport_faults import TransportFault

PROTOCOL_VERSION = 1

# The process a batch's agent runs in. Over WinRS and OpenSSH (and under become) every batch is a new powershell.exe
# that ends with it; over PSRP the script runs in the WinRM plugin host (wsmprovhost.exe) of the runspace pool, one
# process for every command of the connection, alive after a batch was stopped (docs/lab.md, "Agent processes").
_HOSTING: contextvars.ContextVar[dict[str, t.Any] | None] = contextvars.ContextVar("rdplab_hosting", default=None)


@contextlib.contextmanager
def hosted_by(process: dict[str, t.Any] | None) -> Iterator[None]:
    """Run the batches of this block in ``process`` (a runspace pool's host process: ``open_host_process``)."""
    token = _HOSTING.set(process)
    try:
        yield
    finally:
        _HOSTING.reset(token)


@dataclass
class Counters:
    winrm_shells: int = 0
    winrm_commands: int = 0
    writes: int = 0
    rdp_connections: int = 0


@dataclass
class RdpView:
    port: int
    listening: bool
    accepted_protocols: int
    rdp_only: bool
    failure: str | None
    cert_pem: bytes | None
    key_pem: bytes | None
    tls_versions: list[str] = field(default_factory=lambda: ["TLSv1.2", "TLSv1.3"])
    # The suites (OpenSSL names) the TLS server offers; None: its TLS library's defaults. Set when Schannel has no
    # usable suite, so that the handshake really fails for want of a common cipher.
    cipher_suites: list[str] | None = None
    # The firewall drops the connection (no answer to the SYN: the client times out); not listening otherwise means
    # refused.
    dropped: bool = False


class WindowsHost:
    """The state of one simulated Windows server and the behaviours of Windows that the collection relies on."""

    def __init__(
        self,
        *,
        name: str,
        groups: list[str],
        username: str,
        password: str,
        system: SystemInfo,
        clock: Clock = utc_now,
        key_label: str | None = None,
        source: Path | None = None,
    ) -> None:
        self.name = name
        self.groups = groups
        self.username = username
        self.password = password
        self.system = system
        self.clock = clock
        self.source = source
        # Labels of cached keys; the host name keeps two hosts from sharing a key.
        self.key_label = key_label or f"host:{name}"
        self.registry = Registry()
        self.stores = CertStores()
        self.filesystem = FileSystem.windows_default()
        self.services = Services.windows_default()
        self.sessions = Sessions()
        self.events = EventLog()
        self.counters = Counters()
        self.lock = threading.RLock()
        self.selfsigned_generation = 0
        self.faults: list[dict[str, object]] = []
        # The running batch's agent process, and agent processes of other runs (the hold_run_lock fault).
        self._agent_pid = 4000
        self.running_agent: dict[str, t.Any] | None = None
        self.other_agent_processes: list[dict[str, t.Any]] = []
        # Host processes of open runspace pools (PSRP): alive until their pool is closed.
        self.host_processes: list[dict[str, t.Any]] = []
        # Run lock files held open (normalized path -> holder): "batch" for the running batch (closed when it ends,
        # however it ends), "other" for another run's batch in progress (the hold_run_lock fault).
        self.open_lock_files: dict[str, str] = {}
        # Opens of the run lock file that still meet a sharing violation (the busy_run_lock fault: another agent
        # holding it for a moment).
        self.lock_busy_opens = 0
        # Faults of the remote-management transport (rdplab.transport_faults), armed per command by the endpoints.
        self.transport_faults: list[TransportFault] = []
        self.firewall = Firewall.windows_default()
        # Who the agent runs as (host file `caller:`), and the agent process of the current batch.
        self.caller: CallerToken = CallerToken.administrator(system.hostname, username)
        self.process: AgentProcess = self.caller.start_process()
        # Who ran each batch (the token's user, in order): the caller, or the account of Ansible's become (runas).
        self.batch_identities: list[str] = []
        # Schannel's protocols and cipher suites as latched at boot (rdplab.model.schannel): the build's defaults
        # until a host file's registry is loaded (schema.build_host latches again) or the host reboots.
        self.schannel: schannel.SchannelState = schannel.compute(self)

    # -- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: Path, *, ca: LabCA | None = None, now: datetime | None = None) -> WindowsHost:
        """Load a host YAML file (see docs/lab.md); HostFileError names the file and the field on bad input."""
        from rdplab.model.schema import load_host_file

        return load_host_file(Path(path), ca=ca, now=now)

    # -- the agent -----------------------------------------------------------------------------------------------

    def run_batch(self, batch: dict[str, t.Any]) -> dict[str, t.Any]:
        """Execute a batch as the agent does: {"v": 1, "results": [...]}, on_error honoured, writes counted."""
        from rdplab.ops import OPS

        if not isinstance(batch, dict) or batch.get("v") != PROTOCOL_VERSION:
            raise BatchError(f"unsupported batch document (expected v={PROTOCOL_VERSION}): {batch!r:.200}")
        operations = batch.get("ops")
        on_error = batch.get("on_error", "stop")
        if not isinstance(operations, list) or on_error not in ("stop", "continue"):
            raise BatchError("a batch needs 'ops' (a list) and on_error 'stop' or 'continue'")
        results: list[dict[str, t.Any]] = []
        stopped = False
        with self.lock:
            # Each batch is a new PowerShell process: a fresh copy of the caller's token, privileges as at logon.
            self.process = self.caller.start_process()
            self._start_agent_process()
            try:
                for position, item in enumerate(operations):
                    name = item.get("op") if isinstance(item, dict) else None
                    op_name = name if isinstance(name, str) else repr(name)
                    # A terminate signalled by the client ends the process between two operations (BatchCancelled).
                    transport_faults.before_op(position)
                    # An operation marked "always" (a lock's release) runs even after a failure stopped the batch.
                    if stopped and not (isinstance(item, dict) and item.get("always") is True):
                        results.append({"op": op_name, "ok": False, "skipped": True})
                        continue
                    result = self._run_one(OPS, item, op_name)
                    results.append(result)
                    if not result["ok"] and on_error == "stop":
                        stopped = True
            finally:
                # The batch has ended (completed, or stopped by a terminate): the lock files it held are closed.
                for path in [key for key, holder in self.open_lock_files.items() if holder == "batch"]:
                    del self.open_lock_files[path]
                self.running_agent = None
        return {"v": PROTOCOL_VERSION, "results": results}

    # -- agent processes (what a run lock's record names) --------------------------------------------------------

    def _start_agent_process(self) -> None:
        # One batch runs at a time in the lab: a new batch means every earlier powershell.exe has ended (a batch cut
        # by a terminate included). Under PSRP the batch runs in its runspace pool's host process instead.
        hosting = _HOSTING.get()
        if hosting is not None:
            self.running_agent = dict(hosting)
            return
        self._agent_pid += 4
        self.running_agent = {"id": self._agent_pid, "started": iso(self.clock())}

    def open_host_process(self) -> dict[str, t.Any]:
        """A runspace pool's host process (wsmprovhost.exe): alive until ``close_host_process``."""
        with self.lock:
            self._agent_pid += 4
            process = {"id": self._agent_pid, "started": iso(self.clock())}
            self.host_processes.append(process)
            return dict(process)

    def close_host_process(self, process: dict[str, t.Any]) -> None:
        with self.lock:
            if process in self.host_processes:
                self.host_processes.remove(process)

    def agent_process_record(self) -> dict[str, t.Any]:
        """The running batch's agent process: ``{id, started}`` as the agent reports its own."""
        if self.running_agent is None:
            self._start_agent_process()
        assert self.running_agent is not None
        return dict(self.running_agent)

    def agent_process_alive(self, process: object) -> bool:
        """Whether the agent process a lock record names still runs: the running batch's, a runspace pool's host
        process, or one the ``hold_run_lock`` fault keeps alive (another controller's run in progress). A record
        without a process (not rdpfix's) counts as running, as on Windows."""
        if not isinstance(process, dict):
            return True
        return process == self.running_agent or process in self.other_agent_processes or process in self.host_processes

    def _run_one(self, ops: t.Mapping[str, t.Any], item: object, op_name: str) -> dict[str, t.Any]:
        spec = ops.get(op_name)
        if spec is None:
            return _error(op_name, "Unsupported", f"unknown operation {op_name!r}")
        args = item.get("args", {}) if isinstance(item, dict) else None
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return _error(op_name, "InvalidArgument", "args must be an object")
        try:
            data = spec.func(self, args)
        except OpError as exc:
            return _error(op_name, exc.error_type, exc.message, exc.data)
        expected = item.get("expect") if isinstance(item, dict) else None
        if expected is not None:
            # What the batch requires the operation to have done, compared as the agent does (a guard's subset).
            from rdplab.ops.guard import first_difference

            difference = first_difference(expected, jsondepth.travelled(data), "subset")
            if difference is not None:
                return _error(op_name, "NotDone", f"it did not do what the batch required ({difference})", data)
        if spec.writes and spec.counted:
            self.counters.writes += 1
        # The data as the result document carries it (ConvertTo-Json -Depth 10, three levels above the data).
        return {"op": op_name, "ok": True, "data": jsondepth.travelled(data)}

    # -- services (used by operations and faults) ----------------------------------------------------------------

    def service(self, name: str) -> Service:
        found = self.services.get(name)
        if found is None:
            raise NotFound(f"Cannot find any service with service name '{name}'.")
        return found

    def stop_service(self, name: str) -> None:
        service = self.service(name)
        if service.status == "Stopped":
            return
        service.status = "Stopped"
        if service.name == "TermService":
            # Stopping TermService disconnects the remote sessions; it does not log them off [RunCmd readmes].
            self.sessions.disconnect_user_sessions()

    def start_service(self, name: str) -> None:
        service = self.service(name)
        if service.status == "Running":
            return
        if service.start_type == "Disabled":
            raise Failed(
                f"Service '{service.name} ({service.name})' cannot be started due to the following error: Cannot "
                f"start service {service.name} on computer '.'. The service is disabled."
            )
        service.status = "Running"
        if service.name in ("SessionEnv", "TermService"):
            listener.renew_selfsigned(self)

    def restart_service(self, name: str, force: bool) -> None:
        service = self.service(name)
        running_dependents = [dep for dep in self.services.dependents(service.name) if dep.status == "Running"]
        if running_dependents and not force:
            raise Failed(
                f"Cannot stop service '{service.name} ({service.name})' because it has dependent services. "
                "It can only be stopped if the Force flag is set."
            )
        if service.start_type == "Disabled":
            raise Failed(f"Cannot start service {service.name} on computer '.'. The service is disabled.")
        for dependent in running_dependents:
            self.stop_service(dependent.name)
        self.stop_service(service.name)
        self.start_service(service.name)
        # Restart-Service -Force brings the dependents it stopped back up (PowerShell's Service.cs).
        for dependent in running_dependents:
            self.start_service(dependent.name)

    # -- what RDP clients meet -----------------------------------------------------------------------------------

    def rdp_view(self, connect: bool = True) -> RdpView:
        """What a new RDP connection meets now. With ``connect`` (a real connection attempt) RCM's connection-time
        events are logged and ``rdp_connections`` is counted; ``connect=False`` only looks."""
        with self.lock:
            if connect:
                self.counters.rdp_connections += 1
            port = listener.port_number(self)
            listening = self.services.running("TermService") and not listener.deny_connections(self)
            # The firewall drops a blocked connection before RDP starts (stealth mode): the client times out.
            dropped = listening and rdp_blocked(self, port)
            listening = listening and not dropped
            protocols, rdp_only = listener.accepted_protocols(self)
            if not listening or rdp_only:
                return RdpView(port, listening, protocols, rdp_only, None, None, None, dropped=dropped)
            credential = listener.choose_credential(self, log=connect)
            cert = credential.certificate
            key_type = schannel.key_type(cert)
            failure = credential.failure or schannel.handshake_failure(self, key_type)
            # Each suite serves only its own TLS versions: a version without a usable suite is not served.
            versions = schannel.served_versions(self, key_type)
            suites = None
            if failure == schannel.NO_USABLE_CIPHER_SUITE:
                # Only TLS 1.0-1.2 suites can be named to the lab's TLS server, so it serves those versions only.
                versions = [version for version in schannel.tls_versions(self) if version != "TLSv1.3"]
                suites = schannel.offered_suites(self) if versions else []
            # A certificate is presented unless the credential cannot be built at all.
            presented = failure is None or failure == schannel.NO_USABLE_CIPHER_SUITE
            return RdpView(
                port=port,
                listening=True,
                accepted_protocols=protocols,
                rdp_only=False,
                failure=failure,
                cert_pem=cert.pem if cert is not None and presented else None,
                key_pem=credential.key_pem if presented else None,
                tls_versions=versions,
                cipher_suites=suites,
            )

    def record_rdp_attempt(self, outcome: dict[str, t.Any]) -> None:
        """What the RDP endpoint met on one connection: Schannel logs the events of a failed TLS handshake."""
        with self.lock:
            schannel.log_handshake_failure(self, outcome)

    # -- faults --------------------------------------------------------------------------------------------------

    def inject_fault(self, name: str, params: dict[str, t.Any]) -> None:
        """Break the host at run time (see docs/lab.md, "Faults"); ValueError on an unknown fault or bad params."""
        from rdplab.model.faults import FAULTS

        handler = FAULTS.get(name)
        if handler is None:
            raise ValueError(f"unknown fault {name!r}; known faults: {', '.join(sorted(FAULTS))}")
        with self.lock:
            handler(self, dict(params or {}))
            self.faults.append({"name": name, "params": dict(params or {})})

    # -- state ---------------------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, t.Any]:
        """The complete state, JSON-able and in a stable order, so that before/after comparisons are exact."""
        with self.lock:
            return {
                "name": self.name,
                "groups": list(self.groups),
                "system": self.system.to_json(),
                "registry": self.registry.snapshot(),
                "listener": {
                    **listener.wmi_setting(self),
                    "pinned": listener.pinned_thumbprint(self),
                },
                "certificates": self._certificates_snapshot(),
                "files": self.filesystem.snapshot(),
                "services": self.services.snapshot(),
                "sessions": self.sessions.snapshot(),
                "events": self.events.snapshot(),
                "firewall": self.firewall.snapshot(),
                "faults": list(self.faults),
                "counters": asdict(self.counters),
            }

    def _certificates_snapshot(self) -> dict[str, t.Any]:
        stores: dict[str, t.Any] = {}
        for store_name in sorted(self.stores.stores, key=str.casefold):
            entries = []
            for cert in sorted(self.stores.entries(store_name), key=lambda c: c.thumbprint):
                status = listener.key_status(self, cert)
                entries.append(
                    {
                        "thumbprint": cert.thumbprint,
                        "subject": cert.subject,
                        "issuer": cert.issuer,
                        "not_before": iso(cert.not_before),
                        "not_after": iso(cert.not_after),
                        "ekus": cert.ekus,
                        "sans": cert.sans,
                        "has_private_key": cert.key_link is not None,
                        "key_path": cert.key_link.path if cert.key_link else None,
                        "key_usable": status.usable,
                    }
                )
            stores[store_name] = entries
        return stores

    def __repr__(self) -> str:
        return f"WindowsHost({self.name!r})"


def _error(op: str, error_type: str, message: str, data: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
    result: dict[str, t.Any] = {"op": op, "ok": False, "error": {"type": error_type, "message": message}}
    if data is not None:
        # A failure that still reports something (a guard's actual value, a lock's holder), as the agent does.
        result["data"] = data
    return result
