"""The lab answers the agent's code as Windows would (rdplab.agent_code): the current agent, and the agent as it was
before the review of issue 9, whose defects these answers must show."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest
import yaml

from rdplab import agent_code
from rdplab.bootstrap import collection_root
from rdplab.model.host import WindowsHost
from rdplab.model.schema import build_host

BEFORE = Path(__file__).resolve().parent / "data" / "agent_before_issue9.ps1.txt"
# What a text with every defect of the review reads as.
BEFORE_CODE = agent_code.AgentCode(
    unrolled_rule_lists=frozenset(agent_code.RULE_LIST_FIELDS),
    rule_read_errors_silenced=True,
    filters_joined_across_stores=True,
    start_type_from_service_controller=True,
    restart_with_cmdlet=True,
    events_from_hashtable=True,
    rule_new_checks_local_store_only=True,
)


def host_from(text: str) -> WindowsHost:
    document = yaml.safe_load("name: h\ncredentials: {username: u, password: p}\n" + text)
    return build_host(document, Path("inline.yml"))


def run(host: WindowsHost, *ops: tuple[str, dict[str, t.Any]]) -> list[dict[str, t.Any]]:
    result = host.run_batch({"v": 1, "on_error": "continue", "ops": [{"op": n, "args": a} for n, a in ops]})
    return t.cast(list[dict[str, t.Any]], result["results"])


def test_the_agent_before_the_review_reads_as_every_defect() -> None:
    assert agent_code.analyse(BEFORE.read_text(encoding="utf-8")) == BEFORE_CODE


def test_the_current_agent_has_none_of_them() -> None:
    code = agent_code.analyse((collection_root() / "plugins" / "plugin_utils" / "_agent.ps1").read_text("utf-8"))
    assert code == agent_code.AgentCode(frozenset(), False, False, False, False)
    assert agent_code.current() == code


def test_an_agent_the_lab_cannot_classify_is_an_error_not_a_guess() -> None:
    with pytest.raises(agent_code.AgentCodeUnknown, match="Get-FirewallRuleRecords"):
        agent_code.analyse("function Get-Something {\n}\n")


def test_one_element_rule_lists_reach_json_as_powershell_unrolls_them() -> None:
    host = host_from("")
    with agent_code.using(BEFORE_CODE):
        before = {rule["name"]: rule for rule in run(host, ("firewall.rules.list", {}))[0]["data"]["rules"]}
    now = {rule["name"]: rule for rule in run(host, ("firewall.rules.list", {}))[0]["data"]["rules"]}
    tcp = "RemoteDesktop-UserMode-In-TCP"
    assert (before[tcp]["local_ports"], before[tcp]["remote_addresses"]) == ("3389", "Any")
    assert (now[tcp]["local_ports"], now[tcp]["remote_addresses"]) == (["3389"], ["Any"])


def test_a_rule_read_failure_is_an_error_not_an_empty_list() -> None:
    host = host_from("firewall: {rule_read_error: 'The RPC server is unavailable.'}\n")
    with agent_code.using(BEFORE_CODE):
        silenced = run(host, ("firewall.rules.list", {}))[0]
    assert silenced["ok"] and silenced["data"]["rules"] == []
    failed = run(host, ("firewall.rules.list", {}))[0]
    assert failed["error"] == {"type": "Failed", "message": "The RPC server is unavailable."}


TCP_RULE = "RemoteDesktop-UserMode-In-TCP"
GPO_TWIN = """\
firewall:
  rules:
    - {name: RemoteDesktop-UserMode-In-TCP, source: GroupPolicy, display_name: RDP by policy, group: Corp,
       enabled: true, local_ports: ['3390'], remote_addresses: [10.0.0.0/8], program: Any}
