"""A restore is exact or refused before it starts, on every host file: playbooks/fix_rdp.yml repairs the whole lab,
then playbooks/restore_rdp.yml puts every host's manifests back (check mode first), through Ansible's winrm connection.

For each host that has manifests: either the restore succeeds and the host is exactly as it was before the fix
(backups, event log and counters aside), or the restore fails saying it cannot be exact - check mode fails the same
way - and the host is exactly as the fix left it. Never a third state.
"""

from __future__ import annotations

import typing as t

import pytest
import yaml
from harness import HOSTS_DIR, Lab, run_playbook, start_lab

from rdplab.restore_view import comparable, differences

pytestmark = pytest.mark.system

SERVERS = sorted(path.stem for path in HOSTS_DIR.glob("*.yml") if not path.stem.startswith("client-"))
RESTORE_TASK = "Restore the given manifests, or list them all"
# Host files whose certificate run leaves a manifest that cannot be restored exactly (a pin and an expired
# self-signed certificate): the restore must refuse there, and only there.
NOT_EXACT = {"pinned-missing-selfsigned-expired", "pinned-missing-selfsigned-expired-legacy"}


def snapshots(lab: Lab) -> dict[str, dict[str, t.Any]]:
    return {name: host["snapshot"] for name, host in lab.state().items()}


def with_manifest_ids(lab: Lab, ids: dict[str, list[str]]) -> None:
    inventory = yaml.safe_load(lab.inventory.read_text())
    hosts = inventory["all"]["children"]["windows"]["hosts"]
    for host, manifest_ids in ids.items():
        hosts[host]["rdpfix_manifest_id"] = manifest_ids
    lab.inventory.write_text(yaml.safe_dump(inventory))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Lab]:
    started = start_lab(tmp_path_factory.mktemp("restore-every-host"), [HOSTS_DIR / f"{name}.yml" for name in SERVERS])
    try:
        yield started
    finally:
        started.down()


def test_every_restore_is_exact_or_refused_before_it_starts(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANSIBLE_FORKS", str(len(SERVERS)))
    before = {name: comparable(snapshot) for name, snapshot in snapshots(lab).items()}
    fix = run_playbook("playbooks/fix_rdp.yml", lab.inventory, extra_vars={"rdpfix_hosts": "windows"})
    assert fix.document, fix.stdout[-3000:] + fix.stderr
    listing = run_playbook("playbooks/restore_rdp.yml", lab.inventory)
    assert listing.rc == 0, listing.stdout[-3000:] + listing.stderr
    ids = {
        name: [entry["id"] for entry in result["manifests"]]
        for name, result in listing.results(RESTORE_TASK).items()
        if result["manifests"]
    }
    assert set(ids) >= NOT_EXACT and len(ids) > len(SERVERS) // 2, sorted(ids)
    with_manifest_ids(lab, ids)
    fixed = {name: comparable(snapshot) for name, snapshot in snapshots(lab).items()}
    limit = ",".join(sorted(ids))

    check = run_playbook("playbooks/restore_rdp.yml", lab.inventory, check=True, diff=True, limit=limit)
    after_check = {name: comparable(snapshot) for name, snapshot in snapshots(lab).items()}
    assert after_check == fixed, "check mode changes nothing"
    restore = run_playbook("playbooks/restore_rdp.yml", lab.inventory, limit=limit)
    after = {name: comparable(snapshot) for name, snapshot in snapshots(lab).items()}

    predicted, done = check.results(RESTORE_TASK), restore.results(RESTORE_TASK)
    refused = {name for name, result in done.items() if result.get("failed")}
    assert refused == {name for name, result in predicted.items() if result.get("failed")}, "check mode predicts it"
    assert refused == NOT_EXACT, sorted(refused)
    for name in sorted(ids):
        if name in refused:
            assert "cannot be restored exactly" in done[name]["msg"], done[name]["msg"]
            assert predicted[name]["msg"] == done[name]["msg"]
            assert after[name] == fixed[name], f"{name}: a refused restore changes nothing"
        else:
            assert done[name]["changed"] is True, name
            assert not any("still differs" in warning for warning in done[name].get("warnings") or []), (
                name,
                done[name].get("warnings"),
            )
            changed = differences(before[name], after[name])
            assert after[name] == before[name], f"{name}: the restore is not exact: {changed}"

    # Accepting the renewal restores the refused ones anyway, and says what Windows did.
    accepted = run_playbook(
        "playbooks/restore_rdp.yml",
        lab.inventory,
        limit=",".join(sorted(refused)),
        extra_vars={"rdpfix_accept_certificate_renewal": True},
    )
    for name in refused:
        result = accepted.results(RESTORE_TASK)[name]
        assert not result.get("failed"), result.get("msg")
        assert result["renewal_predicted"] and result["changed"] is True
        statuses = {manifest["status"] for manifest in result["manifests"]}
        assert statuses <= {"restored", "restored_renewed", "unchanged"}, statuses
        if "restored_renewed" not in statuses:
            assert any("still differs" in warning for warning in result.get("warnings") or []), result
