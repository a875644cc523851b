"""playbooks/fix_rdp.yml's run summary names every host of the run, through Ansible's own winrm connection against
the lab: a host that could not be reached is listed as unreachable, one whose run failed as failed with what its
concerns did, and a concern whose apply batch lost its answer says what reading the host again found, naming its
backup manifest. One playbook run on four hosts.
"""

from __future__ import annotations

import typing as t

import pytest
import yaml
from harness import Lab, PlaybookRun, run_playbook
from role_results import run_summaries

pytestmark = pytest.mark.system

# healthy: nothing to do; expired-selfsigned: the answer to its apply batch dropped after the batch ran (the module
# reads again: made); combined-machinekeys-firewall: every command after its read dropped (two concerns' changes sent
# in one batch, the answer lost, the host cannot be read again: outcome unknown for each); firewall-rules-disabled:
# its credentials refused (unreachable at the first task); tls-security-layer-rdp: a become method the agent cannot
# be sent with (the repair task fails before any concern ran, so no per-concern result would fail the host).
HOSTS = [
    "healthy",
    "expired-selfsigned",
    "combined-machinekeys-firewall",
    "firewall-rules-disabled",
    "tls-security-layer-rdp",
]


@pytest.fixture
def run(lab_factory: t.Callable[..., Lab], tmp_path: t.Any) -> tuple[Lab, PlaybookRun]:
    lab = lab_factory(*HOSTS)
    inventory = yaml.safe_load(lab.inventory.read_text())
    inventory["all"]["children"]["windows"]["hosts"]["firewall-rules-disabled"]["ansible_password"] = "wrong"
    inventory["all"]["children"]["windows"]["hosts"]["tls-security-layer-rdp"].update(
        {"ansible_become": True, "ansible_become_method": "ansible.builtin.su"}
    )
    bad_inventory = tmp_path / "inventory.yml"
    bad_inventory.write_text(yaml.safe_dump(inventory))
    # The first command of a host is its read, the second its apply batch.
    lab.fault("expired-selfsigned", "transport", kind="drop_after", skip=1)
    lab.fault("combined-machinekeys-firewall", "transport", kind="drop_before", skip=1, count=0)
    return lab, run_playbook("playbooks/fix_rdp.yml", bad_inventory, limit=",".join(HOSTS))


def test_the_summary_lists_unreachable_and_failed_hosts_and_lost_answers(run: tuple[Lab, PlaybookRun]) -> None:
    _lab, played = run
    assert played.rc != 0
    assert played.stats["firewall-rules-disabled"]["unreachable"] == 1
    assert played.stats["combined-machinekeys-firewall"]["failures"] >= 1
    assert played.stats["expired-selfsigned"].get("failures", 0) == 0

    # One summary, run once, names every host of the run.
    summaries = run_summaries(played)
    assert set(summaries) == set(HOSTS)
    expired = [line for line in summaries["expired-selfsigned"] if line.startswith("certificate:")]
    assert len(expired) == 1 and "answer lost, read again: made (backup manifest " in expired[0], expired
    assert not any(line.startswith(("FAILED", "UNREACHABLE")) for line in summaries["healthy"])

    # Hosts that left the run: their first line says why.
    left = {
        name: lines for name, lines in summaries.items() if lines and lines[0].startswith(("FAILED", "UNREACHABLE"))
    }
    assert set(left) == {"firewall-rules-disabled", "combined-machinekeys-firewall", "tls-security-layer-rdp"}, left
    # The repair task failed before any concern ran: the host fails there (it never reaches the verification), and
    # its summary gives the repair's own reason.
    assert played.stats["tls-security-layer-rdp"]["failures"] == 1
    unsendable = left["tls-security-layer-rdp"]
    assert unsendable[0].startswith("FAILED: ") and "the rdpfix agent cannot be sent" in unsendable[0], unsendable
    assert unsendable[0].endswith("nothing of the repair is known to have run") and len(unsendable) == 1, unsendable
    unreachable = left["firewall-rules-disabled"]
    assert unreachable[0].startswith("UNREACHABLE: ") and "nothing of the repair is known to have run" in unreachable[0]
    failed = left["combined-machinekeys-firewall"]
    assert (
        failed[0].startswith("FAILED: ") and "the answer to the apply batch the concerns shared was lost" in failed[0]
    )
    lines = {line.split(":")[0]: line for line in failed[1:] if not line.startswith(" ")}
    for concern in ("machinekeys", "firewall"):
        line = lines[concern]
        assert line.startswith(f"{concern}: FAILED; answer lost, read again: unknown (backup manifest "), line
        manifest = line.split("(backup manifest ")[1].split(")")[0]
        assert f"-{concern}-" in manifest and manifest in failed[0], (manifest, failed[0])
