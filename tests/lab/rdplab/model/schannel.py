"""Schannel as the RDP listener meets it: server protocols and the cipher-suite list, both fixed at boot.

Windows reads ``SCHANNEL\\Protocols\\<protocol>\\Server`` and the cipher-suite order policy when it starts
[TLSReg][CipherOrder], so a registry change made now only counts after the next reboot. The lab latches the effective
state when the host boots: when it is created, again once its host file has been loaded (the file describes the host
as it booted), and on each emulated reboot (``rdplab.reboot``). Nothing else latches it, so no read and no connection
can make a registry change count early.
"""

from __future__ import annotations

import re
import typing as t
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from rdplab.model.events import SCHANNEL

if t.TYPE_CHECKING:
    from rdplab.model.certs import Certificate
    from rdplab.model.host import WindowsHost

PROTOCOLS_KEY = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\SecurityProviders\\SCHANNEL\\Protocols"
CIPHER_POLICY_KEY = "HKLM:\\SOFTWARE\\Policies\\Microsoft\\Cryptography\\Configuration\\SSL\\00010002"
PROTOCOLS = ("SSL 2.0", "SSL 3.0", "TLS 1.0", "TLS 1.1", "TLS 1.2", "TLS 1.3")
OPENSSL_NAMES = {"TLS 1.0": "TLSv1", "TLS 1.1": "TLSv1.1", "TLS 1.2": "TLSv1.2", "TLS 1.3": "TLSv1.3"}
TLS13_MIN_BUILD = 20348
WINDOWS_NAMES = {"TLSv1": "TLS 1.0", "TLSv1.1": "TLS 1.1", "TLSv1.2": "TLS 1.2", "TLSv1.3": "TLS 1.3"}

# Why Schannel cannot serve a TLS connection, as RdpView.failure carries it (the certificate chain's own failure,
# "reset_after_x224", comes first). Each is acted out by the RDP endpoint (rdplab.rdp).
NO_SERVER_PROTOCOL = "no_server_protocol"  # no TLS protocol enabled: the credential cannot be created
NO_USABLE_CIPHER_SUITE = "no_usable_cipher_suite"  # no suite in the list usable with the key and protocols

# What the RDP endpoint saw when a handshake failed (its outcome's "tls_failure"), mapped to Schannel's events by
# log_handshake_failure.
NO_COMMON_PROTOCOL = "no_common_protocol"
NO_COMMON_CIPHER = "no_common_cipher"
ALERT_RECEIVED = "alert_received"
ALERT_PROTOCOL_VERSION = 70
ALERT_HANDSHAKE_FAILURE = 40

# The suites Windows Server 2022 enables by default, in their default order: 25 suites [Ciphers2022]. The TLS 1.3
# suites exist only on builds that speak TLS 1.3; older builds get the other 23 (UNCONFIRMED as their exact lists).
_TLS13_SUITES = ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]
_DEFAULT_SUITES = [
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_RSA_WITH_AES_256_CBC_SHA256",
    "TLS_RSA_WITH_AES_128_CBC_SHA256",
    "TLS_RSA_WITH_AES_256_CBC_SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
    "TLS_RSA_WITH_NULL_SHA256",
    "TLS_RSA_WITH_NULL_SHA",
]
TLS_VERSIONS = ("TLS 1.0", "TLS 1.1", "TLS 1.2", "TLS 1.3")
# The TLS version field of each protocol, as Get-TlsCipherSuite's Protocols lists them (771 = 0x0303, TLS 1.2).
WIRE_VERSIONS = {"TLS 1.0": 0x0301, "TLS 1.1": 0x0302, "TLS 1.2": 0x0303, "TLS 1.3": 0x0304}


@dataclass(frozen=True)
class SchannelState:
    protocols: frozenset[str]  # server protocols Schannel will negotiate
    suites: tuple[str, ...]  # the effective cipher-suite order


def _default_on(protocol: str, build: int) -> bool:
    if protocol in ("SSL 2.0", "SSL 3.0"):
        return False
    if protocol == "TLS 1.3":
        return build >= TLS13_MIN_BUILD
    return True


def compute(host: WindowsHost) -> SchannelState:
    """The state the registry describes now (what the next boot will use)."""
    build = host.system.os_build
    enabled: set[str] = set()
    for protocol in PROTOCOLS:
        path = f"{PROTOCOLS_KEY}\\{protocol}\\Server"
        on = host.registry.dword(path, "Enabled")
        disabled_by_default = host.registry.dword(path, "DisabledByDefault")
        if on == 0 or disabled_by_default == 1:
            continue
        if protocol == "TLS 1.3" and build < TLS13_MIN_BUILD:
            # Schannel has no TLS 1.3 before Server 2022 ([Protocols]: "Not supported" on Server 2019); the value
            # has no effect there, and a client offering TLS 1.3 is answered with TLS 1.2 (UNCONFIRMED for
            # Windows 10 1903-22H2, whose experimental TLS 1.3 the value switches on).
            continue
        if on is not None or _default_on(protocol, build):
            enabled.add(protocol)
    policy = host.registry.get(CIPHER_POLICY_KEY, "Functions")
    if policy is not None and isinstance(policy.value, str):
        suites = [item.strip() for item in policy.value.split(",") if item.strip()]
    elif policy is not None and isinstance(policy.value, tuple):
        suites = [str(item).strip() for item in policy.value if str(item).strip()]
    else:
        suites = (_TLS13_SUITES if build >= TLS13_MIN_BUILD else []) + _DEFAULT_SUITES
    return SchannelState(frozenset(enabled), tuple(suites))


