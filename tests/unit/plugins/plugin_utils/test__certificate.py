"""The certificate planner, fed agent results built from real certificates: no connection involved."""

from __future__ import annotations

import base64
import json
import typing as t
from datetime import UTC, datetime

import pytest
from cryptography import x509

from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import BackupSet
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import BatchResult, OpResult
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._certificate import (
    CertificateOptions,
    HostState,
    PlanError,
    ReadIndex,
    VerifyIndex,
    build_apply_batch,
    build_read_batch,
    describe,
    diff_view,
    normalize_thumbprint,
    parse_state,
    plan,
    predicted_view,
    refresh_state,
    verification_problems,
)

NOW = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)
GUID = "5d3c1a52-0000-4000-8000-00000000c0de"
RDP_KEY_PATH = f"C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys\\f686aace6942fb7f7ceb231212eef4a4_{GUID}"
# Owner SYSTEM; SYSTEM full, NETWORK SERVICE read, Administrators read: the default RDP key ACL on older builds.
READABLE_SDDL = "O:SYG:SYD:P(A;;FA;;;SY)(A;;FR;;;NS)(A;;FR;;;BA)"
UNREADABLE_SDDL = "O:SYG:SYD:P(A;;FA;;;SY)(A;;FA;;;BA)"
CLIENT_AUTH = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
ALL_RUNNING = {
    name: {"exists": True, "status": "Running", "start_type": "Automatic"}
    for name in ("CertPropSvc", "KeyIso", "CryptSvc", "SessionEnv", "TermService", "UmRdpService")
}


def agent_cert(der: bytes, *, key: str = "readable", key_path: str = RDP_KEY_PATH) -> dict[str, t.Any]:
    """A cert.list entry; ``key`` is readable, unreadable, gone (linked but file missing) or none."""
    entry: dict[str, t.Any] = {
        "thumbprint": thumbprint(der),
        "der_b64": base64.b64encode(der).decode(),
        "has_private_key": key != "none",
        "key": None,
    }
    if key != "none":
        entry["key"] = {
            "provider_kind": "capi",
            "provider_name": "Microsoft Enhanced RSA and AES Cryptographic Provider",
            "container": "TSSecKeySet1",
            "path": key_path,
            "exists": key != "gone",
            "size": 1500 if key != "gone" else None,
            "owner": "S-1-5-18",
            "sddl": UNREADABLE_SDDL if key == "unreadable" else READABLE_SDDL,
        }
    return entry


def thumbprint(der: bytes) -> str:
    import hashlib

    return hashlib.sha1(der).hexdigest().upper()


def read_result(
    options: CertificateOptions,
    *,
    rd: t.Sequence[dict[str, t.Any]] = (),
    my: t.Sequence[dict[str, t.Any]] = (),
    pin: str | None = None,
    listener_hash: str | None = None,
    hash_type: int | None = None,
    services: dict[str, dict[str, t.Any]] | None = None,
    sessions: t.Sequence[dict[str, t.Any]] = (),
    broker: bool = False,
    failing: t.Collection[str] = (),
) -> tuple[BatchResult, ReadIndex]:
    """The results of the real read batch for a host described by the arguments."""
    batch, index = build_read_batch(options)
    if listener_hash is None:
        listener_hash = pin or (rd[0]["thumbprint"] if rd else None)
    if hash_type is None:
        hash_type = 3 if pin else (1 if listener_hash else 0)
    answers: dict[str, dict[str, t.Any]] = {
        "system.info": {
            "hostname": "WEB01",
            "fqdn": "web01.corp.example",
            "domain": "corp.example",
            "connection_broker": broker,
            "program_data": "C:\\ProgramData",
            "machine_guid": GUID,
        },
        "listener.get": {
            "terminal_name": "RDP-Tcp",
            "ssl_certificate_sha1_hash": listener_hash,
            "ssl_certificate_sha1_hash_type": hash_type,
        },
        "registry.get": {
            "exists": True,
            "values": {"SSLCertificateSHA1Hash": {"type": "REG_BINARY", "value": pin.lower()}} if pin else {},
            "subkeys": [],
        },
        "service.get": {"services": services if services is not None else ALL_RUNNING},
        "session.list": {"sessions": list(sessions)},
    }
    results = []
    for op in batch.ops:
        name = op["op"]
        if name in failing or f"{name}:{op['args'].get('store', '')}" in failing:
            results.append(OpResult(op=name, ok=False, error_type="AccessDenied", error_message="denied"))
            continue
        if name == "cert.list":
            store = op["args"]["store"]
            certificates = list(rd if store == "Remote Desktop" else my)
            data: dict[str, t.Any] = {"store": store, "exists": True, "certificates": certificates}
        else:
            data = answers[name]
        results.append(OpResult(op=name, ok=True, data=data))
    return BatchResult(host="web01", results=results), index


