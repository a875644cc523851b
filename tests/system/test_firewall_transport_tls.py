"""rdpfix.rdp.firewall, .transport and .tls end to end against lab hosts, through the real agent protocol.

The action plugins talk to the lab's WindowsHost through DirectConnection: the same bootstrap verification and
operations as over WinRM, without sockets. Every assertion is on the lab's state or on its RDP endpoint view.
"""

from __future__ import annotations

import ipaddress
import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest

from ansible_collections.rdpfix.rdp.plugins.action.firewall import ActionModule as FirewallAction
from ansible_collections.rdpfix.rdp.plugins.action.tls import ActionModule as TlsAction
from ansible_collections.rdpfix.rdp.plugins.action.transport import ActionModule as TransportAction
from rdplab.direct import DirectConnection
from rdplab.model import listener, schannel
from rdplab.model.host import WindowsHost

HOSTS = Path(__file__).resolve().parents[1] / "lab" / "hosts"
ACTIONS: dict[str, t.Any] = {"firewall": FirewallAction, "tls": TlsAction, "transport": TransportAction}
WEAK = ("SSL 2.0", "SSL 3.0", "TLS 1.0", "TLS 1.1")


def load(name: str) -> WindowsHost:
    return WindowsHost.from_file(HOSTS / f"{name}.yml")


def run(host: WindowsHost, module: str, check_mode: bool = False, **args: t.Any) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=True, async_val=0, action=f"rdpfix.rdp.{module}")
    action = ACTIONS[module](task, DirectConnection(host), SimpleNamespace(remote_addr="127.0.0.2"), None, None, None)
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name}))


def healthy_endpoint(host: WindowsHost) -> bool:
    view = host.rdp_view(connect=False)
    return view.listening and not view.rdp_only and view.failure is None and "TLSv1.2" in view.tls_versions


def without_counters(snapshot: dict[str, t.Any]) -> dict[str, t.Any]:
    return {key: value for key, value in snapshot.items() if key != "counters"}


@pytest.mark.parametrize(
    ("host_file", "module", "args"),
    [
        ("firewall-rules-disabled", "firewall", {}),
        ("firewall-moved-port", "firewall", {}),
        ("firewall-block-rule", "firewall", {"disable_blocking_rules": True}),
        ("tls-tls12-disabled", "tls", {}),
        ("tls-security-layer-rdp", "tls", {}),
        # The cipher-suite order is a Group Policy value: written only when asked.
        ("tls-cipher-incompatible", "tls", {"override_policy": True}),
        ("policy-security-layer-nla", "tls", {"override_policy": True}),
    ],
)
def test_fault_is_repaired_and_a_second_run_changes_nothing(host_file: str, module: str, args: dict[str, t.Any]):
    host = load(host_file)
    assert not healthy_endpoint(host)
    first = run(host, module, **args)
    assert not first.get("failed"), first.get("msg")
    assert first["changed"] and first["findings"] and first["backup"]["manifest_id"]
    if first.get("reboot_required"):
        schannel.reboot(host)  # what the role's win_reboot does
    assert healthy_endpoint(host)
    writes = host.counters.writes
    second = run(host, module, **args)
    assert not second.get("failed"), second.get("msg")
    assert not second["changed"]
    assert host.counters.writes == writes
    assert second["round_trips"] == 1


def test_tls13_key_on_server_2019_is_harmless_reported_and_left_alone():
    host = load("tls-tls13-forced-2019")
    assert healthy_endpoint(host)  # Server 2019 has no TLS 1.3: the key changes nothing a client meets
    result = run(host, "tls")
    assert not result.get("failed"), result.get("msg")
    assert not result["changed"] and not result.get("reboot_required")
    [note] = [f for f in result["findings"] if f["id"].startswith("tls.tls13")]
    assert (note["id"], note["severity"], note["fix"]) == ("tls.tls13_no_effect", "info", None)
    assert host.counters.writes == 0


def test_block_rule_is_reported_but_not_disabled_unless_asked():
    host = load("firewall-block-rule")
    result = run(host, "firewall")
    assert not result["changed"]
    assert [f["id"] for f in result["findings"]] == ["firewall.block_rule_tcp"]
    assert not healthy_endpoint(host)
    assert host.firewall.get("Block-Legacy-Admin-Ports").enabled


def test_disabled_rules_keep_their_scope():
    host = load("firewall-rules-disabled")
    run(host, "firewall")
    rule = host.firewall.get("RemoteDesktop-UserMode-In-TCP")
    assert rule.enabled and rule.remote_addresses == ["127.0.0.0/8", "10.0.0.0/8"]
    # Enabled for the chosen profiles only (Domain, Private), never more than asked.
    assert rule.profiles == 3


def test_moved_port_gets_its_own_tcp_and_udp_rules():
    host = load("firewall-moved-port")
    run(host, "firewall")
    assert host.firewall.get("rdpfix-RemoteDesktop-In-TCP").local_ports == ["3390"]
    assert host.firewall.get("rdpfix-RemoteDesktop-In-UDP").local_ports == ["3390"]
    assert host.firewall.inbound_allowed("UDP", 3390)


