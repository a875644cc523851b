"""Transport faults and cut batches at the lab's WinRM endpoint, met by pywinrm as Ansible's winrm connection meets
them: the command runs (or not) on the host exactly as the fault says, and the client sees the failure it would see
from Windows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import typing as t
from pathlib import Path

import asyncssh
import pytest
import requests
from winrm.exceptions import WinRMError
from winrm.protocol import Protocol

from rdplab.ansible_client import module_command
from rdplab.model.host import WindowsHost
from rdplab.server import HostRuntime
from rdplab.winrm import port_free

REPO_ROOT = Path(__file__).resolve().parents[3]
HOST_FILE = REPO_ROOT / "tests" / "lab" / "hosts" / "healthy.yml"
USER, PASSWORD = "rdpadmin", "Lab-Healthy-1!"
KEY = "HKLM:\\SOFTWARE\\rdplab-fault-test"


def free_address() -> str:
    import random

    for _attempt in range(200):
        network = f"127.{random.randint(100, 254)}.{random.randint(0, 255)}"
        if all(port_free(f"{network}.10", port) for port in (5985, 5986, 3389)):
            return network + ".10"
    raise RuntimeError("no free loopback network found")


ADDRESS = free_address()


def write_batch(count: int) -> dict[str, t.Any]:
    ops = [
        {"op": "registry.set", "args": {"path": KEY, "name": f"Step{i}", "type": "REG_DWORD", "value": i}}
        for i in range(count)
    ]
    return {"v": 1, "on_error": "stop", "ops": ops}


def written(host: WindowsHost) -> list[str]:
    document = host.run_batch({"v": 1, "ops": [{"op": "registry.get", "args": {"path": KEY}}]})
    return sorted(document["results"][0]["data"].get("values", {}))


@pytest.fixture
def host() -> WindowsHost:
    return WindowsHost.from_file(HOST_FILE)


@pytest.fixture
def runtime(host: WindowsHost) -> t.Iterator[HostRuntime]:
    lab_host = HostRuntime(ADDRESS, host)
    lab_host.start()
    try:
        yield lab_host
    finally:
        lab_host.stop()


def protocol() -> Protocol:
    # Short timeouts as a test inventory sets them (ansible_winrm_operation_timeout_sec / read_timeout_sec).
    return Protocol(
        f"https://{ADDRESS}:5986/wsman",
        transport="basic",
        username=USER,
        password=PASSWORD,
        server_cert_validation="ignore",
        operation_timeout_sec=1,
        read_timeout_sec=2,
    )


def send(proto: Protocol, batch: dict[str, t.Any]) -> tuple[bytes, bytes, int]:
    """What Ansible's winrm connection does for one exec_command: Command, Send (End), Receive until done, and, in a
    ``finally``, Signal terminate (cleanup_command) - also after a failure."""
    command, stdin = module_command(batch)
    shell_id = proto.open_shell(codepage=65001)
    program, _space, arguments = command.partition(" ")
    command_id = None
    try:
        command_id = proto.run_command(shell_id, program, arguments.split(" "), console_mode_stdin=False)
        proto.send_command_input(shell_id, command_id, stdin, end=True)
        return t.cast(tuple[bytes, bytes, int], proto.get_command_output(shell_id, command_id))
    finally:
        if command_id:
            proto.cleanup_command(shell_id, command_id)


def test_a_cut_batch_stops_between_operations_after_the_client_times_out(
    runtime: HostRuntime, host: WindowsHost
) -> None:
    host.inject_fault("transport", {"kind": "cut_at_op", "op": 2, "seconds": 20})
    started = time.monotonic()
    with pytest.raises(requests.exceptions.ReadTimeout):
        send(protocol(), write_batch(4))
    # The terminate sent by the client's cleanup ended the batch well before the stall's own end.
    deadline = time.monotonic() + 5
    while written(host) != ["Step0", "Step1"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert written(host) == ["Step0", "Step1"]
    assert time.monotonic() - started < 10
    assert host.counters.writes == 2
    # The next command runs normally.
    stdout, _stderr, rc = send(protocol(), write_batch(4))
    assert rc == 0 and all(item["ok"] for item in json.loads(stdout)["results"])


def test_answer_dropped_after_the_command_ran(runtime: HostRuntime, host: WindowsHost) -> None:
    host.inject_fault("transport", {"kind": "drop_after"})
    with pytest.raises(requests.exceptions.ConnectionError):
        send(protocol(), write_batch(2))
    assert written(host) == ["Step0", "Step1"]


def test_http_500_after_the_command_ran(runtime: HostRuntime, host: WindowsHost) -> None:
    host.inject_fault("transport", {"kind": "http500_after"})
    with pytest.raises(WinRMError, match=r"500|internal error"):
        send(protocol(), write_batch(2))
    assert written(host) == ["Step0", "Step1"]


def test_answer_held_past_the_read_timeout(runtime: HostRuntime, host: WindowsHost) -> None:
    host.inject_fault("transport", {"kind": "delay_after", "seconds": 3})
    with pytest.raises(requests.exceptions.ReadTimeout):
        send(protocol(), write_batch(1))
    assert written(host) == ["Step0"]


def test_dropped_before_the_command_nothing_runs_and_skip_picks_the_command(
    runtime: HostRuntime, host: WindowsHost
) -> None:
    host.inject_fault("transport", {"kind": "drop_before", "skip": 1})
    # The first command is skipped by the fault, the second is dropped, the third runs.
    send(protocol(), {"v": 1, "on_error": "stop", "ops": [{"op": "system.info", "args": {}}]})
    with pytest.raises(requests.exceptions.ConnectionError):
        send(protocol(), write_batch(1))
    assert written(host) == []
    _stdout, _stderr, rc = send(protocol(), write_batch(1))
    assert rc == 0 and written(host) == ["Step0"]
    assert host.transport_faults[0].describe()["fired"] == 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"kind": "unplug"}, "kind"),
        ({"kind": "drop_after", "count": -1}, "count"),
        ({"kind": "delay_after", "seconds": 1000}, "seconds"),
        ({"kind": "drop_after", "when": "now"}, "unknown parameter"),
    ],
)
def test_bad_fault_parameters_are_refused(host: WindowsHost, params: dict[str, t.Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        host.inject_fault("transport", params)


# -- the same faults over PSRP and SSH ---------------------------------------------------------------------------------


def psrp_exec(batch: dict[str, t.Any]) -> tuple[int, bytes]:
    """One batch through Ansible's psrp connection (pypsrp, NTLM with message encryption), timeouts as in a test
    inventory."""
    from ansible.playbook.play_context import PlayContext
    from ansible.plugins.loader import connection_loader, shell_loader

    connection = connection_loader.get("psrp", PlayContext(), shell=shell_loader.get("powershell"))
    connection.set_options(
        var_options={
            "ansible_host": ADDRESS,
            "ansible_user": USER,
            "ansible_password": PASSWORD,
            "ansible_port": 5985,
            "ansible_psrp_protocol": "http",
            "ansible_psrp_auth": "negotiate",
            "ansible_psrp_operation_timeout": 1,
            "ansible_psrp_read_timeout": 2,
        }
    )
    command, stdin = module_command(batch)
    try:
        rc, stdout, _stderr = connection.exec_command(command, in_data=stdin, sudoable=False)
    finally:
        with contextlib.suppress(Exception):  # closing after a dropped answer fails; Ansible only logs it
            connection.close()
    return rc, stdout


def ssh_exec(runtime: HostRuntime, batch: dict[str, t.Any]) -> tuple[int | None, bytes]:
    command, stdin = module_command(batch)

    async def go() -> tuple[int | None, bytes]:
        async with asyncssh.connect(
            ADDRESS, runtime.ssh.bound_port, username=USER, password=PASSWORD, known_hosts=None
        ) as connection:
            result = await connection.run(command, input=stdin, encoding=None)
            return result.exit_status, bytes(result.stdout or b"")

    return asyncio.run(go())


def test_psrp_answer_dropped_after_the_pipeline_ran(runtime: HostRuntime, host: WindowsHost) -> None:
    host.inject_fault("transport", {"kind": "drop_after"})
    with pytest.raises(Exception, match=r"(?i)connection|aborted|closed"):
        psrp_exec(write_batch(2))
    assert written(host) == ["Step0", "Step1"]


def test_psrp_request_dropped_before_the_pipeline_nothing_runs(runtime: HostRuntime, host: WindowsHost) -> None:
    host.inject_fault("transport", {"kind": "drop_before"})
    with pytest.raises(Exception, match=r"(?i)connection|aborted|closed"):
        psrp_exec(write_batch(1))
    assert written(host) == []


def test_psrp_held_answer_is_asked_again_and_arrives(runtime: HostRuntime, host: WindowsHost) -> None:
    # pypsrp sends the same Receive again after its read timeout; the host answers it with the same data.
    host.inject_fault("transport", {"kind": "delay_after", "seconds": 3})
    rc, stdout = psrp_exec(write_batch(1))
    assert rc == 0 and all(item["ok"] for item in json.loads(stdout)["results"])
    assert written(host) == ["Step0"] and host.transport_faults[0].fired == 1


def test_ssh_dropped_before_nothing_runs_after_everything_ran(runtime: HostRuntime, host: WindowsHost) -> None:
    # The connection closes without an exit status (OpenSSH exits 255): before the command, or after it ran.
    host.inject_fault("transport", {"kind": "drop_before"})
    assert ssh_exec(runtime, write_batch(1)) == (None, b"")
    assert written(host) == []
    host.inject_fault("transport", {"kind": "drop_after"})
    assert ssh_exec(runtime, write_batch(2)) == (None, b"")
    assert written(host) == ["Step0", "Step1"]


def test_ssh_held_answer_arrives_late(runtime: HostRuntime, host: WindowsHost) -> None:
    host.inject_fault("transport", {"kind": "delay_after", "seconds": 1})
    started = time.monotonic()
    rc, stdout = ssh_exec(runtime, write_batch(1))
    assert time.monotonic() - started >= 1
    assert rc == 0 and all(item["ok"] for item in json.loads(stdout)["results"])
