"""run_batch: result document, on_error, write counting, error types, reads that never change the host."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from rdplab.model.errors import BatchError
from rdplab.model.firewall import FirewallRule
from rdplab.model.host import WindowsHost
from rdplab.ops import OPS

HOSTS = Path(__file__).resolve().parent.parent / "hosts"
RDP_TCP = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations\\RDP-Tcp"
BACKUPS = "C:\\ProgramData\\rdpfix\\backups"


def load(name: str = "healthy") -> WindowsHost:
    return WindowsHost.from_file(HOSTS / f"{name}.yml")


def batch(*ops: tuple[str, dict[str, object]], on_error: str = "stop") -> dict[str, object]:
    return {"v": 1, "on_error": on_error, "ops": [{"op": name, "args": args} for name, args in ops]}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_operation_set_matches_the_python_side() -> None:
    from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _agent

    assert set(OPS) == set(_agent.OPERATIONS)
    assert {name for name, spec in OPS.items() if spec.writes} == set(_agent.WRITE_OPERATIONS)


def test_stop_skips_the_rest_and_continue_runs_it() -> None:
    host = load()
    ops: tuple[tuple[str, dict[str, object]], ...] = (
        ("registry.set", {"path": RDP_TCP, "name": "A", "type": "REG_DWORD", "value": 1}),
        ("service.restart", {"name": "NoSuchService"}),
        ("registry.set", {"path": RDP_TCP, "name": "B", "type": "REG_DWORD", "value": 2}),
        ("system.info", {}),
    )
    stopped = host.run_batch(batch(*ops))
    assert stopped["v"] == 1
    assert [r["ok"] for r in stopped["results"]] == [True, False, False, False]
    assert stopped["results"][1]["error"]["type"] == "NotFound"
    assert stopped["results"][2] == {"op": "registry.set", "ok": False, "skipped": True}
    assert stopped["results"][3] == {"op": "system.info", "ok": False, "skipped": True}
    assert host.registry.get(RDP_TCP, "B") is None
    assert host.counters.writes == 1

    continued = host.run_batch(batch(*ops, on_error="continue"))
    assert [r["ok"] for r in continued["results"]] == [True, False, True, True]
    assert host.registry.get(RDP_TCP, "B") is not None
    assert host.counters.writes == 3  # failed writes do not count


def test_default_on_error_is_stop() -> None:
    host = load()
    document = {"v": 1, "ops": [{"op": "service.start", "args": {"name": "Nope"}}, {"op": "system.info", "args": {}}]}
    assert host.run_batch(document)["results"][1].get("skipped") is True


def test_unknown_operation_is_unsupported() -> None:
    host = load()
    result = host.run_batch(batch(("registry.delete_everything", {}), ("system.info", {}), on_error="continue"))
    assert result["results"][0]["ok"] is False
    assert result["results"][0]["error"]["type"] == "Unsupported"
    assert result["results"][1]["ok"] is True


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("registry.get", {"path": "HKXX:\\Nope"}),
        ("registry.set", {"path": RDP_TCP, "name": "X", "type": "REG_DWORD", "value": "1"}),
        ("registry.set", {"path": RDP_TCP, "name": "X", "type": "REG_BINARY", "value": "ABC"}),
        ("registry.set", {"path": RDP_TCP, "name": "X", "type": "REG_NONE", "value": 1}),
        ("cert.import", {"store": "My", "der_b64": "not base64!"}),
        ("cert.import", {"store": "My", "der_b64": b64(b"not a certificate")}),
        ("cert.remove", {"store": "My", "thumbprint": "12"}),
        ("listener.set_certificate", {"thumbprint": "AB" * 20}),
        ("util.sleep", {"milliseconds": 60001}),
        ("file.write", {"path": "relative\\x.txt", "content_b64": ""}),
        ("file.write", {"path": "C:\\ProgramData\\x.txt", "content_b64": "%%%"}),
        ("dir.create", {"path": "C:\\ProgramData\\x", "sddl": "garbage"}),
        ("service.get", {}),
        ("service.restart", {"name": "TermService", "force": "yes"}),
        ("dir.read_each", {"path": BACKUPS, "names": []}),
        ("dir.read_each", {"path": BACKUPS, "names": ["..\\manifest.json"]}),
    ],
)
def test_bad_arguments_are_invalid_argument(op: str, args: dict[str, object]) -> None:
    host = load()
    before = host.snapshot()
    [result] = host.run_batch(batch((op, args)))["results"]
    assert result["ok"] is False
    assert result["error"]["type"] == "InvalidArgument", result
    assert result["error"]["message"]
    assert host.snapshot() == before


def test_malformed_batch_raises_batch_error() -> None:
    host = load()
    with pytest.raises(BatchError):
        host.run_batch({"v": 2, "ops": []})
    with pytest.raises(BatchError):
        host.run_batch({"v": 1, "ops": {}})
    with pytest.raises(BatchError):
        host.run_batch({"v": 1, "on_error": "ignore", "ops": []})


def _all_reads(host: WindowsHost) -> list[tuple[str, dict[str, object]]]:
    thumbprint = host.stores.entries("Remote Desktop")[0].thumbprint if host.stores.entries("Remote Desktop") else ""
    assert thumbprint is not None
    key_dir = "C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys"
    return [
        ("system.info", {}),
        ("registry.get", {"path": RDP_TCP}),
        ("registry.get", {"path": RDP_TCP, "names": ["SSLCertificateSHA1Hash", "PortNumber"]}),
        ("registry.get", {"path": "HKLM:\\SOFTWARE\\Missing"}),
        ("listener.get", {}),
        ("cert.list", {"store": "My"}),
        ("cert.list", {"store": "Remote Desktop"}),
        ("cert.list", {"store": "NoSuchStore"}),
        ("service.get", {"names": ["TermService", "SessionEnv", "Nope"]}),
        ("session.list", {}),
        ("file.stat", {"path": key_dir}),
        ("file.stat", {"path": "C:\\nope.txt"}),
        ("file.read", {"path": "C:\\nope.txt"}),
        ("dir.list", {"path": key_dir}),
        ("dir.list", {"path": "C:\\nope"}),
        ("dir.read_each", {"path": "C:\\ProgramData\\Microsoft\\Crypto", "names": ["a.txt"]}),
        ("dir.read_each", {"path": "C:\\nope", "names": ["a.txt"]}),
        ("util.sleep", {"milliseconds": 10}),
    ]


@pytest.mark.parametrize("name", sorted(path.stem for path in HOSTS.glob("*.yml")))
def test_reads_never_change_any_host(name: str) -> None:
    host = load(name)
    before = host.snapshot()
    result = host.run_batch(batch(*_all_reads(host), on_error="continue"))
    assert all(item["ok"] for item in result["results"]), result
    assert host.snapshot() == before
    assert host.counters.writes == 0


def test_each_successful_write_counts_once() -> None:
    host = load("expired-selfsigned")
    cert = host.stores.entries("Remote Desktop")[0]
    result = host.run_batch(
        batch(
            ("dir.create", {"path": BACKUPS + "\\m1"}),
            ("file.write", {"path": BACKUPS + "\\m1\\manifest.json", "content_b64": b64(b"{}")}),
            ("file.copy", {"src": cert.key_link.path if cert.key_link else "", "dest": BACKUPS + "\\m1\\key"}),
            ("registry.set", {"path": RDP_TCP, "name": "PortNumber", "type": "REG_DWORD", "value": 3389}),
            ("cert.remove", {"store": "Remote Desktop", "thumbprint": cert.thumbprint}),
            ("service.restart", {"name": "SessionEnv", "force": False}),
        )
    )
    assert all(item["ok"] for item in result["results"]), result
    assert host.counters.writes == 6


def test_write_fault_fails_the_backup_and_stops_before_the_destructive_step() -> None:
    host = load("expired-selfsigned")
    host.inject_fault("fail_writes_under", {"path": "C:\\ProgramData\\rdpfix", "error": "DiskFull"})
    cert = host.stores.entries("Remote Desktop")[0]
    result = host.run_batch(
        batch(
            ("dir.create", {"path": BACKUPS + "\\m2"}),
            ("file.write", {"path": BACKUPS + "\\m2\\manifest.json", "content_b64": b64(b"{}")}),
            ("cert.remove", {"store": "Remote Desktop", "thumbprint": cert.thumbprint}),
        )
    )
    first = result["results"][0]
    assert first["ok"] is False and first["error"]["type"] == "DiskFull"
    assert [item.get("skipped") for item in result["results"][1:]] == [True, True]
    assert host.stores.find("Remote Desktop", cert.thumbprint) is not None
    assert not host.filesystem.exists("C:\\ProgramData\\rdpfix")
    assert host.counters.writes == 0


@pytest.mark.parametrize("error", ["DiskFull", "AccessDenied"])
def test_failed_file_write_leaves_no_partial_file(error: str) -> None:
    host = load()
    host.run_batch(batch(("dir.create", {"path": BACKUPS})))
    host.inject_fault("fail_writes_under", {"path": BACKUPS + "\\m3", "error": error})
    result = host.run_batch(
        batch(
            ("dir.create", {"path": BACKUPS + "\\other"}),
            ("file.write", {"path": BACKUPS + "\\other\\ok.txt", "content_b64": b64(b"fine")}),
            ("dir.create", {"path": BACKUPS + "\\m3"}),
        )
    )
    assert [item["ok"] for item in result["results"]] == [True, True, False]
    assert result["results"][2]["error"]["type"] == error
    assert host.filesystem.exists(BACKUPS + "\\OTHER\\OK.TXT")  # paths are case-insensitive
    assert not host.filesystem.exists(BACKUPS + "\\m3")


def test_file_write_needs_an_existing_parent() -> None:
    host = load()
    [result] = host.run_batch(batch(("file.write", {"path": "C:\\nodir\\x.txt", "content_b64": ""})))["results"]
    assert result["error"]["type"] == "NotFound"


def test_cert_backup_remove_restore_and_repair_key_link() -> None:
    """What a careful fix does with a certificate and its key file: everything can be put back."""
    host = load("healthy")
    cert = host.stores.entries("Remote Desktop")[0]
    assert cert.key_link is not None
    key_path = cert.key_link.path
    der_b64 = b64(cert.der)
    original = host.snapshot()
    saved = host.run_batch(
        batch(
            ("dir.create", {"path": BACKUPS + "\\m4"}),
            ("file.copy", {"src": key_path, "dest": BACKUPS + "\\m4\\key.bin"}),
            ("cert.remove", {"store": "Remote Desktop", "thumbprint": cert.thumbprint}),
        )
    )
    assert all(item["ok"] for item in saved["results"])
    assert saved["results"][2]["data"] == {"removed": True}
    copied = host.filesystem.get(BACKUPS + "\\m4\\key.bin")
    source = host.filesystem.get(key_path)
    assert copied is not None and source is not None and copied.content == source.content

    # The key file is lost too; restore both.
    assert host.filesystem.remove(key_path)
    key_content = b64(copied.content)
    restored = host.run_batch(
        batch(
            ("file.write", {"path": key_path, "content_b64": key_content}),
            ("cert.import", {"store": "Remote Desktop", "der_b64": der_b64}),
            ("cert.list", {"store": "Remote Desktop"}),
            ("cert.repair_key_link", {"store": "Remote Desktop", "thumbprint": cert.thumbprint}),
            ("cert.list", {"store": "Remote Desktop"}),
        )
    )
    results = restored["results"]
    assert all(item["ok"] for item in results), results
    assert results[1]["data"] == {"thumbprint": cert.thumbprint}
    assert results[2]["data"]["certificates"][0]["has_private_key"] is False
    assert results[3]["data"] == {"has_private_key": True}
    assert results[4]["data"]["certificates"][0]["key"]["container"] == "TSSecKeySet1"
    # Everything is back except the key file's ACL: a new file in MachineKeys does not grant NETWORK SERVICE read,
    # so the listener cannot use the key until the ACL is restored too (the job of ACL operations).
    after = host.snapshot()["certificates"]["Remote Desktop"]
    before = original["certificates"]["Remote Desktop"]
    assert [{**entry, "key_usable": None} for entry in after] == [{**entry, "key_usable": None} for entry in before]
    assert before[0]["key_usable"] is True and after[0]["key_usable"] is False
    assert host.rdp_view().failure == "reset_after_x224"


def test_repair_key_link_without_a_matching_key() -> None:
    host = load("pinned-no-private-key")
    [cert] = host.stores.entries("My")
    [result] = host.run_batch(batch(("cert.repair_key_link", {"store": "My", "thumbprint": cert.thumbprint})))[
        "results"
    ]
    assert result == {"op": "cert.repair_key_link", "ok": True, "data": {"has_private_key": False}}
    [missing] = host.run_batch(batch(("cert.repair_key_link", {"store": "My", "thumbprint": "00" * 20})))["results"]
    assert missing["error"]["type"] == "NotFound"


def test_listener_set_certificate_requires_my_store() -> None:
    host = load("healthy")
    selfsigned = host.stores.entries("Remote Desktop")[0]
    [result] = host.run_batch(batch(("listener.set_certificate", {"thumbprint": selfsigned.thumbprint})))["results"]
    assert result["error"]["type"] == "InvalidArgument"
    assert "Invalid Parameter" in result["error"]["message"]
    assert host.registry.get(RDP_TCP, "SSLCertificateSHA1Hash") is None


def test_registry_set_and_remove_return_previous_and_create_keys() -> None:
    host = load()
    path = "HKLM:\\SOFTWARE\\rdpfix\\test\\deep"
    results = host.run_batch(
        batch(
            ("registry.set", {"path": path, "name": "V", "type": "REG_MULTI_SZ", "value": ["a", "b"]}),
            ("registry.set", {"path": path.lower(), "name": "v", "type": "REG_SZ", "value": "x"}),
            ("registry.get", {"path": "HKLM:\\SOFTWARE\\rdpfix\\test"}),
            ("registry.remove", {"path": path, "name": "V"}),
            ("registry.remove", {"path": path, "name": "V"}),
            ("registry.remove", {"path": "HKLM:\\SOFTWARE\\Missing", "name": "V"}),
        )
    )["results"]
    assert results[0]["data"] == {"previous": None}
    assert results[1]["data"] == {"previous": {"type": "REG_MULTI_SZ", "value": ["a", "b"]}}
    assert results[2]["data"] == {"exists": True, "values": {}, "subkeys": ["deep"]}
    assert results[3]["data"] == {"previous": {"type": "REG_SZ", "value": "x"}}
    assert results[4]["data"] == {"previous": None}
    assert results[5]["data"] == {"previous": None}


def test_group_policy_rules_can_be_neither_changed_nor_removed_locally() -> None:
    host = load()
    # What a GPO delivers lives in Group Policy's store (RSOP), not in the local one the agent writes.
    host.firewall.policy_rules["gpo-rdp-in"] = FirewallRule("GPO-RDP-In", "GPO RDP", source="GroupPolicy")
    before = host.firewall.snapshot()
    results = host.run_batch(
        batch(
            ("firewall.rule.set", {"name": "GPO-RDP-In", "enabled": False}),
            ("firewall.rule.remove", {"name": "gpo-rdp-in"}),
            on_error="continue",
        )
    )["results"]
    # Set-NetFirewallRule works on PersistentStore: NotFound, as Windows answers; the agent names the policy rule.
    assert results[0]["error"]["type"] == "NotFound"
    assert "Group Policy" in results[0]["error"]["message"]
    # Remove looks in the local store only: nothing of that Name there, nothing removed.
    assert results[1] == {"op": "firewall.rule.remove", "ok": True, "data": {"previous": None}}
    assert host.firewall.snapshot() == before
    # A local rule is still removed (by Name, case-insensitively), and removing it again answers null.
    results = host.run_batch(
        batch(
            ("firewall.rule.remove", {"name": "remotedesktop-shadow-in-tcp"}),
            ("firewall.rule.remove", {"name": "RemoteDesktop-Shadow-In-TCP"}),
        )
    )["results"]
    assert results[0]["data"]["previous"]["name"] == "RemoteDesktop-Shadow-In-TCP"
    assert results[1]["data"] == {"previous": None}
    assert host.counters.writes == 3  # rule.new and the two removals; the refused operations count nothing


def test_dir_read_each_reads_the_named_files_of_every_subfolder() -> None:
    host = load()
    writes = [
        ("dir.create", {"path": f"{BACKUPS}\\20261125T103000Z-certificate-1a2b"}),
        (
            "file.write",
            {"path": f"{BACKUPS}\\20261125T103000Z-certificate-1a2b\\manifest.json", "content_b64": b64(b"{}")},
        ),
        ("dir.create", {"path": f"{BACKUPS}\\empty"}),
        ("file.write", {"path": f"{BACKUPS}\\stray.txt", "content_b64": b64(b"x")}),
    ]
    assert all(item["ok"] for item in host.run_batch(batch(*writes))["results"])
    [result] = host.run_batch(batch(("dir.read_each", {"path": BACKUPS, "names": ["manifest.json", "restored.json"]})))[
        "results"
    ]
    assert result["ok"], result
    assert result["data"] == {
        "exists": True,
        "folders": [
            {
                "name": "20261125T103000Z-certificate-1a2b",
                "files": {"manifest.json": b64(b"{}"), "restored.json": None},
                "errors": {},
            },
            {"name": "empty", "files": {"manifest.json": None, "restored.json": None}, "errors": {}},
        ],
    }


def test_dir_create_claim_lets_one_caller_have_the_folder() -> None:
    host = load()
    folder = BACKUPS + "\\m3"
    claim = {"path": folder, "claim": "claim.txt", "claim_text": "first"}
    first = host.run_batch(batch(("dir.create", claim)))["results"][0]
    assert first["ok"] and first["data"] == {"created": True, "claimed": True}
    # The folder is there: the second caller fails on the claim file, and the batch stops before its write.
    second = host.run_batch(
        batch(
            ("dir.create", {**claim, "claim_text": "second"}),
            ("file.write", {"path": folder + "\\manifest.json", "content_b64": b64(b"{}")}),
        )
    )["results"]
    assert second[0]["error"]["type"] == "AlreadyClaimed" and second[1].get("skipped")
    # It reports the claim it found (the controller tells a claim of its own batch from another run's).
    assert second[0]["data"] == {"claim_text": "first"}
    claimed = host.filesystem.get(folder + "\\claim.txt")
    assert claimed is not None and claimed.content == b"first"
    assert not host.filesystem.exists(folder + "\\manifest.json")
    told = host.run_batch(batch(("dir.create", {**claim, "must_claim": False})))["results"][0]
    assert told["ok"] and told["data"] == {"created": False, "claimed": False}
    # A folder that exists unclaimed can still be claimed once; without a claim, dir.create is as before.
    host.run_batch(batch(("dir.create", {"path": BACKUPS + "\\m4"})))
    again = host.run_batch(batch(("dir.create", {"path": BACKUPS + "\\m4", "claim": "claim.txt"})))["results"][0]
    assert again["ok"] and again["data"] == {"created": False, "claimed": True}
    refused = host.run_batch(batch(("dir.create", {"path": BACKUPS + "\\m5", "claim": "..\\x"})))["results"][0]
    assert refused["error"]["type"] == "InvalidArgument" and not host.filesystem.exists(BACKUPS + "\\m5")