def state_of(options: CertificateOptions, **host: t.Any) -> HostState:
    result, index = read_result(options, **host)
    return parse_state(result, index, NOW)


def ids(findings: t.Iterable[dict[str, t.Any]]) -> list[str]:
    """The findings' ids without the ``certificate.`` every one of them starts with."""
    assert all(finding["id"].startswith("certificate.") for finding in findings)
    return [finding["id"].removeprefix("certificate.") for finding in findings]


OPTIONS = CertificateOptions()


# -------------------------------------------------------------------------------------------- options


def test_thumbprint_copied_from_the_windows_dialog_is_normalized() -> None:
    assert normalize_thumbprint("\u200e3f 2a:9c01b7d4e5f60718293a4b5c6d7e8f901234") == (
        "3F2A9C01B7D4E5F60718293A4B5C6D7E8F901234"
    )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"replacement_thumbprint": "XYZ"}, "is not a certificate thumbprint"),
        ({"expiry_threshold_days": -1}, "between 0 and 3650"),
        ({"terminal_name": "RDP\\Tcp"}, "not a WinStation name"),
        ({"replace_when": "always"}, "needs replacement_thumbprint"),
    ],
)
def test_bad_options_are_rejected(params: t.Any, message: t.Any) -> None:
    with pytest.raises(PlanError, match=message):
        CertificateOptions.from_params(params)


# -------------------------------------------------------------------------------------------- self-signed


def test_healthy_host_needs_nothing(cert_factory: t.Any) -> None:
    der = cert_factory.make("WEB01", now=NOW, days_left=150)
    state = state_of(OPTIONS, rd=[agent_cert(der)])
    decided = plan(state, OPTIONS)
    assert not decided.has_changes
    assert decided.problems() == []
    report = describe(state, 30)
    assert report["source"] == "self_signed"
    assert report["thumbprint"] == thumbprint(der)
    assert report["key_readable"] is True
    assert report["days_left"] == 150


def test_expired_self_signed_is_removed_and_regenerated_with_sessionenv(cert_factory: t.Any) -> None:
    der = cert_factory.make("WEB01", now=NOW, days_left=-10)
    state = state_of(OPTIONS, rd=[agent_cert(der)], sessions=[{"id": 2, "user": "alice", "state": "Active"}])
    decided = plan(state, OPTIONS)
    assert ids(decided.findings) == ["self_signed_expired"]
    assert [cert.thumbprint for cert in decided.remove_certificates] == [thumbprint(der)]
    assert decided.restart_service == "SessionEnv"  # keeps alice's session: no pending restart
    assert not decided.restart_pending
    assert [action.id for action in decided.actions] == ["remove_certificate", "restart_service"]
    # The shared finding shape (docs/findings.md): broken now is critical, and the fix names what the plan does.
    (expired,) = decided.findings
    assert expired["severity"] == "critical" and expired["cause"] == "certificate"
    assert expired["title"].startswith("The self-signed certificate ") and "expired 10 day(s) ago" in expired["title"]
    assert expired["evidence"]["thumbprint"] == thumbprint(der) and expired["evidence"]["days_left"] == -10
    assert expired["fix"] == {
        "module": "rdpfix.rdp.certificate",
        "options": {},
        "description": "; ".join(action.description for action in decided.actions),
    }


@pytest.mark.parametrize(("days_left", "threshold", "regenerate"), [(10, 30, True), (10, 9, False), (30, 30, True)])
def test_expiry_threshold(cert_factory: t.Any, days_left: t.Any, threshold: t.Any, regenerate: t.Any) -> None:
    options = CertificateOptions(expiry_threshold_days=threshold)
    der = cert_factory.make("WEB01", now=NOW, days_left=days_left + 0.5)
    decided = plan(state_of(options, rd=[agent_cert(der)]), options)
    assert decided.regenerate is regenerate
    assert ("self_signed_expiring" in ids(decided.findings)) is regenerate
    # Expiring still works today: a warning, never critical.
    assert {finding["severity"] for finding in decided.findings} <= {"warning"}


def test_missing_self_signed_only_needs_the_restart() -> None:
    decided = plan(state_of(OPTIONS, rd=[]), OPTIONS)
    assert ids(decided.findings) == ["self_signed_missing"]
    assert decided.remove_certificates == []
    assert [action.id for action in decided.actions] == ["restart_service"]


