# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the event log says about RDP's TLS setup: the queries to send and the findings the entries support.

Pure functions over the data of the agent's ``events.query``. Events are history: the planners judge the host as it is
now. An event that a current finding explains becomes evidence of that finding; an event nothing current explains
becomes a finding of its own (the fault was intermittent, was repaired since, or lies with the clients).

Event meanings (docs/modules/facts.md lists the sources): Schannel 36870 private key of the TLS server credential not
accessible, 36871 TLS server credential could not be created (disabled protocols), 36874 no cipher suite in common
with a client, 36887/36888 fatal TLS alert received/sent (the alert code in the event data);
RemoteConnectionManager 1050 settings corrected, 1051 pinned certificate not found, 1052 certificate expiring,
1053 configured certificate expired, 1054 wrong EKU, 1055 private key inaccessible, 1057 self-signed certificate not
created, 1058 expired self-signed certificate not replaced, 1059 invalid certificate hash reset, 1062-1065 template
certificate problems; Security 4625 failed logon.
"""

from __future__ import annotations

import re
import typing as t
from collections import Counter
from dataclasses import dataclass, field

from ._findings import finding

SCHANNEL = "Schannel"
RCM = "Microsoft-Windows-TerminalServices-RemoteConnectionManager"
SECURITY_AUDITING = "Microsoft-Windows-Security-Auditing"

SCHANNEL_IDS = (36870, 36871, 36874, 36887, 36888)
RCM_IDS = tuple(range(1050, 1066))
LOGON_FAILURE_ID = 4625

# One FilterHashtable each: the System log (Schannel and RCM), RCM's own channels, and failed logons.
QUERIES: tuple[dict[str, t.Any], ...] = (
    {"log": "System", "providers": [SCHANNEL, RCM], "ids": [*SCHANNEL_IDS, *RCM_IDS]},
    {"log": f"{RCM}/Admin", "ids": list(RCM_IDS)},
    {"log": f"{RCM}/Operational", "ids": list(RCM_IDS)},
    {"log": "Security", "ids": [LOGON_FAILURE_ID]},
)

# TLS alert descriptions (RFC 8446 section 6, RFC 5246 section 7.2).
TLS_ALERTS: dict[int, str] = {
    0: "close_notify",
    10: "unexpected_message",
    20: "bad_record_mac",
    22: "record_overflow",
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    47: "illegal_parameter",
    48: "unknown_ca",
    49: "access_denied",
    50: "decode_error",
    51: "decrypt_error",
    70: "protocol_version",
    71: "insufficient_security",
    80: "internal_error",
    86: "inappropriate_fallback",
    90: "user_canceled",
    109: "missing_extension",
    110: "unsupported_extension",
    112: "unrecognized_name",
    116: "certificate_required",
    120: "no_application_protocol",
}
# Alerts that mean the two sides could not agree on TLS at all, rather than a client distrusting the certificate.
MISMATCH_ALERTS = frozenset({40, 70, 71})

# Windows' logon types as 4625 reports them.
LOGON_TYPES = {"2": "interactive", "3": "network (NLA)", "7": "unlock", "10": "remote interactive (RDP)"}

# 36887 reads "The TLS protocol defined fatal alert code is N."; 36888 "... fatal error code is N." on some builds.
_ALERT_IN_MESSAGE = re.compile(r"fatal (?:alert|error) code is (\d+)", re.IGNORECASE)
EVIDENCE_EVENTS = 10


@dataclass(frozen=True)
class Event:
    log: str
    provider: str
    id: int
    level: str
    time: str
    message: str
    data: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_agent(cls, raw: dict[str, t.Any]) -> Event:
        data = raw.get("data")
        return cls(
            log=str(raw.get("log") or ""),
            provider=str(raw.get("provider") or ""),
            id=int(raw.get("id") or 0),
            level=str(raw.get("level") or ""),
            time=str(raw.get("time") or ""),
            message=str(raw.get("message") or ""),
            data={str(key): str(value) for key, value in data.items()} if isinstance(data, dict) else {},
        )

    @property
    def kind(self) -> str | None:
        return classify(self)

    def brief(self) -> dict[str, t.Any]:
        """The event as finding evidence: enough to recognise it, the message cut to a readable length."""
        shown: dict[str, t.Any] = {"time": self.time, "provider": self.provider, "id": self.id, "level": self.level}
        if self.data:
            shown["data"] = dict(self.data)
        alert = alert_code(self)
        if alert is not None:
            shown["alert"] = f"{alert} {TLS_ALERTS.get(alert, 'unknown')}"
        shown["message"] = self.message[:300]
        return shown


def parse_events(raw_events: t.Iterable[object]) -> list[Event]:
    """Events from the agent, newest first, each once (RCM entries can appear in the System log and a channel)."""
    seen: set[tuple[str, int, str, str]] = set()
    events: list[Event] = []
    for raw in raw_events:
        if not isinstance(raw, dict):
            continue
        try:
            event = Event.from_agent(raw)
        except (TypeError, ValueError):
            continue
        key = (event.provider.casefold(), event.id, event.time, event.message)
        if key in seen:
            continue
        seen.add(key)
        events.append(event)
    events.sort(key=lambda event: event.time, reverse=True)
    return events


def alert_code(event: Event) -> int | None:
    if event.provider.casefold() != SCHANNEL.casefold() or event.id not in (36887, 36888):
        return None
    for name in ("AlertDesc", "alert_desc", "alert"):
        value = event.data.get(name)
        if value is not None and value.strip().isdigit():
            return int(value.strip())
    match = _ALERT_IN_MESSAGE.search(event.message)
    return int(match.group(1)) if match else None


def classify(event: Event) -> str | None:
    """The kind of problem an event reports, or None when it is not one this module knows."""
    provider = event.provider.casefold()
    if provider == SCHANNEL.casefold():
        return {
            36870: "key_access",
            36871: "credential",
            36874: "no_common_cipher",
            36887: "alert_received",
            36888: "alert_sent",
        }.get(event.id)
    if provider == RCM.casefold():
        if event.id in (1057, 1058):
            return "selfsigned_not_created"
        if event.id in (1051, 1053, 1054, 1055):
            return "pinned_problem"
        if event.id == 1052:
            return "certificate_expiring"
        if 1062 <= event.id <= 1065:
            return "template_problem"
        if event.id in (1050, 1059):
            return "settings_reset"
        return None
    if event.id == LOGON_FAILURE_ID and (provider == SECURITY_AUDITING.casefold() or event.log == "Security"):
        return "logon_failure"
    return None


# Current findings (by id prefix) that explain an event of each kind: the event then becomes their evidence.
EXPLAINED_BY: dict[str, tuple[str, ...]] = {
    "key_access": (
        "machinekeys.rdp_key_",
        "machinekeys.store_missing",
        "certificate.self_signed_key_unreadable",
        "certificate.self_signed_no_private_key",
        "certificate.pinned_key_unreadable",
        "certificate.pinned_no_private_key",
    ),
    "credential": (
        "tls.tls12_disabled",
        "tls.tls13_forced_unsupported",
        "tls.cipher_suites_",
        "machinekeys.rdp_key_",
        "certificate.self_signed_",
    ),
    "no_common_cipher": ("tls.cipher_suites_", "tls.tls12_disabled", "tls.tls13_forced_unsupported"),
    "selfsigned_not_created": (
        "certificate.self_signed_",
        "certificate.regeneration_blocked",
        "machinekeys.",
    ),
    "pinned_problem": ("certificate.pinned_", "certificate.connection_broker_pin"),
    "certificate_expiring": ("certificate.pinned_expiring", "certificate.self_signed_expiring"),
    "template_problem": ("certificate.template_",),
    "settings_reset": (),
    # Only their protocol / cipher mismatch alerts (MISMATCH_ALERTS): what a client meets on a server whose TLS
    # versions or cipher suites it cannot use. Other alerts (an untrusted certificate...) stay findings of their own.
    "alert_received": ("tls.tls12_disabled", "tls.tls13_forced_unsupported", "tls.cipher_suites_"),
    "alert_sent": ("tls.tls12_disabled", "tls.tls13_forced_unsupported", "tls.cipher_suites_"),
    "logon_failure": (),
}

_EVENT_FINDINGS: dict[str, tuple[str, str, str, str, str]] = {
    # kind: (finding id, severity, cause family, title, likely cause)
    "key_access": (
        "events.schannel_key_access",
        "warning",
        "machinekeys",
        "Schannel could not open the private key of the RDP certificate",
        "The key file's permissions (MachineKeys) or a missing key made TLS fail; the key is readable now, so the "
        "fault was intermittent or has been repaired. If it recurs, rdpfix.rdp.machinekeys repairs the key's ACL.",
    ),
    "credential": (
        "events.schannel_credential_failed",
        "warning",
        "tls",
        "Schannel could not create the TLS server credential",
        "Disabled TLS protocols or an unusable certificate key stopped TLS; the current settings allow it, so a "
        "change was made since or a reboot applied one.",
    ),
    "no_common_cipher": (
        "events.schannel_no_common_cipher",
        "warning",
        "tls",
        "Clients offered no TLS protocol or cipher suite this server accepts",
        "The server's own settings are usable, so the clients are old or hardened differently (TLS 1.0 only, "
        "missing suites): update those clients rather than weakening the server.",
    ),
    "alert_received": (
        "events.tls_alert_received",
        "info",
        "tls",
        "Clients ended TLS handshakes with fatal alerts",
        "Alert 46/48 means the client did not trust the certificate (normal for a self-signed one); 40/70/71 mean "
        "the client and the server share no TLS version or cipher suite. The server's own settings are usable now, "
        "so these are old clients or scanners, rdpfix.rdp.handshake's one-version-at-a-time trials among them.",
    ),
    "alert_sent": (
        "events.tls_alert_sent",
        "info",
        "tls",
        "The server ended TLS handshakes with fatal alerts",
        "Alert 40/70/71 means a client offered only versions or suites the server disabled. The server's own settings "
        "are usable now, so these are old clients or scanners (rdpfix.rdp.handshake's one-version-at-a-time trials "
        "leave them too): update such clients rather than weakening the server.",
    ),
    "selfsigned_not_created": (
        "events.selfsigned_not_created",
        "warning",
        "certificate",
        "Remote Desktop failed to create or renew its self-signed certificate",
        "The renewal needs CertPropSvc, KeyIso, CryptSvc and SessionEnv and a writable MachineKeys folder; the "
        "certificate is fine now, so the failure was repaired or will return at the next renewal.",
    ),
    "pinned_problem": (
        "events.pinned_certificate_problem",
        "warning",
        "certificate",
        "Remote Desktop could not use the certificate configured for the listener",
        "The pinned certificate was missing, expired, lacked the Server Authentication EKU or its key was "
        "inaccessible; the listener fell back to the self-signed certificate.",
    ),
    "certificate_expiring": (
        "events.certificate_expiring",
        "info",
        "certificate",
        "Remote Desktop warned that its certificate expires soon",
        "The certificate in use is close to its end of validity.",
    ),
    "template_problem": (
        "events.template_certificate_problem",
        "warning",
        "certificate",
        "Remote Desktop could not use the certificate from its Group Policy template",
        "Autoenrollment did not produce a usable certificate (template, CA reachability or permissions).",
    ),
    "settings_reset": (
        "events.listener_settings_reset",
        "info",
        "certificate",
        "Remote Desktop corrected its listener settings (invalid certificate hash or settings reset)",
        "A configured value was invalid and Windows replaced it with its default.",
    ),
    "logon_failure": (
        "events.logon_failures",
        "info",
        "client",
        "Logons failed",
        "Wrong credentials, locked or expired accounts, or missing 'Allow log on through Remote Desktop Services' "
        "rights; these happen after the connection is set up, so they are not 0x904.",
    ),
}


def _finding(kind: str, events: list[Event], since: str | None) -> dict[str, t.Any]:
    finding_id, severity, cause, title, likely = _EVENT_FINDINGS[kind]
    evidence: dict[str, t.Any] = {
        "count": len(events),
        "first": events[-1].time,
        "last": events[0].time,
        "event_ids": sorted({event.id for event in events}),
    }
    if since:
        evidence["since"] = since
    if kind in ("alert_received", "alert_sent"):
        codes = Counter(alert_code(event) for event in events)
        evidence["alerts"] = {
            f"{code} {TLS_ALERTS.get(code, 'unknown')}" if code is not None else "unknown": count
            for code, count in sorted(codes.items(), key=lambda item: (item[0] is None, item[0] or 0))
        }
    if kind == "logon_failure":
        types = Counter(
            LOGON_TYPES.get(event.data.get("LogonType", ""), event.data.get("LogonType") or "unknown")
            for event in events
        )
        evidence["logon_types"] = dict(types.most_common())
        sources = Counter(event.data.get("IpAddress") or "-" for event in events)
        evidence["source_addresses"] = dict(sources.most_common(10))
        statuses = Counter(event.data.get("SubStatus") or event.data.get("Status") or "-" for event in events)
        evidence["status_codes"] = dict(statuses.most_common(10))
    evidence["events"] = [event.brief() for event in events[:EVIDENCE_EVENTS]]
    count = len(events)
    titled = f"{title} ({count} time{'s' if count != 1 else ''}, last {events[0].time})"
    return finding(finding_id, severity, titled, cause, evidence, None, likely_cause=likely)


def explains(finding_id: str, event: Event) -> bool:
    kind = event.kind
    if kind in ("alert_received", "alert_sent") and alert_code(event) not in MISMATCH_ALERTS:
        return False
    return kind is not None and finding_id.startswith(EXPLAINED_BY.get(kind, ()))


@dataclass
class EventAssessment:
    findings: list[dict[str, t.Any]]  # events.* findings for what nothing current explains
    evidence: dict[str, list[dict[str, t.Any]]]  # current finding id -> the events it explains


def assess(events: t.Sequence[Event], current_ids: t.Iterable[str], since: str | None = None) -> EventAssessment:
    """Split the events into evidence for the current findings and findings of their own."""
    ids = list(current_ids)
    by_kind: dict[str, list[Event]] = {}
    for event in events:
        kind = event.kind
        if kind is not None:
            by_kind.setdefault(kind, []).append(event)
    findings: list[dict[str, t.Any]] = []
    evidence: dict[str, list[dict[str, t.Any]]] = {}
    for kind, kind_events in by_kind.items():
        unexplained: list[Event] = []
        explained: dict[str, list[Event]] = {}
        for event in kind_events:
            explaining = [finding_id for finding_id in ids if explains(finding_id, event)]
            for finding_id in explaining:
                explained.setdefault(finding_id, []).append(event)
            if not explaining:
                unexplained.append(event)
        for finding_id, its_events in explained.items():
            evidence.setdefault(finding_id, []).extend(event.brief() for event in its_events[:EVIDENCE_EVENTS])
        if unexplained:
            findings.append(_finding(kind, unexplained, since))
    findings.sort(key=lambda finding: str(finding["id"]))
    return EventAssessment(findings, evidence)
