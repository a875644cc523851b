"""The restore planner's pure parts: ids, manifests, the batches it sends, and the plan for each kind of item."""

from __future__ import annotations

import base64
import json
import typing as t
from datetime import UTC, datetime, timedelta

import pytest

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _certificate as certificate
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _restore as rs
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import BackupSet
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import WRITE_OPERATIONS, BatchResult, OpResult

NOW = datetime(2026, 11, 25, 10, 30, tzinfo=UTC)
ROOT = "C:\\ProgramData\\rdpfix\\backups"
MANIFEST_ID = "20261125T103000Z-certificate-1a2b"
KEY = "C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys\\f686aace6942fb7f7ceb231212eef4a4_guid"
KEY_SDDL = "O:SYG:SYD:P(A;;FA;;;SY)(A;;FR;;;NS)(A;;FR;;;BA)"
RDP_TCP = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations\\RDP-Tcp"
POLICY = "HKLM:\\SOFTWARE\\Policies\\Microsoft\\Windows NT\\Terminal Services"


def encoded(document: t.Any) -> str:
    return base64.b64encode(json.dumps(document).encode("utf-8")).decode("ascii")


def manifest(items: list[dict[str, t.Any]], module: str = "certificate", manifest_id: str = MANIFEST_ID) -> rs.Manifest:
    return rs.Manifest(
        id=manifest_id,
        module=f"rdpfix.rdp.{module}",
        host="WEB01",
        created=NOW,
        items=tuple(items),
        actions=(),
        directory=f"{ROOT}\\{manifest_id}",
    )


def state(**parts: t.Any) -> rs.HostState:
    defaults: dict[str, t.Any] = {
        "cert": None,
        "keys": None,
        "stores": {},
        "registry": {},
        "rules": None,
        "files": {},
        "contents": {},
    }
    return rs.HostState(**(defaults | parts))


def new_backup() -> BackupSet:
    return BackupSet.create("restore", "WEB01", ROOT, NOW + timedelta(hours=1))


def plan(
    host: rs.HostState, item_list: list[dict[str, t.Any]], module: str = "certificate", **options: t.Any
) -> rs.ManifestPlan:
    return rs.plan_manifest(host, manifest(item_list, module), ROOT, new_backup(), rs.Options(**options))


def ops(result: rs.ManifestPlan) -> list[str]:
    return [step.op for step in result.steps]


def stored(der: bytes, store: str = "Remote Desktop", key_path: str | None = KEY) -> certificate.StoredCertificate:
    item = {
        "thumbprint": "",
        "der_b64": base64.b64encode(der).decode("ascii"),
        "has_private_key": key_path is not None,
        "key": {"path": key_path, "exists": True, "sddl": KEY_SDDL} if key_path else None,
    }
    return certificate.StoredCertificate.from_agent(store, item, NOW)


# ---------------------------------------------------------------------------------------------------- ids, manifests


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ()),
        (MANIFEST_ID, (MANIFEST_ID,)),
        ([MANIFEST_ID, " 20261125T103001Z-restore-beef ", MANIFEST_ID], (MANIFEST_ID, "20261125T103001Z-restore-beef")),
    ],
)
def test_manifest_ids_are_accepted_as_one_or_a_list(value: object, expected: tuple[str, ...]) -> None:
    assert rs.validate_manifest_ids(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "..\\..\\Windows",
        "a/b",
        "20261125T103000Z-certificate-1a2b\\..",
        "certificate-1a2b",
        "20261125T103000Z--1a2b",
        "",
    ],
)
def test_anything_but_a_manifest_id_is_refused(value: str) -> None:
    with pytest.raises(rs.RestoreError, match="is not a manifest id"):
        rs.validate_manifest_ids([value])


def test_discovery_is_one_read_only_batch() -> None:
    batch, index = rs.build_discovery_batch(ROOT, ())
    assert not batch.writes and batch.on_error == "continue"
    assert [op["op"] for op in batch.ops] == ["system.info", "dir.read_each"] and index.listing == 1
    assert batch.ops[1]["args"] == {"path": ROOT, "names": ["manifest.json", "restored.json", "claim.txt"]}
    batch, index = rs.build_discovery_batch(ROOT, (MANIFEST_ID,))
    assert index.listing is None
    assert [op["args"].get("path") for op in batch.ops[1:]] == [
        f"{ROOT}\\{MANIFEST_ID}\\manifest.json",
        f"{ROOT}\\{MANIFEST_ID}\\restored.json",
    ]


