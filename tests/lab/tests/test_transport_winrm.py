"""The lab's WinRM endpoint, driven by pywinrm exactly as Ansible's winrm connection drives it."""

from __future__ import annotations

import base64
import importlib.util
import json
import random
import sys
import tempfile
import threading
import typing as t
from pathlib import Path

import pytest
import requests
import winrm
from winrm.exceptions import InvalidCredentialsError, WinRMOperationTimeoutError, WSManFaultError
from winrm.protocol import Protocol

from rdplab import bootstrap
from rdplab.ansible_client import module_command
from rdplab.direct import DirectConnection
from rdplab.model.host import Counters, RdpView, WindowsHost
from rdplab.server import HostRuntime
from rdplab.winrm import port_free

REPO_ROOT = Path(__file__).resolve().parents[3]
HOST_FILE = REPO_ROOT / "tests" / "lab" / "hosts" / "healthy.yml"
USER, PASSWORD = "rdpadmin", "Lab-Healthy-1!"
# CRLF line endings and non-ASCII text: the script must survive the trip byte for byte.
AGENT_SCRIPT = (
    "#Requires -Version 5.1\r\nparam([string]$BatchJson)\r\n# agent for the transport tests: é ü 中\r\n"
    "Write-Output '{}'\r\n"
)
SYSTEM_INFO_BATCH: dict[str, t.Any] = {"v": 1, "on_error": "continue", "ops": [{"op": "system.info", "args": {}}]}
TEST_KEY = "HKLM:\\SOFTWARE\\rdplab-transport-test"
WRITE_BATCH: dict[str, t.Any] = {
    "v": 1,
    "on_error": "stop",
    "ops": [{"op": "registry.set", "args": {"path": TEST_KEY, "name": "Marker", "type": "REG_DWORD", "value": 7}}],
}


def marker(host: WindowsHost) -> t.Any:
    """The value WRITE_BATCH sets, read straight from the model (None while absent)."""
    document = host.run_batch({"v": 1, "ops": [{"op": "registry.get", "args": {"path": TEST_KEY}}]})
    return document["results"][0]["data"].get("values", {}).get("Marker")


def free_network(ports: tuple[int, ...] = (5985, 5986, 3389, 5999)) -> str:
    """A random 127.a.b network whose .1, .10 and .11 have the ports free: concurrent test runs (xdist workers, two
    engineers' pytest) must not meet on the same addresses."""
    for _attempt in range(200):
        network = f"127.{random.randint(100, 254)}.{random.randint(0, 255)}"
        if all(port_free(f"{network}.{octet}", port) for octet in (1, 10, 11) for port in ports):
            return network
    raise RuntimeError("no free loopback network found")


ADDRESS = free_network() + ".10"


class FakeHost:
    """Just what the transport touches, with a run_batch that answers system.info and records what it ran."""

    def __init__(self, name: str = "web01") -> None:
        self.name = name
        self.groups = ["azure_vms"]
        self.username, self.password = USER, PASSWORD
        self.counters = Counters()
        self.lock = threading.RLock()
        self.batches: list[dict[str, t.Any]] = []

    def run_batch(self, batch: dict[str, t.Any]) -> dict[str, t.Any]:
        if batch.get("v") != 1:
            raise ValueError("unsupported batch document")
        self.batches.append(batch)
        results = [
            {"op": item["op"], "ok": True, "data": {"hostname": self.name.upper(), "echo": item.get("args")}}
            for item in batch["ops"]
        ]
        return {"v": 1, "results": results}

    def rdp_view(self, connect: bool = True) -> RdpView:
        return RdpView(3389, False, 0, False, None, None, None)

    def snapshot(self) -> dict[str, t.Any]:
        return {"name": self.name}

    def inject_fault(self, name: str, params: dict[str, t.Any]) -> None:
        raise ValueError(name)


