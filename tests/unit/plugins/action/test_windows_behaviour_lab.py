"""Firewall and service operations as Windows answers them, through the real agent runner, planners and action
plugins against the lab (rdplab.agent_code makes the lab answer the agent's own code, so each test below fails
with the agent as it was before the review of issue 9)."""

from __future__ import annotations

import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

rdplab_direct = pytest.importorskip("rdplab.direct")
agent_code = pytest.importorskip("rdplab.agent_code")
schema = pytest.importorskip("rdplab.model.schema")

from ansible_collections.rdpfix.rdp.plugins.action.certificate import ActionModule as CertificateAction  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action.firewall import ActionModule as FirewallAction  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _agent, _firewall, _restore, _wrapper  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
BEFORE = agent_code.AgentCode(
    unrolled_rule_lists=frozenset(agent_code.RULE_LIST_FIELDS),
    rule_read_errors_silenced=True,
    filters_joined_across_stores=True,
    start_type_from_service_controller=True,
    restart_with_cmdlet=True,
    rule_new_checks_local_store_only=True,
)
TCP = "RemoteDesktop-UserMode-In-TCP"


def host_from(text: str, base: str | None = None) -> t.Any:
    document = yaml.safe_load((HOSTS / f"{base}.yml").read_text()) if base else {}
    document.update({"name": "h", "credentials": {"username": "u", "password": "p"}})
    for key, value in (yaml.safe_load(text) or {}).items():
        document[key] = {**document.get(key, {}), **value} if isinstance(value, dict) else value
    return schema.build_host(document, Path("inline.yml"))


def run(action_class: t.Any, host: t.Any, **args: t.Any) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=False, diff=False, async_val=0, action=f"rdpfix.rdp.{action_class}")
    connection = rdplab_direct.DirectConnection(host)
    action = action_class(task, connection, SimpleNamespace(remote_addr="127.0.0.2"), None, None, None)
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name}))


def read_firewall(host: t.Any) -> t.Any:
    batch = _agent.Batch(on_error="continue")
    reads = _firewall.add_reads(batch, _firewall.FirewallOptions())
    result = _agent.run_batch(rdplab_direct.DirectConnection(host), host.name, batch, _wrapper.ModuleWrapper())
    return _firewall.state_from(result, reads)


# -- defect 2: rule records keep their list shape -------------------------------------------------------------


def test_a_one_port_rule_reaches_the_planner_as_a_list() -> None:
    state = read_firewall(host_from(""))
    tcp = next(rule for rule in state.rules if rule["name"] == TCP)
    assert tcp["local_ports"] == ["3389"] and tcp["remote_addresses"] == ["Any"]
    assert not _firewall.plan_state(state, _firewall.FirewallOptions()).changes


def test_an_unrolled_list_is_refused_as_an_agent_defect_not_split_into_characters() -> None:
    host = host_from("")
    with agent_code.using(BEFORE):
        state = read_firewall(host)
    with pytest.raises(_agent.AgentContractError, match=r"local_ports as a list of strings, got str '3389'"):
        _firewall.plan_state(state, _firewall.FirewallOptions())
    record = next(rule for rule in state.rules if rule["name"] == TCP)
    with pytest.raises(_agent.AgentContractError, match="local_ports"):
        _restore._new_rule_args(record)
    with agent_code.using(BEFORE):
        result = run(FirewallAction, host)
    assert result["failed"] and "agent contract" in result["msg"]
    assert host.counters.writes == 0


# -- defect 9: a read failure is a failure ----------------------------------------------------------------------


def test_a_firewall_read_failure_fails_the_module_instead_of_reading_as_no_rules() -> None:
    host = host_from("firewall: {rule_read_error: 'The RPC server is unavailable.'}", base="firewall-rules-disabled")
    result = run(FirewallAction, host)
    assert result["failed"] and "firewall.rules.list" in result["msg"] and "RPC server" in result["msg"]
    assert host.counters.writes == 0


# -- defect 10: Group Policy rules are reported, never written --------------------------------------------------

GPO_TCP = """
firewall:
  rules:
    - {name: RemoteDesktop-UserMode-In-TCP, source: GroupPolicy, display_name: RDP by policy, group: Corp,
       enabled: false, local_ports: ['3389'], program: '%SystemRoot%\\system32\\svchost.exe', service: termservice}
"""
GPO_BLOCK = """
firewall:
  rules:
    - {name: Corp-Block-RDP, source: GroupPolicy, display_name: Block RDP, action: Block, local_ports: ['3389']}
"""


