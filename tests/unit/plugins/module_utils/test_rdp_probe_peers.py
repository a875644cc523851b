"""The probe end to end against scripted peers on loopback: a Windows-like RDP server and hostile ones.

Each peer is a small threaded server whose behaviour the test states; the assertions are what the probe must
report for that behaviour. The probe must never raise and its result must be JSON-serialisable.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import ssl
import struct
import threading
import typing as t
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from spnego._ntlm_raw.messages import AvId, Challenge, FileTime, NegotiateFlags, TargetInfo, Version

from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_credssp as credssp
from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import probe
from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_wire import ProbeError

UTC = datetime.UTC
Handler = t.Callable[[socket.socket], None]


class Peer:
    """Accepts connections on 127.0.0.1 and runs ``handler`` for each, in its own thread, until stopped."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(5)
        try:
            self.handler(client)
        except (OSError, ProbeError):
            # The probe closes many of its connections early on purpose (one trial each).
            pass
        finally:
            client.close()

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()
        self.thread.join(2)


@pytest.fixture
def peer() -> t.Iterator[t.Callable[[Handler], Peer]]:
    peers: list[Peer] = []

    def start(handler: Handler) -> Peer:
        peers.append(Peer(handler))
        return peers[-1]

    yield start
    for item in peers:
        item.stop()


def quick_probe(port: int, **kwargs: t.Any) -> dict[str, t.Any]:
    kwargs.setdefault("read_timeout", 1.0)
    kwargs.setdefault("connect_timeout", 1.0)
    kwargs.setdefault("udp_timeout", 0.2)
    kwargs.setdefault("resolver", lambda name: ["127.0.0.1"])
    result = probe("127.0.0.1", port, **kwargs)
    json.dumps(result)  # must be JSON-serialisable whatever happened
    assert result["internal_error"] is None
    return result


def finding_ids(result: dict[str, t.Any]) -> set[str]:
    return {item["id"] for item in result["findings"]}


def read_request(client: socket.socket) -> int:
    """Read one X.224 Connection Request; return its requestedProtocols."""
    header = client.recv(4, socket.MSG_WAITALL)
    if len(header) < 4:
        raise ConnectionAbortedError("the probe closed before sending a request")
    body = client.recv(struct.unpack(">H", header[2:4])[0] - 4, socket.MSG_WAITALL)
    return int(struct.unpack("<I", body[-4:])[0])


def confirm_bytes(neg_type: int, value: int) -> bytes:
    return (
        bytes.fromhex("030000130ed00000123400")
        + bytes([neg_type, 0x1F if neg_type == 2 else 0])
        + struct.pack("<HI", 8, value)
    )


# --- a Windows-like server ---------------------------------------------------------------------------------------


def make_cert(tmp: Path, name: str, days_left: int) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=200))
        .not_valid_after(now + datetime.timedelta(days=days_left))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / f"{name}-{days_left}.crt", tmp / f"{name}-{days_left}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def ntlm_challenge(server_time: datetime.datetime) -> bytes:
    info = TargetInfo()
    info[AvId.nb_computer_name] = "WEB01"
    info[AvId.nb_domain_name] = "CORP"
    info[AvId.dns_computer_name] = "web01.corp.example.com"
    info[AvId.dns_domain_name] = "corp.example.com"
    info[AvId.timestamp] = FileTime(*server_time.timetuple()[:6], tzinfo=UTC)
    flags = NegotiateFlags.unicode | NegotiateFlags.target_info | NegotiateFlags.version
    return Challenge(flags, b"\x11" * 8, "CORP", info, Version(10, 0, 20348)).pack()


