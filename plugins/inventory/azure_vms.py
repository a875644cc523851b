# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Inventory plugin rdpfix.rdp.azure_vms: the Azure VMs of a subscription, with azure_rm's host variables."""

from __future__ import annotations

DOCUMENTATION = r"""
name: azure_vms
short_description: Azure virtual machines, with the host variables of azure.azcollection.azure_rm
version_added: 0.2.0
author: rdpfix maintainers (@rdpfix)
description:
  - Lists the virtual machines of one Azure subscription (all resource groups, or some) with their power state, in
    one paged Resource Manager request (C(statusOnly=true)), using the Azure SDK for Python (azure-identity and
    azure-mgmt-compute, the collection's C(requirements.txt)).
  - Each host gets the host variables azure.azcollection.azure_rm gives a VM (V(id), V(name), V(resource_group),
    V(location), V(tags), V(powerstate), V(os_profile.system), V(vmid), V(computer_name), V(provisioning_state),
    V(virtual_machine_size), V(network_interface), V(private_ipv4_addresses), V(public_ipv4_address), ...), so
    O(keyed_groups), O(conditional_groups) and O(hostvar_expressions) written for azure_rm work unchanged, and
    C(ansible_host) is the first public address, else the first private one, as azure_rm sets it. Network
    interfaces and public IP addresses are read with one Resource Manager GET each (no azure-mgmt-network needed).
  - The rdpfix.rdp.azure_run_command connection needs only the resource ID (V(id)); C(ansible_host) is what the
    server role's RDP verification from the controller connects to.
  - Use it for a lean controller (azure_rm needs about 110 packages beside this collection, see the collection's
    C(requirements/azure-rm.txt) and docs/azure.md) or a private cloud such as Azure Stack Hub (azure_rm 3.12.0
    cannot resolve a cloud given by URL). Where azure_rm is installed, the same configuration naming
    C(azure.azcollection.azure_rm) as its plugin builds the same groups.
  - The configuration file's name must end in C(azure_vms.yml) or C(azure_vms.yaml).
extends_documentation_fragment:
  - constructed
requirements:
  - azure-identity
  - azure-mgmt-compute
options:
  plugin:
    description: Marks the file as this plugin's configuration.
    type: str
    required: true
    choices: [rdpfix.rdp.azure_vms]
  subscription_id:
    description: The subscription to list.
    type: str
    required: true
    env:
      - name: AZURE_SUBSCRIPTION_ID
  include_vm_resource_groups:
    description: Resource groups to list; C(*) lists the whole subscription.
    type: list
    elements: str
    default: ["*"]
  plain_host_names:
    description:
      - V(true) names hosts by the VM name; V(false) (azure_rm's default) appends four hex digits of the resource ID's
        SHA-1, so VMs of the same name in two resource groups stay apart.
    type: bool
    default: false
  conditional_groups:
    description: Groups by Jinja2 condition on the host variables (azure_rm's name for O(groups); both are used).
    type: dict
    default: {}
  hostvar_expressions:
    description: Host variables from Jinja2 expressions (azure_rm's name for O(compose); both are used).
    type: dict
    default: {}
  exclude_host_filters:
    description: Conditions on the host variables; a VM matching any of them is left out.
    type: list
    elements: str
    default: []
  auth_source:
    description: As in the rdpfix.rdp.azure_run_command connection and azure.azcollection.
    type: str
    default: auto
    choices: [auto, cli, env, msi, service_principal]
    env:
      - name: ANSIBLE_AZURE_AUTH_SOURCE
  client_id:
    description: The service principal's (or user-assigned managed identity's) client ID.
    type: str
    env:
      - name: AZURE_CLIENT_ID
  secret:
    description: The service principal's client secret.
    type: str
    env:
      - name: AZURE_SECRET
      - name: AZURE_CLIENT_SECRET
  tenant:
    description: The Microsoft Entra tenant ID.
    type: str
    env:
      - name: AZURE_TENANT
      - name: AZURE_TENANT_ID
  cloud_environment:
    description: The Azure cloud.
    type: str
    default: AzureCloud
    choices: [AzureCloud, AzureChinaCloud, AzureUSGovernment]
    env:
      - name: AZURE_CLOUD_ENVIRONMENT
  resource_manager_endpoint:
    description: The Azure Resource Manager URL, instead of the one of O(cloud_environment).
    type: str
    env:
      - name: AZURE_RESOURCE_MANAGER_ENDPOINT
  authority_host:
    description: The Microsoft Entra authority host URL, instead of the one of O(cloud_environment).
    type: str
    env:
      - name: AZURE_AUTHORITY_HOST
  disable_instance_discovery:
    description: Skip Microsoft Entra instance discovery (a private cloud or Azure Stack Hub).
    type: bool
    default: false
    env:
      - name: AZURE_DISABLE_INSTANCE_DISCOVERY
  ca_bundle:
    description: A PEM file of CA certificates to trust instead of the system's. Certificates are always verified.
    type: path
"""

