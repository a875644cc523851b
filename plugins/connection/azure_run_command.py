# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Connection plugin rdpfix.rdp.azure_run_command: PowerShell on Azure Windows VMs through Azure Run Command."""

from __future__ import annotations

DOCUMENTATION = r"""
name: azure_run_command
short_description: Run PowerShell on Azure Windows VMs through Azure Run Command
version_added: 0.2.0
author: rdpfix maintainers (@rdpfix)
description:
  - Runs commands on an Azure Windows virtual machine through the Run Command API of Azure Resource Manager
    (C(RunPowerShellScript)), so a VM is reachable without WinRM, RDP or any inbound port; only the VM agent's
    outbound HTTPS to Azure is needed.
  - Each C(exec_command) is one Run Command; so are C(put_file) and C(fetch_file) (the file as base64 on stdin or
    stdout, checked by its SHA-256 on both sides). The command line and its standard input travel inside the script
    (stdin gzip-compressed); the VM starts the command line as a process, feeds it stdin and returns exit code,
    stdout and stderr as one compressed result. Run Command returns only the last 4,096 bytes of a script's output,
    so a result longer than one chunk (3,800 characters of compressed base64) is saved on the VM and read back with
    one further Run Command per chunk; the last one deletes the file.
  - Carries any Windows module (pipelined, like the winrm and psrp connections) and rdpfix.rdp's agent batches.
  - Commands run as C(NT AUTHORITY\SYSTEM), one at a time per VM. Azure answers 409 Conflict while another script runs
    on the VM; the connection retries with bounded exponential backoff (O(conflict_retries), O(conflict_backoff)).
  - A VM that is not running, or whose VM agent is not ready, is reported unreachable with its power state or agent
    status, before any script is sent.
  - Each Run Command takes about 20 seconds on Azure, whatever the script; see the collection's docs/azure.md for the
    cost per host and the RBAC permission needed (C(Microsoft.Compute/virtualMachines/runCommand/action)).
requirements:
  - azure-identity
  - azure-mgmt-compute
options:
  resource_id:
    description:
      - The VM's Azure resource ID,
        C(/subscriptions/SUB/resourceGroups/RG/providers/Microsoft.Compute/virtualMachines/NAME).
      - The C(id) host variable of the azure.azcollection.azure_rm and rdpfix.rdp.azure_vms inventories; map it with
        C(compose), see the examples.
      - Either this, or O(subscription_id), O(resource_group) and O(vm_name).
    type: str
    vars:
      - name: ansible_azure_resource_id
  subscription_id:
    description: The subscription of the VM, when O(resource_id) is not given.
    type: str
    env:
      - name: AZURE_SUBSCRIPTION_ID
    vars:
      - name: ansible_azure_subscription_id
  resource_group:
    description: The resource group of the VM, when O(resource_id) is not given.
    type: str
    vars:
      - name: ansible_azure_resource_group
  vm_name:
    description: The VM's name in Azure, when O(resource_id) is not given; defaults to the inventory hostname.
    type: str
    vars:
      - name: ansible_azure_vm_name
      - name: inventory_hostname
  auth_source:
    description:
      - Where the credential comes from, with the meanings of the azure.azcollection option of the same name.
      - V(auto) uses O(client_id), O(secret) and O(tenant) when all three are set, else azure-identity's
        DefaultAzureCredential (environment, workload identity, managed identity, Azure CLI, ...).
      - V(cli) the account logged in with C(az login); V(env) the C(AZURE_CLIENT_ID), C(AZURE_CLIENT_SECRET) (or
        C(AZURE_CLIENT_CERTIFICATE_PATH)) and C(AZURE_TENANT_ID) environment variables; V(msi) the VM's or
        container's managed identity (a user-assigned one with O(client_id)); V(service_principal) O(client_id),
        O(secret) and O(tenant).
    type: str
    default: auto
    choices: [auto, cli, env, msi, service_principal]
    env:
      - name: ANSIBLE_AZURE_AUTH_SOURCE
    vars:
      - name: ansible_azure_auth_source
  client_id:
    description: The service principal's application (client) ID, or a user-assigned managed identity's client ID.
    type: str
    env:
      - name: AZURE_CLIENT_ID
    vars:
      - name: ansible_azure_client_id
  secret:
    description: The service principal's client secret.
    type: str
    env:
      - name: AZURE_SECRET
      - name: AZURE_CLIENT_SECRET
    vars:
      - name: ansible_azure_secret
  tenant:
    description: The Microsoft Entra tenant ID of the service principal.
    type: str
    env:
      - name: AZURE_TENANT
      - name: AZURE_TENANT_ID
    vars:
      - name: ansible_azure_tenant
  cloud_environment:
    description:
      - The Azure cloud; sets the Resource Manager endpoint and the authority host.
      - O(resource_manager_endpoint) and O(authority_host) override either, for Azure Stack Hub or another cloud.
    type: str
    default: AzureCloud
    choices: [AzureCloud, AzureChinaCloud, AzureUSGovernment]
    env:
      - name: AZURE_CLOUD_ENVIRONMENT
    vars:
      - name: ansible_azure_cloud_environment
  resource_manager_endpoint:
    description: The Azure Resource Manager URL, instead of the one of O(cloud_environment).
    type: str
    env:
      - name: AZURE_RESOURCE_MANAGER_ENDPOINT
    vars:
      - name: ansible_azure_resource_manager_endpoint
  authority_host:
    description:
      - The Microsoft Entra authority host (token endpoint) URL, instead of the one of O(cloud_environment).
      - Used by the service principal and environment credentials.
    type: str
    env:
      - name: AZURE_AUTHORITY_HOST
    vars:
      - name: ansible_azure_authority_host
  disable_instance_discovery:
    description:
      - Skip Microsoft Entra instance discovery (metadata of the authority from C(login.microsoftonline.com)); needed
        for a private cloud or Azure Stack Hub whose authority that service does not know.
    type: bool
    default: false
    env:
      - name: AZURE_DISABLE_INSTANCE_DISCOVERY
    vars:
      - name: ansible_azure_disable_instance_discovery
  ca_bundle:
    description:
      - A PEM file of CA certificates to trust for Azure Resource Manager and the token endpoint, instead of the
        system's (C(REQUESTS_CA_BUNDLE) is honoured too). TLS certificates are always verified.
    type: path
    vars:
      - name: ansible_azure_ca_bundle
  timeout:
    description:
      - Seconds to wait for one Run Command to finish. Azure ends a script after 90 minutes.
      - A Run Command still running when the timeout passes is reported unreachable with an unknown outcome; the
        script may still complete on the VM.
    type: int
    default: 1800
    vars:
      - name: ansible_azure_run_command_timeout
  poll_interval:
    description: Seconds between two polls of a running command's status (Azure's Retry-After wins when it sends one).
    type: float
    default: 5
    vars:
      - name: ansible_azure_run_command_poll_interval
  conflict_retries:
    description: How many times a Run Command refused with 409 Conflict (another script runs on the VM) is sent again.
    type: int
    default: 8
    vars:
      - name: ansible_azure_run_command_conflict_retries
  conflict_backoff:
    description:
      - Seconds before the first retry after a 409 Conflict; each later wait doubles, up to 120 seconds.
    type: float
    default: 10
    vars:
      - name: ansible_azure_run_command_conflict_backoff
"""

