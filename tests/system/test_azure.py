"""The playbooks against Azure VMs: the rdpfix.rdp.azure_vms inventory and the Azure Run Command connection.

A lab started with ``rdplab up --azure`` serves the fleet as Azure VMs (Resource Manager, token endpoint, Run Command)
on loopback with its own CA; Azure's SDK on the controller is real. One fleet of three VMs goes through
``fix_rdp.yml -l azure_vms`` (check, apply, rerun) and ``audit_rdp.yml``, one playbook run per phase, with the Run
Commands per VM counted by the lab and asserted exactly (each costs about 20 s on Azure: docs/azure.md). Nothing
travels over WinRM. The fault cases of Run Command (busy VM, output over 4 KB, stopped VM, expired token) are tested
in process in tests/lab/tests/test_arm.py (and the inventory's groups and host variables); here a deallocated VM ends
unreachable in a real playbook run.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import typing as t
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import BIN, HOSTS_DIR, Lab, PlaybookRun, _networks, ansible_env, run_playbook

pytestmark = [pytest.mark.system, pytest.mark.azure]

HEALTHY = ["healthy"]
BROKEN = ["expired-selfsigned", "missing-selfsigned"]
HOSTS = HEALTHY + BROKEN
# One chunk of a result is 3,800 characters; a Run Command returns two (stdout and stderr).
CHUNK = 3800


@dataclass
class AzureLab:
    """The running lab, asked over HTTP (the Azure cloud's own control, the lab's control API): quicker than the CLI."""

    lab: Lab
    inventory: Path
    state: dict[str, t.Any]

    def _call(self, url: str, body: dict[str, t.Any] | None = None) -> t.Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
        request.add_header("Content-Type", "application/json")
        context = ssl.create_default_context(cafile=self.state["azure"]["ca_file"]) if url.startswith("https") else None
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return json.loads(response.read())

    def azure(self, **settings: t.Any) -> dict[str, t.Any]:
        """The cloud's state, or change it first (vm=..., power_state=..., reset_counters=True)."""
        base = self.state["azure"]["endpoint"]
        if settings:
            return t.cast(dict[str, t.Any], self._call(f"{base}/rdplab/configure", settings))
        return t.cast(dict[str, t.Any], self._call(f"{base}/rdplab/state"))

    def zero(self) -> None:
        self.azure(reset_counters=True)
        self._call(f"http://{self.state['control']}/counters/reset", {})

    def run_commands(self) -> dict[str, int]:
        return {name: vm["run_commands"] for name, vm in self.azure()["vms"].items()}

    def results(self) -> dict[str, list[dict[str, int]]]:
        return {name: vm["results"] for name, vm in self.azure()["vms"].items()}

    def counters(self, name: str) -> dict[str, int]:
        hosts = self._call(f"http://{self.state['control']}/state")
        return {host: info["counters"][name] for host, info in hosts.items()}


@pytest.fixture(scope="module")
def azure_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureLab]:
    base = tmp_path_factory.mktemp("azure")
    number = next(_networks, None)
    if number is None:
        raise RuntimeError("no lab network left")
    network = f"127.0.{number}"
    inventory = base / "inventory" / "lab.azure_vms.yml"
    state_dir = base / "lab-state"
    command = [str(BIN / "rdplab"), "up", "--network", network, "--state-dir", str(state_dir)]
    command += ["--inventory", str(base / "inventory" / "lab.yml"), "--azure", "--azure-inventory", str(inventory)]
    command += [str(HOSTS_DIR / f"{name}.yml") for name in HOSTS]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ansible_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rdplab up --azure failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    _networks.in_use.add(number)  # Lab.down() gives it back
    lab = Lab(state_dir=state_dir, inventory=inventory, network=network, host_files=[])
    try:
        yield AzureLab(lab, inventory, json.loads((state_dir / "state.json").read_text()))
    finally:
        lab.down()


def playbook(azure_lab: AzureLab, name: str, **kwargs: t.Any) -> PlaybookRun:
    azure_lab.zero()
    run = run_playbook(f"playbooks/{name}", azure_lab.inventory, limit="azure_vms", **kwargs)
    assert run.rc == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # Nothing went over WinRM: every command was a Run Command.
    assert set(azure_lab.counters("winrm_commands").values()) == {0}
    # Each result fitted the two streams of one Run Command (no chunk script was needed).
    for name_, results in azure_lab.results().items():
        assert all(result["blob_chars"] <= 2 * CHUNK for result in results), (name_, results)
    return run


def results_ending(run: PlaybookRun, name: str) -> dict[str, dict[str, t.Any]]:
    """host -> result of the task whose name ends with ``name`` (a role's tasks carry the role's name first)."""
    found: dict[str, dict[str, t.Any]] = {}
    for play in run.document.get("plays", []):
        for task in play.get("tasks", []):
            if task["task"]["name"].endswith(name):
                found.update(task["hosts"])
    return found


def test_fix_check_apply_rerun_and_audit_through_run_command(azure_lab: AzureLab) -> None:
    # 1. Check mode: one read batch per VM, one Run Command each; nothing written.
    check = playbook(azure_lab, "fix_rdp.yml", check=True, diff=True)
    assert check.changed_hosts() == set(BROKEN)
    assert azure_lab.run_commands() == dict.fromkeys(HOSTS, 1)
    assert set(azure_lab.counters("writes").values()) == {0}

    # 2. Apply: the broken VMs get one more Run Command (the apply batch); the healthy one only its read.
    fix = playbook(azure_lab, "fix_rdp.yml")
    assert fix.changed_hosts() == set(BROKEN)
    assert azure_lab.run_commands() == {"healthy": 1, "expired-selfsigned": 2, "missing-selfsigned": 2}
    writes = azure_lab.counters("writes")
    assert writes["healthy"] == 0
    assert all(writes[name] > 0 for name in BROKEN)

    # 3. Rerun: nothing left to change, one Run Command per VM, nothing written.
    rerun = playbook(azure_lab, "fix_rdp.yml")
    assert rerun.changed_hosts() == set()
    assert azure_lab.run_commands() == dict.fromkeys(HOSTS, 1)
    assert set(azure_lab.counters("writes").values()) == {0}

    # 4. Audit with one VM deallocated: that VM is unreachable with its power state, no script is sent to it; the
    # others are audited with one Run Command each.
    azure_lab.azure(vm="missing-selfsigned", power_state="deallocated")
    try:
        azure_lab.zero()
        reports = azure_lab.inventory.parent / "reports"
        audit = run_playbook(
            "playbooks/audit_rdp.yml",
            azure_lab.inventory,
            limit="azure_vms",
            extra_vars={"rdpfix_audit_report_dir": str(reports)},
        )
    finally:
        azure_lab.azure(vm="missing-selfsigned", power_state="running")
    # The audit keeps unreachable hosts in the play (ignore_unreachable) so that the report lists them.
    gathered = results_ending(audit, "Gather Remote Desktop facts and findings (one WinRM command, read-only)")
    assert gathered["missing-selfsigned"].get("unreachable") is True, gathered["missing-selfsigned"]
    assert "is not running (PowerState/deallocated)" in gathered["missing-selfsigned"]["msg"]
    assert all(not gathered[name].get("unreachable") and not gathered[name].get("failed") for name in HOSTS[:2])
    assert azure_lab.run_commands() == {"healthy": 1, "expired-selfsigned": 1, "missing-selfsigned": 0}
    report = json.loads((reports / "report.json").read_text())
    assert {"healthy", "expired-selfsigned"} <= set(json.dumps(report).split('"'))
