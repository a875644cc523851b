# Copyright: rdpfix maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fleet report: per-host results in, an HTML page, a JSON document and JUnit XML out.

Everything here is pure Python without Ansible imports, so it is unit-tested directly and runs on any controller.
Host data is untrusted (a host name, an event message or a certificate subject can contain markup), so every value
reaches the HTML and the XML only through the escaping helpers below, and the HTML carries a Content-Security-Policy
that would refuse any script or request that slipped through anyway.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
import re
import tempfile
import typing as t
from collections import Counter
from dataclasses import dataclass, field, replace
from xml.etree import ElementTree as ET

from ansible_collections.rdpfix.rdp.plugins.plugin_utils._report_assets import REPORT_CSS, REPORT_JS

SCHEMA_VERSION = 1

JSONValue: t.TypeAlias = "str | int | float | bool | list[JSONValue] | dict[str, JSONValue] | None"
JSONObject: t.TypeAlias = "dict[str, JSONValue]"

Status = t.Literal["ok", "warning", "critical", "unreachable", "failed"]
Severity = t.Literal["critical", "warning", "security", "info"]

# Most urgent first: the order of the status tiles, of the default table order and of the sort ranks.
STATUSES: tuple[Status, ...] = ("critical", "failed", "unreachable", "warning", "ok")
# Ordered by how soon RDP connections break: `security` findings do not break connections, `warning` ones will.
SEVERITIES: tuple[Severity, ...] = ("critical", "warning", "security", "info")
SEVERITY_RANK: dict[str, int] = {name: rank for rank, name in enumerate(SEVERITIES)}
STATUS_RANK: dict[str, int] = {name: rank for rank, name in enumerate(STATUSES)}
FORMATS: tuple[str, ...] = ("html", "json", "junit")
FAIL_ON_CHOICES: tuple[str, ...] = ("none", *SEVERITIES)
FILE_NAMES: dict[str, str] = {"html": "report.html", "json": "report.json", "junit": "report.junit.xml"}

_FINDING_ID = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")
# XML 1.0 forbids most C0 control characters even as character references; host data may contain them.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class ReportInputError(ValueError):
    """A per-host result does not have the documented shape (the report shows the host as failed with this text)."""


@dataclass(frozen=True)
class Fix:
    module: str | None
    description: str
    options: JSONObject = field(default_factory=dict)


@dataclass(frozen=True)
class Finding:
    id: str
    severity: Severity
    title: str
    cause: str
    evidence: JSONObject
    fix: Fix | None


@dataclass(frozen=True)
class HostResult:
    name: str
    address: str
    status: Status
    findings: tuple[Finding, ...] = ()
    handshake: JSONObject | None = None
    gathered_at: str | None = None
    # Why an unreachable/failed host has no findings, in the words of Ansible or of the module.
    message: str | None = None


@dataclass(frozen=True)
class FleetReport:
    title: str
    generated_at: str
    hosts: tuple[HostResult, ...]
    # Findings at or above this severity fail the JUnit test case and the gate; "none" gates only on lost hosts.
    fail_on: str = "none"


@dataclass(frozen=True)
class Summary:
    hosts: int
    by_status: dict[str, int]
    by_severity: dict[str, int]
    # cause -> {worst severity of that cause on a host -> number of hosts}
    by_cause: dict[str, dict[str, int]]

    def hosts_by_cause(self) -> dict[str, int]:
        return {cause: sum(per_severity.values()) for cause, per_severity in self.by_cause.items()}


# --------------------------------------------------------------------------------------------------------------------
# Input: plain data (already converted from Ansible's types) -> typed results
# --------------------------------------------------------------------------------------------------------------------


