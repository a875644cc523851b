"""playbooks/restore_rdp.yml through Ansible's own winrm connection against the lab: list, restore, undo the restore.

After playbooks/fix_rdp.yml has repaired the hosts, the restore playbook lists each host's manifests without changing
anything, puts every host back exactly as it was before the fix (backups, event log and counters aside), does nothing
the second time, and refuses a malformed id before any host is contacted.
"""

from __future__ import annotations

import copy
import typing as t

import pytest
from harness import Lab, run_playbook

pytestmark = pytest.mark.system

HOSTS = ["expired-selfsigned", "firewall-rules-disabled"]
RESTORE_TASK = "Restore the given manifests, or list them all"
SUMMARY_TASK = "Show the manifests and what was put back"
BACKUPS = "c:\\programdata\\rdpfix"


def comparable(snapshot: dict[str, t.Any]) -> dict[str, t.Any]:
    state = copy.deepcopy(snapshot)
    state["files"]["entries"] = {
        path: entry for path, entry in state["files"]["entries"].items() if not path.lower().startswith(BACKUPS)
    }
    for volatile in ("events", "counters"):
        state.pop(volatile, None)
    return state


def counters(lab: Lab, name: str) -> tuple[int, int]:
    found = lab.counters()[name]
    return found["winrm_commands"], found["writes"]


@pytest.fixture
def fleet(lab_factory: t.Callable[..., Lab]) -> Lab:
    return lab_factory(*HOSTS)


def test_list_restore_and_rerun(fleet: Lab) -> None:
    before = {name: comparable(host["snapshot"]) for name, host in fleet.state().items()}
    fix = run_playbook("playbooks/fix_rdp.yml", fleet.inventory)
    assert fix.rc == 0, fix.stdout + fix.stderr
    assert fix.changed_hosts() == set(HOSTS)

    # List: changes nothing, two commands per host (the folder, then the manifests).
    fleet.reset_counters()
    listing = run_playbook("playbooks/restore_rdp.yml", fleet.inventory)
    assert listing.rc == 0, listing.stdout + listing.stderr
    assert listing.changed_hosts() == set()
    ids: dict[str, list[str]] = {}
    for name in HOSTS:
        assert counters(fleet, name) == (1, 0)  # one WinRM command lists every manifest, nothing written
        manifests = listing.results(RESTORE_TASK)[name]["manifests"]
        assert manifests and all(entry["restored"] is False for entry in manifests)
        ids[name] = [entry["id"] for entry in manifests]
        lines = listing.results(SUMMARY_TASK)[name]["msg"]
        assert lines[0].startswith(f"{len(manifests)} manifest(s) in C:\\ProgramData\\rdpfix\\backups"), lines

    # Check mode: what would come back, nothing written.
    fleet.reset_counters()
    name = "expired-selfsigned"
    planned = run_playbook(
        "playbooks/restore_rdp.yml",
        fleet.inventory,
        check=True,
        diff=True,
        limit=name,
        extra_vars={"rdpfix_manifest_id": ",".join(ids[name])},
    )
    assert planned.rc == 0, planned.stdout + planned.stderr
    assert counters(fleet, name)[1] == 0
    assert planned.results(RESTORE_TASK)[name]["changed"] is True
    assert any("would restore" in line for line in planned.results(SUMMARY_TASK)[name]["msg"])

    # Restore each host's manifests: the host is as before the fix.
    for name in HOSTS:
        fleet.reset_counters()
        restored = run_playbook(
            "playbooks/restore_rdp.yml", fleet.inventory, limit=name, extra_vars={"rdpfix_manifest_id": ids[name]}
        )
        assert restored.rc == 0, restored.stdout + restored.stderr
        result = restored.results(RESTORE_TASK)[name]
        assert result["changed"] is True and result["round_trips"] == 2 + len(ids[name])
        assert comparable(fleet.host(name)["snapshot"]) == before[name]

        # Again: already restored, one command, no write.
        fleet.reset_counters()
        again = run_playbook(
            "playbooks/restore_rdp.yml", fleet.inventory, limit=name, extra_vars={"rdpfix_manifest_id": ids[name]}
        )
        assert again.rc == 0 and again.changed_hosts() == set()
        assert counters(fleet, name) == (1, 0)


def test_a_malformed_id_is_refused_before_any_host(fleet: Lab) -> None:
    fleet.reset_counters()
    run = run_playbook(
        "playbooks/restore_rdp.yml",
        fleet.inventory,
        extra_vars={"rdpfix_manifest_id": "..\\Windows"},
        json_output=False,
    )
    assert run.rc != 0
    assert "is not a manifest id" in run.stdout + run.stderr and "Traceback" not in run.stdout + run.stderr
    assert {counters(fleet, name) for name in HOSTS} == {(0, 0)}
