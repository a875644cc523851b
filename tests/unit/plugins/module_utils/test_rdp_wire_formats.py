"""Byte-level tests of the handshake probe's protocol code: X.224, CredSSP DER, NTLM, RDP-UDP and name checks.

Reference bytes come from [MS-RDPBCGR] / [MS-CSSP] examples; NTLM messages are cross-checked against pyspnego, an
independent implementation.
"""

from __future__ import annotations

import datetime
import socket
import struct

import pytest
from spnego._ntlm_raw.messages import AvId, Challenge, FileTime, Negotiate, NegotiateFlags, TargetInfo, Version

from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_credssp as credssp
from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_names as names
from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_ntlm as ntlm
from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_udp as udp
from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_x224 as x224
from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_wire import (
    PeerClosed,
    ProtocolViolation,
    classify_exception,
    recv_exact,
)

UTC = datetime.UTC


# --- X.224 -----------------------------------------------------------------------------------------------------


def test_connection_request_matches_the_shortest_reference_form() -> None:
    expected = bytes.fromhex("030000130ee00000000000010008000b000000")
    assert x224.build_connection_request(0x0B) == expected


def test_connection_request_with_cookie_counts_it_in_both_lengths() -> None:
    packet = x224.build_connection_request(0x01, cookie="alice")
    cookie = b"Cookie: mstshash=alice\r\n"
    assert packet[2:4] == struct.pack(">H", len(packet))
    assert packet[4] == len(packet) - 5
    assert packet[11 : 11 + len(cookie)] == cookie
    assert packet[-8:] == bytes.fromhex("0100080001000000")


@pytest.mark.parametrize("cookie", ["a\r\nb", "é", "x" * 300])
def test_connection_request_rejects_unsendable_cookies(cookie: str) -> None:
    with pytest.raises(ValueError, match="cookie"):
        x224.build_connection_request(0, cookie)


def confirm(neg: bytes, tpdu: int = 0xD0) -> bytes:
    body = bytes([6 + len(neg), tpdu, 0, 0, 0x12, 0x34, 0]) + neg
    return struct.pack(">BBH", 3, 0, 4 + len(body)) + body


def test_parse_windows_style_response() -> None:
    result = x224.parse_connection_confirm(bytes.fromhex("030000130ed00000123400021f080002000000"))
    assert (result.kind, result.selected_protocol, result.flags) == ("response", x224.PROTOCOL_HYBRID, 0x1F)
    described = result.as_dict()
    assert described["selected_protocol"] == "credssp"
    assert "RESTRICTED_ADMIN_MODE_SUPPORTED" in described["flags"]


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (1, "SSL_REQUIRED_BY_SERVER"),
        (5, "HYBRID_REQUIRED_BY_SERVER"),
        (6, "SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER"),
        (99, "UNKNOWN_FAILURE_99"),
    ],
)
def test_parse_failure_names_the_code(code: int, name: str) -> None:
    result = x224.parse_connection_confirm(confirm(struct.pack("<BBHI", 3, 0, 8, code)))
    assert result.kind == "failure"
    assert result.as_dict()["failure_name"] == name


def test_parse_confirm_without_negotiation_data_is_a_legacy_rdp_server() -> None:
    result = x224.parse_connection_confirm(confirm(b""))
    assert result.kind == "legacy"
    assert x224.selects(result) == x224.PROTOCOL_RDP


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "HTTP"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "SSH"),
        (bytes.fromhex("160303002a"), "TLS"),
        (bytes.fromhex("0400001300"), "not a TPKT"),
        (confirm(b"", tpdu=0x80), "Disconnect Request"),
        (confirm(b"", tpdu=0xF0), "not a Connection Confirm"),
        (confirm(struct.pack("<BBHI", 2, 0, 9, 1)), "length 9"),
        (confirm(struct.pack("<BBHI", 7, 0, 8, 1)), "unknown negotiation"),
        (confirm(b"\x02\x00\x08"), "truncated"),
        (bytes.fromhex("0300000502"), "shorter than an X.224 header"),
    ],
)
def test_parse_confirm_rejects_with_a_reason(packet: bytes, message: str) -> None:
    with pytest.raises(ProtocolViolation, match=message):
        x224.parse_connection_confirm(packet)


