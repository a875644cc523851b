"""The roles end to end: playbooks/fix_rdp.yml (role rdpfix.rdp.rdpfix_server) over every ready host file, the reboot
through ansible.windows.win_reboot, and the client role, all through Ansible's winrm connection against the lab.

One lab holds every host file of tests/lab/hosts. It is audited (check mode), repaired, and repaired again; each
step's lab state is kept so that the assertions below compare the real state of every host before and after:
check mode writes nothing, every fault the role fixes by default is fixed (an RDP client completes a TLS 1.2
handshake), the faults it must not fix by default are reported, a second run changes nothing, and no run ever leaves
a host with a weaker setting than it found.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import typing as t
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from harness import BIN, HOSTS_DIR, ROOT, Lab, PlaybookRun, ansible_env, run_playbook, start_lab
from role_results import APPLY_TASK, results_of

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import probe

pytestmark = pytest.mark.system

ALL_HOSTS = sorted(path.stem for path in HOSTS_DIR.glob("*.yml"))
CLIENTS = [name for name in ALL_HOSTS if name.startswith("client-")]
SERVERS = [name for name in ALL_HOSTS if name not in CLIENTS]
SERVERS_ONLY = "all:!rdp_clients"

# What an administrator opts into per host after reading the audit: these faults need a choice the role does not
# make by default (regenerating a key destroys the old one; the transport policy is a site decision).
OPT_INS: dict[str, dict[str, t.Any]] = {
    "machinekeys-rdp-key-empty": {"rdpfix_server_machinekeys_strategy": "regenerate"},
    "transport-udp-vpn": {"rdpfix_server_transport_mode": "tcp_only"},
    # Re-pinning the auto-enrolled renewal (and granting NETWORK SERVICE read on its key) is the administrator's call.
    "pinned-expired-renewal": {"rdpfix_server_certificate_repin_renewal": True},
    # Asked to re-pin a renewal that has no private key on the host: the certificate module refuses.
    "pinned-expired-renewal-no-key": {"rdpfix_server_certificate_repin_renewal": True},
    # The cipher-suite order is a Group Policy value: rewriting it is the administrator's call (override_policy).
    "tls-cipher-incompatible": {"rdpfix_server_tls_override_policy": True},
    "combined-all": {"rdpfix_server_tls_override_policy": True},
    # fDenyTSConnections is no module's to change: the final verification fails this host (test_promises.py shows
    # it); here the verification is turned off, as an administrator who knows would.
    "verify-connections-denied": {"rdpfix_server_verify": False},
}
# Explicit options that let the role write values under HKLM:\SOFTWARE\Policies, and the values each one owns.
POLICY_OPTIONS: dict[str, set[tuple[str, str]]] = {
    "rdpfix_server_transport_mode": {
        ("HKLM:\\SOFTWARE\\Policies\\Microsoft\\Windows NT\\Terminal Services", "SelectTransport")
    },
    "rdpfix_server_tls_override_policy": {
        ("HKLM:\\SOFTWARE\\Policies\\Microsoft\\Windows NT\\Terminal Services", "SecurityLayer"),
        ("HKLM:\\SOFTWARE\\Policies\\Microsoft\\Windows NT\\Terminal Services", "UserAuthentication"),
        ("HKLM:\\SOFTWARE\\Policies\\Microsoft\\Cryptography\\Configuration\\SSL\\00010002", "Functions"),
    },
}
# The client role is applied to a workstation on purpose, and its transport policy (rdpfix_client_transport_mode,
# tcp_only by default) is what it is for: the one policy value it writes.
POLICY_OPTIONS["rdpfix_client_transport_mode"] = {
    ("HKLM:\\SOFTWARE\\Policies\\Microsoft\\Windows NT\\Terminal Services\\Client", "fClientDisableUDP")
}
CLIENT_ROLE_OPTIONS = ("rdpfix_client_transport_mode",)
# Hosts whose Schannel repair needs a reboot that waits, because users are on them and the fleet run does not allow
# session disruption; whether an RDP client connects meanwhile.
WAITS_FOR_SESSIONS: dict[str, bool] = {
    "sessions-tls12-disabled": False,
    "sessions-disconnected-tls13-disabled": True,
    "sessions-firewall-tls12": False,
}
# Hosts that stay unreachable for a client after the run for a cause no fixing module reports (the audit does).
NOT_A_MODULE_FAULT = {"verify-connections-denied": "service.connections_denied"}
# Where a module's run refuses (fails the host and changes nothing), with the finding by which the audit predicts it
# and whether an RDP client still connects afterwards. The role stops at the refusal on that host, in check mode too.
REFUSED: dict[str, tuple[str, str, bool]] = {
    # host: (module, refusal finding id, still connects)
    "machinekeys-rdp-key-empty-folder-acl": ("rdpfix.rdp.machinekeys", "machinekeys.repair_refused", False),
    "pinned-expired-renewal-no-key": ("rdpfix.rdp.certificate", "certificate.plan_refused", True),
}
REFUSAL_IDS = {
    "rdpfix.rdp.machinekeys": "machinekeys.repair_refused",
    "rdpfix.rdp.certificate": "certificate.plan_refused",
    "rdpfix.rdp.firewall": "firewall.plan_refused",
}
# Faults the role reports but, by default, leaves alone (module documentation), with the finding that must say so.
# The value says whether an RDP client still connects (the listener falls back to its self-signed certificate).
REPORTED_ONLY: dict[str, tuple[str, str, bool]] = {
    # host: (task summary key, finding id, still connects)
    "firewall-block-rule": ("firewall", "firewall.block_rule_tcp", False),
    "connection-broker": ("certificate", "certificate.pinned_missing", True),
    "pinned-expired": ("certificate", "certificate.pinned_expired", True),
    "pinned-wrong-eku": ("certificate", "certificate.pinned_wrong_eku", True),
    "pinned-no-private-key": ("certificate", "certificate.pinned_no_private_key", True),
    "pinned-expiring-renewal": ("certificate", "certificate.pinned_renewal_available", True),
    # Group Policy values: reported as enforced by policy, changed only with rdpfix_server_tls_override_policy.
    "combined-seclayer-cipher": ("tls", "tls.cipher_suites_empty", False),
    "policy-security-layer-nla": ("tls", "tls.security_layer_rdp_policy", False),
    "policy-security-layer-both": ("tls", "tls.security_layer_rdp_policy", False),
    "policy-nla-listener-layer": ("tls", "tls.nla_disabled_policy", True),
    # A Public network outside the profiles the role is asked to open: the cause is named, nothing opened.
    "firewall-public-profile": ("firewall", "firewall.rdp_tcp_blocked_active_profile", False),
    "firewall-public-scoped": ("firewall", "firewall.rdp_tcp_blocked_active_profile", False),
    "firewall-public-moved-port": ("firewall", "firewall.rdp_tcp_blocked_active_profile", False),
}
TASKS = {
    # The concerns: one result each, shown by the role's last loop (role_results.results_of).
    "machinekeys": "machinekeys",
    "certificate": "certificate",
    "firewall": "firewall",
    "transport": "transport",
    "tls": "tls",
    # The repair task's reboot, shown as an item of the results loop (role_results.results_of).
    "reboot": "reboot",
}
# The module each fixing task of the role runs, and the audit's facts task (roles/rdpfix_server/tasks/audit.yml).
MODULE_TASKS = {
    "rdpfix.rdp.machinekeys": TASKS["machinekeys"],
    "rdpfix.rdp.certificate": TASKS["certificate"],
    "rdpfix.rdp.firewall": TASKS["firewall"],
    "rdpfix.rdp.transport": TASKS["transport"],
    "rdpfix.rdp.tls": TASKS["tls"],
}
# What the role's tasks run each module with, by default (roles/rdpfix_server/defaults, tasks/*.yml, and the module
# defaults for options the role does not pass); OPT_INS change some per host. A fix whose options all agree is made by
# the role.
ROLE_MODULE_ARGS: dict[str, dict[str, t.Any]] = {
    "rdpfix.rdp.machinekeys": {"strategy": "permissions", "restart_service": "SessionEnv"},
    "rdpfix.rdp.certificate": {
        "expiry_threshold_days": 30,
        "restart_service": "SessionEnv",
        "replace_when": "unusable",
        "regenerate_self_signed": True,
        "remove_missing_pin": True,
        "repin_renewal": False,
    },
    "rdpfix.rdp.firewall": {
        "profiles": ["Domain", "Private"],
        "sides": ["server"],
        "allow_public_any": False,
        "disable_blocking_rules": False,
        "udp": True,
    },
    "rdpfix.rdp.transport": {"mode": "keep", "sides": ["server"]},
    "rdpfix.rdp.tls": {
        "legacy_protocols": [],
        "nla": "enabled",
        "enable_tls12": True,
        "enable_tls13": True,
        "restore_security_layer": True,
        "restore_cipher_suites": True,
        "override_policy": False,
    },
}
OPT_IN_ARGS = {
    "rdpfix_server_machinekeys_strategy": ("rdpfix.rdp.machinekeys", "strategy"),
    "rdpfix_server_transport_mode": ("rdpfix.rdp.transport", "mode"),
    "rdpfix_server_certificate_repin_renewal": ("rdpfix.rdp.certificate", "repin_renewal"),
    "rdpfix_server_tls_override_policy": ("rdpfix.rdp.tls", "override_policy"),
}


def role_makes(host: str, fix: dict[str, t.Any]) -> bool:
    """Whether the role, with the host's opt-ins, runs the fix's module with the options the fix names."""
    args = dict(ROLE_MODULE_ARGS[fix["module"]])
    for variable, value in OPT_INS.get(host, {}).items():
        module, option = OPT_IN_ARGS.get(variable, ("(no module)", ""))
        if module == fix["module"]:
            args[option] = value
    return all(args.get(option, "(not set)") == value for option, value in (fix["options"] or {}).items())


FACTS_TASK = "rdpfix.rdp.rdpfix_server : Gather Remote Desktop facts and findings (one WinRM command, read-only)"
CLIENT_TASKS = {
    "firewall": "rdpfix.rdp.rdpfix_client : Check the client's firewall rules and security products",
    "transport": "rdpfix.rdp.rdpfix_client : Set the client's RDP transport policy",
}

RDP_TCP = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations\\RDP-Tcp"
POLICY = "HKLM:\\SOFTWARE\\Policies\\Microsoft\\Windows NT\\Terminal Services"
SCHANNEL = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\SecurityProviders\\SCHANNEL\\Protocols"
WEAK = ("SSL 2.0", "SSL 3.0", "TLS 1.0", "TLS 1.1")
PUBLIC = 4


# -- reading lab snapshots -----------------------------------------------------------------------------------------


def reg_value(snapshot: dict[str, t.Any], path: str, name: str) -> t.Any:
    """A registry value from a host snapshot (paths and names are case-insensitive, as on Windows)."""
    for key_path, values in snapshot["registry"].items():
        if key_path.casefold() == path.casefold():
            for value_name, value in values.items():
                if value_name.casefold() == name.casefold():
                    return value["value"]
    return None


def weak_protocols_on(snapshot: dict[str, t.Any]) -> set[str]:
    """SSL/TLS 1.0/1.1 the Schannel server would negotiate after a boot (registry, else the build default)."""
    found = set()
    for protocol in WEAK:
        path = f"{SCHANNEL}\\{protocol}\\Server"
        enabled, disabled_by_default = (
            reg_value(snapshot, path, "Enabled"),
            reg_value(snapshot, path, "DisabledByDefault"),
        )
        if enabled == 0 or disabled_by_default == 1:
            continue
        if enabled is not None or protocol.startswith("TLS"):
            found.add(protocol)
    return found


def listener_values(snapshot: dict[str, t.Any], name: str) -> dict[str, int | None]:
    """SecurityLayer or UserAuthentication: the RDP-Tcp value, the policy value, and the one in effect (policy wins)."""
    listener, policy = reg_value(snapshot, RDP_TCP, name), reg_value(snapshot, POLICY, name)
    return {"listener": listener, "policy": policy, "effective": policy if policy is not None else listener}


def covers(outer: list[str], inner: list[str]) -> bool:
    """Every address range of ``inner`` lies within ``outer`` (Any covers everything)."""
    if any(item.lower() in ("any", "*") for item in outer):
        return True
    if any(item.lower() in ("any", "*") for item in inner):
        return False
    outer_nets = [ipaddress.ip_network(item, strict=False) for item in outer]
    return all(any(ipaddress.ip_network(item, strict=False).subnet_of(net) for net in outer_nets) for item in inner)


def rules(snapshot: dict[str, t.Any]) -> dict[str, dict[str, t.Any]]:
    return {rule["name"]: rule for rule in snapshot["firewall"]["rules"]}


def open_on_public_to_any(rule: dict[str, t.Any]) -> bool:
    return (
        rule["enabled"]
        and rule["direction"] == "Inbound"
        and rule["action"] == "Allow"
        and (rule["profiles"] == 0 or bool(rule["profiles"] & PUBLIC))
        and any(address.lower() in ("any", "*") for address in rule["remote_addresses"])
    )


def rdp_port(snapshot: dict[str, t.Any]) -> int:
    return int(reg_value(snapshot, RDP_TCP, "PortNumber") or 3389)


def connects(address: str, snapshot: dict[str, t.Any]) -> bool:
    """What a current RDP client meets: TCP, X.224 negotiation and a TLS 1.2 handshake with the listener."""
    report = probe(address, rdp_port(snapshot), checks=["tcp", "negotiation", "tls"], tls_versions=["TLSv1.2"])
    # connectable also counts a connection after a certificate prompt (an expired or untrusted certificate).
    return report["connectable"] is True and "TLSv1.2" in ((report["tls"] or {}).get("accepted_versions") or [])


def states(lab: Lab, zero_counters: bool = False) -> dict[str, dict[str, t.Any]]:
    """Every host's address, ports and snapshot (its counters included); optionally zero the counters afterwards."""
    command = [str(BIN / "rdplab"), "state", "--state-dir", str(lab.state_dir)]
    if zero_counters:
        command.append("--reset-counters")
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120, env=ansible_env())
    return t.cast(dict[str, dict[str, t.Any]], json.loads(done.stdout))