def test_a_group_policy_rule_in_place_of_the_builtin_one_is_reported_as_policy_and_never_written() -> None:
    host = host_from(GPO_TCP)
    before = host.firewall.snapshot()
    result = run(FirewallAction, host)
    # The local built-in rule is enabled, but the policy's rule of the same Name is the one in force.
    assert host.rdp_view(connect=False).listening is False
    # Reported as policy, with no fix this module could make (other findings about the same block may follow).
    found = {f["id"]: f for f in result["findings"]}
    assert "managed by GroupPolicy" in found["firewall.rdp_tcp_not_allowed"]["title"]
    assert all(f["fix"] is None for f in result["findings"])
    assert host.counters.writes == 0 and host.firewall.snapshot() == before


def test_a_group_policy_block_rule_is_reported_not_disabled_even_when_asked() -> None:
    host = host_from(GPO_BLOCK)
    before = host.firewall.snapshot()
    result = run(FirewallAction, host, disable_blocking_rules=True)
    blocks = [f for f in result["findings"] if f["id"] == "firewall.block_rule_tcp"]
    assert [(f["evidence"]["rule"], f["evidence"]["source"], f["fix"]) for f in blocks] == [
        ("Corp-Block-RDP", "GroupPolicy", None)
    ]
    assert host.counters.writes == 0 and host.firewall.snapshot() == before


# -- defects 6 and 7: services -----------------------------------------------------------------------------------


def test_a_running_but_disabled_session_env_is_not_restarted() -> None:
    host = host_from("services: {SessionEnv: {status: Running, start_type: Disabled}}", base="expired-selfsigned")
    result = run(CertificateAction, host)
    assert host.service("SessionEnv").status == "Running"
    assert host.counters.writes == 0
    assert any(f["id"] == "certificate.regeneration_blocked" and "disabled" in f["title"] for f in result["findings"])


def test_an_empty_start_type_from_net_452_is_refused_not_read_as_enabled() -> None:
    text = "system: {dotnet_framework: 4.5.2}\nservices: {SessionEnv: {status: Running, start_type: Disabled}}"
    host = host_from(text, base="expired-selfsigned")
    result = run(CertificateAction, host)
    assert any(f["id"] == "certificate.regeneration_blocked" for f in result["findings"])
    host = host_from(text, base="expired-selfsigned")
    with agent_code.using(BEFORE):
        result = run(CertificateAction, host)
    assert result["failed"] and "agent contract" in result["msg"] and "start_type ''" in result["msg"]
    assert host.counters.writes == 0 and host.service("SessionEnv").status == "Running"


def test_a_service_hanging_in_stop_pending_fails_the_operation_with_timeout() -> None:
    host = host_from("services: {SessionEnv: {hangs_on_stop: true}}", base="expired-selfsigned")
    result = run(CertificateAction, host)
    assert result["failed"] and "service.restart" in result["msg"] and "Timeout" in result["msg"]
    assert host.service("SessionEnv").status == "StopPending"
    host = host_from("services: {SessionEnv: {hangs_on_stop: true}}", base="expired-selfsigned")
    with agent_code.using(BEFORE):
        result = run(CertificateAction, host)
    # The old agent's Restart-Service never returns: no result document at all.
    assert result["failed"] and "returned no result" in result["msg"]


def test_a_pin_removal_is_not_made_when_its_restart_service_is_disabled() -> None:
    host = host_from("services: {SessionEnv: {status: Running, start_type: Disabled}}", base="pinned-missing")
    before = host.snapshot()
    result = run(CertificateAction, host, remove_missing_pin=True)
    assert any(f["id"] == "certificate.regeneration_blocked" and "disabled" in f["title"] for f in result["findings"])
    assert host.counters.writes == 0 and host.service("SessionEnv").status == "Running"
    assert host.snapshot()["registry"] == before["registry"]


def test_a_restore_that_would_restart_a_disabled_service_is_refused_before_it_starts() -> None:
    from ansible_collections.rdpfix.rdp.plugins.action.restore import ActionModule as RestoreAction

    host = host_from("", base="pinned-missing")
    fixed = run(CertificateAction, host)
    manifest_id = fixed["backup"]["manifest_id"]
    assert fixed["changed"] and manifest_id
    # Putting the pin back restarts SessionEnv, which an administrator has disabled since.
    host.service("SessionEnv").start_type = "Disabled"
    before, writes = host.snapshot(), host.counters.writes
    result = run(RestoreAction, host, manifest_id=manifest_id)
    assert result["failed"] and "SessionEnv, which is disabled" in result["msg"]
    assert [(m["id"], m["status"]) for m in result["manifests"]] == [(manifest_id, "refused")]
    assert host.counters.writes == writes and host.snapshot()["registry"] == before["registry"]
    assert host.service("SessionEnv").status == "Running"