def to_plain(value: object, _depth: int = 0) -> JSONValue:
    """Copy ``value`` into plain JSON types (Ansible hands over its own str/dict subclasses and lazy containers)."""
    if _depth > 64:
        raise ReportInputError("data nested deeper than 64 levels")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        # NaN and infinity are not JSON; keep them readable instead of writing an invalid document.
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, t.Mapping):
        return {str(key): to_plain(item, _depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_plain(item, _depth + 1) for item in value]
    return str(value)


def _text(raw: JSONObject, key: str, where: str, *, required: bool = True) -> str:
    value = raw.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ReportInputError(f"{where}: '{key}' must be a non-empty string, got {json.dumps(value)[:80]}")
    return value


def parse_finding(raw: JSONValue, where: str) -> Finding:
    """Check one finding against the documented shape (docs/findings.md) and type it."""
    if not isinstance(raw, dict):
        raise ReportInputError(f"{where}: a finding must be a mapping, got {type(raw).__name__}")
    finding_id = _text(raw, "id", where)
    if not _FINDING_ID.match(finding_id):
        raise ReportInputError(f"{where}: finding id {finding_id!r} is not of the form <concern>.<what>")
    where = f"{where} ({finding_id})"
    severity = _text(raw, "severity", where)
    if severity not in SEVERITY_RANK:
        raise ReportInputError(f"{where}: severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    evidence = raw.get("evidence")
    if evidence is None:
        evidence = {}
    if not isinstance(evidence, dict):
        raise ReportInputError(f"{where}: 'evidence' must be a mapping")
    raw_fix = raw.get("fix")
    fix: Fix | None = None
    if raw_fix is not None:
        if not isinstance(raw_fix, dict):
            raise ReportInputError(f"{where}: 'fix' must be a mapping or null")
        module = raw_fix.get("module")
        if module is not None and not isinstance(module, str):
            raise ReportInputError(f"{where}: 'fix.module' must be a string or null")
        options = raw_fix.get("options")
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise ReportInputError(f"{where}: 'fix.options' must be a mapping")
        fix = Fix(module=module, description=_text(raw_fix, "description", where, required=False), options=options)
    return Finding(
        id=finding_id,
        severity=t.cast(Severity, severity),
        title=_text(raw, "title", where),
        cause=_text(raw, "cause", where),
        evidence=evidence,
        fix=fix,
    )


def status_for(findings: t.Iterable[Finding]) -> Status:
    """The host's status from its findings: critical if any is critical, warning if any warns or weakens security."""
    worst = min((SEVERITY_RANK[finding.severity] for finding in findings), default=len(SEVERITIES))
    if worst == SEVERITY_RANK["critical"]:
        return "critical"
    if worst <= SEVERITY_RANK["security"]:
        return "warning"
    return "ok"


# What the report keeps of a handshake probe's result; the rest (TLS versions, certificate, CredSSP) stays in the
# registered result, and what matters of it is already in the probe's findings.
PROBE_KEYS: tuple[str, ...] = ("verdict", "connectable", "summary")


def probe_summary(raw: JSONValue) -> tuple[JSONObject | None, list[JSONValue]]:
    """The verdict part and the findings of a rdpfix.rdp.handshake result (or of a bare verdict string)."""
    if raw is None:
        return None, []
    if not isinstance(raw, dict):
        return {"verdict": str(raw)}, []
    if raw.get("skipped") is True:
        return None, []
    if "verdict" not in raw and (raw.get("failed") is True or raw.get("unreachable") is True):
        message = raw.get("msg")
        return {"verdict": "probe_failed", "summary": message if isinstance(message, str) else ""}, []
    verdict: JSONObject = {key: raw[key] for key in PROBE_KEYS if key in raw}
    findings = raw.get("findings")
    return verdict, findings if isinstance(findings, list) else []


def host_from_result(
    name: str,
    address: str,
    result: JSONValue,
    handshake: JSONValue = None,
) -> HostResult:
    """Turn what the playbook registered for one host into its line of the report; never raises.

    ``result`` is the registered result of the facts task: a mapping with ``findings`` (and optionally
    ``gathered_at``, ``address``, ``handshake``); ``handshake``, when given, is the handshake probe's registered
    result and replaces the facts result's own; or Ansible's own failure shapes (``unreachable: true`` when the task
    ran with ``ignore_unreachable``, ``failed: true`` with ``ignore_errors``), or ``None`` when the host has no result
    at all (it dropped out of the play before the facts task).
    """
    if result is None:
        return HostResult(
            name=name,
            address=address,
            status="failed",
            message="no result recorded for this host: it failed or was unreachable before the facts task ran "
            "(run that task with ignore_unreachable and ignore_errors to see why)",
        )
    if not isinstance(result, dict):
        return HostResult(
            name, address, "failed", message=f"the facts result is a {type(result).__name__}, not a mapping"
        )
    message = result.get("msg")
    message_text = message if isinstance(message, str) else None
    if result.get("unreachable") is True:
        return HostResult(name, address, "unreachable", message=message_text or "host unreachable")
    if result.get("failed") is True:
        # Command-like results say only "non-zero return code" in msg; the reason is in stderr.
        stderr = result.get("stderr")
        detail = f": {stderr.strip()[:500]}" if isinstance(stderr, str) and stderr.strip() else ""
        return HostResult(name, address, "failed", message=(message_text or "the facts task failed") + detail)
    if result.get("skipped") is True:
        return HostResult(
            name,
            address,
            "failed",
            message="the facts task was skipped on this host" + (f": {message_text}" if message_text else ""),
        )
    if isinstance(result.get("address"), str) and result["address"]:
        address = t.cast(str, result["address"])
    gathered_at = result.get("gathered_at")
    if handshake is None:
        handshake = result.get("handshake")
    verdict, probe_findings = probe_summary(handshake)
    try:
        raw_findings = result.get("findings")
        if not isinstance(raw_findings, list):
            raise ReportInputError("the facts result has no 'findings' list")
        findings = tuple(parse_finding(raw, f"finding {index + 1}") for index, raw in enumerate(raw_findings))
        # The probe's findings join the host's unless the facts result already carries them (same id).
        known = {finding.id for finding in findings}
        findings += tuple(
            finding
            for finding in (
                parse_finding(raw, f"handshake finding {index + 1}") for index, raw in enumerate(probe_findings)
            )
            if finding.id not in known
        )
    except ReportInputError as error:
        return HostResult(name, address, "failed", message=f"malformed facts result: {error}")
    # Most urgent first within a host, then by id, so the order is the same on every run.
    findings = tuple(sorted(findings, key=lambda finding: (SEVERITY_RANK[finding.severity], finding.id)))
    return HostResult(
        name=name,
        address=address,
        status=status_for(findings),
        findings=findings,
        handshake=verdict,
        gathered_at=gathered_at if isinstance(gathered_at, str) else None,
    )


# --------------------------------------------------------------------------------------------------------------------
# Counting and gating
# --------------------------------------------------------------------------------------------------------------------


def summarise(report: FleetReport) -> Summary:
    by_status: Counter[str] = Counter(dict.fromkeys(STATUSES, 0))
    by_severity: Counter[str] = Counter(dict.fromkeys(SEVERITIES, 0))
    by_cause: dict[str, Counter[str]] = {}
    for host in report.hosts:
        by_status[host.status] += 1
        worst_per_cause: dict[str, int] = {}
        for finding in host.findings:
            by_severity[finding.severity] += 1
            rank = SEVERITY_RANK[finding.severity]
            worst_per_cause[finding.cause] = min(rank, worst_per_cause.get(finding.cause, rank))
        for cause, rank in worst_per_cause.items():
            by_cause.setdefault(cause, Counter())[SEVERITIES[rank]] += 1
    # Biggest cause first; ties by name so the order is stable.
    ordered = sorted(by_cause.items(), key=lambda item: (-sum(item[1].values()), item[0]))
    return Summary(
        hosts=len(report.hosts),
        by_status=dict(by_status),
        by_severity=dict(by_severity),
        by_cause={cause: {sev: counts[sev] for sev in SEVERITIES if counts[sev]} for cause, counts in ordered},
    )


def failing_findings(host: HostResult, fail_on: str) -> list[Finding]:
    """The findings of ``host`` that fail the gate; critical ones always count in JUnit (see render_junit)."""
    threshold = SEVERITY_RANK.get(fail_on, SEVERITY_RANK["critical"])
    return [finding for finding in host.findings if SEVERITY_RANK[finding.severity] <= threshold]


def gate(report: FleetReport) -> list[str]:
    """Names of the hosts that make a gated run fail: findings at or above ``fail_on``, or no answer at all.

    A host that could not be read is never certified as fine, so with any threshold set, unreachable and failed hosts
    fail the gate too.
    """
    if report.fail_on == "none":
        return []
    return [
        host.name
        for host in report.hosts
        if host.status in ("unreachable", "failed") or failing_findings(host, report.fail_on)
    ]


# --------------------------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------------------------


def _finding_json(finding: Finding) -> JSONObject:
    fix: JSONValue = None
    if finding.fix is not None:
        fix = {"module": finding.fix.module, "options": finding.fix.options, "description": finding.fix.description}
    return {
        "id": finding.id,
        "severity": finding.severity,
        "title": finding.title,
        "cause": finding.cause,
        "evidence": finding.evidence,
        "fix": fix,
    }


def report_document(report: FleetReport) -> JSONObject:
    summary = summarise(report)
    return {
        "schema_version": SCHEMA_VERSION,
        "title": report.title,
        "generated_at": report.generated_at,
        "fail_on": report.fail_on,
        "summary": {
            "hosts": summary.hosts,
            "by_status": t.cast(JSONObject, summary.by_status),
            "by_severity": t.cast(JSONObject, summary.by_severity),
            "by_cause": t.cast(JSONObject, summary.by_cause),
            "failing_hosts": t.cast(list[JSONValue], gate(report)),
        },
        "hosts": [
            {
                "name": host.name,
                "address": host.address,
                "status": host.status,
                "gathered_at": host.gathered_at,
                "message": host.message,
                "handshake": host.handshake,
                "findings": [_finding_json(finding) for finding in host.findings],
            }
            for host in report.hosts
        ],
    }


def content_digest(report: FleetReport) -> str:
    """SHA-256 of what the report says, less when it was made (generated_at, each host's gathered_at).

    Every file carries it, so a rerun can tell whether a file it replaces said something else: the task's ``changed``.
    """
    timeless = replace(report, generated_at="", hosts=tuple(replace(host, gathered_at=None) for host in report.hosts))
    document = report_document(timeless)
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode("utf-8")).hexdigest()


def render_json(report: FleetReport) -> str:
    document = report_document(report)
    document["content_digest"] = content_digest(report)
    return json.dumps(document, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


_FINDING_SCHEMA: JSONObject = {
    "type": "object",
    "required": ["id", "severity", "title", "cause", "evidence", "fix"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "pattern": _FINDING_ID.pattern},
        "severity": {"enum": list(SEVERITIES)},
        "title": {"type": "string"},
        "cause": {"type": "string"},
        "evidence": {"type": "object"},
        "fix": {
            "oneOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["module", "options", "description"],
                    "additionalProperties": False,
                    "properties": {
                        "module": {"type": ["string", "null"]},
                        "options": {"type": "object"},
                        "description": {"type": "string"},
                    },
                },
            ]
        },
    },
}