def test_read_tpkt_reads_exactly_one_pdu_and_reports_truncation() -> None:
    left, right = socket.socketpair()
    with left, right:
        pdu = bytes.fromhex("030000130ed00000123400021f080002000000")
        right.sendall(pdu + b"extra")
        assert x224.read_tpkt(left) == pdu
    left, right = socket.socketpair()
    with left, right:
        right.sendall(pdu[:10])
        right.close()
        with pytest.raises(PeerClosed, match="after 6 of 15 bytes"):
            x224.read_tpkt(left)


# --- CredSSP DER -------------------------------------------------------------------------------------------------

REFERENCE_TSREQUEST = bytes.fromhex(
    "3037a003020106a130302e302ca02a04284e544c4d5353500001000000b78208e2" + "00" * 16 + "0a0063450000000f"
)


def test_tsrequest_with_ntlm_negotiate_matches_the_reference_bytes() -> None:
    assert credssp.build_tsrequest(ntlm.build_negotiate()) == REFERENCE_TSREQUEST


def test_tsrequest_round_trip_skips_unknown_tags_and_reads_error_codes() -> None:
    token = b"NTLMSSP\x00\x02\x00\x00\x00" + b"\x00" * 40
    nego = credssp.encode_tlv(0x30, credssp.encode_tlv(0x30, credssp.encode_tlv(0xA0, credssp.encode_tlv(0x04, token))))
    # errorCode 0xC000006D (STATUS_LOGON_FAILURE) encoded as the negative DER INTEGER it is.
    error = credssp.encode_tlv(0x02, (0xC000006D).to_bytes(4, "big"))
    body = (
        credssp.encode_tlv(0xA0, credssp.encode_integer(6))
        + credssp.encode_tlv(0xA1, nego)
        + credssp.encode_tlv(0xA5, credssp.encode_tlv(0x04, b"\x01" * 32))
        + credssp.encode_tlv(0xA4, error)
    )
    parsed = credssp.parse_tsrequest(credssp.encode_tlv(0x30, body))
    assert parsed.version == 6
    assert parsed.nego_tokens == [token]
    assert parsed.error_code == 0xC000006D
    assert parsed.unknown_tags == [0xA5]


def test_der_long_form_lengths() -> None:
    value = b"x" * 300
    element = credssp.encode_tlv(0x04, value)
    assert element[:4] == bytes.fromhex("0482012c")
    assert credssp.read_tlv(element).value == value


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes.fromhex("3080a003020106"), "indefinite"),
        (bytes.fromhex("3085000000000000"), "implausible"),
        (bytes.fromhex("3010a003020106"), "announces 16 bytes"),
        (bytes.fromhex("3003040100"), "without a version"),
        (bytes.fromhex("3005a003040106"), "not an INTEGER"),
        (bytes.fromhex("0400"), "must be a SEQUENCE"),
        (bytes.fromhex("300500") + b"\x00" * 4, "truncated"),
    ],
)
def test_tsrequest_parse_errors(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolViolation, match=message):
        credssp.parse_tsrequest(data)


def test_read_tsrequest_follows_the_outer_length_and_caps_it() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.sendall(REFERENCE_TSREQUEST + b"next")
        assert credssp.read_tsrequest(left) == REFERENCE_TSREQUEST
    left, right = socket.socketpair()
    with left, right:
        right.sendall(bytes.fromhex("3084ffffffff"))
        with pytest.raises(ProtocolViolation, match="more than a TSRequest"):
            credssp.read_tsrequest(left)


# --- NTLM ------------------------------------------------------------------------------------------------------


def test_negotiate_is_understood_by_pyspnego() -> None:
    message = Negotiate.unpack(ntlm.build_negotiate())
    assert message.flags == ntlm.NEGOTIATE_FLAGS
    assert message.version is not None
    assert (message.version.major, message.version.minor, message.version.build) == (10, 0, 17763)
    assert message.domain_name is None and message.workstation is None


