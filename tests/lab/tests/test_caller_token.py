"""The caller's token (docs/lab.md, "The caller's token"): who the agent runs as decides which key files and ACLs it
may read, as on Windows. An Administrator's plain read of a 17763+ RDP key file is refused; with backup semantics
and SeBackupPrivilege enabled it works; SYSTEM reads it plainly; a token without SeBackupPrivilege is refused."""

from __future__ import annotations

import base64
import hashlib
import typing as t
from pathlib import Path

import pytest

from rdplab.model.errors import AccessDenied, HostFileError
from rdplab.model.host import WindowsHost
from rdplab.model.schema import build_host, read_yaml
from rdplab.model.token import AGENT_PRIVILEGES, CallerToken, granted_rights

HOSTS = Path(__file__).resolve().parents[1] / "hosts"
MACHINE_KEYS = "C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys"
CNG_KEYS = "C:\\ProgramData\\Microsoft\\Crypto\\Keys"
NO_ADMIN_CNG_SDDL = "O:SYG:SYD:P(A;;FA;;;SY)"


def host_from(name: str, **changes: t.Any) -> WindowsHost:
    document = read_yaml(HOSTS / f"{name}.yml")
    assert isinstance(document, dict)
    document.update(changes)
    return build_host(document, HOSTS / f"{name}.yml")


def rdp_key_path(host: WindowsHost) -> str:
    [cert] = host.stores.entries("Remote Desktop")
    assert cert.key_link is not None
    return cert.key_link.path


def run(host: WindowsHost, op: str, **args: object) -> dict[str, t.Any]:
    [result] = host.run_batch({"v": 1, "ops": [{"op": op, "args": args}]})["results"]
    return t.cast(dict[str, t.Any], result)


def test_an_administrators_plain_read_of_a_2019_rdp_key_file_is_refused() -> None:
    host = host_from(
        "expired-selfsigned"
    )  # Server 2019 (17763): SYSTEM, NETWORK SERVICE, SessionEnv; no Administrators
    assert host.system.os_build == 17763
    entry = host.filesystem.get(rdp_key_path(host))
    assert entry is not None and "BA" not in entry.sddl
    process = host.caller.start_process()
    # File.Open / File.Copy / ReadAllBytes: no backup semantics, the DACL decides.
    with pytest.raises(AccessDenied):
        process.check_read_data(entry.path, entry.sddl, backup=False)
    with pytest.raises(AccessDenied):
        process.check_read_acl(entry.path, entry.sddl, backup=False)
    # Backup semantics with SeBackupPrivilege held but still disabled (as a new logon has it): refused too.
    with pytest.raises(AccessDenied):
        process.check_read_data(entry.path, entry.sddl, backup=True)
    # Once the agent enabled it: the backup-semantics read works, the plain one still does not.
    process.start_agent()
    assert process.agent_enabled == ["SeBackupPrivilege", "SeRestorePrivilege"]
    process.check_read_data(entry.path, entry.sddl, backup=True)
    process.check_read_acl(entry.path, entry.sddl, backup=True)
    with pytest.raises(AccessDenied):
        process.check_read_data(entry.path, entry.sddl, backup=False)


def test_system_reads_the_2019_rdp_key_file_plainly() -> None:
    host = host_from("expired-selfsigned", caller={"identity": "system"})
    entry = host.filesystem.get(rdp_key_path(host))
    assert entry is not None
    process = host.caller.start_process()
    process.check_read_data(entry.path, entry.sddl, backup=False)
    process.check_read_acl(entry.path, entry.sddl, backup=False)


def test_an_administrator_reads_the_2016_rdp_key_file_plainly() -> None:
    # Up to build 14393 the key's ACL gives Administrators read [Repair].
    host = host_from("healthy-legacy")
    entry = host.filesystem.get(rdp_key_path(host))
    assert entry is not None
    host.caller.start_process().check_read_data(entry.path, entry.sddl, backup=False)