def effective(host: WindowsHost) -> SchannelState:
    """What Schannel uses now: the state latched at the last boot."""
    return host.schannel


def reboot(host: WindowsHost) -> None:
    """Latch the registry's state, as Schannel does when Windows starts."""
    host.schannel = compute(host)


def _key_fits(suite: str, key_type: str) -> bool:
    if suite.startswith(("TLS_AES_", "TLS_CHACHA20_")):
        return True
    if "_ECDSA_" in suite:
        return key_type == "EC"
    return "_RSA_" in suite and key_type == "RSA"


def suite_versions(suite: str) -> tuple[str, ...]:
    """The TLS versions a suite can be negotiated with ("Cipher suites can only be negotiated for TLS versions which
    support them" [Ciphers2022]): TLS 1.3 suites with TLS 1.3 only; AEAD and SHA-256/384 suites with TLS 1.2 only;
    suites with a SHA-1 or MD5 MAC (``*_CBC_SHA``, 3DES, RC4, NULL_SHA) with TLS 1.0, 1.1 and 1.2."""
    if _is_tls13_suite(suite):
        return ("TLS 1.3",)
    if suite.endswith(("_SHA", "_MD5")):
        return ("TLS 1.0", "TLS 1.1", "TLS 1.2")
    return ("TLS 1.2",)


def _usable_suites(state: SchannelState, key_type: str | None) -> list[str]:
    """Suites of the list a client can agree on with the listener: the key fits, one of the suite's versions is on,
    and not a NULL suite ("Only used when application explicitly requests" [Ciphers2022]; that TermService does not
    is UNCONFIRMED)."""
    return [
        suite
        for suite in state.suites
        if "_NULL_" not in suite
        and (key_type is None or _key_fits(suite, key_type))
        and any(version in state.protocols for version in suite_versions(suite))
    ]


def handshake_failure(host: WindowsHost, key_type: str | None) -> str | None:
    """Why Schannel cannot serve every TLS client of the listener, or None; the RDP endpoint acts each one out.

    - NO_SERVER_PROTOCOL: no TLS protocol at all, so no server credential (Schannel 36871, state 10013): the
      connection is reset when the ClientHello arrives.
    - NO_USABLE_CIPHER_SUITE: no suite of the list fits the key and serves an enabled protocol [Repair]: every
      handshake fails with no cipher in common (36874, alert 40 sent).
    """
    state = effective(host)
    if not any(p in state.protocols for p in TLS_VERSIONS):
        return NO_SERVER_PROTOCOL
    if not _usable_suites(state, key_type):
        return NO_USABLE_CIPHER_SUITE
    return None


def _is_tls13_suite(suite: str) -> bool:
    return suite.startswith(("TLS_AES_", "TLS_CHACHA20_"))


_SUITE = re.compile(
    r"TLS_(ECDHE_ECDSA|ECDHE_RSA|DHE_RSA|DHE_DSS|RSA)_WITH_AES_(128|256)_(GCM|CBC)_(SHA|SHA256|SHA384)(?:_P(?:256|384|521))?"
)
_OPENSSL_KEY_EXCHANGE = {
    "ECDHE_ECDSA": "ECDHE-ECDSA-",
    "ECDHE_RSA": "ECDHE-RSA-",
    "DHE_RSA": "DHE-RSA-",
    "DHE_DSS": "DHE-DSS-",
}


def openssl_suite(suite: str) -> str | None:
    """The OpenSSL name of a TLS 1.0-1.2 suite Windows names (TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 ->
    ECDHE-RSA-AES256-GCM-SHA384), or None for a TLS 1.3 suite or one the lab cannot serve (3DES, RC4, NULL...)."""
    match = _SUITE.fullmatch(suite)
    if match is None:
        return None
    exchange, bits, mode, mac = match.groups()
    # OpenSSL leaves the mode out of CBC names (and calls SHA-1 plain "SHA").
    body = f"AES{bits}-GCM-{mac}" if mode == "GCM" else f"AES{bits}-{mac}"
    return _OPENSSL_KEY_EXCHANGE.get(exchange, "") + body


def offered_suites(host: WindowsHost) -> list[str]:
    """The TLS 1.0-1.2 suites of the effective list the lab's TLS server can offer, by their OpenSSL names.

    Used when no suite is usable: the lab's server then offers exactly these (none fits the key), so its TLS library
    really fails the handshake with no shared cipher, as Schannel does.
    """
    names = (openssl_suite(suite) for suite in effective(host).suites if not _is_tls13_suite(suite))
    return [name for name in names if name is not None]


def tls_versions(host: WindowsHost) -> list[str]:
    state = effective(host)
    return [OPENSSL_NAMES[p] for p in TLS_VERSIONS if p in state.protocols]