def test_public_profile_open_to_any_needs_consent():
    host = load("firewall-moved-port")
    before = without_counters(host.snapshot())
    refused = run(host, "firewall", profiles=["Public"])
    assert refused["failed"] and "allow_public_any" in refused["msg"]
    assert without_counters(host.snapshot()) == before
    allowed = run(host, "firewall", profiles=["Public"], allow_public_any=True)
    assert allowed["changed"] and any("Public" in w for w in allowed["warnings"])


def test_bad_options_fail_before_the_host_is_touched():
    host = load("healthy")
    result = run(host, "firewall", remote_addresses=["not-an-address"])
    assert result["failed"] and "remote_addresses" in result["msg"]
    assert host.counters.winrm_commands == 0


@pytest.mark.parametrize("host_file", ["tls-tls12-disabled", "firewall-rules-disabled", "combined-seclayer-cipher"])
@pytest.mark.parametrize("module", ["firewall", "tls", "transport"])
def test_check_mode_writes_nothing(host_file: str, module: str):
    host = load(host_file)
    before = without_counters(host.snapshot())
    result = run(host, module, check_mode=True)
    assert not result.get("failed"), result.get("msg")
    assert without_counters(host.snapshot()) == before
    assert host.counters.writes == 0
    if result["changed"]:
        assert result["diff"]["before"] != result["diff"]["after"]


def test_transport_modes_round_trip():
    host = load("transport-udp-vpn")
    key = "HKLM:\\SOFTWARE\\Policies\\Microsoft\\Windows NT\\Terminal Services"
    result = run(host, "transport", mode="tcp_only", sides=["server", "client"])
    assert result["changed"] and result["restart_required"] == ["TermService"]
    assert result["new_client_session_required"]
    assert host.registry.dword(key, "SelectTransport") == 1
    assert host.registry.dword(key + "\\Client", "fClientDisableUDP") == 1
    assert not run(host, "transport", mode="tcp_only", sides=["server", "client"])["changed"]
    run(host, "transport", mode="default", sides=["server", "client"])
    assert host.registry.get(key, "SelectTransport") is None
    assert host.registry.get(key + "\\Client", "fClientDisableUDP") is None


@pytest.mark.parametrize(
    "host_file", ["policy-security-layer-nla", "policy-security-layer-both", "tls-cipher-incompatible"]
)
def test_group_policy_values_are_reported_and_left_alone_by_default(host_file: str):
    host = load(host_file)
    policy_keys = {key: dict(values) for key, values in host.snapshot()["registry"].items() if "\\Policies\\" in key}
    result = run(host, "tls")
    assert not result.get("failed"), result.get("msg")
    assert not result.get("warnings")
    after = {key: dict(values) for key, values in host.snapshot()["registry"].items() if "\\Policies\\" in key}
    assert after == policy_keys
    enforced = [f for f in result["findings"] if f["evidence"].get("enforced_by_policy")]
    assert enforced and all(f["fix"]["options"]["override_policy"] is True for f in enforced)
    assert not healthy_endpoint(host)


def test_combined_faults_are_all_repaired():
    host = load("combined-seclayer-cipher")
    # NLA off by policy and the empty cipher-suite policy are Group Policy values: the override is explicit.
    result = run(host, "tls", override_policy=True)
    assert {f["id"] for f in result["findings"]} >= {
        "tls.security_layer_rdp",
        "tls.nla_disabled_policy",
        "tls.cipher_suites_empty",
    }
    assert any("Group Policy puts its own value back" in warning for warning in result["warnings"])
    schannel.reboot(host)
    assert healthy_endpoint(host)
    assert listener.security_layer(host) == 2 and listener.user_authentication(host) == 1


def _weak_enabled(host: WindowsHost) -> set[str]:
    return {p for p in WEAK if p in schannel.compute(host).protocols}


def _scopes(host: WindowsHost) -> dict[str, list[str]]:
    return {rule.name: list(rule.remote_addresses) for rule in host.firewall.rules.values()}


def _covers(outer: list[str], inner: list[str]) -> bool:
    """Every address range of ``inner`` lies within ``outer`` (Any covers everything)."""
    if any(item.lower() in ("any", "*") for item in outer):
        return True
    if any(item.lower() in ("any", "*") for item in inner):
        return False
    outer_nets = [ipaddress.ip_network(item, strict=False) for item in outer]
    return all(any(ipaddress.ip_network(item, strict=False).subnet_of(net) for net in outer_nets) for item in inner)


@pytest.mark.parametrize("host_file", sorted(path.stem for path in HOSTS.glob("*.yml")))
def test_no_run_leaves_a_weaker_setting_than_it_found(host_file: str):
    host = load(host_file)
    weak_before = _weak_enabled(host)
    layer_before, nla_before = listener.security_layer(host), listener.user_authentication(host)
    scopes_before = _scopes(host)
    for module in ("firewall", "transport", "tls"):
        result = run(host, module)
        assert not result.get("failed"), (module, result.get("msg"))
    schannel.reboot(host)
    assert _weak_enabled(host) <= weak_before
    assert listener.security_layer(host) >= layer_before
    assert listener.user_authentication(host) >= nla_before
    for name, scope in _scopes(host).items():
        if name in scopes_before:
            assert _covers(scopes_before[name], scope), name
        else:
            # A rule the module created copies the built-in rule's scope, never wider.
            builtin = scopes_before.get(name.replace("rdpfix-RemoteDesktop-In", "RemoteDesktop-UserMode-In"), ["Any"])
            assert _covers(builtin, scope), name
