"""rdpfix.rdp.facts against the lab's simulated hosts, through DirectConnection.

The central property: the audit and the fix never disagree. For every host file, the findings with a fix that facts
reports are exactly the changes the named fixing modules make in check mode - with the fix run's options, and, where a
finding names other options, with those.
"""

from __future__ import annotations

import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")

from ansible_collections.rdpfix.rdp.plugins.action import certificate as certificate_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import facts as facts_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import firewall as firewall_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import machinekeys as machinekeys_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import tls as tls_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import transport as transport_action  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
HOST_NAMES = sorted(path.stem for path in HOSTS.glob("*.yml"))

FIXING_MODULES: dict[str, t.Any] = {
    "rdpfix.rdp.certificate": certificate_action.ActionModule,
    "rdpfix.rdp.machinekeys": machinekeys_action.ActionModule,
    "rdpfix.rdp.firewall": firewall_action.ActionModule,
    "rdpfix.rdp.transport": transport_action.ActionModule,
    "rdpfix.rdp.tls": tls_action.ActionModule,
}
# The options every module falls back to, written out: a fix whose options are all among these is made by a fix run
# with the defaults, which is what facts judges by when it is given no options either.
DEFAULTS: dict[str, dict[str, t.Any]] = {
    "rdpfix.rdp.certificate": {},
    "rdpfix.rdp.machinekeys": {"strategy": "permissions"},
    "rdpfix.rdp.firewall": {"sides": ["server"], "disable_blocking_rules": False},
    "rdpfix.rdp.transport": {"mode": "tcp_only", "sides": ["server"]},
    "rdpfix.rdp.tls": {
        "enable_tls12": True,
        "enable_tls13": True,
        "legacy_protocols": [],
        "restore_security_layer": True,
        "nla": "enabled",
        "restore_cipher_suites": True,
        "override_policy": False,
    },
}


def load(source: str | Path) -> t.Any:
    path = source if isinstance(source, Path) else HOSTS / f"{source}.yml"
    return rdplab_fleet.load_fleet([path])[0]


def run(action_class: t.Any, host: t.Any, module: str, check_mode: bool = True, **args: t.Any) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=True, async_val=0, action=module)
    action = action_class(
        task, rdplab_direct.DirectConnection(host), SimpleNamespace(remote_addr="127.0.0.2"), None, None, None
    )
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name}))


def run_facts(host: t.Any, **args: t.Any) -> dict[str, t.Any]:
    return run(facts_action.ActionModule, host, "rdpfix.rdp.facts", **args)


def snapshot(host: t.Any) -> dict[str, t.Any]:
    state: dict[str, t.Any] = host.snapshot()
    state.pop("counters")
    return state


def applies_by_default(module: str, options: dict[str, t.Any]) -> bool:
    defaults = DEFAULTS[module]
    return all(defaults.get(name) == value for name, value in options.items())


def changing_ids(module: str, result: dict[str, t.Any]) -> set[str]:
    """The ids of the findings the module says its run changes (check mode: would change)."""
    found = result.get("findings") or []
    return {
        item["id"] for item in found if item.get("fix") and applies_by_default(module, item["fix"].get("options") or {})
    }


@pytest.mark.parametrize("name", HOST_NAMES)
def test_one_command_and_nothing_changes(name: str) -> None:
    host = load(name)
    before = snapshot(host)
    result = run_facts(host)
    assert not result.get("failed"), result.get("msg")
    assert result["changed"] is False
    assert (host.counters.winrm_commands, host.counters.writes) == (1, 0)
    assert result["round_trips"] == 1
    assert snapshot(host) == before
    for finding in result["findings"]:
        assert set(finding) >= {"id", "severity", "title", "cause", "evidence", "fix"}, finding
        assert finding["severity"] in ("critical", "warning", "security", "info")


# The finding that says a module's run refuses on the host (fails, in check mode too, and changes nothing).
REFUSALS: dict[str, str] = {
    "rdpfix.rdp.certificate": "certificate.plan_refused",
    "rdpfix.rdp.machinekeys": "machinekeys.repair_refused",
    "rdpfix.rdp.firewall": "firewall.plan_refused",
}


