"""The RDP endpoint of a simulated host: X.224 negotiation, TLS, and the first CredSSP (NTLM) exchange.

What a new connection meets follows ``WindowsHost.rdp_view()`` at the moment it arrives, as on Windows where
TermService reads its listener settings when the listener starts and Schannel builds the TLS credential per connection.
Only connection setup is modelled ([MS-RDPBCGR] 1.3.1.1 up to the TLS handshake, [MS-CSSP] up to the NTLM CHALLENGE):
enough for a client or probe to see what an administrator's mstsc would meet: a refused connection, one the firewall
drops (the client's connect times out), a negotiation failure code, a reset after the X.224 exchange (0x904 /
extended 0x7), or a certificate.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
import typing as t
import warnings
from dataclasses import dataclass
from pathlib import Path

from rdplab.model import schannel

if t.TYPE_CHECKING:
    from rdplab.model.host import RdpView, WindowsHost

LOG = logging.getLogger("rdplab.rdp")

PROTOCOL_RDP = 0x0
PROTOCOL_SSL = 0x1
PROTOCOL_HYBRID = 0x2
PROTOCOL_RDSTLS = 0x4
PROTOCOL_HYBRID_EX = 0x8

SSL_REQUIRED_BY_SERVER = 1
SSL_NOT_ALLOWED_BY_SERVER = 2
SSL_CERT_NOT_ON_SERVER = 3
INCONSISTENT_FLAGS = 4
HYBRID_REQUIRED_BY_SERVER = 5
SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER = 6

FAILURE_NAMES = {
    SSL_REQUIRED_BY_SERVER: "SSL_REQUIRED_BY_SERVER",
    SSL_NOT_ALLOWED_BY_SERVER: "SSL_NOT_ALLOWED_BY_SERVER",
    SSL_CERT_NOT_ON_SERVER: "SSL_CERT_NOT_ON_SERVER",
    INCONSISTENT_FLAGS: "INCONSISTENT_FLAGS",
    HYBRID_REQUIRED_BY_SERVER: "HYBRID_REQUIRED_BY_SERVER",
    SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER: "SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER",
}

# RDP_NEG_RSP flags a current Windows server sets: EXTENDED_CLIENT_DATA_SUPPORTED | DYNVC_GFX_PROTOCOL_SUPPORTED |
# the reserved 0x04 | RESTRICTED_ADMIN_MODE_SUPPORTED | REDIRECTED_AUTHENTICATION_MODE_SUPPORTED.
NEG_RSP_FLAGS = 0x1F
# Windows fills the X.224 Connection Confirm's source reference with 0x1234; other servers leave 0.
WINDOWS_SRC_REF = 0x1234

CLIENT_READ_TIMEOUT = 10.0
# How often each listener re-reads its host's view besides the changes it is told about (HostSlot.changed).
RESYNC_INTERVAL = 1.0

TLS_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.0": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


class ProtocolViolation(Exception):
    """The client sent something that is not an X.224 Connection Request."""


@dataclass(frozen=True)
class ConnectionRequest:
    cookie: str | None
    requested_protocols: int | None  # None: no RDP_NEG_REQ (a pre-RDP 5.0 client: native RDP security only)
    flags: int


def parse_connection_request(packet: bytes) -> ConnectionRequest:
    """Decode TPKT + X.224 Connection Request (+ cookie, + RDP_NEG_REQ)."""
    if len(packet) < 11 or packet[0] != 3:
        raise ProtocolViolation("not a TPKT packet")
    length = struct.unpack(">H", packet[2:4])[0]
    if length != len(packet):
        raise ProtocolViolation(f"TPKT length {length} does not match the {len(packet)} bytes received")
    indicator, code = packet[4], packet[5]
    if code & 0xF0 != 0xE0:
        raise ProtocolViolation(f"X.224 TPDU code {code:#04x} is not a Connection Request")
    if indicator != len(packet) - 5:
        raise ProtocolViolation("X.224 length indicator does not match the packet")
    rest = packet[11:]
    cookie = None
    if rest.startswith(b"Cookie:"):
        end = rest.find(b"\r\n")
        if end < 0:
            raise ProtocolViolation("unterminated cookie")
        cookie = rest[:end].decode("ascii", errors="replace")
        rest = rest[end + 2 :]
    if len(rest) >= 8 and rest[0] == 0x01:
        flags = rest[1]
        neg_length, requested = struct.unpack("<HI", rest[2:8])
        if neg_length != 8:
            raise ProtocolViolation(f"RDP_NEG_REQ length {neg_length} is not 8")
        return ConnectionRequest(cookie, requested, flags)
    return ConnectionRequest(cookie, None, 0)


def _confirm(negotiation: bytes) -> bytes:
    x224 = struct.pack(">BBHHB", 6 + len(negotiation), 0xD0, 0, WINDOWS_SRC_REF, 0) + negotiation
    return struct.pack(">BBH", 3, 0, 4 + len(x224)) + x224


def confirm_response(selected: int) -> bytes:
    """X.224 Connection Confirm carrying RDP_NEG_RSP."""
    return _confirm(struct.pack("<BBHI", 0x02, NEG_RSP_FLAGS, 8, selected))


def confirm_failure(code: int) -> bytes:
    """X.224 Connection Confirm carrying RDP_NEG_FAILURE."""
    return _confirm(struct.pack("<BBHI", 0x03, 0, 8, code))


def negotiate(view: RdpView, requested: int | None) -> tuple[int | None, int | None]:
    """(selected protocol, None) or (None, failure code), the way a Windows server decides.

    The view's ``accepted_protocols`` says which of SSL / HYBRID / HYBRID_EX the server would select; ``rdp_only``
    (SecurityLayer 0) means it answers native RDP security only.
    """
    asked = requested or 0
    if view.rdp_only:
        if asked & (PROTOCOL_SSL | PROTOCOL_HYBRID | PROTOCOL_HYBRID_EX) and not asked & ~(
            PROTOCOL_SSL | PROTOCOL_HYBRID | PROTOCOL_HYBRID_EX | PROTOCOL_RDSTLS
        ):
            # Only enhanced security requested, and the server does not do TLS at all.
            return None, SSL_NOT_ALLOWED_BY_SERVER
        return PROTOCOL_RDP, None
    accepted = view.accepted_protocols
    for candidate in (PROTOCOL_HYBRID_EX, PROTOCOL_HYBRID, PROTOCOL_SSL):
        if asked & candidate and accepted & candidate:
            return candidate, None
    nla_required = not accepted & PROTOCOL_SSL and accepted & (PROTOCOL_HYBRID | PROTOCOL_HYBRID_EX)
    if nla_required:
        return None, HYBRID_REQUIRED_BY_SERVER
    if not accepted:
        # No enhanced protocol available and native RDP not allowed either.
        return None, SSL_NOT_ALLOWED_BY_SERVER if asked else SSL_REQUIRED_BY_SERVER
    return None, SSL_REQUIRED_BY_SERVER


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0), as Windows does when it drops a connection during setup."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _close_listener(sock: socket.socket) -> None:
    """Stop listening at once. close() alone leaves the socket accepting connections while the accept loop's
    select() still holds it; shutdown() on a listening socket ends that and wakes the loop (Linux)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ProtocolViolation("the client closed the connection")
        data.extend(chunk)
    return bytes(data)


