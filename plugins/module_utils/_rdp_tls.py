# Copyright: rdpfix contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""TLS handshakes on a socket where X.224 negotiation selected a TLS-based protocol.

The probe wants to learn what the SERVER accepts, so the client side is as permissive as this machine's OpenSSL
allows (security level 0, old versions enabled): a refusal is then the server's, not ours. Nothing here trusts the
certificate; it is collected for the report only.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import typing as t
import warnings
from dataclasses import dataclass

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_wire import PeerClosed, close_quietly

TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLSv1.0": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
LEGACY_VERSIONS = ("TLSv1.0", "TLSv1.1")
# OpenSSL 3 refuses TLS 1.0/1.1 and small keys above security level 0.
PERMISSIVE_CIPHERS = "DEFAULT:@SECLEVEL=0"


def client_supports(version: str) -> bool:
    """Whether this machine's OpenSSL was built with the protocol version at all."""
    flags = {
        "TLSv1.0": ssl.HAS_TLSv1,
        "TLSv1.1": ssl.HAS_TLSv1_1,
        "TLSv1.2": ssl.HAS_TLSv1_2,
        "TLSv1.3": ssl.HAS_TLSv1_3,
    }
    return bool(flags.get(version, False))


def make_context(version: str | None = None) -> ssl.SSLContext:
    """A context that offers exactly ``version`` (or every version this OpenSSL knows) and verifies nothing."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # An OpenSSL without security levels rejects the string: keep its defaults rather than fail the probe.
    with contextlib.suppress(ssl.SSLError):
        context.set_ciphers(PERMISSIVE_CIPHERS)
    # Python warns that TLS 1.0/1.1 are deprecated; offering them is the point of this trial, so keep it quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if version is None:
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            context.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
        else:
            context.minimum_version = TLS_VERSIONS[version]
            context.maximum_version = TLS_VERSIONS[version]
    return context


def normalize_version(name: str | None) -> str | None:
    """Python says "TLSv1" for TLS 1.0; the report always names versions as TLSv1.0 .. TLSv1.3."""
    return "TLSv1.0" if name == "TLSv1" else name


@dataclass(frozen=True)
class TlsSession:
    version: str | None
    cipher: str | None
    cipher_bits: int | None
    certificate_der: bytes | None

    def summary(self) -> dict[str, t.Any]:
        return {"version": self.version, "cipher": self.cipher, "cipher_bits": self.cipher_bits}


class TlsChannel:
    """TLS over an already negotiated TCP socket, driven through memory BIOs.

    Driving OpenSSL by hand (instead of ``wrap_socket``) lets the probe see the raw bytes a server sends in place of
    a ServerHello: xrdp and Windows answer with an RDP packet and close when they cannot build their TLS credential,
    which is exactly the 0x904/0x7 case, and ``wrap_socket`` would only say WRONG_VERSION_NUMBER.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str | None) -> None:
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)

    def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            self.sock.sendall(pending)

    def _fill(self, during_handshake: bool, first_read: bool) -> None:
        data = self.sock.recv(RECEIVE_SIZE)
        if not data:
            when = "during the TLS handshake" if during_handshake else "inside the TLS session"
            raise PeerClosed(f"the server closed the connection {when}")
        if first_read and during_handshake and not looks_like_tls_record(data):
            raise PeerClosed(describe_non_tls_answer(data), data)
        self._incoming.write(data)

    def handshake(self) -> TlsSession:
        first_read = True
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill(during_handshake=True, first_read=first_read)
                first_read = False
        self._flush()
        cipher = self._tls.cipher()
        return TlsSession(
            version=normalize_version(self._tls.version()),
            cipher=cipher[0] if cipher else None,
            cipher_bits=cipher[2] if cipher else None,
            certificate_der=self._tls.getpeercert(binary_form=True),
        )

    def sendall(self, data: bytes) -> None:
        self._tls.write(data)
        self._flush()

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes of application data; b"" when the server closed."""
        while True:
            try:
                return self._tls.read(size)
            except ssl.SSLWantReadError:
                try:
                    self._fill(during_handshake=False, first_read=False)
                except PeerClosed:
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def close(self) -> None:
        close_quietly(self.sock)


RECEIVE_SIZE = 16384


def looks_like_tls_record(data: bytes) -> bool:
    """A TLS record starts with a content type (20..24) and major version 3."""
    return len(data) >= 2 and 20 <= data[0] <= 24 and data[1] == 3


def describe_non_tls_answer(data: bytes) -> str:
    if data[:2] == b"\x03\x00":
        # X.224 Data (02 f0 80) carrying MCS Disconnect Provider Ultimatum (first byte 0x20..0x23).
        if data[4:7] == b"\x02\xf0\x80" and len(data) > 7 and data[7] & 0xFC == 0x20:
            return (
                "the server answered the TLS ClientHello with an RDP disconnect (MCS Disconnect Provider "
                "Ultimatum) and closed: it could not start TLS"
            )
        return "the server answered the TLS ClientHello with an RDP packet instead of TLS and closed"
    return f"the server answered the TLS ClientHello with non-TLS data ({data[:8].hex()})"


def handshake(
    sock: socket.socket, server_hostname: str | None, version: str | None = None
) -> tuple[TlsChannel, TlsSession]:
    """Run the TLS handshake on ``sock`` (X.224 already done); the caller closes the returned channel."""
    channel = TlsChannel(sock, make_context(version), server_hostname)
    return channel, channel.handshake()