def read_result(document: t.Any, marker: t.Any = None, exists: bool = True) -> BatchResult:
    body = {"exists": exists, "content_b64": encoded(document) if exists else None}
    mark = {"exists": marker is not None, "content_b64": encoded(marker) if marker is not None else None}
    return BatchResult("web01", [OpResult("file.read", True, body), OpResult("file.read", True, mark)])


def document(**overrides: t.Any) -> dict[str, t.Any]:
    return {
        "v": 1,
        "id": MANIFEST_ID,
        "module": "rdpfix.rdp.certificate",
        "host": "WEB01",
        "created": "2026-11-25T10:30:00Z",
        "items": [{"kind": "registry_value", "path": RDP_TCP, "name": "SSLCertificateSHA1Hash", "previous": None}],
        "actions": ["remove the registry value SSLCertificateSHA1Hash", "restart SessionEnv"],
    } | overrides


def test_a_manifest_is_parsed_with_its_marker() -> None:
    parsed = rs.parse_manifest(read_result(document(), {"restored_by": "x"}), (0, 1), MANIFEST_ID, ROOT)
    assert parsed.module == "rdpfix.rdp.certificate" and parsed.created == NOW
    assert parsed.restored == {"restored_by": "x"}
    summary = parsed.summary()
    assert (
        summary["restored"] is True and summary["restored_by"] == "x" and summary["created"] == "2026-11-25T10:30:00Z"
    )
    assert summary["actions"] == ["remove the registry value SSLCertificateSHA1Hash", "restart SessionEnv"]


def test_certificate_bodies_are_left_out_of_the_list() -> None:
    items = [{"kind": "rdp_certificate", "der_b64": "MIIB", "thumbprint": "AB"}]
    summary = rs.parse_manifest(read_result(document(items=items)), (0, 1), MANIFEST_ID, ROOT).summary()
    assert summary["items"] == [{"kind": "rdp_certificate", "thumbprint": "AB"}]


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (read_result(None, exists=False), "there is no backup manifest"),
        (read_result(document(id="20261125T103000Z-tls-0000")), "names '20261125T103000Z-tls-0000'"),
        (read_result(document(v=3)), "version 3"),
        (read_result(document(module="someone.else")), "not written by rdpfix.rdp"),
        (read_result(document(items="all")), "malformed"),
        (
            BatchResult("web01", [OpResult("file.read", True, {"exists": True, "content_b64": "bm90IGpzb24="})] * 2),
            "not valid JSON",
        ),
        (
            BatchResult("web01", [OpResult("file.read", False, error_type="AccessDenied", error_message="no")] * 2),
            "AccessDenied",
        ),
    ],
)
def test_unusable_manifests_are_refused(result: BatchResult, message: str) -> None:
    with pytest.raises(rs.RestoreError, match=message):
        rs.parse_manifest(result, (0, 1), MANIFEST_ID, ROOT)


def test_unknown_item_kinds_are_refused() -> None:
    with pytest.raises(rs.RestoreError, match="cannot put back: scheduled_task"):
        rs.check_restorable(manifest([{"kind": "scheduled_task"}]))
    with pytest.raises(rs.RestoreError, match="cannot put back: registry_value"):
        rs.check_restorable(manifest([{"kind": "acl"}, {"kind": "registry_value"}], "machinekeys"))


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"kind": "private_key_file", "file": "..\\..\\Windows\\x", "source": KEY}, "outside its folder"),
        ({"kind": "certificate", "file": "C:x.cer", "store": "My", "thumbprint": "A"}, "outside its folder"),
        ({"kind": "restores", "manifest_id": "..\\..\\Windows"}, "not a manifest id"),
    ],
)
def test_a_manifest_cannot_point_outside_the_backup_folders(item: dict[str, t.Any], message: str) -> None:
    with pytest.raises(rs.RestoreError, match=message):
        rs.check_restorable(manifest([item]))


def test_manifests_are_restored_newest_first_and_new_ones_sort_in_creation_order() -> None:
    older = manifest([], manifest_id="20261125T103000Z-firewall-0001")
    newer = rs.Manifest(**{**older.__dict__, "id": "20261125T103500Z-tls-0002", "created": NOW + timedelta(minutes=5)})
    assert [item.id for item in rs.newest_first([older, newer])] == [newer.id, older.id]
    ids = [BackupSet.create("restore", "WEB01", ROOT, moment).manifest_id for moment in rs.backup_times(NOW, 3)]
    assert ids == sorted(ids) and len({manifest_id[:16] for manifest_id in ids}) == 3


