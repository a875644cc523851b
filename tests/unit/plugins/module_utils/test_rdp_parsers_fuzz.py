"""Property-based tests: random bytes fed to every parser of the handshake probe.

A parser may accept the bytes or raise ProtocolViolation (the probe turns that into a reported status); any other
exception would be a traceback in front of the user.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import socket
import threading
import typing as t

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_credssp as credssp
from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_ntlm as ntlm
from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_udp as udp
from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_x224 as x224
from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import probe
from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_wire import ProtocolViolation

# Random bytes, plus random bytes behind the right magic so the deeper branches are reached too.
any_bytes = st.binary(max_size=600)
tpkt_like = st.builds(lambda body: b"\x03\x00" + (len(body) + 4).to_bytes(2, "big") + body, st.binary(max_size=64))
der_like = st.builds(
    lambda tag, body: bytes([tag]) + credssp.encode_length(len(body)) + body,
    st.sampled_from([0x30, 0xA0, 0xA1, 0x02]),
    st.binary(max_size=300),
)
ntlm_like = st.builds(lambda body: ntlm.SIGNATURE + b"\x02\x00\x00\x00" + body, st.binary(max_size=300))


def accepts_or_violation(parse: t.Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(ProtocolViolation):
        parse(data)


@given(st.one_of(any_bytes, tpkt_like))
def test_connection_confirm_parser(data: bytes) -> None:
    accepts_or_violation(x224.parse_connection_confirm, data)


@given(st.one_of(any_bytes, der_like))
def test_tsrequest_parser(data: bytes) -> None:
    accepts_or_violation(credssp.parse_tsrequest, data)


@given(st.one_of(any_bytes, der_like), st.integers(min_value=0, max_value=700))
def test_der_reader_at_any_offset(data: bytes, offset: int) -> None:
    accepts_or_violation(lambda raw: credssp.read_tlv(raw, offset), data)


@given(st.one_of(any_bytes, ntlm_like))
def test_ntlm_challenge_parser(data: bytes) -> None:
    try:
        challenge = ntlm.parse_challenge(data)
    except ProtocolViolation:
        return
    # Whatever was parsed must still make a JSON report.
    json.dumps(challenge.as_dict(now=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)))


@given(any_bytes, st.integers(min_value=0, max_value=2**32 - 1))
def test_udp_answer_parser_never_raises(data: bytes, isn: int) -> None:
    answer = udp.parse_answer(data, isn)
    assert answer.length == len(data)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(any_bytes, tpkt_like), st.booleans())
def test_probe_against_a_peer_sending_random_bytes(answer: bytes, close_after: bool) -> None:
    """A peer that answers every connection with the same random bytes: the probe reports, never raises."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _peer = server.accept()
            except OSError:
                continue
            with client:
                try:
                    client.settimeout(0.5)
                    client.recv(1024)
                    client.sendall(answer)
                    if not close_after:
                        client.recv(1024)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = probe(
            "127.0.0.1",
            port,
            read_timeout=0.2,
            connect_timeout=0.5,
            checks=["negotiation", "tls", "credssp"],
            protocols=["tls", "credssp"],
            tls_versions=["TLSv1.2"],
        )
    finally:
        stop.set()
        thread.join(2)
        server.close()
    json.dumps(result)
    assert result["internal_error"] is None
    assert result["verdict"] in {"fails", "connects", "connects_with_prompt", "connects_with_warnings"}
