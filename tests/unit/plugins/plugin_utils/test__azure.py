"""Azure settings shared by the azure_vms inventory and the azure_run_command connection: which credential, which
endpoints, and clear errors for wrong settings before any request."""

from __future__ import annotations

import typing as t

import pytest

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _azure as azure

pytestmark = pytest.mark.azure

SP = {"client_id": "app", "secret": "s3cret", "tenant": "tenant"}


def settings(**options: t.Any) -> azure.AzureSettings:
    return azure.settings_from(options.get)


@pytest.mark.parametrize(
    ("options", "kind"),
    [
        ({}, "DefaultAzureCredential"),
        (SP, "ClientSecretCredential"),  # auto with all three: the service principal, as azure.azcollection
        ({"client_id": "app"}, "DefaultAzureCredential"),
        ({"auth_source": "service_principal", **SP}, "ClientSecretCredential"),
        ({"auth_source": "env", **SP}, "EnvironmentCredential"),
        ({"auth_source": "cli"}, "AzureCliCredential"),
        ({"auth_source": "msi", "client_id": "user-assigned"}, "ManagedIdentityCredential"),
    ],
)
def test_the_credential_follows_auth_source(options: dict[str, t.Any], kind: str) -> None:
    assert azure.credential_kind(settings(**options)) == kind


def test_the_credential_objects_are_azure_identitys() -> None:
    for options, kind in [(SP, "ClientSecretCredential"), ({"auth_source": "cli"}, "AzureCliCredential")]:
        assert type(azure.credential(settings(**options))).__name__ == kind


def test_a_service_principal_without_its_secret_is_refused() -> None:
    with pytest.raises(azure.AzureSettingsError, match="needs secret"):
        azure.credential_kind(settings(auth_source="service_principal", client_id="app", tenant="t"))


def test_clouds_and_endpoints() -> None:
    public = settings()
    assert (public.resource_manager, public.authority) == (
        "https://management.azure.com",
        "https://login.microsoftonline.com",
    )
    assert public.audience == "https://management.core.windows.net"
    china = settings(cloud_environment="AzureChinaCloud")
    assert china.resource_manager == "https://management.chinacloudapi.cn"
    assert china.audience == "https://management.chinacloudapi.cn"
    private = settings(resource_manager_endpoint="https://arm.example/", authority_host="https://login.example")
    assert (private.resource_manager, private.authority) == ("https://arm.example", "https://login.example")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cloud_environment": "Mars"}, "cloud_environment must be one of"),
        ({"auth_source": "password"}, "auth_source must be one of"),
        ({"resource_manager_endpoint": "http://arm.example"}, "must be an https:// URL"),
        ({"ca_bundle": "/nonexistent/ca.pem"}, "is not a file"),
    ],
)
def test_wrong_settings_are_said_before_any_request(options: dict[str, t.Any], message: str) -> None:
    with pytest.raises(azure.AzureSettingsError, match=message):
        settings(**options)


def test_resource_ids() -> None:
    resource = "/subscriptions/s-1/resourceGroups/RG-Web/providers/Microsoft.Compute/virtualMachines/web01"
    assert azure.parse_resource_id(resource) == ("s-1", "RG-Web", "web01")
    assert azure.parse_resource_id(resource.lower()) == ("s-1", "rg-web", "web01")
    with pytest.raises(azure.AzureSettingsError, match="is not a virtual machine's resource ID"):
        azure.parse_resource_id("/subscriptions/s-1/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/n")