def read_tpkt(sock: socket.socket) -> bytes:
    header = _recv_exact(sock, 4)
    if header[0] != 3:
        raise ProtocolViolation("not a TPKT packet")
    length = struct.unpack(">H", header[2:4])[0]
    if length < 11:
        raise ProtocolViolation(f"TPKT length {length} too short for a Connection Request")
    return header + _recv_exact(sock, length - 4)


class _TlsContexts:
    """Server SSLContexts by certificate, key, TLS versions and suites (building one per connection is wasteful)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[bytes, ssl.SSLContext] = {}

    def get(
        self, cert_pem: bytes, key_pem: bytes, versions: t.Sequence[str], suites: t.Sequence[str] | None = None
    ) -> ssl.SSLContext:
        """suites: OpenSSL names of the TLS 1.0-1.2 suites to offer; None for the TLS library's defaults."""
        known = sorted({TLS_VERSIONS[v] for v in versions if v in TLS_VERSIONS})
        if not known:
            raise ValueError(f"no TLS version the lab can serve among {list(versions)}")
        if suites is not None and not suites:
            raise ValueError("no cipher suite to offer")
        cipher_list = ":".join(suites) if suites is not None else "DEFAULT"
        material = b"\0".join([cert_pem, key_pem, ",".join(map(str, known)).encode(), cipher_list.encode()])
        digest = hashlib.sha256(material).digest()
        with self._lock:
            context = self._cache.get(digest)
            if context is None:
                context = self._build(cert_pem, key_pem, known[0], known[-1], cipher_list)
                self._cache[digest] = context
            return context

    @staticmethod
    def _build(
        cert_pem: bytes, key_pem: bytes, lowest: ssl.TLSVersion, highest: ssl.TLSVersion, cipher_list: str
    ) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            # TLS 1.0/1.1 are deprecated in Python; the lab still serves them when a host model enables them.
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = lowest
            context.maximum_version = highest
        if lowest < ssl.TLSVersion.TLSv1_2:
            # OpenSSL 3 refuses TLS 1.0/1.1 above security level 0.
            cipher_list += ":@SECLEVEL=0"
        if cipher_list != "DEFAULT":
            context.set_ciphers(cipher_list)
        with tempfile.TemporaryDirectory(prefix="rdplab-rdp-") as directory:
            cert_path, key_path = Path(directory) / "cert.pem", Path(directory) / "key.pem"
            cert_path.write_bytes(cert_pem)
            key_path.touch(mode=0o600)
            key_path.write_bytes(key_pem)
            context.load_cert_chain(str(cert_path), str(key_path))
        return context


