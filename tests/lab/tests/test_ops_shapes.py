"""Each operation answers with exactly the data shape of docs/agent-protocol.md ("Operations")."""

from __future__ import annotations

import base64
import re
import typing as t
from pathlib import Path

from cryptography import x509

from rdplab.model.host import WindowsHost

HOSTS = Path(__file__).resolve().parent.parent / "hosts"
RDP_TCP = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations\\RDP-Tcp"
MACHINE_KEYS = "C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys"
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
THUMBPRINT = re.compile(r"^[0-9A-F]{40}$")


def load(name: str = "healthy") -> WindowsHost:
    return WindowsHost.from_file(HOSTS / f"{name}.yml")


def run(host: WindowsHost, op: str, **args: object) -> dict[str, t.Any]:
    [result] = host.run_batch({"v": 1, "on_error": "stop", "ops": [{"op": op, "args": args}]})["results"]
    assert result["ok"] is True, result
    assert set(result) == {"op", "ok", "data"}
    assert result["op"] == op
    data = result["data"]
    assert isinstance(data, dict)
    return data


def test_system_info() -> None:
    data = run(load("connection-broker"), "system.info")
    assert set(data) == {
        "hostname",
        "fqdn",
        "domain",
        "os_build",
        "os_caption",
        "machine_guid",
        "connection_broker",
        "boot_time",
        "program_data",
        "runtime",
        "caller",
    }
    # An Administrator over a network logon, after the agent enabled SeBackupPrivilege and SeRestorePrivilege.
    caller = data["caller"]
    assert set(caller) == {"user", "sid", "system", "administrator", "groups", "privileges", "agent_enabled"}
    assert caller["system"] is False and caller["administrator"] is True
    assert {"sid": "S-1-5-32-544", "name": "BUILTIN\\Administrators"} in caller["groups"]
    assert caller["agent_enabled"] == ["SeBackupPrivilege", "SeRestorePrivilege"]
    assert caller["privileges"]["SeBackupPrivilege"] is True and caller["privileges"]["SeShutdownPrivilege"] is False
    assert data["runtime"] == {
        "powershell_version": "5.1.17763.1",
        "powershell_edition": "Desktop",
        "clr_version": "4.0.30319.42000",
        "dotnet_framework_release": 528040,
        "language_mode": "FullLanguage",
        "ui_culture": "en-US",
    }
    assert data["hostname"] == "RDCB01" and data["fqdn"] == "RDCB01.corp.example.com"
    assert data["domain"] == "corp.example.com" and data["os_build"] == 17763
    assert data["connection_broker"] is True
    assert isinstance(data["boot_time"], str) and ISO_UTC.match(data["boot_time"])
    assert data["program_data"] == "C:\\ProgramData"
    assert run(load("healthy-legacy"), "system.info")["domain"] is None


def test_registry_get() -> None:
    host = load("pinned-missing")
    data = run(host, "registry.get", path=RDP_TCP)
    assert set(data) == {"exists", "values", "subkeys"}
    values = data["values"]
    assert isinstance(values, dict)
    assert values["PortNumber"] == {"type": "REG_DWORD", "value": 3389}
    pinned = values["SSLCertificateSHA1Hash"]
    assert pinned["type"] == "REG_BINARY" and re.match(r"^[0-9a-f]{40}$", pinned["value"])
    only = run(host, "registry.get", path=RDP_TCP.upper(), names=["portnumber", "Missing"])
    assert only == {"exists": True, "values": {"PortNumber": {"type": "REG_DWORD", "value": 3389}}, "subkeys": []}
    parent = run(host, "registry.get", path="HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations")
    assert parent["subkeys"] == ["RDP-Tcp"]
    assert run(host, "registry.get", path="HKLM:\\SOFTWARE\\Nope") == {"exists": False, "values": {}, "subkeys": []}


def test_registry_has_no_pinned_value_for_the_selfsigned_certificate() -> None:
    values = run(load("healthy"), "registry.get", path=RDP_TCP)["values"]
    assert isinstance(values, dict) and "SSLCertificateSHA1Hash" not in values


