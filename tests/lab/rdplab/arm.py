"""The lab as an Azure cloud: Azure Resource Manager, a Microsoft Entra token endpoint and Run Command, on loopback.

Started by ``rdplab up --azure`` (docs/lab.md, "The Azure cloud"). One HTTPS listener, its certificate issued by a CA
of its own (written to the state directory; clients trust it through REQUESTS_CA_BUNDLE or the connection's
ca_bundle option, never by turning verification off), serves:

- the token endpoint a service principal uses (OpenID configuration + OAuth2 client credentials, as MSAL asks them),
  and the managed identity endpoint (IMDS's path and parameters; the lab serves it over the same HTTPS listener);
- the compute API of one subscription and resource group: VMs listed (statusOnly / instanceView), one VM, its
  instance view, and the action Run Command: 202 with Azure-AsyncOperation and Location headers, the operation
  polled until it ends, the result at the Location URL; 409 Conflict while another script runs on the VM; the last
  4,096 bytes of stdout and stderr; a configurable latency per command.

Behind each VM is the same simulated host as behind its WinRM endpoint. A Run Command script is recognised exactly
(rendered again by the collection's plugins/plugin_utils/_run_command.py and compared), its command line and stdin
handed to rdplab.bootstrap.recognise / run_safely as powershell.exe would receive them, with SYSTEM's token as the
caller. The lab runs no PowerShell: what the script does around the command (compression, chunk files) is emulated
here, and a script the lab does not recognise fails as Windows would not (stderr says the lab refused it).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gzip
import hashlib
import importlib.util
import ipaddress
import json
import logging
import secrets
import ssl
import sys
import threading
import time
import typing as t
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rdplab import bootstrap
from rdplab.model.errors import AccessDenied, OpError
from rdplab.model.token import CallerToken
from rdplab.winrm import server_tls_context

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost
    from rdplab.winrm import HostSlot

LOG = logging.getLogger("rdplab.arm")

ARM_PORT = 8443
# The lab's HTTPS proxy (plain HTTP, CONNECT only): clients that know only public Azure's host names reach the lab
# through it (HTTPS_PROXY), as a TLS-intercepting corporate proxy would send them on (docs/lab.md, "The Azure cloud").
PROXY_PORT = 3128
# Public Azure's host names the lab answers for behind its proxy: Resource Manager and Microsoft Entra.
PUBLIC_HOSTS = ("management.azure.com", "login.microsoftonline.com")
CA_FILE = "azure-ca.pem"
OUTPUT_LIMIT = 4096
LOCATION = "westeurope"
RESOURCE_GROUP = "rdpfix-lab"
TENANT = "7e1d0c2b-0000-4000-8000-00000000a2e1"
CLIENT_ID = "5f3a1c9e-0000-4000-8000-00000000c11e"
SUBSCRIPTION = "2b8c6a4d-0000-4000-8000-0000000005b5"
# Azure's answer while a script runs on the VM [RunCmd: one script at a time; azure-cli#32305 for the text].
BUSY = "Run command extension execution is in progress. Please wait for completion before invoking a run command."
# UNCONFIRMED wording: Azure refuses operations that need a running VM with OperationNotAllowed (409).
NOT_RUNNING = "Operation 'runCommand' is not allowed on VM '{name}' since the VM is {state}."
POWER_STATES = ("running", "stopped", "deallocated", "starting", "stopping", "deallocating")


# --- the collection's Run Command scripts ---------------------------------------------------------------------------


class _ScriptSource:
    """The collection's _run_command.py, loaded by path and reloaded when it changes (as bootstrap loads _agent.py)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[int, int] | None = None
        self._module: ModuleType | None = None

    def module(self) -> ModuleType:
        path = bootstrap.collection_root() / "plugins" / "plugin_utils" / "_run_command.py"
        with self._lock:
            info = path.stat()
            key = (info.st_mtime_ns, info.st_size)
            if self._module is None or key != self._key:
                spec = importlib.util.spec_from_file_location("rdplab._collection_run_command", path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load {path}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
                self._module, self._key = module, key
            return self._module


SCRIPTS = _ScriptSource()


def result_blob(rc: int, stdout: bytes, stderr: bytes) -> str:
    """What the exec script builds: 'RC OUTLEN ERRLEN' LF, stdout, stderr; gzip; base64."""
    head = f"{rc} {len(stdout)} {len(stderr)}\n".encode("ascii")
    return base64.b64encode(gzip.compress(head + stdout + stderr)).decode("ascii")


def printed_chunk(header: str, run_id: str, blob: str, index: int, chunk: int) -> str:
    """What Write-Output prints for one chunk: the header line and the chunk, each ending in CRLF."""
    count = max(1, -(-len(blob) // chunk))
    digest = hashlib.sha256(blob.encode("ascii")).hexdigest()
    return f"{header} {run_id} {index} {count} {len(blob)} {digest}\r\n{blob[index * chunk : (index + 1) * chunk]}\r\n"


def output_tail(text: str, limit: int = OUTPUT_LIMIT) -> str:
    """Run Command keeps the last 4,096 bytes of the output [RunCmd]; the lab keeps them per stream (UNCONFIRMED: the
    result has a StdOut and a StdErr status, each with its message; no source says whether the limit is per stream)."""
    data = text.encode("utf-8")
    return text if len(data) <= limit else data[-limit:].decode("utf-8", errors="ignore")


# --- the cloud's state ----------------------------------------------------------------------------------------------


@dataclass
class Operation:
    """One accepted Run Command: its async operation and its result."""

    op_id: str
    vm: ArmVm
    started: str
    done: threading.Event = field(default_factory=threading.Event)
    status: str = "InProgress"
    stdout: str = ""
    stderr: str = ""
    error: dict[str, str] | None = None
    ended: str = ""


@dataclass
class ArmVm:
    """A simulated host as an Azure VM: power state, agent, Run Command state and counters."""

    name: str
    slot: HostSlot
    vm_id: str
    power_state: str = "running"
    agent: str = "Ready"  # Ready | Not Ready | missing
    busy_until: float = 0.0
    running: Operation | None = None
    files: dict[str, tuple[float, str]] = field(default_factory=dict)  # run id -> (saved at, blob)
    # A public IP address on the NIC: the host's address becomes the public one, the private one a 10.x address.
    public_ip: bool = False
    run_commands: int = 0
    conflicts: int = 0
    # Fault: how many coming runCommand POSTs start their script and are then answered 504 GatewayTimeout.
    timed_out_posts: int = 0
    scripts: list[str] = field(default_factory=list)
    # Per exec script: bytes of the command's stdout+stderr, characters of its compressed result blob.
    results: list[dict[str, int]] = field(default_factory=list)

    def resource_id(self) -> str:
        return (
            f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Compute/"
            f"virtualMachines/{self.name}"
        )

    def nic_id(self) -> str:
        return (
            f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Network/"
            f"networkInterfaces/{self.name}-nic"
        )

    def pip_id(self) -> str:
        return (
            f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Network/"
            f"publicIPAddresses/{self.name}-pip"
        )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


class ArmCloud:
    """The simulated cloud: VMs, tokens, operations, and its HTTPS listener."""

    def __init__(self, slots: t.Sequence[tuple[str, HostSlot]], address: str, state_dir: Path, latency: float = 0.0):
        self.address = address
        self.port = ARM_PORT
        self.latency = latency
        self.client_secret = secrets.token_urlsafe(24)
        self.token_lifetime = 3599
        # The bytes kept of stderr: OUTPUT_LIMIT, or less to model a service that keeps less of it (stderr_limit=).
        self.stderr_limit = OUTPUT_LIMIT
        self.vms: dict[str, ArmVm] = {
            name.lower(): ArmVm(name, slot, str(uuid.uuid5(uuid.NAMESPACE_URL, f"rdplab-vm:{name}")))
            for name, slot in slots
        }
        self.tokens: dict[str, tuple[float, str]] = {}  # token -> (expiry in epoch seconds, audience)
        self.token_requests = 0
        self.rejected_tokens = 0
        # Resource Manager requests by kind (vm_list, instance_view, nic, public_ip, vm, batch, ...): what a client
        # costs Azure's request limits.
        self.requests: dict[str, int] = {}
        # The lab's proxy: CONNECTs accepted per host name, and refused ones.
        self.proxied: dict[str, int] = {}
        self.operations: dict[str, Operation] = {}
        self.lock = threading.Lock()
        self.state_dir = state_dir
        self.ca_pem, cert_pem, key_pem = _certificates(address)
        self.ca_path = state_dir / CA_FILE
        state_dir.mkdir(parents=True, exist_ok=True)
        self.ca_path.write_bytes(self.ca_pem)
        self.tls = server_tls_context(cert_pem, key_pem)
        self.server = _ArmServer(self, (address, self.port))
        self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        self.proxy = _ProxyServer(self, (address, PROXY_PORT))
        self._threads: list[threading.Thread] = []

    @property
    def endpoint(self) -> str:
        return f"https://{self.address}:{self.port}"

    @property
    def proxy_url(self) -> str:
        return f"http://{self.address}:{PROXY_PORT}"

    def start(self) -> None:
        for served in (self.server, self.proxy):
            thread = threading.Thread(target=served.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        for served in (self.server, self.proxy):
            served.shutdown()
            served.server_close()

    def count(self, kind: str) -> None:
        with self.lock:
            self.requests[kind] = self.requests.get(kind, 0) + 1

    def describe(self) -> dict[str, t.Any]:
        return {
            "endpoint": self.endpoint,
            "ca_file": str(self.ca_path.resolve()),
            "tenant": TENANT,
            "client_id": CLIENT_ID,
            "client_secret": self.client_secret,
            "subscription": SUBSCRIPTION,
            "resource_group": RESOURCE_GROUP,
            "latency": self.latency,
            "proxy": self.proxy_url,
            "public_hosts": list(PUBLIC_HOSTS),
        }

    def state(self) -> dict[str, t.Any]:
        with self.lock:
            return {
                "token_requests": self.token_requests,
                "rejected_tokens": self.rejected_tokens,
                "requests": dict(self.requests),
                "proxied": dict(self.proxied),
                "latency": self.latency,
                "stderr_limit": self.stderr_limit,
                "vms": {
                    vm.name: {
                        "power_state": vm.power_state,
                        "agent": vm.agent,
                        "run_commands": vm.run_commands,
                        "conflicts": vm.conflicts,
                        "files": sorted(vm.files),
                        "results": list(vm.results),
                    }
                    for vm in self.vms.values()
                },
            }

    def configure(self, body: dict[str, t.Any]) -> dict[str, t.Any]:
        """The lab's own control: power state, agent, busy time, latency, token expiry, counters."""
        with self.lock:
            if "latency" in body:
                self.latency = float(body["latency"])
            if "stderr_limit" in body:
                self.stderr_limit = int(body["stderr_limit"])
            if body.get("expire_tokens"):
                # Every token issued so far is refused from now on (401 ExpiredAuthenticationToken).
                self.tokens = {token: (0.0, audience) for token, (_expiry, audience) in self.tokens.items()}
            if body.get("reset_counters"):
                self.token_requests = self.rejected_tokens = 0
                self.requests.clear()
                self.proxied.clear()
                for each in self.vms.values():
                    each.run_commands = each.conflicts = 0
                    each.scripts.clear()
                    each.results.clear()
            name = body.get("vm")
            if name is not None:
                vm = self._vm(str(name))
                if "power_state" in body:
                    if body["power_state"] not in POWER_STATES:
                        raise ValueError(f"power_state must be one of {', '.join(POWER_STATES)}")
                    vm.power_state = str(body["power_state"])
                if "agent" in body:
                    if body["agent"] not in ("Ready", "Not Ready", "missing"):
                        raise ValueError("agent must be Ready, Not Ready or missing")
                    vm.agent = str(body["agent"])
                if "busy_seconds" in body:
                    vm.busy_until = time.monotonic() + float(body["busy_seconds"])
                if "timed_out_posts" in body:
                    vm.timed_out_posts = int(body["timed_out_posts"])
                if "public_ip" in body:
                    vm.public_ip = str(body["public_ip"]).lower() in ("1", "true", "yes")
        return self.state()

    # --- tokens ------------------------------------------------------------------------------------------------------

    def arm_audiences(self) -> set[str]:
        """The token audiences Resource Manager accepts (compared without a trailing slash): public Azure's two, as
        its InvalidAuthenticationTokenAudience message lists them, and the lab's own endpoint, which a client that
        knows the lab by its endpoint asks for (a private cloud's Resource Manager URL is its audience)."""
        return {"https://management.azure.com", "https://management.core.windows.net", self.endpoint}

    def issue_token(self, audience: str) -> dict[str, t.Any]:
        token = "rdplab." + secrets.token_urlsafe(32)
        with self.lock:
            self.token_requests += 1
            self.tokens[token] = (time.time() + self.token_lifetime, audience.rstrip("/"))
        return {
            "token_type": "Bearer",
            "expires_in": self.token_lifetime,
            "ext_expires_in": self.token_lifetime,
            "access_token": token,
        }

    def check_token(self, authorization: str | None) -> None:
        scheme, token = (authorization or "").partition(" ")[::2]
        challenge = {
            "WWW-Authenticate": f'Bearer authorization_uri="{self.endpoint}/{TENANT}", error="invalid_token", '
            'error_description="The access token is invalid or has expired"'
        }
        with self.lock:
            issued = self.tokens.get(token) if scheme.lower() == "bearer" else None
            if issued is None:
                self.rejected_tokens += 1
                raise ArmError(401, "InvalidAuthenticationToken", "The access token is invalid or missing.", challenge)
            expiry, audience = issued
            if expiry <= time.time():
                self.rejected_tokens += 1
                raise ArmError(401, "ExpiredAuthenticationToken", "The access token has expired.", challenge)
            if audience not in self.arm_audiences():
                # Azure's wording (UNCONFIRMED beyond third-party reports of the message).
                self.rejected_tokens += 1
                raise ArmError(
                    401,
                    "InvalidAuthenticationTokenAudience",
                    f"The access token has been obtained for wrong audience or resource '{audience}'. It should "
                    "exactly match with one of the allowed audiences 'https://management.core.windows.net/',"
                    "'https://management.core.windows.net','https://management.azure.com/','https://management.azure.com'.",
                    challenge,
                )

    # --- compute -----------------------------------------------------------------------------------------------------

    def _vm(self, name: str) -> ArmVm:
        vm = self.vms.get(name.lower())
        if vm is None:
            raise ArmError(
                404,
                "ResourceNotFound",
                f"The Resource 'Microsoft.Compute/virtualMachines/{name}' under resource group '{RESOURCE_GROUP}' "
                "was not found.",
            )
        return vm

    def vm_document(self, vm: ArmVm, status: bool = False) -> dict[str, t.Any]:
        host = vm.slot.host
        document: dict[str, t.Any] = {
            "name": vm.name,
            "id": vm.resource_id(),
            "type": "Microsoft.Compute/virtualMachines",
            "location": LOCATION,
            "tags": {"rdpfix": "lab", **{f"group_{g}": "true" for g in host.groups}},
            "properties": {
                "vmId": vm.vm_id,
                "hardwareProfile": {"vmSize": "Standard_B2s"},
                "storageProfile": {"osDisk": {"osType": "Windows", "name": f"{vm.name}-osdisk"}},
                "osProfile": {"computerName": host.name[:15], "windowsConfiguration": {"provisionVMAgent": True}},
                "networkProfile": {"networkInterfaces": [{"id": vm.nic_id(), "properties": {"primary": True}}]},
                "provisioningState": "Succeeded",
            },
        }
        if status:
            document["properties"]["instanceView"] = self.instance_view(vm)
        return document

    def nic_document(self, vm: ArmVm) -> dict[str, t.Any]:
        """The VM's one NIC. By default a private address (the host's loopback address) and no public IP, as a VM
        behind a hub; with ``public_ip`` a public IP address resource carries the host's address and the private one
        is a 10.x address of the virtual network (which the controller cannot reach, as on Azure)."""
        subnet = (
            f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/Microsoft.Network/"
            "virtualNetworks/rdpfix-lab-vnet/subnets/default"
        )
        private = vm.slot.address
        ip_properties: dict[str, t.Any] = {
            "privateIPAllocationMethod": "Dynamic",
            "privateIPAddressVersion": "IPv4",
            "primary": True,
            "subnet": {"id": subnet},
        }
        if vm.public_ip:
            private = "10.0.0." + vm.slot.address.rsplit(".", 1)[1]
            ip_properties["publicIPAddress"] = {"id": vm.pip_id()}
        ip_properties["privateIPAddress"] = private
        return {
            "name": f"{vm.name}-nic",
            "id": vm.nic_id(),
            "type": "Microsoft.Network/networkInterfaces",
            "location": LOCATION,
            "properties": {
                "provisioningState": "Succeeded",
                "macAddress": "00-0D-3A-" + "-".join(f"{int(part):02X}" for part in vm.slot.address.split(".")[1:]),
                "ipConfigurations": [
                    {
                        "name": "ipconfig1",
                        "id": vm.nic_id() + "/ipConfigurations/ipconfig1",
                        "properties": ip_properties,
                    }
                ],
                "primary": True,
                "virtualMachine": {"id": vm.resource_id()},
            },
        }

    def pip_document(self, vm: ArmVm) -> dict[str, t.Any]:
        """The VM's public IP address resource (only with ``public_ip``): the host's address."""
        if not vm.public_ip:
            raise ArmError(404, "ResourceNotFound", f"The public IP address '{vm.name}-pip' was not found.")
        return {
            "name": f"{vm.name}-pip",
            "id": vm.pip_id(),
            "type": "Microsoft.Network/publicIPAddresses",
            "location": LOCATION,
            "sku": {"name": "Standard", "tier": "Regional"},
            "properties": {
                "provisioningState": "Succeeded",
                "ipAddress": vm.slot.address,
                "publicIPAddressVersion": "IPv4",
                "publicIPAllocationMethod": "Static",
                "ipConfiguration": {"id": vm.nic_id() + "/ipConfigurations/ipconfig1"},
            },
        }

    def instance_view(self, vm: ArmVm) -> dict[str, t.Any]:
        view: dict[str, t.Any] = {
            "computerName": vm.slot.host.name[:15],
            "osName": "Windows Server 2022 Datacenter",
            "statuses": [
                {"code": "ProvisioningState/succeeded", "level": "Info", "displayStatus": "Provisioning succeeded"},
                {
                    "code": f"PowerState/{vm.power_state}",
                    "level": "Info",
                    "displayStatus": f"VM {vm.power_state}",
                },
            ],
        }
        if vm.agent != "missing" and vm.power_state == "running":
            view["vmAgent"] = {
                "vmAgentVersion": "2.7.41491.1102",
                "statuses": [
                    {
                        "code": "ProvisioningState/succeeded",
                        "level": "Info" if vm.agent == "Ready" else "Warning",
                        "displayStatus": vm.agent,
                        "message": "GuestAgent is running and processing the extensions."
                        if vm.agent == "Ready"
                        else "VM status blob is found but not yet populated.",
                    }
                ],
            }
        return view

    def run_command(self, name: str, body: dict[str, t.Any]) -> Operation:
        vm = self._vm(name)
        if body.get("commandId") != "RunPowerShellScript":
            raise ArmError(404, "NotFound", "The entity was not found in this Azure location.")
        script = body.get("script")
        if not isinstance(script, list) or not all(isinstance(line, str) for line in script):
            raise ArmError(400, "InvalidParameter", "The value of parameter script is invalid.")
        with self.lock:
            if vm.power_state != "running":
                raise ArmError(409, "OperationNotAllowed", NOT_RUNNING.format(name=vm.name, state=vm.power_state))
            if vm.running is not None or vm.busy_until > time.monotonic():
                vm.conflicts += 1
                raise ArmError(409, "Conflict", BUSY)
            operation = Operation(op_id=str(uuid.uuid4()), vm=vm, started=_now())
            vm.running = operation
            vm.run_commands += 1
            vm.scripts.append("\n".join(script))
            self.operations[operation.op_id] = operation
            latency = self.latency
            timed_out = vm.timed_out_posts > 0
            vm.timed_out_posts -= timed_out
        threading.Thread(
            target=self._execute, args=(operation, list(script), latency), name=f"runcmd-{vm.name}", daemon=True
        ).start()
        if timed_out:
            # The gateway gave up waiting for Microsoft.Compute, which had already started the script (docs/lab.md:
            # modelled, UNCONFIRMED). A second POST now meets the running script: 409 Conflict.
            raise ArmError(
                504,
                "GatewayTimeout",
                "The gateway did not receive a response from 'Microsoft.Compute' within the specified time period.",
            )
        return operation

    def _execute(self, operation: Operation, script: list[str], latency: float) -> None:
        vm = operation.vm
        try:
            if latency > 0:
                time.sleep(latency)
            if vm.agent != "Ready":
                # UNCONFIRMED: with no ready agent the extension never reports; Azure ends the operation failed.
                operation.status = "Failed"
                operation.error = {
                    "code": "VMAgentStatusCommunicationError",
                    "message": f"VM '{vm.name}' has not reported status for VM agent or extensions.",
                }
                return
            stdout, stderr = self._script(vm, script)
            operation.stdout, operation.stderr = output_tail(stdout), output_tail(stderr, self.stderr_limit)
            operation.status = "Succeeded"
        except Exception as exc:  # a lab bug: a failed script with the reason, not a dead server thread
            LOG.exception("run command on %s failed", vm.name)
            operation.stderr = f"rdplab: internal error: {type(exc).__name__}: {exc}"
            operation.status = "Succeeded"
        finally:
            operation.ended = _now()
            with self.lock:
                vm.running = None
            operation.done.set()
            vm.slot.changed()

    def _script(self, vm: ArmVm, script: list[str]) -> tuple[str, str]:
        module = SCRIPTS.module()
        request = module.parse_script(script)
        header = str(module.HEADER)
        if isinstance(request, module.ExecRequest):
            transfer = file_transfer(module, vm.slot.host, request.command_line, request.stdin)
            found = transfer if transfer is not None else bootstrap.recognise(request.command_line)
            if isinstance(found, bootstrap.CommandOutcome):
                outcome = found
            else:
                host = vm.slot.host
                # Run Command runs scripts as SYSTEM [RunCmd]: the agent's token is SYSTEM's, whatever the host says.
                with host.lock:
                    caller = host.caller
                    host.caller = CallerToken.system()
                    try:
                        outcome = bootstrap.run_safely(found, host, request.command_line, request.stdin)
                    finally:
                        host.caller = caller
            blob = result_blob(outcome.rc, outcome.stdout, outcome.stderr)
            count = max(1, -(-len(blob) // request.chunk))
            with self.lock:
                vm.results.append({"output_bytes": len(outcome.stdout) + len(outcome.stderr), "blob_chars": len(blob)})
                # The exec script first removes result files left for longer than STALE_MINUTES, then saves its own
                # when it has more than one chunk.
                stale = time.time() - 60 * int(module.STALE_MINUTES)
                vm.files = {run_id: saved for run_id, saved in vm.files.items() if saved[0] >= stale}
                if count > 1:
                    vm.files[request.run_id] = (time.time(), blob)
            stdout = printed_chunk(header, request.run_id, blob, 0, request.chunk)
            stderr = printed_chunk(header, request.run_id, blob, 1, request.chunk) if count > 1 else ""
            return stdout, stderr
        if isinstance(request, module.ChunkRequest):
            with self.lock:
                saved = vm.files.get(request.run_id)
            if saved is None:
                return "", (
                    'Exception calling "ReadAllText" with "2" argument(s): "Could not find file '
                    f"'C:\\Windows\\Temp\\rdpfix-rc-{request.run_id}.txt'.\"\r\n"
                )
            blob = saved[1]
            count = max(1, -(-len(blob) // request.chunk))
            if request.index >= count:
                return "", 'Exception calling "Substring" with "2" argument(s): "startIndex cannot be larger."\r\n'
            if request.index == count - 1:
                with self.lock:
                    vm.files.pop(request.run_id, None)
            stdout = printed_chunk(header, request.run_id, blob, request.index, request.chunk)
            stderr = ""
            if request.index + 1 < count:
                stderr = printed_chunk(header, request.run_id, blob, request.index + 1, request.chunk)
            return stdout, stderr
        return "", (
            "rdplab: this simulated VM runs only the scripts of the rdpfix.rdp.azure_run_command connection "
            "(exactly as plugins/plugin_utils/_run_command.py renders them); refused\r\n"
        )

    def operation_document(self, operation: Operation) -> dict[str, t.Any]:
        document: dict[str, t.Any] = {
            "name": operation.op_id,
            "startTime": operation.started,
            "status": operation.status,
        }
        if operation.done.is_set():
            document["endTime"] = operation.ended
            if operation.error:
                document["error"] = operation.error
            else:
                document["properties"] = {"output": self.result_document(operation)}
        return document

    @staticmethod
    def result_document(operation: Operation) -> dict[str, t.Any]:
        return {
            "value": [
                {
                    "code": "ComponentStatus/StdOut/succeeded",
                    "level": "Info",
                    "displayStatus": "Provisioning succeeded",
                    "message": operation.stdout,
                },
                {
                    "code": "ComponentStatus/StdErr/succeeded",
                    "level": "Info",
                    "displayStatus": "Provisioning succeeded",
                    "message": operation.stderr,
                },
            ]
        }


def file_transfer(
    module: ModuleType, host: WindowsHost, command_line: str, stdin: bytes
) -> bootstrap.CommandOutcome | None:
    """The connection's put_file / fetch_file scripts (``put_file_script`` / ``fetch_file_script`` of the collection's
    _run_command.py, exactly, as powershell.exe -EncodedCommand), emulated on the host's file system as SYSTEM; None
    for any other command line. Errors are what the .NET calls throw under ``$ErrorActionPreference = 'Stop'``:
    exit code 1 and the exception's message on stderr."""
    prefix = bootstrap.encoded_command("")
    if not command_line.startswith(prefix):
        return None
    try:
        script = base64.b64decode(command_line[len(prefix) :], validate=True).decode("utf-16-le")
    except ValueError:
        return None
    request = module.parse_file_script(script)
    if request is None or bootstrap.encoded_command(script) != command_line:
        return None

    def failed(call: str, arguments: int, message: str) -> bootstrap.CommandOutcome:
        text = f'Exception calling "{call}" with "{arguments}" argument(s): "{message}"\r\n'
        return bootstrap.CommandOutcome(rc=1, stdout=b"", stderr=text.encode("utf-8"))

    with host.lock:
        if request.kind == "put":
            data = base64.b64decode("".join(stdin.decode("ascii").split()))
            try:
                host.filesystem.write(request.path, data)
            except OpError as exc:
                return failed("WriteAllBytes", 2, str(exc))
            return bootstrap.CommandOutcome(0, (hashlib.sha256(data).hexdigest() + "\r\n").encode("ascii"), b"")
        entry = host.filesystem.get(request.path)
        if entry is None:
            return failed("ReadAllBytes", 1, f"Could not find file '{request.path}'.")
        try:
            if entry.is_dir:
                raise AccessDenied(f"Access to the path '{request.path}' is denied.")
            # A plain read (File.ReadAllBytes asks no backup semantics) with SYSTEM's token: the DACL decides.
            CallerToken.system().start_process().check_read_data(entry.path, entry.sddl, backup=False)
        except OpError as exc:
            return failed("ReadAllBytes", 1, str(exc))
        digest = hashlib.sha256(entry.content).hexdigest()
        body = f"{digest}\r\n{base64.b64encode(entry.content).decode('ascii')}\r\n"
        return bootstrap.CommandOutcome(0, body.encode("ascii"), b"")


def azure_inventory_document(azure: dict[str, t.Any]) -> dict[str, t.Any]:
    """The rdpfix.rdp.azure_vms inventory of a lab started with --azure (the same shape as an azure_rm config).

    Credentials: the lab's service principal, in the file (a secret made up at every start). The connection variables
    come from hostvar_expressions, as users of azure_rm add them: the resource ID, the lab's endpoints and CA.
    """

    def literal(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    return {
        "plugin": "rdpfix.rdp.azure_vms",
        "subscription_id": azure["subscription"],
        "auth_source": "service_principal",
        "client_id": azure["client_id"],
        "secret": azure["client_secret"],
        "tenant": azure["tenant"],
        "resource_manager_endpoint": azure["endpoint"],
        "authority_host": azure["endpoint"],
        "disable_instance_discovery": True,
        "ca_bundle": azure["ca_file"],
        "include_vm_resource_groups": [azure["resource_group"]],
        "plain_host_names": True,
        "conditional_groups": {
            "azure_vms": "true",
            "windows": "os_profile.system == 'windows'",
            "azure_running": "powerstate == 'running'",
        },
        "keyed_groups": [{"prefix": "azure_rg", "key": "resource_group"}, {"prefix": "azure_loc", "key": "location"}],
        "hostvar_expressions": {
            "ansible_connection": literal("rdpfix.rdp.azure_run_command"),
            "ansible_azure_resource_id": "id",
            "ansible_azure_auth_source": literal("service_principal"),
            "ansible_azure_client_id": literal(azure["client_id"]),
            "ansible_azure_secret": literal(azure["client_secret"]),
            "ansible_azure_tenant": literal(azure["tenant"]),
            "ansible_azure_resource_manager_endpoint": literal(azure["endpoint"]),
            "ansible_azure_authority_host": literal(azure["endpoint"]),
            "ansible_azure_disable_instance_discovery": "true",
            "ansible_azure_ca_bundle": literal(azure["ca_file"]),
            # The lab answers at once (latency set with `rdplab up --azure-latency`): poll and back off quickly.
            "ansible_azure_run_command_poll_interval": "0.05",
            "ansible_azure_run_command_conflict_backoff": "0.2",
        },
    }


AZURE_RM_INVENTORY = "lab.azure_rm.yml"
AZURE_RM_ENVIRONMENT = "lab.azure_rm.env"


def azure_rm_inventory_document() -> dict[str, t.Any]:
    """The azure.azcollection.azure_rm inventory of a lab started with --azure: the configuration a user writes for
    public Azure (the README's example), nothing of the lab in it. The lab is reached through the environment
    (azure_rm_environment): credentials as AWX's Azure credential sets them, and the lab's proxy and CA."""
    return {
        "plugin": "azure.azcollection.azure_rm",
        "auth_source": "auto",
        "include_vm_resource_groups": [RESOURCE_GROUP],
        "plain_host_names": True,
        # azure_rm leaves out VMs that are not running unless told otherwise (its default_host_filters): keep them,
        # so that an audit lists a stopped VM as unreachable with its power state rather than not at all.
        "default_host_filters": ["provisioning_state != 'succeeded'"],
        "conditional_groups": {
            "azure_vms": "true",
            "windows": "os_profile.system == 'windows'",
            "azure_running": "powerstate == 'running'",
        },
        "keyed_groups": [
            {"prefix": "azure_rg", "key": "resource_group"},
            {"prefix": "azure_loc", "key": "location"},
            {"prefix": "tag", "key": "tags"},
        ],
        "hostvar_expressions": {
            "ansible_connection": "'rdpfix.rdp.azure_run_command'",
            "ansible_azure_resource_id": "id",
            # The lab answers at once (latency set with `rdplab up --azure-latency`): poll and back off quickly.
            "ansible_azure_run_command_poll_interval": "0.05",
            "ansible_azure_run_command_conflict_backoff": "0.2",
        },
    }


def azure_rm_environment(azure: dict[str, t.Any]) -> dict[str, str]:
    """What azure_rm and the connection need in their environment to meet the lab where they would meet public Azure:
    the service principal as AWX's "Microsoft Azure Resource Manager" credential injects it, the lab's proxy for
    management.azure.com and login.microsoftonline.com, and the lab's CA as the CA bundle of requests."""
    return {
        "AZURE_SUBSCRIPTION_ID": azure["subscription"],
        "AZURE_CLIENT_ID": azure["client_id"],
        "AZURE_SECRET": azure["client_secret"],
        "AZURE_TENANT": azure["tenant"],
        "HTTPS_PROXY": azure["proxy"],
        "REQUESTS_CA_BUNDLE": azure["ca_file"],
    }


def write_azure_inventory(path: Path, azure: dict[str, t.Any]) -> None:
    """The rdpfix.rdp.azure_vms inventory at ``path``; beside it the azure.azcollection.azure_rm inventory
    (lab.azure_rm.yml) and the environment it needs (lab.azure_rm.env, shell ``export`` lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Written by `rdplab up --azure`: the simulated fleet as Azure VMs. Regenerated on every start.\n"
    body = yaml.safe_dump(azure_inventory_document(azure), sort_keys=False, default_flow_style=False)
    path.write_text(header + body, encoding="utf-8")
    rm_header = header + f"# Needs the environment of {AZURE_RM_ENVIRONMENT} (source it) and azure_rm's requirements.\n"
    rm_body = yaml.safe_dump(azure_rm_inventory_document(), sort_keys=False, default_flow_style=False)
    (path.parent / AZURE_RM_INVENTORY).write_text(rm_header + rm_body, encoding="utf-8")
    exports = "".join(f"export {key}='{value}'\n" for key, value in azure_rm_environment(azure).items())
    environment = path.parent / AZURE_RM_ENVIRONMENT
    environment.touch(mode=0o600)
    environment.write_text(header + exports, encoding="utf-8")


# --- HTTP -----------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ArmServer

    def log_message(self, format: str, *args: t.Any) -> None:
        LOG.debug("arm: " + format, *args)

    # Set while a /batch request runs its requests: _send records each answer here instead of writing it.
    _captured: list[tuple[int, t.Any, dict[str, str]]] | None = None

    def _send(self, status: int, document: t.Any, headers: dict[str, str] | None = None) -> None:
        if self._captured is not None:
            self._captured.append((status, document, dict(headers or {})))
            return
        payload = b"" if document is None else json.dumps(document).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-ms-request-id", str(uuid.uuid4()))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _origin(self) -> str:
        """The URL base this request was sent to: public Azure's host name when it came through the lab's proxy
        (answers name URLs on the host the client asked, as Azure does), else the lab's own endpoint."""
        host = (self.headers.get("Host") or "").split(":", 1)[0].lower()
        return f"https://{host}" if host in PUBLIC_HOSTS else self.server.cloud.endpoint

    def _dispatch(self, method: str) -> None:
        try:
            body = self._body()
        except (ValueError, OSError) as exc:
            self._send(400, {"error": {"code": "BadRequest", "message": str(exc)}})
            return
        self._route(method, self.path, body)

    def _route(self, method: str, target: str, body: bytes, batched: bool = False) -> None:
        cloud = self.server.cloud
        url = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(url.query))
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/") if p]
        lowered = [p.lower() for p in parts]
        try:
            if batched and lowered[:1] != ["subscriptions"]:
                raise ArmError(400, "InvalidRequestUri", f"a batch request cannot address {url.path}")
            if parts[:1] == ["rdplab"]:
                self._lab(method, parts, body)
            elif method == "GET" and lowered == ["metadata", "endpoints"]:
                self._send(200, self._cloud_metadata(query.get("api-version", "")))
            elif method == "GET" and lowered == ["metadata", "identity", "oauth2", "token"]:
                if self.headers.get("Metadata", "").lower() != "true":
                    self._send(
                        400, {"error": "invalid_request", "error_description": "Required metadata header not specified"}
                    )
                else:
                    document = cloud.issue_token(query.get("resource", ""))
                    document["resource"] = query.get("resource", "")
                    document["expires_in"] = str(document["expires_in"])
                    self._send(200, document)
            elif method == "GET" and len(parts) == 4 and lowered[1:] == ["v2.0", ".well-known", "openid-configuration"]:
                self._send(200, self._openid(parts[0]))
            elif method == "POST" and len(parts) == 4 and lowered[1:] == ["oauth2", "v2.0", "token"]:
                self._token(parts[0], body)
            elif method == "GET" and lowered == ["common", "discovery", "instance"]:
                self._send(200, self._instance_discovery(query))
            elif method == "POST" and lowered == ["batch"]:
                cloud.check_token(self.headers.get("Authorization"))
                cloud.count("batch")
                self._batch(body)
            elif lowered[:1] == ["subscriptions"]:
                if not batched:  # a batch's requests travel under the batch's own token
                    cloud.check_token(self.headers.get("Authorization"))
                self._arm(method, parts, lowered, query, body)
            else:
                raise ArmError(404, "NotFound", f"no such endpoint: {method} {url.path}")
        except ArmError as exc:
            self._send(exc.status, {"error": {"code": exc.code, "message": exc.message}}, exc.headers)
        except (ValueError, KeyError) as exc:
            self._send(400, {"error": {"code": "BadRequest", "message": str(exc)}})
        except Exception as exc:
            LOG.exception("arm request failed")
            self._send(500, {"error": {"code": "InternalServerError", "message": f"{type(exc).__name__}: {exc}"}})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def _batch(self, body: bytes) -> None:
        """Resource Manager's batch API (``POST /batch?api-version=2015-11-01``), which azure.azcollection's azure_rm
        inventory uses by default (its ``batch_fetch`` option: "an unsupported batch API"). Microsoft documents no
        contract for it (UNCONFIRMED): the request ``{"requests": [{"httpMethod", "url", "name"}]}`` and the answer
        ``{"responses": [{"name", "httpStatusCode", "headers", "content", "contentLength"}]}`` are modelled on what
        azure_rm sends and reads. Each request is answered as if it had been sent alone, under the batch's token; the
        lab answers at once (200), never with the 202 + polling azure_rm also accepts."""
        document = json.loads(body or b"{}")
        requests = document.get("requests") if isinstance(document, dict) else None
        if not isinstance(requests, list):
            raise ArmError(400, "InvalidRequestContent", "The request content must hold a 'requests' array.")
        if len(requests) > 500:  # UNCONFIRMED limit; azure_rm sends at most 100 at a time
            raise ArmError(400, "InvalidRequestContent", "A batch may hold at most 500 requests.")
        responses = []
        for item in requests:
            if not isinstance(item, dict) or not isinstance(item.get("url"), str):
                raise ArmError(400, "InvalidRequestContent", "Each batch request needs a 'url'.")
            method = str(item.get("httpMethod") or "GET").upper()
            self._captured = []
            try:
                if method != "GET":
                    self._send(405, {"error": {"code": "MethodNotAllowed", "message": "Only GET is batched here."}})
                else:
                    self._route(method, item["url"], b"", batched=True)
                status, content, headers = self._captured[0]
            finally:
                self._captured = None
            responses.append(
                {
                    "name": item.get("name"),
                    "httpStatusCode": status,
                    "headers": headers,
                    "content": content,
                    "contentLength": len(json.dumps(content)) if content is not None else 0,
                }
            )
        self._send(200, {"responses": responses})

    def do_POST(self) -> None:
        self._dispatch("POST")

    # --- Microsoft Entra ----------------------------------------------------------------------------------------------

    def _openid(self, tenant: str) -> dict[str, t.Any]:
        base = f"{self._origin()}/{tenant}"
        return {
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
            "issuer": f"{base}/v2.0",
            "jwks_uri": f"{base}/discovery/v2.0/keys",
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "tenant_region_scope": "EU",
        }

    def _token(self, tenant: str, body: bytes) -> None:
        cloud = self.server.cloud
        form = dict(urllib.parse.parse_qsl(body.decode("utf-8")))
        if tenant != TENANT:
            self._send(
                400, {"error": "invalid_tenant", "error_description": f"AADSTS90002: Tenant '{tenant}' not found."}
            )
        elif form.get("grant_type") != "client_credentials":
            self._send(400, {"error": "unsupported_grant_type", "error_description": "AADSTS70003: unsupported grant"})
        elif form.get("client_id") != CLIENT_ID or not secrets.compare_digest(
            form.get("client_secret", ""), cloud.client_secret
        ):
            self._send(
                401,
                {
                    "error": "invalid_client",
                    "error_description": "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent "
                    "in the request is the client secret value, not the client secret ID.",
                },
            )
        elif len(form.get("scope", "").split()) != 1 or not form.get("scope", "").endswith("/.default"):
            # Client credentials take one resource's scope with /.default (wording UNCONFIRMED).
            self._send(
                400,
                {
                    "error": "invalid_scope",
                    "error_description": f"AADSTS1002012: The provided value for scope {form.get('scope', '')} is not "
                    "valid. Client credential flows must have a scope value with /.default suffixed to the resource "
                    "identifier (application ID URI).",
                },
            )
        else:
            self._send(200, cloud.issue_token(form["scope"][: -len("/.default")]))

    def _instance_discovery(self, query: dict[str, str]) -> dict[str, t.Any]:
        """Microsoft Entra's instance discovery (what MSAL asks for an authority it does not know), for the lab's
        authority: the tenant's OpenID configuration on the host asked, no aliases."""
        origin = self._origin()
        authorize = urllib.parse.urlsplit(query.get("authorization_endpoint", ""))
        tenant = (authorize.path.strip("/").split("/") or ["common"])[0] or "common"
        host = urllib.parse.urlsplit(origin).netloc
        return {
            "tenant_discovery_endpoint": f"{origin}/{tenant}/v2.0/.well-known/openid-configuration",
            "api-version": "1.1",
            "metadata": [{"preferred_network": host, "preferred_cache": host, "aliases": [host]}],
        }

    def _cloud_metadata(self, api_version: str) -> t.Any:
        """Resource Manager's metadata endpoint for the lab's cloud, as the Azure CLI reads it (ARM_CLOUD_METADATA_URL:
        from api-version 2019-05-01 a list of clouds, each with name, resourceManager, authentication and suffixes;
        the shape is azure-cli-core's reader's, ``_arm_to_cli_mapper``, UNCONFIRMED against Azure's answer). Older
        api-versions get the one cloud's object. No client in the tests reads it: azure_rm cannot (docs/azure.md)."""
        origin = self._origin()
        cloud = {
            "name": "RdplabCloud",
            "resourceManager": origin + "/",
            "portal": origin + "/",
            "authentication": {
                "loginEndpoint": origin + "/",
                "audiences": [origin + "/"],
                "tenant": "common",
                "identityProvider": "AAD",
            },
            "suffixes": {},
        }
        return [cloud] if api_version >= "2019-05-01" else cloud

    # --- Resource Manager ---------------------------------------------------------------------------------------------

    def _arm(self, method: str, parts: list[str], lowered: list[str], query: dict[str, str], body: bytes) -> None:
        cloud = self.server.cloud
        if len(parts) < 2 or lowered[1] != SUBSCRIPTION.lower():
            raise ArmError(
                404,
                "SubscriptionNotFound",
                f"The subscription '{parts[1] if len(parts) > 1 else ''}' could not be found.",
            )
        rest = lowered[2:]
        if method == "GET" and rest == ["providers", "microsoft.compute", "virtualmachines"]:
            cloud.count("vm_list")
            self._list(query)
        elif (
            method == "GET"
            and rest[:4] == ["providers", "microsoft.compute", "locations", LOCATION]
            and (len(rest) == 6 and rest[4] == "operations")
        ):
            cloud.count("operation")
            self._operation(parts[7], query)
        elif len(rest) >= 2 and rest[0] == "resourcegroups":
            if rest[1] != RESOURCE_GROUP:
                raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{parts[3]}' could not be found.")
            tail = rest[2:]
            if method == "GET" and tail == ["providers", "microsoft.compute", "virtualmachines"]:
                cloud.count("vm_list")
                self._list(query)
            elif (
                method == "GET"
                and len(tail) == 4
                and tail[:3] == ["providers", "microsoft.network", "networkinterfaces"]
            ):
                name = parts[7]
                if not name.lower().endswith("-nic"):
                    raise ArmError(404, "ResourceNotFound", f"The network interface '{name}' was not found.")
                cloud.count("nic")
                self._send(200, cloud.nic_document(cloud._vm(name[: -len("-nic")])))
            elif (
                method == "GET"
                and len(tail) == 4
                and tail[:3] == ["providers", "microsoft.network", "publicipaddresses"]
            ):
                name = parts[7]
                if not name.lower().endswith("-pip"):
                    raise ArmError(404, "ResourceNotFound", f"The public IP address '{name}' was not found.")
                cloud.count("public_ip")
                self._send(200, cloud.pip_document(cloud._vm(name[: -len("-pip")])))
            elif len(tail) >= 4 and tail[:3] == ["providers", "microsoft.compute", "virtualmachines"]:
                name = parts[7]
                action = tail[4:]
                if method == "GET" and not action:
                    cloud.count("vm")
                    vm = cloud._vm(name)
                    self._send(200, cloud.vm_document(vm, status=query.get("$expand") == "instanceView"))
                elif method == "GET" and action == ["instanceview"]:
                    cloud.count("instance_view")
                    self._send(200, cloud.instance_view(cloud._vm(name)))
                elif method == "POST" and action == ["runcommand"]:
                    operation = cloud.run_command(name, json.loads(body or b"{}"))
                    cloud.count("run_command")
                    base = (
                        f"{self._origin()}/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Compute/locations/"
                        f"{LOCATION}/operations/{operation.op_id}"
                    )
                    api = urllib.parse.quote(query.get("api-version", ""))
                    self._send(
                        202,
                        None,
                        {
                            "Azure-AsyncOperation": f"{base}?api-version={api}",
                            "Location": f"{base}?monitor=true&api-version={api}",
                        },
                    )
                else:
                    raise ArmError(404, "NotFound", f"no such VM endpoint: {method} /{'/'.join(parts)}")
            else:
                raise ArmError(404, "NotFound", f"no such endpoint: {method} /{'/'.join(parts)}")
        else:
            raise ArmError(404, "NotFound", f"no such endpoint: {method} /{'/'.join(parts)}")

    def _list(self, query: dict[str, str]) -> None:
        cloud = self.server.cloud
        status = query.get("statusOnly", "").lower() == "true" or query.get("$expand") == "instanceView"
        self._send(200, {"value": [cloud.vm_document(vm, status=status) for vm in cloud.vms.values()]})

    def _operation(self, op_id: str, query: dict[str, str]) -> None:
        cloud = self.server.cloud
        operation = cloud.operations.get(op_id)
        if operation is None:
            raise ArmError(404, "NotFound", f"operation {op_id} not found")
        if query.get("monitor") == "true":
            # The Location URL: 202 while the operation runs, then the result (or the operation's error).
            if not operation.done.is_set():
                self._send(202, None, {"Location": f"{self._origin()}{self.path}"})
            elif operation.error:
                raise ArmError(500, operation.error["code"], operation.error["message"])
            else:
                self._send(200, cloud.result_document(operation))
            return
        self._send(200, cloud.operation_document(operation))

    # --- the lab's own control ----------------------------------------------------------------------------------------

    def _lab(self, method: str, parts: list[str], body: bytes) -> None:
        cloud = self.server.cloud
        if method == "GET" and parts == ["rdplab", "state"]:
            self._send(200, cloud.state())
        elif method == "POST" and parts == ["rdplab", "configure"]:
            document = json.loads(body or b"{}")
            if not isinstance(document, dict):
                raise ValueError("the body must be a JSON object")
            self._send(200, cloud.configure(document))
        elif method == "GET" and len(parts) == 3 and parts[1] == "scripts":
            vm = cloud._vm(parts[2])
            self._send(200, {"scripts": list(vm.scripts)})
        else:
            raise ArmError(404, "NotFound", f"no such lab endpoint: {method} /{'/'.join(parts)}")


class _ArmServer(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, cloud: ArmCloud, address: tuple[str, int]) -> None:
        self.cloud = cloud
        try:
            super().__init__(address, _Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen for Azure on {address[0]}:{address[1]}: {exc.strerror}") from exc


class _ProxyHandler(BaseHTTPRequestHandler):
    """The lab's HTTPS proxy: ``CONNECT management.azure.com:443`` (or login.microsoftonline.com) is accepted, and
    the tunnel is answered by the lab's cloud with a certificate for that name from the lab's CA - as a
    TLS-inspecting proxy answers, so a client that trusts the CA (REQUESTS_CA_BUNDLE) and uses the proxy
    (HTTPS_PROXY) meets the lab wherever it would meet public Azure. Any other host, or any other method, is
    refused: nothing leaves the lab."""

    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: t.Any) -> None:
        LOG.debug("arm proxy: " + format, *args)

    def _refuse(self, status: int, reason: str) -> None:
        payload = (reason + "\n").encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)
        self.close_connection = True

    def do_CONNECT(self) -> None:
        cloud = self.server.cloud
        host, _colon, port = self.path.rpartition(":")
        host = host.strip("[]").lower()
        with cloud.lock:
            accepted = host in PUBLIC_HOSTS and port == "443"
            key = host if accepted else f"refused {self.path}"
            cloud.proxied[key] = cloud.proxied.get(key, 0) + 1
        if not accepted:
            self._refuse(403, f"rdplab proxy: only {', '.join(PUBLIC_HOSTS)} on port 443, not {self.path}")
            return
        self.send_response(200, "Connection Established")
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        try:
            tunnel = cloud.tls.wrap_socket(self.connection, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            LOG.debug("arm proxy: TLS with the client failed: %s", exc)
            return
        try:
            _Handler(tunnel, self.client_address, cloud.server)
        finally:
            with contextlib.suppress(OSError):
                tunnel.close()

    def do_GET(self) -> None:
        self._refuse(405, "rdplab proxy: CONNECT only")

    def do_POST(self) -> None:
        self._refuse(405, "rdplab proxy: CONNECT only")


class _ProxyServer(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, cloud: ArmCloud, address: tuple[str, int]) -> None:
        self.cloud = cloud
        try:
            super().__init__(address, _ProxyHandler)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen for the Azure proxy on {address[0]}:{address[1]}: {exc}") from exc


def _certificates(address: str) -> tuple[bytes, bytes, bytes]:
    """A CA of the lab's cloud and the listener's certificate issued by it: (CA PEM, certificate PEM, key PEM)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rdplab Azure CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "management.rdplab")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("management.rdplab"),
                    *(x509.DNSName(name) for name in PUBLIC_HOSTS),
                    x509.IPAddress(ipaddress.ip_address(address)),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return (
        ca.public_bytes(serialization.Encoding.PEM),
        certificate.public_bytes(serialization.Encoding.PEM),
        key_pem,
    )