@pytest.mark.parametrize("name", HOST_NAMES)
def test_audit_equals_fix_in_check_mode(name: str) -> None:
    """Per fixing module: facts' fixable findings are exactly what the module's check-mode run would change, and the
    audit reports a refusal exactly where the module's check-mode run fails (and its real run too)."""
    facts = run_facts(load(name))
    fixable = [item for item in facts["findings"] if item["fix"]]
    audit_ids = {item["id"] for item in facts["findings"]}
    for module, action_class in FIXING_MODULES.items():
        result = run(action_class, load(name), module)
        refused = REFUSALS.get(module) in audit_ids
        assert bool(result.get("failed")) == refused, f"{module} on {name}: {result.get('msg')}"
        if refused:
            host = load(name)
            before = snapshot(host)
            real = run(action_class, host, module, check_mode=False)
            assert real.get("failed") and real["msg"] == result["msg"], (module, name, real.get("msg"))
            assert snapshot(host) == before, f"{module} refused on {name} but changed the host"
            continue
        by_default = {
            item["id"]
            for item in fixable
            if item["fix"]["module"] == module and applies_by_default(module, item["fix"]["options"] or {})
        }
        would_change = changing_ids(module, result)
        assert by_default == would_change, (module, name, by_default, would_change)
        assert bool(result["changed"]) == bool(by_default), (module, name, result["changed"], by_default)


@pytest.mark.parametrize("name", HOST_NAMES)
def test_fixes_with_other_options_change_something(name: str) -> None:
    """A finding whose fix names options is a change the module makes when run with them."""
    facts = run_facts(load(name))
    for item in facts["findings"]:
        fix = item["fix"]
        if not fix or applies_by_default(fix["module"], fix["options"] or {}):
            continue
        result = run(FIXING_MODULES[fix["module"]], load(name), fix["module"], **fix["options"])
        assert not result.get("failed"), result.get("msg")
        assert result["changed"] is True, (name, item["id"], fix)
        assert item["id"] in {finding["id"] for finding in result["findings"]}


def test_a_repaired_host_has_no_fixable_findings() -> None:
    """After the fixing modules ran for real, facts finds nothing left that a module would change."""
    host = load("combined-firewall-tls-expired")
    assert any(item["fix"] for item in run_facts(host)["findings"])
    for module, action_class in FIXING_MODULES.items():
        result = run(action_class, host, module, check_mode=False)
        assert not result.get("failed"), f"{module}: {result.get('msg')}"
    after = run_facts(host)
    assert [item["id"] for item in after["findings"] if item["fix"]] == []
    assert after["counts"]["critical"] == 0


def test_findings_are_most_urgent_first_and_counted() -> None:
    result = run_facts(load("combined-firewall-tls-expired"))
    order = {"critical": 0, "warning": 1, "security": 2, "info": 3}
    ranks = [order[item["severity"]] for item in result["findings"]]
    assert ranks == sorted(ranks)
    assert result["status"] == "critical"
    assert result["counts"]["critical"] == sum(1 for item in result["findings"] if item["severity"] == "critical")
    assert result["fixed_by"] == sorted({item["fix"]["module"] for item in result["findings"] if item["fix"]})
    assert result["ansible_facts"]["rdpfix_rdp"]["findings"] == result["findings"]


def test_facts_report_the_state_read() -> None:
    host = load("firewall-moved-port")
    rdp = run_facts(host)["rdp"]
    assert rdp["remote_desktop"]["port"] == 3390
    assert rdp["system"]["hostname"] == "FWPORT01"
    assert rdp["certificate"]["source"] == "self_signed"
    assert rdp["firewall"]["server"]["port"] == 3390
    assert "TermService" in rdp["services"]
    assert rdp["events"]["unavailable"] == []


def with_events(tmp_path: Path, base: str, events: list[dict[str, t.Any]]) -> Path:
    document = yaml.safe_load((HOSTS / f"{base}.yml").read_text(encoding="utf-8"))
    document["events"] = events
    path = tmp_path / f"{base}-events.yml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


SCHANNEL = "Schannel"
RCM = "Microsoft-Windows-TerminalServices-RemoteConnectionManager"


def test_events_explained_by_a_current_finding_become_its_evidence(tmp_path: Path) -> None:
    path = with_events(
        tmp_path,
        "expired-selfsigned",
        [
            {"provider": RCM, "id": 1058, "level": "Error", "time": "-1h", "message": "failed to replace"},
            {"provider": RCM, "id": 1058, "level": "Error", "time": "-30d", "message": "older than the window"},
        ],
    )
    result = run_facts(load(path))
    expired = next(item for item in result["findings"] if item["id"] == "certificate.self_signed_expired")
    assert [event["id"] for event in expired["evidence"]["events"]] == [1058]
    assert not [item for item in result["findings"] if item["id"].startswith("events.")]
    assert result["rdp"]["events"]["count"] == 1


