"""The lab's transports, driven by the real client libraries and Ansible's own connection plugins.

Every transport must hand ``rdplab.bootstrap`` the same (command line, stdin) that powershell.exe would receive for
what the client sent, whatever the payload: these tests put a recording recogniser in front of the real ones, send
the same command over WinRM (HTTP + NTLM, sealed; HTTPS), PSRP and SSH, and compare what arrived and what came back.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import subprocess
import typing as t
from pathlib import Path

import asyncssh
import pytest
import requests
import winrm
from ansible.playbook.play_context import PlayContext
from ansible.plugins.loader import connection_loader, shell_loader
from pypsrp.exceptions import AuthenticationError
from pypsrp.host import PSHost, PSHostUserInterface
from pypsrp.powershell import PowerShell, RunspacePool
from pypsrp.wsman import WSMan
from winrm.exceptions import InvalidCredentialsError

from rdplab import bootstrap, psrp, ssh, wsman_auth
from rdplab.model.host import WindowsHost
from rdplab.model.registry import RegValue
from rdplab.server import HostRuntime
from rdplab.winrm import port_free

REPO_ROOT = Path(__file__).resolve().parents[3]
HOST_FILE = REPO_ROOT / "tests" / "lab" / "hosts" / "healthy.yml"
USER, PASSWORD = "rdpadmin", "Lab-Healthy-1!"
# A script with non-ASCII text, and stdin of several lines (LF, as Ansible's module input) ending with a newline.
SCRIPT = "$ErrorActionPreference = 'Stop'\n# transport test é ü 中\n$input | ForEach-Object { $_ }\n"
COMMAND_LINE = psrp.command_line_of_script(SCRIPT)
STDIN = '{"first": "line é"}\n\x00\x00\x00\x00\nthird line\n'.encode()
OUTCOME = bootstrap.CommandOutcome(rc=0, stdout='{"ok": true, "text": "ü"}\r\n'.encode(), stderr=b"")
FAILED = bootstrap.CommandOutcome(rc=3, stdout=b"partial\r\n", stderr=b"something failed\r\n")


def free_network(ports: tuple[int, ...] = (5985, 5986, 3389, 22)) -> str:
    for _attempt in range(200):
        network = f"127.{random.randint(100, 254)}.{random.randint(0, 255)}"
        if all(port_free(f"{network}.{octet}", port) for octet in (10,) for port in ports):
            return network
    raise RuntimeError("no free loopback network found")


ADDRESS = free_network() + ".10"


class Recorder:
    """A recogniser that claims COMMAND_LINE, records what reached it and returns a fixed outcome."""

    name = "transport-test"

    def __init__(self, stdin_source: str = "pipeline", outcome: bootstrap.CommandOutcome = OUTCOME) -> None:
        self.stdin_source = stdin_source
        self.outcome = outcome
        self.calls: list[tuple[str, bytes]] = []

    def matches(self, command_line: str) -> bool:
        return command_line == COMMAND_LINE

    def wants_stdin(self) -> bool:
        return True

    def run(self, host: WindowsHost, command_line: str, stdin: bytes) -> bootstrap.CommandOutcome:
        self.calls.append((command_line, stdin))
        return self.outcome


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    found = Recorder()
    monkeypatch.setattr(bootstrap, "RECOGNISERS", [found, *bootstrap.RECOGNISERS])
    return found


@pytest.fixture(scope="module")
def client_key() -> asyncssh.SSHKey:
    return ssh.generate_key()


@pytest.fixture(scope="module")
def runtime(client_key: asyncssh.SSHKey) -> t.Iterator[HostRuntime]:
    lab_host = HostRuntime(ADDRESS, WindowsHost.from_file(HOST_FILE), [client_key])
    lab_host.start()
    try:
        yield lab_host
    finally:
        lab_host.stop()


@pytest.fixture
def host(runtime: HostRuntime) -> WindowsHost:
    fresh = WindowsHost.from_file(HOST_FILE)
    runtime.slot.replace_host(fresh)
    return fresh


def counters(host: WindowsHost) -> tuple[int, int]:
    return host.counters.winrm_shells, host.counters.winrm_commands


# -- WinRM: NTLM with message encryption over HTTP, Basic and NTLM over HTTPS ---------------------------------------


def winrs(scheme: str, transport: str, password: str = PASSWORD) -> winrm.Protocol:
    return winrm.Protocol(
        f"{scheme}://{ADDRESS}:{5986 if scheme == 'https' else 5985}/wsman",
        transport=transport,
        username=USER,
        password=password,
        server_cert_validation="ignore",
        operation_timeout_sec=2,
        read_timeout_sec=4,
    )


def run_winrs(proto: winrm.Protocol, command_line: str, stdin: bytes) -> tuple[int, bytes, bytes]:
    """What Ansible's winrm connection does for exec_command(cmd, in_data): Command, Send (End), Receive."""
    shell_id = proto.open_shell(codepage=65001)
    program, _space, arguments = command_line.partition(" ")
    command_id = proto.run_command(shell_id, program, arguments.split(" "), console_mode_stdin=False)
    proto.send_command_input(shell_id, command_id, stdin, end=True)
    stdout, stderr, rc = proto.get_command_output(shell_id, command_id)
    proto.close_shell(shell_id)
    return rc, stdout, stderr


