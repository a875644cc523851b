"""The event-log side of rdpfix.rdp.facts: classification, alert codes, evidence versus findings, and the lab op."""

from __future__ import annotations

import typing as t

import pytest

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _events as ev
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch, BatchResult, OpResult
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._facts import MergedBatch


def event(provider: str, event_id: int, time: str = "2026-11-25T10:00:00Z", **extra: t.Any) -> dict[str, t.Any]:
    return {
        "log": "System",
        "provider": provider,
        "id": event_id,
        "level": 2,
        "time": time,
        "message": "m",
        **extra,
    }


@pytest.mark.parametrize(
    ("provider", "event_id", "kind"),
    [
        (ev.SCHANNEL, 36870, "key_access"),
        (ev.SCHANNEL, 36871, "credential"),
        (ev.SCHANNEL, 36874, "no_common_cipher"),
        (ev.SCHANNEL, 36887, "alert_received"),
        (ev.SCHANNEL, 36888, "alert_sent"),
        (ev.RCM, 1057, "selfsigned_not_created"),
        (ev.RCM, 1058, "selfsigned_not_created"),
        (ev.RCM, 1051, "pinned_problem"),
        (ev.RCM, 1055, "pinned_problem"),
        (ev.RCM, 1063, "template_problem"),
        (ev.RCM, 1059, "settings_reset"),
        (ev.SECURITY_AUDITING, 4625, "logon_failure"),
        (ev.SCHANNEL, 36880, None),
        ("Service Control Manager", 7036, None),
    ],
)
def test_classify(provider: str, event_id: int, kind: str | None) -> None:
    assert ev.classify(ev.Event.from_agent(event(provider, event_id))) == kind


def test_alert_code_from_event_data_never_from_the_message() -> None:
    from_data = ev.Event.from_agent(event(ev.SCHANNEL, 36888, data={"AlertDesc": "70", "ErrorState": "105"}))
    # The message is in the host's UI language: it is shown, never parsed.
    text_only = ev.Event.from_agent(
        event(ev.SCHANNEL, 36887, message="The TLS protocol defined fatal alert code is 48.")
    )
    assert (ev.alert_code(from_data), ev.alert_code(text_only)) == (70, None)
    assert from_data.brief()["alert"] == "70 protocol_version"
    assert ev.alert_code(ev.Event.from_agent(event(ev.SCHANNEL, 36870, data={"AlertDesc": "70"}))) is None


def test_levels_are_numbers_named_in_english_whatever_the_host_language() -> None:
    assert ev.Event.from_agent(event(ev.SCHANNEL, 36888, level=2)).brief()["level"] == "Error"
    # A localised LevelDisplayName where the number belongs is not an event rdpfix can judge.
    assert ev.parse_events([event(ev.SCHANNEL, 36888, level="Fehler")]) == []


def test_query_terms_ranges_and_splitting() -> None:
    assert ev.compress_ids([1050, 1051, 1052, 1054, 36870, 36871]) == [[1050, 1052], 1054, 36870, 36871]
    assert ev.query_terms({"log": "System", "providers": ["A", "B"], "ids": [[1050, 1065], 4]}) == 6
    # The query the facts module used to send: two providers, 21 IDs and the start time.
    old = {"log": "System", "providers": [ev.SCHANNEL, ev.RCM], "ids": [*ev.SCHANNEL_IDS, *ev.RCM_IDS]}
    assert ev.query_terms(old) == 24
    with pytest.raises(ev.QueryLimitError, match="24 terms"):
        ev.check_query(old)
    many = ev.split_query("System", ["A", "B"], range(1, 80, 2))
    assert {tuple(query["providers"]) for query in many} == {("A",), ("B",)}
    assert all(ev.query_terms(query) <= ev.MAX_QUERY_TERMS for query in many)
    assert sorted(i for query in many if query["providers"] == ["A"] for i in ev.expand_ids(query["ids"])) == list(
        range(1, 80, 2)
    )
    with pytest.raises(ev.QueryLimitError, match="range"):
        ev.check_query({"log": "System", "ids": [[5, 1]]})


def test_read_findings_count_unreadable_records_and_name_refused_queries() -> None:
    findings = ev.read_findings(
        [{"log": "System", "count": 2, "reason": "The data is invalid."}, {"log": "Security", "count": 1}],
        [{"index": 0, "log": "System", "reason": "The specified query is invalid."}],
    )
    by_id = {item["id"]: item for item in findings}
    assert by_id["events.records_unreadable"]["evidence"]["logs"] == {"Security": 1, "System": 2}
    assert by_id["events.records_unreadable"]["severity"] == "info"
    assert by_id["events.query_refused"]["severity"] == "warning"
    assert ev.read_findings([], []) == []