def test_orphaned_self_signed_without_key_is_removed(cert_factory: t.Any) -> None:
    der = cert_factory.make("WEB01", now=NOW, days_left=100)
    decided = plan(state_of(OPTIONS, rd=[agent_cert(der, key="gone")]), OPTIONS)
    assert ids(decided.findings) == ["self_signed_no_private_key"]
    assert [cert.thumbprint for cert in decided.remove_certificates] == [thumbprint(der)]


def test_unreadable_key_is_reported_not_regenerated(cert_factory: t.Any) -> None:
    der = cert_factory.make("WEB01", now=NOW, days_left=100)
    decided = plan(state_of(OPTIONS, rd=[agent_cert(der, key="unreadable")]), OPTIONS)
    assert ids(decided.findings) == ["self_signed_key_unreadable"]
    assert "machinekeys" in decided.findings[0]["title"]
    assert not decided.has_changes


def test_regeneration_disabled_only_reports(cert_factory: t.Any) -> None:
    options = CertificateOptions(regenerate_self_signed=False)
    der = cert_factory.make("WEB01", now=NOW, days_left=-1)
    decided = plan(state_of(options, rd=[agent_cert(der)]), options)
    assert "self_signed_expired" in ids(decided.findings)
    assert not decided.has_changes


def test_stopped_prerequisite_blocks_regeneration(cert_factory: t.Any) -> None:
    services = {**ALL_RUNNING, "KeyIso": {"exists": True, "status": "Stopped", "start_type": "Manual"}}
    der = cert_factory.make("WEB01", now=NOW, days_left=-1)
    decided = plan(state_of(OPTIONS, rd=[agent_cert(der)], services=services), OPTIONS)
    assert not decided.has_changes
    blocked = next(finding for finding in decided.findings if finding["id"] == "certificate.regeneration_blocked")
    assert "KeyIso is Stopped" in blocked["title"]
    assert blocked["severity"] == "critical" and blocked["fix"] is None


def test_stopped_prerequisite_is_started_when_allowed(cert_factory: t.Any) -> None:
    options = CertificateOptions(start_stopped_services=True)
    services = {**ALL_RUNNING, "KeyIso": {"exists": True, "status": "Stopped", "start_type": "Manual"}}
    der = cert_factory.make("WEB01", now=NOW, days_left=-1)
    decided = plan(state_of(options, rd=[agent_cert(der)], services=services), options)
    assert [action.id for action in decided.actions] == ["start_service", "remove_certificate", "restart_service"]
    assert decided.start_services == ["KeyIso"]


def test_disabled_prerequisite_is_never_started(cert_factory: t.Any) -> None:
    options = CertificateOptions(start_stopped_services=True)
    services = {**ALL_RUNNING, "CryptSvc": {"exists": True, "status": "Stopped", "start_type": "Disabled"}}
    der = cert_factory.make("WEB01", now=NOW, days_left=-1)
    decided = plan(state_of(options, rd=[agent_cert(der)], services=services), options)
    assert not decided.has_changes
    assert "CryptSvc is disabled" in decided.findings[-1]["title"]


# -------------------------------------------------------------------------------------------- sessions


SESSIONS = [
    {"id": 0, "user": "", "state": "Disconnected", "station": "Services"},
    {"id": 1, "user": "", "state": "Connected", "station": "Console"},
    {"id": 65536, "user": "", "state": "Listen", "station": "RDP-Tcp"},
    {"id": 2, "user": "alice", "state": "Active", "station": "RDP-Tcp#4"},
    {"id": 3, "user": "bob", "state": "Disconnected", "station": ""},
]


def test_termservice_restart_with_sessions_is_left_pending(cert_factory: t.Any) -> None:
    options = CertificateOptions(restart_service="TermService")
    der = cert_factory.make("WEB01", now=NOW, days_left=-1)
    decided = plan(state_of(options, rd=[agent_cert(der)], sessions=SESSIONS), options)
    assert decided.restart_pending
    assert not decided.has_changes  # removing the cert without the restart would leave the listener with none
    assert [action.id for action in decided.pending] == ["remove_certificate", "restart_service"]
    pending = next(finding for finding in decided.findings if finding["id"] == "certificate.restart_pending")
    assert "disconnect 2 RDP session(s)" in pending["title"] and "alice (Active)" in pending["title"]
    # Nothing is changed, so nothing is offered as fixed by this run.
    assert [finding["fix"] for finding in decided.findings] == [None] * len(decided.findings)