_COUNTS: JSONObject = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}

# The JSON document's contract (JSON Schema draft 2020-12). Adding optional fields keeps schema_version; renaming,
# removing or changing the meaning of one increments it.
REPORT_JSON_SCHEMA: JSONObject = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "rdpfix fleet report",
    "type": "object",
    "required": ["schema_version", "title", "generated_at", "fail_on", "summary", "hosts"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "title": {"type": "string"},
        "generated_at": {"type": "string"},
        "content_digest": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "fail_on": {"enum": list(FAIL_ON_CHOICES)},
        "summary": {
            "type": "object",
            "required": ["hosts", "by_status", "by_severity", "by_cause", "failing_hosts"],
            "properties": {
                "hosts": {"type": "integer", "minimum": 0},
                "by_status": {**_COUNTS, "required": list(STATUSES)},
                "by_severity": {**_COUNTS, "required": list(SEVERITIES)},
                "by_cause": {"type": "object", "additionalProperties": _COUNTS},
                "failing_hosts": {"type": "array", "items": {"type": "string"}},
            },
        },
        "hosts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "address", "status", "gathered_at", "message", "handshake", "findings"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "address": {"type": "string"},
                    "status": {"enum": list(STATUSES)},
                    "gathered_at": {"type": ["string", "null"]},
                    "message": {"type": ["string", "null"]},
                    "handshake": {"type": ["object", "null"]},
                    "findings": {"type": "array", "items": _FINDING_SCHEMA},
                },
            },
        },
    },
}


