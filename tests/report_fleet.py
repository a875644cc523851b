"""Synthetic fleets for the report's tests and benchmark: plausible findings, deterministic for a given seed."""

from __future__ import annotations

import random
import typing as t

from ansible_collections.rdpfix.rdp.plugins.plugin_utils._report import FleetReport, HostResult, host_from_result

# (id, severity, cause, title, evidence, fix module or None) - shapes as in docs/findings.md
CATALOGUE: tuple[tuple[str, str, str, str, dict[str, t.Any], str | None], ...] = (
    (
        "certificate.self_signed_expired",
        "critical",
        "certificate",
        "The self-signed certificate 3F2A9C0D5E... (CN=RDP-0001, expires 2026-11-13T08:00:00Z) expired 12 day(s) ago",
        {"thumbprint": "3F2A9C0D5E", "not_after": "2026-11-13T08:00:00Z"},
        "rdpfix.rdp.certificate",
    ),
    (
        "machinekeys.rdp_key_not_readable",
        "critical",
        "machinekeys",
        "NETWORK SERVICE cannot read the private key of the self-signed RDP certificate",
        {"path": "C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys\\f686aace6942fb7f", "events": [1058, 36870]},
        "rdpfix.rdp.machinekeys",
    ),
    (
        "firewall.rdp_tcp_not_allowed",
        "critical",
        "firewall",
        "The rule 'RemoteDesktop-UserMode-In-TCP' does not allow RDP over TCP on port 3389",
        {"rule": "RemoteDesktop-UserMode-In-TCP", "profiles": ["Domain", "Private"]},
        "rdpfix.rdp.firewall",
    ),
    (
        "certificate.self_signed_expiring",
        "warning",
        "certificate",
        "The self-signed certificate 7C1E... (CN=RDP-0002) expires in 9 day(s)",
        {"not_after": "2026-12-04T08:00:00Z"},
        "rdpfix.rdp.certificate",
    ),
    (
        "transport.server_policy_mismatch",
        "warning",
        "transport",
        "The server transport policy is not set (Windows default: UDP when possible), wanted tcp_only",
        {"SelectTransport": 0},
        "rdpfix.rdp.transport",
    ),
    (
        "tls.tls12_disabled",
        "critical",
        "tls",
        "TLS 1.2 is disabled for the Schannel server",
        {"Enabled": 0},
        "rdpfix.rdp.tls",
    ),
    (
        "tls.security_layer_rdp",
        "security",
        "security_downgrade",
        "SecurityLayer is 0 (native RDP security, no TLS)",
        {"SecurityLayer": 0},
        None,
    ),
    (
        "service.nondefault_port",
        "info",
        "service",
        "The RDP listener uses port 3390, not 3389: clients must connect to name:3390",
        {},
        None,
    ),
)


def finding(index: int) -> dict[str, t.Any]:
    finding_id, severity, cause, title, evidence, module = CATALOGUE[index]
    fix = None
    if module is not None:
        fix = {"module": module, "options": {}, "description": f"{module.rsplit('.', 1)[-1]} repairs this."}
    return {
        "id": finding_id,
        "severity": severity,
        "title": title,
        "cause": cause,
        "evidence": dict(evidence),
        "fix": fix,
    }


def host_results(count: int, seed: int = 904) -> list[HostResult]:
    chooser = random.Random(seed)
    hosts: list[HostResult] = []
    for number in range(count):
        name = f"rdp-{number:04d}.corp.example"
        address = f"10.{number // 65536 % 256}.{number // 256 % 256}.{number % 256}"
        roll = chooser.random()
        if roll < 0.03:
            hosts.append(host_from_result(name, address, {"unreachable": True, "msg": "timed out"}))
            continue
        if roll < 0.05:
            hosts.append(host_from_result(name, address, {"failed": True, "msg": "AccessDenied: cert.list"}))
            continue
        picked = chooser.sample(range(len(CATALOGUE)), k=chooser.choice((0, 0, 1, 1, 2, 3)))
        result: dict[str, t.Any] = {
            "findings": [finding(index) for index in picked],
            "gathered_at": f"2026-11-25T10:{number % 60:02d}:00Z",
            "handshake": {
                "verdict": chooser.choice(["connects", "connects_with_prompt", "fails"]),
                "connectable": True,
            },
        }
        hosts.append(host_from_result(name, address, result))
    return hosts


def fleet(count: int, seed: int = 904, fail_on: str = "none") -> FleetReport:
    return FleetReport(
        title=f"Fleet of {count}",
        generated_at="2026-11-25T10:42:00Z",
        hosts=tuple(host_results(count, seed)),
        fail_on=fail_on,
    )