def test_termservice_restart_allowed_to_disrupt_sessions(cert_factory: t.Any) -> None:
    options = CertificateOptions(restart_service="TermService", allow_session_disruption=True)
    der = cert_factory.make("WEB01", now=NOW, days_left=-1)
    decided = plan(state_of(options, rd=[agent_cert(der)], sessions=SESSIONS), options)
    assert decided.restart_service == "TermService"
    assert not decided.restart_pending


def test_services_session_and_console_logon_screen_do_not_block_termservice(cert_factory: t.Any) -> None:
    options = CertificateOptions(restart_service="TermService")
    der = cert_factory.make("WEB01", now=NOW, days_left=-1)
    decided = plan(state_of(options, rd=[agent_cert(der)], sessions=SESSIONS[:3]), options)
    assert decided.restart_service == "TermService"


# -------------------------------------------------------------------------------------------- pinned


def test_missing_pin_is_removed_and_the_service_restarted(cert_factory: t.Any) -> None:
    rd_der = cert_factory.make("WEB01", now=NOW, days_left=150)
    missing = "AB" * 20
    state = state_of(OPTIONS, rd=[agent_cert(rd_der)], pin=missing)
    assert state.pinned_thumbprint == missing
    decided = plan(state, OPTIONS)
    assert ids(decided.findings) == ["pinned_missing"]
    # The listener falls back to the self-signed certificate, so RDP works: a warning, fixed by this plan.
    assert decided.findings[0]["severity"] == "warning" and decided.findings[0]["fix"] is not None
    assert decided.remove_pin and decided.restart_service == "SessionEnv"
    assert describe(state, 30)["source"] == "self_signed"  # the listener already falls back


def test_missing_pin_is_never_removed_on_a_connection_broker(cert_factory: t.Any) -> None:
    rd_der = cert_factory.make("WEB01", now=NOW, days_left=150)
    decided = plan(state_of(OPTIONS, rd=[agent_cert(rd_der)], pin="AB" * 20, broker=True), OPTIONS)
    assert not decided.remove_pin and not decided.has_changes
    assert "connection_broker_pin" in ids(decided.problems())


def test_unknown_broker_role_counts_as_broker(cert_factory: t.Any) -> None:
    rd_der = cert_factory.make("WEB01", now=NOW, days_left=150)
    state = state_of(OPTIONS, rd=[agent_cert(rd_der)], pin="AB" * 20, failing=["system.info"])
    assert state.connection_broker
    assert not plan(state, OPTIONS).has_changes  # and nothing at all happens on a partial read


def test_missing_pin_kept_when_asked(cert_factory: t.Any) -> None:
    options = CertificateOptions(remove_missing_pin=False)
    rd_der = cert_factory.make("WEB01", now=NOW, days_left=150)
    decided = plan(state_of(options, rd=[agent_cert(rd_der)], pin="AB" * 20), options)
    assert not decided.has_changes


@pytest.mark.parametrize(
    ("make_args", "key", "finding"),
    [
        ({"days_left": -3}, "readable", "pinned_expired"),
        ({"eku": [CLIENT_AUTH]}, "readable", "pinned_wrong_eku"),
        ({}, "none", "pinned_no_private_key"),
        ({}, "unreadable", "pinned_key_unreadable"),
    ],
)
def test_unusable_pin_is_reported_only(cert_factory: t.Any, make_args: t.Any, key: t.Any, finding: t.Any) -> None:
    pinned = cert_factory.make("web01.corp.example", now=NOW, ca_issued=True, **make_args)
    rd_der = cert_factory.make("WEB01", now=NOW, days_left=150)
    state = state_of(OPTIONS, rd=[agent_cert(rd_der)], my=[agent_cert(pinned, key=key)], pin=thumbprint(pinned))
    decided = plan(state, OPTIONS)
    assert finding in ids(decided.problems())
    assert not decided.has_changes


def test_expired_pin_falls_back_so_an_expired_self_signed_certificate_is_repaired(cert_factory: t.Any) -> None:
    pinned = cert_factory.make("web01.corp.example", now=NOW, ca_issued=True, days_left=-3)
    rd_der = cert_factory.make("WEB01", now=NOW, days_left=-2)
    state = state_of(OPTIONS, rd=[agent_cert(rd_der)], my=[agent_cert(pinned)], pin=thumbprint(pinned))
    decided = plan(state, OPTIONS)
    [pin_finding] = [item for item in decided.findings if item["id"] == "certificate.pinned_expired"]
    assert "falls back to the self-signed certificate" in pin_finding["title"]
    assert {"pinned_expired", "self_signed_expired"} <= set(ids(decided.problems()))
    assert decided.regenerate and [cert.thumbprint for cert in decided.remove_certificates] == [thumbprint(rd_der)]