def test_unexplained_events_are_findings_with_alerts_named(tmp_path: Path) -> None:
    path = with_events(
        tmp_path,
        "healthy",
        [
            {
                "provider": SCHANNEL,
                "id": 36874,
                "level": "Error",
                "time": "-2h",
                "message": "An TLS 1.2 connection request was received from a remote client application, but none of "
                "the cipher suites supported by the client application are supported by the server.",
            },
            {
                "provider": SCHANNEL,
                "id": 36888,
                "level": "Error",
                "time": "-2h",
                "message": "A fatal alert was generated and sent to the remote endpoint.",
                "data": {"AlertDesc": "40"},
            },
            {
                "provider": SCHANNEL,
                "id": 36887,
                "level": "Error",
                "time": "-3h",
                "message": "A fatal alert was received from the remote endpoint. The TLS protocol defined fatal alert "
                "code is 46.",
                # The code comes from the event data, as Windows records it; the message is never parsed.
                "data": {"AlertDesc": "46"},
            },
            {
                "log": "Security",
                "provider": "Microsoft-Windows-Security-Auditing",
                "id": 4625,
                "level": "Information",
                "time": "-1h",
                "message": "An account failed to log on.",
                "data": {"LogonType": "10", "IpAddress": "10.1.2.3", "SubStatus": "0xc000006a"},
            },
        ],
    )
    result = run_facts(load(path))
    by_id = {item["id"]: item for item in result["findings"]}
    assert by_id["events.schannel_no_common_cipher"]["severity"] == "warning"
    assert by_id["events.schannel_no_common_cipher"]["fix"] is None
    assert by_id["events.tls_alert_sent"]["evidence"]["alerts"] == {"40 handshake_failure": 1}
    # Unexplained by a current finding, a mismatch alert is a client's or a scanner's (the probe's trials leave them).
    assert by_id["events.tls_alert_sent"]["severity"] == "info"
    assert by_id["events.tls_alert_received"]["evidence"]["alerts"] == {"46 certificate_unknown": 1}
    assert by_id["events.tls_alert_received"]["severity"] == "info"
    assert by_id["events.logon_failures"]["evidence"]["logon_types"] == {"remote interactive (RDP)": 1}
    assert by_id["events.logon_failures"]["evidence"]["source_addresses"] == {"10.1.2.3": 1}


def test_event_days_bounds_the_history(tmp_path: Path) -> None:
    path = with_events(
        tmp_path, "healthy", [{"provider": SCHANNEL, "id": 36870, "level": "Error", "time": "-20d", "message": "x"}]
    )
    assert "events.schannel_key_access" not in {item["id"] for item in run_facts(load(path))["findings"]}
    wider = run_facts(load(path), event_days=30)
    assert "events.schannel_key_access" in {item["id"] for item in wider["findings"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"event_days": 0}, "event_days"),
        ({"max_events": 5000}, "max_events"),
        ({"firewall_profiles": ["Office"]}, "firewall_profiles"),
        ({"transport_mode": "udp"}, "transport_mode"),
        ({"connect_name": "  "}, "connect_name"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_input_fails_before_the_host_is_touched(args: dict[str, t.Any], message: str) -> None:
    host = load("healthy")
    result = run_facts(host, **args)
    assert result["failed"] is True
    assert message in result["msg"]
    assert host.counters.winrm_commands == 0


def test_connect_name_checks_resolution_and_certificate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(facts_action, "resolve", lambda name: (["10.9.9.9"], None))
    result = run_facts(load("healthy"), connect_name="rds.example.com")
    ids = {item["id"] for item in result["findings"]}
    assert {
        "name_resolution.other_address",
        "name_resolution.alias",
        "name_resolution.certificate_name_mismatch",
    } <= ids
    monkeypatch.setattr(facts_action, "resolve", lambda name: (None, "Name or service not known"))
    unresolved = run_facts(load("healthy"), connect_name="nowhere.example.com")
    finding = next(item for item in unresolved["findings"] if item["id"] == "name_resolution.unresolvable")
    assert finding["severity"] == "critical" and finding["evidence"]["error"] == "Name or service not known"
