"""The lab's RDP endpoint: X.224 negotiation, TLS with the view's certificate, resets, CredSSP's NTLM challenge."""

from __future__ import annotations

import random
import socket
import ssl
import struct
import threading
import time
import typing as t
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from rdplab import rdp
from rdplab.model.host import Counters, RdpView
from rdplab.winrm import port_free, self_signed_certificate


def free_network(ports: tuple[int, ...] = (5985, 5986, 3389, 5999)) -> str:
    """A random 127.a.b network whose .1, .10 and .11 have the ports free: concurrent test runs (xdist workers, two
    engineers' pytest) must not meet on the same addresses."""
    for _attempt in range(200):
        network = f"127.{random.randint(100, 254)}.{random.randint(0, 255)}"
        if all(port_free(f"{network}.{octet}", port) for octet in (1, 10, 11) for port in ports):
            return network
    raise RuntimeError("no free loopback network found")


ADDRESS = free_network() + ".10"
PORT = 3389
CERT_PEM, KEY_PEM = self_signed_certificate("web01.corp.example.com", [ADDRESS])
CERT_DER = x509.load_pem_x509_certificate(CERT_PEM).public_bytes(Encoding.DER)
HEALTHY = RdpView(
    port=PORT,
    listening=True,
    accepted_protocols=rdp.PROTOCOL_SSL | rdp.PROTOCOL_HYBRID | rdp.PROTOCOL_HYBRID_EX,
    rdp_only=False,
    failure=None,
    cert_pem=CERT_PEM,
    key_pem=KEY_PEM,
    tls_versions=["TLSv1.2", "TLSv1.3"],
)


class _System:
    def to_json(self) -> dict[str, object]:
        return {"hostname": "WEB01", "fqdn": "WEB01.corp.example.com", "domain": "corp.example.com", "os_build": 20348}


class ViewHost:
    """A host whose RDP view the test sets directly; counts connections the way the model does."""

    def __init__(self, view: RdpView) -> None:
        self.name = "web01"
        self.view = view
        self.counters = Counters()
        self.lock = threading.RLock()
        self.system = _System()
        self.attempts: list[dict[str, t.Any]] = []

    def rdp_view(self, connect: bool = True) -> RdpView:
        if connect:
            self.counters.rdp_connections += 1
        return self.view

    def record_rdp_attempt(self, outcome: dict[str, t.Any]) -> None:
        self.attempts.append(outcome)


@pytest.fixture
def host() -> ViewHost:
    return ViewHost(HEALTHY)


@pytest.fixture
def endpoint(host: ViewHost) -> t.Iterator[rdp.RdpEndpoint]:
    listener = rdp.RdpEndpoint(ADDRESS, lambda: host)  # type: ignore[arg-type,return-value]
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()


def connection_request(protocols: int | None, cookie: bytes = b"Cookie: mstshash=probe\r\n") -> bytes:
    neg = struct.pack("<BBHI", 0x01, 0, 8, protocols) if protocols is not None else b""
    x224 = bytes([6 + len(cookie) + len(neg), 0xE0, 0, 0, 0, 0, 0]) + cookie + neg
    return struct.pack(">BBH", 3, 0, 4 + len(x224)) + x224


def x224_exchange(protocols: int | None, port: int = PORT) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection((ADDRESS, port), timeout=5)
    sock.sendall(connection_request(protocols))
    header = rdp._recv_exact(sock, 4)
    return sock, header + rdp._recv_exact(sock, struct.unpack(">H", header[2:4])[0] - 4)


