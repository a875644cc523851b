"""Windows behaviours of the model: renewal, fallback, session drop, unreadable keys, rdp_view, faults, snapshots."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from rdplab.model import schannel
from rdplab.model.errors import OpError
from rdplab.model.events import RCM, SCHANNEL
from rdplab.model.host import WindowsHost
from rdplab.model.listener import PROTOCOL_HYBRID, PROTOCOL_HYBRID_EX, PROTOCOL_SSL

HOSTS = Path(__file__).resolve().parent.parent / "hosts"
RDP_TCP = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations\\RDP-Tcp"
POLICY = "HKLM:\\SOFTWARE\\Policies\\Microsoft\\Windows NT\\Terminal Services"


def load(name: str) -> WindowsHost:
    return WindowsHost.from_file(HOSTS / f"{name}.yml")


def rd_thumbprints(host: WindowsHost) -> list[str]:
    return [cert.thumbprint for cert in host.stores.entries("Remote Desktop")]


def rcm_ids(host: WindowsHost) -> list[int]:
    return host.events.ids(RCM)


def presented_thumbprint(host: WindowsHost) -> str | None:
    view = host.rdp_view()
    if view.cert_pem is None:
        return None
    cert = x509.load_pem_x509_certificate(view.cert_pem)
    # Windows thumbprints are the SHA-1 of the DER bytes.
    return cert.fingerprint(hashes.SHA1()).hex().upper()


# -- self-signed renewal -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["SessionEnv", "TermService"])
def test_restart_renews_expired_selfsigned(service: str) -> None:
    host = load("expired-selfsigned")
    before = rd_thumbprints(host)
    assert host.rdp_view().failure == "reset_after_x224"
    host.restart_service(service, force=True)
    after = rd_thumbprints(host)
    assert len(after) == 1 and after != before
    [cert] = host.stores.entries("Remote Desktop")
    assert not cert.expired(host.clock())
    assert cert.subject == "CN=APP02"
    assert cert.key_link is not None and cert.key_link.path.lower().split("\\")[-1].startswith("f686aace")
    key_file = host.filesystem.get(cert.key_link.path)
    assert key_file is not None
    # Server 2019: SYSTEM full, NETWORK SERVICE read, NT SERVICE\SessionEnv full.
    assert (
        key_file.sddl.startswith("O:SY") and "(A;;FR;;;NS)" in key_file.sddl and "S-1-5-80-4022436659" in key_file.sddl
    )
    view = host.rdp_view()
    assert view.failure is None
    assert presented_thumbprint(host) == cert.thumbprint


def test_start_creates_missing_selfsigned() -> None:
    host = load("missing-selfsigned")
    assert rd_thumbprints(host) == []
    host.stop_service("SessionEnv")
    host.start_service("SessionEnv")
    assert len(rd_thumbprints(host)) == 1
    [cert] = host.stores.entries("Remote Desktop")
    assert cert.key_link is not None
    entry = host.filesystem.get(cert.key_link.path)
    assert entry is not None and "(A;;FR;;;BA)" in entry.sddl  # Server 2016 ACL
    assert host.rdp_view().failure is None


@pytest.mark.parametrize("stopped", ["CertPropSvc", "KeyIso", "CryptSvc"])
def test_renewal_needs_its_services(stopped: str) -> None:
    host = load("expired-selfsigned")
    before = rd_thumbprints(host)
    host.stop_service(stopped)
    host.restart_service("SessionEnv", force=False)
    assert rd_thumbprints(host) == before
    assert rcm_ids(host) == [1058]
    assert stopped in host.events.events[-1].message
    assert host.rdp_view().failure == "reset_after_x224"


def test_missing_selfsigned_without_services_logs_1057() -> None:
    host = load("missing-selfsigned")
    host.stop_service("KeyIso")
    host.restart_service("SessionEnv", force=False)
    assert rd_thumbprints(host) == []
    assert rcm_ids(host) == [1057]


def test_orphaned_expired_entry_blocks_renewal() -> None:
    host = load("expired-selfsigned")
    [cert] = host.stores.entries("Remote Desktop")
    assert cert.key_link is not None
    assert host.filesystem.remove(cert.key_link.path)
    host.restart_service("SessionEnv", force=False)
    assert rd_thumbprints(host) == [cert.thumbprint]
    assert rcm_ids(host) == [1058]
    assert "Object already exists" in host.events.events[-1].message


def test_valid_cert_with_unreadable_key_is_not_renewed() -> None:
    host = load("healthy")
    host.inject_fault("break_selfsigned_key", {"mode": "deny_network_service"})
    before = rd_thumbprints(host)
    host.restart_service("SessionEnv", force=False)
    assert rd_thumbprints(host) == before
    view = host.rdp_view()
    assert view.failure == "reset_after_x224" and view.cert_pem is None and view.key_pem is None
    assert host.events.ids(SCHANNEL) == [36870]
    assert rcm_ids(host) == [1058]


@pytest.mark.parametrize(
    ("mode", "event_id", "status"),
    [
        ("delete", 1057, "Keyset does not exist"),
        ("empty", 1057, "Keyset does not exist"),
        # [AzEvent] pairs "Access is denied" with 1058, "Keyset does not exist" with 1057.
        ("deny_network_service", 1058, "Access is denied"),
    ],
)
def test_unusable_key_resets_after_x224_with_the_event_of_its_status(mode: str, event_id: int, status: str) -> None:
    host = load("healthy")
    assert host.rdp_view().failure is None
    host.inject_fault("break_selfsigned_key", {"mode": mode})
    assert host.rdp_view().failure == "reset_after_x224"
    assert host.events.ids(SCHANNEL) == [36870]
    [event] = [event for event in host.events.events if event.provider == RCM]
    # A classic event: the status is the first unnamed <Data> (param0), as the agent reads it.
    assert (event.id, event.data["param0"]) == (event_id, status)
    assert status in event.message


def test_renewal_that_cannot_write_the_key_file_logs_and_changes_nothing() -> None:
    host = load("expired-selfsigned")
    host.inject_fault(
        "fail_writes_under", {"path": "C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys", "error": "AccessDenied"}
    )
    before = rd_thumbprints(host)
    host.restart_service("SessionEnv", force=False)
    assert rd_thumbprints(host) == before
    assert rcm_ids(host) == [1058]


# -- pinned certificate and fallback ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "event_id"),
    [
        ("pinned-missing", 1051),
        ("pinned-expired", 1053),
        ("pinned-wrong-eku", 1054),
        ("pinned-no-private-key", 1055),
        ("connection-broker", 1051),
    ],
)
def test_pinned_problems_fall_back_to_selfsigned(name: str, event_id: int) -> None:
    host = load(name)
    [selfsigned] = host.stores.entries("Remote Desktop")
    assert presented_thumbprint(host) == selfsigned.thumbprint
    assert rcm_ids(host) == [event_id]


def test_expired_pinned_cert_is_not_presented_and_1053_names_the_fallback() -> None:
    host = load("pinned-expired")
    pinned = host.snapshot()["listener"]["pinned"]
    [selfsigned] = host.stores.entries("Remote Desktop")
    assert presented_thumbprint(host) == selfsigned.thumbprint != pinned
    [event] = [event for event in host.events.events if event.provider == RCM]
    assert event.id == 1053 and "default certificate will be used" in event.message
    # The pin stays in the registry, and WMI still reports it (custom hash type).
    assert host.snapshot()["listener"]["ssl_certificate_sha1_hash"] == pinned


def test_binding_available_ca_cert_fixes_the_listener() -> None:
    host = load("ca-cert-available")
    assert host.rdp_view().failure == "reset_after_x224"
    [ca_cert] = host.stores.entries("My")
    result = host.run_batch(
        {"v": 1, "ops": [{"op": "listener.set_certificate", "args": {"thumbprint": ca_cert.thumbprint}}]}
    )
    selfsigned = host.stores.entries("Remote Desktop")[0].thumbprint
    assert result["results"][0] == {"op": "listener.set_certificate", "ok": True, "data": {"previous": selfsigned}}
    assert presented_thumbprint(host) == ca_cert.thumbprint
    view = host.rdp_view()
    assert view.key_pem is not None
    key = serialization.load_pem_private_key(view.key_pem, password=None)
    assert key.public_key().public_numbers() == ca_cert.x509.public_key().public_numbers()  # type: ignore[union-attr]


# -- services and sessions -----------------------------------------------------------------------------------------


def _users(host: WindowsHost) -> dict[str, str]:
    return {session.user: session.state for session in host.sessions.sessions if session.user}


def test_termservice_restart_disconnects_sessions_but_keeps_listener() -> None:
    host = load("active-sessions")
    assert _users(host) == {"CORP\\alice": "Active", "CORP\\bob": "Disconnected"}
    with pytest.raises(OpError, match="dependent services"):
        host.restart_service("TermService", force=False)
    assert _users(host) == {"CORP\\alice": "Active", "CORP\\bob": "Disconnected"}  # a refused restart: no change
    host.restart_service("TermService", force=True)
    # Disconnected, not logged off [RunCmd readmes]: the sessions and their ids stay, without a station.
    assert _users(host) == {"CORP\\alice": "Disconnected", "CORP\\bob": "Disconnected"}
    assert all(not session.station for session in host.sessions.sessions if session.user)
    assert any(session.state == "Listen" for session in host.sessions.sessions)
    assert host.services.running("UmRdpService")
    assert host.rdp_view().failure is None  # renewed on the way


def test_a_restart_of_the_computer_ends_the_sessions() -> None:
    from rdplab import reboot

    host = load("active-sessions")
    reboot.restart(host)
    assert _users(host) == {}
    assert any(session.state == "Listen" for session in host.sessions.sessions)


def test_sessionenv_restart_keeps_sessions() -> None:
    host = load("active-sessions")
    host.restart_service("SessionEnv", force=False)
    assert _users(host) == {"CORP\\alice": "Active", "CORP\\bob": "Disconnected"}
    assert host.rdp_view().failure is None


def test_disabled_service_cannot_start() -> None:
    host = load("healthy")
    host.services.get("SessionEnv").start_type = "Disabled"  # type: ignore[union-attr]
    host.stop_service("SessionEnv")
    with pytest.raises(OpError, match="disabled"):
        host.start_service("SessionEnv")


# -- rdp_view --------------------------------------------------------------------------------------------------------


def _set(host: WindowsHost, path: str, name: str, value: int) -> None:
    result = host.run_batch(
        {
            "v": 1,
            "ops": [{"op": "registry.set", "args": {"path": path, "name": name, "type": "REG_DWORD", "value": value}}],
        }
    )
    assert result["results"][0]["ok"], result


def test_rdp_view_follows_listener_settings() -> None:
    host = load("healthy")
    view = host.rdp_view()
    assert (view.port, view.listening, view.rdp_only) == (3389, True, False)
    assert view.accepted_protocols == PROTOCOL_HYBRID | PROTOCOL_HYBRID_EX
    assert "TLSv1.2" in view.tls_versions  # the full list follows the Schannel settings (rdplab.model.schannel)
    _set(host, RDP_TCP, "UserAuthentication", 0)
    assert host.rdp_view().accepted_protocols == PROTOCOL_SSL | PROTOCOL_HYBRID | PROTOCOL_HYBRID_EX
    _set(host, RDP_TCP, "PortNumber", 3390)
    assert host.rdp_view().port == 3390
    _set(host, RDP_TCP, "SecurityLayer", 0)
    view = host.rdp_view()
    assert view.rdp_only and view.accepted_protocols == 0 and view.cert_pem is None


def test_policy_overrides_listener_values() -> None:
    host = load("healthy")
    _set(host, POLICY, "UserAuthentication", 0)
    assert host.rdp_view().accepted_protocols & PROTOCOL_SSL
    _set(host, POLICY, "fDenyTSConnections", 1)
    assert not host.rdp_view().listening


def test_not_listening_when_termservice_stopped() -> None:
    host = load("active-sessions")
    host.inject_fault("stop_service", {"name": "TermService"})
    assert not host.rdp_view().listening
    assert _users(host) == {"CORP\\alice": "Disconnected", "CORP\\bob": "Disconnected"}


def test_connection_attempts_log_and_count_but_looking_does_not() -> None:
    host = load("expired-selfsigned")
    before = host.snapshot()
    view = host.rdp_view(connect=False)
    assert view.failure == "reset_after_x224"
    assert host.snapshot() == before
    host.rdp_view()
    host.rdp_view()
    assert host.counters.rdp_connections == 2
    assert rcm_ids(host) == [1058, 1058]


def test_presented_key_matches_presented_cert() -> None:
    view = load("healthy").rdp_view()
    assert view.cert_pem is not None and view.key_pem is not None
    cert = x509.load_pem_x509_certificate(view.cert_pem)
    key = serialization.load_pem_private_key(view.key_pem, password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]


# -- Schannel --------------------------------------------------------------------------------------------------------

SCHANNEL_PROTOCOLS = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\SecurityProviders\\SCHANNEL\\Protocols"
CIPHER_POLICY = "HKLM:\\SOFTWARE\\Policies\\Microsoft\\Cryptography\\Configuration\\SSL\\00010002"
ECDSA_ONLY = "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"


def _suite_names(host: WindowsHost) -> list[str]:
    [result] = host.run_batch({"v": 1, "ops": [{"op": "tls.cipher_suites.list", "args": {}}]})["results"]
    return [suite["name"] for suite in result["data"]["suites"]]


def test_schannel_registry_changes_wait_for_the_reboot_even_before_a_first_look() -> None:
    from rdplab import reboot

    host = load("tls-tls12-disabled")
    # Straight after loading, before anything has looked at Schannel: what rdpfix.rdp.tls writes for TLS 1.2, and
    # a cipher-suite policy. Neither may count before the host restarts.
    _set(host, f"{SCHANNEL_PROTOCOLS}\\TLS 1.2\\Server", "Enabled", 1)
    _set(host, f"{SCHANNEL_PROTOCOLS}\\TLS 1.2\\Server", "DisabledByDefault", 0)
    result = host.run_batch(
        {
            "v": 1,
            "ops": [
                {
                    "op": "registry.set",
                    "args": {"path": CIPHER_POLICY, "name": "Functions", "type": "REG_SZ", "value": ECDSA_ONLY},
                }
            ],
        }
    )
    assert result["results"][0]["ok"]
    default_suites = _suite_names(host)
    assert default_suites != ECDSA_ONLY.split(",")
    for _look in range(2):  # a read or a connection does not latch the new state either
        view = host.rdp_view()
        assert view.tls_versions == ["TLSv1", "TLSv1.1"] and view.failure is None
        assert _suite_names(host) == default_suites
    reboot.restart(host)
    view = host.rdp_view(connect=False)
    assert "TLSv1.2" in view.tls_versions
    assert _suite_names(host) == ECDSA_ONLY.split(",")
    assert view.failure == "no_usable_cipher_suite"  # the RSA key fits no suite of the new list


def test_tls13_key_on_2019_has_no_effect() -> None:
    # Server 2019 has no TLS 1.3: switching its Server key on changes nothing a client meets.
    forced = load("tls-tls13-forced-2019")
    assert forced.registry.dword(f"{schannel.PROTOCOLS_KEY}\\TLS 1.3\\Server", "Enabled") == 1
    view = forced.rdp_view(connect=False)
    assert view.failure is None
    assert view.tls_versions == ["TLSv1", "TLSv1.1", "TLSv1.2"]
    assert view.cert_pem is not None and view.key_pem is not None
    assert "TLS 1.3" not in forced.schannel.protocols


def test_no_usable_suite_makes_the_server_offer_exactly_the_listed_suites() -> None:
    view = load("tls-cipher-incompatible").rdp_view(connect=False)
    assert view.failure == "no_usable_cipher_suite"
    assert view.cipher_suites == ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256"]
    assert view.cert_pem is not None and "TLSv1.3" not in view.tls_versions


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        ({"tls_failure": "no_server_protocol"}, [(36871, {"ErrorState": "10013"})]),
        ({"tls_failure": "no_common_protocol"}, [(36888, {"AlertDesc": "70", "ErrorState": "1203"})]),
        (
            {"tls_failure": "no_common_cipher", "tls_version_offered": "TLSv1.1"},
            [(36874, {"Protocol": "TLS 1.1"}), (36888, {"AlertDesc": "40", "ErrorState": "1203"})],
        ),
        ({"tls_failure": "alert_received", "alert": 48}, [(36887, {"AlertDesc": "48"})]),
        ({"outcome": "tls_established", "tls_version": "TLSv1.2"}, []),
    ],
)
def test_failed_handshakes_log_schannel_events(
    outcome: dict[str, object], expected: list[tuple[int, dict[str, str]]]
) -> None:
    host = load("healthy")
    host.record_rdp_attempt(outcome)
    assert [(event.id, event.data) for event in host.events.events] == expected
    assert all(event.provider == SCHANNEL and event.level == "Error" for event in host.events.events)
    if expected and "AlertDesc" in expected[-1][1]:
        # The alert is in the message too, as Windows writes it.
        assert f"code is {expected[-1][1]['AlertDesc']}." in host.events.events[-1].message


# -- faults and snapshots --------------------------------------------------------------------------------------------


def test_expire_selfsigned_fault_breaks_a_healthy_host_and_renewal_repairs_it() -> None:
    host = load("healthy")
    host.inject_fault("expire_selfsigned", {})
    assert host.rdp_view().failure == "reset_after_x224"
    host.restart_service("SessionEnv", force=False)
    assert host.rdp_view().failure is None


def test_remove_pinned_cert_fault() -> None:
    host = load("pinned-expired")
    pinned = host.snapshot()["listener"]["pinned"]
    host.inject_fault("remove_pinned_cert", {})
    assert host.stores.find("My", pinned) is None
    with pytest.raises(ValueError, match="already missing"):
        host.inject_fault("remove_pinned_cert", {})
    with pytest.raises(ValueError, match="no certificate is pinned"):
        load("healthy").inject_fault("remove_pinned_cert", {})


def test_add_session_fault_and_bad_fault_input() -> None:
    host = load("healthy")
    host.inject_fault("add_session", {"user": "CORP\\carol", "state": "Disconnected"})
    assert _users(host) == {"CORP\\carol": "Disconnected"}
    with pytest.raises(ValueError, match="unknown fault 'melt'"):
        host.inject_fault("melt", {})
    with pytest.raises(ValueError, match="state"):
        host.inject_fault("add_session", {"user": "x", "state": "Sleeping"})
    with pytest.raises(ValueError, match="error"):
        host.inject_fault("fail_writes_under", {"path": "C:\\ProgramData", "error": "Oops"})
    with pytest.raises(ValueError, match="Cannot find any service"):
        host.inject_fault("stop_service", {"name": "NoSuchService"})
    assert [fault["name"] for fault in host.snapshot()["faults"]] == ["add_session"]


def test_snapshot_is_complete_json_and_deterministic() -> None:
    host = load("pinned-expired")
    host.rdp_view()
    first = host.snapshot()
    assert first == host.snapshot()
    text = json.dumps(first)
    assert json.loads(text) == first
    assert set(first) >= {"registry", "certificates", "files", "services", "sessions", "events", "counters", "system"}
    rd = first["certificates"]["Remote Desktop"][0]
    assert rd["key_path"] in first["files"]["entries"]
    key_entry = first["files"]["entries"][rd["key_path"]]
    assert len(key_entry["sha256"]) == 64 and key_entry["size"] > 0


# -- corrections from the evidence on Windows' behaviour ------------------------------------------------------------


def _set_string(host: WindowsHost, path: str, name: str, value: str) -> None:
    op = {"op": "registry.set", "args": {"path": path, "name": name, "type": "REG_SZ", "value": value}}
    result = host.run_batch({"v": 1, "ops": [op]})
    assert result["results"][0]["ok"], result


def test_regenerated_selfsigned_is_backdated_a_day_and_valid_183_days() -> None:
    host = load("expired-selfsigned")
    host.restart_service("SessionEnv", force=False)
    [renewed] = host.stores.entries("Remote Desktop")
    now = host.clock()
    assert renewed.not_after - renewed.not_before == timedelta(days=183)
    assert timedelta(hours=23) <= now - renewed.not_before <= timedelta(days=1, minutes=1)


def test_host_file_selfsigned_certificates_are_valid_183_days() -> None:
    for path in sorted(HOSTS.glob("*.yml")):
        host = WindowsHost.from_file(path)
        for cert in host.stores.entries("Remote Desktop"):
            assert cert.not_after - cert.not_before == timedelta(days=183), path.name


def test_builtin_users_read_counts_for_network_service() -> None:
    host = load("healthy")
    [selfsigned] = host.stores.entries("Remote Desktop")
    assert selfsigned.key_link is not None
    key_path = selfsigned.key_link.path
    host.filesystem.get(key_path).sddl = "O:SYG:SYD:P(A;;FA;;;SY)(A;;FR;;;BU)"  # type: ignore[union-attr]
    assert host.rdp_view(connect=False).failure is None
    host.filesystem.get(key_path).sddl = "O:SYG:SYD:P(A;;FA;;;SY)(D;;FR;;;BU)(A;;FR;;;NS)"  # type: ignore[union-attr]
    assert host.rdp_view(connect=False).failure == "reset_after_x224"


def test_default_cipher_suites_are_server_2022s_25_and_pair_with_versions() -> None:
    host = load("healthy")
    names = _suite_names(host)
    assert len(names) == 25 and names[:2] == ["TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"]
    records = {record["name"]: record["protocols"] for record in schannel.cipher_suite_records(host)}
    assert records["TLS_AES_256_GCM_SHA384"] == [0x0304]
    assert records["TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"] == [0x0303]
    assert records["TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"] == [0x0303, 0x0302, 0x0301]
    # Server 2019 has the same list without the TLS 1.3 suites.
    assert len(_suite_names(load("tls-tls12-disabled"))) == 23


def test_tls12_only_suites_leave_tls10_and_11_without_a_suite() -> None:
    host = load("tls-tls12-disabled")  # TLS 1.0 and 1.1 left
    assert host.rdp_view(connect=False).tls_versions == ["TLSv1", "TLSv1.1"]  # served by the *_CBC_SHA suites
    gcm_only = "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,TLS_RSA_WITH_AES_256_CBC_SHA256"
    _set_string(host, schannel.CIPHER_POLICY_KEY, "Functions", gcm_only)
    from rdplab import reboot

    reboot.restart(host)
    assert host.rdp_view(connect=False).failure == "no_usable_cipher_suite"
    # With TLS 1.2 back on, the same list serves TLS 1.2 only: TLS 1.0/1.1 are no longer offered.
    _set(host, f"{schannel.PROTOCOLS_KEY}\\TLS 1.2\\Server", "Enabled", 1)
    _set(host, f"{schannel.PROTOCOLS_KEY}\\TLS 1.2\\Server", "DisabledByDefault", 0)
    reboot.restart(host)
    view = host.rdp_view(connect=False)
    assert view.failure is None and view.tls_versions == ["TLSv1.2"]


def test_null_suites_alone_are_not_usable() -> None:
    host = load("healthy")
    _set_string(host, schannel.CIPHER_POLICY_KEY, "Functions", "TLS_RSA_WITH_NULL_SHA256,TLS_RSA_WITH_NULL_SHA")
    from rdplab import reboot

    reboot.restart(host)
    assert host.rdp_view(connect=False).failure == "no_usable_cipher_suite"
