# Copyright: rdpfix contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""TPKT / X.224 connection negotiation, the first exchange of every RDP connection ([MS-RDPBCGR] 2.2.1.1-2.2.1.2).

TPKT and X.224 fields are big-endian; the RDP_NEG_* structures inside are little-endian.
"""

from __future__ import annotations

import socket
import struct
import typing as t
from dataclasses import dataclass

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_wire import (
    ProtocolViolation,
    Receiver,
    identify_foreign_protocol,
    recv_exact,
)

PROTOCOL_RDP = 0x00
PROTOCOL_SSL = 0x01
PROTOCOL_HYBRID = 0x02
PROTOCOL_RDSTLS = 0x04
PROTOCOL_HYBRID_EX = 0x08
PROTOCOL_RDSAAD = 0x10

# The names the report uses for a selected protocol.
PROTOCOL_NAMES: dict[int, str] = {
    PROTOCOL_RDP: "rdp",
    PROTOCOL_SSL: "tls",
    PROTOCOL_HYBRID: "credssp",
    PROTOCOL_RDSTLS: "rdstls",
    PROTOCOL_HYBRID_EX: "credssp_early_user_auth",
    PROTOCOL_RDSAAD: "rdsaad",
}

# One trial per security layer, each on a fresh connection. CredSSP runs inside TLS, so the CredSSP trials also
# offer TLS, exactly as mstsc and nmap do; a server that then picks TLS has NOT accepted CredSSP (xrdp does this).
TRIAL_REQUESTS: dict[str, int] = {
    "rdp": PROTOCOL_RDP,
    "tls": PROTOCOL_SSL,
    "credssp": PROTOCOL_SSL | PROTOCOL_HYBRID,
    "credssp_early_user_auth": PROTOCOL_SSL | PROTOCOL_HYBRID | PROTOCOL_HYBRID_EX,
    "rdstls": PROTOCOL_RDSTLS,
}

# The protocol a trial hopes the server selects.
TRIAL_TARGETS: dict[str, int] = {
    "rdp": PROTOCOL_RDP,
    "tls": PROTOCOL_SSL,
    "credssp": PROTOCOL_HYBRID,
    "credssp_early_user_auth": PROTOCOL_HYBRID_EX,
    "rdstls": PROTOCOL_RDSTLS,
}

FAILURE_NAMES: dict[int, str] = {
    1: "SSL_REQUIRED_BY_SERVER",
    2: "SSL_NOT_ALLOWED_BY_SERVER",
    3: "SSL_CERT_NOT_ON_SERVER",
    4: "INCONSISTENT_FLAGS",
    5: "HYBRID_REQUIRED_BY_SERVER",
    6: "SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER",
}

RESPONSE_FLAG_NAMES: dict[int, str] = {
    0x01: "EXTENDED_CLIENT_DATA_SUPPORTED",
    0x02: "DYNVC_GFX_PROTOCOL_SUPPORTED",
    0x04: "NEGRSP_FLAG_RESERVED",
    0x08: "RESTRICTED_ADMIN_MODE_SUPPORTED",
    0x10: "REDIRECTED_AUTHENTICATION_MODE_SUPPORTED",
}

TPKT_VERSION = 3
X224_CONNECTION_REQUEST = 0xE0
X224_CONNECTION_CONFIRM = 0xD0
TYPE_RDP_NEG_REQ = 0x01
TYPE_RDP_NEG_RSP = 0x02
TYPE_RDP_NEG_FAILURE = 0x03
# A confirm is 11 bytes bare or 19 with negotiation data; anything near 64 KiB is not a confirm.
MAX_CONFIRM_LENGTH = 1024


def protocol_name(value: int) -> str:
    return PROTOCOL_NAMES.get(value, f"unknown(0x{value:x})")


def failure_name(code: int) -> str:
    return FAILURE_NAMES.get(code, f"UNKNOWN_FAILURE_{code}")


def build_connection_request(requested_protocols: int, cookie: str | None = None) -> bytes:
    """TPKT + X.224 Connection Request + optional routing cookie + RDP_NEG_REQ."""
    if not 0 <= requested_protocols <= 0xFFFFFFFF:
        raise ValueError("requested_protocols must fit in 32 bits")
    cookie_bytes = b""
    if cookie:
        if any(ch in cookie for ch in "\r\n") or not cookie.isascii():
            raise ValueError("cookie must be a single line of ASCII")
        cookie_bytes = f"Cookie: mstshash={cookie}\r\n".encode("ascii")
    neg_req = struct.pack("<BBHI", TYPE_RDP_NEG_REQ, 0, 8, requested_protocols)
    x224 = bytes([X224_CONNECTION_REQUEST, 0, 0, 0, 0, 0]) + cookie_bytes + neg_req
    length_indicator = len(x224)
    if length_indicator > 0xFE:
        raise ValueError("cookie too long for an X.224 header")
    body = bytes([length_indicator]) + x224
    return struct.pack(">BBH", TPKT_VERSION, 0, 4 + len(body)) + body


@dataclass(frozen=True)
class ConnectionConfirm:
    """What the server answered to one Connection Request."""

    kind: str  # "response" (RDP_NEG_RSP), "failure" (RDP_NEG_FAILURE), "legacy" (no negotiation data)
    selected_protocol: int | None = None
    flags: int = 0
    failure_code: int | None = None

    def as_dict(self) -> dict[str, t.Any]:
        result: dict[str, t.Any] = {"kind": self.kind}
        if self.kind == "response" and self.selected_protocol is not None:
            result["selected_protocol"] = protocol_name(self.selected_protocol)
            result["selected_protocol_value"] = self.selected_protocol
            result["flags"] = [name for bit, name in sorted(RESPONSE_FLAG_NAMES.items()) if self.flags & bit]
        if self.kind == "legacy":
            result["selected_protocol"] = protocol_name(PROTOCOL_RDP)
            result["selected_protocol_value"] = PROTOCOL_RDP
        if self.kind == "failure" and self.failure_code is not None:
            result["failure_code"] = self.failure_code
            result["failure_name"] = failure_name(self.failure_code)
        return result


def parse_tpkt_header(header: bytes) -> int:
    """Validate a 4-byte TPKT header and return the total PDU length it announces."""
    if len(header) < 4:
        raise ProtocolViolation(f"truncated TPKT header ({len(header)} bytes)")
    if header[0] != TPKT_VERSION:
        foreign = identify_foreign_protocol(header)
        if foreign:
            raise ProtocolViolation(f"the peer is not an RDP server: it answers like {foreign}")
        raise ProtocolViolation(f"not a TPKT packet (version byte 0x{header[0]:02x}, expected 0x03)")
    length = int.from_bytes(header[2:4], "big")
    if length < 7:
        raise ProtocolViolation(f"TPKT length {length} is shorter than an X.224 header")
    return length


def parse_connection_confirm(pdu: bytes) -> ConnectionConfirm:
    """Parse a complete TPKT PDU expected to hold an X.224 Connection Confirm."""
    length = parse_tpkt_header(pdu)
    if len(pdu) != length:
        raise ProtocolViolation(f"TPKT announces {length} bytes but {len(pdu)} were given")
    length_indicator = pdu[4]
    if length_indicator + 5 > length:
        raise ProtocolViolation(f"X.224 length indicator {length_indicator} runs past the TPKT packet")
    if length_indicator < 6:
        raise ProtocolViolation(f"X.224 length indicator {length_indicator} is shorter than a CC header")
    pdu_type = pdu[5] & 0xF0
    if pdu_type != X224_CONNECTION_CONFIRM:
        if pdu[5] == 0x80:
            # Disconnect Request: some servers refuse this way instead of with RDP_NEG_FAILURE.
            raise ProtocolViolation("the server sent an X.224 Disconnect Request instead of a Connection Confirm")
        raise ProtocolViolation(f"X.224 TPDU type 0x{pdu[5]:02x} is not a Connection Confirm (0xd0)")
    variable = pdu[11 : 5 + length_indicator]
    if not variable:
        # No RDP_NEG_RSP at all: a server from before RDP 5.2 negotiation, native RDP security only.
        return ConnectionConfirm(kind="legacy")
    if len(variable) < 8:
        raise ProtocolViolation(f"negotiation data truncated ({len(variable)} of 8 bytes)")
    neg_type, neg_flags, neg_length, value = struct.unpack("<BBHI", variable[:8])
    if neg_length != 8:
        raise ProtocolViolation(f"negotiation structure announces length {neg_length}, expected 8")
    if neg_type == TYPE_RDP_NEG_RSP:
        return ConnectionConfirm(kind="response", selected_protocol=value, flags=neg_flags)
    if neg_type == TYPE_RDP_NEG_FAILURE:
        return ConnectionConfirm(kind="failure", failure_code=value)
    raise ProtocolViolation(f"unknown negotiation structure type 0x{neg_type:02x}")


def read_tpkt(sock: Receiver, limit: int = MAX_CONFIRM_LENGTH) -> bytes:
    """Read one whole TPKT PDU from the socket."""
    header = recv_exact(sock, 4, "the X.224 Connection Confirm")
    length = parse_tpkt_header(header)
    if length > limit:
        raise ProtocolViolation(f"TPKT length {length} is implausible for a Connection Confirm")
    return header + recv_exact(sock, length - 4, "the X.224 Connection Confirm")


def negotiate(sock: socket.socket, requested_protocols: int, cookie: str | None = None) -> ConnectionConfirm:
    """Send a Connection Request on a fresh connection and return the server's Connection Confirm."""
    sock.sendall(build_connection_request(requested_protocols, cookie))
    return parse_connection_confirm(read_tpkt(sock))


def selects(confirm: ConnectionConfirm) -> int | None:
    """The protocol the server chose, or None when it refused the request."""
    if confirm.kind == "legacy":
        return PROTOCOL_RDP
    if confirm.kind == "response":
        return confirm.selected_protocol
    return None


def uses_tls(selected_protocol: int | None) -> bool:
    """Whether a TLS handshake follows on the same socket for the selected protocol."""
    return selected_protocol in (PROTOCOL_SSL, PROTOCOL_HYBRID, PROTOCOL_RDSTLS, PROTOCOL_HYBRID_EX)
