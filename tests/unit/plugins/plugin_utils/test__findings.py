"""One finding shape everywhere: the shared builder, and every planner's findings on every lab host.

The second part runs rdpfix.rdp.facts and every fixing module (check mode) against each simulated host of
tests/lab/hosts, so each planner meets every state the lab models; every finding any of them reports must have the shape
of docs/findings.md with a severity and a cause from the shared vocabularies.
"""

from __future__ import annotations

import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _findings as findings

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
HOST_NAMES = sorted(path.stem for path in HOSTS.glob("*.yml"))
FIXING_MODULES = ("certificate", "machinekeys", "firewall", "transport", "tls")


def test_finding_has_the_documented_keys_and_likely_cause_only_when_given() -> None:
    plain = findings.finding("tls.nla_disabled", "security", "NLA is off", "security_downgrade", {"value": 0}, None)
    assert plain == {
        "id": "tls.nla_disabled",
        "severity": "security",
        "title": "NLA is off",
        "cause": "security_downgrade",
        "evidence": {"value": 0},
        "fix": None,
    }
    explained = findings.finding("service.x", "info", "t", "service", {}, None, likely_cause="because")
    assert explained["likely_cause"] == "because"
    assert findings.shape_problems(plain) == [] and findings.shape_problems(explained) == []


@pytest.mark.parametrize(
    ("severity", "cause", "named"),
    [("error", "certificate", "severity 'error'"), ("critical", "events", "cause 'events'")],
)
def test_finding_refuses_words_outside_the_vocabularies(severity: str, cause: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        findings.finding("certificate.self_signed_expired", severity, "t", cause, {}, None)


def test_fix_names_the_module_by_its_full_name() -> None:
    assert findings.fix("tls", {"nla": "enabled"}, "set UserAuthentication to 1") == {
        "module": "rdpfix.rdp.tls",
        "options": {"nla": "enabled"},
        "description": "set UserAuthentication to 1",
    }


def test_shape_problems_name_what_is_wrong() -> None:
    # The certificate planner's shape before the findings were unified: every difference is named.
    old = {"id": "self_signed_expired", "severity": "error", "message": "the certificate expired"}
    problems = " | ".join(findings.shape_problems(old))
    for expected in ("missing cause, evidence, fix, title", "unknown keys message", "severity 'error'", "<concern>"):
        assert expected in problems, problems


def test_urgency_orders_most_urgent_first() -> None:
    items = [
        findings.finding(f"x.{severity}", severity, "t", "service", {}, None)
        for severity in ("info", "security", "critical", "warning")
    ]
    assert [item["severity"] for item in sorted(items, key=findings.urgency)] == list(findings.SEVERITIES)


# ---------------------------------------------------------------------------------------------------- every planner


def _run(module: str, host: t.Any) -> dict[str, t.Any]:
    direct = pytest.importorskip("rdplab.direct")
    action_module = __import__(
        f"ansible_collections.rdpfix.rdp.plugins.action.{module}", fromlist=["ActionModule"]
    ).ActionModule
    task = SimpleNamespace(args={}, check_mode=True, diff=True, async_val=0, action=f"rdpfix.rdp.{module}")
    action = action_module(task, direct.DirectConnection(host), SimpleNamespace(remote_addr="127.0.0.2"), *[None] * 3)
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name}))


@pytest.mark.parametrize("name", HOST_NAMES)
def test_every_planner_emits_only_the_shared_shape(name: str) -> None:
    fleet = pytest.importorskip("rdplab.model.fleet")
    seen: list[tuple[str, dict[str, t.Any]]] = []
    for module in ("facts", *FIXING_MODULES):
        result = _run(module, fleet.load_fleet([HOSTS / f"{name}.yml"])[0])
        # A refusal (the module changes nothing and fails) must still explain itself with findings.
        assert not result.get("failed") or result.get("findings"), f"{module} on {name}: {result.get('msg')}"
        seen += [(module, item) for item in result.get("findings") or []]
    assert seen, f"{name}: no module reported anything, so nothing was checked"
    for module, item in seen:
        assert findings.shape_problems(item) == [], (module, item)
        if item["fix"] is not None:
            assert item["fix"]["module"] in {f"rdpfix.rdp.{fixing}" for fixing in FIXING_MODULES}, (module, item)
