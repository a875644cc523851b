# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one shape of a finding (docs/findings.md), shared by every planner, the audit and the fleet report.

A finding is a plain dict so that it travels unchanged through Ansible results, registered variables and the report:
``id``, ``severity``, ``title``, ``cause``, ``evidence``, ``fix`` ({module, options, description} or None), and
optionally ``likely_cause``. ``finding()`` builds one and refuses a severity or cause outside the vocabularies below,
so a planner cannot invent a word the report and the audit's summary do not know.
"""

from __future__ import annotations

import typing as t

# Most urgent first: the order findings are listed and counted in.
SEVERITIES: tuple[str, ...] = ("critical", "warning", "security", "info")
SEVERITY_ORDER: dict[str, int] = {severity: rank for rank, severity in enumerate(SEVERITIES)}

# The cause families of 0x904 / 0x7 (docs/findings.md, "Cause families").
CAUSES: tuple[str, ...] = (
    "certificate",
    "machinekeys",
    "firewall",
    "transport",
    "tls",
    "name_resolution",
    "service",
    "security_downgrade",
    "client",
)

# The keys every finding has; ``likely_cause`` is the only optional one.
REQUIRED_KEYS: frozenset[str] = frozenset({"id", "severity", "title", "cause", "evidence", "fix"})
FIX_KEYS: frozenset[str] = frozenset({"module", "options", "description"})


def finding(  # noqa: PLR0917 - the six fields of docs/findings.md, in that order
    finding_id: str,
    severity: str,
    title: str,
    cause: str,
    evidence: dict[str, t.Any],
    fix: dict[str, t.Any] | None,
    likely_cause: str | None = None,
) -> dict[str, t.Any]:
    """One finding in the shape of docs/findings.md; ValueError for a severity or cause outside the vocabularies."""
    if severity not in SEVERITY_ORDER:
        raise ValueError(f"finding {finding_id}: severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    if cause not in CAUSES:
        raise ValueError(f"finding {finding_id}: cause {cause!r} is not one of {', '.join(CAUSES)}")
    built: dict[str, t.Any] = {
        "id": finding_id,
        "severity": severity,
        "title": title,
        "cause": cause,
        "evidence": evidence,
        "fix": fix,
    }
    if likely_cause is not None:
        built["likely_cause"] = likely_cause
    return built


def fix(module: str, options: dict[str, t.Any], description: str) -> dict[str, t.Any]:
    """The ``fix`` of a finding: the module (short name or FQCN) and the options that make the change."""
    name = module if "." in module else f"rdpfix.rdp.{module}"
    return {"module": name, "options": options, "description": description}


def urgency(item: dict[str, t.Any]) -> tuple[int, str]:
    """Sort key: most urgent severity first, then by id."""
    return SEVERITY_ORDER.get(str(item.get("severity")), len(SEVERITIES)), str(item.get("id"))


def shape_problems(item: object) -> list[str]:
    """What makes ``item`` not a finding of docs/findings.md (empty when it is one)."""
    if not isinstance(item, dict):
        return [f"not a mapping: {item!r}"]
    problems: list[str] = []
    missing = REQUIRED_KEYS - set(item)
    if missing:
        problems.append(f"missing {', '.join(sorted(missing))}")
    extra = set(item) - REQUIRED_KEYS - {"likely_cause"}
    if extra:
        problems.append(f"unknown keys {', '.join(sorted(extra))}")
    if item.get("severity") not in SEVERITY_ORDER:
        problems.append(f"severity {item.get('severity')!r}")
    if item.get("cause") not in CAUSES:
        problems.append(f"cause {item.get('cause')!r}")
    if not isinstance(item.get("id"), str) or "." not in item["id"]:
        problems.append(f"id {item.get('id')!r} is not <concern>.<what>")
    if not isinstance(item.get("title"), str) or not item["title"]:
        problems.append("empty title")
    if not isinstance(item.get("evidence"), dict):
        problems.append("evidence is not a mapping")
    fixed = item.get("fix")
    if fixed is not None and (not isinstance(fixed, dict) or set(fixed) != FIX_KEYS):
        problems.append(f"fix {fixed!r} is not {{module, options, description}}")
    return problems