@pytest.fixture
def collection_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A checkout with a known agent script; the lab is pointed at it."""
    root = tmp_path / "collection"
    utils = root / "plugins" / "plugin_utils"
    utils.mkdir(parents=True)
    (utils / "_agent.ps1").write_bytes(AGENT_SCRIPT.encode("utf-8"))
    monkeypatch.setenv(bootstrap.COLLECTION_ROOT_ENV, str(root))
    return root


@pytest.fixture
def agent(collection_root: Path) -> t.Any:
    """The collection's _agent module (the batch runner and result parser), loaded from this checkout."""
    spec = importlib.util.spec_from_file_location("rdplab_test_agent", REPO_ROOT / "plugins/plugin_utils/_agent.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def wire(batch: dict[str, t.Any], script: str | None = None) -> tuple[str, bytes]:
    """(command line, stdin) of Ansible's module wrapper running the agent (by default the one the lab accepts)."""
    if script is None:
        return module_command(batch)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "agent.ps1"
        path.write_bytes(script.encode("utf-8"))
        return module_command(batch, agent=path)


@pytest.fixture
def host() -> WindowsHost:
    return WindowsHost.from_file(HOST_FILE)


@pytest.fixture
def fake() -> FakeHost:
    return FakeHost()


@pytest.fixture
def runtime(host: WindowsHost, collection_root: Path) -> t.Iterator[HostRuntime]:
    lab_host = HostRuntime(ADDRESS, host)
    lab_host.start()
    try:
        yield lab_host
    finally:
        lab_host.stop()


def protocol(scheme: str = "https", password: str = PASSWORD) -> Protocol:
    port = 5986 if scheme == "https" else 5985
    return Protocol(
        f"{scheme}://{ADDRESS}:{port}/wsman",
        # Over HTTP only sealed messages pass (AllowUnencrypted false): NTLM with message encryption.
        transport="ntlm" if scheme == "http" else "basic",
        username=USER,
        password=password,
        server_cert_validation="ignore",
        operation_timeout_sec=2,
        read_timeout_sec=4,
    )


def run_with_stdin(proto: Protocol, command_line: str, stdin: bytes) -> tuple[bytes, bytes, int]:
    """What Ansible's winrm connection does for exec_command(cmd, in_data): Command, Send (End), Receive."""
    shell_id = proto.open_shell(codepage=65001)
    program, _space, arguments = command_line.partition(" ")
    command_id = proto.run_command(
        shell_id, program, arguments.split(" ") if arguments else (), console_mode_stdin=False
    )
    proto.send_command_input(shell_id, command_id, stdin, end=True)
    stdout, stderr, rc = proto.get_command_output(shell_id, command_id)
    proto.cleanup_command(shell_id, command_id)
    proto.close_shell(shell_id)
    return stdout, stderr, rc


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_protocol_round_trip_of_an_agent_batch(
    runtime: HostRuntime, host: WindowsHost, agent: t.Any, scheme: str
) -> None:
    stdout, stderr, rc = run_with_stdin(protocol(scheme), *wire(SYSTEM_INFO_BATCH))
    assert (rc, stderr) == (0, b"")
    assert json.loads(stdout) == host.run_batch(SYSTEM_INFO_BATCH)
    # The controller's own parser accepts it.
    result = agent.parse_output("healthy", rc, stdout, stderr, expected=1)
    assert result.data(0)["hostname"] == "WEB01"


def test_a_write_batch_changes_the_host_once(runtime: HostRuntime, host: WindowsHost, agent: t.Any) -> None:
    stdout, _stderr, rc = run_with_stdin(protocol(), *wire(WRITE_BATCH))
    assert rc == 0
    assert json.loads(stdout)["results"][0]["ok"] is True
    assert marker(host) == {"type": "REG_DWORD", "value": 7}
    assert host.counters.writes == 1


def test_session_level_agent_batch_over_https(runtime: HostRuntime, host: WindowsHost, agent: t.Any) -> None:
    session = winrm.Session(
        f"https://{ADDRESS}:5986/wsman", auth=(USER, PASSWORD), transport="basic", server_cert_validation="ignore"
    )
    stdout, _stderr, rc = run_with_stdin(session.protocol, *wire(SYSTEM_INFO_BATCH))
    assert rc == 0
    assert json.loads(stdout)["results"][0]["op"] == "system.info"


def test_session_run_cmd_of_anything_else_is_refused(runtime: HostRuntime, host: WindowsHost) -> None:
    session = winrm.Session(
        f"https://{ADDRESS}:5986/wsman", auth=(USER, PASSWORD), transport="basic", server_cert_validation="ignore"
    )
    response = session.run_cmd("ipconfig", ["/all"])
    assert response.status_code == 1
    assert b"only runs the rdpfix agent" in response.std_err
    assert b"'ipconfig /all'" in response.std_err
    assert host.counters.winrm_commands == 1


def test_wrong_password_is_401(runtime: HostRuntime) -> None:
    with pytest.raises(InvalidCredentialsError):
        protocol("https", password="wrong").open_shell()
    answer = requests.post(f"http://{ADDRESS}:5985/wsman", data=b"<x/>", timeout=5)
    assert answer.status_code == 401
    assert 'Basic realm="WSMAN"' in answer.headers["WWW-Authenticate"]


def test_modified_agent_script_is_refused(runtime: HostRuntime, host: WindowsHost, agent: t.Any) -> None:
    tampered = AGENT_SCRIPT.replace("Write-Output", "Remove-Item C:\\ -Recurse; Write-Output")
    stdout, stderr, rc = run_with_stdin(protocol(), *wire(WRITE_BATCH, tampered))
    assert rc == 1
    assert stdout == b""
    assert b"is not the collection's _agent.ps1" in stderr
    assert marker(host) is None
    assert host.counters.writes == 0


def test_agent_script_edits_on_disk_are_followed(
    runtime: HostRuntime, host: WindowsHost, agent: t.Any, collection_root: Path
) -> None:
    new_script = AGENT_SCRIPT + "# a later revision\r\n"
    ps1 = collection_root / "plugins" / "plugin_utils" / "_agent.ps1"
    ps1.write_bytes(new_script.encode("utf-8"))
    old = run_with_stdin(protocol(), *wire(SYSTEM_INFO_BATCH, AGENT_SCRIPT))
    new = run_with_stdin(protocol(), *wire(SYSTEM_INFO_BATCH, new_script))
    assert (old[2], new[2]) == (1, 0)


def test_bootstrap_with_extra_argument_is_refused(runtime: HostRuntime, host: WindowsHost, agent: t.Any) -> None:
    command, stdin = wire(WRITE_BATCH)
    _stdout, stderr, rc = run_with_stdin(protocol(), command + " -Foo", stdin)
    assert rc == 1
    assert b"is not Ansible's module bootstrap" in stderr
    assert marker(host) is None


def test_counters_count_each_shell_and_command_once(runtime: HostRuntime, host: WindowsHost, agent: t.Any) -> None:
    proto = protocol()
    shell_id = proto.open_shell()
    for command_line, stdin in [
        wire(SYSTEM_INFO_BATCH),
        ("ipconfig", b""),
        wire(SYSTEM_INFO_BATCH),
    ]:
        program, _space, arguments = command_line.partition(" ")
        command_id = proto.run_command(shell_id, program, arguments.split(" ") if arguments else ())
        if stdin:
            proto.send_command_input(shell_id, command_id, stdin, end=True)
        proto.get_command_output(shell_id, command_id)
        proto.cleanup_command(shell_id, command_id)
    proto.close_shell(shell_id)
    assert (host.counters.winrm_shells, host.counters.winrm_commands, host.counters.writes) == (1, 3, 0)


def test_stdin_in_several_chunks_and_output_over_several_receives(
    fake: FakeHost, collection_root: Path, agent: t.Any
) -> None:
    # A batch larger than one envelope: Ansible sends stdin in 200,000-byte chunks, the output comes back in parts.
    args = {"content_b64": "QUJD" * 100_000}
    big = {"v": 1, "on_error": "stop", "ops": [{"op": "file.write", "args": args}]}
    command, payload = wire(big)
    runtime = HostRuntime(ADDRESS, fake)  # type: ignore[arg-type]
    runtime.start()
    try:
        output, receives, rc = _chunked_round_trip(command, payload)
    finally:
        runtime.stop()
    assert receives > 1
    assert rc == 0
    assert json.loads(output)["results"][0]["data"]["echo"] == args


def _chunked_round_trip(command: str, payload: bytes) -> tuple[bytes, int, int]:
    proto = protocol()
    shell_id = proto.open_shell(codepage=65001)
    program, _space, arguments = command.partition(" ")
    command_id = proto.run_command(shell_id, program, arguments.split(" "), console_mode_stdin=False)
    chunks = [payload[i : i + 200_000] for i in range(0, len(payload), 200_000)]
    for index, chunk in enumerate(chunks):
        proto.send_command_input(shell_id, command_id, chunk, end=index == len(chunks) - 1)
    receives = 0
    output = b""
    while True:
        stdout, _stderr, rc, done = proto.get_command_output_raw(shell_id, command_id)
        receives += 1
        output += stdout
        if done:
            break
    assert len(chunks) == 3
    return output, receives, rc


def test_receive_before_stdin_is_closed_times_out_and_client_polls(
    runtime: HostRuntime, host: WindowsHost, agent: t.Any
) -> None:
    proto = protocol()
    shell_id = proto.open_shell()
    command, payload = wire(SYSTEM_INFO_BATCH)
    program, _space, arguments = command.partition(" ")
    command_id = proto.run_command(shell_id, program, arguments.split(" "))
    proto.send_command_input(shell_id, command_id, payload[:10], end=False)
    with pytest.raises(WinRMOperationTimeoutError):
        proto.get_command_output_raw(shell_id, command_id)
    proto.send_command_input(shell_id, command_id, payload[10:], end=True)
    stdout, _stderr, rc = proto.get_command_output(shell_id, command_id)
    assert rc == 0
    assert json.loads(stdout)["v"] == 1


def test_unknown_action_is_a_soap_fault(runtime: HostRuntime) -> None:
    proto = protocol("https")
    message = {
        "env:Envelope": proto.build_wsman_header(
            action="http://schemas.xmlsoap.org/ws/2004/09/transfer/Get",
            resource_uri="http://schemas.microsoft.com/wbem/wsman/1/wmi/root/cimv2/Win32_Service",
        )
    }
    import xmltodict

    with pytest.raises(WSManFaultError) as caught:
        proto.send_message(xmltodict.unparse(message))
    assert caught.value.code == 500
    assert "does not support the action" in caught.value.reason


def test_unknown_shell_is_a_fault(runtime: HostRuntime) -> None:
    with pytest.raises(WSManFaultError) as caught:
        protocol().run_command("00000000-0000-0000-0000-000000000000", "ipconfig")
    assert "shell was not found" in caught.value.reason


def test_shells_are_independent_under_concurrency(runtime: HostRuntime, host: WindowsHost, agent: t.Any) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(run_with_stdin(protocol(), *wire(SYSTEM_INFO_BATCH))[2])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _client in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [0] * 8
    assert (host.counters.winrm_shells, host.counters.winrm_commands) == (8, 8)


# --- DirectConnection: the same checks without sockets ------------------------------------------------------------


def test_direct_connection_runs_the_agent_and_counts_like_winrm(host: WindowsHost, agent: t.Any) -> None:
    connection = DirectConnection(host)
    batch = agent.Batch(on_error="continue")
    batch.add("system.info")
    # The collection's own runner, reading the agent script from the checkout the lab compares with.
    result = agent.run_batch(
        connection, "healthy", batch, lambda sent: agent.WireCommand(*wire(json.loads(sent.to_json())))
    )
    assert result.data(0)["hostname"] == "WEB01"
    assert (host.counters.winrm_shells, host.counters.winrm_commands) == (1, 1)


def test_direct_connection_refuses_like_winrm(host: WindowsHost, agent: t.Any) -> None:
    connection = DirectConnection(host)
    encoded = base64.b64encode("ipconfig".encode("utf-16-le")).decode()
    rc, stdout, stderr = connection.exec_command(wire(SYSTEM_INFO_BATCH)[0].rsplit(" ", 1)[0] + " " + encoded)
    assert (rc, stdout) == (1, b"")
    assert b"only runs the rdpfix agent" in stderr
    assert host.counters.winrm_commands == 1


def test_invalid_batch_exits_non_zero(host: WindowsHost, agent: t.Any) -> None:
    connection = DirectConnection(host)
    command, stdin = wire({"v": 99, "ops": []})
    rc, stdout, _stderr = connection.exec_command(command, in_data=stdin)
    assert rc == 1
    assert json.loads(stdout)["failed"] is True
    assert "invalid batch" in json.loads(stdout)["msg"]


def test_default_collection_root_is_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(bootstrap.COLLECTION_ROOT_ENV, raising=False)
    assert bootstrap.collection_root() == REPO_ROOT
    assert (bootstrap.collection_root() / "galaxy.yml").exists()


def test_missing_collection_is_a_refusal_naming_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(bootstrap.COLLECTION_ROOT_ENV, str(tmp_path))
    command, stdin = module_command(SYSTEM_INFO_BATCH, agent=REPO_ROOT / "plugins" / "plugin_utils" / "_agent.ps1")
    outcome = bootstrap.execute(FakeHost(), command, stdin)  # type: ignore[arg-type]
    assert outcome.rc == 1
    assert b"agent script cannot be read" in outcome.stderr
