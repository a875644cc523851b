# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The run summary of playbooks/fix_rdp.yml: one line per concern the role ran, one indented line per finding.

Built in Python for the filter rdpfix.rdp.run_summary: a template looked up per host is compiled anew in every
forked worker and copies the host's variables, which made the summary the costliest task per host after the repair.

A host that left the run (unreachable or failed) gets a first line saying why, read from its repair task's result.
"""

from __future__ import annotations

import typing as t

CONCERNS = ("machinekeys", "certificate", "firewall", "transport", "tls")

NOTHING_RAN = "; nothing of the repair is known to have run"
SOME_RAN = "; what the run did before is below"
AFTER_REPAIR = "a task after the repair failed (see it above)"
NOT_REACHED = "the host could not be reached"


def _text(value: object) -> str:
    return str(value)


def _mapping(value: object) -> t.Mapping[str, t.Any]:
    return value if isinstance(value, t.Mapping) else {}


def left_line(result: t.Mapping[str, t.Any], summary: t.Mapping[str, t.Any]) -> str:
    """Why a host left the run: unreachable (saying whether anything of the repair ran) or failed."""
    if result.get("unreachable"):
        reason = _text(result["msg"]) if "msg" in result else NOT_REACHED
        return f"UNREACHABLE: {reason}{SOME_RAN if summary else NOTHING_RAN}"
    if result.get("failed_concern"):
        return f"FAILED: {_text(result.get('msg', ''))}"
    if result.get("failed") and not result.get("concerns") and "msg" in result:
        # The repair itself failed before any concern ran (the host could not be read, bad options, ...).
        return f"FAILED: {_text(result['msg'])}{NOTHING_RAN}"
    reboot = _mapping(result.get("reboot"))
    if reboot.get("failed"):
        # The reboot the repair task made after the concerns (rdpfix.rdp.server's reboot).
        return f"FAILED: {_text(reboot.get('msg', ''))}"
    verification = _mapping(result.get("verification"))
    if verification.get("failed"):
        # The repair task's own final verification (rdpfix.rdp.server's verify).
        return f"FAILED: {_text(verification.get('msg', ''))}"
    return f"FAILED: {AFTER_REPAIR}"


def state_of(concern: t.Mapping[str, t.Any]) -> str:
    """A concern's state in words: the first of unreachable, failed, restart pending, reboot required, changed, ok."""
    if concern.get("unreachable"):
        state = "UNREACHABLE"
    elif concern.get("failed"):
        state = "FAILED"
    elif concern.get("restart_pending"):
        state = "restart pending"
    elif concern.get("reboot_required"):
        state = "reboot required"
    elif concern.get("changed"):
        state = "changed"
    else:
        state = "ok"
    if concern.get("rebooted"):
        state += ", rebooted"
    waits = concern.get("reboot_waits_for_sessions")
    if waits:
        state += f", waiting for the session(s) of {_text(waits)}"
    return state


def concern_line(name: str, concern: t.Mapping[str, t.Any], check_mode: bool) -> str:
    """``<concern>: <state>``, then what check mode would do, a lost answer read again, the certificate presented."""
    line = f"{name}: {state_of(concern)}"
    if check_mode and concern.get("changed") and not concern.get("failed"):
        line += " (check mode: would change)"
    outcome = concern.get("outcome")
    if outcome:
        manifest = _mapping(concern.get("backup") or {}).get("manifest_id")
        line += f"; answer lost, read again: {_text(outcome).replace('_', ' ')} (backup manifest {_text(manifest)})"
    if name == "certificate":
        certificate = _mapping(concern.get("certificate") or {})
        if certificate.get("thumbprint"):
            line += (
                f"; listener presents {_text(certificate.get('source'))} {_text(certificate.get('thumbprint'))}, "
                f"{_text(certificate.get('days_left'))} day(s) left"
            )
        elif "certificate" in concern:
            line += "; the listener has no certificate"
    return line


def finding_line(finding: t.Mapping[str, t.Any]) -> str:
    """``  - [<severity>] <title>``, naming the module that fixes it."""
    fix = finding.get("fix")
    suffix = f" (fix: {_text(_mapping(fix).get('module'))})" if fix else ""
    return f"  - [{_text(finding.get('severity'))}] {_text(finding.get('title'))}{suffix}"


def summary_lines(
    result: t.Mapping[str, t.Any] | None,
    summary: t.Mapping[str, t.Any] | None = None,
    *,
    check_mode: bool = False,
    left: bool = False,
) -> list[str]:
    """The summary's lines for one host.

    ``result`` is the repair task's registered result (``rdpfix_server_result``); ``summary`` the per-concern results
    when the role recorded them (``rdpfix_server_summary``), else the result's ``concerns`` (which record a reboot).
    ``left``: the host left the run, and the first line says why. A host on which no concern ran has no lines.
    """
    result = _mapping(result)
    concerns = _mapping(summary if summary is not None else result.get("concerns") or {})
    lines: list[str] = []
    if left:
        lines.append(left_line(result, concerns))
    for name in CONCERNS:
        if name not in concerns:
            continue
        concern = _mapping(concerns[name])
        lines.append(concern_line(name, concern, check_mode))
        lines.extend(finding_line(_mapping(finding)) for finding in concern.get("findings") or [])
    if not lines:
        return []
    # The text as a whole loses its surrounding white space (a title ending in a space, say), as the summary always
    # has before it was split into lines.
    return "\n".join(lines).strip().split("\n")
