# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""rdpfix.rdp.handshake's options and result, shared by the module (run where the task is delegated) and its action
plugin (which runs the probe in the controller's own process when the task runs on the controller)."""

from __future__ import annotations

import typing as t

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import (
    ALL_CHECKS,
    ALL_PROTOCOLS,
    ALL_TLS_VERSIONS,
    ProbeOptions,
    validate_options,
)

FAIL_SEVERITIES: dict[str, tuple[str, ...]] = {
    "never": (),
    "critical": ("critical",),
    "warning": ("critical", "warning"),
}

ARGUMENT_SPEC: dict[str, dict[str, t.Any]] = {
    "host": {"type": "str", "required": True},
    "port": {"type": "int", "default": 3389},
    "server_name": {"type": "str"},
    "checks": {"type": "list", "elements": "str", "choices": list(ALL_CHECKS), "default": list(ALL_CHECKS)},
    "protocols": {
        "type": "list",
        "elements": "str",
        "choices": list(ALL_PROTOCOLS),
        "default": list(ALL_PROTOCOLS),
    },
    "tls_versions": {
        "type": "list",
        "elements": "str",
        "choices": list(ALL_TLS_VERSIONS),
        "default": list(ALL_TLS_VERSIONS),
    },
    "connect_timeout": {"type": "float", "default": 5.0},
    "read_timeout": {"type": "float", "default": 5.0},
    "udp_port": {"type": "int"},
    "udp_timeout": {"type": "float", "default": 2.0},
    "expected_thumbprint": {"type": "str"},
    "cert_warn_days": {"type": "int", "default": 30},
    "max_clock_skew": {"type": "float", "default": 300},
    "cookie": {"type": "str"},
    "fail_on": {"type": "str", "choices": list(FAIL_SEVERITIES), "default": "never"},
}


def options_from(params: dict[str, t.Any]) -> ProbeOptions:
    return ProbeOptions(
        host=params["host"],
        port=params["port"],
        server_name=params["server_name"],
        checks=params["checks"],
        protocols=params["protocols"],
        tls_versions=params["tls_versions"],
        connect_timeout=params["connect_timeout"],
        read_timeout=params["read_timeout"],
        udp_port=params["udp_port"],
        udp_timeout=params["udp_timeout"],
        expected_thumbprint=params["expected_thumbprint"],
        cert_warn_days=params["cert_warn_days"],
        max_clock_skew=params["max_clock_skew"],
        cookie=params["cookie"],
    )


def outcome(
    params: dict[str, t.Any], probe: t.Callable[[ProbeOptions], dict[str, t.Any]]
) -> tuple[bool, dict[str, t.Any]]:
    """(failed, result keys) of one probe with validated ``params``: bad input is refused before any packet leaves."""
    options = options_from(params)
    problems = validate_options(options)
    if problems:
        return True, {"msg": "invalid options: " + "; ".join(problems)}
    report = probe(options)
    failing = [item for item in report["findings"] if item["severity"] in FAIL_SEVERITIES[params["fail_on"]]]
    return bool(failing), {"changed": False, "msg": report["summary"], **report}
