# Copyright: rdpfix contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""NTLM NEGOTIATE (sent) and CHALLENGE (parsed) messages, [MS-NLMP] 2.2.1.1, 2.2.1.2, 2.2.2.1, 2.2.2.10.

The probe stops after the CHALLENGE: no AUTHENTICATE is ever sent, so no credentials leave the controller and no
account can be locked out.
"""

from __future__ import annotations

import datetime
import struct
import typing as t
from dataclasses import dataclass, field

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_wire import UTC, ProtocolViolation

SIGNATURE = b"NTLMSSP\x00"
MESSAGE_NEGOTIATE = 1
MESSAGE_CHALLENGE = 2

# UNICODE | OEM | REQUEST_TARGET | SIGN | SEAL | NTLM | ALWAYS_SIGN | EXTENDED_SESSIONSECURITY | VERSION | 128 |
# KEY_EXCH | 56: the set a Windows client offers.
NEGOTIATE_FLAGS = 0xE20882B7
FLAG_NEGOTIATE_VERSION = 0x02000000
FLAG_TARGET_INFO = 0x00800000
FLAG_UNICODE = 0x00000001

AV_EOL = 0
AV_NAMES: dict[int, str] = {
    1: "netbios_computer",
    2: "netbios_domain",
    3: "dns_computer",
    4: "dns_domain",
    5: "dns_tree",
    9: "target_name",
}
AV_FLAGS = 6
AV_TIMESTAMP = 7

# Windows builds whose product name is unambiguous enough to be helpful in a report.
WINDOWS_BUILDS: dict[tuple[int, int, int], str] = {
    (6, 1, 7601): "Windows Server 2008 R2 / Windows 7 SP1",
    (6, 2, 9200): "Windows Server 2012 / Windows 8",
    (6, 3, 9600): "Windows Server 2012 R2 / Windows 8.1",
    (10, 0, 14393): "Windows Server 2016 / Windows 10 1607",
    (10, 0, 17763): "Windows Server 2019 / Windows 10 1809",
    (10, 0, 20348): "Windows Server 2022",
    (10, 0, 22621): "Windows 11 22H2",
    (10, 0, 22631): "Windows 11 23H2",
    (10, 0, 26100): "Windows Server 2025 / Windows 11 24H2",
}

_FILETIME_EPOCH = datetime.datetime(1601, 1, 1, tzinfo=UTC)


def build_negotiate() -> bytes:
    """A 40-byte NEGOTIATE with empty domain/workstation fields and a version block (10.0.17763, revision 15)."""
    empty_field = struct.pack("<HHI", 0, 0, 0)
    version = struct.pack("<BBHBBBB", 10, 0, 17763, 0, 0, 0, 15)
    return SIGNATURE + struct.pack("<II", MESSAGE_NEGOTIATE, NEGOTIATE_FLAGS) + empty_field * 2 + version


@dataclass(frozen=True)
class NtlmChallenge:
    flags: int
    server_challenge: bytes
    target_name: str | None
    names: dict[str, str] = field(default_factory=dict)
    timestamp: datetime.datetime | None = None
    version: tuple[int, int, int] | None = None
    ntlm_revision: int | None = None
    av_flags: int | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self, now: datetime.datetime | None = None) -> dict[str, t.Any]:
        result: dict[str, t.Any] = {
            "target_name": self.target_name,
            "netbios_computer": self.names.get("netbios_computer"),
            "netbios_domain": self.names.get("netbios_domain"),
            "dns_computer": self.names.get("dns_computer"),
            "dns_domain": self.names.get("dns_domain"),
            "dns_tree": self.names.get("dns_tree"),
            "os_version": None,
            "os_build": None,
            "os_name": None,
            "ntlm_revision": self.ntlm_revision,
            "server_time": None,
            "clock_skew_seconds": None,
        }
        if self.version is not None:
            major, minor, build = self.version
            result["os_version"] = f"{major}.{minor}.{build}"
            result["os_build"] = build
            result["os_name"] = WINDOWS_BUILDS.get(self.version)
        if self.timestamp is not None:
            result["server_time"] = self.timestamp.isoformat()
            reference = now or datetime.datetime.now(UTC)
            # Positive: the server's clock is ahead of the controller's.
            result["clock_skew_seconds"] = round((self.timestamp - reference).total_seconds(), 1)
        if self.warnings:
            result["warnings"] = list(self.warnings)
        return result


def filetime_to_datetime(value: int) -> datetime.datetime | None:
    """FILETIME (100 ns ticks since 1601-01-01 UTC) to an aware datetime; None when out of datetime's range."""
    try:
        return _FILETIME_EPOCH + datetime.timedelta(microseconds=value // 10)
    except OverflowError:
        return None


def _field(message: bytes, offset: int, what: str) -> bytes:
    """Read a (len u16, maxlen u16, offset u32) payload reference at ``offset``."""
    length, _max_length, payload_offset = struct.unpack_from("<HHI", message, offset)
    if length == 0:
        return b""
    if payload_offset + length > len(message):
        raise ProtocolViolation(f"NTLM {what} points past the end of the CHALLENGE")
    return message[payload_offset : payload_offset + length]


def _utf16(data: bytes, what: str, warnings: list[str]) -> str:
    if len(data) % 2:
        warnings.append(f"{what} has an odd byte length")
        data = data[:-1]
    return data.decode("utf-16-le", errors="replace")


def _payload_start(message: bytes) -> int:
    """Offset of the first payload byte the header points at, or the message length when it points at none."""
    start = len(message)
    target_length, _max_length, target_offset = struct.unpack_from("<HHI", message, 12)
    if target_length:
        start = min(start, target_offset)
    if start >= 48:
        # The TargetInfo field slot is header only when no payload begins before its end.
        info_length, _max_length, info_offset = struct.unpack_from("<HHI", message, 40)
        if info_length:
            start = min(start, info_offset)
    return start


def parse_challenge(message: bytes) -> NtlmChallenge:
    """Parse an NTLM CHALLENGE message; raise ProtocolViolation when it is not one."""
    if len(message) < 32:
        raise ProtocolViolation(f"NTLM message too short ({len(message)} bytes)")
    if message[:8] != SIGNATURE:
        raise ProtocolViolation("the CredSSP token is not NTLM (no NTLMSSP signature)")
    (message_type,) = struct.unpack_from("<I", message, 8)
    if message_type != MESSAGE_CHALLENGE:
        raise ProtocolViolation(f"NTLM message type {message_type}, expected 2 (CHALLENGE)")
    warnings: list[str] = []
    (flags,) = struct.unpack_from("<I", message, 20)
    server_challenge = message[24:32]
    target_raw = _field(message, 12, "TargetName")
    target_name = _utf16(target_raw, "TargetName", warnings) if flags & FLAG_UNICODE else target_raw.decode("latin-1")
    # Optional header fields (TargetInfo at 40, Version at 48) exist only if the payload starts after them.
    payload_start = _payload_start(message)

    names: dict[str, str] = {}
    timestamp: datetime.datetime | None = None
    av_flags: int | None = None
    if payload_start >= 48:
        target_info = _field(message, 40, "TargetInfo")
        position = 0
        while position + 4 <= len(target_info):
            av_id, av_len = struct.unpack_from("<HH", target_info, position)
            position += 4
            if av_id == AV_EOL:
                break
            if position + av_len > len(target_info):
                raise ProtocolViolation("NTLM TargetInfo AV_PAIR runs past its field")
            value = target_info[position : position + av_len]
            position += av_len
            if av_id in AV_NAMES:
                names[AV_NAMES[av_id]] = _utf16(value, AV_NAMES[av_id], warnings)
            elif av_id == AV_TIMESTAMP and av_len == 8:
                timestamp = filetime_to_datetime(struct.unpack("<Q", value)[0])
                if timestamp is None:
                    warnings.append("MsvAvTimestamp is out of range")
            elif av_id == AV_FLAGS and av_len == 4:
                (av_flags,) = struct.unpack("<I", value)
    elif flags & FLAG_TARGET_INFO:
        warnings.append("TargetInfo announced by flags but the message is too short to hold it")

    version: tuple[int, int, int] | None = None
    revision: int | None = None
    if flags & FLAG_NEGOTIATE_VERSION and payload_start >= 56:
        major, minor, build, _r1, _r2, _r3, revision = struct.unpack_from("<BBHBBBB", message, 48)
        version = (major, minor, build)
    return NtlmChallenge(
        flags=flags,
        server_challenge=server_challenge,
        target_name=target_name or None,
        names=names,
        timestamp=timestamp,
        version=version,
        ntlm_revision=revision,
        av_flags=av_flags,
        warnings=warnings,
    )