def test_the_listing_keeps_only_manifest_folders_newest_first_with_their_files() -> None:
    def b64(document: dict[str, t.Any]) -> str:
        return base64.b64encode(json.dumps(document).encode()).decode()

    older, newer = "20261125T103000Z-certificate-1a2b", "20261125T110000Z-restore-3c4d"
    manifest = {"v": 1, "id": older, "module": "rdpfix.rdp.certificate", "items": [], "actions": ["remove"]}
    folders = [
        {"name": older, "files": {"manifest.json": b64(manifest), "restored.json": None}, "errors": {}},
        {"name": newer, "files": {"restored.json": None}, "errors": {"manifest.json": "AccessDenied: denied"}},
        {"name": "old", "files": {"manifest.json": None, "restored.json": None}, "errors": {}},
    ]
    result = BatchResult("web01", [OpResult("dir.read_each", True, {"exists": True, "folders": folders})])
    read, positions = rs.listed_manifests(result, 0)
    assert list(positions) == [newer, older]
    listed = rs.parse_manifest(read, positions[older], older, ROOT)
    assert (listed.module, listed.actions, listed.restored) == ("rdpfix.rdp.certificate", ("remove",), None)
    with pytest.raises(rs.RestoreError, match="AccessDenied: denied"):
        rs.parse_manifest(read, positions[newer], newer, ROOT)
    empty = BatchResult("web01", [OpResult("dir.read_each", True, {"exists": False, "folders": []})])
    assert rs.listed_manifests(empty, 0)[1] == {}


# ---------------------------------------------------------------------------------------------------- state reads


def test_the_state_read_covers_what_the_manifests_touch() -> None:
    items = [
        {"kind": "registry_value", "path": POLICY, "name": "SelectTransport", "previous": None},
        {"kind": "firewall_rule", "name": "r", "operation": "firewall.rule.new", "previous": None},
        {"kind": "private_key_file", "source": KEY, "file": "A.key", "thumbprint": "A"},
        {"kind": "certificate", "store": "Root", "thumbprint": "A", "file": "A.cer", "has_private_key": False},
    ]
    needs = rs.needs_of([manifest(items, "firewall")], ROOT)
    batch, index = rs.build_state_batch(needs, "C:\\ProgramData", NOW)
    assert not batch.writes
    assert index.registry == {POLICY: index.registry[POLICY]}
    assert batch.ops[index.registry[POLICY]]["args"] == {"path": POLICY, "names": ["SelectTransport"]}
    assert index.firewall is not None and index.cert is not None and index.machinekeys is None
    assert set(index.stores) == {"Root"}
    assert set(index.stats) == {KEY.casefold(), f"{ROOT}\\{MANIFEST_ID}\\A.key".casefold()}
    assert set(index.contents) == {f"{ROOT}\\{MANIFEST_ID}\\A.cer".casefold()}


def test_a_machinekeys_manifest_reads_the_key_store() -> None:
    needs = rs.needs_of([manifest([{"kind": "acl", "path": KEY, "previous_sddl": KEY_SDDL}], "machinekeys")], ROOT)
    _batch, index = rs.build_state_batch(needs, "C:\\ProgramData", NOW)
    assert index.machinekeys is not None and index.cert is None


# ---------------------------------------------------------------------------------------------------- registry


def test_registry_values_get_their_previous_type_and_value_back() -> None:
    host = state(
        registry={
            (POLICY.casefold(), "selecttransport"): {"type": "REG_DWORD", "value": 1},
            (POLICY.casefold(), "fclientdisableudp"): {"type": "REG_DWORD", "value": 1},
            (POLICY.casefold(), "same"): {"type": "REG_DWORD", "value": 3},
        }
    )
    items = [
        {
            "kind": "registry_value",
            "path": POLICY,
            "name": "SelectTransport",
            "previous": {"type": "REG_DWORD", "value": 0},
        },
        {"kind": "registry_value", "path": POLICY, "name": "fClientDisableUDP", "previous": None},
        {"kind": "registry_value", "path": POLICY, "name": "Same", "previous": {"type": "REG_DWORD", "value": 3}},
    ]
    result = plan(host, items, "transport")
    assert [(step.op, step.args) for step in result.steps] == [
        ("registry.set", {"path": POLICY, "name": "SelectTransport", "type": "REG_DWORD", "value": 0}),
        ("registry.remove", {"path": POLICY, "name": "fClientDisableUDP"}),
    ]
    # What the restore overwrites goes into its own manifest, in the same shape: the restore is restorable.
    saved = [item for item in result.backup.items if item["kind"] == "registry_value"]
    assert [item["previous"] for item in saved] == [{"type": "REG_DWORD", "value": 1}] * 2
    assert result.restart_required == ["TermService"] and result.restart_service is None
    before, after = result.diff()
    assert before[f"registry {POLICY}\\SelectTransport"] == {"type": "REG_DWORD", "value": 1}
    assert after[f"registry {POLICY}\\fClientDisableUDP"] is None