# --------------------------------------------------------------------------------------------------------------------
# JUnit XML
# --------------------------------------------------------------------------------------------------------------------


def xml_text(value: object) -> str:
    """Text that is legal in XML 1.0: forbidden control characters become U+FFFD (ElementTree escapes the rest)."""
    return _XML_INVALID.sub("\ufffd", str(value))


def _finding_text(finding: Finding) -> str:
    lines = [f"[{finding.severity}] {finding.id} ({finding.cause}): {finding.title}"]
    for key, value in finding.evidence.items():
        lines.append(f"  {key}: {_scalar_text(value)}")
    if finding.fix is None:
        lines.append("  fix: none (nothing should be changed)")
    else:
        lines.append(f"  fix: {finding.fix.module or 'manual'} - {finding.fix.description}")
    return "\n".join(lines)


def render_junit(report: FleetReport) -> str:
    """One <testsuite>, one <testcase> per host: gating findings are its <failure>, lost hosts its <error>.

    The JUnit file gates like the task: findings at or above ``fail_on`` fail, and critical ones fail even with
    ``fail_on: none``, because a critical finding means RDP is broken now, which a CI run must not report as passed.
    """
    summary = summarise(report)
    threshold = report.fail_on if report.fail_on != "none" else "critical"
    cases: list[ET.Element] = []
    failures = errors = 0
    for host in report.hosts:
        case = ET.Element("testcase", {"classname": "rdpfix.rdp.fleet_report", "name": xml_text(host.name)})
        if host.status in ("unreachable", "failed"):
            errors += 1
            error = ET.SubElement(case, "error", {"type": host.status, "message": xml_text(host.message or "")})
            error.text = xml_text(f"{host.name} ({host.address}): {host.status}: {host.message or ''}")
        else:
            gating = failing_findings(host, threshold)
            if gating:
                failures += 1
                failure = ET.SubElement(
                    case,
                    "failure",
                    {
                        "type": gating[0].severity,
                        "message": xml_text(f"{len(gating)} finding(s): " + ", ".join(f.id for f in gating)),
                    },
                )
                failure.text = xml_text("\n\n".join(_finding_text(finding) for finding in gating))
            others = [finding for finding in host.findings if finding not in gating]
            if others or host.handshake:
                out = ET.SubElement(case, "system-out")
                parts = [_finding_text(finding) for finding in others]
                if host.handshake:
                    parts.append(f"handshake: {_scalar_text(host.handshake)}")
                out.text = xml_text("\n\n".join(parts))
        cases.append(case)
    root = ET.Element(
        "testsuites",
        {"name": xml_text(report.title), "tests": str(len(cases)), "failures": str(failures), "errors": str(errors)},
    )
    suite = ET.SubElement(
        root,
        "testsuite",
        {
            "name": xml_text(report.title),
            "tests": str(len(cases)),
            "failures": str(failures),
            "errors": str(errors),
            "skipped": "0",
            "timestamp": xml_text(report.generated_at),
        },
    )
    properties = ET.SubElement(suite, "properties")
    property_values: list[tuple[str, object]] = [
        ("schema_version", SCHEMA_VERSION),
        ("generated_at", report.generated_at),
        ("content_digest", content_digest(report)),
        ("fail_on", report.fail_on),
        ("hosts", summary.hosts),
    ]
    property_values += [(f"status.{name}", count) for name, count in summary.by_status.items()]
    property_values += [(f"severity.{name}", count) for name, count in summary.by_severity.items()]
    property_values += [(f"cause.{name}", count) for name, count in summary.hosts_by_cause().items()]
    for name, value in property_values:
        ET.SubElement(properties, "property", {"name": xml_text(name), "value": xml_text(value)})
    suite.extend(cases)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# --------------------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------------------


