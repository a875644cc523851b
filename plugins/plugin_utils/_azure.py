# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Azure credentials and endpoints shared by the azure_vms inventory and the azure_run_command connection.

Both read the same options (documented in each plugin, with the meanings of azure.azcollection's options of the same
names): auth_source, client_id, secret, tenant, cloud_environment, resource_manager_endpoint, authority_host,
disable_instance_discovery, ca_bundle. The Azure SDK is imported lazily, so the plugins load (and ansible-doc works)
on a controller without it; using them without it is a clear error.
"""

from __future__ import annotations

import os
import re
import typing as t
from dataclasses import dataclass

from ansible.errors import AnsibleError

CLOUDS: dict[str, tuple[str, str]] = {
    "AzureCloud": ("https://management.azure.com", "https://login.microsoftonline.com"),
    "AzureChinaCloud": ("https://management.chinacloudapi.cn", "https://login.chinacloudapi.cn"),
    "AzureUSGovernment": ("https://management.usgovcloudapi.net", "https://login.microsoftonline.us"),
}
AUTH_SOURCES = ("auto", "cli", "env", "msi", "service_principal")
RESOURCE_ID = re.compile(
    r"^/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Compute/"
    r"virtualMachines/(?P<vm>[^/]+)/?$",
    re.IGNORECASE,
)
SDK_MISSING = (
    "{what} needs the Azure SDK for Python on the controller: azure-identity and azure-mgmt-compute "
    "(pip install -r requirements.txt of the rdpfix.rdp collection): {error}"
)


class AzureSettingsError(AnsibleError):
    """A setting of the Azure plugins is wrong: said before any request is sent."""


@dataclass(frozen=True)
class AzureSettings:
    auth_source: str
    client_id: str | None
    secret: str | None
    tenant: str | None
    resource_manager: str
    authority: str
    disable_instance_discovery: bool
    ca_bundle: str | None

    @property
    def audience(self) -> str:
        """The token audience: public Azure's is management.core.windows.net; other clouds use their ARM URL."""
        if self.resource_manager == CLOUDS["AzureCloud"][0]:
            return "https://management.core.windows.net"
        return self.resource_manager


def settings_from(get: t.Callable[[str], t.Any]) -> AzureSettings:
    """Read and check the shared options through a plugin's get_option."""
    cloud = get("cloud_environment") or "AzureCloud"
    if cloud not in CLOUDS:
        raise AzureSettingsError(f"cloud_environment must be one of {', '.join(CLOUDS)}, not {cloud!r}")
    arm, authority = CLOUDS[cloud]
    source = get("auth_source") or "auto"
    if source not in AUTH_SOURCES:
        raise AzureSettingsError(f"auth_source must be one of {', '.join(AUTH_SOURCES)}, not {source!r}")
    ca_bundle = get("ca_bundle") or None
    if ca_bundle and not os.path.isfile(ca_bundle):
        raise AzureSettingsError(f"ca_bundle {ca_bundle!r} is not a file")
    resource_manager = str(get("resource_manager_endpoint") or arm).rstrip("/")
    authority_host = str(get("authority_host") or authority).rstrip("/")
    for name, url in (("resource_manager_endpoint", resource_manager), ("authority_host", authority_host)):
        if not url.startswith("https://"):
            raise AzureSettingsError(f"{name} must be an https:// URL, not {url!r}")
    return AzureSettings(
        auth_source=source,
        client_id=get("client_id") or None,
        secret=get("secret") or None,
        tenant=get("tenant") or None,
        resource_manager=resource_manager,
        authority=authority_host,
        disable_instance_discovery=bool(get("disable_instance_discovery")),
        ca_bundle=ca_bundle,
    )


def transport_kwargs(settings: AzureSettings) -> dict[str, t.Any]:
    """The HTTP transport: the system's CAs (and REQUESTS_CA_BUNDLE), or ca_bundle. Never unverified."""
    if not settings.ca_bundle:
        return {}
    from azure.core.pipeline.transport import RequestsTransport  # noqa: PLC0415 - the SDK is optional

    return {"transport": RequestsTransport(connection_verify=settings.ca_bundle)}


def credential_kind(settings: AzureSettings) -> str:
    """Which azure-identity credential the settings select (the same choice as azure.azcollection's auth_source)."""
    if settings.auth_source == "service_principal" or (
        settings.auth_source == "auto" and settings.client_id and settings.secret and settings.tenant
    ):
        missing = [
            name
            for name, value in (
                ("client_id", settings.client_id),
                ("secret", settings.secret),
                ("tenant", settings.tenant),
            )
            if not value
        ]
        if missing:
            raise AzureSettingsError(f"auth_source service_principal needs {', '.join(missing)}")
        return "ClientSecretCredential"
    return {
        "env": "EnvironmentCredential",
        "cli": "AzureCliCredential",
        "msi": "ManagedIdentityCredential",
    }.get(settings.auth_source, "DefaultAzureCredential")


def credential(settings: AzureSettings) -> t.Any:
    """The azure-identity credential for the settings (see credential_kind)."""
    from azure import identity  # noqa: PLC0415 - the SDK is optional

    kind = credential_kind(settings)
    transport = transport_kwargs(settings)
    entra: dict[str, t.Any] = {"authority": settings.authority, **transport}
    if settings.disable_instance_discovery:
        entra["disable_instance_discovery"] = True
    if kind == "ClientSecretCredential":
        return identity.ClientSecretCredential(
            tenant_id=str(settings.tenant),
            client_id=str(settings.client_id),
            client_secret=str(settings.secret),
            **entra,
        )
    if kind == "EnvironmentCredential":
        return identity.EnvironmentCredential(**entra)
    if kind == "AzureCliCredential":
        return (
            identity.AzureCliCredential(tenant_id=settings.tenant) if settings.tenant else identity.AzureCliCredential()
        )
    if kind == "ManagedIdentityCredential":
        return identity.ManagedIdentityCredential(client_id=settings.client_id, **transport)
    return identity.DefaultAzureCredential(authority=settings.authority, **transport)


def compute_client(settings: AzureSettings, subscription: str, poll_interval: float = 5.0) -> t.Any:
    """A ComputeManagementClient for one subscription with the settings' credential, endpoint and CAs."""
    from azure.mgmt.compute import ComputeManagementClient  # noqa: PLC0415 - the SDK is optional

    return ComputeManagementClient(
        credential(settings),
        subscription,
        base_url=settings.resource_manager,
        credential_scopes=[f"{settings.audience}/.default"],
        polling_interval=poll_interval,
        **transport_kwargs(settings),
    )


def parse_resource_id(resource_id: str) -> tuple[str, str, str]:
    """(subscription, resource group, VM name) of a VM's resource ID."""
    match = RESOURCE_ID.match(resource_id.strip())
    if not match:
        raise AzureSettingsError(
            f"{resource_id!r} is not a virtual machine's resource ID "
            "(/subscriptions/SUB/resourceGroups/RG/providers/Microsoft.Compute/virtualMachines/NAME)"
        )
    return match["sub"], match["rg"], match["vm"]