def test_the_pin_is_put_back_with_a_restart_and_schannel_values_need_a_reboot() -> None:
    schannel = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\SecurityProviders\\SCHANNEL\\Protocols\\TLS 1.2\\Server"
    items = [
        {
            "kind": "registry_value",
            "path": RDP_TCP,
            "name": "SSLCertificateSHA1Hash",
            "previous": {"type": "REG_BINARY", "value": "ab"},
        },
        {"kind": "registry_value", "path": schannel, "name": "Enabled", "previous": {"type": "REG_DWORD", "value": 0}},
    ]
    result = plan(state(), items, restart_service="TermService")
    assert result.restart_service == "TermService" and result.reboot_required is True
    assert any(action["action"] == "restart_service" for action in result.actions("planned"))


def test_a_binary_value_compares_without_case() -> None:
    host = state(registry={(RDP_TCP.casefold(), "sslcertificatesha1hash"): {"type": "REG_BINARY", "value": "AB"}})
    item = {
        "kind": "registry_value",
        "path": RDP_TCP,
        "name": "SSLCertificateSHA1Hash",
        "previous": {"type": "REG_BINARY", "value": "ab"},
    }
    result = plan(host, [item])
    assert not result.has_changes and result.restart_service is None


# ---------------------------------------------------------------------------------------------------- firewall


def rule(name: str, **fields: t.Any) -> dict[str, t.Any]:
    return {
        "name": name,
        "display_name": name,
        "group": "@FirewallAPI.dll,-28752",
        "direction": "Inbound",
        "action": "Allow",
        "enabled": True,
        "profiles": 3,
        "protocol": "TCP",
        "local_ports": ["3389"],
        "remote_ports": ["Any"],
        "remote_addresses": ["Any"],
        "program": "%SystemRoot%\\system32\\svchost.exe",
        "service": "termservice",
        "policy_store_source_type": "Local",
    } | fields


def test_firewall_rules_get_their_previous_record_back() -> None:
    changed = rule("RemoteDesktop-UserMode-In-TCP")
    created = rule("rdpfix-RemoteDesktop-In-TCP", group="rdpfix")
    host = state(rules={changed["name"].casefold(): changed, created["name"].casefold(): created})
    items = [
        {
            "kind": "firewall_rule",
            "name": changed["name"],
            "operation": "firewall.rule.set",
            "previous": rule(changed["name"], enabled=False, profiles=0, display_name="other"),
        },
        {"kind": "firewall_rule", "name": created["name"], "operation": "firewall.rule.new", "previous": None},
        {
            "kind": "firewall_rule",
            "name": "gone",
            "operation": "firewall.rule.remove",
            "previous": rule("gone", group="rdpfix", remote_ports=["50000"], service="Any"),
        },
        {"kind": "firewall_rule", "name": "already-gone", "operation": "firewall.rule.new", "previous": None},
    ]
    result = plan(host, items, "firewall")
    assert [(step.op, step.args.get("name")) for step in result.steps] == [
        ("firewall.rule.set", changed["name"]),
        ("firewall.rule.remove", created["name"]),
        ("firewall.rule.new", "gone"),
    ]
    assert result.steps[0].args == {"name": changed["name"], "enabled": False, "profiles": 0}
    recreated = result.steps[2].args
    assert recreated["group"] == "rdpfix" and "service" not in recreated
    assert recreated["description"] == "Created by rdpfix.rdp.firewall"
    saved = {item["name"]: item for item in result.backup.items if item["kind"] == "firewall_rule"}
    assert saved[changed["name"]] == {
        "kind": "firewall_rule",
        "name": changed["name"],
        "operation": "firewall.rule.set",
        "previous": changed,
    }
    assert (
        saved[created["name"]]["operation"] == "firewall.rule.remove" and saved[created["name"]]["previous"] == created
    )
    assert saved["gone"] == {
        "kind": "firewall_rule",
        "name": "gone",
        "operation": "firewall.rule.new",
        "previous": None,
    }
    warnings = " ".join(result.warnings)
    assert "display_name" in warnings and "remote port filter" in warnings


