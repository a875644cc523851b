"""One process serving a whole simulated fleet: per host WinRM (HTTP 5985, HTTPS 5986) and RDP, plus a control API.

Each host gets its own loopback address (network.10, .11, ... in fleet order), so Ansible addresses it exactly like a
real server on the default ports. The control API (JSON over HTTP on network.1:5999) is what ``rdplab state``,
``reset``, ``fault`` and ``down`` talk to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import selectors
import socket
import socketserver
import threading
import time
import typing as t
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from rdplab.rdp import RdpEndpoint
from rdplab.winrm import (
    HostSlot,
    WinRMServer,
    self_signed_certificate,
    server_tls_context,
)

if t.TYPE_CHECKING:
    from rdplab.arm import ArmCloud
    from rdplab.model.host import WindowsHost

LOG = logging.getLogger("rdplab.server")

WINRM_HTTP_PORT = 5985
WINRM_HTTPS_PORT = 5986
CONTROL_PORT = 5999
FIRST_HOST_OCTET = 10
STATE_FILE = "state.json"
LOG_FILE = "lab.log"


class LabError(Exception):
    """A clear, user-facing failure (bad arguments, port in use, no lab running)."""


def host_address(network: str, index: int) -> str:
    return f"{network}.{FIRST_HOST_OCTET + index}"


def control_address(network: str) -> str:
    return f"{network}.1"


def validate_network(network: str) -> str:
    parts = network.split(".")
    if len(parts) != 3 or parts[0] != "127" or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts):
        raise LabError(
            f"--network must be the first three octets of a loopback address such as 127.0.77, not {network!r}"
        )
    return network


def load_hosts(paths: t.Sequence[Path]) -> list[WindowsHost]:
    from rdplab.model.fleet import load_fleet

    hosts: list[WindowsHost] = load_fleet(list(paths))
    if not hosts:
        raise LabError("the fleet is empty: give host YAML files, directories of them, or fleet files")
    names = [host.name for host in hosts]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise LabError(f"host names must be unique in a fleet: {', '.join(duplicates)}")
    if len(hosts) > 245:
        raise LabError("at most 245 hosts fit in one lab network")
    return hosts


def counters_dict(host: WindowsHost) -> dict[str, int]:
    counters = host.counters
    if dataclasses.is_dataclass(counters) and not isinstance(counters, type):
        return {key: int(value) for key, value in dataclasses.asdict(counters).items()}
    return {key: int(value) for key, value in vars(counters).items() if not key.startswith("_")}


def reset_counters(host: WindowsHost) -> None:
    reset = getattr(host.counters, "reset", None)
    if callable(reset):
        reset()
        return
    for key in counters_dict(host):
        setattr(host.counters, key, 0)


class Acceptor:
    """One thread accepting the connections of every WinRM listener of the lab (HTTP and HTTPS of each host).

    A thread per listener, each waking every few tenths of a second to look for a shutdown request, made a fleet of
    hundreds of hosts spend its CPU on idle wake-ups and its start-up crawl; here one selector waits on every listening
    socket and hands each connection to its server (ThreadingHTTPServer: one thread per connection, as before).
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._changes: list[tuple[str, socketserver.TCPServer, threading.Event]] = []
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="rdplab-accept", daemon=True)
        self._thread.start()

    def _request(self, action: str, served: socketserver.TCPServer) -> None:
        done = threading.Event()
        with self._lock:
            self._changes.append((action, served, done))
        self._wake_write.send(b"x")
        if threading.current_thread() is not self._thread:
            done.wait(10)

    def add(self, served: socketserver.TCPServer) -> None:
        self._request("add", served)

    def remove(self, served: socketserver.TCPServer) -> None:
        """Stop accepting for ``served`` (before its socket is closed)."""
        self._request("remove", served)

    def close(self) -> None:
        self._stopped = True
        self._wake_write.send(b"x")
        self._thread.join(timeout=10)
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()

    def _apply_changes(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_read.recv(4096):
                pass
        with self._lock:
            changes, self._changes = self._changes, []
        for action, served, done in changes:
            with contextlib.suppress(KeyError, ValueError, OSError):
                if action == "add":
                    self._selector.register(served.socket, selectors.EVENT_READ, served)
                else:
                    self._selector.unregister(served.socket)
            done.set()

    def _run(self) -> None:
        while not self._stopped:
            for key, _events in self._selector.select():
                served = key.data
                if served is None:
                    self._apply_changes()
                    continue
                try:
                    served._handle_request_noblock()
                except Exception:
                    LOG.exception("accepting a connection failed")


class HostRuntime:
    """The listeners of one host."""

    def __init__(
        self,
        address: str,
        host: WindowsHost,
        ssh_client_keys: t.Sequence[t.Any] = (),
        acceptor: Acceptor | None = None,
    ) -> None:
        self.acceptor = acceptor
        from rdplab.ssh import SshEndpoint

        self.slot = HostSlot(address, host)
        cert_pem, key_pem = self_signed_certificate(host.name, [address])
        self.http = WinRMServer(self.slot, WINRM_HTTP_PORT)
        try:
            self.https = WinRMServer(self.slot, WINRM_HTTPS_PORT, server_tls_context(cert_pem, key_pem))
        except OSError:
            self.http.server_close()
            raise
        # Windows OpenSSH with PowerShell as the default shell (rdplab.ssh), port 22.
        self.ssh = SshEndpoint(self.slot, authorized_keys=ssh_client_keys)
        try:
            self.ssh.bind()
        except OSError:
            self.http.server_close()
            self.https.server_close()
            raise
        self.rdp = RdpEndpoint(address, lambda: self.slot.host)
        self.slot.on_change.append(self.rdp.sync)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self.rdp.start()
        self.ssh.start()
        for server in (self.http, self.https):
            if self.acceptor is not None:
                self.acceptor.add(server)
                continue
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        for server in (self.http, self.https):
            if self.acceptor is not None:
                self.acceptor.remove(server)
            else:
                server.shutdown()
            server.server_close()
        self.ssh.stop()
        self.rdp.stop()

    def describe(self) -> dict[str, t.Any]:
        return {
            "address": self.slot.address,
            "winrm_http": WINRM_HTTP_PORT,
            "winrm_https": WINRM_HTTPS_PORT,
            "ssh_port": self.ssh.bound_port,
            "commands_by_channel": dict(sorted(self.slot.commands_by_channel.items())),
            "rdp_port": self.rdp.bound_port,
        }


class Lab:
    """Every host's listeners and the control API, in this process."""

    def __init__(self, host_files: t.Sequence[Path], network: str) -> None:
        self.host_files = [Path(p) for p in host_files]
        self.network = validate_network(network)
        self.hosts = load_hosts(self.host_files)
        self.runtimes: dict[str, HostRuntime] = {}
        self.acceptor: Acceptor | None = None
        self.control: ThreadingHTTPServer | None = None
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        # The lab as an Azure cloud (rdplab.arm), when started with --azure.
        self.azure: ArmCloud | None = None
        # The key every host's SSH server accepts for its administrator (administrators_authorized_keys).
        from rdplab.ssh import generate_key

        self.ssh_client_key = generate_key()

    def start_azure(self, state_dir: Path, latency: float) -> None:
        """Serve the fleet as Azure VMs: ARM, token endpoint and Run Command on network.1 (rdplab.arm)."""
        from rdplab.arm import ArmCloud

        slots = [(name, runtime.slot) for name, runtime in self.runtimes.items()]
        self.azure = ArmCloud(slots, control_address(self.network), state_dir, latency)
        self.azure.start()

    def start(self) -> None:
        """Bind everything or nothing: a port already in use is an OSError naming it."""
        try:
            self.acceptor = Acceptor()
            for index, host in enumerate(self.hosts):
                address = host_address(self.network, index)
                try:
                    runtime = HostRuntime(address, host, [self.ssh_client_key], self.acceptor)
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot listen for WinRM on {address}: {exc.strerror}") from exc
                self.runtimes[host.name] = runtime
                runtime.start()
            self.control = _ControlServer(self, (control_address(self.network), CONTROL_PORT))
        except BaseException:
            self.stop()
            raise
        threading.Thread(target=self.control.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    def stop(self) -> None:
        if self.azure is not None:
            self.azure.stop()
            self.azure = None
        if self.control is not None:
            self.control.shutdown()
            self.control.server_close()
            self.control = None
        # Each runtime waits for its listeners' poll loops (a few tenths of a second): stopped one after the other, a
        # fleet of 30 hosts took ten seconds to stop.
        stoppers = [threading.Thread(target=runtime.stop, daemon=True) for runtime in self.runtimes.values()]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()
        self.runtimes.clear()
        if self.acceptor is not None:
            self.acceptor.close()
            self.acceptor = None
        self.stopped.set()

    def describe(self) -> dict[str, t.Any]:
        return {name: runtime.describe() for name, runtime in self.runtimes.items()}

    # --- what the control API exposes ---------------------------------------------------------------------------

    def runtime(self, name: str) -> HostRuntime:
        runtime = self.runtimes.get(name)
        if runtime is None:
            raise KeyError(f"no host {name!r} in the lab (hosts: {', '.join(self.runtimes)})")
        return runtime

    def state(self, name: str | None = None, zero_counters: bool = False) -> dict[str, t.Any]:
        names = [name] if name else list(self.runtimes)
        result: dict[str, t.Any] = {}
        for host_name in names:
            runtime = self.runtime(host_name)
            host = runtime.slot.host
            with host.lock:
                result[host_name] = {
                    **runtime.describe(),
                    "counters": counters_dict(host),
                    "snapshot": host.snapshot(),
                    # Who ran each batch (the caller, or become's account): rdplab.bootstrap records it.
                    "batch_identities": list(getattr(host, "batch_identities", [])),
                }
                if zero_counters:
                    reset_counters(host)
        return result

    def zero_counters(self, name: str | None = None) -> None:
        for host_name in [name] if name else list(self.runtimes):
            host = self.runtime(host_name).slot.host
            with host.lock:
                reset_counters(host)

    def reset(self) -> list[str]:
        """Reload every host from its YAML: state and counters start over; addresses and listeners stay."""
        with self._lock:
            fresh = {host.name: host for host in load_hosts(self.host_files)}
            if set(fresh) != set(self.runtimes):
                raise LabError(
                    "the host files now define other hosts than the running lab "
                    f"({sorted(fresh)} instead of {sorted(self.runtimes)}): run `rdplab down` and `rdplab up`"
                )
            for name, runtime in self.runtimes.items():
                runtime.slot.replace_host(fresh[name])
            return list(self.runtimes)

    def fault(self, name: str, fault: str, params: dict[str, t.Any]) -> None:
        runtime = self.runtime(name)
        host = runtime.slot.host
        with host.lock:
            host.inject_fault(fault, params)
        runtime.slot.changed()


class _ControlHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ControlServer

    def log_message(self, format: str, *args: t.Any) -> None:
        LOG.debug("control: " + format, *args)

    def _json(self, status: int, document: t.Any) -> None:
        payload = json.dumps(document, indent=None, sort_keys=False, default=str).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _body(self) -> dict[str, t.Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return {}
        document = json.loads(self.rfile.read(length))
        if not isinstance(document, dict):
            raise ValueError("the request body must be a JSON object")
        return document

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        lab = self.server.lab
        try:
            body = self._body() if method == "POST" else {}
            route = (method, url.path.rstrip("/") or "/")
            if route == ("GET", "/health"):
                self._json(200, {"ok": True, "pid": os.getpid(), "hosts": lab.describe()})
            elif route == ("GET", "/state"):
                zero = query.get("reset_counters", "") in ("1", "true", "yes")
                self._json(200, lab.state(query.get("host") or None, zero_counters=zero))
            elif route == ("POST", "/counters/reset"):
                lab.zero_counters(body.get("host"))
                self._json(200, {"ok": True})
            elif route == ("POST", "/reset"):
                self._json(200, {"reset": lab.reset()})
            elif route == ("POST", "/fault"):
                params = body.get("params") or {}
                if not isinstance(params, dict):
                    raise ValueError("params must be an object")
                lab.fault(str(body["host"]), str(body["name"]), params)
                self._json(200, {"ok": True})
            elif route == ("POST", "/shutdown"):
                self._json(200, {"ok": True})
                # Answer first, then stop: the main thread of `serve` is waiting on this event.
                threading.Thread(target=self.server.lab.stopped.set, daemon=True).start()
            else:
                self._json(404, {"error": f"no such control endpoint: {method} {url.path}"})
        except KeyError as exc:
            self._json(404, {"error": str(exc.args[0]) if exc.args else str(exc)})
        except (ValueError, TypeError, LabError) as exc:
            self._json(400, {"error": str(exc)})
        except Exception as exc:
            LOG.exception("control request failed")
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")


class _ControlServer(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, lab: Lab, address: tuple[str, int]) -> None:
        self.lab = lab
        try:
            super().__init__(address, _ControlHandler)
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen for the control API on {address[0]}:{address[1]}: {exc.strerror}"
            ) from exc

    def server_bind(self) -> None:
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


def write_state(state_dir: Path, lab: Lab) -> Path:
    """state.json: what `rdplab state/down/...` need to find the running lab (written atomically)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "pid": os.getpid(),
        "network": lab.network,
        "control": f"{control_address(lab.network)}:{CONTROL_PORT}",
        "log": str((state_dir / LOG_FILE).resolve()),
        "host_files": [str(p.resolve()) for p in lab.host_files],
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hosts": lab.describe(),
    }
    if lab.azure is not None:
        document["azure"] = lab.azure.describe()
    document["ssh"] = write_ssh_files(state_dir, lab)
    target = state_dir / STATE_FILE
    temporary = state_dir / (STATE_FILE + ".tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    temporary.replace(target)
    return target


def write_ssh_files(state_dir: Path, lab: Lab) -> dict[str, str]:
    """The SSH client key the hosts accept and a known_hosts file with every host's key, for clients of the lab."""
    ssh_dir = state_dir / "ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    key_path = ssh_dir / "id_ed25519"
    key_path.touch(mode=0o600)
    key_path.chmod(0o600)
    key_path.write_bytes(lab.ssh_client_key.export_private_key())
    known_hosts = ssh_dir / "known_hosts"
    known_hosts.write_text("".join(r.ssh.known_hosts_line() + "\n" for r in lab.runtimes.values()), encoding="utf-8")
    return {"private_key": str(key_path.resolve()), "known_hosts": str(known_hosts.resolve())}


def serve_forever(
    host_files: t.Sequence[Path], network: str, state_dir: Path, azure_latency: float | None = None
) -> int:
    """Run the lab in this process until SIGTERM/SIGINT or a shutdown request; 0 on a clean stop. With an
    azure_latency (seconds per Run Command), the fleet is also served as Azure VMs (rdplab.arm)."""
    import signal

    lab = Lab(host_files, network)
    lab.start()
    if azure_latency is not None:
        try:
            lab.start_azure(state_dir, azure_latency)
        except BaseException:
            lab.stop()
            raise
    LOG.info("lab serving %d host(s): %s", len(lab.runtimes), json.dumps(lab.describe()))
    state_path = write_state(state_dir, lab)

    def on_signal(signum: int, frame: object) -> None:
        lab.stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not lab.stopped.wait(0.5):
            pass
    finally:
        LOG.info("lab stopping")
        lab.stop()
        # Remove the state only if it is still ours (a later `up` may have replaced it).
        try:
            if json.loads(state_path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                state_path.unlink()
        except (OSError, ValueError):
            pass
    return 0