def esc(value: object) -> str:
    """Escape for HTML text and quoted attribute values alike."""
    return html.escape(str(value), quote=True)


def _scalar_text(value: JSONValue) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _csp_hash(source: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii")


def _address_key(address: str) -> str:
    """Sort key that orders IPv4 addresses numerically (10.0.0.9 before 10.0.0.10) and names alphabetically."""
    parts = address.split(".")
    if len(parts) == 4 and all(part.isdigit() and len(part) <= 3 for part in parts):
        return "0:" + ".".join(part.zfill(3) for part in parts)
    return "1:" + address.lower()


_CHART_COLOURS: dict[str, str] = {
    "critical": "#c62828",
    "warning": "#ef8f00",
    "security": "#6a1b9a",
    "info": "#546e7a",
}


def render_cause_chart(summary: Summary) -> str:
    """Horizontal stacked bars, one per cause: hosts affected, split by the worst severity of that cause."""
    causes = summary.by_cause
    if not causes:
        return '<p class="empty">No findings on any host.</p>'
    label_width, bar_width, row_height, top = 170, 420, 26, 30
    largest = max(sum(counts.values()) for counts in causes.values())
    height = top + row_height * len(causes) + 8
    width = label_width + bar_width + 60
    parts = [
        f'<svg class="chart" role="img" aria-labelledby="chart-title" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}">',
        '<title id="chart-title">Hosts affected per cause, by worst severity</title>',
    ]
    legend_x = label_width
    for severity in SEVERITIES:
        parts.append(
            f'<rect x="{legend_x}" y="6" width="12" height="12" fill="{_CHART_COLOURS[severity]}"/>'
            f'<text x="{legend_x + 16}" y="16" class="legend">{severity}</text>'
        )
        legend_x += 90
    for index, (cause, counts) in enumerate(causes.items()):
        y = top + index * row_height
        total = sum(counts.values())
        parts.append(
            f'<g class="bar" data-cause="{esc(cause)}"><text x="{label_width - 8}" y="{y + 16}" '
            f'text-anchor="end">{esc(cause)}</text>'
        )
        x = float(label_width)
        for severity in SEVERITIES:
            count = counts.get(severity, 0)
            if not count:
                continue
            segment = bar_width * count / largest
            parts.append(
                f'<rect x="{x:.1f}" y="{y + 3}" width="{segment:.1f}" height="{row_height - 8}" '
                f'fill="{_CHART_COLOURS[severity]}"><title>{esc(cause)}: {count} host(s), worst {severity}'
                "</title></rect>"
            )
            x += segment
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 16}" class="total">{total}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _render_value(value: JSONValue) -> str:
    if isinstance(value, str):
        return f"<code>{esc(value)}</code>"
    if isinstance(value, dict | list):
        return f"<pre>{esc(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True))}</pre>"
    return f"<code>{esc(json.dumps(value))}</code>"


