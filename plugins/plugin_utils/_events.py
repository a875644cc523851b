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

# An event log query is an XPath with a limited number of expressions: Microsoft's Query Schema says "Each XPath that
# you specify is limited to 32 expressions", and in practice a query with 24 EventID comparisons is refused ("The
# specified query is invalid") where 22 work (elastic/beats#1491, KB970453; PowerShell/PowerShell#12303 with
# Get-WinEvent, whose hashtable path tolerates the error and answers "No events were found"). rdpfix counts one term
# per provider name, per single event ID, two per ID range and one for the start time, and keeps every query at or
# below this count, with room to spare below the 22 observed to work.
MAX_QUERY_TERMS = 16
# A run of at least this many consecutive IDs is sent as a range (two comparisons) rather than one by one.
_RANGE_FROM = 3

IdSpec = int | list[int]


class QueryLimitError(ValueError):
    """A query the event log would refuse: raised before anything is sent."""


def expand_ids(ids: t.Iterable[IdSpec]) -> list[int]:
    """The event IDs a query's ``ids`` name, ranges ``[low, high]`` expanded."""
    expanded: list[int] = []
    for item in ids:
        if isinstance(item, list):
            low, high = item
            expanded.extend(range(low, high + 1))
        else:
            expanded.append(item)
    return expanded


def compress_ids(ids: t.Iterable[int]) -> list[IdSpec]:
    """Sorted IDs, with each run of consecutive IDs (at least _RANGE_FROM long) as one ``[low, high]`` range."""
    ordered = sorted(set(ids))
    specs: list[IdSpec] = []
    start = 0
    while start < len(ordered):
        end = start
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        if end - start + 1 >= _RANGE_FROM:
            specs.append([ordered[start], ordered[end]])
        else:
            specs.extend(ordered[start : end + 1])
        start = end + 1
    return specs


def query_terms(query: t.Mapping[str, t.Any]) -> int:
    """The expressions a query costs the event log: providers, IDs (a range counts two) and the start time."""
    providers = query.get("providers") or []
    ids = query.get("ids") or []
    return len(providers) + sum(2 if isinstance(item, list) else 1 for item in ids) + 1


