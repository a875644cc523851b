"""The playbooks against Azure VMs: Azure's own inventory plugin (azure.azcollection.azure_rm) and the Run Command
connection.

A lab started with ``rdplab up --azure`` serves the fleet as Azure VMs (Resource Manager, Microsoft Entra token
endpoint, Run Command). azure_rm and the connection run unmodified, configured as for public Azure: the inventory file
names no endpoint, the service principal comes from the environment as AWX's Azure credential injects it, and the
lab's HTTPS proxy (HTTPS_PROXY) and CA (REQUESTS_CA_BUNDLE) bring management.azure.com and login.microsoftonline.com
to the lab (docs/lab.md, "The Azure cloud"). They run from .venv-azure-rm (requirements/azure-rm.txt: this collection's
requirements and what azure_rm imports), with azure.azcollection 3.12.0 from the pinned ``ansible`` package.

One fleet of three VMs: the inventory's groups and host variables (the same as rdpfix.rdp.azure_vms gives, and the
Resource Manager requests azure_rm makes, counted by the lab), then ``fix_rdp.yml -l azure_vms`` (check, apply, rerun)
and ``audit_rdp.yml``, one playbook run per phase, with the Run Commands per VM asserted exactly (each costs about 20 s
on Azure: docs/azure.md), then async tasks through Run Command in a run where the Azure CLI (a stand-in,
tests/lab/bin/az) is the only credential of azure_rm and the connection. Nothing travels over WinRM. The fault cases of
Run Command (busy VM, output over 4 KB, stopped VM, missing agent, expired token), the other credentials and file
transfers are tested in process in tests/lab/tests/test_arm.py; here a deallocated VM ends unreachable in a real
playbook run.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sysconfig
import typing as t
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import BIN, HOSTS_DIR, ROOT, Lab, PlaybookRun, _networks, ansible_env

pytestmark = [pytest.mark.system, pytest.mark.azure]

HEALTHY = ["healthy"]
BROKEN = ["expired-selfsigned", "missing-selfsigned"]
HOSTS = HEALTHY + BROKEN
# The VM with a public IP address (the others have only a private one, as behind a hub).
PUBLIC = "expired-selfsigned"
# One chunk of a result is 3,800 characters; a Run Command returns two (stdout and stderr).
CHUNK = 3800
# requirements/azure-rm.txt, built by `make setup`.
AZURE_RM_BIN = ROOT / ".venv-azure-rm" / "bin"
# The Azure CLI's stand-in (tests/lab/bin/az).
AZ_STAND_IN = ROOT / "tests" / "lab" / "bin"
# azure.azcollection 3.12.0 comes with the `ansible` package of requirements/test.txt, in this interpreter's packages.
BUNDLED_COLLECTIONS = Path(sysconfig.get_paths()["purelib"])


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

    def environment(self, **extra: str) -> dict[str, str]:
        """ansible-* from .venv-azure-rm, with the environment an Azure user's controller has (credentials), and
        the lab's proxy and CA in it."""
        from rdplab.arm import azure_rm_environment

        collections = f"{ROOT / '.cache' / 'collections'}:{BUNDLED_COLLECTIONS}"
        env = ansible_env(ANSIBLE_COLLECTIONS_PATH=collections, **azure_rm_environment(self.state["azure"]), **extra)
        env["PATH"] = f"{AZURE_RM_BIN}:{env['PATH']}"
        return env

    def az_login(self, log: Path) -> dict[str, str]:
        """The environment of a controller where `az login` was run, and nothing else: no AZURE_* secret, both
        azure_rm and the connection on auth_source cli. The CLI is the stand-in tests/lab/bin/az, which gets its
        token from login.microsoftonline.com through the lab's proxy (docs/lab.md, "The Azure cloud")."""
        cloud = self.state["azure"]
        return {
            "ANSIBLE_AZURE_AUTH_SOURCE": "cli",
            "AZURE_CLIENT_ID": "",
            "AZURE_SECRET": "",
            "AZURE_TENANT": "",
            "PATH": f"{AZ_STAND_IN}:{AZURE_RM_BIN}:{ansible_env()['PATH']}",
            "RDPLAB_AZ_ENDPOINT": "https://login.microsoftonline.com",
            "RDPLAB_AZ_TENANT": cloud["tenant"],
            "RDPLAB_AZ_CLIENT_ID": cloud["client_id"],
            "RDPLAB_AZ_SECRET": cloud["client_secret"],
            "RDPLAB_AZ_SUBSCRIPTION": cloud["subscription"],
            "RDPLAB_AZ_CA_FILE": cloud["ca_file"],
            "RDPLAB_AZ_LOG": str(log),
        }

    def run(
        self, *command: str, timeout: int = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        if not (AZURE_RM_BIN / "ansible-playbook").exists():
            pytest.fail(f"{AZURE_RM_BIN} is missing: `make setup` builds it from requirements/azure-rm.txt")
        return subprocess.run(
            [str(AZURE_RM_BIN / command[0]), *command[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=ROOT,
            env={**self.environment(ANSIBLE_STDOUT_CALLBACK="ansible.posix.json"), **(env or {})},
        )

    def playbook(
        self,
        playbook: str | Path,
        *options: str,
        limit: str = "azure_vms",
        extra_vars: dict[str, t.Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> PlaybookRun:
        command = ["ansible-playbook", "-i", str(self.inventory), str(ROOT / playbook), "--limit", limit]
        if extra_vars:
            command += ["--extra-vars", json.dumps(extra_vars)]
        done = self.run(*command, *options, env=env)
        start = done.stdout.find("{")
        document = json.loads(done.stdout[start:]) if start >= 0 else {}
        return PlaybookRun(rc=done.returncode, stdout=done.stdout, stderr=done.stderr, document=document)


@pytest.fixture(scope="module")
def azure_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureLab]:
    base = tmp_path_factory.mktemp("azure")
    number = next(_networks, None)
    if number is None:
        raise RuntimeError("no lab network left")
    network = f"127.0.{number}"
    state_dir = base / "lab-state"
    command = [str(BIN / "rdplab"), "up", "--network", network, "--state-dir", str(state_dir)]
    command += ["--inventory", str(base / "inventory" / "lab.yml"), "--azure"]
    command += [str(HOSTS_DIR / f"{name}.yml") for name in HOSTS]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=ansible_env(), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rdplab up --azure failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    _networks.in_use.add(number)  # Lab.down() gives it back
    inventory = base / "inventory" / "lab.azure_rm.yml"
    lab = Lab(state_dir=state_dir, inventory=inventory, network=network, host_files=[])
    try:
        served = AzureLab(lab, inventory, json.loads((state_dir / "state.json").read_text()))
        served.azure(vm=PUBLIC, public_ip=True)
        yield served
    finally:
        lab.down()


def playbook(azure_lab: AzureLab, name: str, *options: str) -> PlaybookRun:
    azure_lab.zero()
    run = azure_lab.playbook(f"playbooks/{name}", *options)
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


def plain(value: t.Any) -> t.Any:
    """ansible-inventory's JSON with the data tags of ansible-core 2.19 ({"__ansible_unsafe": value}) taken off."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return plain(value["__ansible_unsafe"])
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


# The host variables rdpfix.rdp.azure_vms gives as azure_rm does (its documentation lists them).
SAME_HOSTVARS = {
    "id",
    "name",
    "resource_group",
    "location",
    "tags",
    "powerstate",
    "provisioning_state",
    "vmid",
    "computer_name",
    "os_profile",
    "virtual_machine_size",
    "network_interface",
    "private_ipv4_addresses",
    "public_ipv4_address",
    "ansible_host",
    "ansible_connection",
    "ansible_azure_resource_id",
}


def test_azure_rm_builds_the_groups_and_the_connections_variables(azure_lab: AzureLab) -> None:
    azure_lab.zero()
    azure_lab.azure(vm="missing-selfsigned", power_state="deallocated")
    try:
        done = azure_lab.run("ansible-inventory", "-i", str(azure_lab.inventory), "--list", timeout=120)
        cloud = azure_lab.azure()  # what azure_rm asked, before the other inventory asks
        ours = subprocess.run(
            [str(BIN / "ansible-inventory"), "-i", str(azure_lab.inventory.with_name("lab.azure_vms.yml")), "--list"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=ansible_env(),
        )
    finally:
        azure_lab.azure(vm="missing-selfsigned", power_state="running")
    assert done.returncode == 0, done.stderr[-3000:]
    listing = plain(json.loads(done.stdout))
    assert sorted(listing["azure_vms"]["hosts"]) == sorted(HOSTS)
    assert sorted(listing["windows"]["hosts"]) == sorted(HOSTS)
    assert sorted(listing["azure_rg_rdpfix_lab"]["hosts"]) == sorted(HOSTS)
    assert sorted(listing["azure_loc_westeurope"]["hosts"]) == sorted(HOSTS)
    # conditional_groups on the power state azure_rm read from each VM's instance view.
    assert sorted(listing["azure_running"]["hosts"]) == sorted(["healthy", PUBLIC])
    hostvars = listing["_meta"]["hostvars"]
    addresses = {name: info["address"] for name, info in azure_lab.state["hosts"].items()}
    for name in HOSTS:
        host = hostvars[name]
        assert host["ansible_connection"] == "rdpfix.rdp.azure_run_command"
        assert host["ansible_azure_resource_id"] == host["id"]
        assert host["id"].endswith(f"/resourceGroups/rdpfix-lab/providers/Microsoft.Compute/virtualMachines/{name}")
        assert host["os_profile"]["system"] == "windows"
        # ansible_host: the public address where the VM has one, else the private one (azure_rm's rule).
        assert host["ansible_host"] == addresses[name]
    assert hostvars["missing-selfsigned"]["powerstate"] == "deallocated"
    assert hostvars[PUBLIC]["public_ipv4_address"] == [addresses[PUBLIC]]
    assert hostvars[PUBLIC]["private_ipv4_addresses"][0].startswith("10.0.0.")
    assert hostvars["healthy"]["public_ipv4_address"] == []
    assert hostvars["healthy"]["private_ipv4_addresses"] == [addresses["healthy"]]
    # rdpfix.rdp.azure_vms (the lab's lab.azure_vms.yml, same groups) gives the same groups and host variables.
    assert ours.returncode == 0, ours.stderr[-3000:]
    theirs, mine = listing, plain(json.loads(ours.stdout))
    for group in ("azure_vms", "windows", "azure_rg_rdpfix_lab", "azure_loc_westeurope"):
        assert sorted(mine[group]["hosts"]) == sorted(theirs[group]["hosts"]), group
    for name in HOSTS:
        shared = {key: value for key, value in hostvars[name].items() if key in SAME_HOSTVARS}
        assert shared == {key: mine["_meta"]["hostvars"][name][key] for key in shared}, name
        assert set(shared) == SAME_HOSTVARS
    # What azure_rm asked Resource Manager: three batches (the VM list; 3 instance views and 3 NICs; 1 public IP),
    # then each VM's instance view again through the compute SDK. All through the proxy, nothing refused.
    assert cloud["requests"] == {"batch": 3, "vm_list": 1, "instance_view": 6, "nic": 3, "public_ip": 1}
    assert set(cloud["proxied"]) == {"management.azure.com", "login.microsoftonline.com"}
    assert all(vm["run_commands"] == 0 for vm in cloud["vms"].values())


def test_fix_check_apply_rerun_and_audit_through_run_command(azure_lab: AzureLab) -> None:
    # 1. Check mode: one read batch per VM, one Run Command each; nothing written.
    check = playbook(azure_lab, "fix_rdp.yml", "--check", "--diff")
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
        audit = azure_lab.playbook("playbooks/audit_rdp.yml", extra_vars={"rdpfix_audit_report_dir": str(reports)})
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


ASYNC_PLAYBOOK = [
    {
        "name": "async through Run Command",
        "hosts": "azure_vms",
        "gather_facts": False,
        "tasks": [
            {"name": "facts", "rdpfix.rdp.facts": {}},
            {"name": "facts as an async task", "rdpfix.rdp.facts": {}, "async": 60, "poll": 1},
            {"name": "fire and forget", "rdpfix.rdp.facts": {}, "async": 60, "poll": 0, "ignore_errors": True},
        ],
    }
]


def test_async_tasks_through_run_command_with_the_azure_cli_credential(azure_lab: AzureLab, tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "async.yml"
    path.write_text(yaml.safe_dump(ASYNC_PLAYBOOK, sort_keys=False), encoding="utf-8")
    azure_lab.zero()
    log = tmp_path / "az.log"
    run = azure_lab.playbook(path, limit="healthy", env=azure_lab.az_login(log))
    assert run.rc == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # Only `az login` authenticated: azure_rm asked the CLI for its cloud and for tokens (its REST client's scope has
    # the trailing slash, its compute client's not; no subscription lookup: AZURE_SUBSCRIPTION_ID is set), and the
    # connection asked for a token of its own (public Azure's classic audience).
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert ["cloud", "show", "--query", "name"] in calls
    resources = {call[call.index("--resource") + 1] for call in calls if call[:2] == ["account", "get-access-token"]}
    assert resources == {
        "https://management.azure.com/",
        "https://management.azure.com",
        "https://management.core.windows.net",
    }
    synchronous = run.results("facts")["healthy"]
    background = run.results("facts as an async task")["healthy"]
    refused = run.results("fire and forget")["healthy"]
    assert not background.get("failed"), background.get("msg")
    assert background["finished"] is True and background["ansible_job_id"]
    assert background["findings"] == synchronous["findings"]
    # The job: started, polled until it ended, its job file removed, each round trip one Run Command of its own.
    assert synchronous["round_trips"] == 1
    assert background["round_trips"] >= 4
    assert refused["failed"] is True and "poll: 0" in refused["msg"] and refused["round_trips"] == 0
    # Each round trip is a Run Command (a result past two chunks one more); after the module, Ansible's own polling
    # reads the job's result (async_status) and cleans it up: two Run Commands at least.
    assert azure_lab.run_commands()["healthy"] >= synchronous["round_trips"] + background["round_trips"] + 2
    files = azure_lab.lab.state()["healthy"]["snapshot"]["files"]
    assert not [name for name in files if ".ansible_async\\j" in name]
