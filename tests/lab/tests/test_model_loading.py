"""Host and fleet files: loading, validation errors that name file and field, determinism, generated certificates."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from rdplab.model.errors import HostFileError
from rdplab.model.fleet import load_fleet
from rdplab.model.host import WindowsHost

LAB = Path(__file__).resolve().parent.parent
HOSTS = LAB / "hosts"
FLEETS = LAB / "fleets"
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)

MINIMAL = """
name: t1
credentials: {username: u, password: p}
"""


def write_host(tmp_path: Path, text: str, name: str = "host.yml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> WindowsHost:
    return WindowsHost.from_file(write_host(tmp_path, text), now=NOW)


def test_every_ready_host_file_loads_with_unique_names_groups_and_credentials() -> None:
    hosts = load_fleet([HOSTS])
    names = [host.name for host in hosts]
    assert len(names) == len(set(names)) == len(list(HOSTS.glob("*.yml")))
    for host in hosts:
        assert host.groups, host.name
        assert host.username and host.password, host.name


def test_fleet_all_loads_every_host_file() -> None:
    hosts = load_fleet([FLEETS / "all.yml"])
    assert sorted(host.source.resolve() for host in hosts if host.source) == sorted(
        path.resolve() for path in HOSTS.glob("*.yml")
    )


def test_demo_fleet_has_broken_and_healthy_hosts() -> None:
    hosts = load_fleet([FLEETS / "demo.yml"])
    broken: list[str] = []
    healthy: list[str] = []
    for host in hosts:
        view = host.rdp_view()
        # Broken: the connection is reset, or RCM complains about the configured certificate.
        (broken if view.failure or host.events.events else healthy).append(host.name)
    assert len(broken) >= 3, broken
    assert len(healthy) >= 2, healthy


def test_minimal_file_gets_windows_defaults(tmp_path: Path) -> None:
    host = load_text(tmp_path, MINIMAL)
    assert host.system.hostname == "T1"
    assert host.system.os_build == 20348
    assert host.services.running("TermService")
    [cert] = host.stores.entries("Remote Desktop")
    assert cert.subject == "CN=T1"
    assert cert.key_link is not None
    assert cert.key_link.path.lower() == (
        "c:\\programdata\\microsoft\\crypto\\rsa\\machinekeys\\f686aace6942fb7f7ceb231212eef4a4_"
        + host.system.machine_guid
    )
    assert host.registry.get("HKLM:\\SOFTWARE\\Microsoft\\Cryptography", "MachineGuid") is not None
    assert host.rdp_view().failure is None


@pytest.mark.parametrize(
    ("build", "expected_extra"),
    [(14393, "(A;;FR;;;BA)"), (17763, "(A;;FA;;;S-1-5-80-4022436659-1090538466-1613889075-870485073-3428993833)")],
)
def test_rdp_key_acl_depends_on_build(tmp_path: Path, build: int, expected_extra: str) -> None:
    host = load_text(tmp_path, MINIMAL + f"system: {{os_build: {build}}}\n")
    [cert] = host.stores.entries("Remote Desktop")
    assert cert.key_link is not None
    entry = host.filesystem.get(cert.key_link.path)
    assert entry is not None
    assert entry.owner == "NT AUTHORITY\\SYSTEM"
    assert "(A;;FA;;;SY)" in entry.sddl and "(A;;FR;;;NS)" in entry.sddl and expected_extra in entry.sddl


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        ("name: t1\n", "credentials", "missing"),
        (MINIMAL + "certficates: []\n", "certficates", "unknown field"),
        (MINIMAL + "certificates: [{id: a, store: My, not_after: 10 days}]\n", "certificates[0].not_after", "10 days"),
        (MINIMAL + "certificates: [{id: a, key: broken}]\n", "certificates[0].key.state", "broken"),
        (MINIMAL + "certificates: [{id: a}, {id: a}]\n", "certificates[1].id", "duplicate"),
        (MINIMAL + "listener: {security_layer: 7}\n", "listener.security_layer", "0 to 2"),
        (MINIMAL + "listener: {pinned_thumbprint: xyz}\n", "listener.pinned_thumbprint", "40 hex"),
        (
            MINIMAL + "registry: {'HKLM:\\X': {V: {type: REG_DWORD, value: x}}}\n",
            "registry['HKLM:\\\\X'].V",
            "REG_DWORD",
        ),
        (MINIMAL + "services: {TermService: {status: Sleeping}}\n", "services.TermService.status", "Sleeping"),
        (MINIMAL + "sessions: [{user: a, state: Busy}]\n", "sessions[0].state", "Busy"),
        (MINIMAL + "files: [{path: relative.txt}]\n", "files[0].path", "absolute"),
        (MINIMAL + "system: {machine_guid: nope}\n", "system.machine_guid", "GUID"),
        (MINIMAL + "faults: [{name: melt}]\n", "faults[0]", "unknown fault"),
        (MINIMAL + "firewall: {profiles: {Public: {enabld: false}}}\n", "firewall.profiles.Public.enabld", "unknown"),
        (MINIMAL + "firewall: {profiles: {Public: {enabled: 'no'}}}\n", "firewall.profiles.Public.enabled", "true"),
        (MINIMAL + "firewall: {profiles: {Work: {enabled: true}}}\n", "firewall.profiles.Work", "Domain"),
        (MINIMAL + "firewall: {security_products: {firewal: []}}\n", "security_products.firewal", "unknown"),
        (
            MINIMAL + "firewall: {security_products: {antivirus: [{name: AV, state: on}]}}\n",
            "security_products.antivirus[0].state",
            "productState",
        ),
        (
            MINIMAL + "firewall: {security_products: {firewall: [{name: FW, state: 1, vendor: x}]}}\n",
            "security_products.firewall[0].vendor",
            "unknown",
        ),
        (MINIMAL + "firewall: {rules: [{name: r, enabled: 'false'}]}\n", "firewall.rules[0].enabled", "true or false"),
        (MINIMAL + "firewall: {rules: [{name: r, protocol: 6}]}\n", "firewall.rules[0].protocol", "TCP, UDP"),
        (MINIMAL + "firewall: {rules: [{name: r, protocol: ICMP}]}\n", "firewall.rules[0].protocol", "ICMP"),
        (MINIMAL + "firewall: {rules: [{name: r, profiles: true}]}\n", "firewall.rules[0].profiles", "0 (Any) to 7"),
        (MINIMAL + "firewall: {rules: [{name: r, local_ports: [3389-]}]}\n", "rules[0].local_ports", "'3389-'"),
        (MINIMAL + "firewall: {rules: [{name: r, remote_addresses: [10.0.0.0/33]}]}\n", "remote_addresses", "/33"),
        (MINIMAL + "firewall: {rules: [{name: r, program: [a]}]}\n", "firewall.rules[0].program", "string"),
        (MINIMAL + "firewall: {remove_rules: [No-Such-Rule]}\n", "firewall.remove_rules[0]", "No-Such-Rule"),
        (MINIMAL + "firewall: {client_address: 5}\n", "firewall.client_address", "IP address"),
        ("name: 'bad name'\ncredentials: {username: u, password: p}\n", "name", "letters"),
        ("- just\n- a list\n", "(top level)", "mapping"),
        ("name: [unclosed\n", "not valid YAML", ""),
    ],
)
def test_bad_host_file_names_file_and_field(tmp_path: Path, text: str, field: str, problem: str) -> None:
    path = write_host(tmp_path, text)
    with pytest.raises(HostFileError) as caught:
        WindowsHost.from_file(path, now=NOW)
    message = str(caught.value)
    assert message.startswith(str(path)), message
    assert field in message and problem in message, message


def test_fleet_rejects_duplicate_names_naming_both_files(tmp_path: Path) -> None:
    first = write_host(tmp_path, MINIMAL, "a.yml")
    second = write_host(tmp_path, MINIMAL, "b.yml")
    with pytest.raises(HostFileError, match=r"b\.yml: name: host 't1' is already defined in .*a\.yml"):
        load_fleet([first, second])


def test_fleet_file_resolves_relative_entries_and_reports_missing_ones(tmp_path: Path) -> None:
    (tmp_path / "hosts").mkdir()
    write_host(tmp_path / "hosts", MINIMAL, "one.yml")
    fleet = write_host(tmp_path, "hosts: [hosts/one.yml]\n", "fleet.yml")
    assert [host.name for host in load_fleet([fleet])] == ["t1"]
    broken = write_host(tmp_path, "hosts: [hosts/one.yml, hosts/two.yml]\n", "broken.yml")
    with pytest.raises(HostFileError, match=r"broken\.yml: hosts\[1\]: hosts/two\.yml does not exist"):
        load_fleet([broken])


def test_fleet_shares_one_lab_ca_trusted_in_root(tmp_path: Path) -> None:
    hosts = load_fleet([HOSTS / "ca-cert-available.yml", HOSTS / "pinned-expired.yml"], now=NOW)
    roots = {cert.thumbprint for host in hosts for cert in host.stores.entries("Root")}
    assert len(roots) == 1
    ca_cert = hosts[0].stores.entries("Root")[0].x509
    issued = [cert for cert in hosts[0].stores.entries("My") if not cert.self_signed]
    assert issued
    public_key = ca_cert.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    for cert in issued:
        assert cert.x509.issuer == ca_cert.subject
        assert cert.x509.signature_hash_algorithm is not None
        public_key.verify(
            cert.x509.signature,
            cert.x509.tbs_certificate_bytes,
            padding.PKCS1v15(),
            cert.x509.signature_hash_algorithm,
        )
        assert (
            x509.DNSName(hosts[0].system.fqdn)
            in cert.x509.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        )


def test_relative_validity_and_expiring_host(tmp_path: Path) -> None:
    host = WindowsHost.from_file(HOSTS / "expiring-selfsigned.yml", now=NOW)
    [cert] = host.stores.entries("Remote Desktop")
    assert cert.not_after == datetime(2026, 3, 20, tzinfo=UTC)
    expired = WindowsHost.from_file(HOSTS / "expired-selfsigned.yml", now=NOW)
    assert expired.stores.entries("Remote Desktop")[0].not_after == datetime(2026, 2, 28, tzinfo=UTC)


def test_loading_is_deterministic() -> None:
    first = WindowsHost.from_file(HOSTS / "pinned-expired.yml", now=NOW).snapshot()
    second = WindowsHost.from_file(HOSTS / "pinned-expired.yml", now=NOW).snapshot()
    assert first == second
    assert json.dumps(first, sort_keys=False) == json.dumps(second, sort_keys=False)


def test_different_hosts_get_different_keys() -> None:
    hosts = load_fleet([HOSTS / "healthy.yml", HOSTS / "expiring-selfsigned.yml"], now=NOW)
    keys = {host.stores.entries("Remote Desktop")[0].x509.public_key().public_numbers().n for host in hosts}  # type: ignore[union-attr]
    assert len(keys) == 2


def test_firewall_section_values_are_loaded_as_typed(tmp_path: Path) -> None:
    host = load_text(
        tmp_path,
        MINIMAL
        + "firewall:\n"
        + "  profiles: {Public: {enabled: false, default_inbound_action: Allow}}\n"
        + "  remove_rules: [remotedesktop-shadow-in-tcp]\n"
        + "  rules: [{name: Web, local_ports: [80, '8000-8080'], remote_addresses: [LocalSubnet, 10.1.0.0/16]}]\n"
        + "  security_products: {firewall: [{name: FW, state: 266240}]}\n",
    )
    firewall = host.firewall
    assert firewall.profiles_enabled["Public"] is False and firewall.default_inbound["Public"] == "Allow"
    assert "remotedesktop-shadow-in-tcp" not in firewall.rules
    assert firewall.get("Web").local_ports == ["80", "8000-8080"]
    assert firewall.security_products == {"firewall": [{"name": "FW", "state": 266240, "path": ""}], "antivirus": []}