def snapshots(lab: Lab, zero_counters: bool = False) -> dict[str, dict[str, t.Any]]:
    return {name: state["snapshot"] for name, state in states(lab, zero_counters).items()}


def counters(snapshot_set: dict[str, dict[str, t.Any]], name: str = "writes") -> dict[str, int]:
    return {host: snapshot["counters"][name] for host, snapshot in snapshot_set.items()}


def without(snapshot: dict[str, t.Any], *parts: str) -> dict[str, t.Any]:
    return {key: value for key, value in snapshot.items() if key not in parts}


def finding_ids(result: dict[str, t.Any]) -> set[str]:
    return {item["id"] for item in result.get("findings") or []}


def refused_module(run: PlaybookRun, name: str) -> str | None:
    """The module whose task failed the host in a fix run (the role stops there), or None."""
    for module, task in MODULE_TASKS.items():
        if results_of(run, task).get(name, {}).get("failed"):
            return module
    return None


def audit_refusal(facts: dict[str, t.Any]) -> str | None:
    """The first module, in the role's order, whose run the audit says refuses on the host, or None."""
    found = finding_ids(facts)
    return next((module for module in MODULE_TASKS if REFUSAL_IDS.get(module) in found), None)


def failed_hosts(run: PlaybookRun) -> set[str]:
    return {host for host, stat in run.stats.items() if stat.get("failures", 0) or stat.get("unreachable", 0)}