@pytest.mark.parametrize(("scheme", "transport"), [("http", "ntlm"), ("https", "ntlm"), ("https", "basic")])
def test_winrm_hands_the_command_and_stdin_through(
    runtime: HostRuntime, host: WindowsHost, recorder: Recorder, scheme: str, transport: str
) -> None:
    proto = winrs(scheme, transport)
    assert run_winrs(proto, COMMAND_LINE, STDIN) == (0, OUTCOME.stdout, b"")
    assert recorder.calls == [(COMMAND_LINE, STDIN)]
    # Over HTTP, NTLM seals every message (pywinrm's message_encryption "auto").
    assert (proto.transport.encryption is not None) == (scheme == "http")
    assert counters(host) == (1, 1)
    sealed = "/sealed" if scheme == "http" else ""
    assert runtime.slot.commands_by_channel == {f"winrs/{scheme}/{transport.replace('ntlm', 'negotiate')}{sealed}": 1}


def test_winrm_ntlm_wrong_password_is_401(runtime: HostRuntime, host: WindowsHost) -> None:
    with pytest.raises(InvalidCredentialsError):
        winrs("http", "ntlm", password="Lab-Healthy-2!").open_shell()
    assert counters(host) == (0, 0)


def test_unencrypted_http_is_refused_until_allow_unencrypted(
    runtime: HostRuntime, host: WindowsHost, recorder: Recorder
) -> None:
    # Basic over HTTP: the credentials are right, the channel is not (AllowUnencrypted is false by default).
    with pytest.raises(InvalidCredentialsError):
        winrs("http", "basic").open_shell()
    answer = requests.post(f"http://{ADDRESS}:5985/wsman", data=b"<x/>", timeout=5)
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == 'Negotiate, Basic realm="WSMAN"'
    with host.lock:
        host.registry.set(wsman_auth.SERVICE_KEY, wsman_auth.SERVICE_VALUE, RegValue("REG_DWORD", 1))
    assert run_winrs(winrs("http", "basic"), COMMAND_LINE, STDIN)[0] == 0
    # Group Policy wins over the service setting.
    with host.lock:
        host.registry.set(wsman_auth.POLICY_KEY, wsman_auth.POLICY_VALUE, RegValue("REG_DWORD", 0))
    with pytest.raises(InvalidCredentialsError):
        winrs("http", "basic").open_shell()