TLS_CONTEXTS = _TlsContexts()


# --- the TLS ClientHello, read without consuming it ([RFC 8446] 4.1.2, 4.2.1; [RFC 5246] 7.4.1.2) ------------------

TLS_HANDSHAKE_RECORD = 22
TLS_ALERT_RECORD = 21
CLIENT_HELLO = 1
EXTENSION_SUPPORTED_VERSIONS = 0x002B
TLS13 = 0x0304
PROTOCOL_VERSIONS = {0x0301: "TLSv1", 0x0302: "TLSv1.1", 0x0303: "TLSv1.2", 0x0304: "TLSv1.3"}
PEEK_INTERVAL = 0.01
# Fatal alerts a client can send, by the reason OpenSSL reports for them on the server side (RFC 5246 7.2).
ALERT_REASONS = {
    "SSLV3_ALERT_HANDSHAKE_FAILURE": 40,
    "SSLV3_ALERT_BAD_CERTIFICATE": 42,
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": 43,
    "SSLV3_ALERT_CERTIFICATE_REVOKED": 44,
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": 45,
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": 46,
    "TLSV1_ALERT_UNKNOWN_CA": 48,
    "TLSV1_ALERT_ACCESS_DENIED": 49,
    "TLSV1_ALERT_DECODE_ERROR": 50,
    "TLSV1_ALERT_DECRYPT_ERROR": 51,
    "TLSV1_ALERT_PROTOCOL_VERSION": 70,
    "TLSV1_ALERT_INSUFFICIENT_SECURITY": 71,
    "TLSV1_ALERT_INTERNAL_ERROR": 80,
}


def client_hello(data: bytes) -> bytes | None:
    """The body of the ClientHello carried by the handshake records at the start of ``data``; None while it has not
    fully arrived. ProtocolViolation when the client sends something else."""
    payload = bytearray()
    offset = 0
    while True:
        if len(data) < offset + 5:
            return None
        if data[offset] != TLS_HANDSHAKE_RECORD or data[offset + 1] != 3:
            raise ProtocolViolation("the client did not start a TLS handshake")
        length = struct.unpack(">H", data[offset + 3 : offset + 5])[0]
        if len(data) < offset + 5 + length:
            return None
        payload += data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if len(payload) >= 4:
            if payload[0] != CLIENT_HELLO:
                raise ProtocolViolation("the first TLS handshake message is not a ClientHello")
            size = int.from_bytes(payload[1:4], "big")
            if len(payload) >= 4 + size:
                return bytes(payload[4 : 4 + size])


def offered_versions(body: bytes) -> list[int]:
    """The protocol versions a ClientHello offers: its supported_versions extension, else every version up to its
    legacy_version (how TLS 1.2 and earlier clients say what they allow)."""
    try:
        legacy = struct.unpack(">H", body[0:2])[0]
        position = 2 + 32  # legacy_version, random
        position += 1 + body[position]  # legacy_session_id
        position += 2 + struct.unpack(">H", body[position : position + 2])[0]  # cipher_suites
        position += 1 + body[position]  # legacy_compression_methods
        if position + 2 <= len(body):
            end = position + 2 + struct.unpack(">H", body[position : position + 2])[0]
            position += 2
            while position + 4 <= end:
                kind, size = struct.unpack(">HH", body[position : position + 4])
                data = body[position + 4 : position + 4 + size]
                if kind == EXTENSION_SUPPORTED_VERSIONS:
                    return [struct.unpack(">H", data[i : i + 2])[0] for i in range(1, min(data[0], len(data) - 1), 2)]
                position += 4 + size
    except (IndexError, struct.error) as exc:
        raise ProtocolViolation("truncated ClientHello") from exc
    return [version for version in PROTOCOL_VERSIONS if version <= legacy]