def test_listener_get_selfsigned_and_pinned() -> None:
    host = load("healthy")
    data = run(host, "listener.get")
    assert set(data) == {
        "terminal_name",
        "ssl_certificate_sha1_hash",
        "ssl_certificate_sha1_hash_type",
        "security_layer",
        "user_authentication",
        "min_encryption_level",
    }
    assert data["ssl_certificate_sha1_hash"] == host.stores.entries("Remote Desktop")[0].thumbprint
    assert data["ssl_certificate_sha1_hash_type"] == 1
    assert (data["security_layer"], data["user_authentication"], data["min_encryption_level"]) == (2, 1, 2)
    pinned = load("pinned-expired")
    pinned_data = run(pinned, "listener.get", terminal_name="RDP-tcp")
    assert pinned_data["ssl_certificate_sha1_hash"] == pinned.stores.entries("My")[0].thumbprint
    assert pinned_data["ssl_certificate_sha1_hash_type"] == 3
    missing = run(load("missing-selfsigned"), "listener.get")
    assert missing["ssl_certificate_sha1_hash"] is None and missing["ssl_certificate_sha1_hash_type"] == 0


def test_listener_set_certificate_returns_previous() -> None:
    host = load("ca-cert-available")
    [cert] = host.stores.entries("My")
    [selfsigned] = host.stores.entries("Remote Desktop")
    first = run(host, "listener.set_certificate", thumbprint=cert.thumbprint.lower())
    assert first == {"previous": selfsigned.thumbprint}
    assert run(host, "listener.set_certificate", thumbprint=cert.thumbprint) == {"previous": cert.thumbprint}
    assert run(host, "listener.get")["ssl_certificate_sha1_hash_type"] == 3


def test_cert_list() -> None:
    host = load("healthy")
    data = run(host, "cert.list", store="Remote Desktop")
    assert set(data) == {"store", "exists", "certificates"}
    assert data["store"] == "Remote Desktop" and data["exists"] is True
    [entry] = data["certificates"]
    assert set(entry) == {"thumbprint", "der_b64", "has_private_key", "key"}
    assert THUMBPRINT.match(entry["thumbprint"])
    cert = x509.load_der_x509_certificate(base64.b64decode(entry["der_b64"]))
    assert cert.subject.rfc4514_string() == "CN=WEB01.corp.example.com"
    assert entry["has_private_key"] is True
    key = entry["key"]
    assert set(key) == {
        "provider_kind",
        "provider_name",
        "container",
        "path",
        "exists",
        "size",
        "owner",
        "sddl",
        "open_error",
    }
    assert key["provider_kind"] == "capi" and key["container"] == "TSSecKeySet1"
    # Server 2022: the key provider, opening the file without backup semantics, refuses an Administrator.
    assert key["open_error"] == "AccessDenied"
    assert key["path"].startswith(MACHINE_KEYS + "\\f686aace6942fb7f7ceb231212eef4a4_")
    assert key["exists"] is True and key["size"] > 0
    assert key["owner"] == "NT AUTHORITY\\SYSTEM" and key["sddl"].startswith("O:SYG:SYD:")
    assert run(host, "cert.list", store="Nope") == {"store": "Nope", "exists": False, "certificates": []}


def test_cert_list_key_states() -> None:
    no_key = run(load("pinned-no-private-key"), "cert.list", store="My")["certificates"]
    assert [(c["has_private_key"], c["key"]) for c in no_key] == [(False, None)]
    host = load("expired-selfsigned")
    host.inject_fault("break_selfsigned_key", {"mode": "delete"})
    [orphan] = run(host, "cert.list", store="Remote Desktop")["certificates"]
    assert orphan["has_private_key"] is True
    assert orphan["key"]["exists"] is False and orphan["key"]["size"] is None and orphan["key"]["sddl"] is None
    cng = run(load("ca-cert-available"), "cert.list", store="My")["certificates"]
    assert cng[0]["key"]["provider_kind"] == "cng"
    assert cng[0]["key"]["path"].startswith("C:\\ProgramData\\Microsoft\\Crypto\\Keys\\")