def test_the_agents_reads_use_backup_semantics_as_an_administrator() -> None:
    host = host_from("expired-selfsigned")
    path = rdp_key_path(host)
    entry = host.filesystem.get(path)
    assert entry is not None
    read = run(host, "file.read", path=path)
    assert read["ok"] and base64.b64decode(read["data"]["content_b64"]) == entry.content
    stat = run(host, "file.stat", path=path)["data"]
    assert stat["sha256"] == hashlib.sha256(entry.content).hexdigest() and stat["sddl"] == entry.sddl
    listing = run(host, "dir.stat", path=MACHINE_KEYS)["data"]
    [listed] = [item for item in listing["entries"] if item["name"] == path.rsplit("\\", 1)[1]]
    assert listed["sddl"] == entry.sddl and listed["owner"] == "NT AUTHORITY\\SYSTEM"


def test_without_sebackupprivilege_the_agent_is_refused_as_windows_refuses_it() -> None:
    host = host_from("expired-selfsigned", caller={"privileges": {"SeBackupPrivilege": "absent"}})
    path = rdp_key_path(host)
    before = host.snapshot()
    read = run(host, "file.read", path=path)
    assert read["ok"] is False and read["error"]["type"] == "AccessDenied"
    stat = run(host, "file.stat", path=path)["data"]
    assert stat["exists"] is True and stat["size"] > 0
    assert (stat["sha256"], stat["owner"], stat["sddl"]) == (None, None, None)
    listing = run(host, "dir.stat", path=MACHINE_KEYS)["data"]
    [listed] = [item for item in listing["entries"] if item["name"] == path.rsplit("\\", 1)[1]]
    assert (listed["owner"], listed["sddl"]) == (None, None)
    copied = run(host, "file.copy", src=path, dest="C:\\ProgramData\\copy.key")
    assert copied["ok"] is False and copied["error"]["type"] == "AccessDenied"
    # file.move hashes before it moves: the refusal leaves the key where it was.
    moved = run(host, "file.move", src=path, dest="C:\\ProgramData\\moved.key")
    assert moved["ok"] is False and moved["error"]["type"] == "AccessDenied"
    assert host.filesystem.exists(path) and not host.filesystem.exists("C:\\ProgramData\\moved.key")
    snapshot = host.snapshot()
    assert snapshot["files"] == before["files"] and snapshot["certificates"] == before["certificates"]
    caller = run(host, "system.info")["data"]["caller"]
    assert "SeBackupPrivilege" not in caller["privileges"] and caller["agent_enabled"] == ["SeRestorePrivilege"]


def test_each_batch_starts_with_the_privileges_of_the_logon() -> None:
    host = host_from("healthy")
    host.run_batch({"v": 1, "ops": [{"op": "system.info", "args": {}}]})
    assert host.process.has("SeBackupPrivilege")
    host.run_batch({"v": 1, "ops": [{"op": "session.list", "args": {}}]})
    assert not host.process.has("SeBackupPrivilege") and not host.process.started


def test_setting_an_owner_other_than_yourself_needs_serestoreprivilege() -> None:
    sddl = "O:SYG:SYD:PAI(A;;0x12019f;;;WD)(A;;FA;;;BA)"
    refused = host_from("healthy", caller={"privileges": {"SeRestorePrivilege": "absent"}})
    created = run(refused, "dir.create", path="C:\\ProgramData\\fresh", sddl=sddl)
    assert created["ok"] is False and created["error"]["type"] == "AccessDenied"
    assert not refused.filesystem.exists("C:\\ProgramData\\fresh")
    # Administrators, a group an elevated token may own through, needs no privilege.
    owned = run(refused, "dir.create", path="C:\\ProgramData\\fresh", sddl=sddl.replace("O:SY", "O:BA"))
    assert owned["ok"] is True
    # The default Administrator: the agent enabled SeRestorePrivilege.
    allowed = host_from("healthy")
    assert run(allowed, "dir.create", path="C:\\ProgramData\\fresh", sddl=sddl)["ok"] is True
    entry = allowed.filesystem.get("C:\\ProgramData\\fresh")
    assert entry is not None and entry.owner == "NT AUTHORITY\\SYSTEM"