def test_expired_pin_replaced_by_a_valid_certificate(cert_factory: t.Any) -> None:
    expired = cert_factory.make("web01.corp.example", now=NOW, ca_issued=True, days_left=-3)
    fresh = cert_factory.make("web01.corp.example", now=NOW, ca_issued=True, days_left=365)
    options = CertificateOptions(replacement_thumbprint=thumbprint(fresh))
    rd_der = cert_factory.make("WEB01", now=NOW, days_left=150)
    state = state_of(
        options, rd=[agent_cert(rd_der)], my=[agent_cert(expired), agent_cert(fresh)], pin=thumbprint(expired)
    )
    # An expired pin is not presented: RCM logs 1053 and uses the self-signed certificate from then on.
    assert describe(state, 30)["source"] == "self_signed"
    assert describe(state, 30)["thumbprint"] == thumbprint(rd_der)
    decided = plan(state, options)
    assert decided.set_pin is not None and decided.set_pin.thumbprint == thumbprint(fresh)
    assert [action.id for action in decided.actions] == ["set_pin"]  # the listener reads it per connection
    assert decided.restart_service is None
    assert predicted_view(state, options, decided)["thumbprint"] == thumbprint(fresh)


@pytest.mark.parametrize(
    ("make_args", "key", "reason"),
    [
        ({"days_left": -1}, "readable", "expired"),
        ({"days_left": 20}, "readable", "within the 30-day threshold"),
        ({"eku": [CLIENT_AUTH]}, "readable", "lacks both"),
        ({}, "none", "has no private key"),
    ],
)
def test_unusable_replacement_fails_before_any_change(
    cert_factory: t.Any, make_args: t.Any, key: t.Any, reason: t.Any
) -> None:
    expired = cert_factory.make("web01.corp.example", now=NOW, ca_issued=True, days_left=-3)
    candidate = cert_factory.make("web01.corp.example", now=NOW, ca_issued=True, **make_args)
    options = CertificateOptions(replacement_thumbprint=thumbprint(candidate))
    state = state_of(options, my=[agent_cert(expired), agent_cert(candidate, key=key)], pin=thumbprint(expired))
    with pytest.raises(PlanError, match=reason):
        plan(state, options)


def test_replacement_absent_from_my_fails(cert_factory: t.Any) -> None:
    options = CertificateOptions(replacement_thumbprint="CD" * 20)
    with pytest.raises(PlanError, match="is missing"):
        plan(state_of(options, pin="AB" * 20), options)


def test_replace_always_pins_a_ca_certificate_and_warns_about_the_name(cert_factory: t.Any) -> None:
    rd_der = cert_factory.make("WEB01", now=NOW, days_left=150)
    ca_der = cert_factory.make("other.corp.example", now=NOW, ca_issued=True, days_left=365)
    options = CertificateOptions(replacement_thumbprint=thumbprint(ca_der), replace_when="always")
    decided = plan(state_of(options, rd=[agent_cert(rd_der)], my=[agent_cert(ca_der)]), options)
    assert decided.set_pin is not None
    assert "replacement_name_mismatch" in ids(decided.findings)


def test_available_ca_certificate_is_suggested(cert_factory: t.Any) -> None:
    rd_der = cert_factory.make("WEB01", now=NOW, days_left=150)
    ca_der = cert_factory.make("web01.corp.example", now=NOW, ca_issued=True, days_left=365)
    decided = plan(state_of(OPTIONS, rd=[agent_cert(rd_der)], my=[agent_cert(ca_der)]), OPTIONS)
    assert ids(decided.findings) == ["ca_certificate_available"]
    assert decided.findings[0]["severity"] == "info"


def test_gpo_template_certificate_is_reported_not_changed(cert_factory: t.Any) -> None:
    template = cert_factory.make("web01.corp.example", now=NOW, ca_issued=True, days_left=5)
    state = state_of(OPTIONS, my=[agent_cert(template)], listener_hash=thumbprint(template), hash_type=2)
    decided = plan(state, OPTIONS)
    assert describe(state, 30)["source"] == "gpo_template"
    assert ids(decided.findings) == ["template_expiring"]
    assert not decided.has_changes