# -- the fleet run -------------------------------------------------------------------------------------------------


@dataclass
class FleetRuns:
    """The three runs over the whole lab and the lab's state after each (counters: those of the run before)."""

    lab: Lab
    before: dict[str, dict[str, t.Any]]
    audit: PlaybookRun
    check: PlaybookRun
    after_check: dict[str, dict[str, t.Any]]
    apply: PlaybookRun
    after_apply: dict[str, dict[str, t.Any]]
    rerun: PlaybookRun
    after_rerun: dict[str, dict[str, t.Any]]
    connects_before: dict[str, bool] = field(default_factory=dict)
    connects_after: dict[str, bool] = field(default_factory=dict)


def with_opt_ins(lab: Lab) -> None:
    """Write the per-host opt-ins into the lab's inventory as host variables."""
    inventory = yaml.safe_load(lab.inventory.read_text())
    hosts = inventory["all"]["children"]["windows"]["hosts"]
    for host, variables in OPT_INS.items():
        hosts[host].update(variables)
    lab.inventory.write_text(yaml.safe_dump(inventory))


def write_site_playbook(path: Path) -> Path:
    """fix_rdp.yml for the servers, then the client role for the workstations, in one ansible-playbook run."""
    path.write_text(
        yaml.safe_dump(
            [
                {"import_playbook": str(ROOT / "playbooks" / "fix_rdp.yml")},
                {
                    "name": "Client side",
                    "hosts": "rdp_clients",
                    "gather_facts": False,
                    "roles": ["rdpfix.rdp.rdpfix_client"],
                },
            ],
            sort_keys=False,
        )
    )
    return path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetRuns]:
    tmp = tmp_path_factory.mktemp("server-role")
    lab = start_lab(tmp, [HOSTS_DIR / f"{name}.yml" for name in ALL_HOSTS])
    playbook = write_site_playbook(tmp / "site.yml")
    # fix_rdp.yml's plays target rdpfix_hosts: every server; the workstation only gets the client play.
    variables = {"rdpfix_server_allow_reboot": True, "rdpfix_hosts": "windows:!rdp_clients"}
    try:
        with pytest.MonkeyPatch.context() as patch:
            # Every host at once: the lab answers them all, and the run time stays that of one host.
            patch.setitem(os.environ, "ANSIBLE_FORKS", str(len(ALL_HOSTS) + 1))
            with_opt_ins(lab)
            first = states(lab, zero_counters=True)
            address = {name: state["address"] for name, state in first.items()}
            before = {name: state["snapshot"] for name, state in first.items()}
            connects_before = {name: connects(address[name], before[name]) for name in SERVERS}
            audit = run_playbook(
                "playbooks/audit_rdp.yml",
                lab.inventory,
                extra_vars={**variables, "rdpfix_audit_report_dir": str(tmp / "report")},
            )
            check = run_playbook(playbook, lab.inventory, check=True, diff=True, extra_vars=variables)
            after_check = snapshots(lab, zero_counters=True)
            apply = run_playbook(playbook, lab.inventory, extra_vars=variables)
            after_apply = snapshots(lab, zero_counters=True)
            connects_after = {name: connects(address[name], after_apply[name]) for name in SERVERS}
            rerun = run_playbook(playbook, lab.inventory, extra_vars=variables)
            after_rerun = snapshots(lab)
            runs = FleetRuns(lab, before, audit, check, after_check, apply, after_apply, rerun, after_rerun)
            runs.connects_before, runs.connects_after = connects_before, connects_after
        yield runs
    finally:
        lab.down()


