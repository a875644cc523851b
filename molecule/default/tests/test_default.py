"""Verify a converged fleet through the hosts themselves and from the outside.

Inside: each module of the role runs against the host in check mode with the options converge used (the role's
defaults, overridden by the inventory); nothing may be left to change and every host must be compliant. The
certificate module says which certificate the listener uses; it must be valid well beyond the expiry threshold.

Outside: an RDP client's view. The probe connects to the listener's port (as the firewall module reports it), negotiates
CredSSP/TLS and must complete a TLS handshake presenting the very certificate the host says it uses - the connection
that failed with 0x904 / extended 0x7 before the fix.

Shared by the `default` (lab) and `windows` (real hosts) scenarios.
"""

from __future__ import annotations

import json
import os
import sys
import typing as t
from pathlib import Path

import pytest
import yaml

if t.TYPE_CHECKING:
    from testinfra.host import Host

ROLE_DEFAULTS = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "roles" / "server" / "defaults" / "main.yml"

# The probe lives in the collection; Molecule's environment points ANSIBLE_COLLECTIONS_PATH at the checkout.
for collections_dir in reversed(os.environ.get("ANSIBLE_COLLECTIONS_PATH", "").split(os.pathsep)):
    if collections_dir and collections_dir not in sys.path:
        sys.path.insert(0, collections_dir)

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import probe  # noqa: E402

# What mstsc does with each verdict: these connect (possibly after a certificate prompt for a self-signed certificate).
CONNECTING_VERDICTS = {"connects", "connects_with_warnings", "connects_with_prompt"}


def role_options(host: Host) -> dict[str, t.Any]:
    """The rdpfix_* variables converge ran with: the role's defaults, then what the inventory sets for this host."""
    options: dict[str, t.Any] = yaml.safe_load(ROLE_DEFAULTS.read_text(encoding="utf-8"))
    variables = host.ansible.get_variables()
    options.update({name: value for name, value in variables.items() if name.startswith("rdpfix_")})
    return options


def module_args(module: str, options: dict[str, t.Any]) -> dict[str, t.Any]:
    """The arguments roles/server/tasks/<module>.yml passes, from the role options."""
    if module == "machinekeys":
        return {
            "strategy": options["rdpfix_machinekeys_strategy"],
            "restart_service": options["rdpfix_restart_service"],
            "allow_session_disruption": options["rdpfix_allow_session_disruption"],
        }
    if module == "certificate":
        args = {
            "expiry_threshold_days": options["rdpfix_certificate_expiry_threshold_days"],
            "replace_when": options["rdpfix_certificate_replace_when"],
            "restart_service": options["rdpfix_restart_service"],
            "start_stopped_services": options["rdpfix_start_stopped_services"],
            "allow_session_disruption": options["rdpfix_allow_session_disruption"],
        }
        if options["rdpfix_certificate_replacement_thumbprint"]:
            args["replacement_thumbprint"] = options["rdpfix_certificate_replacement_thumbprint"]
        return args
    if module == "firewall":
        args = {
            "profiles": options["rdpfix_firewall_profiles"],
            "allow_public_any": options["rdpfix_firewall_allow_public_any"],
            "disable_blocking_rules": options["rdpfix_firewall_disable_blocking_rules"],
        }
        if options["rdpfix_firewall_remote_addresses"]:
            args["remote_addresses"] = options["rdpfix_firewall_remote_addresses"]
        return args
    if module == "tls":
        return {"legacy_protocols": options["rdpfix_tls_legacy_protocols"], "nla": options["rdpfix_tls_nla"]}
    raise AssertionError(f"no arguments known for {module}")


# One check-mode run per host and module, shared by the tests below (each run is a WinRM round trip).
_results: dict[tuple[str, str], dict[str, t.Any]] = {}


def check_mode(host: Host, module: str) -> dict[str, t.Any]:
    key = (host.backend.get_pytest_id(), module)
    if key not in _results:
        args = json.dumps(module_args(module, role_options(host)))
        _results[key] = host.ansible(f"rdpfix.rdp.{module}", args, check=True)
    return _results[key]


@pytest.mark.parametrize("module", ["machinekeys", "certificate", "firewall", "tls"])
def test_nothing_left_to_change(host: Host, module: str) -> None:
    result = check_mode(host, module)
    problems = [f["title"] if "title" in f else f.get("message") for f in result.get("findings", [])]
    assert result["changed"] is False, f"{module} would still change: {result.get('actions') or result.get('changes')}"
    assert result["compliant"] is True, f"{module} is not compliant: {problems}"
    assert result.get("restart_pending", False) is False


def test_listener_certificate_is_valid(host: Host) -> None:
    result = check_mode(host, "certificate")
    threshold = role_options(host)["rdpfix_certificate_expiry_threshold_days"]
    certificate = result["certificate"]
    assert certificate["source"] in ("self_signed", "pinned"), certificate
    assert certificate["listener_thumbprint"] == certificate["thumbprint"]
    assert certificate["days_left"] > threshold
    assert certificate["expired"] is False
    assert certificate["server_auth"] is True
    assert certificate["key_state"] == "readable"


def test_rdp_client_completes_tls_handshake(host: Host) -> None:
    """The outside view: what an RDP client meets on the listener's port right now."""
    address = host.ansible.get_variables().get("ansible_host", host.backend.get_pytest_id())
    port = check_mode(host, "firewall")["firewall"]["server"]["port"]
    thumbprint = check_mode(host, "certificate")["certificate"]["thumbprint"]

    report = probe(
        address,
        port,
        checks=["tcp", "negotiation", "tls", "credssp"],
        expected_thumbprint=thumbprint,
        read_timeout=3.0,
    )

    critical = [f["id"] for f in report["findings"] if f["severity"] == "critical"]
    assert not critical, f"{address}:{port}: {critical}"
    assert report["verdict"] in CONNECTING_VERDICTS, report["verdict"]
    assert report["tls"]["negotiated"]["version"] in ("TLSv1.2", "TLSv1.3")
    assert report["tls"]["certificate"]["thumbprint"] == thumbprint
    assert "handshake.certificate_thumbprint_mismatch" not in {f["id"] for f in report["findings"]}