def test_winrm_credssp_over_https_once_enabled(runtime: HostRuntime, host: WindowsHost, recorder: Recorder) -> None:
    # CredSSP is off on the WinRM service by default (Enable-WSManCredSSP -Role Server turns it on).
    with pytest.raises(Exception, match="did not response CredSSP"):
        winrs("https", "credssp").open_shell()
    with host.lock:
        host.registry.set(wsman_auth.SERVICE_KEY, "auth_credssp", RegValue("REG_DWORD", 1))
    assert run_winrs(winrs("https", "credssp"), COMMAND_LINE, STDIN) == (0, OUTCOME.stdout, b"")
    assert recorder.calls == [(COMMAND_LINE, STDIN)]
    assert runtime.slot.commands_by_channel == {"winrs/https/credssp": 1}
    # A wrong password: the TSRequest carries SEC_E_LOGON_DENIED, as Windows answers [MS-CSSP].
    with pytest.raises(Exception, match=r"0x8009030c"):
        winrs("https", "credssp", password="Lab-Healthy-2!").open_shell()
    assert counters(host) == (1, 1)


def test_a_tampered_sealed_message_is_rejected(runtime: HostRuntime, host: WindowsHost) -> None:
    proto = winrs("http", "ntlm")
    session = proto.transport.build_session()
    encryption = proto.transport.encryption
    assert encryption is not None
    request = encryption.prepare_encrypted_request(session, proto.transport.endpoint, b"<s:Envelope/>")
    body = bytearray(request.body)
    body[-30] ^= 0x01  # one bit of the sealed payload
    request.body = bytes(body)
    assert session.send(request, timeout=5).status_code == 400
    assert counters(host) == (0, 0)


# -- PSRP ----------------------------------------------------------------------------------------------------------


def psrp_run(
    lines: list[str] | None, *, port: int = 5985, auth: str = "negotiate", password: str = PASSWORD
) -> tuple[list[t.Any], list[str], int | None]:
    wsman = WSMan(
        ADDRESS,
        port=port,
        ssl=port == 5986,
        auth=auth,
        username=USER,
        password=password,
        cert_validation=False,
        operation_timeout=2,
        read_timeout=4,
    )
    ps_host = PSHost(None, None, False, "test host", None, PSHostUserInterface(), None)
    with RunspacePool(wsman, host=ps_host) as pool:
        pipeline = PowerShell(pool)
        pipeline.add_script(SCRIPT)
        output = pipeline.invoke(input=lines)
        errors = [str(error) for error in pipeline.streams.error]
    return output, errors, ps_host.rc


def test_psrp_turns_script_and_input_into_the_command_line_and_stdin(
    runtime: HostRuntime, host: WindowsHost, recorder: Recorder
) -> None:
    output, errors, rc = psrp_run(STDIN.decode().splitlines())
    assert recorder.calls == [(COMMAND_LINE, STDIN)]
    assert (output, errors, rc) == (['{"ok": true, "text": "ü"}'], [], None)
    assert counters(host) == (1, 1)
    assert runtime.slot.commands_by_channel == {"psrp/http/negotiate/sealed": 1}


def test_psrp_gives_console_readers_no_stdin(runtime: HostRuntime, host: WindowsHost, recorder: Recorder) -> None:
    # [Console]::In of a runspace in the WinRM host process is empty, whatever the pipeline input.
    recorder.stdin_source = "console"
    psrp_run(["line"])
    assert recorder.calls == [(COMMAND_LINE, b"")]


def test_psrp_returns_errors_and_the_exit_code(runtime: HostRuntime, host: WindowsHost, recorder: Recorder) -> None:
    recorder.outcome = FAILED
    output, errors, rc = psrp_run(None, port=5986, auth="basic")
    assert recorder.calls == [(COMMAND_LINE, b"")]
    assert (output, errors, rc) == (["partial"], ["something failed"], 3)


def test_psrp_over_https_with_ntlm(runtime: HostRuntime, host: WindowsHost, recorder: Recorder) -> None:
    output, _errors, _rc = psrp_run(["only line"], port=5986, auth="ntlm")
    assert output == ['{"ok": true, "text": "ü"}']
    assert recorder.calls == [(COMMAND_LINE, b"only line\n")]
    assert runtime.slot.commands_by_channel == {"psrp/https/negotiate": 1}