def check_query(query: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
    """The query unchanged, or QueryLimitError when the event log would refuse it (too many terms, bad ranges)."""
    for item in query.get("ids") or []:
        if isinstance(item, list) and (len(item) != 2 or item[0] > item[1]):
            raise QueryLimitError(f"an ID range is [low, high], not {item!r}")
    terms = query_terms(query)
    if terms > MAX_QUERY_TERMS:
        raise QueryLimitError(
            f"the event log query of {query.get('log')!r} has {terms} terms, more than the {MAX_QUERY_TERMS} it "
            "can be trusted with: split it"
        )
    return dict(query)


def split_query(log: str, providers: t.Sequence[str] | None, ids: t.Iterable[int] | None) -> list[dict[str, t.Any]]:
    """Queries within MAX_QUERY_TERMS that together ask what one (log, providers, ids) query would: one per provider,
    consecutive IDs as ranges, the IDs split into as many queries as the limit needs."""
    specs = compress_ids(ids) if ids is not None else None
    queries: list[dict[str, t.Any]] = []
    wanted: list[str | None] = list(providers) if providers else [None]
    for provider in wanted:
        base: dict[str, t.Any] = {"log": log}
        if provider is not None:
            base["providers"] = [provider]
        if specs is None:
            queries.append(check_query(base))
            continue
        chunk: list[IdSpec] = []
        for spec in specs:
            if chunk and query_terms({**base, "ids": [*chunk, spec]}) > MAX_QUERY_TERMS:
                queries.append(check_query({**base, "ids": chunk}))
                chunk = []
            chunk.append(spec)
        queries.append(check_query({**base, "ids": chunk}))
    return queries


# The System log per provider (Schannel; RCM, whose entries there are classic events), RCM's own channels, and
# failed logons: each within the event log's query limit.
QUERIES: tuple[dict[str, t.Any], ...] = (
    *split_query("System", [SCHANNEL], SCHANNEL_IDS),
    *split_query("System", [RCM], RCM_IDS),
    *split_query(f"{RCM}/Admin", None, RCM_IDS),
    *split_query(f"{RCM}/Operational", None, RCM_IDS),
    *split_query("Security", None, [LOGON_FAILURE_ID]),
)

# The event schema's System/Level values (1 Critical ... 5 Verbose; 0 LogAlways, as audit events have). Windows
# shows LevelDisplayName in the host's UI language, so rdpfix names levels from the number.
LEVEL_NAMES = {0: "Information", 1: "Critical", 2: "Error", 3: "Warning", 4: "Information", 5: "Verbose"}

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

EVIDENCE_EVENTS = 10


@dataclass(frozen=True)
class Event:
    log: str
    provider: str
    id: int
    level: int  # System/Level; never the localised LevelDisplayName
    time: str
    message: str  # as Windows rendered it, in the host's UI language: shown, never parsed ("" when not renderable)
    data: dict[str, str] = field(default_factory=dict)  # named <Data>, or param0, param1... for unnamed ones

    @classmethod
    def from_agent(cls, raw: dict[str, t.Any]) -> Event:
        data = raw.get("data")
        level = raw.get("level")
        if isinstance(level, bool) or not isinstance(level, int):
            raise ValueError(f"an event's level is a number, not {level!r}")
        return cls(
            log=str(raw.get("log") or ""),
            provider=str(raw.get("provider") or ""),
            id=int(raw.get("id") or 0),
            level=level,
            time=str(raw.get("time") or ""),
            message=str(raw.get("message") or ""),
            data={str(key): str(value) for key, value in data.items()} if isinstance(data, dict) else {},
        )

    @property
    def level_name(self) -> str:
        return LEVEL_NAMES.get(self.level, str(self.level))

    @property
    def kind(self) -> str | None:
        return classify(self)

    def brief(self) -> dict[str, t.Any]:
        """The event as finding evidence: enough to recognise it, the message cut to a readable length."""
        shown: dict[str, t.Any] = {
            "time": self.time,
            "provider": self.provider,
            "id": self.id,
            "level": self.level_name,
        }
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
    """The TLS alert of a Schannel 36887/36888, from its event data (AlertDesc), never from the localised message."""
    if event.provider.casefold() != SCHANNEL.casefold() or event.id not in (36887, 36888):
        return None
    value = event.data.get("AlertDesc")
    if value is not None and value.strip().isdigit():
        return int(value.strip())
    return None


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


def read_findings(unreadable: t.Sequence[t.Any], invalid_queries: t.Sequence[t.Any]) -> list[dict[str, t.Any]]:
    """What the event log could not give: records Windows could not read (skipped, the others kept), and queries it
    refused (their events unknown - never taken for "no events")."""
    findings: list[dict[str, t.Any]] = []
    logs: dict[str, int] = {}
    reasons: list[str] = []
    for item in unreadable:
        if isinstance(item, dict):
            log = str(item.get("log") or "")
            logs[log] = logs.get(log, 0) + int(item.get("count") or 0)
            if item.get("reason"):
                reasons.append(f"{log}: {item['reason']}")
    total = sum(logs.values())
    if total:
        findings.append(
            finding(
                "events.records_unreadable",
                "info",
                f"{total} event log record(s) could not be read and were skipped; the other records were judged",
                "service",
                {"count": total, "logs": dict(sorted(logs.items())), "reasons": reasons[:EVIDENCE_EVENTS]},
                None,
                likely_cause="A damaged record, or a provider whose message or metadata files are missing. Events in "
                "the skipped records are unknown; Event Viewer shows the same records.",
            )
        )
    refused = [item for item in invalid_queries if isinstance(item, dict)]
    if refused:
        findings.append(
            finding(
                "events.query_refused",
                "warning",
                "The event log refused a query: the events it asked for are unknown, not absent",
                "service",
                {"queries": [{"log": item.get("log"), "reason": item.get("reason")} for item in refused]},
                None,
                likely_cause="This Windows build counts the query's expressions differently from rdpfix; please report "
                "it with the host's build.",
            )
        )
    return findings


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