def _render_finding(finding: Finding) -> str:
    rows = "".join(
        f"<tr><th>{esc(key)}</th><td>{_render_value(value)}</td></tr>" for key, value in finding.evidence.items()
    )
    evidence = f'<table class="evidence">{rows}</table>' if rows else '<p class="empty">No evidence recorded.</p>'
    if finding.fix is None:
        fix = '<p class="fix none">No change: nothing here should be modified automatically.</p>'
    else:
        options = ""
        if finding.fix.options:
            options = f"<pre>{esc(json.dumps(finding.fix.options, indent=2, ensure_ascii=False, sort_keys=True))}</pre>"
        module = f"<code>{esc(finding.fix.module)}</code> " if finding.fix.module else "Manual: "
        fix = f'<div class="fix"><p>{module}{esc(finding.fix.description)}</p>{options}</div>'
    return (
        f'<details class="finding sev-{finding.severity}"><summary><span class="badge sev-{finding.severity}">'
        f'{finding.severity}</span> {esc(finding.title)} <code class="fid">{esc(finding.id)}</code></summary>'
        f'<div class="body"><h4>Evidence</h4>{evidence}<h4>Fix</h4>{fix}</div></details>'
    )


# Colour of a handshake verdict (rdpfix.rdp.handshake's values); anything else is shown neutral.
_VERDICT_CLASS: dict[str, str] = {
    "connects": "ok",
    "connects_with_prompt": "warning",
    "connects_with_warnings": "warning",
    "fails": "critical",
    "unreachable": "unknown",
    "unknown": "unknown",
    "probe_failed": "unknown",
}


