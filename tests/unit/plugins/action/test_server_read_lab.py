"""rdpfix.rdp.server given no snapshot takes it itself, in one read batch, against the lab's simulated hosts.

- It plans exactly as from rdpfix.rdp.facts' snapshot (the same per-concern results), in the same round trips plus the
  read: 1 for a compliant host or check mode, 1 + the apply batches for a repair.
- Concern options that their module refuses are refused before the host is contacted.
"""

from __future__ import annotations

import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")

from ansible_collections.rdpfix.rdp.plugins.action import facts as facts_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import server as server_action  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
# The role's concerns with its default options (transport left alone: its mode is keep).
CONCERNS: dict[str, dict[str, t.Any]] = {"machinekeys": {}, "certificate": {}, "firewall": {}, "tls": {}}
# Per-concern keys that name the moment or the run, not the plan.
VOLATILE = ("round_trips", "backup", "snapshot", "replanned", "diff")


def load(name: str) -> t.Any:
    return rdplab_fleet.load_fleet([HOSTS / f"{name}.yml"])[0]


def run(action_class: t.Any, host: t.Any, check_mode: bool = False, **args: t.Any) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=True, async_val=0, action="rdpfix.rdp.test")
    action = action_class(
        task, rdplab_direct.DirectConnection(host), SimpleNamespace(remote_addr="127.0.0.2"), None, None, None
    )
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name}))


def plans(result: dict[str, t.Any]) -> dict[str, dict[str, t.Any]]:
    return {
        name: {key: value for key, value in item.items() if key not in VOLATILE}
        for name, item in result["concerns"].items()
    }


@pytest.mark.parametrize(
    ("name", "apply_batches"),
    [("healthy", 0), ("combined-firewall-tls-expired", 1), ("combined-all", 2), ("tls-tls12-disabled", 1)],
)
def test_the_server_reads_once_and_plans_as_from_the_facts_snapshot(name: str, apply_batches: int) -> None:
    given = load(name)
    facts = run(facts_action.ActionModule, given, gather_events=False)
    from_facts = run(server_action.ActionModule, given, check_mode=True, snapshot=facts, **CONCERNS)

    host = load(name)
    audit = run(server_action.ActionModule, host, check_mode=True, **CONCERNS)
    assert not audit.get("failed"), audit.get("msg")
    assert host.counters.winrm_commands == 1 == audit["round_trips"]
    assert host.counters.writes == 0
    assert plans(audit) == plans(from_facts)

    repair = run(server_action.ActionModule, host, **CONCERNS)
    assert not repair.get("failed"), repair.get("msg")
    assert repair["round_trips"] == 1 + apply_batches == host.counters.winrm_commands - 1
    assert repair["changed"] is bool(apply_batches)
    rerun = run(server_action.ActionModule, host, **CONCERNS)
    assert rerun["changed"] is False and rerun["round_trips"] == 1


@pytest.mark.parametrize(
    ("concerns", "expected"),
    [
        ({"certificate": {"expiry_threshold_days": "soon"}}, "certificate: "),
        ({"firewall": {"profiles": ["Everywhere"]}}, "firewall: "),
        ({"tls": {"no_such_option": True}}, "tls: "),
        ({"certificate": {"replace_when": "always"}}, "replacement_thumbprint"),
    ],
)
def test_bad_concern_options_are_refused_before_the_host_is_contacted(
    concerns: dict[str, t.Any], expected: str
) -> None:
    host = load("expired-selfsigned")
    result = run(server_action.ActionModule, host, **concerns)
    assert result.get("failed") is True and expected in result["msg"], result
    assert result["msg"].startswith("Invalid arguments: ")
    assert host.counters.winrm_commands == 0