def spnego_challenge(timestamp: datetime.datetime | None, version: Version | None = None) -> bytes:
    info = TargetInfo()
    info[AvId.nb_computer_name] = "WEB01"
    info[AvId.nb_domain_name] = "CORP"
    info[AvId.dns_computer_name] = "web01.corp.example.com"
    info[AvId.dns_domain_name] = "corp.example.com"
    info[AvId.dns_tree_name] = "example.com"
    if timestamp is not None:
        info[AvId.timestamp] = FileTime(*timestamp.timetuple()[:6], tzinfo=UTC)
    flags = NegotiateFlags.unicode | NegotiateFlags.target_info
    if version is not None:
        flags |= NegotiateFlags.version
    message = Challenge(
        flags=flags, server_challenge=b"\x01" * 8, target_name="CORP", target_info=info, version=version
    )
    return message.pack()


def test_challenge_from_pyspnego_gives_names_version_and_skew() -> None:
    server_time = datetime.datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
    raw = spnego_challenge(server_time, Version(10, 0, 20348))
    challenge = ntlm.parse_challenge(raw)
    report = challenge.as_dict(now=server_time - datetime.timedelta(seconds=400))
    assert report["netbios_computer"] == "WEB01"
    assert report["netbios_domain"] == "CORP"
    assert report["dns_computer"] == "web01.corp.example.com"
    assert report["dns_tree"] == "example.com"
    assert report["os_version"] == "10.0.20348"
    assert report["os_name"] == "Windows Server 2022"
    assert report["clock_skew_seconds"] == 400.0
    assert report["target_name"] == "CORP"


def test_challenge_without_version_flag_has_no_version() -> None:
    challenge = ntlm.parse_challenge(spnego_challenge(None))
    assert challenge.version is None
    assert challenge.timestamp is None
    assert challenge.as_dict()["clock_skew_seconds"] is None


def test_old_style_challenge_without_target_info_header() -> None:
    # 32-byte header only, TargetName payload right after it: offsets 40/48 are payload, not fields.
    target = "DOM".encode("utf-16-le")
    header = ntlm.SIGNATURE + struct.pack("<I", 2) + struct.pack("<HHI", len(target), len(target), 32)
    message = header[:20] + struct.pack("<I", ntlm.FLAG_UNICODE | ntlm.FLAG_NEGOTIATE_VERSION) + b"\x02" * 8 + target
    challenge = ntlm.parse_challenge(message)
    assert challenge.target_name == "DOM"
    assert challenge.names == {}
    assert challenge.version is None


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"NTLMSSP\x00" + b"\x01\x00\x00\x00" + b"\x00" * 30, "expected 2"),
        (b"KERBEROS" + b"\x00" * 40, "not NTLM"),
        (b"NTLMSSP\x00\x02", "too short"),
    ],
)
def test_challenge_rejects_other_messages(message: bytes, reason: str) -> None:
    with pytest.raises(ProtocolViolation, match=reason):
        ntlm.parse_challenge(message)


def test_challenge_with_av_pair_overflow_is_rejected() -> None:
    raw = bytearray(spnego_challenge(None))
    info_offset = struct.unpack_from("<I", raw, 44)[0]
    struct.pack_into("<H", raw, info_offset + 2, 0xFFF0)  # the first AV_PAIR claims a huge length
    with pytest.raises(ProtocolViolation, match="AV_PAIR"):
        ntlm.parse_challenge(bytes(raw))


def test_filetime_conversion_and_range() -> None:
    assert ntlm.filetime_to_datetime(0) == datetime.datetime(1601, 1, 1, tzinfo=UTC)
    assert ntlm.filetime_to_datetime(2**64 - 1) is None


# --- RDP-UDP ---------------------------------------------------------------------------------------------------


def test_syn_layout() -> None:
    datagram = udp.build_syn(0x01020304)
    assert len(datagram) == 1232
    assert datagram[:16] == bytes.fromhex("ffffffff004000010102030404d004d0")
    assert set(datagram[16:]) == {0}