def client_context(minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = minimum
    return context


def wait_for(predicate: t.Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# --- wire format -----------------------------------------------------------------------------------------------


def test_parse_the_shortest_connection_request_of_the_reference() -> None:
    request = rdp.parse_connection_request(bytes.fromhex("030000130ee00000000000010008000b000000"))
    assert (request.cookie, request.requested_protocols) == (None, 0x0B)


def test_parse_rejects_a_tpkt_length_mismatch() -> None:
    with pytest.raises(rdp.ProtocolViolation):
        rdp.parse_connection_request(bytes.fromhex("030000200ee00000000000010008000b000000"))


def test_confirm_bytes_mimic_windows() -> None:
    assert rdp.confirm_response(rdp.PROTOCOL_HYBRID).hex() == "030000130ed000001234000" + "21f080002000000"
    assert rdp.confirm_failure(rdp.HYBRID_REQUIRED_BY_SERVER).hex() == "030000130ed00000123400" + "0300080005000000"


# --- negotiation over the socket -----------------------------------------------------------------------------------


def test_confirm_selects_hybrid_ex_when_offered(endpoint: rdp.RdpEndpoint, host: ViewHost) -> None:
    sock, answer = x224_exchange(rdp.PROTOCOL_SSL | rdp.PROTOCOL_HYBRID | rdp.PROTOCOL_HYBRID_EX)
    sock.close()
    assert answer == bytes.fromhex("030000130ed00000123400021f080008000000")
    assert wait_for(lambda: host.counters.rdp_connections == 1)


@pytest.mark.parametrize(
    ("accepted", "rdp_only", "requested", "code"),
    [
        (rdp.PROTOCOL_HYBRID | rdp.PROTOCOL_HYBRID_EX, False, rdp.PROTOCOL_SSL, rdp.HYBRID_REQUIRED_BY_SERVER),
        (rdp.PROTOCOL_SSL | rdp.PROTOCOL_HYBRID, False, rdp.PROTOCOL_RDP, rdp.SSL_REQUIRED_BY_SERVER),
        (0, True, rdp.PROTOCOL_SSL | rdp.PROTOCOL_HYBRID, rdp.SSL_NOT_ALLOWED_BY_SERVER),
        (0, True, rdp.PROTOCOL_SSL, rdp.SSL_NOT_ALLOWED_BY_SERVER),
    ],
)
def test_negotiation_failure_codes(
    endpoint: rdp.RdpEndpoint, host: ViewHost, *, accepted: int, rdp_only: bool, requested: int, code: int
) -> None:
    host.view = replace(HEALTHY, accepted_protocols=accepted, rdp_only=rdp_only)
    sock, answer = x224_exchange(requested)
    try:
        assert answer == bytes.fromhex("030000130ed0000012340003000800") + struct.pack("<I", code)
        assert sock.recv(1) == b""  # the server closes after a failure
    finally:
        sock.close()
    assert wait_for(lambda: len(host.attempts) == 1)
    assert host.attempts[0]["outcome"] == "negotiation_failure"
    assert host.attempts[0]["code"] == code


def test_rdp_only_server_selects_native_rdp_for_a_legacy_request(endpoint: rdp.RdpEndpoint, host: ViewHost) -> None:
    host.view = replace(HEALTHY, accepted_protocols=0, rdp_only=True)
    sock, answer = x224_exchange(rdp.PROTOCOL_RDP)
    sock.close()
    assert answer == bytes.fromhex("030000130ed00000123400021f080000000000")


def test_tls_presents_the_views_certificate(endpoint: rdp.RdpEndpoint, host: ViewHost) -> None:
    sock, answer = x224_exchange(rdp.PROTOCOL_SSL)
    assert answer[-8:] == bytes.fromhex("021f080001000000")
    with client_context().wrap_socket(sock) as tls:
        assert tls.getpeercert(binary_form=True) == CERT_DER
    assert wait_for(lambda: bool(host.attempts))
    assert host.attempts[0]["outcome"] == "tls_established"


def test_tls_follows_a_certificate_change_per_connection(endpoint: rdp.RdpEndpoint, host: ViewHost) -> None:
    other_pem, other_key = self_signed_certificate("other", [ADDRESS])
    host.view = replace(HEALTHY, cert_pem=other_pem, key_pem=other_key)
    sock, _confirm = x224_exchange(rdp.PROTOCOL_SSL)
    with client_context().wrap_socket(sock) as tls:
        presented = tls.getpeercert(binary_form=True)
    assert presented is not None
    assert x509.load_der_x509_certificate(presented).subject.rfc4514_string() == "CN=other"


def test_tls_versions_of_the_view_are_enforced(endpoint: rdp.RdpEndpoint, host: ViewHost) -> None:
    host.view = replace(HEALTHY, tls_versions=["TLSv1.2"])
    sock, _confirm = x224_exchange(rdp.PROTOCOL_SSL)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        client_context(ssl.TLSVersion.TLSv1_3).wrap_socket(sock).close()
    sock.close()
    sock, _confirm = x224_exchange(rdp.PROTOCOL_SSL)
    with client_context().wrap_socket(sock) as tls:
        assert tls.version() == "TLSv1.2"


def test_reset_after_x224_when_the_credential_cannot_be_built(endpoint: rdp.RdpEndpoint, host: ViewHost) -> None:
    host.view = replace(HEALTHY, failure="reset_after_x224", cert_pem=None, key_pem=None)
    sock, answer = x224_exchange(rdp.PROTOCOL_SSL | rdp.PROTOCOL_HYBRID)
    assert answer[-8:] == bytes.fromhex("021f080002000000")  # the confirm arrives normally...
    with pytest.raises(ConnectionResetError):  # ...then the ClientHello meets a reset
        client_context().wrap_socket(sock)
    sock.close()
    assert wait_for(lambda: bool(host.attempts))
    assert host.attempts[0]["outcome"] == "reset_after_x224"


def test_not_listening_refuses_tcp(endpoint: rdp.RdpEndpoint, host: ViewHost) -> None:
    host.view = replace(HEALTHY, listening=False)
    endpoint.sync()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ADDRESS, PORT), timeout=2)
    host.view = HEALTHY
    endpoint.sync()
    sock, answer = x224_exchange(rdp.PROTOCOL_SSL)
    sock.close()
    assert answer[-8:] == bytes.fromhex("021f080001000000")