def served_versions(host: WindowsHost, key_type: str | None) -> list[str]:
    """The enabled TLS versions (OpenSSL names) for which the list has a usable suite: only those can be negotiated.
    A client limited to the others finds no version in common in the lab (Windows would rather answer it with
    handshake_failure for want of a suite: lab simplification)."""
    state = effective(host)
    usable = _usable_suites(state, key_type)
    return [
        OPENSSL_NAMES[p]
        for p in TLS_VERSIONS
        if p in state.protocols and any(p in suite_versions(suite) for suite in usable)
    ]


def cipher_suite_records(host: WindowsHost) -> list[dict[str, t.Any]]:
    """Get-TlsCipherSuite's view of the effective list (the fields the agent returns)."""
    records = []
    for name in effective(host).suites:
        tls13 = _is_tls13_suite(name)
        records.append(
            {
                "name": name,
                "certificate": "" if tls13 else ("ECDSA" if "_ECDSA_" in name else "RSA"),
                "exchange": "" if tls13 else ("ECDH" if "ECDHE" in name else ("DH" if "_DHE_" in name else "RSA")),
                "cipher": "AES" if "_AES_" in name else "",
                "hash": "",
                # The TLS versions of the suite as TLS version fields, newest first (771 = 0x0303 = TLS 1.2), as
                # Get-TlsCipherSuite's Protocols lists them; Windows also lists DTLS versions there (not modelled).
                "protocols": [WIRE_VERSIONS[version] for version in reversed(suite_versions(name))],
            }
        )
    return records


def key_type(cert: Certificate | None) -> str | None:
    """RSA or EC, the way the cipher-suite names call the listener certificate's key; None without a certificate."""
    if cert is None:
        return None
    public_key = cert.x509.public_key()
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "EC"
    return None


# -- events of failed handshakes ----------------------------------------------------------------------------------

# Event texts after those commonly seen on Windows (the "An TLS" of 36874 included); the exact texts and the data
# names are UNCONFIRMED by a cited page (docs/lab.md, "Schannel and the listener's security settings").
_CREDENTIAL_FAILED = (
    "A fatal error occurred while creating a TLS server credential. The internal error state is {state}."
)
_NO_COMMON_CIPHER = (
    "An {protocol} connection request was received from a remote client application, but none of the cipher suites "
    "supported by the client application are supported by the server. The TLS connection request has failed."
)
_ALERT_SENT = (
    "A fatal alert was generated and sent to the remote endpoint. This may result in termination of the connection. "
    "The TLS protocol defined fatal error code is {alert}."
)
_ALERT_RECEIVED = (
    "A fatal alert was received from the remote endpoint. The TLS protocol defined fatal alert code is {alert}."
)
# The internal state of 36871 when disabled protocols leave Schannel none to build the credential with (UNCONFIRMED
# by a cited page, as the pairing of every event below with its failure).
STATE_NO_PROTOCOL = "10013"
# Event data names as Schannel's manifest defines them (docs/lab.md, "Event log"): 36871/36887/36888 carry the
# internal state as ErrorState, 36874 the protocol as Protocol, 36887/36888 the alert as AlertDesc. The ErrorState of
# a sent alert is the lab's choice (UNCONFIRMED: the one sample seen, alert 10, had 1203).
ALERT_ERROR_STATE = "1203"


def log_handshake_failure(host: WindowsHost, outcome: t.Mapping[str, t.Any]) -> None:
    """Write the Schannel events Windows logs for the failure an RDP connection met (its ``tls_failure``).

    No protocol at all: 36871 (state 10013). No protocol in common with the client: 36888, alert 70 sent. No cipher
    suite in common: 36874, then 36888 with alert 40 sent. A fatal alert from the client: 36887 with its code.
    """
    failure = outcome.get("tls_failure")
    now = host.clock()

    def write(event_id: int, message: str, data: dict[str, str]) -> None:
        host.events.write(SCHANNEL, event_id, level="Error", time=now, message=message, data=data)

    def alert_sent(code: int) -> None:
        write(36888, _ALERT_SENT.format(alert=code), {"AlertDesc": str(code), "ErrorState": ALERT_ERROR_STATE})

    if failure == NO_SERVER_PROTOCOL:
        write(36871, _CREDENTIAL_FAILED.format(state=STATE_NO_PROTOCOL), {"ErrorState": STATE_NO_PROTOCOL})
    elif failure == NO_COMMON_PROTOCOL:
        alert_sent(ALERT_PROTOCOL_VERSION)
    elif failure == NO_COMMON_CIPHER:
        protocol = WINDOWS_NAMES.get(str(outcome.get("tls_version_offered")), "TLS")
        write(36874, _NO_COMMON_CIPHER.format(protocol=protocol), {"Protocol": protocol})
        alert_sent(ALERT_HANDSHAKE_FAILURE)
    elif failure == ALERT_RECEIVED and isinstance(outcome.get("alert"), int):
        alert = outcome["alert"]
        write(36887, _ALERT_RECEIVED.format(alert=alert), {"AlertDesc": str(alert)})