def _render_row(host: HostResult) -> str:
    severity_counts = Counter(finding.severity for finding in host.findings)
    causes = sorted({finding.cause for finding in host.findings})
    search = " ".join(
        [host.name, host.address, host.status, *causes, *(finding.id for finding in host.findings)]
    ).lower()
    verdict = ""
    verdict_key = ""
    if host.handshake:
        raw_verdict = host.handshake.get("verdict")
        verdict_key = raw_verdict.lower() if isinstance(raw_verdict, str) else "unknown"
        summary = host.handshake.get("summary")
        explained = f"<p>{esc(summary)}</p>" if isinstance(summary, str) and summary else ""
        verdict = (
            f'<details class="probe v-{_VERDICT_CLASS.get(verdict_key, "unknown")}"><summary>{esc(verdict_key)}'
            f"</summary>{explained}<pre>{esc(json.dumps(host.handshake, indent=2, ensure_ascii=False, sort_keys=True))}"
            "</pre></details>"
        )
    if host.findings:
        detail = "".join(_render_finding(finding) for finding in host.findings)
    elif host.message:
        detail = f'<p class="message">{esc(host.message)}</p>'
    else:
        detail = '<p class="empty">No findings.</p>'
    cells = [
        f'<td data-v="{esc(host.name.lower())}" class="host">{esc(host.name)}</td>',
        f'<td data-v="{esc(_address_key(host.address))}">{esc(host.address)}</td>',
        f'<td data-v="{STATUS_RANK[host.status]}"><span class="status st-{host.status}">{host.status}</span></td>',
        f'<td data-v="{severity_counts["critical"]}" class="num">{severity_counts["critical"]}</td>',
        f'<td data-v="{severity_counts["warning"] + severity_counts["security"]}" class="num">'
        f"{severity_counts['warning'] + severity_counts['security']}</td>",
        f'<td data-v="{esc(" ".join(causes))}">{esc(", ".join(causes))}</td>',
        f'<td data-v="{esc(verdict_key)}">{verdict}</td>',
        f'<td data-v="{esc(host.gathered_at or "")}" class="when">{esc(host.gathered_at or "")}</td>',
        f'<td class="findings">{detail}</td>',
    ]
    return f'<tr class="st-{host.status}" data-search="{esc(search)}">{"".join(cells)}</tr>'


# (header text, sort type); the findings column does not sort.
_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Host", "text"),
    ("Address", "text"),
    ("Status", "num"),
    ("Critical", "num"),
    ("Warnings", "num"),
    ("Causes", "text"),
    ("Handshake", "text"),
    ("Gathered", "text"),
    ("Findings", ""),
)


