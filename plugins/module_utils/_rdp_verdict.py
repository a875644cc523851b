# Copyright: rdpfix contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Turn a probe report into findings, each tied to what a client would see, and one overall verdict.

Effects (what mstsc would do because of a finding):
  0x904/0x7       the server closes the socket during connection setup: the error this collection fixes
  cannot_connect  another hard failure (refused, filtered, not an RDP server), a different client error
  nla_error       the NLA (CredSSP) step fails; mstsc shows an authentication error
  prompt          the connection works but the user is asked to accept the server's identity
  wrong_host      the client may reach a different machine than the one probed
  security        the connection works; a security setting is weaker than it should be
  none            information only
Sources: [MS-RDPBCGR] 2.2.1.2.2 (failure codes); Microsoft's RDP troubleshooting articles on 0x904 (listener
certificate, Schannel 36870/36871/36874, RemoteConnectionManager 1057/1058); [MS-RDPEUDP] for UDP.
"""

from __future__ import annotations

import typing as t
from dataclasses import dataclass, field

# The shared severities of docs/findings.md, most urgent first.
SEVERITY_ORDER = {"critical": 0, "warning": 1, "security": 2, "info": 3}
CLOSED_STATUSES = {"closed", "reset"}
# A TLS trial that the server refused by protocol (it answered, and said no), versus one it dropped.
TLS_REFUSED_STATUSES = {"tls_alert", "wrong_version", "tls_error"}
UNTESTED_STATUSES = {"untested", "client_unsupported"}

# Cause family (docs/findings.md) of each finding this module can raise.
CAUSES: dict[str, str] = {
    "probe_internal_error": "client",
    "tcp_unresolved": "name_resolution",
    "tcp_refused": "service",
    "tcp_timeout": "firewall",
    "tcp_unreachable": "firewall",
    "tcp_error": "firewall",
    "x224_closed": "service",
    "not_rdp": "service",
    "x224_no_answer": "service",
    "x224_error": "service",
    "x224_partial_failure": "service",
    "ssl_cert_not_on_server": "certificate",
    "native_rdp_only": "security_downgrade",
    "native_rdp_allowed": "security_downgrade",
    "nla_required": "client",
    "nla_not_offered": "security_downgrade",
    "tls_closed": "certificate",
    "tls_no_common_version": "tls",
    "tls_legacy_only": "tls",
    "tls_legacy_enabled": "security_downgrade",
    "tls_versions_untested": "client",
    "tls_version_dropped": "tls",
    "tls13_reset": "tls",
    "certificate_unreadable": "certificate",
    "certificate_expired": "certificate",
    "certificate_not_yet_valid": "certificate",
    "certificate_expiring": "certificate",
    "certificate_self_signed": "certificate",
    "certificate_name_mismatch": "certificate",
    "certificate_no_server_auth": "certificate",
    "certificate_weak_key": "certificate",
    "certificate_thumbprint_mismatch": "certificate",
    "credssp_no_challenge": "service",
    "credssp_error_code": "service",
    "clock_skew": "service",
    "name_resolves_elsewhere": "name_resolution",
    "name_unresolvable": "name_resolution",
    "server_name_differs": "name_resolution",
    "server_name_resolves_elsewhere": "name_resolution",
    "udp_answered": "transport",
    "udp_no_answer": "transport",
    "udp_refused": "transport",
    "udp_unexpected": "transport",
    "udp_error": "transport",
}

# What repairs a cause, when one of this collection's modules does. The probe only sees the outside, so it names the
# module to run rather than a change it has planned (module stays null: see docs/findings.md).
FIX_HINTS: dict[str, str] = {
    "tcp_refused": "Check that Remote Desktop is enabled and TermService runs, and that the listener's PortNumber is "
    "the port probed (rdpfix.rdp.facts).",
    "tcp_timeout": "Open the RDP port in the host firewall (rdpfix.rdp.firewall) and in any network security group.",
    "x224_closed": "Inspect the listener and the services it needs (rdpfix.rdp.facts); restart TermService if it is "
    "wedged.",
    "ssl_cert_not_on_server": "Repair the listener certificate (rdpfix.rdp.certificate).",
    "native_rdp_only": "Set SecurityLayer back to Negotiate or TLS (rdpfix.rdp.tls).",
    "nla_not_offered": "Require NLA (UserAuthentication = 1) where every client supports it.",
    "tls_closed": "Repair the listener certificate and its private key permissions (rdpfix.rdp.certificate, "
    "rdpfix.rdp.machinekeys).",
    "tls_no_common_version": "Enable TLS 1.2 for the Schannel server side and a cipher suite the certificate's key "
    "can use (rdpfix.rdp.tls).",
    "tls_legacy_only": "Enable TLS 1.2 for the Schannel server side (rdpfix.rdp.tls).",
    "tls13_reset": "Look for a device on the path that inspects TLS and does not know TLS 1.3; on a Windows 10 host "
    "(1903 to 22H2) remove the experimental TLS 1.3 Schannel server setting (rdpfix.rdp.tls), then reboot.",
    "certificate_expired": "Renew or regenerate the listener certificate (rdpfix.rdp.certificate).",
    "certificate_not_yet_valid": "Check the server's clock, or replace the certificate (rdpfix.rdp.certificate).",
    "certificate_no_server_auth": "Pin a certificate with the Server Authentication EKU (rdpfix.rdp.certificate).",
    "certificate_thumbprint_mismatch": "Check the pinned thumbprint and restart TermService to apply it "
    "(rdpfix.rdp.certificate).",
    "name_resolves_elsewhere": "Correct the DNS record (or hosts file entry) for the name clients use.",
    "server_name_resolves_elsewhere": "Correct the DNS record of the server's own name.",
}


@dataclass
class Finding:
    name: str  # short id; the report's id is "handshake.<name>"
    severity: str  # critical, warning, security, info
    effect: str  # what mstsc would do (see the module docstring)
    title: str
    explanation: str  # why this happens, in terms of the server's configuration
    evidence: dict[str, t.Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, t.Any]:
        """The shared finding shape of docs/findings.md, plus ``effect`` and ``explanation``."""
        hint = FIX_HINTS.get(self.name)
        return {
            "id": f"handshake.{self.name}",
            "severity": self.severity,
            "title": self.title[:1].upper() + self.title[1:],  # a sentence, like every other finding's title
            "cause": CAUSES.get(self.name, "service"),
            "evidence": self.evidence,
            "fix": {"module": None, "options": {}, "description": hint} if hint else None,
            "effect": self.effect,
            "explanation": self.explanation,
        }


class _Options(t.Protocol):
    expected_thumbprint: str | None
    cert_warn_days: int
    max_clock_skew: float


def _normalize_thumbprint(value: str) -> str:
    return "".join(ch for ch in value if ch in "0123456789abcdefABCDEF").upper()


def assess(report: dict[str, t.Any], options: _Options) -> dict[str, t.Any]:
    """Return {"findings": [...], "verdict": str, "connectable": bool | None, "summary": str}."""
    findings: list[Finding] = []
    if report.get("internal_error"):
        findings.append(
            Finding(
                "probe_internal_error",
                "warning",
                "none",
                f"the probe stopped early because of an internal error: {report['internal_error']}",
                "a defect in the probe; the results gathered before it are kept",
            )
        )
    tcp = report.get("tcp")
    if tcp is not None:
        findings.extend(_tcp_findings(tcp))
    negotiation = report.get("negotiation")
    if negotiation is not None:
        findings.extend(_negotiation_findings(negotiation))
    tls_report = report.get("tls")
    if tls_report is not None:
        findings.extend(_tls_findings(tls_report, negotiation or {}))
        findings.extend(_certificate_findings(tls_report, report.get("names"), options))
    credssp = report.get("credssp")
    if credssp is not None:
        findings.extend(_credssp_findings(credssp, negotiation or {}, options))
    names = report.get("names")
    if names is not None:
        findings.extend(_name_findings(names, report.get("target", {}).get("host")))
    udp = report.get("udp")
    if udp is not None:
        findings.extend(_udp_findings(udp))

    findings.sort(key=lambda item: SEVERITY_ORDER.get(item.severity, 9))
    verdict, connectable = _verdict(report, findings)
    return {
        "findings": [item.to_dict() for item in findings],
        "verdict": verdict,
        "connectable": connectable,
        "summary": _summary(verdict, findings),
    }


def _verdict(report: dict[str, t.Any], findings: list[Finding]) -> tuple[str, bool | None]:
    tcp = report.get("tcp") or {}
    if tcp.get("status") not in (None, "open"):
        return "unreachable", False
    if any(item.severity == "critical" for item in findings):
        return "fails", False
    if report.get("negotiation") is None:
        # Only TCP was checked: the port is open, nothing more is known.
        return "unknown", None
    if any(item.effect == "prompt" and item.severity != "info" for item in findings):
        return "connects_with_prompt", True
    if any(item.severity in ("warning", "security") for item in findings):
        return "connects_with_warnings", True
    return "connects", True


def _summary(verdict: str, findings: list[Finding]) -> str:
    lead = {
        "unreachable": "The RDP port cannot be reached.",
        "fails": "A client cannot complete the RDP connection setup.",
        "unknown": "The RDP port is open; the handshake was not checked.",
        "connects_with_prompt": "A client can connect, after accepting a certificate/identity prompt.",
        "connects_with_warnings": "A client can connect; some settings deserve attention.",
        "connects": "A client can connect.",
    }[verdict]
    worst = [item.title for item in findings if item.severity in ("critical", "warning", "security")][:3]
    return " ".join([lead, *(f"{text[:1].upper()}{text[1:]}." for text in worst)])


# --- TCP -------------------------------------------------------------------------------------------------
def _tcp_findings(tcp: dict[str, t.Any]) -> list[Finding]:
    status = tcp.get("status")
    evidence = {key: tcp.get(key) for key in ("status", "address", "port", "detail") if tcp.get(key) is not None}
    table = {
        "unresolved": (
            "tcp_unresolved",
            "the host name does not resolve",
            "DNS has no record for the name, or the name is misspelt",
        ),
        "refused": (
            "tcp_refused",
            "TCP connection refused on the RDP port",
            "nothing listens on that port (Remote Desktop Services stopped, RDP disabled, or the listener moved to "
            "another PortNumber); Windows Firewall drops rather than rejects, so a refusal is rarely the host "
            "firewall; mstsc reports 0x204, not 0x904",
        ),
        "timeout": (
            "tcp_timeout",
            "TCP connection timed out on the RDP port",
            "a firewall drops the traffic (Windows Firewall drops blocked connections without an answer: a block "
            "rule, no allow rule on the active profile), or a network security group, or the host is down",
        ),
        "unreachable": (
            "tcp_unreachable",
            "no route to the host",
            "the address is not reachable from where the probe runs",
        ),
    }
    if status in table:
        finding_id, message, cause = table[status]
        return [Finding(finding_id, "critical", "cannot_connect", message, cause, evidence)]
    if status not in (None, "open"):
        return [
            Finding(
                "tcp_error", "critical", "cannot_connect", "TCP connection failed", str(tcp.get("detail")), evidence
            )
        ]
    return []


# --- X.224 -----------------------------------------------------------------------------------------------
def _negotiation_findings(negotiation: dict[str, t.Any]) -> list[Finding]:
    trials: dict[str, dict[str, t.Any]] = negotiation.get("trials") or {}
    accepted: list[str] = negotiation.get("accepted") or []
    if not trials:
        return []
    evidence = {name: _trial_evidence(trial) for name, trial in trials.items()}
    statuses = {trial.get("status") for trial in trials.values()}
    answered = {"accepted", "negotiation_failure", "selected_other"}
    findings: list[Finding] = []
    if not statuses & answered:
        if statuses <= CLOSED_STATUSES:
            return [
                Finding(
                    "x224_closed",
                    "critical",
                    "0x904/0x7",
                    "the server closes the connection at the very first RDP packet (X.224 Connection Request)",
                    "the listener refuses every connection before negotiating: Remote Desktop Services is failing "
                    "or a middlebox (load balancer, IPS, proxy) resets RDP",
                    evidence,
                )
            ]
        if "invalid" in statuses:
            details = sorted(
                {str(trial.get("detail")) for trial in trials.values() if trial.get("status") == "invalid"}
            )
            return [
                Finding(
                    "not_rdp",
                    "critical",
                    "cannot_connect",
                    "the service on this port does not speak RDP: " + "; ".join(details),
                    "another service owns the port, or a proxy answers in front of the server",
                    evidence,
                )
            ]
        if "timeout" in statuses:
            return [
                Finding(
                    "x224_no_answer",
                    "critical",
                    "cannot_connect",
                    "the server accepts TCP but never answers the X.224 Connection Request",
                    "the listener is hung, or a middlebox accepts the TCP connection and forwards nothing",
                    evidence,
                )
            ]
        return [
            Finding(
                "x224_error",
                "critical",
                "cannot_connect",
                "X.224 negotiation failed on every trial",
                "see the evidence for each trial",
                evidence,
            )
        ]

    failures: dict[str, str] = negotiation.get("failure_codes") or {}
    if "SSL_CERT_NOT_ON_SERVER" in failures.values():
        findings.append(
            Finding(
                "ssl_cert_not_on_server",
                "critical",
                "0x904/0x7",
                "the server says it has no certificate for TLS (SSL_CERT_NOT_ON_SERVER)",
                "the listener certificate is missing or unusable (RemoteConnectionManager events 1057/1058)",
                evidence,
            )
        )
    tls_based = [name for name in accepted if name != "rdp"]
    if accepted == ["rdp"] or (negotiation.get("legacy_server") and not tls_based):
        findings.append(
            Finding(
                "native_rdp_only",
                "security",
                "security",
                "the server accepts only native RDP security: no TLS, no server authentication, no NLA",
                "SecurityLayer is 0 (or a policy forces it); clients that require server authentication or "
                "NLA cannot connect, others connect with an identity warning",
                evidence,
            )
        )
    elif "rdp" in accepted:
        findings.append(
            Finding(
                "native_rdp_allowed",
                "info",
                "security",
                "the server still accepts native RDP security when a client asks for it",
                "SecurityLayer is 0 or 1 (Negotiate) without NLA required",
                {"rdp": evidence.get("rdp")},
            )
        )
    if "tls" in trials and trials["tls"].get("failure_code") in (5, 6):
        findings.append(
            Finding(
                "nla_required",
                "info",
                "none",
                "the server requires NLA (CredSSP): it refused a TLS-only request with "
                f"{trials['tls'].get('failure_name')}",
                "UserAuthentication is 1; clients without NLA support get the NLA-required message, not 0x904",
                {"tls": evidence.get("tls")},
            )
        )
    credssp_tried = [name for name in ("credssp", "credssp_early_user_auth") if name in trials]
    if credssp_tried and not any(name in accepted for name in credssp_tried) and tls_based:
        findings.append(
            Finding(
                "nla_not_offered",
                "security",
                "security",
                "the server does not offer NLA (CredSSP): the logon screen is reached before any authentication",
                "UserAuthentication is 0, or the server does not implement CredSSP",
                {name: evidence.get(name) for name in credssp_tried},
            )
        )
    broken = {name: trial for name, trial in trials.items() if trial.get("status") in CLOSED_STATUSES | {"timeout"}}
    if broken and (set(trials) - set(broken)):
        findings.append(
            Finding(
                "x224_partial_failure",
                "warning",
                "0x904/0x7",
                "the server drops some negotiation requests instead of answering them: " + ", ".join(sorted(broken)),
                "clients asking for those security layers see the socket closed during setup",
                {name: evidence[name] for name in broken},
            )
        )
    return findings


def _trial_evidence(trial: dict[str, t.Any]) -> dict[str, t.Any]:
    keys = ("status", "selected_protocol", "failure_name", "detail")
    evidence = {key: trial[key] for key in keys if trial.get(key) is not None}
    confirm = trial.get("confirm") or {}
    if "selected_protocol" in confirm and "selected_protocol" not in evidence:
        evidence["selected_protocol"] = confirm["selected_protocol"]
    return evidence


# --- TLS -------------------------------------------------------------------------------------------------
def _tls_findings(tls_report: dict[str, t.Any], negotiation: dict[str, t.Any]) -> list[Finding]:
    if tls_report.get("status") != "probed":
        return []
    versions: dict[str, dict[str, t.Any]] = tls_report.get("versions") or {}
    tested = {name: item for name, item in versions.items() if item.get("status") not in UNTESTED_STATUSES}
    accepted: list[str] = tls_report.get("accepted_versions") or []
    evidence = {
        name: {k: v for k, v in item.items() if k in ("status", "detail", "cipher")} for name, item in versions.items()
    }
    findings: list[Finding] = []
    if tested and not accepted:
        statuses = {item.get("status") for item in tested.values()}
        if not statuses & TLS_REFUSED_STATUSES:
            findings.append(
                Finding(
                    "tls_closed",
                    "critical",
                    "0x904/0x7",
                    "the server selects TLS in negotiation, then drops every TLS handshake without refusing a version",
                    "the listener cannot build its TLS credential: its certificate's private key is unreadable "
                    "(MachineKeys permissions; Schannel 36870), or the certificate is missing or expired and "
                    "could not be renewed (RemoteConnectionManager 1057/1058)",
                    evidence,
                )
            )
        else:
            findings.append(
                Finding(
                    "tls_no_common_version",
                    "critical",
                    "0x904/0x7",
                    "the server refuses every TLS version offered (" + ", ".join(tested) + ")",
                    "the server's Schannel protocols or cipher suites leave nothing a client can use "
                    "(Schannel 36871/36874)",
                    evidence,
                )
            )
        return findings
    legacy = [name for name in accepted if name in ("TLSv1.0", "TLSv1.1")]
    modern = [name for name in accepted if name in ("TLSv1.2", "TLSv1.3")]
    if legacy and not modern:
        findings.append(
            Finding(
                "tls_legacy_only",
                "warning",
                "0x904/0x7",
                "the server accepts only " + ", ".join(legacy) + "; it refuses TLS 1.2 and 1.3",
                "TLS 1.2 is disabled in the server's Schannel settings; clients that disabled TLS 1.0/1.1 "
                "(current Windows baselines) fail with 0x904/0x7",
                evidence,
            )
        )
    elif legacy:
        findings.append(
            Finding(
                "tls_legacy_enabled",
                "security",
                "security",
                "the server still accepts " + ", ".join(legacy),
                "TLS 1.0/1.1 remain enabled in Schannel; not a connection problem",
                evidence,
            )
        )
    untested = [name for name, item in versions.items() if item.get("status") in UNTESTED_STATUSES]
    if untested:
        findings.append(
            Finding(
                "tls_versions_untested",
                "info",
                "none",
                "this machine could not test " + ", ".join(untested),
                "the TLS library where the probe runs does not offer these versions",
                {name: versions[name] for name in untested},
            )
        )
    dropped = {name: item for name, item in tested.items() if item.get("status") in CLOSED_STATUSES}
    if accepted and "TLSv1.3" in dropped:
        # A server (or a device on the path) that cannot answer TLS 1.3 and closes instead of negotiating down: what a
        # client that offers TLS 1.3 meets there. Not Server 2019: without TLS 1.3 it answers with TLS 1.2.
        findings.append(
            Finding(
                "tls13_reset",
                "warning",
                "0x904/0x7",
                "the server resets a ClientHello that offers TLS 1.3, while it accepts "
                + ", ".join(sorted(accepted))
                + ": clients that offer TLS 1.3 fail",
                "something between the client and the TLS stack does not negotiate down from TLS 1.3: a TLS-inspecting "
                "device on the path, or a Windows 10 host with the experimental TLS 1.3 switched on (Microsoft: "
                "enabling TLS 1.3 before Windows 11 / Server 2022 is not a safe configuration)",
                {"TLSv1.3": evidence["TLSv1.3"]},
            )
        )
        dropped = {name: item for name, item in dropped.items() if name != "TLSv1.3"}
    if accepted and dropped:
        findings.append(
            Finding(
                "tls_version_dropped",
                "info",
                "none",
                "the server closes the connection instead of refusing cleanly for " + ", ".join(sorted(dropped)),
                "some servers and devices on the path reset a version they do not support instead of refusing it",
                {name: evidence[name] for name in dropped},
            )
        )
    return findings


def _certificate_findings(
    tls_report: dict[str, t.Any], names: dict[str, t.Any] | None, options: _Options
) -> list[Finding]:
    certificate = tls_report.get("certificate")
    findings: list[Finding] = []
    if tls_report.get("certificate_error"):
        findings.append(
            Finding(
                "certificate_unreadable",
                "warning",
                "prompt",
                f"the presented certificate could not be read: {tls_report['certificate_error']}",
                "a malformed certificate, or a library missing where the probe runs",
                {"thumbprint": (certificate or {}).get("thumbprint")},
            )
        )
    if not certificate or "not_after" not in certificate:
        return findings
    identity = {key: certificate.get(key) for key in ("thumbprint", "subject", "issuer", "not_after")}
    if certificate.get("expired"):
        findings.append(
            Finding(
                "certificate_expired",
                "warning",
                "prompt",
                f"the listener presents an expired certificate (not after {certificate.get('not_after')})",
                "the certificate was not renewed; mstsc warns (and refuses when server authentication is set to "
                "'do not connect'). Windows' own listener does not present an expired pinned certificate (it falls "
                "back to its self-signed one, RCM 1053) nor an expired self-signed one (the connection is reset), so "
                "this points at a template certificate, an older Windows or another server (xrdp, a gateway)",
                identity,
            )
        )
    elif certificate.get("not_yet_valid"):
        findings.append(
            Finding(
                "certificate_not_yet_valid",
                "warning",
                "prompt",
                f"the listener's certificate is not valid before {certificate.get('not_before')}",
                "the certificate was issued with a future start date, or the server's or client's clock is wrong",
                identity,
            )
        )
    elif (certificate.get("days_left") or 0) < options.cert_warn_days:
        findings.append(
            Finding(
                "certificate_expiring",
                "info",
                "none",
                f"the listener's certificate expires in {certificate.get('days_left')} days",
                "renew it before it expires",
                identity,
            )
        )
    if certificate.get("self_signed"):
        findings.append(
            Finding(
                "certificate_self_signed",
                "info",
                "prompt",
                "the listener presents a self-signed certificate",
                "Windows' default RDP certificate; clients that do not trust it are asked to accept it",
                identity,
            )
        )
    if names and names.get("certificate_matches_connect_name") is False:
        findings.append(
            Finding(
                "certificate_name_mismatch",
                "warning",
                "prompt",
                f"the certificate does not name {names.get('connect_name')!r}",
                "clients connecting with this name are warned that the names differ",
                {"connect_name": names.get("connect_name"), **(names.get("certificate_names") or {})},
            )
        )
    if certificate.get("server_auth") is False:
        findings.append(
            Finding(
                "certificate_no_server_auth",
                "warning",
                "prompt",
                "the certificate's Extended Key Usage has neither Server Authentication nor Remote Desktop "
                "Authentication",
                "Windows rejects such a certificate for the listener (RemoteConnectionManager 1054); clients "
                "warn about it",
                {"eku": certificate.get("eku"), **identity},
            )
        )
    if certificate.get("key_type") == "RSA" and (certificate.get("key_size") or 0) < 2048:
        findings.append(
            Finding(
                "certificate_weak_key",
                "security",
                "security",
                f"the certificate's RSA key has only {certificate.get('key_size')} bits",
                "keys below 2048 bits are refused by hardened clients",
                identity,
            )
        )
    if options.expected_thumbprint:
        expected = _normalize_thumbprint(options.expected_thumbprint)
        presented = str(certificate.get("thumbprint") or "").upper()
        if presented and presented != expected:
            findings.append(
                Finding(
                    "certificate_thumbprint_mismatch",
                    "warning",
                    "prompt",
                    "the listener presents a different certificate than the one configured",
                    "Windows fell back to its self-signed certificate (RemoteConnectionManager 1051 missing, 1053 "
                    "expired, 1054 wrong EKU, 1055 key inaccessible; 1059), the "
                    "configuration was not applied yet (TermService not restarted), or a TLS-inspecting device "
                    "sits in between",
                    {"expected": expected, "presented": presented},
                )
            )
    return findings


# --- CredSSP -----------------------------------------------------------------------------------------------
def _credssp_findings(credssp: dict[str, t.Any], negotiation: dict[str, t.Any], options: _Options) -> list[Finding]:
    status = credssp.get("status")
    if status in ("skipped", None):
        return []
    findings: list[Finding] = []
    if status != "challenge":
        required = bool(negotiation.get("nla_required"))
        findings.append(
            Finding(
                "credssp_no_challenge",
                "critical" if required else "warning",
                "0x904/0x7" if status in CLOSED_STATUSES else "nla_error",
                "the server selects CredSSP but does not answer an NTLM NEGOTIATE",
                "the CredSSP (NLA) provider on the server fails before authentication; NLA clients cannot log on",
                {"status": status, "detail": credssp.get("detail")},
            )
        )
        return findings
    if credssp.get("error_code"):
        findings.append(
            Finding(
                "credssp_error_code",
                "warning",
                "nla_error",
                f"the server's CredSSP answer carries error code {credssp['error_code']}",
                "an NTSTATUS from the server's security provider",
                {"error_code": credssp.get("error_code")},
            )
        )
    info = credssp.get("ntlm") or {}
    skew = info.get("clock_skew_seconds")
    if skew is not None and abs(skew) > options.max_clock_skew:
        findings.append(
            Finding(
                "clock_skew",
                "warning",
                "nla_error",
                f"the server's clock differs from this machine's by {skew:+.0f} seconds",
                "Kerberos allows 5 minutes of skew; beyond that NLA falls back to NTLM, and fails where NTLM is "
                "restricted",
                {"server_time": info.get("server_time"), "clock_skew_seconds": skew},
            )
        )
    return findings


# --- names -------------------------------------------------------------------------------------------------
def _name_findings(names: dict[str, t.Any], probed_host: str | None) -> list[Finding]:
    findings: list[Finding] = []
    connect_name = names.get("connect_name")
    evidence_keys = (
        "connect_name",
        "connect_name_resolves_to",
        "probed_address",
        "server_dns_name",
        "server_netbios_name",
        "server_dns_name_resolves_to",
    )
    evidence = {key: names.get(key) for key in evidence_keys}
    if names.get("connect_name_reaches_probed_address") is False:
        findings.append(
            Finding(
                "name_resolves_elsewhere",
                "warning",
                "wrong_host",
                f"{connect_name!r} resolves to {', '.join(names.get('connect_name_resolves_to') or [])}, not to the "
                f"probed address {names.get('probed_address')}",
                "a stale DNS record, hosts file entry or split DNS sends clients that use this name to another machine",
                evidence,
            )
        )
    elif names.get("connect_name_resolution_error") and connect_name != probed_host:
        findings.append(
            Finding(
                "name_unresolvable",
                "warning",
                "cannot_connect",
                f"{connect_name!r} does not resolve here, so clients using it cannot connect from this network",
                "the name has no DNS record visible from where the probe runs",
                {**evidence, "error": names.get("connect_name_resolution_error")},
            )
        )
    if names.get("matches_server_name") is False:
        own_name = names.get("server_dns_name") or names.get("server_netbios_name")
        findings.append(
            Finding(
                "server_name_differs",
                "info",
                "prompt",
                f"{connect_name!r} is not the server's own name ({own_name})",
                "connecting by IP address or alias: Kerberos finds no service name and NLA falls back to NTLM, and "
                "the certificate must carry the alias",
                evidence,
            )
        )
    if names.get("server_dns_name_reaches_probed_address") is False:
        findings.append(
            Finding(
                "server_name_resolves_elsewhere",
                "warning",
                "wrong_host",
                f"the server's own name {names.get('server_dns_name')!r} resolves to "
                f"{', '.join(names.get('server_dns_name_resolves_to') or [])}, not to {names.get('probed_address')}",
                "clients that follow the server's own name (Kerberos, redirection, the certificate's name) reach "
                "another address: the hostname-resolution trap",
                evidence,
            )
        )
    return findings


# --- UDP -------------------------------------------------------------------------------------------------
def _udp_findings(udp: dict[str, t.Any]) -> list[Finding]:
    status = udp.get("status")
    evidence = {key: udp.get(key) for key in ("status", "port", "detail")}
    messages = {
        "answered": ("udp_answered", f"UDP {udp.get('port')} answers RDP-UDP: the client can use UDP transport"),
        "no_answer": ("udp_no_answer", f"UDP {udp.get('port')} gave no answer to an RDP-UDP SYN (ambiguous)"),
        "refused": ("udp_refused", f"UDP {udp.get('port')} is closed (ICMP port unreachable)"),
        "answered_unexpected": ("udp_unexpected", f"UDP {udp.get('port')} answered, but not as RDP-UDP"),
    }
    finding_id, message = messages.get(status or "", ("udp_error", f"the UDP check failed: {udp.get('detail')}"))
    return [
        Finding(
            finding_id,
            "info",
            "none",
            message,
            "UDP problems never cause 0x904: the client silently stays on TCP",
            evidence,
        )
    ]