def test_psrp_refuses_what_no_recogniser_claims_and_wrong_passwords(runtime: HostRuntime, host: WindowsHost) -> None:
    output, errors, rc = psrp_run(["x"])
    assert (output, rc) == ([], 1)
    assert errors[0].startswith("rdplab: this simulated Windows host only runs")
    with pytest.raises(AuthenticationError):
        psrp_run(None, password="wrong")


# -- SSH -----------------------------------------------------------------------------------------------------------


def ssh_run(command: str | None, stdin: bytes, **credentials: t.Any) -> tuple[int | None, bytes, bytes]:
    async def go() -> tuple[int | None, bytes, bytes]:
        async with asyncssh.connect(
            ADDRESS, runtime_port[0], username=USER, known_hosts=None, **credentials
        ) as connection:
            result = await connection.run(command, input=stdin, encoding=None)
            return result.exit_status, bytes(result.stdout or b""), bytes(result.stderr or b"")

    return asyncio.run(go())


runtime_port: list[int] = []


@pytest.fixture
def ssh_port(runtime: HostRuntime) -> int:
    assert runtime.ssh.bound_port is not None
    runtime_port[:] = [runtime.ssh.bound_port]
    return runtime.ssh.bound_port


def test_ssh_hands_the_command_and_stdin_through(
    runtime: HostRuntime, host: WindowsHost, ssh_port: int, recorder: Recorder, client_key: asyncssh.SSHKey
) -> None:
    assert ssh_run(COMMAND_LINE, STDIN, password=PASSWORD) == (0, OUTCOME.stdout, b"")
    recorder.outcome = FAILED
    assert ssh_run(COMMAND_LINE, STDIN, client_keys=[client_key], password=None) == (3, b"partial\r\n", FAILED.stderr)
    assert recorder.calls == [(COMMAND_LINE, STDIN)] * 2
    assert counters(host) == (2, 2)
    assert runtime.slot.commands_by_channel == {"ssh/password": 1, "ssh/publickey": 1}


def test_ssh_refuses_wrong_credentials_and_shells(ssh_port: int, host: WindowsHost, recorder: Recorder) -> None:
    with pytest.raises(asyncssh.PermissionDenied):
        ssh_run(COMMAND_LINE, STDIN, password="wrong")
    with pytest.raises(asyncssh.PermissionDenied):
        ssh_run(COMMAND_LINE, STDIN, client_keys=[ssh.generate_key()], password=None)
    rc, _out, err = ssh_run(None, b"", password=PASSWORD)
    assert rc == 1
    assert b"no interactive shell" in err
    assert recorder.calls == []


@pytest.fixture
def ssh_files(runtime: HostRuntime, client_key: asyncssh.SSHKey, tmp_path: Path) -> dict[str, str]:
    """What `rdplab up` writes: the client's private key and a known_hosts file with the host's key."""
    key_file = tmp_path / "id"
    key_file.write_bytes(client_key.export_private_key())
    key_file.chmod(0o600)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(runtime.ssh.known_hosts_line() + "\n")
    return {"private_key": str(key_file), "known_hosts": str(known_hosts)}


