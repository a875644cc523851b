"""The lab's RDP endpoint: X.224 negotiation, TLS with the view's certificate, resets, CredSSP's NTLM challenge."""

from __future__ import annotations

import random
import socket
import ssl
import struct
import threading
import time
import typing as t
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from rdplab import rdp
from rdplab.model.host import Counters, RdpView, WindowsHost
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


def test_a_firewall_block_drops_the_connection_so_the_client_times_out(
    endpoint: rdp.RdpEndpoint, host: ViewHost
) -> None:
    host.view = replace(HEALTHY, listening=False, dropped=True)
    endpoint.sync()
    # No reset and no answer: Windows Firewall drops the SYN (stealth mode), the client's connect runs out of time.
    with pytest.raises(TimeoutError):
        socket.create_connection((ADDRESS, PORT), timeout=0.5)
    assert host.attempts == []  # nothing reached the listener
    # A rule change lets it in: the same port listens again at once.
    host.view = HEALTHY
    endpoint.sync()
    sock, answer = x224_exchange(rdp.PROTOCOL_SSL)
    sock.close()
    assert answer[-8:] == bytes.fromhex("021f080001000000")
    # ...and drops again when blocked once more.
    host.view = replace(HEALTHY, listening=False, dropped=True)
    endpoint.sync()
    with pytest.raises(TimeoutError):
        socket.create_connection((ADDRESS, PORT), timeout=0.5)


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


# --- Schannel: what a TLS client meets, and the events Windows logs for it -------------------------------------------

SCHANNEL_PROTOCOLS = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\SecurityProviders\\SCHANNEL\\Protocols"


