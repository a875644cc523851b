# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The final verification of rdpfix.rdp.server: RDP probed from the controller after a real run, judged against what
the run left pending.

The probe is rdpfix.rdp.handshake's, run in the task's own process (the task runs on the controller; the probe needs
nothing from the host but its RDP port). Running it here instead of as two more tasks per host (the probe and the
check of its result) saves the controller about a tenth of a host's CPU in every real run; the judgement is the one
the role's verify.yml makes after a reboot, so both say the same.
"""

from __future__ import annotations

import typing as t

from ansible_collections.rdpfix.rdp.plugins.module_utils._handshake import ARGUMENT_SPEC, options_from, outcome
from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import ProbeOptions, validate_options

Probe = t.Callable[[ProbeOptions], dict[str, t.Any]]

OPTION_SPEC: dict[str, t.Any] = {
    "type": "dict",
    "options": {
        "host": {"type": "str", "required": True},
        "fallback_port": {"type": "int", "default": 3389},
    },
}


def probe_port(concerns: dict[str, dict[str, t.Any]], fallback: int) -> int:
    """The listener's real port as the firewall concern read it (PortNumber), else ``fallback`` (the inventory's)."""
    port = (((concerns.get("firewall") or {}).get("firewall") or {}).get("server") or {}).get("port")
    return int(port) if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536 else fallback


def pending(concerns: dict[str, dict[str, t.Any]]) -> list[str]:
    """What the run left waiting or for someone to decide, which excuses RDP that does not connect yet."""
    left: list[str] = []
    for name, result in concerns.items():
        if result.get("reboot_required"):
            left.append(f"{name}: a reboot is required")
        if result.get("restart_pending"):
            left.append(f"{name}: a service restart is pending")
        left.extend(f"{name}: {finding} is unresolved" for finding in result.get("unresolved") or [])
    return left


def problem(report: dict[str, t.Any]) -> str | None:
    """Why the listener is not what the repair promised (None when it is): it does not connect, or it presents a
    certificate a client must be warned about (expired, or not made for server authentication)."""
    if not report.get("connectable"):
        detail = report.get("summary") or report.get("msg") or ""
        return f"RDP still does not connect after the repair ({report.get('verdict') or 'unknown'}): {detail}"
    certificate = (report.get("tls") or {}).get("certificate")
    if isinstance(certificate, dict):
        expired = bool(certificate.get("expired"))
        if expired or not certificate.get("server_auth", True):
            return (
                f"After the repair the listener presents certificate {certificate.get('thumbprint') or '?'} "
                f"({certificate.get('subject') or ''}), which is "
                f"{'expired' if expired else 'not made for server authentication'}."
            )
    return None


def probe_params(options: dict[str, t.Any], port: int) -> dict[str, t.Any]:
    """rdpfix.rdp.handshake's options for the verification: its defaults, the host and the port."""
    params = {name: spec.get("default") for name, spec in ARGUMENT_SPEC.items()}
    params.update(host=options["host"], port=port)
    return params


def problems(options: dict[str, t.Any]) -> list[str]:
    """What is wrong with the verify options, checked before the host is contacted (empty when nothing is)."""
    found = validate_options(options_from(probe_params(options, int(options["fallback_port"]))))
    # The probe's option port is this one's fallback_port.
    return [f"verify.fallback_{problem}" if problem.startswith("port ") else f"verify.{problem}" for problem in found]


def verify(options: dict[str, t.Any], concerns: dict[str, dict[str, t.Any]], probe: Probe) -> dict[str, t.Any]:
    """The verification's result: the probe's report (as rdpfix.rdp.handshake returns it), ``pending`` (what excuses a
    failure) and, when RDP is not what the repair promised although nothing excuses it, ``failed`` and ``msg``."""
    params = probe_params(options, probe_port(concerns, int(options["fallback_port"])))
    probe_failed, report = outcome(params, probe)
    result: dict[str, t.Any] = {"changed": False, **report, "pending": pending(concerns)}
    if probe_failed:  # options the probe refuses (a host name it cannot use): nothing was probed
        return result | {"failed": True, "msg": f"The final verification could not probe RDP: {report.get('msg')}"}
    why = problem(report)
    if why is None:
        return result
    if result["pending"]:
        result["msg"] = f"{why} Not failed: {'; '.join(result['pending'])}."
        return result
    return result | {
        "failed": True,
        "msg": f"{why} Nothing is pending and no module left a critical finding; set rdpfix_server_verify=false "
        "to skip this check.",
    }