def test_every_host_file_is_in_the_fleet(fleet: FleetRuns) -> None:
    assert set(fleet.before) == set(ALL_HOSTS)
    assert CLIENTS, "a client-SKU host file is part of the ready hosts"
    assert {"combined-all", "combined-machinekeys-tls12", "combined-machinekeys-firewall"} <= set(ALL_HOSTS)


def test_check_mode_writes_nothing_and_predicts_the_repair(fleet: FleetRuns) -> None:
    # Check mode fails exactly the hosts the real run fails (the refusals), and nothing else.
    assert failed_hosts(fleet.check) == set(REFUSED), fleet.check.stdout[-3000:] + fleet.check.stderr
    assert counters(fleet.after_check) == dict.fromkeys(ALL_HOSTS, 0)
    for name in ALL_HOSTS:
        before, after = fleet.before[name], fleet.after_check[name]
        # Only the handshake check's own connections may leave RCM/Schannel connection-time events.
        assert without(after, "counters", "events") == without(before, "counters", "events"), name
        new_events = after["events"][len(before["events"]) :]
        assert after["events"][: len(before["events"])] == before["events"], name
        assert {event["provider"] for event in new_events} <= {
            "Microsoft-Windows-TerminalServices-RemoteConnectionManager",
            "Schannel",
        }, name
    # Check mode announces a reboot where the apply run will reboot (or wait), and reboots nothing itself.
    predicted, made = results_of(fleet.check, TASKS["reboot"]), results_of(fleet.apply, TASKS["reboot"])
    assert predicted.keys() == made.keys() != set()
    assert {name: result["rebooted"] for name, result in predicted.items()} == {
        name: result["rebooted"] for name, result in made.items()
    }
    # What check mode says will change is what changes (the diff is shown).
    assert fleet.check.changed_hosts() == fleet.apply.changed_hosts()
    tls = results_of(fleet.check, TASKS["tls"])
    assert all("diff" in result for result in tls.values())


def test_the_audit_and_check_mode_agree_on_every_host_file(fleet: FleetRuns) -> None:
    """audit_rdp.yml, judged with the same role variables, names a fix exactly where fix_rdp.yml --check changes."""
    assert fleet.audit.rc == 0, fleet.audit.stdout[-3000:] + fleet.audit.stderr
    facts = fleet.audit.results(FACTS_TASK)
    assert set(facts) == set(SERVERS)
    fixes = [(name, item) for name, result in facts.items() for item in result["findings"] if item["fix"]]
    # Where the audit predicts a refusal, the role stops at that module: the modules after it do not run there.
    order = list(MODULE_TASKS)
    refusals = {name: audit_refusal(result) for name, result in facts.items()}

    def reached(name: str, module: str) -> bool:
        refused = refusals[name]
        return refused is None or order.index(module) < order.index(refused)

    # A fix that needs options the role does not set (disabling a block rule...) is reported, not made.
    fixed_by_the_role = {
        (name, item["fix"]["module"])
        for name, item in fixes
        if role_makes(name, item["fix"]) and reached(name, item["fix"]["module"])
    }
    needing_options = {(name, item["id"]) for name, item in fixes if not role_makes(name, item["fix"])}
    would_change = {
        (name, module)
        for module, task in MODULE_TASKS.items()
        for name, result in results_of(fleet.check, task).items()
        if result.get("changed")
    }
    assert fixed_by_the_role == would_change
    assert {name for name, _module in would_change} == fleet.check.changed_hosts() - set(CLIENTS)
    assert ("firewall-block-rule", "firewall.block_rule_tcp") in needing_options
    # Both sides see the opt-ins: the transport policy is judged (and fixed) only where the inventory asks for it.
    transport = {name for name, module in would_change if module == "rdpfix.rdp.transport"}
    assert transport == {"transport-udp-vpn"}


