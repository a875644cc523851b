"""fix_rdp.yml and audit_rdp.yml over every transport Ansible reaches Windows with, against one shared lab fleet.

One host per transport, in one inventory: WinRM over HTTP with NTLM and message encryption (``winrm_ntlm``), WinRM
over HTTPS with Basic (``winrm_https``, the lab's default), PowerShell Remoting over HTTP with Negotiate/NTLM and
message encryption (``psrp``), and Windows OpenSSH with PowerShell as the shell and a key (``ssh``). Each host has the
same fault (an expired self-signed RDP certificate). Four playbook runs serve every assertion: check mode, apply,
rerun, audit. Selecting a transport's marker (``-m psrp``) starts only that transport's host.

The lab counts, per host, every command by the way it arrived (``commands_by_channel``): the assertions prove that
each host's batches really travelled over its transport, sealed where the transport seals.
"""

from __future__ import annotations

import json
import typing as t
from pathlib import Path

import pytest
import yaml
from harness import HOSTS_DIR, Lab, PlaybookRun, run_playbook, start_lab

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import probe
from rdplab.inventory import transport_vars

pytestmark = pytest.mark.system

# transport -> (inventory host name, the channel every command must arrive on)
HOSTS: dict[str, tuple[str, str]] = {
    "winrm_ntlm": ("via-winrm-ntlm", "winrs/http/negotiate/sealed"),
    "winrm_https": ("via-winrm-https", "winrs/https/basic"),
    "psrp": ("via-psrp", "psrp/http/negotiate/sealed"),
    "ssh": ("via-ssh", "ssh/publickey"),
}
# The transports whose host runs everything with become: true / become_user: SYSTEM.
BECOME_SYSTEM = ("psrp",)
TRANSPORT_PARAMS = [
    pytest.param("winrm_ntlm", marks=pytest.mark.winrm_ntlm, id="winrm_ntlm"),
    pytest.param("winrm_https", id="winrm_https"),
    pytest.param("psrp", marks=pytest.mark.psrp, id="psrp"),
    pytest.param("ssh", marks=pytest.mark.ssh, id="ssh"),
]


class Runs(t.NamedTuple):
    lab: Lab
    check: PlaybookRun
    apply: PlaybookRun
    rerun: PlaybookRun
    audit: PlaybookRun
    # Per host after each run: counters and commands by channel (counters zeroed before each run).
    after: dict[str, dict[str, dict[str, t.Any]]]
    report_dir: Path


def _selected_transports(session: pytest.Session, module: str) -> list[str]:
    chosen = {
        item.callspec.params["transport"]
        for item in session.items
        if item.module is not None and item.module.__name__ == module and hasattr(item, "callspec")
    }
    return [name for name in HOSTS if name in chosen]


def _host_files(directory: Path, transports: list[str]) -> list[Path]:
    """The same broken host once per transport, each with its own name and NetBIOS name."""
    template = yaml.safe_load((HOSTS_DIR / "expired-selfsigned.yml").read_text(encoding="utf-8"))
    files = []
    for position, transport in enumerate(transports):
        name = HOSTS[transport][0]
        document = dict(template, name=name, description=f"expired self-signed certificate, reached over {transport}")
        document["system"] = dict(template.get("system") or {}, hostname=f"VIA{position:02d}")
        path = directory / f"{name}.yml"
        path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        files.append(path)
    return files


def _transport_inventory(lab: Lab, transports: list[str]) -> None:
    """Rewrite the lab's inventory: each host with its transport's connection variables."""
    state_file = json.loads((lab.state_dir / "state.json").read_text(encoding="utf-8"))
    document = yaml.safe_load(lab.inventory.read_text(encoding="utf-8"))
    windows = document["all"]["children"]["windows"]
    windows["vars"] = {}
    for transport in transports:
        name = HOSTS[transport][0]
        info = state_file["hosts"][name]
        windows["hosts"][name].update(
            transport_vars(transport, ssh_port=info.get("ssh_port"), ssh=state_file.get("ssh")),
        )
        if transport == "winrm_https":
            windows["hosts"][name]["ansible_winrm_server_cert_validation"] = "ignore"
        if transport in BECOME_SYSTEM:
            # Every task of fix_rdp.yml and audit_rdp.yml on this host runs as SYSTEM (runas), as a user would set it.
            windows["hosts"][name].update(
                {"ansible_become": True, "ansible_become_method": "runas", "ansible_become_user": "SYSTEM"}
            )
    lab.inventory.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")


