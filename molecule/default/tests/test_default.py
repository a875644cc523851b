"""Verify a converged fleet through the hosts themselves and from the outside.

Inside, through testinfra's ansible backend, in check mode and with the options converge used (the role's defaults,
overridden by the inventory):
- rdpfix.rdp.certificate must have nothing left to do and say the listener uses a certificate valid well beyond the
  expiry threshold, with a readable private key;
- rdpfix.rdp.facts runs every fixing module's planner in one read: no module may have anything left to fix and no
  critical finding may remain. (Molecule's idempotence step already reran the role itself.)

Outside: an RDP client's view. The probe connects to the listener's port (as the host reports it), negotiates CredSSP
and must complete a TLS 1.2+ handshake presenting the very certificate the host says it uses - the connection that
failed with 0x904 / extended 0x7 before the fix.

Shared by the `default` (lab) and `windows` (real hosts) scenarios.
"""

from __future__ import annotations

import json
import os
import sys
import typing as t
from pathlib import Path

import yaml

if t.TYPE_CHECKING:
    from testinfra.host import Host

ROLE_DEFAULTS = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "roles" / "rdpfix_server" / "defaults" / "main.yml"

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


def certificate_args(options: dict[str, t.Any]) -> dict[str, t.Any]:
    """What roles/rdpfix_server/tasks/certificate.yml passes."""
    args = {
        "expiry_threshold_days": options["rdpfix_server_certificate_expiry_threshold_days"],
        "replace_when": options["rdpfix_server_certificate_replace_when"],
        "restart_service": options["rdpfix_server_restart_service"],
        "start_stopped_services": options["rdpfix_server_start_stopped_services"],
        "allow_session_disruption": options["rdpfix_server_allow_session_disruption"],
    }
    if options["rdpfix_server_certificate_replacement_thumbprint"]:
        args["replacement_thumbprint"] = options["rdpfix_server_certificate_replacement_thumbprint"]
    if options["rdpfix_server_backup_root"]:
        args["backup_root"] = options["rdpfix_server_backup_root"]
    return args


def facts_args(options: dict[str, t.Any]) -> dict[str, t.Any]:
    """The facts module plans with the fixing modules' planners: give it the options the role ran them with."""
    args = {
        "expiry_threshold_days": options["rdpfix_server_certificate_expiry_threshold_days"],
        "restart_service": options["rdpfix_server_restart_service"],
        "machinekeys_strategy": options["rdpfix_server_machinekeys_strategy"],
        "firewall_profiles": options["rdpfix_server_firewall_profiles"],
        "tls_legacy_protocols": options["rdpfix_server_tls_legacy_protocols"],
        "tls_nla": options["rdpfix_server_tls_nla"],
        # Only the server side is the role's business; the events are not needed to judge the present state.
        "transport_sides": ["server"],
        "event_days": 1,
        "max_events": 1,
    }
    if options["rdpfix_server_transport_mode"] != "keep":
        args["transport_mode"] = options["rdpfix_server_transport_mode"]
    return args


# One check-mode run per host and module, shared by the tests below: each is an `ansible` run and a WinRM round trip.
_results: dict[tuple[str, str], dict[str, t.Any]] = {}


def check_mode(host: Host, module: str) -> dict[str, t.Any]:
    key = (host.backend.get_pytest_id(), module)
    if key not in _results:
        options = role_options(host)
        args = certificate_args(options) if module == "certificate" else facts_args(options)
        _results[key] = host.ansible(f"rdpfix.rdp.{module}", json.dumps(args), check=True)
    return _results[key]


def test_certificate_module_has_nothing_left_to_change(host: Host) -> None:
    result = check_mode(host, "certificate")
    assert result["changed"] is False, f"the certificate module would still act: {result['actions']}"
    assert result["compliant"] is True, [finding.get("message") for finding in result["findings"]]
    assert result["restart_pending"] is False


def test_listener_certificate_is_valid(host: Host) -> None:
    result = check_mode(host, "certificate")
    threshold = role_options(host)["rdpfix_server_certificate_expiry_threshold_days"]
    certificate = result["certificate"]
    assert certificate["source"] in ("self_signed", "pinned"), certificate
    assert certificate["listener_thumbprint"] == certificate["thumbprint"]
    assert certificate["days_left"] > threshold
    assert certificate["expired"] is False
    assert certificate["server_auth"] is True
    assert certificate["key_state"] == "readable"


def test_no_module_has_anything_left_to_fix(host: Host) -> None:
    """The facts module runs every fixing module's planner with the role's options in one read."""
    result = check_mode(host, "facts")
    fixed_by = set(result["fixed_by"])
    if role_options(host)["rdpfix_server_transport_mode"] == "keep":
        fixed_by.discard("rdpfix.rdp.transport")  # the role leaves the transport policy alone by default
    critical = [finding["title"] for finding in result["findings"] if finding["severity"] == "critical"]
    assert not fixed_by, [finding["title"] for finding in result["findings"] if finding.get("fix")]
    assert not critical


def test_rdp_client_completes_tls_handshake(host: Host) -> None:
    """The outside view: what an RDP client meets on the listener's port right now."""
    address = host.ansible.get_variables().get("ansible_host", host.backend.get_pytest_id())
    port = check_mode(host, "facts")["rdp"]["remote_desktop"]["port"]
    thumbprint = check_mode(host, "certificate")["certificate"]["thumbprint"]

    report = probe(
        address,
        port,
        checks=["tcp", "negotiation", "tls", "credssp"],
        expected_thumbprint=thumbprint,
        read_timeout=3.0,
    )

    critical = [finding["id"] for finding in report["findings"] if finding["severity"] == "critical"]
    assert not critical, f"{address}:{port}: {critical}"
    assert report["verdict"] in CONNECTING_VERDICTS, report["verdict"]
    assert report["tls"]["negotiated"]["version"] in ("TLSv1.2", "TLSv1.3")
    assert report["tls"]["certificate"]["thumbprint"] == thumbprint
    assert "handshake.certificate_thumbprint_mismatch" not in {finding["id"] for finding in report["findings"]}