def test_failed_read_means_no_change(cert_factory: t.Any) -> None:
    der = cert_factory.make("WEB01", now=NOW, days_left=-5)
    state = state_of(OPTIONS, rd=[agent_cert(der)], failing=["cert.list:My"])
    decided = plan(state, OPTIONS)
    assert not decided.has_changes
    assert "read_failed" in ids(decided.problems())


def test_unparseable_certificate_in_the_store_is_regenerated() -> None:
    not_a_certificate = base64.b64encode(b"\x30\x03\x02\x01\x01").decode()
    bogus = {"thumbprint": "EE" * 20, "der_b64": not_a_certificate, "has_private_key": False}
    state = state_of(OPTIONS, rd=[bogus])
    assert state.self_signed[0].parse_error
    decided = plan(state, OPTIONS)
    assert [cert.thumbprint for cert in decided.remove_certificates] == ["EE" * 20]


# -------------------------------------------------------------------------------------------- apply batch


def test_apply_batch_backs_up_before_anything_destructive(cert_factory: t.Any) -> None:
    expired = cert_factory.make("WEB01", now=NOW, days_left=-10)
    options = CertificateOptions()
    state = state_of(options, rd=[agent_cert(expired)], pin="AB" * 20)
    decided = plan(state, options)
    backup = BackupSet.create("certificate", "WEB01", "C:\\ProgramData\\rdpfix\\backups", NOW)
    batch, index = build_apply_batch(state, options, decided, backup)
    # First the guards: what the plan relied on, checked before anything is written (_guards).
    labels = [item["args"]["label"] for item in batch.ops[: len(index.guards)]]
    assert index.guards == list(range(len(labels)))
    assert labels == [
        f"certificate {thumbprint(expired)} in Remote Desktop is the one the plan saw",
        f"the RDP-Tcp listener still uses certificate {'AB' * 20}",
        "the values SSLCertificateSHA1Hash of " + options.winstation_key + " are the ones the plan saw",
        "the services CertPropSvc, CryptSvc, KeyIso, SessionEnv are as the plan saw them",
    ]
    g = len(index.guards)
    ops = [item["op"] for item in batch.ops[g:]]
    assert batch.on_error == "stop"
    assert ops == [
        "dir.create",
        "file.write",  # certificate DER
        "file.copy",  # its key file
        "file.write",  # manifest.json
        "cert.remove",
        "registry.remove",
        "service.restart",
        "file.write",  # manifest.json again: the done-record
        "util.sleep",
        "listener.get",
        "registry.get",
        "cert.list",
    ]
    assert index.manifest == g + 3
    assert batch.ops[g]["args"]["path"] == backup.directory
    assert batch.ops[g]["args"]["sddl"].startswith("O:BAG:SYD:P")  # not inherited from ProgramData
    assert base64.b64decode(batch.ops[g + 1]["args"]["content_b64"]) == expired
    assert batch.ops[g + 2]["args"] == {"src": RDP_KEY_PATH, "dest": f"{backup.directory}\\{thumbprint(expired)}.key"}
    manifest = json.loads(base64.b64decode(batch.ops[g + 3]["args"]["content_b64"]))
    assert batch.ops[g + 3]["args"]["path"].endswith("\\manifest.json")
    assert manifest["id"] == backup.manifest_id and manifest["module"] == "rdpfix.rdp.certificate"
    assert [item["kind"] for item in manifest["items"]] == ["certificate", "private_key_file", "registry_value"]
    # The key file's ACL and owner as read: a restore gives the key back exactly (a copy would get a new ACL).
    assert manifest["items"][1]["sddl"] == state.self_signed[0].key["sddl"]
    assert "owner" in manifest["items"][1]
    assert manifest["items"][2]["previous"] == {"type": "REG_BINARY", "value": "ab" * 20}
    assert batch.ops[g + 6]["args"] == {"name": "SessionEnv", "force": False}
    assert [position for position, _action in index.actions] == [g + 4, g + 5, g + 6]
    # What was done, per item (version 2): the removed certificate and the pin are carried out by the batch, planned
    # before the changes and done in the done-record after them; the key file's copy is a backup only.
    assert manifest["v"] == 2
    assert [item.get("status") for item in manifest["items"]] == ["planned", None, "planned"]
    done = json.loads(base64.b64decode(batch.ops[g + 7]["args"]["content_b64"]))
    assert batch.ops[g + 7]["args"]["path"] == batch.ops[g + 3]["args"]["path"]
    assert [item.get("status") for item in done["items"]] == ["done", None, "done"]
    assert {k: v for k, v in done.items() if k != "items"} == {k: v for k, v in manifest.items() if k != "items"}
    # The result's backup value: each item's status from the batch's own results.
    results = [OpResult(op["op"], True, {}) for op in batch.ops]
    results[g + 5] = OpResult("registry.remove", False, error_type="AccessDenied", error_message="denied")
    results[g + 6 :] = [OpResult(op["op"], False, skipped=True) for op in batch.ops[g + 6 :]]
    statuses = [item.get("status") for item in backup.summary(BatchResult("WEB01", results))["items"]]
    assert statuses == ["done", None, "failed"]
    cut = [*results[: g + 5], *(OpResult(op["op"], False, skipped=True) for op in batch.ops[g + 5 :])]
    assert [item.get("status") for item in backup.summary(BatchResult("WEB01", cut))["items"]] == [
        "done",
        None,
        "not_run",
    ]


