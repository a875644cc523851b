"""Authentication and message encryption of the lab's WS-Management listeners, as Windows' WinRM service does them.

One ``ConnectionAuth`` lives for one TCP connection (NTLM authenticates the connection, not the request):

- ``Basic``: user name and password of the host's local account, on every request.
- ``Negotiate``: NTLM, raw or wrapped in SPNEGO (pywinrm's ``ntlm`` transport sends raw NTLM tokens under the
  Negotiate scheme, pypsrp sends SPNEGO). The acceptor is pyspnego's; the account is the host's. Once the exchange is
  complete the connection stays authenticated, and messages may be sealed with the NTLM session key
  ([MS-WSMV] 2.2.9.1.1: ``multipart/encrypted;protocol="application/HTTP-SPNEGO-session-encrypted"``).

Over HTTP the service refuses unencrypted messages (AllowUnencrypted is false by default): Basic over HTTP and NTLM
without sealing get 401 unless the host's WinRM service configuration allows unencrypted traffic. Wrong
credentials get 401. docs/lab.md, "What the WinRM endpoint accepts", cites the sources.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import shutil
import struct
import tempfile
import threading
import typing as t
from dataclasses import dataclass, field

import spnego
from spnego.exceptions import SpnegoError

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost

LOG = logging.getLogger("rdplab.winrm")

ENCRYPTED_PROTOCOL = "application/HTTP-SPNEGO-session-encrypted"
BOUNDARY = b"--Encrypted Boundary"
ENCRYPTED_CONTENT_TYPE = f'multipart/encrypted;protocol="{ENCRYPTED_PROTOCOL}";boundary="Encrypted Boundary"'
# What a 401 offers: Negotiate (NTLM; Kerberos needs a domain the lab does not have) and Basic, as a server configured
# for Ansible (Basic enabled) answers.
CHALLENGES = ("Negotiate", 'Basic realm="WSMAN"')

# WSMan:\localhost\Service\AllowUnencrypted and its Group Policy (policy wins).
SERVICE_KEY = "HKLM:\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\WSMAN\\Service"
SERVICE_VALUE = "allow_unencrypted"
POLICY_KEY = "HKLM:\\SOFTWARE\\Policies\\Microsoft\\Windows\\WinRM\\Service"
POLICY_VALUE = "AllowUnencryptedTraffic"

# pyspnego's NTLM acceptor reads its accounts from the file named by the process-wide NTLM_USER_FILE. Each simulated
# host has its own account, so every acceptor step runs with the variable naming that host's file, under this lock.
_ENV_LOCK = threading.Lock()
_STORE_LOCK = threading.Lock()
_store_dirs: list[str] = []


class AuthRejected(Exception):
    """The request is answered with 401 (and the connection forgets its authentication)."""


class BadMessage(Exception):
    """An encrypted message that cannot be unsealed: 400."""


def _account_store(host: WindowsHost) -> str:
    """A credential file (Heimdal format DOMAIN:USER:PASSWORD) with the host's local account under the names a
    client may give it: ``user``, ``.\\user`` and ``HOSTNAME\\user``."""
    username, password = host.username, host.password
    if ":" in username or ":" in password or "\n" in username + password:
        raise AuthRejected("the lab's NTLM acceptor cannot hold an account whose name or password has ':' or a newline")
    hostname = host.system.hostname
    text = "".join(f"{domain}:{username}:{password}\n" for domain in ("", ".", hostname))
    with _STORE_LOCK:
        if not _store_dirs:
            _store_dirs.append(tempfile.mkdtemp(prefix="rdplab-ntlm-"))
            atexit.register(shutil.rmtree, _store_dirs[0], True)
        path = os.path.join(_store_dirs[0], hashlib.sha256(text.encode("utf-8")).hexdigest()[:32])
        if not os.path.exists(path):
            fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(path + ".tmp", path)
    return path


def _with_store(store: str, action: t.Callable[[], t.Any]) -> t.Any:
    with _ENV_LOCK:
        previous = os.environ.get("NTLM_USER_FILE")
        os.environ["NTLM_USER_FILE"] = store
        try:
            return action()
        finally:
            if previous is None:
                os.environ.pop("NTLM_USER_FILE", None)
            else:
                os.environ["NTLM_USER_FILE"] = previous


def allows_unencrypted(host: WindowsHost) -> bool:
    """AllowUnencrypted of the host's WinRM service (default false); the Group Policy value wins when set."""
    with host.lock:
        policy = host.registry.dword(POLICY_KEY, POLICY_VALUE)
        if policy is not None:
            return policy == 1
        return host.registry.dword(SERVICE_KEY, SERVICE_VALUE) == 1


def allows_credssp(host: WindowsHost) -> bool:
    """WSMan:\\localhost\\Service\\Auth\\CredSSP (Enable-WSManCredSSP -Role Server); false by default."""
    with host.lock:
        policy = host.registry.dword(POLICY_KEY, "AllowCredSSP")
        if policy is not None:
            return policy == 1
        return host.registry.dword(SERVICE_KEY, "auth_credssp") == 1