def peek_client_hello(sock: socket.socket, timeout: float = CLIENT_READ_TIMEOUT) -> bytes:
    """Wait for the whole ClientHello and return its body, leaving every byte in the socket for the TLS server."""
    deadline = time.monotonic() + timeout
    while True:
        data = sock.recv(65536, socket.MSG_PEEK)
        if not data:
            raise ProtocolViolation("the client closed the connection before its ClientHello")
        body = client_hello(data)
        if body is not None:
            return body
        if time.monotonic() > deadline:
            raise ProtocolViolation("the ClientHello did not arrive in time")
        # A peek returns at once while part of the hello is buffered: wait a little for the rest.
        time.sleep(PEEK_INTERVAL)


def best_common_version(offered: t.Sequence[int], served: t.Sequence[str]) -> str | None:
    """The highest protocol both sides allow (what the handshake would have used), as the ssl module names it."""
    common = sorted(code for code in set(offered) if PROTOCOL_VERSIONS.get(code) in served)
    return PROTOCOL_VERSIONS[common[-1]] if common else None


def tls_failure(exc: ssl.SSLError, hello_read: bool) -> dict[str, t.Any]:
    """What a failed server-side handshake means for Schannel's events (rdplab.model.schannel), by OpenSSL's reason."""
    reason = str(getattr(exc, "reason", "") or "")
    if reason == "NO_SHARED_CIPHER":
        return {"tls_failure": schannel.NO_COMMON_CIPHER}
    if reason in ("UNSUPPORTED_PROTOCOL", "VERSION_TOO_LOW", "VERSION_TOO_HIGH"):
        # The ClientHello's supported_versions left nothing in common: the server sent protocol_version.
        return {"tls_failure": schannel.NO_COMMON_PROTOCOL}
    if reason in ALERT_REASONS:
        return {"tls_failure": schannel.ALERT_RECEIVED, "alert": ALERT_REASONS[reason]}
    if reason == "WRONG_VERSION_NUMBER" and hello_read:
        # After a proper ClientHello, the client's next record carries another version than the one the server
        # chose: a client that offered no supported_versions (TLS 1.2 and older) refusing the older version it was
        # answered with. Its record is the protocol_version alert OpenSSL cannot read under the wrong version.
        return {"tls_failure": schannel.ALERT_RECEIVED, "alert": schannel.ALERT_PROTOCOL_VERSION}
    return {}


def fatal_alert(description: int, version: int = 0x0303) -> bytes:
    """A TLS alert record: level fatal (2) and the description."""
    return struct.pack(">BHHBB", TLS_ALERT_RECORD, version, 2, 2, description)


# --- CredSSP / NTLM: the server's first answer, built by hand ([MS-CSSP] 2.2.1, [MS-NLMP] 2.2.1.2) ----------------

NTLM_SIGNATURE = b"NTLMSSP\0"
NTLMSSP_NEGOTIATE_UNICODE = 0x00000001
NTLMSSP_REQUEST_TARGET = 0x00000004
NTLMSSP_NEGOTIATE_SIGN = 0x00000010
NTLMSSP_NEGOTIATE_SEAL = 0x00000020
NTLMSSP_NEGOTIATE_NTLM = 0x00000200
NTLMSSP_NEGOTIATE_ALWAYS_SIGN = 0x00008000
NTLMSSP_TARGET_TYPE_DOMAIN = 0x00010000
NTLMSSP_TARGET_TYPE_SERVER = 0x00020000
NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY = 0x00080000
NTLMSSP_NEGOTIATE_TARGET_INFO = 0x00800000
NTLMSSP_NEGOTIATE_VERSION = 0x02000000
NTLMSSP_NEGOTIATE_128 = 0x20000000
NTLMSSP_NEGOTIATE_KEY_EXCH = 0x40000000
NTLMSSP_NEGOTIATE_56 = 0x80000000
# Flags the server echoes when the client offers them.
_ECHOED_FLAGS = (
    NTLMSSP_NEGOTIATE_UNICODE
    | NTLMSSP_NEGOTIATE_SIGN
    | NTLMSSP_NEGOTIATE_SEAL
    | NTLMSSP_NEGOTIATE_ALWAYS_SIGN
    | NTLMSSP_NEGOTIATE_EXTENDED_SESSIONSECURITY
    | NTLMSSP_NEGOTIATE_128
    | NTLMSSP_NEGOTIATE_KEY_EXCH
    | NTLMSSP_NEGOTIATE_56
)