def render_html(report: FleetReport) -> str:
    """One self-contained page: no external URL, inline CSS and JS allowed by hash only, everything escaped."""
    summary = summarise(report)
    # Default order: most urgent first, then by name, so the page opens on what needs attention.
    hosts = sorted(report.hosts, key=lambda host: (STATUS_RANK[host.status], host.name.lower()))
    tiles = "".join(
        f'<div class="tile st-{status}"><span class="count">{summary.by_status[status]}</span>'
        f'<span class="label">{status}</span></div>'
        for status in STATUSES
    )
    headers = "".join(
        f'<th scope="col" data-type="{kind}" data-col="{index}" tabindex="0" aria-sort="none">{esc(name)}</th>'
        if kind
        else f'<th scope="col">{esc(name)}</th>'
        for index, (name, kind) in enumerate(_COLUMNS)
    )
    failing = gate(report)
    gate_line = ""
    if report.fail_on != "none":
        gate_line = (
            f'<p class="gate {"fail" if failing else "pass"}">Gate <code>fail_on: {esc(report.fail_on)}</code>: '
            f"{len(failing)} host(s) fail.</p>"
        )
    csp = (
        "default-src 'none'; "
        f"style-src '{_csp_hash(REPORT_CSS)}'; script-src '{_csp_hash(REPORT_JS)}'; "
        "img-src 'none'; connect-src 'none'; base-uri 'none'; form-action 'none'"
    )
    page = [
        "<!DOCTYPE html>\n",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(csp)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f'<meta name="rdpfix-content-digest" content="{content_digest(report)}">',
        f"<title>{esc(report.title)}</title>",
        f"<style>{REPORT_CSS}</style></head><body>",
        f'<header><h1>{esc(report.title)}</h1><p class="meta">{summary.hosts} host(s), generated '
        f"<time>{esc(report.generated_at)}</time>, report schema {SCHEMA_VERSION}</p>{gate_line}</header>",
        f'<section class="summary"><div class="tiles">{tiles}</div>',
        f"<figure><figcaption>Causes across the fleet (hosts affected)</figcaption>{render_cause_chart(summary)}"
        "</figure></section>",
        '<section class="hosts"><label class="filter">Filter <input id="filter" type="search" '
        'placeholder="host, address, status, cause or finding id" autocomplete="off"></label>',
        f'<span id="shown">{summary.hosts} of {summary.hosts} shown</span>',
        f'<table id="hosts"><thead><tr>{headers}</tr></thead><tbody>',
        "".join(_render_row(host) for host in hosts),
        "</tbody></table></section>",
        f"<script>{REPORT_JS}</script></body></html>\n",
    ]
    return "".join(page)


# --------------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------------


def render(report: FleetReport, fmt: str) -> str:
    if fmt == "html":
        return render_html(report)
    if fmt == "json":
        return render_json(report)
    if fmt == "junit":
        return render_junit(report)
    raise ValueError(f"unknown report format {fmt!r}")


def write_atomic(path: str, text: str) -> None:
    """Write next to the target and rename over it, so a reader (a CI job, a browser) never sees half a report."""
    directory = os.path.dirname(path) or "."
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        # mkstemp creates 0600; a report is meant to be read like any file the user creates.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def report_paths(dest: str, formats: t.Sequence[str]) -> dict[str, str]:
    return {fmt: os.path.join(dest, FILE_NAMES[fmt]) for fmt in formats}


def changed_paths(report: FleetReport, dest: str, formats: t.Sequence[str]) -> list[str]:
    """The report files that writing ``report`` would create or make say something else (their content digest differs;
    a new time stamp alone is no change)."""
    marker = content_digest(report)
    changed: list[str] = []
    for path in report_paths(dest, formats).values():
        try:
            with open(path, encoding="utf-8", errors="replace") as stream:
                same = marker in stream.read()
        except OSError:
            same = False
        if not same:
            changed.append(path)
    return changed


def write_report(report: FleetReport, dest: str, formats: t.Sequence[str]) -> dict[str, str]:
    """Render and write each requested format into ``dest`` (created if missing); returns format -> path."""
    os.makedirs(dest, exist_ok=True)
    paths: dict[str, str] = {}
    for fmt in formats:
        path = os.path.join(dest, FILE_NAMES[fmt])
        write_atomic(path, render(report, fmt))
        paths[fmt] = path
    return paths
