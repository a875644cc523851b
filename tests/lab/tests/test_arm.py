"""The lab's Azure cloud (rdplab.arm) driven by the real Azure SDK through the rdpfix.rdp.azure_run_command connection.

In one process: an ArmCloud on a loopback address with one simulated host, and the connection plugin as Ansible loads
it. The command and stdin that reach rdplab.bootstrap must be exactly what the connection was given (as over WinRM);
results of any size come back whole; the documented limits of Run Command (busy VM, 4 KB output, stopped VM, missing
VM agent, expired token, timeouts) end as an Ansible user expects. Run Command counts are asserted exactly.
"""

from __future__ import annotations

import json
import os
import random
import ssl
import time
import typing as t
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from ansible import constants
from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.playbook.play_context import PlayContext
from ansible.plugins.loader import shell_loader

from rdplab import arm, bootstrap, psrp
from rdplab.model.host import WindowsHost
from rdplab.winrm import HostSlot, port_free

pytestmark = pytest.mark.azure

REPO_ROOT = Path(__file__).resolve().parents[3]
CONNECTION = "rdpfix.rdp.azure_run_command"
HOST_FILE = REPO_ROOT / "tests" / "lab" / "hosts" / "healthy.yml"
NAME = "healthy"
SCRIPT = "$ErrorActionPreference = 'Stop'\n# run command test é ü 中\n$input | ForEach-Object { $_ }\n"
COMMAND_LINE = psrp.command_line_of_script(SCRIPT)
STDIN = '{"first": "line é"}\n\x00\x00\x00\x00\nthird line\n'.encode()
OUTCOME = bootstrap.CommandOutcome(rc=0, stdout='{"ok": true, "text": "ü"}\r\n'.encode(), stderr=b"")


def free_address() -> str:
    for _attempt in range(200):
        address = f"127.{random.randint(100, 254)}.{random.randint(0, 255)}.1"
        if port_free(address, arm.ARM_PORT):
            return address
    raise RuntimeError("no free loopback address found")


class Recorder:
    """A recogniser that claims COMMAND_LINE, records what reached it (and as whom) and returns a set outcome."""

    name = "run-command-test"

    def __init__(self) -> None:
        self.outcome = OUTCOME
        self.calls: list[tuple[str, bytes]] = []
        self.callers: list[str] = []

    def matches(self, command_line: str) -> bool:
        return command_line == COMMAND_LINE

    def wants_stdin(self) -> bool:
        return True

    def run(self, host: WindowsHost, command_line: str, stdin: bytes) -> bootstrap.CommandOutcome:
        self.calls.append((command_line, stdin))
        self.callers.append(host.caller.identity)
        return self.outcome


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[arm.ArmCloud]:
    address = free_address()
    slot = HostSlot(address.rsplit(".", 1)[0] + ".10", WindowsHost.from_file(HOST_FILE))
    served = arm.ArmCloud([(NAME, slot)], address, tmp_path_factory.mktemp("arm"))
    served.start()
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def vm(cloud: arm.ArmCloud) -> arm.ArmVm:
    """The VM, running, its agent ready, nothing busy, counters zero, the cloud's defaults back."""
    cloud.configure({"reset_counters": True, "latency": 0, "stderr_limit": arm.OUTPUT_LIMIT})
    cloud.configure({"vm": NAME, "power_state": "running", "agent": "Ready", "busy_seconds": 0, "public_ip": False})
    cloud.configure({"vm": NAME, "timed_out_posts": 0})
    found = cloud.vms[NAME]
    found.files.clear()
    found.slot.replace_host(WindowsHost.from_file(HOST_FILE))
    return found


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    found = Recorder()
    monkeypatch.setattr(bootstrap, "RECOGNISERS", [found, *bootstrap.RECOGNISERS])
    return found