MSV_AV_EOL = 0
MSV_AV_NB_COMPUTER_NAME = 1
MSV_AV_NB_DOMAIN_NAME = 2
MSV_AV_DNS_COMPUTER_NAME = 3
MSV_AV_DNS_DOMAIN_NAME = 4
MSV_AV_DNS_TREE_NAME = 5
MSV_AV_TIMESTAMP = 7

CREDSSP_VERSION = 6


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def _der(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


def _der_read(data: bytes, offset: int) -> tuple[int, bytes, int]:
    """(tag, content, offset after the element) of the DER element at offset."""
    if offset + 2 > len(data):
        raise ProtocolViolation("truncated DER element")
    tag, first = data[offset], data[offset + 1]
    offset += 2
    if first & 0x80:
        count = first & 0x7F
        if count == 0 or count > 4 or offset + count > len(data):
            raise ProtocolViolation("bad DER length")
        length = int.from_bytes(data[offset : offset + count], "big")
        offset += count
    else:
        length = first
    if offset + length > len(data):
        raise ProtocolViolation("truncated DER element")
    return tag, data[offset : offset + length], offset + length


def parse_ts_request(data: bytes) -> tuple[int, bytes | None]:
    """(version, first negoToken) of a TSRequest; unknown context tags are skipped."""
    tag, body, _end = _der_read(data, 0)
    if tag != 0x30:
        raise ProtocolViolation("a TSRequest is a DER SEQUENCE")
    version, token = 0, None
    offset = 0
    while offset < len(body):
        field_tag, content, offset = _der_read(body, offset)
        if field_tag == 0xA0:
            _tag, raw, _end = _der_read(content, 0)
            version = int.from_bytes(raw, "big")
        elif field_tag == 0xA1:
            # negoTokens: SEQUENCE OF SEQUENCE { [0] OCTET STRING }
            _tag, items, _end = _der_read(content, 0)
            _tag, item, _end = _der_read(items, 0)
            _tag, wrapped, _end = _der_read(item, 0)
            _tag, token, _end = _der_read(wrapped, 0)
    return version, token


def ts_request(token: bytes, version: int = CREDSSP_VERSION) -> bytes:
    version_field = _der(0xA0, _der(0x02, bytes([version])))
    tokens = _der(0xA1, _der(0x30, _der(0x30, _der(0xA0, _der(0x04, token)))))
    return _der(0x30, version_field + tokens)


def windows_version(os_build: int) -> tuple[int, int]:
    """(major, minor) NT version reported in NTLM VERSION for a build number."""
    if os_build >= 10240:
        return 10, 0
    if os_build >= 9600:
        return 6, 3
    if os_build >= 9200:
        return 6, 2
    if os_build >= 7600:
        return 6, 1
    return 6, 0


@dataclass(frozen=True)
class NtlmIdentity:
    """The names a Windows server announces in its NTLM CHALLENGE."""

    computer: str  # NetBIOS computer name, e.g. "WEB01"
    dns_computer: str  # FQDN, e.g. "web01.corp.example.com" or "web01" in a workgroup
    domain: str | None  # DNS domain, None in a workgroup
    os_build: int


def _av_pair(av_id: int, value: bytes) -> bytes:
    return struct.pack("<HH", av_id, len(value)) + value


def ntlm_challenge(identity: NtlmIdentity, client_flags: int, server_challenge: bytes, now: float) -> bytes:
    netbios = identity.computer.upper()[:15]
    if identity.domain:
        nb_domain = identity.domain.split(".")[0].upper()[:15]
        target_name, target_type = nb_domain, NTLMSSP_TARGET_TYPE_DOMAIN
        dns_domain: str = identity.domain
    else:
        # A workgroup server names itself as the domain.
        nb_domain, target_name, target_type = netbios, netbios, NTLMSSP_TARGET_TYPE_SERVER
        dns_domain = identity.dns_computer
    filetime = int(now * 10_000_000) + 116444736000000000
    pairs = [
        _av_pair(MSV_AV_NB_DOMAIN_NAME, nb_domain.encode("utf-16-le")),
        _av_pair(MSV_AV_NB_COMPUTER_NAME, netbios.encode("utf-16-le")),
        _av_pair(MSV_AV_DNS_DOMAIN_NAME, dns_domain.encode("utf-16-le")),
        _av_pair(MSV_AV_DNS_COMPUTER_NAME, identity.dns_computer.encode("utf-16-le")),
    ]
    if identity.domain:
        pairs.append(_av_pair(MSV_AV_DNS_TREE_NAME, identity.domain.encode("utf-16-le")))
    pairs.append(_av_pair(MSV_AV_TIMESTAMP, struct.pack("<Q", filetime)))
    pairs.append(_av_pair(MSV_AV_EOL, b""))
    target_info = b"".join(pairs)
    target = target_name.encode("utf-16-le")
    flags = (
        (client_flags & _ECHOED_FLAGS)
        | NTLMSSP_NEGOTIATE_UNICODE
        | NTLMSSP_REQUEST_TARGET
        | NTLMSSP_NEGOTIATE_NTLM
        | target_type
        | NTLMSSP_NEGOTIATE_TARGET_INFO
        | NTLMSSP_NEGOTIATE_VERSION
    )
    major, minor = windows_version(identity.os_build)
    header_size = 56
    return (
        NTLM_SIGNATURE
        + struct.pack("<I", 2)
        + struct.pack("<HHI", len(target), len(target), header_size)
        + struct.pack("<I", flags)
        + server_challenge
        + b"\0" * 8
        + struct.pack("<HHI", len(target_info), len(target_info), header_size + len(target))
        + struct.pack("<BBH3xB", major, minor, identity.os_build & 0xFFFF, 15)
        + target
        + target_info
    )


def ntlm_identity(host: WindowsHost) -> NtlmIdentity:
    """The host's names and build, as system.info reports them (what Windows puts in its CHALLENGE)."""
    with host.lock:
        data = host.system.to_json()
    hostname = str(data.get("hostname") or host.name)
    domain = data.get("domain") or None
    fqdn = str(data.get("fqdn") or (f"{hostname}.{domain}" if domain else hostname))
    return NtlmIdentity(
        computer=hostname,
        dns_computer=fqdn.lower(),
        domain=str(domain).lower() if domain else None,
        os_build=int(str(data.get("os_build") or 17763)),
    )


# --- the listener ------------------------------------------------------------------------------------------------


class RdpEndpoint:
    """The RDP listener of one simulated host.

    A background thread keeps a listening socket on ``rdp_view().port`` while the view says ``listening`` (so a
    stopped TermService really refuses connections, and a PortNumber change moves the listener), and serves each
    connection in its own thread. Every connection re-reads the view; if the view stopped listening between the
    sync and the accept, the connection is reset at once.

    While the firewall blocks the port (``view.dropped``), the endpoint drops connections as Windows Firewall does:
    a listening socket with a backlog of 0 is filled by one connection of the lab's own that is never accepted, so
    the kernel discards every further SYN and the client's connect times out, with no reset and no RDP byte.
    """

    def __init__(self, address: str, host_getter: t.Callable[[], WindowsHost]) -> None:
        self.address = address
        self._host_getter = host_getter
        self._sock: socket.socket | None = None
        self.bound_port: int | None = None
        # Drop mode: the socket whose full accept queue makes the kernel discard SYNs, and the connection filling it.
        self._drop: tuple[socket.socket, socket.socket] | None = None
        self.dropping_port: int | None = None
        self._stop = threading.Event()
        # Set when the loop should look again at once (a new listening socket, the stop).
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._sync_lock = threading.Lock()

    @property
    def host(self) -> WindowsHost:
        return self._host_getter()

    def _view(self) -> RdpView:
        """Look at the view without it counting as a connection (the model logs and counts real ones)."""
        host = self.host
        with host.lock:
            return host.rdp_view(connect=False)

    def sync(self, strict: bool = False) -> None:
        """Bind, move or close the listening socket to match the host's view. strict: raise when binding fails."""
        with self._sync_lock:
            # Read the view under the lock: a concurrent sync with an older view must not undo this one.
            view = self._view()
            wanted = view.port if view.listening else None
            if wanted != self.bound_port and self._sock is not None:
                _close_listener(self._sock)
                self._sock, self.bound_port = None, None
            # After closing the listener (a port goes from listening to dropped), before binding it (and back).
            self._sync_drop(view.port if view.dropped else None, strict)
            if wanted is None or wanted == self.bound_port:
                return
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.address, wanted))
                sock.listen(16)
            except OSError as exc:
                sock.close()
                if strict:
                    raise OSError(
                        exc.errno, f"cannot listen for RDP on {self.address}:{wanted}: {exc.strerror}"
                    ) from exc
                LOG.error("%s: cannot listen for RDP on port %s: %s", self.address, wanted, exc)
                return
            self._sock, self.bound_port = sock, wanted
            self._wake.set()
            LOG.info("%s: RDP listening on port %s", self.address, wanted)

    def _sync_drop(self, port: int | None, strict: bool) -> None:
        if port == self.dropping_port:
            return
        if self._drop is not None:
            for sock in self._drop:
                sock.close()
            self._drop, self.dropping_port = None, None
        if port is None:
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.address, port))
            sock.listen(0)
            filler = socket.create_connection((self.address, port), timeout=2)
        except OSError as exc:
            sock.close()
            if strict:
                raise OSError(exc.errno, f"cannot drop RDP on {self.address}:{port}: {exc.strerror}") from exc
            LOG.error("%s: cannot drop RDP on port %s: %s", self.address, port, exc)
            return
        self._drop, self.dropping_port = (sock, filler), port
        LOG.info("%s: RDP on port %s dropped by the firewall", self.address, port)

    def start(self) -> None:
        self.sync(strict=True)
        self._thread = threading.Thread(target=self._loop, name=f"rdp-{self.address}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._sync_lock:
            # Closing the listener wakes the loop's select at once.
            if self._sock is not None:
                _close_listener(self._sock)
                self._sock, self.bound_port = None, None
            self._sync_drop(None, strict=False)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        # Every change the lab makes to a host (a command, a fault, a reset) calls sync() at once (HostSlot.changed);
        # the loop re-reads the view only every RESYNC_INTERVAL besides, so that a fleet of hundreds of hosts does not
        # spend its CPU polling idle views. A new listening socket wakes it (_wake), a closed one ends its select.
        next_sync = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_sync:
                try:
                    self.sync()
                except Exception:
                    LOG.exception("%s: reading the RDP view failed", self.address)
                next_sync = time.monotonic() + RESYNC_INTERVAL
            self._wake.clear()
            sock = self._sock
            if sock is None:
                self._wake.wait(RESYNC_INTERVAL)
                continue
            try:
                # poll, not select: select() refuses descriptors past 1024 (FD_SETSIZE), which a fleet of a few hundred
                # hosts reaches, and a loop that fails at once spins.
                poller = select.poll()
                poller.register(sock, select.POLLIN)
                if not poller.poll(RESYNC_INTERVAL * 1000):
                    continue
                client, _peer = sock.accept()
            except (OSError, ValueError):
                continue  # the socket was closed by a concurrent sync
            threading.Thread(target=self._serve, args=(client,), name=f"rdp-conn-{self.address}", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        host = self.host
        outcome: dict[str, t.Any] = {"outcome": "unknown"}
        try:
            outcome = self.handle(client, host)
        except Exception as exc:
            LOG.exception("%s: RDP connection failed in the lab", self.address)
            outcome = {"outcome": "lab_error", "detail": f"{type(exc).__name__}: {exc}"}
            _reset(client)
        finally:
            LOG.info("%s: RDP connection: %s", self.address, outcome)
            recorder = getattr(host, "record_rdp_attempt", None)
            if callable(recorder):
                with host.lock:
                    recorder(outcome)

    def handle(self, client: socket.socket, host: WindowsHost) -> dict[str, t.Any]:
        """Serve one connection; returns what it met (for the host's log and the tests)."""
        with host.lock:
            # A real connection attempt: the model counts rdp_connections and logs RCM's events.
            view = host.rdp_view()
        if not view.listening or view.port != self.bound_port:
            _reset(client)
            return {"outcome": "refused"}
        client.settimeout(CLIENT_READ_TIMEOUT)
        try:
            request = parse_connection_request(read_tpkt(client))
        except (ProtocolViolation, OSError) as exc:
            _reset(client)
            return {"outcome": "bad_request", "detail": str(exc)}
        selected, failure = negotiate(view, request.requested_protocols)
        base: dict[str, t.Any] = {"requested": request.requested_protocols}
        if failure is not None:
            client.sendall(confirm_failure(failure))
            client.close()
            return {**base, "outcome": "negotiation_failure", "failure": FAILURE_NAMES[failure], "code": failure}
        assert selected is not None
        if request.requested_protocols is None:
            # A legacy client cannot read RDP_NEG_RSP: answer the bare Connection Confirm.
            client.sendall(_confirm(b""))
        else:
            client.sendall(confirm_response(selected))
        base["selected"] = selected
        if selected == PROTOCOL_RDP:
            # Native RDP security (MCS, RSA key exchange) is not modelled: the lab stops after the confirm.
            client.close()
            return {**base, "outcome": "rdp_security"}
        if view.failure == "reset_after_x224" or (view.failure is None and not (view.cert_pem and view.key_pem)):
            # The certificate or its key cannot be used (RCM and Schannel logged why when the view was read):
            # Windows resets as soon as the ClientHello arrives.
            with contextlib.suppress(OSError):
                client.recv(1, socket.MSG_PEEK)
            _reset(client)
            return {**base, "outcome": "reset_after_x224"}
        try:
            offered: list[int] | None = offered_versions(peek_client_hello(client))
        except (ProtocolViolation, OSError):
            offered = None  # no readable ClientHello: no TLS handshake started, so Schannel has nothing to log
        if view.failure == schannel.NO_SERVER_PROTOCOL or not (view.cert_pem and view.key_pem):
            # No protocol to build the server credential with: the ClientHello meets a reset, as above.
            _reset(client)
            return {**base, "outcome": "reset_after_x224", **({"tls_failure": view.failure} if offered else {})}
        common = best_common_version(offered or [], view.tls_versions)
        try:
            context = TLS_CONTEXTS.get(view.cert_pem, view.key_pem, view.tls_versions, view.cipher_suites)
        except (ValueError, ssl.SSLError) as exc:
            if view.failure == schannel.NO_USABLE_CIPHER_SUITE and offered:
                # Not one suite the lab's TLS server could be given: answer the ClientHello as a server without a
                # common suite (or version) does, with a fatal alert (lab choice, as the TLS library cannot).
                return {**base, **self._refuse_handshake(client, offered, common), "tls_version_offered": common}
            with contextlib.suppress(OSError):
                client.recv(1, socket.MSG_PEEK)
            _reset(client)
            return {**base, "outcome": "reset_after_x224", "detail": str(exc)}
        try:
            tls = context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            client.close()
            meaning = tls_failure(exc, hello_read=bool(offered)) if isinstance(exc, ssl.SSLError) else {}
            return {**base, "outcome": "tls_failed", "detail": str(exc), "tls_version_offered": common, **meaning}
        try:
            base["tls_version"] = tls.version()
            if selected in (PROTOCOL_HYBRID, PROTOCOL_HYBRID_EX):
                return {**base, **self._credssp(tls, host)}
            return {**base, "outcome": "tls_established"}
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    @staticmethod
    def _refuse_handshake(client: socket.socket, offered: t.Sequence[int], common: str | None) -> dict[str, t.Any]:
        """Read the ClientHello, answer the fatal alert a server without a common protocol (70) or suite (40) sends,
        and close; reading first makes the close a FIN, so the client reads the alert rather than a reset."""
        if common is None:
            alert, failure = schannel.ALERT_PROTOCOL_VERSION, schannel.NO_COMMON_PROTOCOL
        else:
            alert, failure = schannel.ALERT_HANDSHAKE_FAILURE, schannel.NO_COMMON_CIPHER
        try:
            client.recv(65536)
            client.sendall(fatal_alert(alert, min(max(offered), 0x0303)))
        except OSError as exc:
            return {"outcome": "tls_failed", "detail": f"the client left first: {exc}"}
        finally:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()
        return {
            "outcome": "tls_failed",
            "detail": f"no cipher suite to offer: alert {alert} sent",
            "tls_failure": failure,
        }

    def _credssp(self, tls: ssl.SSLSocket, host: WindowsHost) -> dict[str, t.Any]:
        try:
            data = tls.recv(65536)
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            return {"outcome": "tls_established"}
        try:
            version, token = parse_ts_request(data)
        except ProtocolViolation as exc:
            return {"outcome": "tls_established", "detail": f"not a TSRequest: {exc}"}
        if token is None or not token.startswith(NTLM_SIGNATURE) or token[8:12] != struct.pack("<I", 1):
            return {"outcome": "tls_established", "detail": "the TSRequest does not carry an NTLM NEGOTIATE"}
        client_flags = struct.unpack("<I", token[12:16])[0] if len(token) >= 16 else 0
        challenge = ntlm_challenge(ntlm_identity(host), client_flags, os.urandom(8), time.time())
        tls.sendall(ts_request(challenge, min(max(version, 2), CREDSSP_VERSION)))
        # Credentials are never checked: the lab ends the exchange here, as a probe does.
        return {"outcome": "credssp_challenge"}
