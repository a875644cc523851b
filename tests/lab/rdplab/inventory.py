"""The Ansible inventory of a running lab: every host reachable over WinRM HTTPS with Basic authentication."""

from __future__ import annotations

import typing as t
from pathlib import Path

import yaml

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost

# Short timeouts: a lab host answers in milliseconds, so a hang means a bug and should fail the run quickly. The lab
# answers a waiting Receive before the operation timeout, so long agent operations still work (the client polls).
CONNECTION_VARS: dict[str, t.Any] = {
    "ansible_connection": "winrm",
    "ansible_port": 5986,
    "ansible_winrm_scheme": "https",
    "ansible_winrm_transport": "basic",
    # The HTTPS listener presents a throwaway self-signed certificate generated when the lab starts.
    "ansible_winrm_server_cert_validation": "ignore",
    "ansible_winrm_operation_timeout_sec": 5,
    "ansible_winrm_read_timeout_sec": 10,
}


def inventory_document(entries: t.Sequence[tuple[WindowsHost, str, int | None]]) -> dict[str, t.Any]:
    """entries: (host, address, the listener's RDP port - open or not - or None when unknown) in fleet order."""
    windows_hosts: dict[str, dict[str, t.Any]] = {}
    groups: dict[str, dict[str, t.Any]] = {}
    for host, address, rdp_port in entries:
        host_vars: dict[str, t.Any] = {
            "ansible_host": address,
            "ansible_user": host.username,
            "ansible_password": host.password,
        }
        if rdp_port is not None:
            host_vars["rdpfix_server_rdp_port"] = rdp_port
        windows_hosts[host.name] = host_vars
        for group in host.groups:
            if group in ("all", "ungrouped", "windows"):
                continue
            groups.setdefault(group, {"hosts": {}})["hosts"][host.name] = None
    children: dict[str, t.Any] = {"windows": {"hosts": windows_hosts, "vars": dict(CONNECTION_VARS)}}
    children.update(sorted(groups.items()))
    return {"all": {"children": children}}


def write_inventory(path: Path, entries: t.Sequence[tuple[WindowsHost, str, int | None]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Written by `rdplab up`: the simulated fleet on loopback. Regenerated on every start.\n"
    body = yaml.safe_dump(inventory_document(entries), sort_keys=False, default_flow_style=False)
    path.write_text(header + body, encoding="utf-8")