def test_parse_events_dedupes_and_orders_newest_first() -> None:
    older = event(ev.RCM, 1058, time="2026-11-24T10:00:00Z")
    newer = event(ev.RCM, 1057, time="2026-11-25T10:00:00Z")
    parsed = ev.parse_events([older, newer, dict(newer, log=f"{ev.RCM}/Admin"), "junk"])
    assert [item.id for item in parsed] == [1057, 1058]


def test_assess_attaches_explained_events_and_reports_the_rest() -> None:
    parsed = ev.parse_events([event(ev.SCHANNEL, 36870), event(ev.SCHANNEL, 36874)])
    assessment = ev.assess(parsed, ["machinekeys.rdp_key_not_readable", "transport.server_policy_mismatch"])
    assert [item["id"] for item in assessment.evidence["machinekeys.rdp_key_not_readable"]] == [36870]
    assert "transport.server_policy_mismatch" not in assessment.evidence
    assert [item["id"] for item in assessment.findings] == ["events.schannel_no_common_cipher"]
    only = assessment.findings[0]
    assert only["fix"] is None and only["evidence"]["count"] == 1 and only["cause"] == "tls"


def test_mismatch_alerts_are_evidence_of_a_current_tls_finding_other_alerts_stay_findings() -> None:
    mismatch = event(ev.SCHANNEL, 36888, data={"AlertDesc": "70"})
    unknown_ca = event(ev.SCHANNEL, 36888, time="2026-11-25T09:00:00Z", data={"AlertDesc": "48"})
    parsed = ev.parse_events([mismatch, unknown_ca])
    with_finding = ev.assess(parsed, ["tls.tls12_disabled"])
    assert [item["alert"] for item in with_finding.evidence["tls.tls12_disabled"]] == ["70 protocol_version"]
    (alone,) = with_finding.findings
    assert alone["id"] == "events.tls_alert_sent" and alone["evidence"]["alerts"] == {"48 unknown_ca": 1}
    # Without a current TLS finding, both alerts are a finding of their own (the fault may have been repaired).
    without = ev.assess(parsed, ["certificate.self_signed_expired"])
    assert without.evidence == {}
    assert [item["evidence"]["count"] for item in without.findings] == [2]


def test_merged_batch_sends_each_operation_once_and_maps_back() -> None:
    first, second = Batch(on_error="continue"), Batch(on_error="continue")
    first.add("system.info")
    first.add("registry.get", path="HKLM:\\A")
    second.add("registry.get", path="HKLM:\\A")
    second.add("registry.get", path="HKLM:\\B")
    merged = MergedBatch()
    merged.include("first", first)
    merged.include("second", second)
    assert len(merged.batch.ops) == 3
    results = [OpResult(op=item["op"], ok=True, data={"n": index}) for index, item in enumerate(merged.batch.ops)]
    view = merged.view("second", BatchResult("h", results))
    assert [item.data["n"] for item in view.results] == [1, 2]


rdplab_fleet = pytest.importorskip("rdplab.model.fleet")
rdplab_events = pytest.importorskip("rdplab.ops.events")


def test_lab_op_filters_by_log_provider_id_and_time(tmp_path: t.Any) -> None:
    from pathlib import Path

    import yaml

    hosts = Path(__file__).resolve().parents[3] / "lab" / "hosts"
    document = yaml.safe_load((hosts / "healthy.yml").read_text(encoding="utf-8"))
    document["events"] = [
        {"provider": ev.SCHANNEL, "id": 36870, "time": "-1h", "message": "new", "data": {"state": "10001"}},
        {"provider": ev.SCHANNEL, "id": 36870, "time": "-40d", "message": "old"},
        {"provider": ev.SCHANNEL, "id": 36880, "time": "-1h", "message": "other id"},
        {"log": "Security", "provider": ev.SECURITY_AUDITING, "id": 4625, "time": "-2h", "message": "logon"},
    ]
    path = tmp_path / "host.yml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    host = rdplab_fleet.load_fleet([path])[0]
    since = "2000-01-01T00:00:00Z"
    answer = rdplab_events.events_query(
        host,
        {"since": since, "queries": [*ev.QUERIES, {"log": "Microsoft-Windows-Nonexistent/Admin"}], "max_events": 1},
    )
    assert [(item["id"], item["message"]) for item in answer["events"]] == [(36870, "new"), (4625, "logon")]
    assert answer["events"][0]["data"] == {"state": "10001"}
    assert [item["log"] for item in answer["unavailable"]] == ["Microsoft-Windows-Nonexistent/Admin"]
    with pytest.raises(Exception, match="since"):
        rdplab_events.events_query(host, {"since": "yesterday", "queries": []})
