"""A stand-in for the Azure CLI (`az`, run by the script tests/lab/bin/az), for tests of azure-identity's
AzureCliCredential against the lab's cloud.

It is not the Azure CLI: it answers only what AzureCliCredential and azure.azcollection run - ``az account
get-access-token --output json --resource R [--tenant T] [--subscription S]``, ``az account show [--query id]`` and
``az cloud show [--query name]`` - as the real CLI prints them, and gets the token from the lab's Microsoft Entra
token endpoint with the lab's service principal (client credentials), where the real CLI would use the token cache of
``az login``. "Logged in" means RDPLAB_AZ_ENDPOINT, RDPLAB_AZ_TENANT, RDPLAB_AZ_CLIENT_ID, RDPLAB_AZ_SECRET,
RDPLAB_AZ_SUBSCRIPTION and RDPLAB_AZ_CA_FILE are set (tests set them from the lab's state); otherwise it fails as the
CLI does before `az login`. The active cloud is RDPLAB_AZ_CLOUD (AzureCloud by default: with the lab's proxy the lab
answers as public Azure). Each invocation's arguments are appended to RDPLAB_AZ_LOG when set. docs/lab.md, "The Azure
cloud".
"""

import datetime
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request

SETTINGS = ("ENDPOINT", "TENANT", "CLIENT_ID", "SECRET", "SUBSCRIPTION", "CA_FILE")


def fail(message: str, code: int = 1) -> None:
    sys.stderr.write(message + "\n")
    sys.exit(code)


def option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def main(args: list[str]) -> None:
    settings = {name: os.environ.get("RDPLAB_AZ_" + name) for name in SETTINGS}
    log = os.environ.get("RDPLAB_AZ_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(args) + "\n")
    if args[:2] == ["cloud", "show"]:
        name = os.environ.get("RDPLAB_AZ_CLOUD", "AzureCloud")
        print(json.dumps(name if option(args, "--query") == "name" else {"name": name, "isActive": True}, indent=2))
        return
    if args[:2] not in (["account", "get-access-token"], ["account", "show"]):
        fail(f"ERROR: the lab's az stand-in does not implement: az {' '.join(args)}", 2)
    if not all(settings.values()):
        fail("ERROR: Please run 'az login' to setup account.")
    if args[:2] == ["account", "show"]:
        account = {"id": settings["SUBSCRIPTION"], "tenantId": settings["TENANT"], "isDefault": True}
        print(json.dumps(account["id"] if option(args, "--query") == "id" else account, indent=2))
        return
    resource = option(args, "--resource")
    scope = option(args, "--scope")
    if not resource and not scope:
        fail("ERROR: the stand-in needs --resource or --scope", 2)
    tenant = option(args, "--tenant") or settings["TENANT"]
    form = urllib.parse.urlencode(
        {
            "grant_type": "client_credentials",
            "client_id": settings["CLIENT_ID"],
            "client_secret": settings["SECRET"],
            "scope": scope or resource.rstrip("/") + "/.default",
        }
    ).encode("ascii")
    request = urllib.request.Request(f"{settings['ENDPOINT']}/{tenant}/oauth2/v2.0/token", data=form, method="POST")
    context = ssl.create_default_context(cafile=settings["CA_FILE"])
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            token = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}")
        fail(f"ERROR: {detail.get('error_description') or detail.get('error') or exc}")
    expires = int(datetime.datetime.now().timestamp()) + int(token["expires_in"])
    print(
        json.dumps(
            {
                "accessToken": token["access_token"],
                "expiresOn": datetime.datetime.fromtimestamp(expires).strftime("%Y-%m-%d %H:%M:%S.%f"),
                "expires_on": expires,
                "subscription": option(args, "--subscription") or settings["SUBSCRIPTION"],
                "tenant": tenant,
                "tokenType": "Bearer",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