def test_view_turning_off_between_sync_and_accept_resets(host: ViewHost) -> None:
    listener = rdp.RdpEndpoint(ADDRESS, lambda: host)  # type: ignore[arg-type,return-value]
    listener.sync(strict=True)  # bound, but the accept loop is not running: the connection waits in the backlog
    try:
        client = socket.create_connection((ADDRESS, PORT), timeout=2)
        host.view = replace(HEALTHY, listening=False)
        assert listener._sock is not None
        server_side, _peer = listener._sock.accept()
        assert listener.handle(server_side, host) == {"outcome": "refused"}  # type: ignore[arg-type]
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        client.close()
    finally:
        listener.stop()


def test_port_change_moves_the_listener(endpoint: rdp.RdpEndpoint, host: ViewHost) -> None:
    host.view = replace(HEALTHY, port=3390)
    assert wait_for(lambda: endpoint.bound_port == 3390)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ADDRESS, PORT), timeout=2)
    sock, answer = x224_exchange(rdp.PROTOCOL_SSL, port=3390)
    sock.close()
    assert answer[:4] == b"\x03\x00\x00\x13"


# --- CredSSP -------------------------------------------------------------------------------------------------------

# TSRequest v6 carrying an NTLM NEGOTIATE (flags 0xE20882B7), as in the wire-protocol reference.
NEGOTIATE_TS_REQUEST = bytes.fromhex(
    "3037a003020106a130302e302ca02a04284e544c4d5353500001000000b78208e2" + "00" * 16 + "0a0063450000000f"
)


def av_pairs(challenge: bytes) -> dict[int, bytes]:
    length, _max_length, offset = struct.unpack("<HHI", challenge[40:48])
    info = challenge[offset : offset + length]
    pairs: dict[int, bytes] = {}
    position = 0
    while position < len(info):
        av_id, av_len = struct.unpack("<HH", info[position : position + 4])
        pairs[av_id] = info[position + 4 : position + 4 + av_len]
        position += 4 + av_len
        if av_id == 0:
            break
    return pairs


