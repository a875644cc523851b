"""The system-test harness: real processes.

A lab of simulated Windows hosts behind real WinRM endpoints, driven by the real ``ansible-playbook`` through
Ansible's own winrm connection plugin.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import typing as t
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HOSTS_DIR = ROOT / "tests" / "lab" / "hosts"
FLEETS_DIR = ROOT / "tests" / "lab" / "fleets"


class _Networks:
    """The 127.0.N networks of this test process, so that labs never share an address or port.

    RDPFIX_TEST_NETWORK_START (default 120) is the first N. Under pytest-xdist each worker (gw0, gw1, ...) takes its own
    block of RDPFIX_TEST_NETWORKS_PER_WORKER networks (default 10) after it: gw0 from N, gw1 from N + 10, and so on;
    without xdist the process takes the first block. Within its block a process goes round, skipping the networks of
    labs it still runs, so a long session never leaves the block however many labs it starts.
    """

    def __init__(self) -> None:
        start = int(os.environ.get("RDPFIX_TEST_NETWORK_START", "120"))
        self.size = int(os.environ.get("RDPFIX_TEST_NETWORKS_PER_WORKER", "10"))
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        index = int(worker.removeprefix("gw")) if worker.removeprefix("gw").isdigit() else 0
        self.first = start + index * self.size
        if self.size < 1 or self.first < 1 or self.first + self.size - 1 > 254:
            raise RuntimeError(
                f"worker {worker}: networks 127.0.{self.first}-{self.first + self.size - 1} are outside 127.0.1-254; "
                "lower RDPFIX_TEST_NETWORK_START or RDPFIX_TEST_NETWORKS_PER_WORKER"
            )
        self.in_use: set[int] = set()
        self._turn = itertools.cycle(range(self.first, self.first + self.size))

    def __iter__(self) -> _Networks:
        return self

    def __next__(self) -> int:
        """The next network of the block that no running lab of this process has (labs from start_lab are known)."""
        for _attempt in range(self.size):
            candidate = next(self._turn)
            if candidate not in self.in_use:
                return candidate
        raise RuntimeError(f"all {self.size} networks from 127.0.{self.first} are taken by labs this process runs")


_networks = _Networks()


def ansible_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_COLLECTIONS_PATH=str(ROOT / ".cache" / "collections"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        ANSIBLE_HOST_KEY_CHECKING="False",
        ANSIBLE_RETRY_FILES_ENABLED="False",
        ANSIBLE_LOCAL_TEMP=str(ROOT / ".cache" / "ansible-tmp"),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


def _rdplab(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "rdplab"), *args], capture_output=True, text=True, check=check, timeout=120, env=ansible_env()
    )


@dataclass
class Lab:
    """A running lab: its inventory and a view of every host's state and counters."""

    state_dir: Path
    inventory: Path
    network: str
    host_files: list[Path]

    def state(self) -> dict[str, t.Any]:
        return t.cast(dict[str, t.Any], json.loads(_rdplab("state", "--state-dir", str(self.state_dir)).stdout))

    def host(self, name: str) -> dict[str, t.Any]:
        return t.cast(dict[str, t.Any], self.state()[name])

    def counters(self) -> dict[str, dict[str, int]]:
        return {name: host["counters"] for name, host in self.state().items()}

    def reset_counters(self) -> None:
        _rdplab("state", "--state-dir", str(self.state_dir), "--reset-counters")

    def reset(self) -> None:
        _rdplab("reset", "--state-dir", str(self.state_dir))

    def fault(self, host: str, name: str, **params: str) -> None:
        _rdplab("fault", "--state-dir", str(self.state_dir), host, name, *(f"{k}={v}" for k, v in params.items()))

    def address(self, name: str) -> str:
        return t.cast(str, self.host(name)["address"])

    def down(self) -> None:
        _rdplab("down", "--state-dir", str(self.state_dir), check=False)
        _networks.in_use.discard(int(self.network.rsplit(".", 1)[1]))


@dataclass
class PlaybookRun:
    """One ansible-playbook run, with the per-task results of the ansible.posix.json callback."""

    rc: int
    stdout: str
    stderr: str
    document: dict[str, t.Any] = field(default_factory=dict)

    @property
    def stats(self) -> dict[str, dict[str, int]]:
        return t.cast(dict[str, dict[str, int]], self.document.get("stats", {}))

    def results(self, task_name: str) -> dict[str, dict[str, t.Any]]:
        """host -> result of the task with this name (the last one when the name repeats)."""
        found: dict[str, dict[str, t.Any]] = {}
        for play in self.document.get("plays", []):
            for task in play.get("tasks", []):
                if task["task"]["name"] == task_name:
                    found.update(task["hosts"])
        return found

    def changed_hosts(self) -> set[str]:
        return {host for host, stat in self.stats.items() if stat.get("changed", 0)}


def run_playbook(
    playbook: str | Path,
    inventory: Path,
    *,
    check: bool = False,
    diff: bool = False,
    limit: str | None = None,
    extra_vars: dict[str, t.Any] | None = None,
    json_output: bool = True,
    timeout: int = 300,
    tags: str | None = None,
    skip_tags: str | None = None,
) -> PlaybookRun:
    cmd = [str(BIN / "ansible-playbook"), "-i", str(inventory), str(ROOT / playbook)]
    if tags:
        cmd += ["--tags", tags]
    if skip_tags:
        cmd += ["--skip-tags", skip_tags]
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    if limit:
        cmd += ["--limit", limit]
    if extra_vars:
        cmd += ["--extra-vars", json.dumps(extra_vars)]
    env = ansible_env(ANSIBLE_STDOUT_CALLBACK="ansible.posix.json") if json_output else ansible_env()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    document: dict[str, t.Any] = {}
    if json_output:
        start = proc.stdout.find("{")
        if start >= 0:
            document = json.loads(proc.stdout[start:])
    return PlaybookRun(rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, document=document)


def start_lab(tmp_path: Path, host_files: list[Path]) -> Lab:
    number = next(_networks)
    network = f"127.0.{number}"
    state_dir = tmp_path / "lab-state"
    inventory = tmp_path / "inventory.yml"
    proc = _rdplab(
        "up",
        "--network",
        network,
        "--state-dir",
        str(state_dir),
        "--inventory",
        str(inventory),
        *map(str, host_files),
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"rdplab up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    _networks.in_use.add(number)
    return Lab(state_dir=state_dir, inventory=inventory, network=network, host_files=host_files)