def test_refusals_are_predicted_by_the_audit_and_check_mode_on_every_host_file(fleet: FleetRuns) -> None:
    """audit == fix_rdp.yml --check == the real run, refusals included: the audit names the refusal, check mode fails
    the host in the same module with the same message, the real run too, and it changes nothing there."""
    facts = fleet.audit.results(FACTS_TASK)
    for name in SERVERS:
        predicted = audit_refusal(facts[name])
        assert predicted == refused_module(fleet.check, name) == refused_module(fleet.apply, name), name
        assert predicted == refused_module(fleet.rerun, name), f"{name}: a refusal stays a refusal"
        assert predicted == (REFUSED[name][0] if name in REFUSED else None), name
    assert failed_hosts(fleet.apply) == failed_hosts(fleet.rerun) == set(REFUSED)
    for name, (module, finding, _connects) in REFUSED.items():
        check, real = (results_of(run, MODULE_TASKS[module])[name] for run in (fleet.check, fleet.apply))
        assert check["msg"] == real["msg"] and "nothing was changed" in real["msg"], (check["msg"], real["msg"])
        assert finding in finding_ids(check) and finding in finding_ids(real)
        assert real["changed"] is False and not real.get("backup"), f"{name}: a refusal changes nothing"
    # The issue's own case: a deleted RDP key and a reset folder ACL are repaired by machinekeys and the certificate
    # module together, as check mode said.
    for name in ("machinekeys-rdp-key-deleted-folder-acl", "machinekeys-rdp-key-deleted-legacy"):
        for module in ("rdpfix.rdp.machinekeys", "rdpfix.rdp.certificate"):
            check, real = (results_of(run, MODULE_TASKS[module])[name] for run in (fleet.check, fleet.apply))
            assert not check.get("failed") and not real.get("failed"), (name, module, real.get("msg"))
            assert check["changed"] == real["changed"], (name, module)
        assert fleet.connects_after[name], name


def test_the_auto_enrolled_renewal_is_pinned_where_asked(fleet: FleetRuns) -> None:
    name = "pinned-expired-renewal"
    facts = fleet.audit.results(FACTS_TASK)[name]
    [renewal] = [item for item in facts["findings"] if item["id"] == "certificate.pinned_renewal_available"]
    thumbprint = renewal["evidence"]["renewal"]["thumbprint"]
    # Judged with the host's opt-in, the audit's fix is the run's own (options {}), as check mode's.
    assert renewal["fix"]["module"] == "rdpfix.rdp.certificate" and renewal["fix"]["options"] == {}
    real = results_of(fleet.apply, TASKS["certificate"])[name]
    assert [action["action"] for action in real["actions"]] == ["grant_key_read", "set_pin"]
    pin = reg_value(fleet.after_apply[name], RDP_TCP, "SSLCertificateSHA1Hash")
    assert str(pin).replace(" ", "").upper() == thumbprint, pin
    assert fleet.connects_after[name]
    assert not results_of(fleet.rerun, TASKS["certificate"])[name]["changed"]


def test_every_fault_is_repaired_unless_the_role_only_reports_it(fleet: FleetRuns) -> None:
    assert failed_hosts(fleet.apply) == set(REFUSED), fleet.apply.stdout[-3000:] + fleet.apply.stderr
    broken_before = {name for name, ok in fleet.connects_before.items() if not ok}
    # The ready hosts really are broken for a client (one cause or several), except the healthy ones and the faults
    # that are not connection failures (policy, pinned certificates the listener falls back from).
    assert {"combined-all", "combined-machinekeys-tls12", "combined-machinekeys-firewall"} <= broken_before
    assert "healthy" not in broken_before
    for name in SERVERS:
        expected = REPORTED_ONLY[name][2] if name in REPORTED_ONLY else REFUSED[name][2] if name in REFUSED else True
        expected = WAITS_FOR_SESSIONS.get(name, expected) and name not in NOT_A_MODULE_FAULT
        assert fleet.connects_after[name] is expected, f"{name}: connects={fleet.connects_after[name]}"


def test_faults_left_by_default_are_reported_not_passed(fleet: FleetRuns) -> None:
    for name, (task, finding, _connects) in REPORTED_ONLY.items():
        result = results_of(fleet.apply, TASKS[task])[name]
        assert finding in finding_ids(result), (name, finding_ids(result))
        rerun = results_of(fleet.rerun, TASKS[task])[name]
        assert finding in finding_ids(rerun), f"{name}: the finding must stay reported on every run"
    block = rules(fleet.after_apply["firewall-block-rule"])["Block-Legacy-Admin-Ports"]
    assert block["enabled"], "a block rule is disabled only with rdpfix_server_firewall_disable_blocking_rules"