def test_manifest_id_format() -> None:
    backup = BackupSet.create("certificate", "WEB01", "D:\\bk", NOW)
    assert backup.manifest_id.startswith("20261125T100000Z-certificate-")
    # The milliseconds (three hex digits) and two random ones: ids of the same second sort in the order made.
    assert len(backup.manifest_id.rsplit("-", 1)[1]) == 5
    assert backup.directory == f"D:\\bk\\{backup.manifest_id}"


# -------------------------------------------------------------------------------------------- verification


def _verify_result(
    index: VerifyIndex, listener_hash: str | None, rd: list[dict[str, t.Any]], pin: str | None = None
) -> BatchResult:
    results = [OpResult(op="x", ok=True)] * (max(index.listener, index.registry, index.self_signed) + 1)
    results = list(results)
    results[index.listener] = OpResult(
        op="listener.get",
        ok=True,
        data={"ssl_certificate_sha1_hash": listener_hash, "ssl_certificate_sha1_hash_type": 1},
    )
    values = {"SSLCertificateSHA1Hash": {"type": "REG_BINARY", "value": pin}} if pin else {}
    results[index.registry] = OpResult(op="registry.get", ok=True, data={"exists": True, "values": values})
    results[index.self_signed] = OpResult(op="cert.list", ok=True, data={"certificates": rd})
    return BatchResult(host="web01", results=results)


def test_verification_waits_for_the_new_certificate_and_the_listener(cert_factory: t.Any) -> None:
    expired = cert_factory.make("WEB01", now=NOW, days_left=-10)
    fresh = cert_factory.make("WEB01", now=NOW, days_left=180, days_old=0)
    state = state_of(OPTIONS, rd=[agent_cert(expired)])
    decided = plan(state, OPTIONS)
    _batch, index = build_apply_batch(state, OPTIONS, decided, BackupSet.create("certificate", "WEB01", "C:\\b", NOW))

    not_yet = refresh_state(state, _verify_result(index.verify, None, []), index.verify, NOW)
    assert verification_problems(state, not_yet, OPTIONS, decided) == [
        "no new self-signed certificate in LocalMachine\\Remote Desktop yet"
    ]
    listener_lags = refresh_state(
        state, _verify_result(index.verify, thumbprint(expired), [agent_cert(fresh)]), index.verify, NOW
    )
    assert "the listener reports" in verification_problems(state, listener_lags, OPTIONS, decided)[0]
    done = refresh_state(state, _verify_result(index.verify, thumbprint(fresh), [agent_cert(fresh)]), index.verify, NOW)
    assert verification_problems(state, done, OPTIONS, decided) == []
    assert diff_view(done, 30)["thumbprint"] == thumbprint(fresh)
    assert diff_view(state, 30)["thumbprint"] == thumbprint(expired)


# -------------------------------------------------------------------------------------------- renewal of a pin

CNG_KEY = "C:\\ProgramData\\Microsoft\\Crypto\\Keys\\renewal-key"


def pinned_with_renewal(
    cert_factory: t.Any, *, renewal_key: str = "unreadable", subject: str = "web01.corp.example", days_left: int = 340
) -> tuple[dict[str, t.Any], dict[str, t.Any], dict[str, t.Any]]:
    """The pinned CA certificate expired 5 days ago, its renewal and the self-signed certificate (cert.list entries)."""
    pinned = agent_cert(cert_factory.make("web01.corp.example", now=NOW, days_left=-5, days_old=365, ca_issued=True))
    renewal = agent_cert(
        cert_factory.make(subject, now=NOW, days_left=days_left, days_old=25, ca_issued=True),
        key=renewal_key,
        key_path=CNG_KEY,
    )
    self_signed = agent_cert(cert_factory.make("WEB01", now=NOW, days_left=150))
    return pinned, renewal, self_signed