class WindowsLike:
    """A server that negotiates like Windows with NLA on (or off), then TLS, then answers CredSSP's NEGOTIATE."""

    def __init__(
        self,
        cert: tuple[Path, Path],
        *,
        nla_required: bool = True,
        versions: tuple[ssl.TLSVersion, ssl.TLSVersion] = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3),
        credssp_answer: bytes | None = None,
        reset_after_x224: bool = False,
        clock_offset: float = 0.0,
    ) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert[0]), str(cert[1]))
        self.context.minimum_version, self.context.maximum_version = versions
        self.nla_required = nla_required
        self.credssp_answer = credssp_answer
        self.reset_after_x224 = reset_after_x224
        self.clock_offset = clock_offset

    def __call__(self, client: socket.socket) -> None:
        requested = read_request(client)
        if requested & 0x02:
            selected = 0x02
        elif self.nla_required:
            client.sendall(confirm_bytes(3, 5))  # HYBRID_REQUIRED_BY_SERVER
            return
        elif requested & 0x01:
            selected = 0x01
        else:
            client.sendall(confirm_bytes(3, 1))  # SSL_REQUIRED_BY_SERVER
            return
        client.sendall(confirm_bytes(2, selected))
        if self.reset_after_x224:
            # What Windows does when it cannot build its TLS credential: an RST instead of a ServerHello.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        try:
            tls = self.context.wrap_socket(client, server_side=True)
        except ssl.SSLError:
            return
        with tls:
            if selected != 0x02:
                return
            request = credssp.read_tsrequest(tls)
            assert credssp.parse_tsrequest(request).nego_tokens[0].startswith(b"NTLMSSP\x00\x01")
            if self.credssp_answer is not None:
                tls.sendall(self.credssp_answer)
                return
            server_time = datetime.datetime.now(UTC) + datetime.timedelta(seconds=self.clock_offset)
            tls.sendall(credssp.build_tsrequest(ntlm_challenge(server_time)))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    tmp = tmp_path_factory.mktemp("certs")
    return {
        "valid": make_cert(tmp, "web01.corp.example.com", 90),
        "expired": make_cert(tmp, "web01.corp.example.com", -3),
    }


def test_windows_like_server_with_nla(peer: t.Callable[[Handler], Peer], certs: dict[str, tuple[Path, Path]]) -> None:
    server = peer(WindowsLike(certs["valid"]))
    result = quick_probe(server.port, server_name="web01.corp.example.com")
    negotiation = result["negotiation"]
    assert negotiation["accepted"] == ["credssp"]
    assert negotiation["nla_required"] is True
    assert negotiation["trials"]["tls"]["failure_name"] == "HYBRID_REQUIRED_BY_SERVER"
    assert result["tls"]["carrier"] == "credssp"
    assert result["tls"]["accepted_versions"] == ["TLSv1.2", "TLSv1.3"]
    assert result["tls"]["versions"]["TLSv1.0"]["status"] in {"tls_alert", "wrong_version"}
    assert result["tls"]["certificate"]["common_name"] == "web01.corp.example.com"
    ntlm = result["credssp"]["ntlm"]
    assert (ntlm["netbios_computer"], ntlm["dns_computer"], ntlm["os_version"]) == (
        "WEB01",
        "web01.corp.example.com",
        "10.0.20348",
    )
    assert abs(ntlm["clock_skew_seconds"]) < 5
    assert result["names"]["matches_server_name"] is True
    assert result["names"]["certificate_matches_connect_name"] is True
    assert "handshake.nla_required" in finding_ids(result)
    assert result["verdict"] == "connects_with_prompt" or result["verdict"] == "connects"


def test_expired_certificate_and_clock_skew_are_findings(
    peer: t.Callable[[Handler], Peer], certs: dict[str, tuple[Path, Path]]
) -> None:
    server = peer(WindowsLike(certs["expired"], clock_offset=-900))
    result = quick_probe(server.port, server_name="web01.corp.example.com", checks=["negotiation", "tls", "credssp"])
    assert result["tls"]["certificate"]["expired"] is True
    ids = finding_ids(result)
    assert {"handshake.certificate_expired", "handshake.clock_skew"} <= ids
    assert result["verdict"] == "connects_with_prompt"
    skew = result["credssp"]["ntlm"]["clock_skew_seconds"]
    assert -905 < skew < -895


def test_reset_after_x224_is_the_0x904_case(
    peer: t.Callable[[Handler], Peer], certs: dict[str, tuple[Path, Path]]
) -> None:
    server = peer(WindowsLike(certs["valid"], nla_required=False, reset_after_x224=True))
    result = quick_probe(server.port, checks=["negotiation", "tls"])
    assert result["negotiation"]["accepted"] == ["tls", "credssp"]
    assert {item["status"] for item in result["tls"]["versions"].values()} <= {"reset", "closed"}
    critical = [item for item in result["findings"] if item["severity"] == "critical"]
    assert [item["id"] for item in critical] == ["handshake.tls_closed"]
    assert critical[0]["effect"] == "0x904/0x7"
    assert result["verdict"] == "fails" and result["connectable"] is False