"""


def test_a_group_policy_rule_and_a_local_rule_with_one_name_keep_their_own_filters() -> None:
    host = host_from(GPO_TWIN)
    listed = [r for r in run(host, ("firewall.rules.list", {}))[0]["data"]["rules"] if r["name"] == TCP_RULE]
    by_store = {rule["policy_store_source_type"]: rule for rule in listed}
    assert by_store["Local"]["local_ports"] == ["3389"] and by_store["Local"]["program"].endswith("svchost.exe")
    assert by_store["GroupPolicy"]["local_ports"] == ["3390"]
    assert by_store["GroupPolicy"]["remote_addresses"] == ["10.0.0.0/8"]
    with agent_code.using(BEFORE_CODE):
        mixed = run(host, ("firewall.rules.list", {}))[0]["data"]["rules"]
    local = next(r for r in mixed if r["name"] == TCP_RULE and r["policy_store_source_type"] == "Local")
    assert local["local_ports"] == "3390"  # the policy rule's filter, unrolled: what the old join produced


def test_group_policy_rules_win_in_the_active_store_and_are_never_written() -> None:
    host = host_from(GPO_TWIN)
    # The policy rule replaces the local one of the same Name: RDP on 3389 is no longer let in.
    assert host.rdp_view(connect=False).listening is False
    policy = host.firewall.policy_rules["remotedesktop-usermode-in-tcp"].record()
    results = run(
        host,
        ("firewall.rule.set", {"name": "RemoteDesktop-UserMode-In-TCP", "enabled": False}),
        ("firewall.rule.new", {**NEW_RULE, "name": "remotedesktop-usermode-in-tcp"}),
    )
    # Set-NetFirewallRule changes the local store's rule of that Name; the policy's stays as delivered.
    assert results[0]["ok"] and results[0]["data"]["previous"]["policy_store_source_type"] == "Local"
    assert host.firewall.rules["remotedesktop-usermode-in-tcp"].enabled is False
    assert host.firewall.policy_rules["remotedesktop-usermode-in-tcp"].record() == policy
    assert results[1]["error"]["type"] == "InvalidArgument"
    del host.firewall.rules["remotedesktop-usermode-in-tcp"]
    # A Name only Group Policy has: not found for a change, refused for a new local rule, nothing removed.
    results = run(
        host,
        ("firewall.rule.set", {"name": "RemoteDesktop-UserMode-In-TCP", "enabled": True}),
        ("firewall.rule.new", {**NEW_RULE, "name": "RemoteDesktop-UserMode-In-TCP"}),
        ("firewall.rule.remove", {"name": "RemoteDesktop-UserMode-In-TCP"}),
    )
    assert results[0]["error"]["type"] == "NotFound" and "Group Policy" in results[0]["error"]["message"]
    assert results[1]["error"]["type"] == "InvalidArgument" and "RSOP" in results[1]["error"]["message"]
    assert results[2]["data"] == {"previous": None}
    assert host.firewall.policy_rules["remotedesktop-usermode-in-tcp"].record() == policy
    # The agent before the review looked in the local store only: New-NetFirewallRule made a local twin of the
    # policy's rule, which the policy's shadows.
    with agent_code.using(BEFORE_CODE):
        twin = run(host, ("firewall.rule.new", {**NEW_RULE, "name": "RemoteDesktop-UserMode-In-TCP"}))[0]
    assert twin["ok"] and "remotedesktop-usermode-in-tcp" in host.firewall.rules


NEW_RULE = {
    "name": "x",
    "display_name": "x",
    "group": "rdpfix",
    "direction": "Inbound",
    "action": "Allow",
    "enabled": True,
    "profiles": 0,
    "protocol": "TCP",
    "local_ports": ["3389"],
    "remote_addresses": ["Any"],
    "program": "Any",
}


def test_start_type_is_empty_on_net_452_only_for_an_agent_that_reads_service_controller() -> None:
    host = host_from(
        "system: {os_build: 9600, dotnet_framework: 4.5.2}\nservices: {SessionEnv: {start_type: Disabled}}\n"
    )
    with agent_code.using(BEFORE_CODE):
        before = run(host, ("service.get", {"names": ["SessionEnv"]}))[0]["data"]["services"]["SessionEnv"]
    now = run(host, ("service.get", {"names": ["SessionEnv"]}))[0]["data"]["services"]["SessionEnv"]
    assert before == {"exists": True, "status": "Running", "start_type": ""}
    assert now == {"exists": True, "status": "Running", "start_type": "Disabled"}
    newer = host_from("system: {dotnet_framework: 4.6.1}\nservices: {SessionEnv: {start_type: Disabled}}\n")
    with agent_code.using(BEFORE_CODE):
        data = run(newer, ("service.get", {"names": ["SessionEnv"]}))[0]["data"]
    assert data["services"]["SessionEnv"]["start_type"] == "Disabled"


def test_restart_service_stops_a_disabled_service_then_fails_and_the_agent_refuses_first() -> None:
    disabled = "services: {SessionEnv: {status: Running, start_type: Disabled}}\n"
    host = host_from(disabled)
    with agent_code.using(BEFORE_CODE):
        result = run(host, ("service.restart", {"name": "SessionEnv"}))[0]
    assert result["error"]["type"] == "Failed" and "disabled" in result["error"]["message"]
    assert host.service("SessionEnv").status == "Stopped"  # what Restart-Service leaves behind
    host = host_from(disabled)
    result = run(host, ("service.restart", {"name": "SessionEnv"}))[0]
    assert result["error"]["type"] == "Failed" and "nothing was stopped" in result["error"]["message"]
    assert host.service("SessionEnv").status == "Running"
    assert host.counters.writes == 0


def test_a_service_hanging_in_stop_pending_is_a_timeout_not_a_hung_command() -> None:
    from rdplab import bootstrap
    from rdplab.ops.services import CommandHangs

    host = host_from("services: {SessionEnv: {hangs_on_stop: true}}\n")
    result = run(host, ("service.restart", {"name": "SessionEnv"}), ("service.get", {"names": ["SessionEnv"]}))
    assert result[0]["error"]["type"] == "Timeout"
    assert result[1]["data"]["services"]["SessionEnv"]["status"] == "StopPending"
    host = host_from("services: {SessionEnv: {hangs_on_stop: true}}\n")
    with agent_code.using(BEFORE_CODE), pytest.raises(CommandHangs):
        run(host, ("service.restart", {"name": "SessionEnv"}))
    assert bootstrap.CommandHangs is CommandHangs


def test_host_file_keys_are_checked() -> None:
    from rdplab.model.errors import HostFileError

    for text, where in (
        ("system: {dotnet_framework: 4.8}\n", "system.dotnet_framework"),  # a YAML number, not a release
        ("firewall: {remote_desktop_rules: off}\n", "firewall.remote_desktop_rules"),
        ("firewall: {rule_read_error: ''}\n", "firewall.rule_read_error"),
        ("services: {SessionEnv: {hangs_on_stop: 'yes'}}\n", "services.SessionEnv.hangs_on_stop"),
    ):
        with pytest.raises(HostFileError, match=where.replace(".", r"\.")):
            host_from(text)