def connection(cloud: arm.ArmCloud, **overrides: t.Any) -> t.Any:
    context = PlayContext()
    context.shell = "powershell"
    # As Ansible's plugin loader does (without installing its collection finder in this shared test process): the
    # plugin's documented options registered under its name, then the class instantiated.
    from ansible_collections.rdpfix.rdp.plugins.connection import azure_run_command

    options = yaml.safe_load(azure_run_command.DOCUMENTATION)["options"]
    constants.config.initialize_plugin_configuration_definitions("connection", CONNECTION, options)
    plugin = azure_run_command.Connection(context, shell=shell_loader.get("powershell"))
    plugin._load_name = CONNECTION
    variables: dict[str, t.Any] = {
        "ansible_azure_resource_id": cloud.vms[NAME].resource_id(),
        "ansible_azure_auth_source": "service_principal",
        "ansible_azure_client_id": arm.CLIENT_ID,
        "ansible_azure_secret": cloud.client_secret,
        "ansible_azure_tenant": arm.TENANT,
        "ansible_azure_resource_manager_endpoint": cloud.endpoint,
        "ansible_azure_authority_host": cloud.endpoint,
        "ansible_azure_disable_instance_discovery": True,
        "ansible_azure_ca_bundle": str(cloud.ca_path),
        "ansible_azure_run_command_poll_interval": 0.02,
        "ansible_azure_run_command_conflict_backoff": 0.1,
        **overrides,
    }
    variables = {key: value for key, value in variables.items() if value is not None}
    plugin.set_options(var_options=variables)
    return plugin


def run(cloud: arm.ArmCloud, **overrides: t.Any) -> tuple[int, bytes, bytes]:
    plugin = connection(cloud, **overrides)
    try:
        plugin._connect()
        return t.cast(tuple[int, bytes, bytes], plugin.exec_command(COMMAND_LINE, in_data=STDIN, sudoable=False))
    finally:
        plugin.close()


def test_the_command_and_stdin_arrive_as_sent_and_run_as_system(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder
) -> None:
    assert run(cloud) == (0, OUTCOME.stdout, b"")
    assert recorder.calls == [(COMMAND_LINE, STDIN)]
    # The healthy host's file makes the agent run as an Administrator over WinRM; Run Command runs it as SYSTEM.
    assert vm.slot.host.caller.identity == "administrator"
    assert recorder.callers == ["system"]
    assert vm.run_commands == 1
    assert vm.slot.host.counters.winrm_commands == 0
    assert vm.files == {}  # one chunk: nothing saved on the VM


def test_a_failing_command_keeps_its_exit_code_and_both_streams(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder
) -> None:
    recorder.outcome = bootstrap.CommandOutcome(rc=3, stdout=b"partial\r\n", stderr=b"something failed\r\n")
    assert run(cloud) == (3, b"partial\r\n", b"something failed\r\n")
    assert vm.run_commands == 1


def output_of(size: int) -> bytes:
    """Output that compresses about as badly as it can: results over 4 KB even after gzip."""
    generator = random.Random(size)
    return generator.randbytes(size)


