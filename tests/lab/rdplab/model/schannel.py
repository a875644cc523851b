"""Schannel as the RDP listener meets it: server protocols and the cipher-suite list, both fixed at boot.

Windows reads ``SCHANNEL\\Protocols\\<protocol>\\Server`` and the cipher-suite order policy when it starts
[windows-rdp-facts: Schannel and TLS], so a registry change made now only counts after the next reboot: the lab
latches the effective state the first time it is needed after the host file is loaded, and again on each emulated
reboot (``rdplab.reboot``).
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa

if t.TYPE_CHECKING:
    from rdplab.model.certs import Certificate
    from rdplab.model.host import WindowsHost

PROTOCOLS_KEY = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\SecurityProviders\\SCHANNEL\\Protocols"
CIPHER_POLICY_KEY = "HKLM:\\SOFTWARE\\Policies\\Microsoft\\Cryptography\\Configuration\\SSL\\00010002"
PROTOCOLS = ("SSL 2.0", "SSL 3.0", "TLS 1.0", "TLS 1.1", "TLS 1.2", "TLS 1.3")
OPENSSL_NAMES = {"TLS 1.0": "TLSv1", "TLS 1.1": "TLSv1.1", "TLS 1.2": "TLSv1.2", "TLS 1.3": "TLSv1.3"}
TLS13_MIN_BUILD = 20348

# Get-TlsCipherSuite on Windows Server 2022 without a policy, shortened to the suites the tests care about. TLS 1.3
# suites only exist on builds that speak TLS 1.3.
_TLS13_SUITES = ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]
_DEFAULT_SUITES = [
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384",
    "TLS_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_RSA_WITH_AES_128_GCM_SHA256",
]


@dataclass(frozen=True)
class SchannelState:
    protocols: frozenset[str]  # server protocols Schannel will negotiate
    suites: tuple[str, ...]  # the effective cipher-suite order
    tls13_forced_unsupported: bool  # TLS 1.3 switched on where the build has none: TLS 1.3 ClientHellos are reset


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
    forced13 = False
    for protocol in PROTOCOLS:
        path = f"{PROTOCOLS_KEY}\\{protocol}\\Server"
        on = host.registry.dword(path, "Enabled")
        disabled_by_default = host.registry.dword(path, "DisabledByDefault")
        if on == 0 or disabled_by_default == 1:
            continue
        if protocol == "TLS 1.3" and build < TLS13_MIN_BUILD:
            forced13 = on is not None
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
    return SchannelState(frozenset(enabled), tuple(suites), forced13)


def effective(host: WindowsHost) -> SchannelState:
    """What Schannel uses now: latched at the first use after loading, and at each reboot."""
    if host.schannel is None:
        host.schannel = compute(host)
    return host.schannel


def reboot(host: WindowsHost) -> None:
    host.schannel = compute(host)


def _key_fits(suite: str, key_type: str) -> bool:
    if suite.startswith(("TLS_AES_", "TLS_CHACHA20_")):
        return True
    if "_ECDSA_" in suite:
        return key_type == "EC"
    return "_RSA_" in suite and key_type == "RSA"


def handshake_failure(host: WindowsHost, key_type: str | None) -> str | None:
    """Why a TLS handshake with the listener fails, as the RDP endpoint acts it out, or None.

    No TLS protocol (Schannel 36871) or no suite usable with the key (36874): Windows closes the connection after
    the X.224 exchange. A forced TLS 1.3 on a build without it resets the modern ClientHello the same way.
    """
    state = effective(host)
    tls = [p for p in ("TLS 1.0", "TLS 1.1", "TLS 1.2", "TLS 1.3") if p in state.protocols]
    if not tls or state.tls13_forced_unsupported:
        return "reset_after_x224"
    older = any(protocol != "TLS 1.3" for protocol in tls)
    usable = [
        suite
        for suite in state.suites
        if (key_type is None or _key_fits(suite, key_type))
        and (("TLS 1.3" in tls) if suite.startswith(("TLS_AES_", "TLS_CHACHA20_")) else older)
    ]
    return None if usable else "reset_after_x224"


def tls_versions(host: WindowsHost) -> list[str]:
    state = effective(host)
    return [OPENSSL_NAMES[p] for p in ("TLS 1.0", "TLS 1.1", "TLS 1.2", "TLS 1.3") if p in state.protocols]


def cipher_suite_records(host: WindowsHost) -> list[dict[str, t.Any]]:
    """Get-TlsCipherSuite's view of the effective list (the fields the agent returns)."""
    records = []
    for name in effective(host).suites:
        tls13 = name.startswith(("TLS_AES_", "TLS_CHACHA20_"))
        records.append(
            {
                "name": name,
                "certificate": "" if tls13 else ("ECDSA" if "_ECDSA_" in name else "RSA"),
                "exchange": "" if tls13 else ("ECDH" if "ECDHE" in name else ("DH" if "_DHE_" in name else "RSA")),
                "cipher": "AES" if "_AES_" in name else "",
                "hash": "",
                # SSPI protocol bits: TLS 1.2 server 0x400 / client 0x800; TLS 1.3 server 0x1000 / client 0x2000.
                "protocols": [0x1000, 0x2000] if tls13 else [0x400, 0x800],
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
