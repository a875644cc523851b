"""Key files as the caller's token meets them, through the real action plugins against the lab (DirectConnection).

From build 17763 the RDP key file's ACL names no Administrators. The default certificate repair backs the key up as
an Administrator (backup semantics, SeBackupPrivilege enabled by the agent); a healthy 17763+ host is not flagged
acl_unreadable; a token without SeBackupPrivilege is refused before anything changes, and its unreadable ACLs are
reported, never regenerated; a CNG key its provider refuses is not "missing" and gets the ACL repair.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_schema = pytest.importorskip("rdplab.model.schema")

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
BACKUPS = "C:\\ProgramData\\rdpfix"
NO_ADMIN_KEY_SDDL = "O:SYG:SYD:P(A;;FA;;;SY)"
NO_BACKUP = {"privileges": {"SeBackupPrivilege": "absent"}}


def load(name: str, caller: dict[str, t.Any] | None = None, extra_certificates: list[t.Any] | None = None) -> t.Any:
    document = rdplab_schema.read_yaml(HOSTS / f"{name}.yml")
    if caller is not None:
        document["caller"] = caller
    if extra_certificates:
        document["certificates"] = [*document["certificates"], *extra_certificates]
    return rdplab_schema.build_host(document, HOSTS / f"{name}.yml")


def run(host: t.Any, module: str, check_mode: bool = False, **args: t.Any) -> dict[str, t.Any]:
    plugin = importlib.import_module(f"ansible_collections.rdpfix.rdp.plugins.action.{module}")
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=True, async_val=0, action=f"rdpfix.rdp.{module}")
    action = plugin.ActionModule(
        task, rdplab_direct.DirectConnection(host), SimpleNamespace(remote_addr="127.0.0.2"), None, None, None
    )
    result: dict[str, t.Any] = action.run(task_vars={"inventory_hostname": host.name})
    return result


def stable(host: t.Any) -> dict[str, t.Any]:
    state = copy.deepcopy(host.snapshot())
    for volatile in ("events", "counters"):
        state.pop(volatile)
    return t.cast(dict[str, t.Any], state)


def rdp_key(host: t.Any) -> t.Any:
    [cert] = host.stores.entries("Remote Desktop")
    return cert, host.filesystem.get(cert.key_link.path)


def ids(result: dict[str, t.Any]) -> list[str]:
    return [str(item["id"]) for item in result.get("findings") or []]


def test_the_default_certificate_repair_on_a_2019_host_backs_the_key_up_as_an_administrator() -> None:
    host = load("expired-selfsigned")
    assert host.system.os_build == 17763 and host.caller.identity == "administrator"
    old_cert, old_key = rdp_key(host)
    assert "BA" not in old_key.sddl  # the 17763+ default: no Administrators entry
    old_sha = hashlib.sha256(old_key.content).hexdigest()
    result = run(host, "certificate")
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is True
    new_cert, _new_key = rdp_key(host)
    assert new_cert.thumbprint != old_cert.thumbprint
    # The key was copied into the backup, byte for byte, by the agent's backup-semantics read.
    saved = host.filesystem.get(f"{result['backup']['path']}\\{old_cert.thumbprint}.key")
    assert saved is not None and hashlib.sha256(saved.content).hexdigest() == old_sha


def test_without_sebackupprivilege_the_certificate_repair_stops_at_the_key_backup() -> None:
    host = load("expired-selfsigned", caller=NO_BACKUP)
    before = stable(host)
    result = run(host, "certificate")
    assert result.get("failed") is True
    assert "file.copy" in result["msg"] and "AccessDenied" in result["msg"]
    after = stable(host)
    # Nothing destructive ran: the certificate and its key are where they were (only the manifest was written).
    assert after["certificates"] == before["certificates"]
    assert {path: entry for path, entry in after["files"]["entries"].items() if not path.startswith(BACKUPS)} == {
        path: entry for path, entry in before["files"]["entries"].items() if not path.startswith(BACKUPS)
    }


@pytest.mark.parametrize("strategy", ["permissions", "regenerate"])
def test_a_healthy_17763_plus_host_is_not_flagged_acl_unreadable(strategy: str) -> None:
    host = load("healthy")  # Server 2022: the RDP key's ACL names no Administrators
    assert host.system.os_build >= 17763
    before = stable(host)
    result = run(host, "machinekeys", strategy=strategy)
    assert not result.get("failed"), result.get("msg")
    assert not [finding for finding in ids(result) if finding.startswith("machinekeys.rdp_key_")]
    assert result["changed"] is False and host.counters.writes == 0
    assert stable(host) == before


def test_an_acl_the_token_cannot_read_is_reported_and_never_regenerated() -> None:
    host = load("healthy", caller=NO_BACKUP)
    before = stable(host)
    result = run(host, "machinekeys", strategy="regenerate")
    assert not result.get("failed"), result.get("msg")
    [finding] = [item for item in result["findings"] if item["id"] == "machinekeys.rdp_key_acl_unreadable"]
    assert finding["severity"] == "warning" and finding.get("fix") is None
    assert "SeBackupPrivilege" in finding["title"]
    assert result["changed"] is False and host.counters.writes == 0
    assert stable(host) == before


def _cng_pin() -> list[dict[str, t.Any]]:
    return [
        {
            "id": "web",
            "store": "My",
            "kind": "ca_issued",
            "pinned": True,
            "key": {"provider": "cng", "sddl": NO_ADMIN_KEY_SDDL},
        }
    ]


def test_a_cng_key_the_provider_refuses_gets_the_acl_repair_not_pfx_advice() -> None:
    host = load("healthy", extra_certificates=_cng_pin())
    [pinned] = host.stores.entries("My")
    result = run(host, "machinekeys")
    assert not result.get("failed"), result.get("msg")
    assert "machinekeys.rdp_key_missing" not in ids(result)
    assert not any("PFX" in str(item["title"]) for item in result["findings"])
    assert "machinekeys.rdp_key_not_readable" in ids(result)
    assert result["changed"] is True
    repaired = host.filesystem.get(pinned.key_link.path)
    assert repaired is not None and "(A;;FR;;;NS)" in repaired.sddl


def test_a_cng_key_neither_opened_nor_found_is_inaccessible_not_missing() -> None:
    host = load("healthy", caller=NO_BACKUP, extra_certificates=_cng_pin())
    result = run(host, "machinekeys")
    assert not result.get("failed"), result.get("msg")
    assert "machinekeys.rdp_key_inaccessible" in ids(result)
    assert "machinekeys.rdp_key_missing" not in ids(result)
    assert not any("PFX" in str(item["title"]) for item in result["findings"])
    assert result["changed"] is False and host.counters.writes == 0
    certificate = run(host, "certificate", check_mode=True)
    assert "certificate.pinned_no_private_key" not in ids(certificate)
    assert certificate["certificate"]["key_state"] == "inaccessible"


def test_the_default_certificate_repair_as_system() -> None:
    host = load("caller-system-expired")
    assert host.caller.identity == "system" and host.rdp_view(connect=False).failure == "reset_after_x224"
    result = run(host, "certificate")
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is True and host.rdp_view(connect=False).failure is None
    [info] = host.run_batch({"v": 1, "ops": [{"op": "system.info", "args": {}}]})["results"]
    assert info["data"]["caller"]["system"] is True


def test_the_locked_cng_key_of_a_pinned_certificate_is_repaired_in_place() -> None:
    host = load("pinned-cng-key-locked")
    [pinned] = host.stores.entries("My")
    before = host.filesystem.get(pinned.key_link.path).content
    assert host.rdp_view(connect=False).cert_pem != pinned.pem  # the listener falls back (1055)
    result = run(host, "machinekeys")
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is True
    assert host.rdp_view(connect=False).cert_pem == pinned.pem  # the pinned certificate is presented again
    assert host.filesystem.get(pinned.key_link.path).content == before  # the key itself untouched
    assert run(host, "machinekeys")["changed"] is False