def test_hybrid_answers_an_ntlm_challenge_with_the_hosts_names(endpoint: rdp.RdpEndpoint, host: ViewHost) -> None:
    sock, answer = x224_exchange(rdp.PROTOCOL_SSL | rdp.PROTOCOL_HYBRID)
    assert answer[-8:] == bytes.fromhex("021f080002000000")
    with client_context().wrap_socket(sock) as tls:
        tls.sendall(NEGOTIATE_TS_REQUEST)
        data = b""
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
    version, token = rdp.parse_ts_request(data)
    assert version == 6
    assert token is not None
    assert token[:12] == b"NTLMSSP\0\x02\0\0\0"
    pairs = av_pairs(token)
    assert pairs[rdp.MSV_AV_NB_COMPUTER_NAME].decode("utf-16-le") == "WEB01"
    assert pairs[rdp.MSV_AV_NB_DOMAIN_NAME].decode("utf-16-le") == "CORP"
    assert pairs[rdp.MSV_AV_DNS_COMPUTER_NAME].decode("utf-16-le") == "web01.corp.example.com"
    filetime = struct.unpack("<Q", pairs[rdp.MSV_AV_TIMESTAMP])[0]
    assert abs((filetime - 116444736000000000) / 1e7 - time.time()) < 60
    assert struct.unpack("<BBH", token[48:52]) == (10, 0, 20348)
    assert wait_for(lambda: bool(host.attempts))
    assert host.attempts[0]["outcome"] == "credssp_challenge"


def test_ntlm_challenge_is_readable_by_pyspnego() -> None:
    from spnego._ntlm_raw.messages import Challenge

    identity = rdp.NtlmIdentity("FILE02", "file02", None, 17763)
    raw = rdp.ntlm_challenge(identity, 0xE20882B7, b"\x01" * 8, time.time())
    challenge = Challenge.unpack(raw)
    assert challenge.target_name == "FILE02"
    assert challenge.server_challenge == b"\x01" * 8
    assert str(challenge.version).startswith("10.0.17763")


# --- with the real host model --------------------------------------------------------------------------------------

HOSTS = Path(__file__).resolve().parents[1] / "hosts"


def test_model_hosts_healthy_gets_tls_and_broken_key_gets_reset() -> None:
    from rdplab.model.host import WindowsHost

    healthy = WindowsHost.from_file(HOSTS / "healthy.yml")
    broken = WindowsHost.from_file(HOSTS / "missing-selfsigned.yml")
    expected_pem = healthy.rdp_view(connect=False).cert_pem
    assert expected_pem is not None
    current = healthy
    listener = rdp.RdpEndpoint(ADDRESS, lambda: current)
    listener.start()
    try:
        sock, answer = x224_exchange(rdp.PROTOCOL_SSL | rdp.PROTOCOL_HYBRID | rdp.PROTOCOL_HYBRID_EX)
        assert answer[-8:] == bytes.fromhex("021f080008000000")
        with client_context().wrap_socket(sock) as tls:
            presented = tls.getpeercert(binary_form=True)
        assert presented == x509.load_pem_x509_certificate(expected_pem).public_bytes(Encoding.DER)
        # NLA is required on the model's hosts: a TLS-only client is told so.
        sock, answer = x224_exchange(rdp.PROTOCOL_SSL)
        sock.close()
        assert answer[-8:] == bytes.fromhex("0300080005000000")
        assert wait_for(lambda: healthy.counters.rdp_connections == 2)

        current = broken
        sock, answer = x224_exchange(rdp.PROTOCOL_SSL | rdp.PROTOCOL_HYBRID)
        with pytest.raises(ConnectionResetError):
            client_context().wrap_socket(sock)
        sock.close()
        assert wait_for(lambda: broken.counters.rdp_connections == 1)
    finally:
        listener.stop()