EXAMPLES = r"""
# inventory/prod.azure_rm.yml (or a rdpfix.rdp.azure_vms inventory): the connection reads the resource ID.
# plugin: azure.azcollection.azure_rm
# hostvar_expressions:
#   ansible_connection: "'rdpfix.rdp.azure_run_command'"
#   ansible_azure_resource_id: id

# Explicit variables, for a host of a static inventory:
# web01:
#   ansible_connection: rdpfix.rdp.azure_run_command
#   ansible_azure_subscription_id: 00000000-0000-0000-0000-000000000000
#   ansible_azure_resource_group: rg-web
#   ansible_azure_vm_name: web01
"""

import hashlib
import os
import secrets
import time
import typing as t

from ansible.errors import AnsibleConnectionFailure, AnsibleError, AnsibleFileNotFound
from ansible.module_utils.common.text.converters import to_bytes, to_text
from ansible.plugins.connection import ConnectionBase
from ansible.utils.display import Display

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _azure as azure
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _run_command as rc

try:
    from azure.core.exceptions import (
        AzureError,
        ClientAuthenticationError,
        HttpResponseError,
        ServiceRequestError,
        ServiceResponseError,
    )
    from azure.mgmt.compute.models import RunCommandInput
    from azure.mgmt.core.polling.arm_polling import ARMPolling

    AZURE_IMPORT_ERROR: ImportError | None = None