def test_wrong_name_and_thumbprint(peer: t.Callable[[Handler], Peer], certs: dict[str, tuple[Path, Path]]) -> None:
    server = peer(WindowsLike(certs["valid"]))
    result = quick_probe(
        server.port,
        server_name="rdp-alias.example.com",
        expected_thumbprint="00" * 20,
        checks=["negotiation", "tls", "credssp", "names"],
    )
    ids = finding_ids(result)
    assert {
        "handshake.certificate_name_mismatch",
        "handshake.certificate_thumbprint_mismatch",
        "handshake.server_name_differs",
    } <= ids
    mismatch = next(item for item in result["findings"] if item["id"] == "handshake.certificate_thumbprint_mismatch")
    assert mismatch["evidence"]["presented"] == result["tls"]["certificate"]["thumbprint"]


@pytest.mark.parametrize(
    "answer",
    [
        b"\x30\x03\x02\x01\x06",  # a bare INTEGER where the version wrapper belongs
        bytes.fromhex("3007a003020106a100"),  # empty negoTokens
        credssp.build_tsrequest(b"NOT-NTLM-AT-ALL"),
        b"\x30\x82\x01\x00" + b"\x00" * 10,  # truncated, then the server closes
        b"\x04\x02hi",
    ],
)
def test_garbage_credssp_answers_are_reported(
    peer: t.Callable[[Handler], Peer], certs: dict[str, tuple[Path, Path]], answer: bytes
) -> None:
    server = peer(WindowsLike(certs["valid"], credssp_answer=answer))
    result = quick_probe(server.port, checks=["negotiation", "credssp"])
    assert result["credssp"]["status"] in {"invalid", "closed"}
    assert "handshake.credssp_no_challenge" in finding_ids(result)


# --- hostile and broken peers --------------------------------------------------------------------------------------


def http_server(client: socket.socket) -> None:
    client.recv(1024)
    client.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


def close_at_once(client: socket.socket) -> None:
    client.close()


def truncated_confirm(client: socket.socket) -> None:
    read_request(client)
    client.sendall(bytes.fromhex("030000130ed000"))


def garbage(client: socket.socket) -> None:
    client.recv(1024)
    noise = os.urandom(64)
    client.sendall(b"\x7f" + noise)  # never a TPKT version byte


def silent(client: socket.socket) -> None:
    client.recv(1024)
    client.settimeout(3)
    with contextlib.suppress(OSError):
        client.recv(1)


@pytest.mark.parametrize(
    ("handler", "finding", "detail"),
    [
        (http_server, "handshake.not_rdp", "HTTP"),
        (close_at_once, "handshake.x224_closed", "by the server"),  # a FIN or an RST, as the kernel decides
        (truncated_confirm, "handshake.x224_closed", "after 3 of 15 bytes"),
        (silent, "handshake.x224_no_answer", "no answer"),
    ],
)
def test_hostile_peers_are_reported_not_raised(
    peer: t.Callable[[Handler], Peer], handler: Handler, finding: str, detail: str
) -> None:
    server = peer(handler)
    result = quick_probe(server.port, read_timeout=0.3, protocols=["rdp", "tls"])
    assert result["tcp"]["status"] == "open"
    found = [item for item in result["findings"] if item["id"] == finding]
    assert found, result["findings"]
    assert found[0]["severity"] == "critical"
    assert detail in json.dumps(result["negotiation"])
    assert result["verdict"] == "fails"
    assert result["tls"]["status"] == "skipped"


def test_garbage_peer_is_not_rdp(peer: t.Callable[[Handler], Peer]) -> None:
    server = peer(garbage)
    result = quick_probe(server.port, protocols=["tls"])
    assert result["negotiation"]["trials"]["tls"]["status"] == "invalid"
    assert "handshake.not_rdp" in finding_ids(result)


def test_refused_port_is_unreachable() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    holder.close()  # bound, never listening: nothing accepts on it now
    result = quick_probe(port)
    assert result["tcp"]["status"] == "refused"
    assert result["verdict"] == "unreachable"
    assert finding_ids(result) == {"handshake.tcp_refused"}
    assert result["negotiation"] is None and result["udp"] is None


def test_unresolvable_host_is_reported() -> None:
    def resolver(name: str) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    result = probe("no-such-host.invalid", 3389, resolver=resolver, connect_timeout=0.5)
    assert result["tcp"]["status"] == "unresolved"
    assert "handshake.tcp_unresolved" in finding_ids(result)
    assert result["internal_error"] is None


def test_invalid_options_raise_before_connecting() -> None:
    with pytest.raises(ValueError, match="port must be between") as info:
        probe("127.0.0.1", 0, checks=["tcp", "bogus"], read_timeout=-1)
    message = str(info.value)
    assert "bogus" in message and "read_timeout" in message