def client_hello_of(context: ssl.SSLContext) -> bytes:
    """The ClientHello records a client context sends first (driven through memory BIOs, no socket)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def version_context(minimum: ssl.TLSVersion, maximum: ssl.TLSVersion) -> ssl.SSLContext:
    """A client allowing exactly these versions, and offering old suites too (as a TLS 1.0 client needs them)."""
    context = client_context()
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = minimum
        context.maximum_version = maximum
    return context


def test_client_hello_versions_come_from_supported_versions_or_the_legacy_version() -> None:
    modern = rdp.client_hello(client_hello_of(version_context(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)))
    assert modern is not None
    assert rdp.TLS13 in rdp.offered_versions(modern) and 0x0303 in rdp.offered_versions(modern)
    # A client that stops at TLS 1.2 sends no supported_versions: every version up to its legacy_version.
    legacy = rdp.client_hello(client_hello_of(version_context(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)))
    assert legacy is not None
    assert sorted(rdp.offered_versions(legacy)) == [0x0301, 0x0302, 0x0303]


def test_a_client_hello_split_over_segments_is_waited_for() -> None:
    records = client_hello_of(version_context(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3))
    assert rdp.client_hello(records[:-1]) is None
    with pytest.raises(rdp.ProtocolViolation):
        rdp.client_hello(b"\x03\x00\x00\x13" + records)  # an RDP packet where the ClientHello belongs


def model_host(name: str, registry: dict[str, dict[str, int]]) -> WindowsHost:
    """A ready host, with Schannel protocol values (protocol -> name -> DWORD) set as if they were there at boot."""
    from rdplab.model import schannel
    from rdplab.model.registry import make_value

    host = WindowsHost.from_file(HOSTS / f"{name}.yml")
    for protocol, values in registry.items():
        for value_name, value in values.items():
            key = f"{SCHANNEL_PROTOCOLS}\\{protocol}\\Server"
            host.registry.set(key, value_name, make_value("REG_DWORD", value))
    schannel.reboot(host)
    return host


@pytest.fixture
def serve() -> t.Iterator[t.Callable[[WindowsHost], WindowsHost]]:
    """Serve a model host on the test address for the rest of the test."""
    endpoints: list[rdp.RdpEndpoint] = []

    def start(host: WindowsHost) -> WindowsHost:
        listener = rdp.RdpEndpoint(ADDRESS, lambda: host)
        listener.start()
        endpoints.append(listener)
        return host

    yield start
    for listener in endpoints:
        listener.stop()


def schannel_events(host: WindowsHost) -> list[tuple[int, dict[str, str]]]:
    with host.lock:
        return [(event.id, dict(event.data)) for event in host.events.events if event.provider == "Schannel"]


def tls_attempt(context: ssl.SSLContext) -> str:
    """The TLS version a client with this context gets through X.224 (SSL | HYBRID) and the handshake."""
    sock, _confirm = x224_exchange(rdp.PROTOCOL_SSL | rdp.PROTOCOL_HYBRID | rdp.PROTOCOL_HYBRID_EX)
    with context.wrap_socket(sock) as tls:
        return str(tls.version())


def test_tls13_key_on_2019_answers_tls13_client_hellos_with_tls12(
    serve: t.Callable[[WindowsHost], WindowsHost],
) -> None:
    host = serve(WindowsHost.from_file(HOSTS / "tls-tls13-forced-2019.yml"))
    # Server 2019 has no TLS 1.3, whatever its TLS 1.3 Server key says: a client offering it gets TLS 1.2.
    assert tls_attempt(version_context(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)) == "TLSv1.2"
    assert tls_attempt(version_context(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"
    assert wait_for(lambda: host.counters.rdp_connections == 2)
    assert schannel_events(host) == []


def test_no_protocol_in_common_logs_the_alert_sent_or_received(serve: t.Callable[[WindowsHost], WindowsHost]) -> None:
    host = serve(WindowsHost.from_file(HOSTS / "tls-tls12-disabled.yml"))  # TLS 1.0 and 1.1 only
    # Offering TLS 1.2 and 1.3 in supported_versions: nothing in common, the server sends protocol_version.
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        tls_attempt(version_context(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3))
    assert wait_for(lambda: schannel_events(host) == [(36888, {"AlertDesc": "70", "ErrorState": "1203"})])
    # A TLS 1.2-only client offers no supported_versions: it is answered with TLS 1.1, refuses it and sends
    # protocol_version itself.
    with pytest.raises(ssl.SSLError, match="UNSUPPORTED_PROTOCOL"):
        tls_attempt(version_context(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2))
    assert wait_for(lambda: len(schannel_events(host)) == 2)
    assert schannel_events(host)[1] == (36887, {"AlertDesc": "70"})
    # A client that still allows TLS 1.1 connects, and nothing is logged.
    assert tls_attempt(version_context(ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_3)) == "TLSv1.1"
    assert wait_for(lambda: host.counters.rdp_connections == 3)
    assert len(schannel_events(host)) == 2


def test_no_usable_cipher_suite_fails_the_handshake_with_36874(serve: t.Callable[[WindowsHost], WindowsHost]) -> None:
    host = serve(WindowsHost.from_file(HOSTS / "tls-cipher-incompatible.yml"))  # ECDSA suites, RSA key
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        tls_attempt(version_context(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2))
    assert wait_for(lambda: len(schannel_events(host)) == 2)
    assert schannel_events(host) == [
        (36874, {"Protocol": "TLS 1.2"}),
        (36888, {"AlertDesc": "40", "ErrorState": "1203"}),
    ]


def test_an_empty_cipher_suite_list_is_answered_with_handshake_failure(
    serve: t.Callable[[WindowsHost], WindowsHost],
) -> None:
    from rdplab.model import schannel
    from rdplab.model.registry import make_value

    host = WindowsHost.from_file(HOSTS / "healthy.yml")
    host.registry.set(schannel.CIPHER_POLICY_KEY, "Functions", make_value("REG_SZ", ""))
    schannel.reboot(host)
    serve(host)
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        tls_attempt(version_context(ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3))
    assert wait_for(lambda: len(schannel_events(host)) == 2)
    assert schannel_events(host) == [
        (36874, {"Protocol": "TLS 1.2"}),
        (36888, {"AlertDesc": "40", "ErrorState": "1203"}),
    ]


def test_no_server_protocol_at_all_resets_with_36871(serve: t.Callable[[WindowsHost], WindowsHost]) -> None:
    off = {protocol: {"Enabled": 0} for protocol in ("TLS 1.0", "TLS 1.1", "TLS 1.2", "TLS 1.3")}
    host = serve(model_host("healthy", off))
    # An X.224 exchange alone starts no TLS handshake: Schannel has nothing to log.
    sock, _confirm = x224_exchange(rdp.PROTOCOL_SSL | rdp.PROTOCOL_HYBRID)
    sock.close()
    assert wait_for(lambda: host.counters.rdp_connections == 1)
    with pytest.raises(ConnectionResetError):
        tls_attempt(client_context())
    assert wait_for(lambda: bool(schannel_events(host)))
    assert schannel_events(host) == [(36871, {"ErrorState": "10013"})]


# --- what the handshake probe meets ----------------------------------------------------------------------------


def test_the_probe_meets_a_timeout_on_a_blocked_port_and_a_refusal_with_termservice_stopped() -> None:
    from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import probe

    lab_host = WindowsHost.from_file(Path(__file__).resolve().parents[1] / "hosts" / "firewall-rules-disabled.yml")
    address = free_network() + ".11"
    listener = rdp.RdpEndpoint(address, lambda: lab_host)
    listener.start()
    try:
        result = probe(address, PORT, checks=["tcp"], connect_timeout=0.5)
        assert result["tcp"]["status"] == "timeout"
        assert {item["id"] for item in result["findings"]} == {"handshake.tcp_timeout"}
        assert lab_host.counters.rdp_connections == 0  # dropped before the listener
        with lab_host.lock:
            lab_host.stop_service("TermService")
        listener.sync()
        result = probe(address, PORT, checks=["tcp"], connect_timeout=0.5)
        assert result["tcp"]["status"] == "refused"
    finally:
        listener.stop()