def test_syn_ack_is_recognised_only_when_it_acknowledges_our_isn() -> None:
    answer = struct.pack(">IHHIHH", 0x01020304, 64, udp.FLAG_SYN | udp.FLAG_ACK, 0xAABBCCDD, 1232, 1200)
    parsed = udp.parse_answer(answer, 0x01020304)
    assert parsed.acknowledges_our_syn and parsed.server_sequence_number == 0xAABBCCDD and parsed.down_mtu == 1200
    assert not udp.parse_answer(answer, 0x01020305).acknowledges_our_syn
    assert not udp.parse_answer(b"\x00\x01", 1).is_syn_ack


def test_udp_probe_against_a_local_responder_and_a_closed_port() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(2)
    port = server.getsockname()[1]
    import threading

    def respond() -> None:
        data, peer = server.recvfrom(2048)
        isn = struct.unpack_from(">I", data, 8)[0]
        server.sendto(struct.pack(">IHHIHH", isn, 64, 0x0005, 7, 1232, 1232), peer)

    thread = threading.Thread(target=respond)
    thread.start()
    try:
        result = udp.probe_udp(("127.0.0.1", port), socket.AF_INET, 2.0)
    finally:
        thread.join(3)
        server.close()
    assert result["status"] == "answered"
    closed = udp.probe_udp(("127.0.0.1", port), socket.AF_INET, 1.0)
    assert closed["status"] == "refused"


# --- names -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "common_name", "sans", "expected"),
    [
        ("web01.corp.example.com", "web01.corp.example.com", [], True),
        ("WEB01.corp.example.com.", None, ["web01.corp.example.com"], True),
        ("web01.corp.example.com", "web01.corp.example.com", ["other.example.com"], False),  # CN ignored with SANs
        ("web01.corp.example.com", None, ["*.corp.example.com"], True),
        ("a.web01.corp.example.com", None, ["*.corp.example.com"], False),  # one label only
        ("example.com", None, ["*.com"], False),
        ("10.0.0.5", None, ["10.0.0.5"], True),
        ("10.0.0.5", "web01", ["web01"], False),
        ("web01", "web01.corp.example.com", [], False),
    ],
)
def test_certificate_name_matching(name: str, common_name: str | None, sans: list[str], expected: bool) -> None:
    assert names.certificate_matches(name, common_name, sans)[0] is expected


def test_check_names_detects_a_name_that_resolves_elsewhere() -> None:
    table = {"web01.corp.example.com": ["10.0.0.99"], "rdp.example.com": ["10.0.0.5"]}

    def resolver(name: str) -> list[str]:
        if name not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[name]

    report = names.check_names(
        "rdp.example.com",
        "10.0.0.5",
        {"dns_computer": "web01.corp.example.com", "netbios_computer": "WEB01"},
        {"common_name": "web01.corp.example.com", "sans": ["web01.corp.example.com"]},
        resolver,
    )
    assert report["connect_name_reaches_probed_address"] is True
    assert report["matches_server_name"] is False
    assert report["server_dns_name_reaches_probed_address"] is False
    assert report["certificate_matches_connect_name"] is False
    assert report["certificate_matches_server_dns_name"] is True
    missing = names.check_names("nowhere.example.com", "10.0.0.5", None, None, resolver)
    assert missing["connect_name_resolution_error"].startswith("gaierror")
    assert missing["connect_name_reaches_probed_address"] is None


def test_short_name_matches_netbios_name() -> None:
    assert names.same_host_name("web01", "web01.corp.example.com", "WEB01")
    assert not names.same_host_name("web02", "web01.corp.example.com", "WEB01")


# --- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (ConnectionRefusedError(), "refused"),
        (ConnectionResetError(104, "reset"), "reset"),
        (TimeoutError(), "timeout"),
        (socket.gaierror(-2, "Name or service not known"), "unresolved"),
        (OSError(113, "No route to host"), "unreachable"),
        (ProtocolViolation("bad"), "invalid"),
        (RuntimeError("surprise"), "error"),
    ],
)
def test_every_exception_becomes_a_status(exc: BaseException, status: str) -> None:
    assert classify_exception(exc)[0] == status


def test_recv_exact_names_what_was_missing() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.sendall(b"ab")
        right.close()
        with pytest.raises(PeerClosed, match="2 of 4 bytes of the thing") as info:
            recv_exact(left, 4, "the thing")
        assert info.value.received == b"ab"