def test_cert_remove_and_import() -> None:
    host = load("healthy")
    cert = host.stores.entries("Remote Desktop")[0]
    der_b64 = base64.b64encode(cert.der).decode()
    assert run(host, "cert.remove", store="Remote Desktop", thumbprint=cert.thumbprint) == {"removed": True}
    assert run(host, "cert.remove", store="Remote Desktop", thumbprint=cert.thumbprint) == {"removed": False}
    assert cert.key_link is not None and host.filesystem.exists(cert.key_link.path)  # Remove-Item keeps the key
    assert run(host, "cert.import", store="My", der_b64=der_b64) == {"thumbprint": cert.thumbprint}
    assert run(host, "cert.import", store="My", der_b64=der_b64) == {"thumbprint": cert.thumbprint}
    assert len(host.stores.entries("My")) == 1


def test_service_get() -> None:
    host = load("healthy")
    data = run(host, "service.get", names=["TermService", "CertPropSvc", "NoSuch"])
    assert data == {
        "services": {
            "TermService": {"exists": True, "status": "Running", "start_type": "Manual"},
            "CertPropSvc": {"exists": True, "status": "Running", "start_type": "Manual"},
            "NoSuch": {"exists": False, "status": None, "start_type": None},
        }
    }


def test_service_restart_and_start() -> None:
    host = load("healthy")
    assert run(host, "service.restart", name="TermService", force=True) == {"status": "Running"}
    host.inject_fault("stop_service", {"name": "SessionEnv"})
    assert run(host, "service.start", name="SessionEnv") == {"status": "Running"}
    assert run(host, "service.start", name="SessionEnv") == {"status": "Running"}


def test_session_list() -> None:
    data = run(load("active-sessions"), "session.list")
    sessions = data["sessions"]
    assert isinstance(sessions, list)
    assert all(set(s) == {"id", "user", "state", "station"} for s in sessions)
    states = {s["user"]: s["state"] for s in sessions if s["user"]}
    assert states == {"CORP\\alice": "Active", "CORP\\bob": "Disconnected"}
    assert any(s["state"] == "Listen" and s["station"] == "RDP-Tcp" for s in sessions)


def test_files() -> None:
    host = load("healthy")
    folder = run(host, "file.stat", path=MACHINE_KEYS.lower())
    assert folder == {
        "exists": True,
        "is_dir": True,
        "size": None,
        "sha256": None,
        "owner": "NT AUTHORITY\\SYSTEM",
        "sddl": "O:SYG:SYD:PAI(A;;0x12019f;;;WD)(A;;FA;;;BA)",
    }
    listing = run(host, "dir.list", path=MACHINE_KEYS)
    [entry] = listing["entries"]
    assert listing["exists"] is True and set(entry) == {"name", "is_dir", "size"}
    assert entry["name"].startswith("f686aace6942fb7f7ceb231212eef4a4_") and entry["is_dir"] is False

    assert run(host, "dir.create", path="C:\\ProgramData\\rdpfix\\backups\\m1") == {"created": True}
    assert run(host, "dir.create", path="C:\\ProgramData\\rdpfix\\backups\\m1") == {"created": False}
    written = run(host, "file.write", path="C:\\ProgramData\\rdpfix\\backups\\m1\\a.txt", content_b64="aGVsbG8=")
    assert written == {"size": 5, "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}
    stat = run(host, "file.stat", path="C:\\ProgramData\\rdpfix\\backups\\m1\\A.TXT")
    assert stat["exists"] is True and stat["size"] == 5 and stat["sha256"] == written["sha256"]
    assert run(host, "file.read", path="C:\\ProgramData\\rdpfix\\backups\\m1\\a.txt") == {
        "exists": True,
        "content_b64": "aGVsbG8=",
    }
    copied = run(
        host, "file.copy", src="C:\\ProgramData\\rdpfix\\backups\\m1\\a.txt", dest="C:\\ProgramData\\rdpfix\\b.txt"
    )
    assert copied == written
    assert run(host, "file.read", path="C:\\nope") == {"exists": False, "content_b64": None}
    assert run(host, "dir.list", path="C:\\nope") == {"exists": False, "entries": []}
    created = run(host, "dir.create", path="C:\\ProgramData\\locked", sddl="O:SYG:SYD:P(A;;FA;;;SY)")
    assert created == {"created": True}
    assert run(host, "file.stat", path="C:\\ProgramData\\locked")["sddl"] == "O:SYG:SYD:P(A;;FA;;;SY)"


def test_util_sleep() -> None:
    assert run(load(), "util.sleep", milliseconds=250) == {"slept_ms": 250}