def test_security_settings_are_fixed_on_every_server(fleet: FleetRuns) -> None:
    for name in SERVERS:
        before, after = fleet.before[name], fleet.after_apply[name]
        override = OPT_INS.get(name, {}).get("rdpfix_server_tls_override_policy", False)
        for setting, good in (("SecurityLayer", 2), ("UserAuthentication", 1)):
            if listener_values(before, setting)["policy"] == 0 and not override:
                # Enforced by Group Policy: reported, left as the policy says (test_no_policy_value_is_written...).
                assert listener_values(after, setting)["effective"] == 0, (name, setting)
                assert listener_values(after, setting)["listener"] in (None, good), (name, setting)
            else:
                assert listener_values(after, setting)["effective"] in (None, good), (name, setting)
    assert reg_value(fleet.after_apply["transport-udp-vpn"], POLICY, "SelectTransport") == 1
    assert reg_value(fleet.after_apply["healthy"], POLICY, "SelectTransport") is None, "transport mode keep by default"


def test_the_rerun_changes_nothing(fleet: FleetRuns) -> None:
    assert failed_hosts(fleet.rerun) == set(REFUSED), fleet.rerun.stdout[-3000:] + fleet.rerun.stderr
    assert fleet.rerun.changed_hosts() == set()
    assert counters(fleet.after_rerun) == dict.fromkeys(ALL_HOSTS, 0)
    # Only the hosts whose reboot waits for their users still need one.
    assert set(results_of(fleet.rerun, TASKS["reboot"])) == set(WAITS_FOR_SESSIONS)
    assert not any(result["rebooted"] for result in results_of(fleet.rerun, TASKS["reboot"]).values())
    for name in SERVERS:
        assert fleet.after_rerun[name]["system"] == fleet.after_apply[name]["system"], f"{name} rebooted again"


def test_only_hosts_with_schannel_changes_were_rebooted(fleet: FleetRuns) -> None:
    tls = results_of(fleet.apply, TASKS["tls"])
    # A reboot that happened is recorded in the TLS result: no longer required, rebooted.
    needing = {name for name, result in tls.items() if result.get("reboot_required") or result.get("rebooted")}
    assert {"tls-tls12-disabled", "combined-all", "combined-machinekeys-tls12"} <= needing
    rebooted = {
        name
        for name in SERVERS
        if fleet.after_apply[name]["system"]["boot_time"] != fleet.before[name]["system"]["boot_time"]
    }
    assert set(WAITS_FOR_SESSIONS) <= needing
    assert rebooted == needing - set(WAITS_FOR_SESSIONS)
    reboots = results_of(fleet.apply, TASKS["reboot"])
    assert set(reboots) == needing
    for name in WAITS_FOR_SESSIONS:
        assert reboots[name]["rebooted"] is False and reboots[name]["pending"] is True, reboots[name]
        users = [s["user"] for s in fleet.before[name]["sessions"] if s["user"]]
        assert users and all(user in reboots[name]["waits_for_sessions"] for user in users), reboots[name]
    for name in needing - set(WAITS_FOR_SESSIONS):
        assert reboots[name]["rebooted"] is True and not reboots[name].get("failed"), reboots[name]
        events = [(event["provider"], event["id"]) for event in fleet.after_apply[name]["events"]]
        assert ("User32", 1074) in events, name


@pytest.mark.parametrize("step", ["after_check", "after_apply", "after_rerun"])
def test_no_run_leaves_a_weaker_setting_than_it_found(fleet: FleetRuns, step: str) -> None:
    for name in ALL_HOSTS:
        before, after = fleet.before[name], getattr(fleet, step)[name]
        assert weak_protocols_on(after) <= weak_protocols_on(before), name
        for setting in ("SecurityLayer", "UserAuthentication"):
            old, new = listener_values(before, setting), listener_values(after, setting)
            for where in ("listener", "policy", "effective"):
                if old[where] is not None:
                    assert new[where] is not None and new[where] >= old[where], (name, setting, where, old, new)
        old_rules, new_rules = rules(before), rules(after)
        for rule_name, rule in new_rules.items():
            if rule["direction"] != "Inbound":
                continue
            if rule_name in old_rules:
                assert covers(old_rules[rule_name]["remote_addresses"], rule["remote_addresses"]), (name, rule_name)
            else:
                # A rule the role created copies the built-in rule's scope, never wider.
                builtin = old_rules.get(rule_name.replace("rdpfix-RemoteDesktop-In", "RemoteDesktop-UserMode-In"))
                assert covers(builtin["remote_addresses"] if builtin else [], rule["remote_addresses"]), (
                    name,
                    rule_name,
                )
            if open_on_public_to_any(rule):
                assert rule_name in old_rules and open_on_public_to_any(old_rules[rule_name]), (
                    f"{name}: {rule_name} newly open to any address on the Public profile"
                )


def user_sessions(snapshot: dict[str, t.Any]) -> list[tuple[int, str, str]]:
    """The sessions with a user in them (Active, Disconnected, ...), as a reboot or a TermService restart ends them."""
    return sorted((s["id"], s["user"], s["state"]) for s in snapshot["sessions"] if s["user"])


@pytest.mark.parametrize("step", ["after_check", "after_apply", "after_rerun"])
def test_no_session_is_dropped_without_consent_on_every_host_file(fleet: FleetRuns, step: str) -> None:
    """The fleet runs allow reboots but not session disruption: no reboot and no service restart may end, disconnect
    or otherwise change a user's session, on any host file."""
    with_users = [name for name in ALL_HOSTS if user_sessions(fleet.before[name])]
    # Hosts with users that need a restart (active-sessions) or a reboot (WAITS_FOR_SESSIONS): the promise is tested.
    assert {"active-sessions", *WAITS_FOR_SESSIONS} <= set(with_users)
    for name in ALL_HOSTS:
        assert user_sessions(getattr(fleet, step)[name]) == user_sessions(fleet.before[name]), (name, step)


