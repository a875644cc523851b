"""rdpfix.rdp.facts reads the event log as Windows has it: within the query limits, despite unreadable records, in
any UI language. Against the lab's host files with event history (tests/lab/hosts/events-*.yml)."""

from __future__ import annotations

import typing as t
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")

from ansible_collections.rdpfix.rdp.plugins.action import facts as facts_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _events as ev  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"

HISTORY_FINDINGS = {
    "machinekeys.past_key_errors",  # 1058 and 36870, from the machinekeys concern's own (small) query
    "events.schannel_key_access",
    "events.schannel_no_common_cipher",
    "events.tls_alert_sent",
    "events.tls_alert_received",
    "events.logon_failures",
}


def load(name: str) -> t.Any:
    return rdplab_fleet.load_fleet([HOSTS / f"{name}.yml"])[0]


def run_facts(host: t.Any, **args: t.Any) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=True, diff=False, async_val=0, action="rdpfix.rdp.facts")
    action = facts_action.ActionModule(
        task, rdplab_direct.DirectConnection(host), SimpleNamespace(remote_addr="127.0.0.2"), None, None, None
    )
    result = t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name}))
    assert not result.get("failed"), result.get("msg")
    return result


def comparable(findings: list[dict[str, t.Any]]) -> list[dict[str, t.Any]]:
    """Findings without the text Windows writes in the host's UI language (event messages), and without the query's
    start time (when the test ran)."""
    shown = []
    for finding in findings:
        item = {key: value for key, value in finding.items() if key != "evidence"}
        evidence = dict(finding.get("evidence") or {})
        evidence.pop("since", None)
        if "events" in evidence:
            evidence["events"] = [
                {key: value for key, value in event.items() if key != "message"} for event in evidence["events"]
            ]
        item["evidence"] = evidence
        shown.append(item)
    return shown


def test_every_logged_event_is_found_within_the_query_limits() -> None:
    """Defect 3: the System log query (two providers, 21 IDs, a start time) was beyond the event log's limit and
    came back empty; split per provider with ID ranges, every event is found and nothing is refused."""
    result = run_facts(load("events-history"))
    events = result["rdp"]["events"]
    assert events["count"] == 6
    assert events["by_id"] == {
        f"{ev.RCM} 1058": 1,
        "Schannel 36870": 1,
        "Schannel 36874": 1,
        "Schannel 36888": 1,
        "Schannel 36887": 1,
        "Microsoft-Windows-Security-Auditing 4625": 1,
    }
    assert (events["unavailable"], events["invalid_queries"], events["unreadable"]) == ([], [], [])
    assert {item["id"] for item in result["findings"]} >= HISTORY_FINDINGS
    alerts = {item["id"]: item["evidence"].get("alerts") for item in result["findings"]}
    assert alerts["events.tls_alert_sent"] == {"70 protocol_version": 1}
    assert alerts["events.tls_alert_received"] == {"46 certificate_unknown": 1}


def test_the_facts_batch_sends_only_queries_within_the_limit() -> None:
    from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _facts

    batch, _unused = _facts._events_reads(_facts.FactsOptions(), datetime(2026, 11, 25, tzinfo=UTC))
    [op] = batch.ops
    assert op["op"] == "events.query"
    for query in op["args"]["queries"]:
        assert ev.query_terms(query) <= ev.MAX_QUERY_TERMS, query
    # What the checks were for: every provider and ID the event kinds name is asked for.
    asked = {
        (provider, event_id)
        for query in op["args"]["queries"]
        for provider in query.get("providers") or [None]
        for event_id in ev.expand_ids(query.get("ids") or [])
    }
    assert {(ev.SCHANNEL, event_id) for event_id in ev.SCHANNEL_IDS} <= asked
    assert {(ev.RCM, event_id) for event_id in ev.RCM_IDS} <= asked
    assert (None, ev.LOGON_FAILURE_ID) in asked


def test_an_unreadable_record_costs_only_itself() -> None:
    """Defect 4: one record that cannot be read made its whole log 'unavailable'; now the others are kept and the
    unreadable ones counted, and facts says so."""
    twin = run_facts(load("events-history"))
    result = run_facts(load("events-corrupt-records"))
    events = result["rdp"]["events"]
    assert events["unavailable"] == []
    assert sorted((item["log"], item["count"]) for item in events["unreadable"]) == [("Security", 1), ("System", 1)]
    assert events["count"] == twin["rdp"]["events"]["count"]
    # The record whose description could not be rendered is kept, without a message.
    [alert] = [item for item in events["entries"] if item["id"] == 36887]
    assert alert["message"] == "" and alert["alert"] == "46 certificate_unknown"
    by_id = {item["id"]: item for item in result["findings"]}
    unreadable = by_id.pop("events.records_unreadable")
    assert unreadable["severity"] == "info" and unreadable["fix"] is None
    assert unreadable["evidence"]["count"] == 2
    assert unreadable["evidence"]["logs"] == {"Security": 1, "System": 1}
    rest = [item for item in result["findings"] if item["id"] != "events.records_unreadable"]
    assert comparable(rest) == comparable(twin["findings"])


def test_a_german_host_gives_the_findings_of_its_english_twin() -> None:
    """Defect 11: level names and messages are localised; nothing rdpfix decides may depend on English text."""
    english = run_facts(load("events-history"))
    german = run_facts(load("events-history-de"))
    assert {item["level"] for item in german["rdp"]["events"]["entries"]} <= {"Error", "Information"}
    assert comparable(german["findings"]) == comparable(english["findings"])
    assert german["rdp"]["events"]["by_id"] == english["rdp"]["events"]["by_id"]