def _snapshot(lab: Lab) -> dict[str, dict[str, t.Any]]:
    state = lab.state()
    return {
        name: {
            "counters": host["counters"],
            "channels": host.get("commands_by_channel", {}),
            "identities": host.get("batch_identities", []),
        }
        for name, host in state.items()
    }


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[Runs]:
    transports = _selected_transports(request.session, request.module.__name__)
    directory = tmp_path_factory.mktemp("transports")
    lab = start_lab(directory, _host_files(directory, transports))
    try:
        _transport_inventory(lab, transports)
        report_dir = directory / "reports"
        after: dict[str, dict[str, dict[str, t.Any]]] = {}
        results: dict[str, PlaybookRun] = {}
        steps = [
            ("check", "playbooks/fix_rdp.yml", {"check": True}),
            ("apply", "playbooks/fix_rdp.yml", {}),
            ("rerun", "playbooks/fix_rdp.yml", {}),
            ("audit", "playbooks/audit_rdp.yml", {"extra_vars": {"rdpfix_audit_report_dir": str(report_dir)}}),
        ]
        for step, playbook, options in steps:
            # Counters start from zero for each run; commands by channel accumulate and are compared as differences.
            lab.reset_counters()
            results[step] = run_playbook(playbook, lab.inventory, **options)
            after[step] = _snapshot(lab)
        yield Runs(lab, results["check"], results["apply"], results["rerun"], results["audit"], after, report_dir)
    finally:
        lab.down()


def _channels_of(runs: Runs, step: str, previous: str | None, host: str) -> dict[str, int]:
    now = runs.after[step][host]["channels"]
    before = runs.after[previous][host]["channels"] if previous else {}
    return {channel: count - before.get(channel, 0) for channel, count in now.items() if count - before.get(channel, 0)}


def tls_handshake_ok(lab: Lab, host: str) -> bool:
    """What a client sees: does the host's RDP port complete a TLS handshake?"""
    report = probe(lab.address(host), 3389, checks=["tcp", "negotiation", "tls"], tls_versions=["TLSv1.2"])
    return bool(report["connectable"]) and bool((report["tls"] or {}).get("accepted_versions"))


@pytest.mark.parametrize("transport", TRANSPORT_PARAMS)
def test_fix_rdp_check_apply_rerun(runs: Runs, transport: str) -> None:
    host, channel = HOSTS[transport]
    # Check mode predicts the repair and writes nothing.
    assert runs.check.rc == 0, runs.check.stdout + runs.check.stderr
    assert host in runs.check.changed_hosts()
    assert runs.after["check"][host]["counters"]["writes"] == 0
    # The real run repairs it: written, and a TLS handshake with the RDP port succeeds from outside.
    assert runs.apply.rc == 0, runs.apply.stdout + runs.apply.stderr
    assert host in runs.apply.changed_hosts()
    assert runs.after["apply"][host]["counters"]["writes"] > 0
    assert tls_handshake_ok(runs.lab, host)
    # The rerun changes nothing and writes nothing.
    assert runs.rerun.rc == 0, runs.rerun.stdout + runs.rerun.stderr
    assert host not in runs.rerun.changed_hosts()
    assert runs.rerun.stats[host]["failures"] == 0
    assert runs.after["rerun"][host]["counters"]["writes"] == 0
    # Every command of every run arrived over this host's transport, and only over it.
    commands = {step: runs.after[step][host]["counters"]["winrm_commands"] for step in ("check", "apply", "rerun")}
    assert all(count > 0 for count in commands.values()), commands
    assert _channels_of(runs, "check", None, host) == {channel: commands["check"]}
    assert _channels_of(runs, "apply", "check", host) == {channel: commands["apply"]}
    assert _channels_of(runs, "rerun", "apply", host) == {channel: commands["rerun"]}


@pytest.mark.parametrize("transport", TRANSPORT_PARAMS)
def test_audit_rdp(runs: Runs, transport: str) -> None:
    host, channel = HOSTS[transport]
    assert runs.audit.rc == 0, runs.audit.stdout + runs.audit.stderr
    assert runs.audit.stats[host]["failures"] == 0
    assert runs.audit.stats[host].get("unreachable", 0) == 0
    assert runs.after["audit"][host]["counters"]["writes"] == 0
    report = json.loads((runs.report_dir / "report.json").read_text(encoding="utf-8"))
    assert host in json.dumps(report)
    audited = runs.after["audit"][host]["counters"]["winrm_commands"]
    assert audited > 0
    assert _channels_of(runs, "audit", "rerun", host) == {channel: audited}


@pytest.mark.parametrize(
    "transport", [pytest.param(name, marks=[pytest.mark.become, pytest.mark.psrp], id=name) for name in BECOME_SYSTEM]
)
def test_become_system_runs_every_batch_as_system(runs: Runs, transport: str) -> None:
    """fix_rdp.yml (check, apply, rerun) and audit_rdp.yml with become_user SYSTEM: the lab checked Ansible's runas
    wrapper in every payload and ran each batch with SYSTEM's token; the other hosts ran as the login user."""
    host = HOSTS[transport][0]
    every = [name for step in ("check", "apply", "rerun", "audit") for name in runs.after[step][host]["identities"]]
    assert every and set(every) == {"NT AUTHORITY\\SYSTEM"}
    assert runs.apply.stats[host]["failures"] == 0 and host in runs.apply.changed_hosts()
    for other, _channel in HOSTS.values():
        if other != host and other in runs.after["audit"]:
            assert "NT AUTHORITY\\SYSTEM" not in runs.after["audit"][other]["identities"]
