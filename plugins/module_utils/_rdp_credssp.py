# Copyright: rdpfix contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The few DER structures of CredSSP the probe needs: a TSRequest carrying one SPNEGO-less NTLM token ([MS-CSSP] 2.2.1).

Only definite-length DER is accepted (CredSSP requires DER); anything else is reported as a protocol violation.
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass, field

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_wire import ProtocolViolation, Receiver, recv_exact

TAG_SEQUENCE = 0x30
TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
# TSRequest fields are context-specific, constructed: [n] = 0xA0 + n.
TSREQUEST_VERSION = 0xA0
TSREQUEST_NEGO_TOKENS = 0xA1
TSREQUEST_AUTH_INFO = 0xA2
TSREQUEST_PUB_KEY_AUTH = 0xA3
TSREQUEST_ERROR_CODE = 0xA4
TSREQUEST_CLIENT_NONCE = 0xA5
NEGO_TOKEN = 0xA0

# A TSRequest holding an NTLM CHALLENGE is a few hundred bytes; cap what a hostile peer can make us buffer.
MAX_TSREQUEST_LENGTH = 65536
CLIENT_TSREQUEST_VERSION = 6


@dataclass(frozen=True)
class Tlv:
    tag: int
    value: bytes
    end: int  # offset just past this element in the buffer it was read from


def encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def encode_tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + encode_length(len(value)) + value


def encode_integer(value: int) -> bytes:
    if value < 0:
        raise ValueError("only non-negative integers are needed here")
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return encode_tlv(TAG_INTEGER, body)


def read_tlv(data: bytes, offset: int = 0) -> Tlv:
    """Read one DER element at ``offset``; raise ProtocolViolation on truncation or non-DER lengths."""
    if offset + 2 > len(data):
        raise ProtocolViolation("DER element truncated before its length")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise ProtocolViolation("multi-byte DER tags do not occur in CredSSP")
    first = data[offset + 1]
    position = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0:
            raise ProtocolViolation("indefinite DER length is not allowed")
        if count > 4:
            raise ProtocolViolation(f"DER length of {count} bytes is implausible")
        if position + count > len(data):
            raise ProtocolViolation("DER length truncated")
        length = int.from_bytes(data[position : position + count], "big")
        position += count
    end = position + length
    if end > len(data):
        raise ProtocolViolation(f"DER element announces {length} bytes but only {len(data) - position} follow")
    return Tlv(tag=tag, value=data[position:end], end=end)


def iter_tlvs(data: bytes) -> t.Iterator[Tlv]:
    offset = 0
    while offset < len(data):
        element = read_tlv(data, offset)
        yield element
        offset = element.end


def decode_integer(value: bytes) -> int:
    if not value:
        raise ProtocolViolation("empty DER INTEGER")
    if len(value) > 8:
        raise ProtocolViolation("DER INTEGER too large for a CredSSP field")
    return int.from_bytes(value, "big", signed=True)


def build_tsrequest(nego_token: bytes, version: int = CLIENT_TSREQUEST_VERSION) -> bytes:
    """TSRequest { version, negoTokens: SEQUENCE OF SEQUENCE { [0] OCTET STRING } }."""
    nego_data = encode_tlv(
        TAG_SEQUENCE, encode_tlv(TAG_SEQUENCE, encode_tlv(NEGO_TOKEN, encode_tlv(TAG_OCTET_STRING, nego_token)))
    )
    body = encode_tlv(TSREQUEST_VERSION, encode_integer(version)) + encode_tlv(TSREQUEST_NEGO_TOKENS, nego_data)
    return encode_tlv(TAG_SEQUENCE, body)


@dataclass(frozen=True)
class TsRequest:
    version: int
    nego_tokens: list[bytes] = field(default_factory=list)
    error_code: int | None = None
    unknown_tags: list[int] = field(default_factory=list)


def parse_tsrequest(data: bytes) -> TsRequest:
    """Parse a complete TSRequest; unknown context tags (pubKeyAuth, clientNonce, ...) are skipped."""
    outer = read_tlv(data)
    if outer.tag != TAG_SEQUENCE:
        raise ProtocolViolation(f"TSRequest must be a SEQUENCE, got tag 0x{outer.tag:02x}")
    if outer.end != len(data):
        raise ProtocolViolation("trailing bytes after the TSRequest")
    version: int | None = None
    tokens: list[bytes] = []
    error_code: int | None = None
    unknown: list[int] = []
    for element in iter_tlvs(outer.value):
        if element.tag == TSREQUEST_VERSION:
            inner = read_tlv(element.value)
            if inner.tag != TAG_INTEGER:
                raise ProtocolViolation("TSRequest version is not an INTEGER")
            version = decode_integer(inner.value)
        elif element.tag == TSREQUEST_NEGO_TOKENS:
            tokens.extend(_parse_nego_data(element.value))
        elif element.tag == TSREQUEST_ERROR_CODE:
            inner = read_tlv(element.value)
            if inner.tag != TAG_INTEGER:
                raise ProtocolViolation("TSRequest errorCode is not an INTEGER")
            # NTSTATUS values are unsigned 32-bit on the wire even when DER encodes them as negative.
            error_code = decode_integer(inner.value) & 0xFFFFFFFF
        else:
            unknown.append(element.tag)
    if version is None:
        raise ProtocolViolation("TSRequest without a version field")
    return TsRequest(version=version, nego_tokens=tokens, error_code=error_code, unknown_tags=unknown)


def _parse_nego_data(data: bytes) -> list[bytes]:
    sequence = read_tlv(data)
    if sequence.tag != TAG_SEQUENCE:
        raise ProtocolViolation("negoTokens is not a SEQUENCE OF")
    tokens: list[bytes] = []
    for item in iter_tlvs(sequence.value):
        if item.tag != TAG_SEQUENCE:
            raise ProtocolViolation("NegoData item is not a SEQUENCE")
        for member in iter_tlvs(item.value):
            if member.tag == NEGO_TOKEN:
                octets = read_tlv(member.value)
                if octets.tag != TAG_OCTET_STRING:
                    raise ProtocolViolation("negoToken is not an OCTET STRING")
                tokens.append(octets.value)
    return tokens


def read_tsrequest(sock: Receiver) -> bytes:
    """Read one whole DER TSRequest from the (TLS) socket, following its outer length."""
    head = recv_exact(sock, 2, "the CredSSP TSRequest")
    if head[0] != TAG_SEQUENCE:
        raise ProtocolViolation(f"the CredSSP answer does not start with a DER SEQUENCE (0x{head[0]:02x})")
    first = head[1]
    if first < 0x80:
        length, length_bytes = first, b""
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise ProtocolViolation("the CredSSP answer has a non-DER length")
        length_bytes = recv_exact(sock, count, "the CredSSP TSRequest length")
        length = int.from_bytes(length_bytes, "big")
    if length > MAX_TSREQUEST_LENGTH:
        raise ProtocolViolation(f"the CredSSP answer announces {length} bytes, more than a TSRequest can need")
    return head + length_bytes + recv_exact(sock, length, "the CredSSP TSRequest")