def test_system_info_reports_the_caller() -> None:
    admin = run(host_from("healthy"), "system.info")["data"]["caller"]
    assert admin["user"] == "WEB01\\rdpadmin" and admin["system"] is False and admin["administrator"] is True
    assert "S-1-5-2" in {group["sid"] for group in admin["groups"]}  # NETWORK: a network logon
    assert admin["privileges"]["SeBackupPrivilege"] and admin["privileges"]["SeRestorePrivilege"]
    assert admin["privileges"]["SeTakeOwnershipPrivilege"] is False
    system = run(host_from("healthy", caller={"identity": "system"}), "system.info")["data"]["caller"]
    assert system["user"] == "NT AUTHORITY\\SYSTEM" and system["sid"] == "S-1-5-18" and system["system"] is True
    assert system["agent_enabled"] == list(AGENT_PRIVILEGES)


def _cng_pinned_host(**caller: t.Any) -> WindowsHost:
    document = read_yaml(HOSTS / "healthy.yml")
    assert isinstance(document, dict)
    document["certificates"] = [
        *document["certificates"],
        {
            "id": "web",
            "store": "My",
            "kind": "ca_issued",
            "pinned": True,
            "key": {"provider": "cng", "sddl": NO_ADMIN_CNG_SDDL},
        },
    ]
    if caller:
        document["caller"] = caller
    return build_host(document, HOSTS / "healthy.yml")


def test_a_cng_key_the_provider_refuses_is_found_by_name_not_reported_missing() -> None:
    host = _cng_pinned_host()
    [cert] = run(host, "cert.list", store="My")["data"]["certificates"]
    key = cert["key"]
    assert key["provider_kind"] == "cng" and key["open_error"] == "AccessDenied"
    assert key["path"].startswith(CNG_KEYS + "\\") and key["exists"] is True and key["sddl"] == NO_ADMIN_CNG_SDDL


def test_a_cng_key_neither_opened_nor_found_is_unknown_not_missing() -> None:
    host = _cng_pinned_host(privileges={"SeBackupPrivilege": "absent"})
    [cert] = run(host, "cert.list", store="My")["data"]["certificates"]
    key = cert["key"]
    assert (key["path"], key["exists"], key["sddl"], key["open_error"]) == (None, None, None, "AccessDenied")


def test_a_missing_cng_key_is_reported_missing() -> None:
    host = _cng_pinned_host()
    [cert] = host.stores.entries("My")
    assert cert.key_link is not None
    host.filesystem.remove(cert.key_link.path)
    [listed] = run(host, "cert.list", store="My")["data"]["certificates"]
    assert (listed["key"]["path"], listed["key"]["exists"], listed["key"]["open_error"]) == (None, False, "NotFound")


def test_dacl_evaluation_follows_windows() -> None:
    sids = frozenset({"S-1-5-32-544", "S-1-1-0"})
    # Owner: READ_CONTROL and WRITE_DAC without any entry; a deny entry first wins over a later allow.
    assert granted_rights("O:BAG:SYD:P", sids, 0x60000) == 0x60000
    assert granted_rights("O:SYG:SYD:P(D;;FR;;;WD)(A;;FA;;;BA)", sids, 0x1) == 0
    assert granted_rights("O:SYG:SYD:P(A;;FA;;;BA)(D;;FR;;;WD)", sids, 0x1) == 0x1
    assert granted_rights("O:SYG:SYD:P(A;OICIIO;FA;;;BA)", sids, 0x1) == 0  # inherit-only: not for the object
    assert granted_rights("O:SYG:SYD:NO_ACCESS_CONTROL", sids, 0x1) == 0x1


@pytest.mark.parametrize(
    ("caller", "problem"),
    [
        ({"identity": "root"}, "caller.identity"),
        ({"privileges": {"SeBackupPrivilege": "on"}}, "caller.privileges.SeBackupPrivilege"),
        ({"privileges": {"Backup": "enabled"}}, "caller.privileges.Backup"),
        ({"user": "x"}, "caller.user"),
    ],
)
def test_bad_caller_sections_name_the_field(caller: dict[str, t.Any], problem: str) -> None:
    with pytest.raises(HostFileError, match=problem.replace(".", r"\.")):
        host_from("healthy", caller=caller)


def test_the_token_presets() -> None:
    admin = CallerToken.administrator("WEB01", "rdpadmin")
    assert admin.privileges["SeBackupPrivilege"] is False and admin.privileges["SeRestorePrivilege"] is False
    assert admin.may_own() == frozenset({admin.sid, "S-1-5-32-544"})
    assert CallerToken.system().privileges["SeBackupPrivilege"] is False