def test_a_rule_without_group_cannot_be_recreated() -> None:
    item = {"kind": "firewall_rule", "name": "x", "operation": "firewall.rule.remove", "previous": rule("x", group="")}
    with pytest.raises(rs.RestoreError, match="has no group"):
        plan(state(rules={}), [item], "firewall")


# ---------------------------------------------------------------------------------------------------- certificates


def test_a_certificate_run_is_undone_with_windows_new_certificate_saved_first(cert_factory: t.Any) -> None:
    old = stored(cert_factory.make("WEB01", now=NOW, days_left=-3, days_old=180))
    new = stored(cert_factory.make("WEB01", now=NOW, days_left=182, days_old=0))
    other = stored(cert_factory.make("WEB01", now=NOW, days_left=100, days_old=3), key_path=None)
    saved_key = f"{ROOT}\\{MANIFEST_ID}\\{old.thumbprint}.key"
    host = state(
        stores={"Remote Desktop": (new, other)},
        files={KEY.casefold(): rs.FileState(True, "new", KEY_SDDL), saved_key.casefold(): rs.FileState(True, "old")},
        contents={f"{ROOT}\\{MANIFEST_ID}\\{old.thumbprint}.cer".casefold(): old.der},
    )
    items = [
        {
            "kind": "certificate",
            "file": f"{old.thumbprint}.cer",
            "store": "Remote Desktop",
            "thumbprint": old.thumbprint,
            "has_private_key": True,
        },
        {"kind": "private_key_file", "file": f"{old.thumbprint}.key", "source": KEY, "thumbprint": old.thumbprint},
    ]
    result = plan(host, items)
    # Saved before the new manifest: the new certificate's DER and the key file about to be overwritten. The
    # overwritten file keeps its ACL, which on 17763+ keeps the copy (READ_CONTROL) and certutil -repairstore out:
    # SYSTEM and Administrators before the copy, the recorded ACL after the re-link.
    assert [op["op"] for op in result.saves.ops] == ["file.write", "file.copy"]
    assert result.saves.ops[1]["args"]["src"] == KEY
    assert ops(result) == [
        "cert.remove",
        "acl.set",
        "file.copy",
        "cert.import",
        "cert.repair_key_link",
        "acl.set",
    ]
    assert result.steps[0].args == {"store": "Remote Desktop", "thumbprint": new.thumbprint}
    assert result.steps[1].args == {"path": KEY, "sddl": rs.RELINK_KEY_SDDL}
    assert result.steps[5].args == {"path": KEY, "sddl": KEY_SDDL}
    kinds = [item["kind"] for item in result.backup.items]
    assert kinds == ["restores", "certificate", "private_key_file", "certificate_imported"]
    assert result.backup.items[2]["thumbprint"] == new.thumbprint
    before, after = result.diff()
    assert before["certificates LocalMachine\\Remote Desktop"] == sorted([new.thumbprint, other.thumbprint])
    assert after["certificates LocalMachine\\Remote Desktop"] == sorted([other.thumbprint, old.thumbprint])


def test_the_key_of_a_certificate_windows_created_elsewhere_moves_into_the_backup(cert_factory: t.Any) -> None:
    new = stored(cert_factory.make("WEB01", now=NOW, days_left=182, days_old=0))
    result = plan(state(stores={"Remote Desktop": (new,)}), [])
    assert ops(result) == ["file.move", "cert.remove"]
    assert result.steps[0].args == {"src": KEY, "dest": f"{result.backup.directory}\\{new.thumbprint}.key"}
    moved = next(item for item in result.backup.items if item["kind"] == "private_key_file")
    assert moved == {
        "kind": "private_key_file",
        "file": f"{new.thumbprint}.key",
        "source": KEY,
        "thumbprint": new.thumbprint,
        "sddl": KEY_SDDL,
        "owner": None,
    }


@pytest.mark.parametrize(
    ("module", "items", "days_old", "removed"),
    [
        ("certificate", [], 0, True),  # the certificate was missing: only the restart
        ("certificate", [], 2, False),  # a certificate older than the run is not Windows' answer to it
        ("transport", [], 0, False),  # only a certificate run regenerates
        (
            "certificate",
            [{"kind": "registry_value", "path": RDP_TCP, "name": "SSLCertificateSHA1Hash", "previous": None}],
            0,
            False,
        ),
    ],
)
def test_only_a_regenerating_certificate_run_removes_a_new_certificate(
    cert_factory: t.Any, module: str, items: list[dict[str, t.Any]], days_old: float, removed: bool
) -> None:
    cert = stored(cert_factory.make("WEB01", now=NOW, days_left=182, days_old=days_old))
    host = state(stores={"Remote Desktop": (cert,)}, registry={(RDP_TCP.casefold(), "sslcertificatesha1hash"): None})
    result = plan(host, items, module)
    assert ("cert.remove" in ops(result)) is removed


def test_a_restore_manifest_removes_what_it_imported_without_touching_key_files(cert_factory: t.Any) -> None:
    cert = stored(cert_factory.make("WEB01", now=NOW, days_left=-3, days_old=180))
    items = [{"kind": "certificate_imported", "store": "Remote Desktop", "thumbprint": cert.thumbprint}]
    result = plan(state(stores={"Remote Desktop": (cert,)}), items, "restore")
    assert ops(result) == ["cert.remove"]
    assert [item["kind"] for item in result.backup.items] == ["restores", "certificate"]


def test_a_key_file_already_in_place_is_left_alone() -> None:
    saved_key = f"{ROOT}\\{MANIFEST_ID}\\A.key"
    host = state(
        files={KEY.casefold(): rs.FileState(True, "same", KEY_SDDL), saved_key.casefold(): rs.FileState(True, "same")}
    )
    items = [{"kind": "private_key_file", "file": "A.key", "source": KEY, "thumbprint": "A"}]
    assert not plan(host, items, "restore").has_changes


def test_an_unrecorded_acl_is_reported() -> None:
    saved_key = f"{ROOT}\\{MANIFEST_ID}\\A.key"
    host = state(files={saved_key.casefold(): rs.FileState(True, "old")})
    items = [{"kind": "private_key_file", "file": "A.key", "source": KEY, "thumbprint": "A"}]
    result = plan(host, items)
    assert ops(result) == ["file.copy"] and "ACL" in result.warnings[0]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([{"kind": "private_key_file", "file": "A.key", "source": KEY, "thumbprint": "A"}], "saved key file"),
        (
            [{"kind": "certificate", "file": "A.cer", "store": "My", "thumbprint": "A" * 40, "has_private_key": False}],
            "saved certificate",
        ),
    ],
)
def test_a_missing_backup_file_stops_the_plan(items: list[dict[str, t.Any]], message: str) -> None:
    with pytest.raises(rs.RestoreError, match=message):
        plan(state(), items)


def test_a_state_that_could_not_be_read_stops_the_plan() -> None:
    with pytest.raises(rs.RestoreError, match="could not be read"):
        plan(state(read_errors=("registry.get: AccessDenied",)), [])


# ---------------------------------------------------------------------------------------------------- markers


def test_undoing_a_restore_makes_its_manifest_restorable_again() -> None:
    marker = f"{ROOT}\\{MANIFEST_ID}\\restored.json"
    result = plan(
        state(files={marker.casefold(): rs.FileState(True)}),
        [{"kind": "restores", "manifest_id": MANIFEST_ID}],
        "restore",
    )
    assert [(step.op, step.args["src"]) for step in result.steps] == [("file.move", marker)]
    assert {"kind": "marker_moved", "source": marker, "file": f"restored-{MANIFEST_ID}.json"} in result.backup.items

    saved = f"{ROOT}\\{MANIFEST_ID}\\restored-x.json"
    back = plan(
        state(files={saved.casefold(): rs.FileState(True)}),
        [{"kind": "marker_moved", "source": marker, "file": "restored-x.json"}],
        "restore",
    )
    assert [(step.op, step.args["dest"]) for step in back.steps] == [("file.move", marker)]
    assert {"kind": "marker_placed", "path": marker} in back.backup.items

    aside = plan(
        state(files={marker.casefold(): rs.FileState(True)}), [{"kind": "marker_placed", "path": marker}], "restore"
    )
    assert ops(aside) == ["file.move"]


# ---------------------------------------------------------------------------------------------------- apply


def test_the_apply_batch_saves_before_it_changes_and_rereads_after(cert_factory: t.Any) -> None:
    new = stored(cert_factory.make("WEB01", now=NOW, days_left=182, days_old=0))
    host = state(stores={"Remote Desktop": (new,)}, registry={(RDP_TCP.casefold(), "sslcertificatesha1hash"): None})
    item = {
        "kind": "registry_value",
        "path": RDP_TCP,
        "name": "SSLCertificateSHA1Hash",
        "previous": {"type": "REG_BINARY", "value": "ab"},
    }
    result = plan(host, [item])
    needs = rs.needs_of([result.manifest], ROOT)
    batch, index = rs.build_apply_batch(host, result, ROOT, needs=needs, program_data="C:\\ProgramData", now=NOW)
    names = [op["op"] for op in batch.ops]
    assert batch.on_error == "stop"
    assert names[: index.manifest + 1] == ["dir.create", "file.write"]
    # The changes, the restart, the done-record (the restore's manifest again), then the marker on the original.
    assert names[index.manifest + 1 : index.last_change + 1] == [
        "registry.set",
        "service.restart",
        "file.write",
        "file.write",
    ]
    assert batch.ops[index.last_change]["args"]["path"] == f"{ROOT}\\{MANIFEST_ID}\\restored.json"
    assert batch.ops[index.last_change - 1]["args"]["path"] == batch.ops[index.manifest]["args"]["path"]
    assert not set(names[index.last_change + 1 :]) & WRITE_OPERATIONS
    document = json.loads(base64.b64decode(batch.ops[index.manifest]["args"]["content_b64"]))
    assert document["module"] == "rdpfix.rdp.restore" and document["v"] == 2
    assert document["items"][0] == {"kind": "restores", "manifest_id": MANIFEST_ID}
    assert document["items"][1] == {
        "kind": "registry_value",
        "path": RDP_TCP,
        "name": "SSLCertificateSHA1Hash",
        "previous": None,
        "status": "planned",
    }
    done = json.loads(base64.b64decode(batch.ops[index.last_change - 1]["args"]["content_b64"]))
    assert done["items"][1]["status"] == "done" and "status" not in done["items"][0]


def test_a_termservice_restart_with_sessions_is_pending_unless_allowed() -> None:
    cert_state = certificate.HostState(
        hostname="WEB01",
        fqdn=None,
        connection_broker=False,
        program_data=None,
        listener_thumbprint=None,
        listener_hash_type=None,
        pinned_thumbprint=None,
        pinned_value=None,
        self_signed=(),
        personal=(),
        services={},
        sessions=({"id": 2, "user": "CORP\\alice", "state": "Active", "station": "RDP-Tcp#2"},),
    )
    item = {"kind": "registry_value", "path": RDP_TCP, "name": "SSLCertificateSHA1Hash", "previous": None}
    host = state(
        cert=cert_state,
        registry={(RDP_TCP.casefold(), "sslcertificatesha1hash"): {"type": "REG_BINARY", "value": "ab"}},
    )
    for service, allowed, pending in [("TermService", False, 1), ("TermService", True, 0), ("SessionEnv", False, 0)]:
        options = rs.Options(restart_service=service, allow_session_disruption=allowed)
        result = rs.plan_manifest(host, manifest([item]), ROOT, new_backup(), options)
        assert len(rs.pending_restart(host, result, options)) == pending


@pytest.mark.parametrize(("status", "restored"), [("done", True), ("planned", True), (None, True), ("failed", False)])
def test_a_value_whose_change_never_happened_is_left_alone(status: str | None, restored: bool) -> None:
    # The run recorded the previous value; the host differs from it now. Done, only planned (judged on the host) and
    # version 1 put it back; a change the manifest says failed never happened, so the difference is not the run's.
    item: dict[str, t.Any] = {
        "kind": "registry_value",
        "path": POLICY,
        "name": "SelectTransport",
        "previous": {"type": "REG_DWORD", "value": 0},
    }
    if status is not None:
        item["status"] = status
    host = state(registry={(POLICY.casefold(), "selecttransport"): {"type": "REG_DWORD", "value": 1}})
    result = plan(host, [item], module="transport")
    assert (ops(result) == ["registry.set"]) is restored
    assert any("was not changed by" in warning for warning in result.warnings) is not restored
