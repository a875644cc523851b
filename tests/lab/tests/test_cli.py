"""`rdplab up / state / fault / reset / down` as a user runs them, and Ansible's winrm connection against the lab."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import typing as t
from pathlib import Path

import pytest
import yaml
from winrm.protocol import Protocol

from rdplab import bootstrap
from rdplab.ansible_client import module_command
from rdplab.winrm import port_free

REPO_ROOT = Path(__file__).resolve().parents[3]
HOSTS = REPO_ROOT / "tests" / "lab" / "hosts"
VENV_BIN = Path(sys.executable).parent


def free_network(ports: tuple[int, ...] = (5985, 5986, 3389, 5999)) -> str:
    """A random 127.a.b network whose .1, .10 and .11 have the ports free: concurrent test runs (xdist workers, two
    engineers' pytest) must not meet on the same addresses."""
    for _attempt in range(200):
        network = f"127.{random.randint(100, 254)}.{random.randint(0, 255)}"
        if all(port_free(f"{network}.{octet}", port) for octet in (1, 10, 11) for port in ports):
            return network
    raise RuntimeError("no free loopback network found")


NETWORK = free_network()


def rdplab(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != bootstrap.COLLECTION_ROOT_ENV}
    result = subprocess.run(
        [sys.executable, "-m", "rdplab.cli", *args], check=False, capture_output=True, text=True, timeout=60, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"rdplab {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[dict[str, Path]]:
    """One lab for the module: two hosts on a free 127.a.b network, stopped at the end whatever happens."""
    base = tmp_path_factory.mktemp("lab")
    paths = {"state": base / "state", "inventory": base / "inventory" / "lab.yml"}
    rdplab(
        "up", "--network", NETWORK, "--state-dir", str(paths["state"]), "--inventory", str(paths["inventory"]),
        str(HOSTS / "healthy.yml"), str(HOSTS / "missing-selfsigned.yml"),
    )  # fmt: skip
    try:
        yield paths
    finally:
        rdplab("down", "--state-dir", str(paths["state"]), check=False)


def state(lab: dict[str, Path], *extra: str) -> dict[str, t.Any]:
    return t.cast(dict[str, t.Any], json.loads(rdplab("state", "--state-dir", str(lab["state"]), *extra).stdout))


def test_up_assigns_addresses_in_order_and_writes_state(lab: dict[str, Path]) -> None:
    recorded = json.loads((lab["state"] / "state.json").read_text())
    assert recorded["control"] == f"{NETWORK}.1:5999"
    assert {name: info["address"] for name, info in recorded["hosts"].items()} == {
        "healthy": f"{NETWORK}.10",
        "missing-selfsigned": f"{NETWORK}.11",
    }
    assert (lab["state"] / "lab.log").exists()
    current = state(lab)
    assert current["healthy"]["snapshot"]["system"]["hostname"] == "WEB01"
    assert set(current["healthy"]["counters"]) >= {"winrm_shells", "winrm_commands", "writes", "rdp_connections"}


def test_inventory_describes_the_fleet(lab: dict[str, Path]) -> None:
    inventory = yaml.safe_load(lab["inventory"].read_text())
    windows = inventory["all"]["children"]["windows"]
    assert windows["vars"]["ansible_connection"] == "winrm"
    assert windows["vars"]["ansible_port"] == 5986
    assert windows["hosts"]["healthy"] == {
        "ansible_host": f"{NETWORK}.10",
        "ansible_user": "rdpadmin",
        "ansible_password": "Lab-Healthy-1!",
        "rdpfix_server_rdp_port": 3389,
    }
    assert set(inventory["all"]["children"]["onprem"]["hosts"]) == {"healthy"}
    assert set(inventory["all"]["children"]["azure_vms"]["hosts"]) == {"missing-selfsigned"}


def test_agent_batch_through_the_running_lab_counts_one_command(lab: dict[str, Path]) -> None:
    state(lab, "--reset-counters")
    protocol = Protocol(
        f"https://{NETWORK}.10:5986/wsman", transport="basic", username="rdpadmin", password="Lab-Healthy-1!",
        server_cert_validation="ignore", operation_timeout_sec=5, read_timeout_sec=10,
    )  # fmt: skip
    command, stdin = module_command({"v": 1, "on_error": "continue", "ops": [{"op": "system.info", "args": {}}]})
    shell_id = protocol.open_shell(codepage=65001)
    program, _space, arguments = command.partition(" ")
    command_id = protocol.run_command(shell_id, program, arguments.split(" "), console_mode_stdin=False)
    protocol.send_command_input(shell_id, command_id, stdin, end=True)
    stdout, _stderr, rc = protocol.get_command_output(shell_id, command_id)
    protocol.cleanup_command(shell_id, command_id)
    protocol.close_shell(shell_id)
    assert rc == 0
    assert json.loads(stdout)["results"][0]["data"]["hostname"] == "WEB01"
    counters = state(lab, "--host", "healthy")["healthy"]["counters"]
    assert (counters["winrm_shells"], counters["winrm_commands"], counters["writes"]) == (1, 1, 0)


def test_ansible_winrm_connection_is_refused_anything_but_the_agent(lab: dict[str, Path]) -> None:
    state(lab, "--reset-counters")
    env = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "false", "ANSIBLE_NOCOLOR": "1"}
    result = subprocess.run(
        [str(VENV_BIN / "ansible"), "-i", str(lab["inventory"]), "healthy", "-m", "raw", "-a", "ipconfig"],
        check=False, capture_output=True, text=True, timeout=120, env=env, cwd=lab["inventory"].parent,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "only runs the rdpfix agent" in output
    assert "rc=1" in output or '"rc": 1' in output
    counters = state(lab, "--host", "healthy")["healthy"]["counters"]
    assert counters["winrm_commands"] == 1
    assert counters["writes"] == 0


def test_fault_and_reset_follow_through_to_the_rdp_listener(lab: dict[str, Path]) -> None:
    address = (f"{NETWORK}.10", 3389)
    socket.create_connection(address, timeout=2).close()
    rdplab("fault", "--state-dir", str(lab["state"]), "healthy", "stop_service", "name=TermService")
    snapshot = state(lab, "--host", "healthy")["healthy"]
    assert snapshot["rdp_port"] is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=2)
    rdplab("reset", "--state-dir", str(lab["state"]))
    assert state(lab, "--host", "healthy")["healthy"]["rdp_port"] == 3389
    socket.create_connection(address, timeout=2).close()


def test_bad_fault_is_a_clear_error(lab: dict[str, Path]) -> None:
    result = rdplab("fault", "--state-dir", str(lab["state"]), "healthy", "no_such_fault", check=False)
    assert result.returncode == 1
    assert "unknown fault 'no_such_fault'" in result.stderr
    assert "Traceback" not in result.stderr


def test_second_up_in_the_same_state_dir_is_refused(lab: dict[str, Path]) -> None:
    result = rdplab(
        "up", "--network", free_network(), "--state-dir", str(lab["state"]), str(HOSTS / "healthy.yml"), check=False
    )
    assert result.returncode == 1
    assert "already running" in result.stderr


def test_up_refuses_ports_in_use(lab: dict[str, Path], tmp_path: Path) -> None:
    result = rdplab(
        "up", "--network", NETWORK, "--state-dir", str(tmp_path / "other"), "--inventory", str(tmp_path / "i.yml"),
        str(HOSTS / "healthy.yml"), check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "ports already in use" in result.stderr
    assert f"{NETWORK}.10:5985" in result.stderr
    assert not (tmp_path / "other" / "state.json").exists()


def test_serve_dies_when_it_cannot_bind(lab: dict[str, Path], tmp_path: Path) -> None:
    result = rdplab(
        "serve", "--network", NETWORK, "--state-dir", str(tmp_path), str(HOSTS / "healthy.yml"), check=False
    )
    assert result.returncode == 2
    assert "cannot listen" in result.stderr
    assert not (tmp_path / "state.json").exists()


def test_bad_host_file_is_reported_before_anything_starts(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("name: broken\nsystem: {os_build: many}\n")
    result = rdplab("up", "--network", free_network(), "--state-dir", str(tmp_path / "s"), str(broken), check=False)
    assert result.returncode == 1
    assert "broken.yml" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s" / "state.json").exists()


def test_down_cleans_up_after_a_dead_lab(tmp_path: Path) -> None:
    state_dir = tmp_path / "dead"
    state_dir.mkdir()
    # Above the kernel's default pid_max: no process has this pid, as after a crash of the lab.
    (state_dir / "state.json").write_text(json.dumps({"pid": 2**22 + 12345, "control": "127.0.0.255:1"}))
    result = rdplab("down", "--state-dir", str(state_dir))
    assert "already stopped" in result.stdout
    assert not (state_dir / "state.json").exists()
    result = rdplab("state", "--state-dir", str(state_dir), check=False)
    assert result.returncode == 1
    assert "no lab is running" in result.stderr


def test_up_state_down_cycle_leaves_nothing_behind(tmp_path: Path) -> None:
    state_dir = tmp_path / "cycle"
    network = free_network()
    rdplab("up", "--network", network, "--state-dir", str(state_dir), "--inventory", str(tmp_path / "inv.yml"),
           str(HOSTS / "healthy.yml"))  # fmt: skip
    pid = json.loads((state_dir / "state.json").read_text())["pid"]
    assert Path(f"/proc/{pid}").exists()
    rdplab("down", "--state-dir", str(state_dir))
    assert not (state_dir / "state.json").exists()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((f"{network}.10", 5985), timeout=2)


def test_inventory_names_the_listener_port_of_a_host_whose_rdp_port_is_closed(tmp_path: Path) -> None:
    # The firewall refuses 3390 at start; a probe must still test 3390 (where the repaired listener answers), not 3389.
    state_dir = tmp_path / "closed"
    inventory = tmp_path / "inv.yml"
    rdplab("up", "--network", free_network(), "--state-dir", str(state_dir), "--inventory", str(inventory),
           str(HOSTS / "firewall-moved-port.yml"))  # fmt: skip
    try:
        recorded = json.loads((state_dir / "state.json").read_text())
        assert recorded["hosts"]["firewall-moved-port"]["rdp_port"] is None, "nothing listens at start"
        hosts = yaml.safe_load(inventory.read_text())["all"]["children"]["windows"]["hosts"]
        assert hosts["firewall-moved-port"]["rdpfix_server_rdp_port"] == 3390
    finally:
        rdplab("down", "--state-dir", str(state_dir), check=False)