except ImportError as import_error:  # the controller lacks the SDK: a clear error when the connection is used
    AZURE_IMPORT_ERROR = import_error

display = Display()

MAX_BACKOFF = 120.0
# Busy: Azure's answer while another Run Command runs on the VM (HTTP 409, code Conflict).
BUSY_MESSAGE = "run command extension execution is in progress"
AUTH_ERROR_CODES = frozenset(
    {"ExpiredAuthenticationToken", "InvalidAuthenticationToken", "InvalidAuthenticationTokenAudience"}
)


class RunCommandOutcomeUnknown(AnsibleConnectionFailure):  # type: ignore[misc]
    """A Run Command was accepted by Azure and its result could not be obtained: it may have run, or may still run."""


class RunCommandNotSent(AnsibleConnectionFailure):  # type: ignore[misc]
    """No script ran: Azure refused the Run Command (busy through every retry, not allowed, VM stopped, agent not
    ready, authentication failed) or could not be reached before the request went out. The agent runner reads this
    class as "the changes were not sent" (unreachable), never as an unknown outcome."""


class Connection(ConnectionBase):  # type: ignore[misc]
    """Windows commands through Azure Run Command (PowerShell shell, pipelined modules)."""

    transport = "rdpfix.rdp.azure_run_command"
    module_implementation_preferences = (".ps1", ".exe", "")
    allow_executable = False
    has_pipelining = True
    allow_extras = True

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        self.always_pipeline_modules = True
        self.has_native_async = False
        self._shell_type = "powershell"
        self._client: t.Any = None
        self._endpoint = ""
        self._vm: tuple[str, str, str] | None = None
        self._connected: bool = False
        # How many Run Commands this connection sent (each is one script on the VM, about 20 s on Azure).
        self.run_commands = 0
        super().__init__(*args, **kwargs)

    # --- setup -----------------------------------------------------------------------------------------------------

    def _coordinates(self) -> tuple[str, str, str]:
        """The VM's (subscription, resource group, name), once connected."""
        if self._vm is None:
            raise AnsibleConnectionFailure("the azure_run_command connection is not connected")
        return self._vm

    def _vm_coordinates(self) -> tuple[str, str, str]:
        resource_id = self.get_option("resource_id")
        if resource_id:
            try:
                return azure.parse_resource_id(resource_id)
            except azure.AzureSettingsError as exc:
                raise AnsibleConnectionFailure(f"ansible_azure_resource_id: {exc}") from exc
        subscription = self.get_option("subscription_id")
        group = self.get_option("resource_group")
        name = self.get_option("vm_name")
        missing = [
            variable
            for variable, value in (
                ("ansible_azure_subscription_id", subscription),
                ("ansible_azure_resource_group", group),
                ("ansible_azure_vm_name", name),
            )
            if not value
        ]
        if missing:
            raise AnsibleConnectionFailure(
                "the azure_run_command connection needs ansible_azure_resource_id, or "
                f"{', '.join(missing)} (not set for this host)"
            )
        return str(subscription), str(group), str(name)

    def _build_client(self) -> None:
        subscription = self._coordinates()[0]
        try:
            settings = azure.settings_from(self.get_option)
            self._endpoint = settings.resource_manager
            self._client = azure.compute_client(settings, subscription, float(self.get_option("poll_interval")))
        except azure.AzureSettingsError as exc:
            raise AnsibleConnectionFailure(str(exc)) from exc

    def _connect(self) -> Connection:
        if AZURE_IMPORT_ERROR is not None:
            raise AnsibleError(azure.SDK_MISSING.format(what="rdpfix.rdp.azure_run_command", error=AZURE_IMPORT_ERROR))
        if self._connected:
            return self
        self._vm = self._vm_coordinates()
        self._build_client()
        self._check_vm()
        self._connected = True
        return self

    def _describe(self) -> str:
        subscription, group, name = self._coordinates()
        return f"VM {name} (resource group {group}, subscription {subscription})"

    def _call(self, what: str, function: t.Callable[[], t.Any]) -> t.Any:
        """One ARM request; a token Azure refuses as expired or invalid is replaced once (a new credential, so no
        cached token), then the request is sent again: a 401 means Azure did not accept it."""
        for attempt in (1, 2):
            try:
                return function()
            except ClientAuthenticationError as exc:
                code = getattr(getattr(exc, "error", None), "code", None)
                status = getattr(exc, "status_code", None)
                if attempt == 1 and (status == 401 or code in AUTH_ERROR_CODES):
                    display.vvv(f"AZURE RUN COMMAND: {what}: token refused ({code or status}), authenticating again")
                    self._build_client()
                    continue
                raise RunCommandNotSent(f"Azure authentication failed for {self._describe()}: {exc}") from exc
            except ServiceRequestError as exc:
                # azure-core: the request was not sent.
                raise RunCommandNotSent(f"Azure Resource Manager is unreachable ({what}): {exc}") from exc
            except ServiceResponseError as exc:
                # azure-core: the request went out and its answer was lost - for a Run Command, it may run.
                raise RunCommandOutcomeUnknown(
                    f"the answer of Azure Resource Manager was lost ({what}) for {self._describe()}: {exc}; "
                    "outcome unknown"
                ) from exc
        raise AssertionError("unreachable")

    def _check_vm(self) -> None:
        """The VM must be running and its agent ready; otherwise no Run Command can reach it."""
        group, name = self._coordinates()[1:]
        try:
            view = self._call("instance view", lambda: self._client.virtual_machines.instance_view(group, name))
        except HttpResponseError as exc:
            if exc.status_code == 404:
                raise RunCommandNotSent(f"{self._describe()} does not exist (404: {exc.message})") from exc
            if exc.status_code == 403:
                raise RunCommandNotSent(
                    f"not allowed to read {self._describe()} (403): the identity needs Microsoft.Compute/"
                    "virtualMachines/read and runCommand/action, e.g. the Virtual Machine Contributor role"
                ) from exc
            raise RunCommandNotSent(f"cannot read {self._describe()}: {exc}") from exc
        states = [s.code.split("/", 1)[1] for s in view.statuses or [] if (s.code or "").startswith("PowerState/")]
        power = states[0] if states else "unknown"
        if power != "running":
            raise RunCommandNotSent(
                f"{self._describe()} is not running (PowerState/{power}): Run Command needs a running VM; "
                "start it first (az vm start)"
            )
        agent = view.vm_agent
        agent_status = [s.display_status for s in (agent.statuses if agent else None) or []]
        if agent is None or "Ready" not in agent_status:
            detail = ", ".join(str(s) for s in agent_status) or "no VM agent reported"
            raise RunCommandNotSent(
                f"the VM agent of {self._describe()} is not ready ({detail}): Run Command needs the Azure VM agent "
                "running with outbound HTTPS to Azure"
            )

    # --- one Run Command ---------------------------------------------------------------------------------------------

    def _send_run_command(self, group: str, name: str, parameters: t.Any) -> t.Any:
        """The runCommand POST, sent once: azure-core's RetryPolicy would send a POST again after 500, 503 or 504
        and after any answer carrying Retry-After, when the first one may have started the script (a second run, or
        a 409 busy answer to our own script). The polls (GETs) keep the client's retries."""
        polling = ARMPolling(
            float(self.get_option("poll_interval")), path_format_arguments={"endpoint": self._endpoint}
        )
        return self._client.virtual_machines.begin_run_command(group, name, parameters, polling=polling, retry_total=0)

    def _run_script(self, script: str, what: str) -> tuple[str, str]:
        """Send one script, wait for it, return its stdout and stderr messages (Azure keeps the last 4,096 bytes of
        each)."""
        group, name = self._coordinates()[1:]
        parameters = RunCommandInput(command_id="RunPowerShellScript", script=rc.script_lines(script))
        wait = float(self.get_option("conflict_backoff"))
        retries = int(self.get_option("conflict_retries"))
        for attempt in range(retries + 1):
            try:
                poller = self._call(what, lambda: self._send_run_command(group, name, parameters))
                break
            except HttpResponseError as exc:
                if exc.status_code is not None and (exc.status_code >= 500 or exc.status_code == 408):
                    # The POST reached Azure and no refusal came back: the script may have started.
                    raise RunCommandOutcomeUnknown(
                        f"Azure answered the Run Command request for {self._describe()} with {exc.status_code} "
                        f"({what}): {exc.message}; the script may have started: outcome unknown"
                    ) from exc
                busy = exc.status_code == 409 and BUSY_MESSAGE in str(exc.message or exc).lower()
                if busy and attempt < retries:
                    display.vvv(f"AZURE RUN COMMAND: {self._describe()} busy, retrying in {wait:.1f} s", host=name)
                    time.sleep(wait)
                    wait = min(wait * 2, MAX_BACKOFF)
                    continue
                if busy:
                    raise RunCommandNotSent(
                        f"{self._describe()} stayed busy with another Run Command through {retries} retries "
                        "(409 Conflict; Azure runs one script at a time per VM)"
                    ) from exc
                if exc.status_code == 409:
                    self._check_vm()  # stopped or deallocated in the meantime: say so
                if exc.status_code == 403:
                    raise RunCommandNotSent(
                        f"not allowed to run commands on {self._describe()} (403): the identity needs "
                        "Microsoft.Compute/virtualMachines/runCommand/action (Virtual Machine Contributor)"
                    ) from exc
                raise RunCommandNotSent(f"Run Command refused on {self._describe()}: {exc.message}") from exc
        self.run_commands += 1
        timeout = int(self.get_option("timeout"))
        try:
            poller.wait(timeout=timeout)
            if not poller.done():
                raise RunCommandOutcomeUnknown(
                    f"the Run Command on {self._describe()} did not finish within {timeout} s ({what}); it may still "
                    "run on the VM (Azure ends a script after 90 minutes): outcome unknown"
                )
            result = poller.result()
        except HttpResponseError as exc:
            raise RunCommandOutcomeUnknown(
                f"the Run Command on {self._describe()} was accepted and then failed ({what}): {exc.message}; "
                "whether the script ran is unknown"
            ) from exc
        except AzureError as exc:  # the request (ServiceRequestError) or answer (ServiceResponseError) of a poll
            raise RunCommandOutcomeUnknown(
                f"Azure Resource Manager became unreachable while the Run Command on {self._describe()} ran "
                f"({what}): {exc}; outcome unknown"
            ) from exc
        stdout, stderr = "", ""
        for status in result.value or []:
            code = (status.code or "").lower()
            if "/stdout/" in code:
                stdout = status.message or ""
            elif "/stderr/" in code:
                stderr = status.message or ""
        return stdout, stderr

    # --- the connection interface ------------------------------------------------------------------------------------

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        super().exec_command(cmd, in_data=in_data, sudoable=sudoable)
        encoded_prefix = self._shell._encode_script("", as_list=False, strict_mode=False, preserve_rc=False)
        if not cmd.startswith((encoded_prefix, "type ")):
            cmd = self._shell._encode_script(cmd, as_list=False, strict_mode=False, preserve_rc=False)
        run_id = secrets.token_hex(8)
        display.vvv(f"AZURE RUN COMMAND {run_id}: {len(in_data or b'')} bytes of stdin", host=self._vm_name())
        stdout, stderr = self._run_script(rc.exec_script(run_id, cmd, in_data), "command")
        try:
            first = rc.parse_chunk(stdout, run_id, 0)
        except rc.RunCommandProtocolError as exc:
            raise RunCommandOutcomeUnknown(f"the Run Command on {self._describe()}: {exc}") from exc
        if first is None:
            # The script failed before it printed a result, or the output was cut: the command's fate is unknown.
            raise RunCommandOutcomeUnknown(
                f"the Run Command on {self._describe()} returned no result (run {run_id}); its output: "
                f"{rc.describe_output(stdout)}; its error output: {rc.describe_output(stderr)}"
            )
        chunks: dict[int, rc.Chunk] = {0: first}
        self._take(chunks, stderr, run_id, 1)
        # Each further Run Command prints the next missing chunk on stdout and the one after it on stderr.
        while len(chunks) < first.count:
            index = min(set(range(first.count)) - set(chunks))
            what = f"result chunk {index + 1}/{first.count}"
            try:
                stdout, stderr = self._run_script(rc.chunk_script(run_id, index), what)
                found = rc.parse_chunk(stdout, run_id, index)
                if found is None:
                    raise rc.RunCommandProtocolError(
                        f"no chunk {index} in {rc.describe_output(stdout)}; error output {rc.describe_output(stderr)}"
                    )
            except (AnsibleConnectionFailure, rc.RunCommandProtocolError) as exc:
                raise RunCommandOutcomeUnknown(
                    f"the command ran on {self._describe()}, but {what} of its result could not be read: {exc}"
                ) from exc
            chunks[index] = found
            self._take(chunks, stderr, run_id, index + 1)
        try:
            result = rc.decode_result([chunks[index] for index in range(first.count)])
        except rc.RunCommandProtocolError as exc:
            raise RunCommandOutcomeUnknown(
                f"the command ran on {self._describe()}; its result is unreadable: {exc}"
            ) from exc
        display.vvv(
            f"AZURE RUN COMMAND {run_id}: rc {result.rc}, {first.count} chunk(s), {self.run_commands} Run Command(s)",
            host=self._vm_name(),
        )
        return result.rc, result.stdout, result.stderr

    @staticmethod
    def _take(chunks: dict[int, rc.Chunk], stderr: str, run_id: str, index: int) -> None:
        """Keep the chunk a script printed on stderr, when it arrived whole; else a later script fetches it."""
        if index in chunks:
            return
        try:
            found = rc.parse_chunk(stderr, run_id, index)
        except rc.RunCommandProtocolError:
            return
        if found is not None:
            chunks[index] = found

    def _vm_name(self) -> str:
        return self._vm[2] if self._vm else "?"

    def put_file(self, in_path: str, out_path: str) -> None:
        """One Run Command: the file travels as the command's stdin (base64, compressed in the exec script); the VM
        answers the SHA-256 of what it wrote, which must be the file's."""
        super().put_file(in_path, out_path)
        if not os.path.isfile(to_bytes(in_path, errors="surrogate_or_strict")):
            raise AnsibleFileNotFound(f"file or module does not exist: {in_path}")
        with open(to_bytes(in_path, errors="surrogate_or_strict"), "rb") as handle:
            data = handle.read()
        display.vvv(f"AZURE RUN COMMAND PUT {in_path} TO {out_path} ({len(data)} bytes)", host=self._vm_name())
        exit_code, stdout, stderr = self.exec_command(rc.put_file_script(out_path), in_data=rc.put_file_stdin(data))
        if exit_code != 0:
            raise AnsibleError(f"failed to transfer {in_path} to {out_path} on {self._describe()}: {to_text(stderr)}")
        written = to_text(stdout).strip()
        if written != hashlib.sha256(data).hexdigest():
            raise AnsibleError(
                f"the copy of {in_path} at {out_path} on {self._describe()} is not the file sent "
                f"(SHA-256 {written or 'missing'})"
            )

    def fetch_file(self, in_path: str, out_path: str) -> None:
        """One Run Command (more for a file whose compressed base64 needs more than two result chunks)."""
        super().fetch_file(in_path, out_path)
        display.vvv(f"AZURE RUN COMMAND FETCH {in_path} TO {out_path}", host=self._vm_name())
        exit_code, stdout, stderr = self.exec_command(rc.fetch_file_script(in_path))
        if exit_code != 0:
            raise AnsibleError(f"failed to fetch {in_path} from {self._describe()}: {to_text(stderr)}")
        try:
            data = rc.parse_fetched(stdout)
        except rc.RunCommandProtocolError as exc:
            raise AnsibleError(f"failed to fetch {in_path} from {self._describe()}: {exc}") from exc
        with open(to_bytes(out_path, errors="surrogate_or_strict"), "wb") as handle:
            handle.write(data)

    def reset(self) -> None:
        self.close()

    def close(self) -> None:
        self._client = None
        self._connected = False
