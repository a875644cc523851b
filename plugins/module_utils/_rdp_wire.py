# Copyright: rdpfix contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Socket helpers shared by the RDP probe: exact reads, and turning every network failure into a named status.

A probe must report what it met, never raise: every exception a peer can provoke is mapped here to a short,
stable status word plus a human-readable detail.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import socket
import ssl
import time
import typing as t

# datetime.UTC exists only from Python 3.11; the module may run wherever it is delegated, on older Pythons too.
UTC = datetime.timezone.utc  # noqa: UP017


class ProbeError(Exception):
    """A peer did something that ends this trial; ``status`` is the word the report uses."""

    def __init__(self, status: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class PeerClosed(ProbeError):
    """The peer closed the connection (FIN or RST) before sending what the protocol requires."""

    def __init__(self, detail: str, received: bytes = b"") -> None:
        super().__init__("closed", detail)
        self.received = received


class ProtocolViolation(ProbeError):
    """The peer answered, but not with the protocol expected: garbage, truncated PDUs, another service."""

    def __init__(self, detail: str) -> None:
        super().__init__("invalid", detail)


class Receiver(t.Protocol):
    """Anything bytes can be read from: a socket, or the probe's TLS channel."""

    def recv(self, size: int, /) -> bytes: ...


def recv_exact(sock: Receiver, count: int, what: str) -> bytes:
    """Read exactly ``count`` bytes or raise PeerClosed naming ``what`` was being read."""
    chunks: list[bytes] = []
    remaining = count
    while remaining > 0:
        chunk = sock.recv(remaining)
        if not chunk:
            got = b"".join(chunks)
            raise PeerClosed(f"connection closed by the server after {len(got)} of {count} bytes of {what}", got)
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def identify_foreign_protocol(data: bytes) -> str | None:
    """Name the service a non-RDP answer most likely comes from, so the report says more than 'garbage'."""
    # Only the 4-byte TPKT header may have been read, so match on short prefixes.
    if data.startswith(b"HTTP"):
        return "an HTTP server"
    if data.startswith(b"SSH-"):
        return "an SSH server"
    if len(data) >= 3 and data[0] in (0x15, 0x16) and data[1] == 0x03:
        return "a plain TLS server (TLS record before any X.224 exchange)"
    if data[:4] in (b"220 ", b"220-"):
        return "an FTP/SMTP-style text server"
    return None


# errno values that mean "the other side (or something on the path) actively dropped us".
_RESET_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED}
_UNREACHABLE_ERRNOS = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}


def classify_exception(exc: BaseException) -> tuple[str, str]:
    """Map any exception raised during a trial to (status, detail).

    Status words: refused, timeout, reset, closed, unreachable, unresolved, invalid, error, and for TLS
    tls_alert, wrong_version, client_unsupported, tls_error.
    """
    if isinstance(exc, ProbeError):
        return exc.status, exc.detail
    if isinstance(exc, ssl.SSLError):
        return _classify_ssl_error(exc)
    if isinstance(exc, socket.gaierror):
        return "unresolved", f"name resolution failed: {exc.strerror or exc}"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout", "no answer before the timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused", "connection refused (nothing listens on that port, or a firewall rejects)"
    if isinstance(exc, OSError):
        if exc.errno in _RESET_ERRNOS:
            return "reset", f"connection reset by the server ({exc.strerror or exc})"
        if exc.errno in _UNREACHABLE_ERRNOS:
            return "unreachable", f"no route to the server ({exc.strerror or exc})"
        if exc.errno == errno.ECONNREFUSED:
            return "refused", "connection refused"
        return "error", f"{type(exc).__name__}: {exc}"
    return "error", f"{type(exc).__name__}: {exc}"


def _classify_ssl_error(exc: ssl.SSLError) -> tuple[str, str]:
    reason = getattr(exc, "reason", None) or ""
    text = str(exc)
    if isinstance(exc, ssl.SSLEOFError) or "UNEXPECTED_EOF" in reason or "EOF occurred" in text:
        return "closed", "the server closed the connection during the TLS handshake"
    if isinstance(exc, ssl.SSLZeroReturnError):
        return "closed", "the server ended the TLS session"
    if "ALERT" in reason.upper():
        # e.g. TLSV1_ALERT_PROTOCOL_VERSION, SSLV3_ALERT_HANDSHAKE_FAILURE: the server refused, and said why.
        return "tls_alert", f"the server refused the TLS handshake with alert {reason}"
    if reason == "NO_PROTOCOLS_AVAILABLE":
        return "client_unsupported", f"this machine's TLS library cannot offer that version ({reason})"
    if reason in {"UNSUPPORTED_PROTOCOL", "VERSION_TOO_LOW", "UNSUPPORTED_PROTOCOL_VERSION"}:
        # The ServerHello named a version other than the only one offered: the server refuses the offered one.
        return "wrong_version", f"the server answered with a different TLS version ({reason})"
    if reason in {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"}:
        return "invalid", f"the server's answer is not TLS ({reason})"
    return "tls_error", f"TLS handshake failed: {reason or text}"


class Stopwatch:
    """Milliseconds since creation; timings are reported, never asserted."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def elapsed_ms(self) -> float:
        return round((time.monotonic() - self._start) * 1000.0, 1)


def close_quietly(sock: socket.socket | ssl.SSLSocket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.close()


def connect_tcp(address: tuple[t.Any, ...], family: int, timeout: float) -> socket.socket:
    """Open one TCP connection to an already resolved address (no DNS here: every trial hits the same host)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock
