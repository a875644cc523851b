"""Check mode tells the truth, refusals included; modules do not block each other; renewals of a pin are offered;
a restore that cannot be exact is refused before it starts. The real action plugins against lab hosts
(DirectConnection): every assertion is on the host's own state and counters.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import typing as t
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
BACKUPS = "c:\\programdata\\rdpfix"
MACHINE_KEYS = "C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys"
DEFAULT_FOLDER_SDDL = "O:SYG:SYD:PAI(A;;0x12019f;;;WD)(A;;FA;;;BA)"


def load(name: str) -> t.Any:
    return rdplab_fleet.load_fleet([HOSTS / f"{name}.yml"])[0]


def run(host: t.Any, module: str, check_mode: bool = False, **args: t.Any) -> dict[str, t.Any]:
    plugin = importlib.import_module(f"ansible_collections.rdpfix.rdp.plugins.action.{module}")
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=True, async_val=0, action=f"rdpfix.rdp.{module}")
    action = plugin.ActionModule(
        task, rdplab_direct.DirectConnection(host), SimpleNamespace(remote_addr="127.0.0.2"), None, None, None
    )
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name}))


def comparable(host: t.Any) -> dict[str, t.Any]:
    """The host minus what a run legitimately adds: backups, events, counters."""
    state = copy.deepcopy(host.snapshot())
    state["files"]["entries"] = {
        path: entry for path, entry in state["files"]["entries"].items() if not path.lower().startswith(BACKUPS)
    }
    for volatile in ("events", "counters"):
        state.pop(volatile, None)
    return t.cast(dict[str, t.Any], state)


def ids(result: dict[str, t.Any]) -> set[str]:
    return {item["id"] for item in result.get("findings") or []}


def presented(host: t.Any) -> str | None:
    view = host.rdp_view(connect=False)
    if view.cert_pem is None:
        return None
    der = x509.load_pem_x509_certificate(view.cert_pem).public_bytes(serialization.Encoding.DER)
    return hashlib.sha1(der).hexdigest().upper()


def other_machine_keys(host: t.Any) -> dict[str, tuple[str, str]]:
    return {
        entry.path: (entry.sha256, entry.sddl)
        for entry in host.filesystem.children(MACHINE_KEYS)
        if not entry.path.rsplit("\\", 1)[-1].startswith("f686aace6942fb7f7ceb231212eef4a4_")
    }


# -- a deleted RDP key: machinekeys repairs its part and leaves the certificate to the certificate module --------

DELETED_KEY = ["machinekeys-rdp-key-deleted-folder-acl", "machinekeys-rdp-key-deleted-legacy"]


@pytest.mark.parametrize("name", DELETED_KEY)
def test_a_deleted_key_is_repaired_as_check_mode_said(name: str) -> None:
    """The role's order (machinekeys, then certificate) with default options: check mode, then the real run."""
    host = load(name)
    assert host.rdp_view(connect=False).failure == "reset_after_x224"
    before, keys = comparable(host), other_machine_keys(host)
    audit = run(host, "facts")
    assert "machinekeys.repair_refused" not in ids(audit) and "certificate.plan_refused" not in ids(audit)
    assert "certificate.self_signed_no_private_key" in ids(audit)
    predicted = {module: run(host, module, check_mode=True) for module in ("machinekeys", "certificate")}
    assert comparable(host) == before and host.counters.writes == 0
    for module in ("machinekeys", "certificate"):
        real = run(host, module)
        assert not real.get("failed"), (module, real.get("msg"))
        assert not predicted[module].get("failed"), (module, predicted[module].get("msg"))
        assert real["changed"] == predicted[module]["changed"], module
        planned = [action["action"] for action in predicted[module]["actions"]]
        assert [action["action"] for action in real["actions"]] == planned, module
    # The machinekeys finding names the key and who repairs it; it does not claim a fix of its own.
    [missing] = [item for item in predicted["machinekeys"]["findings"] if item["id"] == "machinekeys.rdp_key_missing"]
    assert missing["fix"] is None and missing["evidence"]["repaired_by"] == "rdpfix.rdp.certificate"
    assert host.rdp_view(connect=False).failure is None, "a new self-signed certificate with its key is presented"
    assert host.filesystem.get(MACHINE_KEYS).sddl == DEFAULT_FOLDER_SDDL
    assert other_machine_keys(host) == keys
    assert host.snapshot()["sessions"] == before["sessions"], "SessionEnv's restart keeps every session"
    for module in ("machinekeys", "certificate"):
        again = run(host, module)
        assert again["changed"] is False and not again.get("failed"), (module, again.get("msg"))


def test_an_empty_key_is_refused_alike_by_check_mode_the_run_and_the_audit() -> None:
    name = "machinekeys-rdp-key-empty-folder-acl"
    host = load(name)
    before = comparable(host)
    audit = run(host, "facts")
    [refusal] = [item for item in audit["findings"] if item["id"] == "machinekeys.repair_refused"]
    assert "strategy=regenerate" in refusal["title"]
    check = run(host, "machinekeys", check_mode=True)
    real = run(host, "machinekeys")
    assert check.get("failed") and real.get("failed")
    assert check["msg"] == real["msg"] and "strategy=regenerate" in real["msg"] and "nothing was changed" in real["msg"]
    assert "machinekeys.repair_refused" in ids(check) and "machinekeys.repair_refused" in ids(real)
    assert host.counters.writes == 0 and comparable(host) == before
    # The strategy the refusal names does repair it.
    fixed = run(host, "machinekeys", strategy="regenerate")
    assert not fixed.get("failed"), fixed.get("msg")
    assert host.rdp_view(connect=False).failure is None
    assert host.filesystem.get(MACHINE_KEYS).sddl == DEFAULT_FOLDER_SDDL


# -- the renewal of an expired or expiring pin ----------------------------------------------------------------------

RENEWALS = ["pinned-expired-renewal", "pinned-expiring-renewal"]


def renewal_of(result: dict[str, t.Any]) -> dict[str, t.Any]:
    [item] = [item for item in result["findings"] if item["id"] == "certificate.pinned_renewal_available"]
    return t.cast(dict[str, t.Any], item)


@pytest.mark.parametrize("name", RENEWALS)
def test_the_renewal_is_pointed_at_with_what_blocks_it(name: str) -> None:
    host = load(name)
    before = comparable(host)
    pinned = host.snapshot()["listener"]
    audit = renewal_of(run(host, "facts"))
    result = run(host, "certificate")
    assert not result.get("failed"), result.get("msg")
    found = renewal_of(result)
    # The audit and the module report the same finding (the audit adds its likely cause and the event evidence).
    assert {key: value for key, value in found.items() if key != "evidence"} == {
        key: value for key, value in audit.items() if key not in ("evidence", "likely_cause")
    }
    assert audit["evidence"]["renewal"] == found["evidence"]["renewal"]
    assert "auto-enrollment" in audit["likely_cause"].lower()
    renewal = found["evidence"]["renewal"]
    assert renewal["key_state"] == "unreadable"
    assert found["evidence"]["blocked_by"] == [
        f"NETWORK SERVICE cannot read its private key file {renewal['key_path']}"
    ]
    assert renewal["thumbprint"] in found["title"] and "NETWORK SERVICE" in found["title"]
    assert found["fix"]["module"] == "rdpfix.rdp.certificate" and found["fix"]["options"] == {"repin_renewal": True}
    # Reported only, by default.
    assert result["changed"] is False and host.counters.writes == 0
    assert comparable(host) == before and host.snapshot()["listener"] == pinned


@pytest.mark.parametrize("name", RENEWALS)
def test_repin_renewal_grants_that_key_only_pins_it_and_restores_exactly(name: str) -> None:
    host = load(name)
    original = comparable(host)
    renewal = renewal_of(run(host, "certificate"))["evidence"]["renewal"]
    other_files = {
        path: entry
        for path, entry in original["files"]["entries"].items()
        if path.lower() != str(renewal["key_path"]).lower()
    }
    check = run(host, "certificate", check_mode=True, repin_renewal=True)
    assert not check.get("failed") and check["changed"] is True and host.counters.writes == 0
    real = run(host, "certificate", repin_renewal=True)
    assert not real.get("failed"), real.get("msg")
    assert (
        [a["action"] for a in real["actions"]]
        == [a["action"] for a in check["actions"]]
        == [
            "grant_key_read",
            "set_pin",
        ]
    )
    assert real["compliant"] is True and real["round_trips"] == 2
    assert presented(host) == renewal["thumbprint"], "the listener presents the renewal"
    after = comparable(host)
    key_sddl = after["files"]["entries"][
        next(p for p in after["files"]["entries"] if p.lower() == renewal["key_path"].lower())
    ]
    assert "(A;;FR;;;NS)" in key_sddl["sddl"] and key_sddl["sddl"].startswith(renewal["key_sddl"].split("(")[0])
    assert {
        p: e for p, e in after["files"]["entries"].items() if p.lower() != renewal["key_path"].lower()
    } == other_files
    assert run(host, "certificate", repin_renewal=True)["changed"] is False
    # The run is undone exactly: the key file's ACL and the pin come back.
    restored = run(host, "restore", manifest_id=real["backup"]["manifest_id"])
    assert not restored.get("failed"), restored.get("msg")
    assert comparable(host) == original


def test_a_renewal_no_grant_can_make_usable_is_refused_alike_everywhere() -> None:
    host = load("pinned-expired-renewal-no-key")
    before = comparable(host)
    found = renewal_of(run(host, "certificate"))
    assert found["fix"] is None and "no private key" in found["title"]
    audit = run(host, "facts", certificate_repin_renewal=True)
    assert "certificate.plan_refused" in ids(audit)
    assert "certificate.plan_refused" not in ids(run(host, "facts"))
    check = run(host, "certificate", check_mode=True, repin_renewal=True)
    real = run(host, "certificate", repin_renewal=True)
    assert check.get("failed") and real.get("failed") and check["msg"] == real["msg"]
    assert "repin_renewal" in real["msg"] and "nothing was changed" in real["msg"]
    assert ids(real) == {"certificate.plan_refused"}
    assert host.counters.writes == 0 and comparable(host) == before


# -- a restore that cannot be exact --------------------------------------------------------------------------------

NOT_EXACT = ["pinned-missing-selfsigned-expired", "pinned-missing-selfsigned-expired-legacy"]


@pytest.mark.parametrize("name", NOT_EXACT)
def test_a_restore_that_cannot_be_exact_is_refused_before_it_starts(name: str) -> None:
    host = load(name)
    fix = run(host, "certificate")
    assert not fix.get("failed") and fix["changed"] is True, fix.get("msg")
    kinds = {item["kind"] for item in fix["backup"]["items"]}
    assert {"registry_value", "certificate"} <= kinds, "the manifest holds the pin and the expired certificate"
    manifest_id = fix["backup"]["manifest_id"]
    fixed, writes = comparable(host), host.counters.writes

    check = run(host, "restore", check_mode=True, manifest_id=manifest_id)
    real = run(host, "restore", manifest_id=manifest_id)
    for result in (check, real):
        assert result.get("failed") is True
        assert "cannot be restored exactly" in result["msg"] and "Nothing was changed" in result["msg"]
        assert "accept_certificate_renewal" in result["msg"]
        assert result["renewal_predicted"] == [manifest_id]
        assert [(m["id"], m["status"]) for m in result["manifests"]] == [(manifest_id, "refused")]
    assert check["msg"] == real["msg"]
    assert host.counters.writes == writes and comparable(host) == fixed
    assert host.rdp_view(connect=False).failure is None, "the repaired host keeps working"

    accepted = run(host, "restore", manifest_id=manifest_id, accept_certificate_renewal=True)
    assert not accepted.get("failed"), accepted.get("msg")
    assert accepted["changed"] is True and accepted["renewal_predicted"] == [manifest_id]
    assert any("restoring anyway (accept_certificate_renewal)" in warning for warning in accepted["warnings"])
    [summary] = accepted["manifests"]
    store = host.snapshot()["certificates"]["Remote Desktop"]
    renewed = [cert for cert in store if cert["thumbprint"] not in fixed_thumbprints(fix)]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if summary["status"] == "restored_renewed":
        assert any(cert["not_after"] > now for cert in renewed), "Windows' new certificate, as predicted"
    else:
        # Windows did not renew after all: the result says how the host differs, never a plain "restored".
        assert summary["status"] == "restored" and any("still differs" in w for w in accepted["warnings"]), renewed


def fixed_thumbprints(fix: dict[str, t.Any]) -> set[str]:
    return {str(item.get("thumbprint")) for item in fix["backup"]["items"] if item.get("thumbprint")}


def test_an_exact_restore_of_an_expired_certificate_without_a_pin_is_not_refused() -> None:
    """Without a restart nothing makes Windows act: putting the expired certificate back is exact."""
    host = load("expired-selfsigned")
    fix = run(host, "certificate")
    result = run(host, "restore", check_mode=True, manifest_id=fix["backup"]["manifest_id"])
    assert not result.get("failed"), result.get("msg")
    assert result["renewal_predicted"] == [] and result["changed"] is True