def basic_matches(host: WindowsHost, header_value: str) -> bool:
    try:
        decoded = base64.b64decode(header_value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return False
    user, _colon, password = decoded.partition(":")
    # Windows account names are case-insensitive, passwords are not.
    wanted = host.username.lower()
    user_ok = user.lower() == wanted or user.lower().endswith("\\" + wanted)
    return user_ok and hmac.compare_digest(password.encode("utf-8"), host.password.encode("utf-8"))


@dataclass
class Decision:
    """What to do with one request: go on (``proceed``) or answer 401; headers to add either way."""

    proceed: bool
    headers: list[tuple[str, str]] = field(default_factory=list)


class ConnectionAuth:
    """The authentication state of one connection to one host's listener."""

    def __init__(self, tls: bool) -> None:
        self.tls = tls
        self.context: t.Any = None  # a complete pyspnego acceptor after a successful Negotiate exchange
        self._pending: t.Any = None  # an acceptor in the middle of the exchange
        self.scheme: str | None = None  # "basic" or "negotiate" once authenticated
        self.user: str | None = None

    def challenge(self, host: WindowsHost | None = None) -> list[tuple[str, str]]:
        offered = list(CHALLENGES)
        if host is not None and self.tls and allows_credssp(host):
            # CredSSP is offered only over HTTPS here (over HTTP it would need its own message wrapping).
            offered.append("CredSSP")
        return [("WWW-Authenticate", value) for value in offered]

    def forget(self) -> None:
        self.context = self._pending = self.scheme = self.user = None

    def authenticate(self, host: WindowsHost, authorization: str) -> Decision:
        """Check the Authorization header of a request (absent: the connection's earlier Negotiate, if any)."""
        scheme, _space, value = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if not authorization.strip():
            if self.scheme == "negotiate" and self.context is not None:
                return Decision(True)
            self.forget()
            return Decision(False, self.challenge(host))
        if scheme == "basic":
            self.forget()
            if basic_matches(host, value):
                self.scheme, self.user = "basic", host.username
                return Decision(True)
            return Decision(False, self.challenge(host))
        if scheme == "negotiate":
            return self._negotiate(host, value, "negotiate")
        if scheme == "credssp" and self.tls and allows_credssp(host):
            return self._negotiate(host, value, "credssp")
        self.forget()
        return Decision(False, self.challenge(host))

    def _negotiate(self, host: WindowsHost, value: str, protocol: str) -> Decision:
        try:
            token = base64.b64decode(value.strip(), validate=True)
        except binascii.Error:
            self.forget()
            return Decision(False, self.challenge(host))
        if self._pending is None:
            # A new exchange (also on an authenticated connection: the client re-authenticates).
            self.forget()
        try:
            store = _account_store(host)
            if self._pending is None:
                options = (
                    spnego.NegotiateOptions.use_negotiate if protocol == "negotiate" else spnego.NegotiateOptions.none
                )
                self._pending = _with_store(store, lambda: spnego.server(protocol=protocol, options=options))
            pending = self._pending
            out_token = _with_store(store, lambda: pending.step(token))
        except (SpnegoError, AuthRejected, ValueError) as exc:
            LOG.info("%s logon to %s failed: %s", protocol, host.name, exc)
            self.forget()
            return Decision(False, self.challenge(host))
        name = "Negotiate" if protocol == "negotiate" else "CredSSP"
        headers = [("WWW-Authenticate", f"{name} " + base64.b64encode(out_token).decode())] if out_token else []
        if not pending.complete:
            return Decision(False, headers)
        self.context, self._pending = pending, None
        self.scheme, self.user = protocol, str(getattr(pending, "client_principal", None) or host.username)
        return Decision(True, headers)

    # -- message encryption ---------------------------------------------------------------------------------------

    def unseal(self, content_type: str, body: bytes) -> tuple[bytes, bool]:
        """The SOAP message of a request and whether it came sealed."""
        lowered = content_type.lower()
        if not lowered.startswith("multipart/encrypted"):
            return body, False
        if f'protocol="{ENCRYPTED_PROTOCOL.lower()}"' not in lowered:
            raise BadMessage(f"unsupported encryption protocol in {content_type!r}")
        if self.scheme != "negotiate" or self.context is None:
            raise AuthRejected("a sealed message on a connection without an NTLM session")
        message = b""
        position = 0
        for match in re.finditer(rb"OriginalContent: type=[^\r\n]*?Length=(\d+)\r\n", body):
            if match.start() < position:
                continue
            length = int(match.group(1))
            marker = b"\tContent-Type: application/octet-stream\r\n"
            start = body.find(marker, match.end())
            if start < 0:
                raise BadMessage("an encrypted part without its application/octet-stream payload")
            start += len(marker)
            (header_length,) = struct.unpack("<I", body[start : start + 4])
            header = body[start + 4 : start + 4 + header_length]
            data = body[start + 4 + header_length : start + 4 + header_length + length]
            try:
                plain = self.context.unwrap_winrm(header, data)
            except SpnegoError as exc:
                raise BadMessage(f"the message signature does not verify: {exc}") from exc
            if len(plain) != length:
                raise BadMessage("the unsealed length differs from OriginalContent's Length")
            message += plain
            position = start + 4 + header_length + length
        if position == 0:
            raise BadMessage("a multipart/encrypted body without an encrypted part")
        return message, True

    def seal(self, message: bytes) -> bytes:
        result = self.context.wrap_winrm(message)
        sealed: bytes = (
            BOUNDARY + b"\r\n"
            b"\tContent-Type: " + ENCRYPTED_PROTOCOL.encode() + b"\r\n"
            b"\tOriginalContent: type=application/soap+xml;charset=UTF-8;Length="
            + str(len(message) + result.padding_length).encode()
            + b"\r\n"
            + BOUNDARY
            + b"\r\n\tContent-Type: application/octet-stream\r\n"
            + struct.pack("<I", len(result.header))
            + result.header
            + result.data
            + BOUNDARY
            + b"--\r\n"
        )
        return sealed