def renewal_finding(findings: list[dict[str, t.Any]]) -> dict[str, t.Any]:
    [item] = [item for item in findings if item["id"] == "certificate.pinned_renewal_available"]
    return item


def test_the_renewal_of_an_expired_pin_is_reported_with_what_blocks_it(cert_factory: t.Any) -> None:
    pinned, renewal, self_signed = pinned_with_renewal(cert_factory)
    state = state_of(OPTIONS, rd=[self_signed], my=[pinned, renewal], pin=pinned["thumbprint"])
    result = plan(state, OPTIONS)
    found = renewal_finding(result.findings)
    assert found["evidence"]["renewal"]["thumbprint"] == renewal["thumbprint"]
    assert found["evidence"]["blocked_by"] == [f"NETWORK SERVICE cannot read its private key file {CNG_KEY}"]
    assert found["fix"]["options"] == {"repin_renewal": True}
    assert result.set_pin is None and result.grant_key_read is None


@pytest.mark.parametrize(
    ("subject", "days_left"),
    [("other.corp.example", 340), ("web01.corp.example", -1)],
    ids=["another subject", "expired too"],
)
def test_only_a_valid_certificate_of_the_same_subject_is_a_renewal(
    cert_factory: t.Any, subject: str, days_left: int
) -> None:
    pinned, renewal, self_signed = pinned_with_renewal(cert_factory, subject=subject, days_left=days_left)
    state = state_of(OPTIONS, rd=[self_signed], my=[pinned, renewal], pin=pinned["thumbprint"])
    assert "pinned_renewal_available" not in ids(plan(state, OPTIONS).findings)


def test_repin_renewal_grants_network_service_read_on_that_key_and_pins_it(cert_factory: t.Any) -> None:
    pinned, renewal, self_signed = pinned_with_renewal(cert_factory)
    options = CertificateOptions(repin_renewal=True)
    state = state_of(options, rd=[self_signed], my=[pinned, renewal], pin=pinned["thumbprint"])
    result = plan(state, options)
    assert result.set_pin is not None and result.set_pin.thumbprint == renewal["thumbprint"]
    assert result.grant_key_read is not None
    assert result.grant_key_read.previous_sddl == UNREADABLE_SDDL
    assert result.grant_key_read.sddl == "O:SYG:SYD:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;FR;;;NS)"
    assert [action.id for action in result.actions] == ["grant_key_read", "set_pin"]
    assert renewal_finding(result.findings)["fix"]["options"] == {}
    backup = BackupSet.create("certificate", "WEB01", "C:\\ProgramData\\rdpfix\\backups", NOW)
    batch, index = build_apply_batch(state, options, result, backup)
    names = [op["op"] for op in batch.ops]
    # The key file is saved (with its ACL in the manifest) before the manifest; then the ACL, then the pin.
    assert names.index("file.copy") < index.manifest < names.index("acl.set") < names.index("listener.set_certificate")
    saved = next(item for item in backup.items if item["kind"] == "private_key_file")
    assert saved["source"] == CNG_KEY and saved["sddl"] == UNREADABLE_SDDL
    assert index.verify.personal is not None, "My is re-read to verify the grant"


def test_a_renewal_no_grant_can_help_is_refused_when_asked(cert_factory: t.Any) -> None:
    pinned, renewal, self_signed = pinned_with_renewal(cert_factory, renewal_key="gone")
    state = state_of(OPTIONS, rd=[self_signed], my=[pinned, renewal], pin=pinned["thumbprint"])
    found = renewal_finding(plan(state, OPTIONS).findings)
    assert found["fix"] is None and "no private key" in found["title"]
    with pytest.raises(PlanError, match="repin_renewal"):
        plan(state, CertificateOptions(repin_renewal=True))


def test_replacement_thumbprint_wins_over_the_renewal(cert_factory: t.Any) -> None:
    pinned, renewal, self_signed = pinned_with_renewal(cert_factory)
    other_der = cert_factory.make("web01.corp.example", now=NOW, days_left=200, ca_issued=True)
    other = agent_cert(other_der, key_path=CNG_KEY)
    options = CertificateOptions(replacement_thumbprint=other["thumbprint"], repin_renewal=True)
    state = state_of(options, rd=[self_signed], my=[pinned, renewal, other], pin=pinned["thumbprint"])
    result = plan(state, options)
    assert result.set_pin is not None and result.set_pin.thumbprint == other["thumbprint"]
    assert result.grant_key_read is None
    assert renewal_finding(result.findings)["fix"] is None
