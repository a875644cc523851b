"""A WS-Management endpoint speaking the WinRS shell protocol as pywinrm and Ansible's winrm connection use it.

One ``WinRMServer`` listens on one address and port (5985 HTTP, 5986 HTTPS) for one simulated host. Supported:
Basic authentication; transfer/Create (a shell), shell/Command, shell/Send (stdin), shell/Receive (output, with the
OperationTimeout fault the client answers by polling again), shell/Signal (terminate) and transfer/Delete. Everything
else is a SOAP fault. What a command may do is decided by ``rdplab.bootstrap``.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import datetime
import ipaddress
import logging
import re
import socket
import socketserver
import ssl
import sys
import tempfile
import threading
import time
import typing as t
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rdplab import bootstrap, psrp, transport_faults, wsman_auth

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost

LOG = logging.getLogger("rdplab.winrm")

NS_SOAP = "http://www.w3.org/2003/05/soap-envelope"
NS_ADDRESSING = "http://schemas.xmlsoap.org/ws/2004/08/addressing"
NS_WSMAN = "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd"
NS_SHELL = "http://schemas.microsoft.com/wbem/wsman/1/windows/shell"
NS_TRANSFER = "http://schemas.xmlsoap.org/ws/2004/09/transfer"
NS_FAULT = "http://schemas.microsoft.com/wbem/wsman/1/wsmanfault"

ACTION_CREATE = NS_TRANSFER + "/Create"
ACTION_DELETE = NS_TRANSFER + "/Delete"
ACTION_COMMAND = NS_SHELL + "/Command"
ACTION_SEND = NS_SHELL + "/Send"
ACTION_RECEIVE = NS_SHELL + "/Receive"
ACTION_SIGNAL = NS_SHELL + "/Signal"
RESOURCE_CMD = NS_SHELL + "/cmd"
STATE_DONE = NS_SHELL + "/CommandState/Done"
STATE_RUNNING = NS_SHELL + "/CommandState/Running"
SIGNAL_TERMINATE = NS_SHELL + "/signal/terminate"

# ERROR_WSMAN_OPERATION_TIMEDOUT (0x80338029): pywinrm turns it into WinRMOperationTimeoutError and polls again.
FAULT_OPERATION_TIMEOUT = 2150858793

DEFAULT_OPERATION_TIMEOUT = 20.0
# A Receive never blocks longer than this, whatever the client allows: keeps a stuck command visible quickly.
MAX_RECEIVE_WAIT = 5.0
DEFAULT_MAX_ENVELOPE = 153600

Q = {"s": NS_SOAP, "a": NS_ADDRESSING, "w": NS_WSMAN, "rsp": NS_SHELL}


class WSManFault(Exception):
    """A request that the endpoint answers with a SOAP fault (HTTP 500)."""

    def __init__(self, reason: str, subcode: str = "w:InternalError", code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.subcode = subcode
        self.code = code


@dataclass
class Command:
    """One WinRS command: its stdin as received so far, then its outcome and how much output was delivered."""

    command_id: str
    command_line: str
    recogniser: bootstrap.Recogniser | None
    stdin: bytearray = field(default_factory=bytearray)
    stdin_closed: bool = False
    started: bool = False
    outcome: bootstrap.CommandOutcome | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    stdout_sent: int = 0
    stderr_sent: int = 0
    # The transport fault armed for this command, and its cancellation (Signal terminate): rdplab.transport_faults.
    context: transport_faults.CommandContext = field(default_factory=transport_faults.CommandContext)


@dataclass
class Shell:
    shell_id: str
    commands: dict[str, Command] = field(default_factory=dict)


class HostSlot:
    """A simulated host at one address. ``host`` is replaced by ``rdplab reset``; shells die with it."""

    def __init__(self, address: str, host: WindowsHost) -> None:
        self.address = address
        self._host = host
        self.lock = threading.Lock()
        self.shells: dict[str, Shell] = {}
        # Runspace pools of the PowerShell resource URI (rdplab.psrp.Pool by ShellId).
        self.psrp_pools: dict[str, t.Any] = {}
        # Commands per way they arrived, e.g. "winrs/http/negotiate/sealed", "psrp/https/basic", "ssh/publickey".
        self.commands_by_channel: collections.Counter[str] = collections.Counter()
        # Called after a command has run on the host (the RDP listener follows the host's new state at once).
        self.on_change: list[t.Callable[[], None]] = []

    @property
    def host(self) -> WindowsHost:
        return self._host

    def replace_host(self, host: WindowsHost) -> None:
        with self.lock:
            self._host = host
            self.shells.clear()
            self.psrp_pools.clear()
            self.commands_by_channel.clear()
        self.changed()

    def changed(self) -> None:
        for callback in list(self.on_change):
            try:
                callback()
            except Exception:
                LOG.exception("%s: change callback failed", self.address)


def _text(root: ET.Element, path: str) -> str | None:
    node = root.find(path, Q)
    return node.text.strip() if node is not None and node.text else None


def _parse_duration(value: str | None) -> float:
    """An xs:duration such as PT20S or PT20.000S, in seconds."""
    if not value:
        return DEFAULT_OPERATION_TIMEOUT
    match = re.fullmatch(r"PT(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?", value.strip())
    if not match:
        return DEFAULT_OPERATION_TIMEOUT
    minutes, seconds = match.groups()
    return int(minutes or 0) * 60 + float(seconds or 0)


@dataclass(frozen=True)
class Request:
    action: str
    message_id: str
    shell_id: str | None
    operation_timeout: float
    max_envelope: int
    body: ET.Element
    resource_uri: str = ""
    # How the request arrived: "<http|https>/<basic|negotiate>[/sealed]" (set by the HTTP layer).
    channel: str = ""


def parse_request(payload: bytes) -> Request:
    try:
        root = ET.fromstring(payload)
    except ET.ParseError as exc:
        raise WSManFault(f"the request is not well-formed XML: {exc}", subcode="w:SchemaValidationError") from exc
    action = _text(root, "s:Header/a:Action")
    if not action:
        raise WSManFault("the request has no WS-Addressing Action", subcode="a:ActionNotSupported")
    body = root.find("s:Body", Q)
    shell_id = None
    for selector in root.findall("s:Header/w:SelectorSet/w:Selector", Q):
        if selector.get("Name") == "ShellId":
            shell_id = (selector.text or "").strip()
    try:
        max_envelope = int(_text(root, "s:Header/w:MaxEnvelopeSize") or DEFAULT_MAX_ENVELOPE)
    except ValueError:
        max_envelope = DEFAULT_MAX_ENVELOPE
    return Request(
        action=action,
        message_id=_text(root, "s:Header/a:MessageID") or "",
        shell_id=shell_id,
        operation_timeout=_parse_duration(_text(root, "s:Header/w:OperationTimeout")),
        max_envelope=max_envelope,
        body=body if body is not None else ET.Element("Body"),
        resource_uri=_text(root, "s:Header/w:ResourceURI") or "",
    )


def envelope(action: str, relates_to: str, body: str) -> bytes:
    return (
        '<s:Envelope xml:lang="en-US" '
        f'xmlns:s="{NS_SOAP}" xmlns:a="{NS_ADDRESSING}" xmlns:x="{NS_TRANSFER}" xmlns:w="{NS_WSMAN}" '
        f'xmlns:rsp="{NS_SHELL}">'
        "<s:Header>"
        f"<a:Action>{escape(action)}</a:Action>"
        f"<a:MessageID>uuid:{str(uuid.uuid4()).upper()}</a:MessageID>"
        "<a:To>http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</a:To>"
        f"<a:RelatesTo>{escape(relates_to)}</a:RelatesTo>"
        "</s:Header>"
        f"<s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


def fault_envelope(fault: WSManFault, relates_to: str, machine: str) -> bytes:
    code_attr = f' Code="{fault.code}"' if fault.code is not None else ""
    body = (
        "<s:Fault>"
        f"<s:Code><s:Value>s:Receiver</s:Value><s:Subcode><s:Value>{escape(fault.subcode)}</s:Value></s:Subcode>"
        "</s:Code>"
        f'<s:Reason><s:Text xml:lang="en-US">{escape(fault.reason)}</s:Text></s:Reason>'
        f'<s:Detail><f:WSManFault xmlns:f="{NS_FAULT}"{code_attr} Machine={quoteattr(machine)}>'
        f"<f:Message>{escape(fault.reason)}</f:Message></f:WSManFault></s:Detail>"
        "</s:Fault>"
    )
    return envelope("http://schemas.dmtf.org/wbem/wsman/1/wsman/fault", relates_to, body)


class WinRMEndpoint:
    """The WinRS state machine of one host, independent of HTTP (the handler feeds it parsed requests)."""

    def __init__(self, slot: HostSlot, url: str) -> None:
        self.slot = slot
        self.url = url
        self.psrp = psrp.PsrpEndpoint(slot, url, WSManFault)

    def handle(self, request: Request) -> bytes:
        if psrp.is_psrp(request.resource_uri):
            # The same listener serves PowerShell remoting, told apart by the resource URI.
            action, body = self.psrp.handle(request, request.resource_uri)
            return envelope(action, request.message_id, body)
        handlers: dict[str, t.Callable[[Request], tuple[str, str]]] = {
            ACTION_CREATE: self._create,
            ACTION_COMMAND: self._command,
            ACTION_SEND: self._send,
            ACTION_RECEIVE: self._receive,
            ACTION_SIGNAL: self._signal,
            ACTION_DELETE: self._delete,
        }
        handler = handlers.get(request.action)
        if handler is None:
            raise WSManFault(
                f"the WS-Management service does not support the action {request.action}",
                subcode="a:ActionNotSupported",
            )
        action, body = handler(request)
        return envelope(action, request.message_id, body)

    def _shell(self, request: Request) -> Shell:
        with self.slot.lock:
            shell = self.slot.shells.get(request.shell_id or "")
        if shell is None:
            raise WSManFault(
                f"the request for the Windows Remote Shell with ShellId {request.shell_id} failed because the shell "
                "was not found on the server",
                subcode="w:InvalidSelectors",
            )
        return shell

    def _command_of(self, shell: Shell, command_id: str | None) -> Command:
        with self.slot.lock:
            command = shell.commands.get(command_id or "")
        if command is None:
            raise WSManFault(f"the command {command_id} was not found in shell {shell.shell_id}")
        return command

    def _create(self, request: Request) -> tuple[str, str]:
        shell_id = str(uuid.uuid4()).upper()
        host = self.slot.host
        with self.slot.lock:
            self.slot.shells[shell_id] = Shell(shell_id)
        with host.lock:
            host.counters.winrm_shells += 1
        body = (
            "<x:ResourceCreated>"
            f"<a:Address>{escape(self.url)}</a:Address>"
            f"<a:ReferenceParameters><w:ResourceURI>{RESOURCE_CMD}</w:ResourceURI>"
            f'<w:SelectorSet><w:Selector Name="ShellId">{shell_id}</w:Selector></w:SelectorSet>'
            "</a:ReferenceParameters></x:ResourceCreated>"
            f"<rsp:Shell><rsp:ShellId>{shell_id}</rsp:ShellId><rsp:ResourceUri>{RESOURCE_CMD}</rsp:ResourceUri>"
            "<rsp:InputStreams>stdin</rsp:InputStreams><rsp:OutputStreams>stdout stderr</rsp:OutputStreams>"
            "</rsp:Shell>"
        )
        return NS_TRANSFER + "/CreateResponse", body

    def _command(self, request: Request) -> tuple[str, str]:
        shell = self._shell(request)
        host = self.slot.host
        with host.lock:
            host.counters.winrm_commands += 1
        with self.slot.lock:
            self.slot.commands_by_channel[f"winrs/{request.channel}"] += 1
        program = _text(request.body, "rsp:CommandLine/rsp:Command") or ""
        arguments = [node.text or "" for node in request.body.findall("rsp:CommandLine/rsp:Arguments", Q)]
        command_line = bootstrap.command_line_of(program, arguments)
        context = transport_faults.arm(host)
        if context.kind() == "drop_before":
            # The request never reached a shell: no command exists, nothing runs.
            raise transport_faults.DropConnection("drop_before")
        found = bootstrap.recognise(command_line)
        command = Command(
            command_id=str(uuid.uuid4()).upper(),
            command_line=command_line,
            recogniser=None if isinstance(found, bootstrap.CommandOutcome) else found,
            context=context,
        )
        if isinstance(found, bootstrap.CommandOutcome):
            LOG.info("%s: refused command %.120r", self.slot.address, command_line)
            command.outcome = found
            command.finished.set()
        elif not found.wants_stdin():
            self._start(command, host)
        with self.slot.lock:
            shell.commands[command.command_id] = command
        body = f"<rsp:CommandResponse><rsp:CommandId>{command.command_id}</rsp:CommandId></rsp:CommandResponse>"
        return NS_SHELL + "/CommandResponse", body

    def _start(self, command: Command, host: WindowsHost) -> None:
        recogniser = command.recogniser
        if recogniser is None or command.started or command.context.cancel.is_set():
            return
        command.started = True
        stdin = bytes(command.stdin)

        def work() -> None:
            with transport_faults.running(command.context):
                command.outcome = bootstrap.run_safely(recogniser, host, command.command_line, stdin)
            self.slot.changed()
            command.finished.set()

        threading.Thread(target=work, name=f"winrs-{command.command_id[:8]}", daemon=True).start()

    def _send(self, request: Request) -> tuple[str, str]:
        shell = self._shell(request)
        for stream in request.body.findall("rsp:Send/rsp:Stream", Q):
            command = self._command_of(shell, stream.get("CommandId"))
            if stream.get("Name", "stdin") != "stdin":
                raise WSManFault(f"unknown input stream {stream.get('Name')}")
            try:
                data = base64.b64decode((stream.text or "").strip(), validate=True)
            except binascii.Error as exc:
                raise WSManFault(f"the stdin stream is not base64: {exc}") from exc
            with self.slot.lock:
                if command.stdin_closed:
                    raise WSManFault("the input stream of the command was already closed")
                command.stdin.extend(data)
                if stream.get("End", "false").lower() == "true":
                    command.stdin_closed = True
                    self._start(command, self.slot.host)
        return NS_SHELL + "/SendResponse", "<rsp:SendResponse/>"

    def _receive(self, request: Request) -> tuple[str, str]:
        shell = self._shell(request)
        desired = request.body.find("rsp:Receive/rsp:DesiredStream", Q)
        command = self._command_of(shell, desired.get("CommandId") if desired is not None else None)
        # Windows holds a Receive until there is output or the client's OperationTimeout expires; answer a little
        # before the client's own deadline so the fault arrives, not a read timeout.
        wait = max(0.2, min(request.operation_timeout - 0.5, MAX_RECEIVE_WAIT))
        fault = command.context.fault
        if fault is not None and fault.kind == "cut_at_op":
            # A stalled host behind a stalled network: no answer at all until the batch ends or the fault's time
            # passes, so the client's read timeout fires and it signals terminate.
            wait = fault.seconds
        if not command.finished.wait(wait):
            raise WSManFault(
                "The WS-Management service cannot complete the operation within the time specified in "
                "OperationTimeout.",
                subcode="w:TimedOut",
                code=FAULT_OPERATION_TIMEOUT,
            )
        outcome = command.outcome
        assert outcome is not None
        if fault is not None and command.stdout_sent == 0 and command.stderr_sent == 0:
            # The command has run to its end: the answer that would deliver its output is lost or late.
            if fault.kind == "drop_after":
                raise transport_faults.DropConnection("drop_after")
            if fault.kind == "http500_after":
                raise WSManFault("The WS-Management service cannot process the request: an internal error occurred.")
            if fault.kind == "delay_after":
                time.sleep(fault.seconds)
        # Large output goes out over several Receives, each envelope under the client's MaxEnvelopeSize.
        budget = max(1024, (request.max_envelope - 4096) * 3 // 4)
        with self.slot.lock:
            out = outcome.stdout[command.stdout_sent : command.stdout_sent + budget]
            command.stdout_sent += len(out)
            err = outcome.stderr[command.stderr_sent : command.stderr_sent + max(0, budget - len(out))]
            command.stderr_sent += len(err)
            done = command.stdout_sent >= len(outcome.stdout) and command.stderr_sent >= len(outcome.stderr)
        cid = command.command_id
        end = ' End="true"' if done else ""
        parts = [
            f'<rsp:Stream Name="stdout" CommandId="{cid}">{base64.b64encode(out).decode()}</rsp:Stream>' if out else "",
            f'<rsp:Stream Name="stderr" CommandId="{cid}">{base64.b64encode(err).decode()}</rsp:Stream>' if err else "",
        ]
        if done:
            parts.append(
                f'<rsp:Stream Name="stdout" CommandId="{cid}"{end}></rsp:Stream>'
                f'<rsp:Stream Name="stderr" CommandId="{cid}"{end}></rsp:Stream>'
                f'<rsp:CommandState CommandId="{cid}" State="{STATE_DONE}">'
                f"<rsp:ExitCode>{outcome.rc}</rsp:ExitCode></rsp:CommandState>"
            )
        else:
            parts.append(f'<rsp:CommandState CommandId="{cid}" State="{STATE_RUNNING}"/>')
        body = "<rsp:ReceiveResponse>" + "".join(parts) + "</rsp:ReceiveResponse>"
        return NS_SHELL + "/ReceiveResponse", body

    def _signal(self, request: Request) -> tuple[str, str]:
        shell = self._shell(request)
        signal = request.body.find("rsp:Signal", Q)
        command_id = signal.get("CommandId") if signal is not None else None
        code = _text(request.body, "rsp:Signal/rsp:Code") or ""
        self._command_of(shell, command_id)
        if code == SIGNAL_TERMINATE:
            # Terminate ends the process [MS-WSMV 3.1.4.12]: a batch still running stops before its next operation
            # (what it already changed stays changed), its output is dropped, and a command that has not started
            # never will (docs/lab.md, "Cut batches and transport faults").
            with self.slot.lock:
                command = shell.commands.pop(command_id or "", None)
            if command is not None:
                transport_faults.terminate(command.context)
        return NS_SHELL + "/SignalResponse", "<rsp:SignalResponse/>"

    def _delete(self, request: Request) -> tuple[str, str]:
        shell = self._shell(request)
        with self.slot.lock:
            self.slot.shells.pop(shell.shell_id, None)
        return NS_TRANSFER + "/DeleteResponse", ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: WinRMServer
    server_version = "Microsoft-HTTPAPI/2.0"
    sys_version = ""

    def log_message(self, format: str, *args: t.Any) -> None:
        LOG.debug("%s %s", self.server.slot.address, format % args)

    def _reply(
        self,
        status: int,
        payload: bytes,
        extra_headers: dict[str, str] | list[tuple[str, str]] | None = None,
        content_type: str = "application/soap+xml;charset=UTF-8",
    ) -> None:
        self.send_response(status)
        if payload:
            self.send_header("Content-Type", content_type)
        headers = extra_headers.items() if isinstance(extra_headers, dict) else (extra_headers or [])
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    def _auth(self) -> wsman_auth.ConnectionAuth:
        # One per TCP connection: NTLM authenticates the connection (keep-alive requests share this handler).
        auth: wsman_auth.ConnectionAuth | None = getattr(self, "_connection_auth", None)
        if auth is None:
            auth = self._connection_auth = wsman_auth.ConnectionAuth(tls=self.server.tls is not None)
        return auth

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        payload = self.rfile.read(length) if length else b""
        if self.path.rstrip("/").lower() != "/wsman":
            self._reply(404, b"")
            return
        host = self.server.slot.host
        auth = self._auth()
        decision = auth.authenticate(host, self.headers.get("Authorization", ""))
        if not decision.proceed:
            self._reply(401, b"", decision.headers)
            return
        try:
            message, sealed = auth.unseal(self.headers.get("Content-Type", ""), payload)
        except wsman_auth.AuthRejected:
            auth.forget()
            self._reply(401, b"", auth.challenge(host))
            return
        except wsman_auth.BadMessage as exc:
            LOG.info("%s: bad encrypted message: %s", self.server.slot.address, exc)
            self._reply(400, b"")
            return
        if not message:
            # The empty request a client sends to finish authentication before it seals messages.
            self._reply(200, b"", decision.headers)
            return
        if not sealed and self.server.tls is None and not wsman_auth.allows_unencrypted(host):
            # AllowUnencrypted is false: over HTTP only sealed messages are accepted.
            LOG.info("%s: unencrypted %s message over HTTP refused", self.server.slot.address, auth.scheme)
            auth.forget()
            self._reply(401, b"", auth.challenge(host))
            return
        relates_to = ""
        status = 200
        try:
            channel = f"{'https' if self.server.tls else 'http'}/{auth.scheme}" + ("/sealed" if sealed else "")
            request = dataclasses.replace(parse_request(message), channel=channel)
            relates_to = request.message_id
            response = self.server.endpoint.handle(request)
        except WSManFault as fault:
            status, response = 500, fault_envelope(fault, relates_to, self.server.slot.address)
        if sealed:
            self._reply(status, auth.seal(response), decision.headers, content_type=wsman_auth.ENCRYPTED_CONTENT_TYPE)
        else:
            self._reply(status, response, decision.headers)

    def do_GET(self) -> None:
        # The WinRM listener answers only SOAP POSTs.
        self._reply(405, b"", {"Allow": "POST"})


class WinRMServer(ThreadingHTTPServer):
    """HTTP or HTTPS WinRM listener for one simulated host."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, slot: HostSlot, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.slot = slot
        self.tls = tls
        scheme = "https" if tls else "http"
        self.endpoint = WinRMEndpoint(slot, f"{scheme}://{slot.address}:{port}/wsman")
        super().__init__((slot.address, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the address with getfqdn, slow for 127.0.x.y: skip it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def finish_request(self, request: t.Any, client_address: t.Any) -> None:
        # The TLS handshake runs in the connection's own thread, so a silent client cannot stall accept().
        if self.tls is not None:
            try:
                request.settimeout(30)
                request = self.tls.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (ssl.SSLError, OSError) as exc:
                LOG.debug("%s: TLS handshake failed: %s", self.slot.address, exc)
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: t.Any, client_address: t.Any) -> None:
        if isinstance(sys.exc_info()[1], transport_faults.DropConnection | BrokenPipeError | ConnectionResetError):
            # An injected drop, or a client that went away (after a delayed answer): not an error of the lab.
            LOG.info("%s: connection with %s closed: %r", self.slot.address, client_address, sys.exc_info()[1])
            return
        LOG.exception("%s: error while serving %s", self.slot.address, client_address)


def self_signed_certificate(common_name: str, addresses: t.Sequence[str]) -> tuple[bytes, bytes]:
    """A throwaway certificate for the HTTPS listener (the inventory tells Ansible not to validate it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(common_name)]
    alt_names += [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def server_tls_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """An SSLContext serving the given PEM pair (load_cert_chain only reads files, so they pass through a temp dir)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="rdplab-tls-") as directory:
        cert_path = Path(directory) / "cert.pem"
        key_path = Path(directory) / "key.pem"
        cert_path.write_bytes(cert_pem)
        key_path.touch(mode=0o600)
        key_path.write_bytes(key_pem)
        context.load_cert_chain(str(cert_path), str(key_path))
    return context


def port_free(address: str, port: int) -> bool:
    """Whether a listener could bind address:port right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True