def policy_values(snapshot: dict[str, t.Any]) -> dict[tuple[str, str], t.Any]:
    """Every value under HKLM:\\SOFTWARE\\Policies (Group Policy's place), by (key, value name), case-folded."""
    prefix = "HKLM:\\SOFTWARE\\Policies\\".casefold()
    return {
        (key.casefold(), name.casefold()): value
        for key, values in snapshot["registry"].items()
        if key.casefold().startswith(prefix)
        for name, value in values.items()
    }


@pytest.mark.parametrize("step", ["after_check", "after_apply", "after_rerun"])
def test_no_policy_value_is_written_without_an_explicit_option_on_every_host_file(fleet: FleetRuns, step: str) -> None:
    """No value under HKLM:\\SOFTWARE\\Policies is created, changed or removed on any host file unless the host's
    options explicitly ask for that value (the transport mode, override_policy)."""
    written_somewhere = False
    for name in ALL_HOSTS:
        before, after = policy_values(fleet.before[name]), policy_values(getattr(fleet, step)[name])
        changed = {item for item in before.keys() | after.keys() if before.get(item) != after.get(item)}
        allowed = {
            (key.casefold(), value.casefold())
            for variable in [*OPT_INS.get(name, {}), *(CLIENT_ROLE_OPTIONS if name in CLIENTS else ())]
            for key, value in POLICY_OPTIONS.get(variable, set())
        }
        assert changed <= allowed, (name, step, sorted(changed - allowed))
        written_somewhere |= bool(changed)
    if step != "after_check":
        # The explicit options do write (transport-udp-vpn, and the cipher policy where override_policy is given).
        assert written_somewhere
    # Where a policy enforces a downgrade and no option overrides it, the run says so.
    for name in ("policy-security-layer-nla", "policy-security-layer-both", "policy-nla-listener-layer"):
        titles = [f["title"] for f in results_of(fleet.apply, TASKS["tls"])[name]["findings"]]
        assert any("enforced by Group Policy" in title and "next Group Policy refresh" in title for title in titles)


def test_client_role_fixes_the_client_side_and_reports_the_rest(fleet: FleetRuns) -> None:
    (client,) = CLIENTS
    assert fleet.after_check[client]["counters"]["writes"] == 0
    assert fleet.check.results(CLIENT_TASKS["firewall"])[client]["changed"] is True

    firewall = fleet.apply.results(CLIENT_TASKS["firewall"])[client]
    transport = fleet.apply.results(CLIENT_TASKS["transport"])[client]
    assert firewall["changed"] and transport["changed"]
    assert {"firewall.client_outbound_blocked", "firewall.client_third_party_firewall"} <= finding_ids(firewall)
    assert "transport.client_legacy_setting" in finding_ids(transport)
    after = fleet.after_apply[client]
    outbound = [
        rule
        for rule in rules(after).values()
        if rule["direction"] == "Outbound"
        and rule["action"] == "Allow"
        and rule["enabled"]
        and "mstsc.exe" in rule["program"].lower()
    ]
    assert outbound, "an outbound allow rule for mstsc.exe"
    # Reported, not changed: the block rule (disable_blocking_rules is off) and the legacy per-machine setting.
    assert rules(after)["Block-RDP-Out"]["enabled"]
    assert reg_value(after, "HKLM:\\SOFTWARE\\Microsoft\\Terminal Server Client", "DisableUDPTransport") == 1
    assert reg_value(after, POLICY + "\\Client", "fClientDisableUDP") == 1
    # The client role never touches the server side of the workstation, and the server role never runs there.
    assert without(after["firewall"], "rules") == without(fleet.before[client]["firewall"], "rules")
    inbound_before = {n: r for n, r in rules(fleet.before[client]).items() if r["direction"] == "Inbound"}
    assert {n: r for n, r in rules(after).items() if r["direction"] == "Inbound"} == inbound_before
    assert all(client not in results_of(fleet.apply, task) for task in TASKS.values())
    assert reg_value(after, POLICY, "SelectTransport") is None
    # The second run finds the client as the first left it.
    assert not fleet.rerun.results(CLIENT_TASKS["firewall"])[client]["changed"]
    assert not fleet.rerun.results(CLIENT_TASKS["transport"])[client]["changed"]
    assert fleet.after_rerun[client]["counters"]["writes"] == 0


# -- the reboot, step by step --------------------------------------------------------------------------------------

REBOOT_HOSTS = ["tls-tls12-disabled", "combined-machinekeys-tls12", "tls-cipher-incompatible"]
# tls-cipher-incompatible's cipher-suite order is a Group Policy value: its repair is asked for explicitly.
OVERRIDE = {"rdpfix_server_tls_override_policy": True}


@pytest.fixture
def reboot_lab(tmp_path: Path) -> Iterator[Lab]:
    lab = start_lab(tmp_path, [HOSTS_DIR / f"{name}.yml" for name in REBOOT_HOSTS])
    try:
        yield lab
    finally:
        lab.down()


