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


# How a host is reached over each transport the lab serves (docs/lab.md, "Transports"); CONNECTION_VARS above is
# "winrm_https". "ssh" needs the lab's SSH files (state.json "ssh": private_key, known_hosts) and the host's SSH port.
TRANSPORTS = ("winrm_https", "winrm_ntlm", "psrp", "ssh")


def transport_vars(
    transport: str, *, ssh_port: int | None = None, ssh: dict[str, str] | None = None
) -> dict[str, t.Any]:
    """The connection variables of one lab host reached over ``transport`` (one of TRANSPORTS)."""
    if transport == "winrm_https":
        return dict(CONNECTION_VARS)
    if transport == "winrm_ntlm":
        # WinRM's default for a workgroup server: HTTP on 5985, NTLM, messages sealed (message_encryption auto).
        return {
            "ansible_connection": "winrm",
            "ansible_port": 5985,
            "ansible_winrm_scheme": "http",
            "ansible_winrm_transport": "ntlm",
            "ansible_winrm_operation_timeout_sec": 5,
            "ansible_winrm_read_timeout_sec": 10,
        }
    if transport == "psrp":
        # pypsrp over HTTP with Negotiate (NTLM here) and message encryption, the psrp connection's defaults but port.
        return {
            "ansible_connection": "psrp",
            "ansible_port": 5985,
            "ansible_psrp_protocol": "http",
            "ansible_psrp_auth": "negotiate",
            "ansible_psrp_operation_timeout": 5,
            "ansible_psrp_read_timeout": 10,
        }
    if transport == "ssh":
        if ssh is None or ssh_port is None:
            raise ValueError("the ssh transport needs the lab's SSH files and the host's SSH port")
        return {
            "ansible_connection": "ssh",
            "ansible_shell_type": "powershell",
            "ansible_port": ssh_port,
            "ansible_ssh_private_key_file": ssh["private_key"],
            # The lab's host keys are known: check them, as against any server (also where host key checking is
            # turned off for the run, as the system tests' environment does).
            "ansible_ssh_host_key_checking": True,
            "ansible_ssh_common_args": f"-o UserKnownHostsFile={ssh['known_hosts']} -o StrictHostKeyChecking=yes",
        }
    raise ValueError(f"unknown transport {transport!r}; choose one of {', '.join(TRANSPORTS)}")
