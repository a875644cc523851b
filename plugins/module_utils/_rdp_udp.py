# Copyright: rdpfix contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""RDP-UDP connection SYN ([MS-RDPEUDP] 2.2.2.1, 2.2.2.5, 3.1.5.1.1) and the reading of the server's answer.

A SYN+ACK proves UDP 3389 reaches the server. Silence proves nothing: the port may be filtered, UDP transport
disabled by policy, or the server may simply ignore a SYN outside a session. The report says so.
"""

from __future__ import annotations

import secrets
import socket
import struct
import typing as t
from dataclasses import dataclass

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_wire import Stopwatch, classify_exception, close_quietly

FLAG_SYN = 0x0001
FLAG_FIN = 0x0002
FLAG_ACK = 0x0004
DATAGRAM_SIZE = 1232  # the client pads its SYN to the MTU it announces
RECEIVE_WINDOW = 64


def build_syn(initial_sequence_number: int) -> bytes:
    """snSourceAck = -1, receive window, flags SYN, then SYNDATA (ISN, up/down MTU 1232), zero padded."""
    if not 0 <= initial_sequence_number <= 0xFFFFFFFF:
        raise ValueError("initial sequence number must fit in 32 bits")
    header = struct.pack(">IHH", 0xFFFFFFFF, RECEIVE_WINDOW, FLAG_SYN)
    syn_data = struct.pack(">IHH", initial_sequence_number, DATAGRAM_SIZE, DATAGRAM_SIZE)
    datagram = header + syn_data
    return datagram + b"\x00" * (DATAGRAM_SIZE - len(datagram))


@dataclass(frozen=True)
class UdpAnswer:
    is_syn_ack: bool
    acknowledges_our_syn: bool
    flags: int | None
    server_sequence_number: int | None
    up_mtu: int | None
    down_mtu: int | None
    length: int


def parse_answer(datagram: bytes, initial_sequence_number: int) -> UdpAnswer:
    """Interpret any datagram that came back; never raises (an unparseable answer is still an answer)."""
    if len(datagram) < 8:
        return UdpAnswer(False, False, None, None, None, None, len(datagram))
    source_ack, _window, flags = struct.unpack_from(">IHH", datagram, 0)
    is_syn_ack = flags & (FLAG_SYN | FLAG_ACK) == (FLAG_SYN | FLAG_ACK)
    server_isn = up_mtu = down_mtu = None
    if is_syn_ack and len(datagram) >= 16:
        server_isn, up_mtu, down_mtu = struct.unpack_from(">IHH", datagram, 8)
    return UdpAnswer(
        is_syn_ack=is_syn_ack,
        acknowledges_our_syn=is_syn_ack and source_ack == initial_sequence_number,
        flags=flags,
        server_sequence_number=server_isn,
        up_mtu=up_mtu,
        down_mtu=down_mtu,
        length=len(datagram),
    )


def probe_udp(address: tuple[t.Any, ...], family: int, timeout: float) -> dict[str, t.Any]:
    """Send one RDP-UDP SYN and report: answered, refused (ICMP port unreachable), no_answer, or error."""
    watch = Stopwatch()
    isn = secrets.randbits(32)
    sock: socket.socket | None = None
    result: dict[str, t.Any] = {"port": address[1]}
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.settimeout(timeout)
        # A connected UDP socket turns an ICMP port-unreachable into ECONNREFUSED on the next recv.
        sock.connect(address)
        sock.send(build_syn(isn))
        datagram = sock.recv(65535)
    except Exception as exc:
        status, detail = classify_exception(exc)
        if status == "timeout":
            result.update(
                status="no_answer",
                detail="no answer to an RDP-UDP SYN: ambiguous - UDP may be filtered, disabled by policy "
                "(SelectTransport), or the server ignores SYNs outside a session",
            )
        elif status == "refused":
            result.update(status="refused", detail="ICMP port unreachable: nothing listens on this UDP port")
        else:
            result.update(status="error", detail=detail)
        result["elapsed_ms"] = watch.elapsed_ms()
        return result
    finally:
        close_quietly(sock)
    answer = parse_answer(datagram, isn)
    result["elapsed_ms"] = watch.elapsed_ms()
    result["answer_bytes"] = answer.length
    if answer.acknowledges_our_syn:
        result.update(status="answered", detail="the server answered the RDP-UDP SYN with a SYN+ACK")
        result["server_mtu"] = {"up": answer.up_mtu, "down": answer.down_mtu}
    else:
        result.update(
            status="answered_unexpected",
            detail="something answered on this UDP port, but not with a SYN+ACK acknowledging our SYN",
        )
    return result