def test_openssh_client_checks_the_host_key(
    ssh_port: int, host: WindowsHost, recorder: Recorder, ssh_files: dict[str, str]
) -> None:
    base = ["ssh", "-F", "/dev/null", "-i", ssh_files["private_key"], "-o", "BatchMode=yes", "-p", str(ssh_port)]
    checked = [*base, "-o", f"UserKnownHostsFile={ssh_files['known_hosts']}", "-o", "StrictHostKeyChecking=yes"]
    command = [*checked, f"{USER}@{ADDRESS}", COMMAND_LINE]
    done = subprocess.run(command, input=STDIN, capture_output=True, timeout=30, check=False)
    assert (done.returncode, done.stdout) == (0, OUTCOME.stdout)
    assert recorder.calls == [(COMMAND_LINE, STDIN)]
    # Another host key under the same name: OpenSSH refuses to connect, nothing runs.
    known_hosts = Path(ssh_files["known_hosts"])
    name = known_hosts.read_text().split()[0]
    known_hosts.write_text(f"{name} {ssh.generate_key().export_public_key().decode()}")
    done = subprocess.run(command, input=STDIN, capture_output=True, timeout=30, check=False)
    assert done.returncode == 255
    assert b"Host key verification failed" in done.stderr
    assert len(recorder.calls) == 1


# -- Ansible's own connection plugins: one command, three transports, the same bytes ----------------------------------


def ansible_connection(name: str, variables: dict[str, t.Any]) -> t.Any:
    context = PlayContext()
    context.shell = "powershell"
    connection = connection_loader.get(name, context, shell=shell_loader.get("powershell"))
    options = {"ansible_host": ADDRESS, "ansible_user": USER, "ansible_password": PASSWORD, **variables}
    if name == "ssh":
        # No control master left running after the test (Ansible's default keeps one for 60 s).
        options["ansible_ssh_args"] = "-o ControlMaster=no"
    if getattr(connection, "allow_extras", False):
        # What the task executor adds for plugins taking extra variables (winrm: ansible_winrm_*).
        options["_extras"] = {key: value for key, value in options.items() if key.startswith(f"ansible_{name}_")}
    connection.set_options(var_options=options)
    return connection


@pytest.mark.parametrize("transport", ["winrm_ntlm", "winrm_https", "psrp", "ssh"])
def test_ansible_connections_deliver_the_same_command(
    runtime: HostRuntime, recorder: Recorder, transport: str, ssh_files: dict[str, str], tmp_path: Path
) -> None:
    from rdplab.inventory import transport_vars

    variables = transport_vars(transport, ssh_port=runtime.ssh.bound_port, ssh=ssh_files)
    if transport == "winrm_https":
        variables["ansible_winrm_server_cert_validation"] = "ignore"
    connection = ansible_connection(variables.pop("ansible_connection"), variables)
    try:
        connection._connect()
        rc, stdout, stderr = connection.exec_command(COMMAND_LINE, in_data=STDIN, sudoable=False)
    finally:
        connection.close()
    assert recorder.calls == [(COMMAND_LINE, STDIN)]
    assert (rc, stdout.strip(), stderr) == (0, OUTCOME.stdout.strip(), b"")


def test_encoded_command_round_trip() -> None:
    encoded = COMMAND_LINE.rsplit(" ", 1)[1]
    assert base64.b64decode(encoded).decode("utf-16-le") == SCRIPT


@pytest.mark.parametrize("transport", ["winrm_ntlm", "psrp", "ssh"])
def test_the_collections_payload_runs_over_each_transport(
    runtime: HostRuntime, host: WindowsHost, transport: str, ssh_files: dict[str, str]
) -> None:
    """Ansible's module path with the collection's agent (what the action plugins send), over each connection."""
    from rdplab.ansible_client import module_command
    from rdplab.inventory import transport_vars

    batch = {"v": 1, "on_error": "stop", "ops": [{"op": "system.info", "args": {}}]}
    command, stdin = module_command(batch)
    variables = transport_vars(transport, ssh_port=runtime.ssh.bound_port, ssh=ssh_files)
    connection = ansible_connection(variables.pop("ansible_connection"), variables)
    try:
        connection._connect()
        rc, stdout, stderr = connection.exec_command(command, in_data=stdin, sudoable=True)
    finally:
        connection.close()
    assert (rc, stderr.strip()) == (0, b""), stdout + stderr
    document = json.loads(stdout)
    assert document["results"][0]["data"]["hostname"] == host.system.hostname
    assert counters(host)[1] == 1