def test_a_tls_fix_waits_for_the_reboot_the_user_allows(reboot_lab: Lab) -> None:
    lab = reboot_lab
    first = states(lab)
    address = {name: state["address"] for name, state in first.items()}
    before = {name: state["snapshot"] for name, state in first.items()}
    assert not any(connects(address[name], before[name]) for name in REBOOT_HOSTS)

    # Without permission: the registry is fixed, the reboot is reported as pending, Schannel still refuses TLS 1.2.
    first = run_playbook(
        "playbooks/fix_rdp.yml", lab.inventory, extra_vars={"rdpfix_server_allow_reboot": False, **OVERRIDE}
    )
    assert first.rc == 0, first.stdout[-3000:] + first.stderr
    pending_reboots = results_of(first, TASKS["reboot"])
    assert set(pending_reboots) == set(REBOOT_HOSTS)
    assert all(result["pending"] and not result["rebooted"] for result in pending_reboots.values())
    assert all("rdpfix_server_allow_reboot=true" in result["msg"] for result in pending_reboots.values())
    assert all(results_of(first, TASKS["tls"])[name]["reboot_required"] for name in REBOOT_HOSTS)
    pending = snapshots(lab, zero_counters=True)
    for name in REBOOT_HOSTS:
        assert pending[name]["system"]["boot_time"] == before[name]["system"]["boot_time"]
        assert not connects(address[name], pending[name]), f"{name}: Schannel must not use TLS 1.2 before a reboot"

    # Runs without permission in the meantime change nothing more: the reboot is what is missing, not a write.
    waiting = run_playbook(
        "playbooks/fix_rdp.yml", lab.inventory, extra_vars={"rdpfix_server_allow_reboot": False, **OVERRIDE}
    )
    assert waiting.rc == 0, waiting.stdout[-3000:] + waiting.stderr
    assert waiting.changed_hosts() == set()
    assert {name for name, result in results_of(waiting, TASKS["reboot"]).items() if result["pending"]} == set(
        REBOOT_HOSTS
    )
    assert counters(snapshots(lab, zero_counters=True)) == dict.fromkeys(REBOOT_HOSTS, 0)

    # With permission: the next run still knows the reboot is pending, and win_reboot restarts the host.
    second = run_playbook(
        "playbooks/fix_rdp.yml", lab.inventory, extra_vars={"rdpfix_server_allow_reboot": True, **OVERRIDE}
    )
    assert second.rc == 0, second.stdout[-3000:] + second.stderr
    reboots = results_of(second, TASKS["reboot"])
    after = snapshots(lab, zero_counters=True)
    for name in REBOOT_HOSTS:
        assert reboots[name].get("rebooted") is True, reboots[name]
        assert after[name]["system"]["boot_time"] != before[name]["system"]["boot_time"]
        assert connects(address[name], after[name]), f"{name} must accept TLS 1.2 after the reboot"

    third = run_playbook(
        "playbooks/fix_rdp.yml", lab.inventory, extra_vars={"rdpfix_server_allow_reboot": True, **OVERRIDE}
    )
    assert third.rc == 0
    assert third.changed_hosts() == set()
    final = snapshots(lab)
    assert counters(final) == dict.fromkeys(REBOOT_HOSTS, 0)
    assert all(final[name]["system"] == after[name]["system"] for name in REBOOT_HOSTS), "no second reboot"


ROLE = "rdpfix.rdp.rdpfix_server : "


def test_the_reboot_and_verification_tags(reboot_lab: Lab) -> None:
    """--skip-tags reboot leaves the reboot pending without advice to allow it; --skip-tags verify probes nothing;
    --tags verify alone verifies (verify.yml) without repairing; --tags tls repairs TLS alone, reboots and verifies."""
    lab = reboot_lab
    first = states(lab)
    address = {name: state["address"] for name, state in first.items()}
    before = {name: state["snapshot"] for name, state in first.items()}
    allowed = {"rdpfix_server_allow_reboot": True, **OVERRIDE}

    skipped = run_playbook("playbooks/fix_rdp.yml", lab.inventory, extra_vars=allowed, skip_tags="reboot,verify")
    assert skipped.rc == 0, skipped.stdout[-3000:] + skipped.stderr
    assert results_of(skipped, TASKS["reboot"]) == {} and results_of(skipped, "verification") == {}
    assert all(results_of(skipped, TASKS["tls"])[name]["reboot_required"] for name in REBOOT_HOSTS)
    after_skip = snapshots(lab, zero_counters=True)
    assert all(after_skip[name]["system"] == before[name]["system"] for name in REBOOT_HOSTS), "rebooted"

    # The verification alone: the probe task of verify.yml on every host, no repair task.
    verified = run_playbook("playbooks/fix_rdp.yml", lab.inventory, extra_vars=allowed, tags="verify")
    probes = verified.results(ROLE + "Verify from the controller that RDP connects after the repair")
    assert set(probes) == set(REBOOT_HOSTS) and not any(result.get("skipped") for result in probes.values())
    assert verified.results(APPLY_TASK) == {}
    assert counters(snapshots(lab), "winrm_commands") == dict.fromkeys(REBOOT_HOSTS, 0)

    # TLS alone: repaired already, so only the pending reboot happens, and the verification after it.
    tls_only = run_playbook("playbooks/fix_rdp.yml", lab.inventory, extra_vars=allowed, tags="tls")
    assert tls_only.rc == 0, tls_only.stdout[-3000:] + tls_only.stderr
    for name in REBOOT_HOSTS:
        assert set(tls_only.results(APPLY_TASK)[name]["concerns"]) == {"tls"}
        assert results_of(tls_only, TASKS["reboot"])[name]["rebooted"] is True
        assert results_of(tls_only, "verification")[name]["connectable"] is True
    rebooted = snapshots(lab)
    for name in REBOOT_HOSTS:
        assert rebooted[name]["system"]["boot_time"] != before[name]["system"]["boot_time"]
        assert connects(address[name], rebooted[name])