@pytest.mark.parametrize(
    "case",
    [
        # 6,000 random bytes: a blob of 8,0xx characters, 3 chunks - the exec script prints chunks 0 (stdout) and
        # 1 (stderr), one chunk script prints chunk 2 and removes the saved blob.
        (6_000, arm.OUTPUT_LIMIT, 2, 0),
        # 20,000 bytes: 8 chunks, two per Run Command; the last one came on stderr, so the file stays (see below).
        (20_000, arm.OUTPUT_LIMIT, 4, 1),
        # A service that keeps only 200 bytes of stderr: every chunk after the first costs its own Run Command.
        (20_000, 200, 8, 0),
    ],
)
def test_results_over_4_kb_come_back_whole(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder, case: tuple[int, int, int, int]
) -> None:
    size, stderr_limit, run_commands, left = case
    cloud.configure({"stderr_limit": stderr_limit})
    recorder.outcome = bootstrap.CommandOutcome(rc=0, stdout=output_of(size), stderr=b"warning\r\n")
    assert run(cloud) == (0, output_of(size), b"warning\r\n")
    [result] = vm.results
    assert -(-result["blob_chars"] // 3800) == {6_000: 3, 20_000: 8}[size]
    assert vm.run_commands == run_commands
    assert recorder.calls == [(COMMAND_LINE, STDIN)]  # the command ran once; the rest only read its result
    assert len(vm.files) == left


def test_a_result_file_left_behind_is_removed_after_15_minutes(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder
) -> None:
    recorder.outcome = bootstrap.CommandOutcome(rc=0, stdout=output_of(3_000), stderr=b"")
    run(cloud)  # 2 chunks: both printed by the exec script (stdout, stderr); its saved blob stays
    [(run_id, (saved_at, blob))] = vm.files.items()
    run(cloud)
    assert len(vm.files) == 2  # younger than 15 minutes: kept (a chunk script may still need it)
    vm.files[run_id] = (saved_at - 15 * 60 - 1, blob)
    recorder.outcome = OUTCOME
    run(cloud)
    assert run_id not in vm.files
    assert len(vm.files) == 1


def test_a_busy_vm_is_retried_with_backoff(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = connection(cloud)
    try:
        plugin._connect()
        sent: list[dict[str, t.Any]] = []
        send = plugin._client.virtual_machines.begin_run_command

        def recorded(*args: t.Any, **kwargs: t.Any) -> t.Any:
            sent.append(dict(kwargs))
            return send(*args, **kwargs)

        monkeypatch.setattr(plugin._client.virtual_machines, "begin_run_command", recorded)
        # Another script runs on the VM for 0.6 s: 409 until then; the retries wait 0.1, 0.2, 0.4, ... s.
        cloud.configure({"vm": NAME, "busy_seconds": 0.6})
        assert plugin.exec_command(COMMAND_LINE, in_data=STDIN, sudoable=False) == (0, OUTCOME.stdout, b"")
    finally:
        plugin.close()
    assert vm.conflicts >= 2
    assert vm.run_commands == 1
    assert recorder.calls == [(COMMAND_LINE, STDIN)]
    # Our own loop retried the 409s; each POST went out with azure-core's retries off.
    assert len(sent) == vm.conflicts + 1
    assert all(kwargs.get("retry_total") == 0 for kwargs in sent), sent


def test_a_vm_that_stays_busy_fails_after_the_retries(cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder) -> None:
    cloud.configure({"vm": NAME, "busy_seconds": 60})
    with pytest.raises(AnsibleConnectionFailure, match=r"stayed busy .* through 2 retries \(409 Conflict"):
        run(cloud, ansible_azure_run_command_conflict_retries=2)
    assert (vm.conflicts, vm.run_commands, recorder.calls) == (3, 0, [])


@pytest.mark.parametrize("state", ["deallocated", "stopped"])
def test_a_stopped_vm_is_unreachable_and_nothing_is_sent(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder, state: str
) -> None:
    cloud.configure({"vm": NAME, "power_state": state})
    with pytest.raises(AnsibleConnectionFailure, match=rf"VM {NAME} .* is not running \(PowerState/{state}\)"):
        run(cloud)
    assert (vm.run_commands, recorder.calls) == (0, [])


def test_a_vm_stopped_after_the_check_is_reported_as_stopped(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder
) -> None:
    plugin = connection(cloud)
    plugin._connect()
    cloud.configure({"vm": NAME, "power_state": "deallocated"})
    with pytest.raises(AnsibleConnectionFailure, match=r"is not running \(PowerState/deallocated\)"):
        plugin.exec_command(COMMAND_LINE, in_data=STDIN, sudoable=False)
    assert (vm.run_commands, recorder.calls) == (0, [])


def raising(error: BaseException) -> t.Callable[..., t.Any]:
    """A stand-in for an SDK call that fails with ``error``."""

    def call(*args: t.Any, **kwargs: t.Any) -> t.Any:
        raise error

    return call


def a_write_batch() -> t.Any:
    from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import BackupSet
    from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch

    batch = Batch(on_error="stop")
    backup = BackupSet.create("certificate", NAME, "C:\\ProgramData\\rdpfix\\backups")
    backup.begin(batch)
    backup.finish(batch)
    batch.add("service.restart", name="SessionEnv")
    return batch


@pytest.mark.parametrize("refusal", ["busy", "stopped", "forbidden"])
def test_a_refused_run_command_tells_a_write_batch_that_nothing_was_sent(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder, monkeypatch: pytest.MonkeyPatch, refusal: str
) -> None:
    """Azure refused the Run Command, so no script ran: a write batch is unreachable with nothing changed, never an
    unknown outcome (which would send more Run Commands to find out, into the same refusal)."""
    from azure.core.exceptions import HttpResponseError

    from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import OutcomeUnknown, transport_failure

    plugin = connection(cloud, ansible_azure_run_command_conflict_retries=1)
    try:
        plugin._connect()
        if refusal == "busy":
            cloud.configure({"vm": NAME, "busy_seconds": 60})
        elif refusal == "stopped":
            cloud.configure({"vm": NAME, "power_state": "deallocated"})
        else:
            response = HttpResponseError(message="AuthorizationFailed")
            response.status_code = 403
            monkeypatch.setattr(plugin._client.virtual_machines, "begin_run_command", raising(response))
        with pytest.raises(AnsibleConnectionFailure) as raised:
            plugin.exec_command(COMMAND_LINE, in_data=STDIN, sudoable=False)
    finally:
        plugin.close()
    found = transport_failure(NAME, a_write_batch(), raised.value, True, True)
    assert not isinstance(found, OutcomeUnknown), found
    assert "not sent" in found.message and "nothing was changed" in found.message
    assert (vm.run_commands, recorder.calls) == (0, [])


def test_a_lost_answer_to_the_run_command_request_is_an_unknown_outcome(
    cloud: arm.ArmCloud, vm: arm.ArmVm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """azure-core's ServiceResponseError: the request went out and its answer was lost - the script may run."""
    from azure.core.exceptions import ServiceResponseError

    from ansible_collections.rdpfix.rdp.plugins.connection.azure_run_command import RunCommandOutcomeUnknown
    from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import OutcomeUnknown, transport_failure

    plugin = connection(cloud)
    try:
        plugin._connect()
        lost = ServiceResponseError("Connection aborted.")
        monkeypatch.setattr(plugin._client.virtual_machines, "begin_run_command", raising(lost))
        with pytest.raises(RunCommandOutcomeUnknown, match="answer of Azure Resource Manager was lost"):
            plugin.exec_command(COMMAND_LINE, in_data=STDIN, sudoable=False)
        batch = a_write_batch()
        with pytest.raises(RunCommandOutcomeUnknown) as raised:
            plugin.exec_command(COMMAND_LINE, in_data=STDIN, sudoable=False)
    finally:
        plugin.close()
    found = transport_failure(NAME, batch, raised.value, True, True)
    assert isinstance(found, OutcomeUnknown) and found.manifest_id == batch.manifest_id


@pytest.mark.parametrize("status", [500, 504, 408])
def test_a_server_error_answering_the_run_command_request_is_an_unknown_outcome(
    cloud: arm.ArmCloud, vm: arm.ArmVm, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    """A 5xx or 408 answer to the runCommand POST is no refusal: Azure may have started the script."""
    from azure.core.exceptions import HttpResponseError

    from ansible_collections.rdpfix.rdp.plugins.connection.azure_run_command import RunCommandOutcomeUnknown
    from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import OutcomeUnknown, transport_failure

    plugin = connection(cloud)
    sent: list[dict[str, t.Any]] = []
    error = HttpResponseError(message="GatewayTimeout")
    error.status_code = status

    def failing(*args: t.Any, **kwargs: t.Any) -> t.Any:
        sent.append(dict(kwargs))
        raise error

    try:
        plugin._connect()
        monkeypatch.setattr(plugin._client.virtual_machines, "begin_run_command", failing)
        batch = a_write_batch()
        with pytest.raises(RunCommandOutcomeUnknown, match=rf"(?s)with {status} .* may have started") as raised:
            plugin.exec_command(COMMAND_LINE, in_data=STDIN, sudoable=False)
    finally:
        plugin.close()
    found = transport_failure(NAME, batch, raised.value, True, True)
    assert isinstance(found, OutcomeUnknown) and found.manifest_id == batch.manifest_id
    assert len(sent) == 1 and sent[0].get("retry_total") == 0, sent


def test_a_run_command_post_answered_504_after_the_script_started_is_not_sent_again(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder
) -> None:
    """The lab's gateway answers 504 after Microsoft.Compute started the script: one run, outcome unknown (azure-core
    on its own would send the POST again, meet our own script as 409 busy and call it "nothing sent")."""
    from ansible_collections.rdpfix.rdp.plugins.connection.azure_run_command import RunCommandOutcomeUnknown

    cloud.configure({"vm": NAME, "timed_out_posts": 1})
    with pytest.raises(RunCommandOutcomeUnknown, match=r"(?s)with 504 .* outcome unknown"):
        run(cloud)
    deadline = time.monotonic() + 10
    while vm.running is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (vm.run_commands, vm.conflicts, recorder.calls) == (1, 0, [(COMMAND_LINE, STDIN)])


@pytest.mark.parametrize(("agent", "shown"), [("missing", "no VM agent reported"), ("Not Ready", "Not Ready")])
def test_a_vm_without_a_ready_agent_is_unreachable(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder, agent: str, shown: str
) -> None:
    cloud.configure({"vm": NAME, "agent": agent})
    with pytest.raises(AnsibleConnectionFailure, match=rf"VM agent of VM {NAME} .* is not ready \({shown}\)"):
        run(cloud)
    assert (vm.run_commands, recorder.calls) == (0, [])


def test_an_expired_token_is_replaced_once(cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder) -> None:
    plugin = connection(cloud)
    plugin._connect()
    assert plugin.exec_command(COMMAND_LINE, in_data=STDIN, sudoable=False)[0] == 0
    assert (cloud.token_requests, cloud.rejected_tokens) == (1, 0)
    cloud.configure({"expire_tokens": True})
    assert plugin.exec_command(COMMAND_LINE, in_data=STDIN, sudoable=False)[0] == 0
    # The POST was refused with 401 ExpiredAuthenticationToken, a new token asked for, the POST sent again: it ran once.
    assert (cloud.token_requests, cloud.rejected_tokens) == (2, 1)
    assert vm.run_commands == 2
    assert len(recorder.calls) == 2


def test_a_wrong_secret_is_an_authentication_failure(cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder) -> None:
    with pytest.raises(AnsibleConnectionFailure, match=r"Azure authentication failed .*AADSTS7000215"):
        run(cloud, ansible_azure_secret="not-the-secret")
    assert (vm.run_commands, recorder.calls) == (0, [])


def test_the_lab_certificate_is_verified(cloud: arm.ArmCloud, vm: arm.ArmVm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with pytest.raises(AnsibleConnectionFailure, match=r"CERTIFICATE_VERIFY_FAILED"):
        run(cloud, ansible_azure_ca_bundle=None)
    assert vm.run_commands == 0


def test_a_command_past_the_timeout_has_an_unknown_outcome(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder
) -> None:
    from ansible_collections.rdpfix.rdp.plugins.connection.azure_run_command import RunCommandOutcomeUnknown

    cloud.configure({"latency": 1.5})
    with pytest.raises(RunCommandOutcomeUnknown, match=r"did not finish within 1 s .* outcome unknown"):
        run(cloud, ansible_azure_run_command_timeout=1)
    # Azure cannot cancel a script: it still runs on the VM.
    deadline = time.monotonic() + 5
    while not recorder.calls and time.monotonic() < deadline:
        time.sleep(0.05)
    assert recorder.calls == [(COMMAND_LINE, STDIN)]
    assert vm.run_commands == 1


def test_a_script_the_lab_does_not_know_is_refused(cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder) -> None:
    from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _run_command as rc

    plugin = connection(cloud)
    plugin._connect()
    tampered = rc.exec_script("0123456789abcdef", COMMAND_LINE, STDIN).replace("Optimal", "Fastest")
    stdout, stderr = plugin._run_script(tampered, "tampered")
    assert stdout == ""
    assert "refused" in stderr
    assert recorder.calls == []


def test_the_lab_state_reports_counters(cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder) -> None:
    run(cloud)
    context = ssl.create_default_context(cafile=str(cloud.ca_path))
    with urllib.request.urlopen(f"{cloud.endpoint}/rdplab/state", context=context, timeout=10) as response:
        state = json.loads(response.read())
    assert state["vms"][NAME]["run_commands"] == 1
    assert state["token_requests"] == 1


def plain(value: t.Any) -> t.Any:
    """ansible-inventory's JSON with the data tags of ansible-core 2.19 ({"__ansible_unsafe": value}) taken off."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return plain(value["__ansible_unsafe"])
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def test_the_inventory_lists_the_vms_with_azure_rms_host_variables(
    cloud: arm.ArmCloud, vm: arm.ArmVm, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    inventory = tmp_path / "lab.azure_vms.yml"
    arm.write_azure_inventory(inventory, cloud.describe())
    cloud.configure({"vm": NAME, "power_state": "stopped"})
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-inventory"), "-i", str(inventory), "--list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(REPO_ROOT / ".cache" / "collections")},
    )
    listing = plain(json.loads(done.stdout))
    assert listing["azure_vms"]["hosts"] == [NAME]
    assert listing["windows"]["hosts"] == [NAME]
    assert listing["azure_rg_rdpfix_lab"]["hosts"] == [NAME]
    assert "azure_running" not in listing  # a conditional group on the power state the list reports
    hostvars = listing["_meta"]["hostvars"][NAME]
    assert hostvars["id"] == vm.resource_id() == hostvars["ansible_azure_resource_id"]
    assert hostvars["powerstate"] == "stopped"
    assert hostvars["ansible_host"] == vm.slot.address
    assert hostvars["private_ipv4_addresses"] == [vm.slot.address]
    assert hostvars["network_interface"] == [f"{NAME}-nic"]
    assert hostvars["ansible_connection"] == "rdpfix.rdp.azure_run_command"
    assert vm.run_commands == 0


def test_ansibles_module_path_runs_through_run_command(cloud: arm.ArmCloud, vm: arm.ArmVm) -> None:
    """The real payload: the agent as an Ansible PowerShell module, the exec wrapper and its manifest on stdin (tens of
    KB), built by ansible-core's module builder; the lab's module-wrapper recogniser runs the batch as SYSTEM."""
    from rdplab.ansible_client import module_command

    command_line, stdin = module_command({"v": 1, "on_error": "stop", "ops": [{"op": "system.info", "args": {}}]})
    plugin = connection(cloud)
    try:
        plugin._connect()
        rc_, stdout, stderr = plugin.exec_command(command_line, in_data=stdin, sudoable=True)
    finally:
        plugin.close()
    assert rc_ == 0, stderr
    [result] = json.loads(stdout)["results"]
    assert result["ok"] is True
    assert result["data"]["hostname"] == vm.slot.host.system.hostname
    assert vm.run_commands == 1
    assert len(stdin) > 40_000  # the script carries it gzip-compressed
    assert len(vm.scripts[0]) < len(stdin)


def test_a_managed_identity_gets_its_token_from_the_lab(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    # azure-identity's IMDS host override (for pod identity) points the managed identity credential at the lab.
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", cloud.endpoint)
    secretless = {"ansible_azure_client_id": None, "ansible_azure_secret": None, "ansible_azure_tenant": None}
    assert run(cloud, ansible_azure_auth_source="msi", **secretless) == (0, OUTCOME.stdout, b"")
    assert (cloud.token_requests, vm.run_commands) == (1, 1)


def test_the_environment_credential(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_CLIENT_ID", arm.CLIENT_ID)
    monkeypatch.setenv("AZURE_CLIENT_SECRET", cloud.client_secret)
    monkeypatch.setenv("AZURE_TENANT_ID", arm.TENANT)
    secretless = {"ansible_azure_client_id": None, "ansible_azure_secret": None, "ansible_azure_tenant": None}
    assert run(cloud, ansible_azure_auth_source="env", **secretless) == (0, OUTCOME.stdout, b"")
    assert (cloud.token_requests, vm.run_commands) == (1, 1)


AZ_STAND_IN = REPO_ROOT / "tests" / "lab" / "bin"


def logged_in(cloud: arm.ArmCloud, monkeypatch: pytest.MonkeyPatch) -> None:
    """`az login` as the stand-in knows it: the lab's service principal (tests/lab/bin/az)."""
    monkeypatch.setenv("PATH", f"{AZ_STAND_IN}:{os.environ['PATH']}")
    for name, value in {
        "ENDPOINT": cloud.endpoint,
        "TENANT": arm.TENANT,
        "CLIENT_ID": arm.CLIENT_ID,
        "SECRET": cloud.client_secret,
        "SUBSCRIPTION": arm.SUBSCRIPTION,
        "CA_FILE": str(cloud.ca_path),
    }.items():
        monkeypatch.setenv("RDPLAB_AZ_" + name, value)


CLI_ONLY = {
    "ansible_azure_auth_source": "cli",
    "ansible_azure_client_id": None,
    "ansible_azure_secret": None,
    "ansible_azure_tenant": None,
}


def test_the_azure_cli_credential_runs_az_for_its_token(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    logged_in(cloud, monkeypatch)
    assert run(cloud, **CLI_ONLY) == (0, OUTCOME.stdout, b"")
    # The stand-in got one token from the lab's token endpoint, which Resource Manager accepted.
    assert (cloud.token_requests, cloud.rejected_tokens, vm.run_commands) == (1, 0, 1)


def test_the_azure_cli_credential_without_az_login_is_unreachable(
    cloud: arm.ArmCloud, vm: arm.ArmVm, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    logged_in(cloud, monkeypatch)
    monkeypatch.delenv("RDPLAB_AZ_SECRET")
    with pytest.raises(AnsibleConnectionFailure, match=r"Azure authentication failed for VM healthy.*az login"):
        run(cloud, **CLI_ONLY)
    assert (cloud.token_requests, vm.run_commands) == (0, 0)


def transfer(cloud: arm.ArmCloud, action: t.Callable[[t.Any], None]) -> None:
    plugin = connection(cloud)
    try:
        plugin._connect()
        action(plugin)
    finally:
        plugin.close()


def test_put_file_and_fetch_file_carry_any_bytes(cloud: arm.ArmCloud, vm: arm.ArmVm, tmp_path: Path) -> None:
    # 9,000 random bytes: put_file's answer is one line (one Run Command); fetch_file's base64 does not compress, so
    # its result needs 4 chunks (the exec script prints 2, one chunk script the other 2).
    data = output_of(9_000)
    local = tmp_path / "payload.bin"
    local.write_bytes(data)
    remote = "C:\\ProgramData\\payload é.bin"
    transfer(cloud, lambda plugin: plugin.put_file(str(local), remote))
    entry = vm.slot.host.filesystem.get(remote)
    assert entry is not None and entry.content == data
    assert vm.run_commands == 1
    back = tmp_path / "back.bin"
    transfer(cloud, lambda plugin: plugin.fetch_file(remote, str(back)))
    assert back.read_bytes() == data
    assert vm.run_commands == 1 + 2
    # The last chunk (3) arrived on stderr: the saved result stays until an exec script finds it 15 minutes old.
    assert len(vm.files) == 1
    assert vm.slot.host.counters.winrm_commands == 0


def test_an_empty_file_travels_too(cloud: arm.ArmCloud, vm: arm.ArmVm, tmp_path: Path) -> None:
    local = tmp_path / "empty"
    local.write_bytes(b"")
    transfer(cloud, lambda plugin: plugin.put_file(str(local), "C:\\ProgramData\\empty.txt"))
    transfer(cloud, lambda plugin: plugin.fetch_file("C:\\ProgramData\\empty.txt", str(tmp_path / "back")))
    assert (tmp_path / "back").read_bytes() == b""
    assert vm.run_commands == 2


def test_file_transfer_errors_are_windows_errors(cloud: arm.ArmCloud, vm: arm.ArmVm, tmp_path: Path) -> None:
    local = tmp_path / "payload"
    local.write_bytes(b"data")
    with pytest.raises(AnsibleError, match=r"Could not find a part of the path 'C:\\NoSuchFolder\\x'"):
        transfer(cloud, lambda plugin: plugin.put_file(str(local), "C:\\NoSuchFolder\\x"))
    with pytest.raises(AnsibleError, match=r"failed to fetch .*Could not find file 'C:\\ProgramData\\nothing'"):
        transfer(cloud, lambda plugin: plugin.fetch_file("C:\\ProgramData\\nothing", str(tmp_path / "x")))
    # A file whose ACL denies SYSTEM: File.ReadAllBytes (no backup semantics) is refused, as on Windows.
    denied = "O:BAG:BAD:PAI(D;;FA;;;SY)(A;;FA;;;BA)"
    vm.slot.host.filesystem.write("C:\\ProgramData\\locked.txt", b"secret", sddl=denied)
    with pytest.raises(AnsibleError, match=r"Access to the path 'C:\\ProgramData\\locked.txt' is denied"):
        transfer(cloud, lambda plugin: plugin.fetch_file("C:\\ProgramData\\locked.txt", str(tmp_path / "y")))
    with pytest.raises(AnsibleFileNotFound):
        transfer(cloud, lambda plugin: plugin.put_file(str(tmp_path / "missing"), "C:\\ProgramData\\x"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert vm.run_commands == 3  # the missing local file was refused before anything was sent


def arm_request(cloud: arm.ArmCloud, path: str, body: t.Any = None, token: str | None = None) -> tuple[int, t.Any]:
    """One request to the lab's Resource Manager, with a token the lab issued (unless ``token`` says otherwise)."""
    import urllib.error

    bearer = token if token is not None else cloud.issue_token(cloud.endpoint)["access_token"]
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(cloud.endpoint + path, data=data, method="GET" if body is None else "POST")
    request.add_header("Authorization", f"Bearer {bearer}")
    request.add_header("Content-Type", "application/json")
    context = ssl.create_default_context(cafile=str(cloud.ca_path))
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def test_the_batch_api_answers_each_request_as_if_sent_alone(cloud: arm.ArmCloud, vm: arm.ArmVm) -> None:
    cloud.configure({"vm": NAME, "public_ip": True})
    base = "https://management.azure.com"
    requests = [
        {"httpMethod": "GET", "name": "view", "url": f"{base}{vm.resource_id()}/instanceView?api-version=2024-07-01"},
        {"httpMethod": "GET", "name": "nic", "url": f"{base}{vm.nic_id()}?api-version=2024-05-01"},
        {"httpMethod": "GET", "name": "pip", "url": f"{base}{vm.pip_id()}?api-version=2024-05-01"},
        {"httpMethod": "GET", "name": "gone", "url": f"{base}{vm.resource_id()}x?api-version=2024-07-01"},
        {"httpMethod": "POST", "name": "action", "url": f"{base}{vm.resource_id()}/runCommand?api-version=2024-07-01"},
    ]
    status, answer = arm_request(cloud, "/batch?api-version=2015-11-01", {"requests": requests})
    assert status == 200
    by_name = {item["name"]: item for item in answer["responses"]}
    assert [item["name"] for item in answer["responses"]] == [item["name"] for item in requests]
    assert by_name["view"]["httpStatusCode"] == 200
    assert {"code": "PowerState/running"}.items() <= by_name["view"]["content"]["statuses"][1].items()
    ip_configuration = by_name["nic"]["content"]["properties"]["ipConfigurations"][0]["properties"]
    assert ip_configuration["publicIPAddress"] == {"id": vm.pip_id()}
    assert ip_configuration["privateIPAddress"].startswith("10.0.0.")
    assert by_name["pip"]["content"]["properties"]["ipAddress"] == vm.slot.address
    assert by_name["gone"]["httpStatusCode"] == 404
    assert by_name["action"]["httpStatusCode"] == 405
    assert vm.run_commands == 0
    # The batch itself needs a token; its requests travel under it.
    assert arm_request(cloud, "/batch?api-version=2015-11-01", {"requests": requests}, token="forged")[0] == 401
    assert cloud.requests == {"batch": 1, "instance_view": 1, "nic": 1, "public_ip": 1, "vm": 1}


def test_the_proxy_serves_public_azures_names_with_the_labs_ca_and_nothing_else(
    cloud: arm.ArmCloud, vm: arm.ArmVm
) -> None:
    import http.client

    context = ssl.create_default_context(cafile=str(cloud.ca_path))
    tunnel = http.client.HTTPSConnection(cloud.address, arm.PROXY_PORT, context=context, timeout=30)
    tunnel.set_tunnel("login.microsoftonline.com", 443)
    try:
        tunnel.request("GET", f"/{arm.TENANT}/v2.0/.well-known/openid-configuration")
        answer = tunnel.getresponse()
        document = json.loads(answer.read())
    finally:
        tunnel.close()
    # The certificate was checked for login.microsoftonline.com; the answer names URLs on that host.
    assert answer.status == 200
    assert document["token_endpoint"] == f"https://login.microsoftonline.com/{arm.TENANT}/oauth2/v2.0/token"
    refused = http.client.HTTPSConnection(cloud.address, arm.PROXY_PORT, context=context, timeout=30)
    refused.set_tunnel("example.com", 443)
    with pytest.raises(OSError, match="403"):
        refused.request("GET", "/")
    refused.close()
    assert cloud.proxied == {"login.microsoftonline.com": 1, "refused example.com:443": 1}


def test_tokens_are_for_one_resource_and_resource_manager_checks_it(cloud: arm.ArmCloud, vm: arm.ArmVm) -> None:
    path = f"{vm.resource_id()}?api-version=2024-07-01"
    # Resource Manager's audiences: public Azure's (with or without the trailing slash) and the lab's endpoint.
    for audience in ("https://management.azure.com/", "https://management.core.windows.net", cloud.endpoint):
        assert arm_request(cloud, path, token=cloud.issue_token(audience)["access_token"])[0] == 200
    status, answer = arm_request(cloud, path, token=cloud.issue_token("https://graph.microsoft.com")["access_token"])
    assert (status, answer["error"]["code"]) == (401, "InvalidAuthenticationTokenAudience")
    # The token endpoint takes client credentials for one resource's /.default scope only.
    form = {"grant_type": "client_credentials", "client_id": arm.CLIENT_ID, "client_secret": cloud.client_secret}
    for scope, expected in ((f"{cloud.endpoint}/.default", 200), ("openid profile", 400), (cloud.endpoint, 400)):
        request = urllib.request.Request(
            f"{cloud.endpoint}/{arm.TENANT}/oauth2/v2.0/token",
            data=urllib.parse.urlencode({**form, "scope": scope}).encode("ascii"),
            method="POST",
        )
        try:
            with urllib.request.urlopen(
                request, timeout=30, context=ssl.create_default_context(cafile=str(cloud.ca_path))
            ) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
            assert json.loads(exc.read())["error"] == "invalid_scope"
        assert status == expected, scope