EXAMPLES = r"""
# inventory/prod.azure_vms.yml
plugin: rdpfix.rdp.azure_vms
subscription_id: 00000000-0000-0000-0000-000000000000
auth_source: auto            # az login, a managed identity, or AZURE_CLIENT_ID/AZURE_CLIENT_SECRET/AZURE_TENANT_ID
include_vm_resource_groups: [rg-web, rg-sql]
plain_host_names: true
conditional_groups:
  azure_vms: true
  windows: os_profile.system == 'windows'
keyed_groups:
  - prefix: tag
    key: tags
  - prefix: azure_loc
    key: location
exclude_host_filters:
  - powerstate != 'running'
hostvar_expressions:
  ansible_connection: "'rdpfix.rdp.azure_run_command'"
  ansible_azure_resource_id: id
"""

import hashlib
import typing as t

from ansible.errors import AnsibleError, AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Constructable

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _azure as azure

# The Microsoft.Network API version azure_rm 3.x reads network interfaces and public IP addresses with.
NETWORK_API = "2024-05-01"


class InventoryModule(BaseInventoryPlugin, Constructable):  # type: ignore[misc]
    NAME = "rdpfix.rdp.azure_vms"

    def verify_file(self, path: str) -> bool:
        return bool(super().verify_file(path)) and path.endswith(("azure_vms.yml", "azure_vms.yaml"))

    def parse(self, inventory: t.Any, loader: t.Any, path: str, cache: bool = True) -> None:
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        try:
            settings = azure.settings_from(self.get_option)
            client = azure.compute_client(settings, self.get_option("subscription_id"))
        except azure.AzureSettingsError as exc:
            raise AnsibleParserError(f"{path}: {exc}") from exc
        except ImportError as exc:
            raise AnsibleParserError(azure.SDK_MISSING.format(what="rdpfix.rdp.azure_vms", error=exc)) from exc
        try:
            machines = self._list(client)
            addresses = {str(vm["id"]): self._addresses(client, vm) for vm in machines}
        except Exception as exc:  # the SDK's errors: authentication, HTTP, TLS - said with the file that caused them
            raise AnsibleError(f"{path}: listing the Azure VMs failed: {type(exc).__name__}: {exc}") from exc
        self._populate(machines, addresses)

    def _list(self, client: t.Any) -> list[dict[str, t.Any]]:
        groups = self.get_option("include_vm_resource_groups") or ["*"]
        found: list[dict[str, t.Any]] = []
        if "*" in groups:
            pages = [client.virtual_machines.list_all(status_only="true")]
        else:
            pages = [client.virtual_machines.list(group, expand="instanceView") for group in groups]
        for page in pages:
            found.extend(vm.as_dict() for vm in page)
        return found

    @staticmethod
    def _get(client: t.Any, resource_id: str, api_version: str) -> dict[str, t.Any]:
        """One Resource Manager GET through the client's pipeline (credential, endpoint, CAs, retries)."""
        from azure.core.rest import HttpRequest  # noqa: PLC0415 - the SDK is optional

        response = client.send_request(HttpRequest("GET", f"{resource_id}?api-version={api_version}"))
        response.raise_for_status()
        return t.cast(dict[str, t.Any], response.json())

    def _addresses(self, client: t.Any, vm: dict[str, t.Any]) -> dict[str, list[t.Any]]:
        """The VM's NICs as azure_rm reads them: names, private and public IPv4 addresses (two GETs per NIC at most)."""
        found: dict[str, list[t.Any]] = {"network_interface": [], "private": [], "public": []}
        references = ((vm.get("properties") or {}).get("networkProfile") or {}).get("networkInterfaces") or []
        for reference in references:
            nic = self._get(client, str(reference["id"]), NETWORK_API)
            found["network_interface"].append(nic.get("name"))
            for configuration in (nic.get("properties") or {}).get("ipConfigurations") or []:
                properties = configuration.get("properties") or {}
                if properties.get("privateIPAddress"):
                    found["private"].append(properties["privateIPAddress"])
                public = properties.get("publicIPAddress")
                if public and public.get("id"):
                    address = (self._get(client, str(public["id"]), NETWORK_API).get("properties") or {}).get(
                        "ipAddress"
                    )
                    if address:
                        found["public"].append(address)
        return found

    def _hostvars(self, vm: dict[str, t.Any], addresses: dict[str, list[t.Any]]) -> dict[str, t.Any]:
        """The VM as azure_rm's host variables (those that need no network or instance-view request)."""
        properties = vm.get("properties") or {}
        resource_id = str(vm["id"])
        group, name = azure.parse_resource_id(resource_id)[1:]
        os_profile = properties.get("osProfile") or {}
        if "windowsConfiguration" in os_profile:
            system = "windows"
        elif "linuxConfiguration" in os_profile:
            system = "linux"
        else:
            system = str(((properties.get("storageProfile") or {}).get("osDisk") or {}).get("osType", "unknown"))
            system = system.lower()
        statuses = ((properties.get("instanceView") or {}).get("statuses")) or []
        power = next(
            (str(s["code"]).split("/", 1)[1] for s in statuses if str(s.get("code", "")).startswith("PowerState/")),
            "unknown",
        )
        plain = bool(self.get_option("plain_host_names"))
        default_name = name if plain else f"{name}_{hashlib.sha1(resource_id.encode('utf-8')).hexdigest()[:4]}"
        return {
            "id": resource_id,
            "name": name,
            "resource_group": group.lower(),
            "location": vm.get("location"),
            "tags": vm.get("tags") or {},
            "powerstate": power,
            "provisioning_state": str(properties.get("provisioningState", "unknown")).lower(),
            "vmid": properties.get("vmId"),
            "computer_name": os_profile.get("computerName"),
            "os_profile": {"system": system},
            "resource_type": vm.get("type", "unknown"),
            "virtual_machine_size": (properties.get("hardwareProfile") or {}).get("vmSize"),
            "availability_zone": vm.get("zones"),
            "license_type": properties.get("licenseType", "Unknown"),
            "default_inventory_hostname": default_name,
            "vmss": {},
            "network_interface": addresses["network_interface"],
            "public_ipv4_address": addresses["public"],
            "private_ipv4_addresses": addresses["private"],
        }

    def _excluded(self, hostvars: dict[str, t.Any]) -> bool:
        for condition in self.get_option("exclude_host_filters"):
            self.templar.available_variables = hostvars
            conditional = "{% if " + condition + " %}true{% else %}false{% endif %}"
            if str(self.templar.template(_trusted(conditional))).strip() == "true":
                return True
        return False

    def _populate(self, machines: list[dict[str, t.Any]], addresses: dict[str, dict[str, list[t.Any]]]) -> None:
        strict = bool(self.get_option("strict"))
        groups = {**(self.get_option("groups") or {}), **(self.get_option("conditional_groups") or {})}
        compose = {**(self.get_option("compose") or {}), **(self.get_option("hostvar_expressions") or {})}
        for vm in machines:
            hostvars = self._hostvars(vm, addresses[str(vm["id"])])
            if self._excluded(hostvars):
                continue
            name = hostvars["default_inventory_hostname"]
            self.inventory.add_host(name)
            # As azure_rm: the first public address, else the first private one.
            reachable = [*hostvars["public_ipv4_address"], *hostvars["private_ipv4_addresses"]]
            if reachable:
                self.inventory.set_variable(name, "ansible_host", reachable[0])
            for key, value in hostvars.items():
                self.inventory.set_variable(name, key, value)
            self._set_composite_vars(compose, hostvars, name, strict=strict)
            self._add_host_to_composed_groups(groups, hostvars, name, strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), hostvars, name, strict=strict)


def _trusted(template: str) -> t.Any:
    """Mark a template built from the inventory file's own text as trusted (ansible-core 2.19 data tagging)."""
    try:
        from ansible.template import trust_as_template  # noqa: PLC0415 - ansible-core 2.19 and later
    except ImportError:
        return template
    return trust_as_template(template)
