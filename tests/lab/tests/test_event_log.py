"""The event log as Windows keeps and answers it: query limits, unreadable records, classic data, UI language."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest

from rdplab import agent_code
from rdplab.model import schannel
from rdplab.model.errors import HostFileError
from rdplab.model.events import RCM, SCHANNEL
from rdplab.model.host import WindowsHost

HOSTS = Path(__file__).resolve().parent.parent / "hosts"
SINCE = "2000-01-01T00:00:00Z"


def load(name: str) -> WindowsHost:
    return WindowsHost.from_file(HOSTS / f"{name}.yml")


def query(host: WindowsHost, *queries: dict[str, t.Any], max_events: int = 100) -> dict[str, t.Any]:
    batch = {"since": SINCE, "queries": list(queries), "max_events": max_events}
    [result] = host.run_batch({"v": 1, "ops": [{"op": "events.query", "args": batch}]})["results"]
    assert result["ok"] is True, result
    return t.cast(dict[str, t.Any], result["data"])


def test_rcm_events_in_the_system_log_carry_unnamed_data() -> None:
    host = load("healthy")
    host.inject_fault("break_selfsigned_key", {"mode": "deny_network_service"})
    host.rdp_view()
    [event] = [event for event in host.events.events if event.provider == RCM]
    assert event.id == 1058 and event.data == {"param0": "Access is denied"}
    answer = query(host, {"log": "System", "providers": [RCM], "ids": [[1050, 1065]]})
    assert [(item["id"], item["data"]) for item in answer["events"]] == [(1058, {"param0": "Access is denied"})]


def test_a_query_beyond_the_limit_is_refused_never_answered_empty() -> None:
    host = load("events-history")
    too_big = {
        "log": "System",
        "providers": [SCHANNEL, RCM],
        "ids": [36870, 36871, 36874, 36887, 36888, *range(1050, 1066)],
    }
    fits = {"log": "System", "providers": [SCHANNEL], "ids": [36870, 36874]}
    answer = query(host, too_big, fits)
    assert [item["id"] for item in answer["events"]] == [36874, 36870]
    [refused] = answer["invalid_queries"]
    assert refused["index"] == 0 and refused["log"] == "System"
    assert refused["reason"] == "The specified query is invalid."
    assert answer["unavailable"] == [] and answer["unreadable"] == []


def test_ranges_and_terms_count_as_windows_counts_them() -> None:
    host = load("events-history")
    # 1 provider + one range (two comparisons) + the start time: well within the limit.
    answer = query(host, {"log": "System", "providers": [RCM], "ids": [[1050, 1065]]})
    assert [item["id"] for item in answer["events"]] == [1058]
    # 22 single IDs and the start time: 23 terms, refused.
    answer = query(host, {"log": "System", "ids": list(range(36870, 36892))})
    assert answer["events"] == [] and len(answer["invalid_queries"]) == 1


def test_unreadable_records_are_skipped_and_counted_the_rest_kept() -> None:
    host = load("events-corrupt-records")
    answer = query(
        host,
        {"log": "System", "providers": [SCHANNEL], "ids": [36870, 36874, 36887, 36888]},
        {"log": "Security", "ids": [4625]},
    )
    assert sorted(item["id"] for item in answer["events"]) == [4625, 36870, 36874, 36887, 36888]
    assert sorted((item["log"], item["count"]) for item in answer["unreadable"]) == [("Security", 1), ("System", 1)]
    # The record whose description cannot be rendered is kept, with its data and without a message.
    [alert] = [item for item in answer["events"] if item["id"] == 36887]
    assert alert["message"] is None and alert["data"] == {"AlertDesc": "46"} and alert["level"] == 2


def test_levels_are_numbers_and_names_follow_the_ui_language() -> None:
    english = query(load("events-history"), {"log": "System", "providers": [SCHANNEL], "ids": [36888]})
    german = query(load("events-history-de"), {"log": "System", "providers": [SCHANNEL], "ids": [36888]})
    assert [(item["level"], item["level_name"]) for item in english["events"]] == [(2, "Error")]
    assert [(item["level"], item["level_name"]) for item in german["events"]] == [(2, "Fehler")]
    assert english["events"][0]["data"] == german["events"][0]["data"] == {"AlertDesc": "70", "ErrorState": "105"}


def test_the_labs_own_events_are_rendered_in_the_ui_language() -> None:
    path = HOSTS / "events-history-de.yml"
    host = WindowsHost.from_file(path)
    host.events.events.clear()
    schannel.log_handshake_failure(host, {"tls_failure": schannel.NO_COMMON_PROTOCOL})
    answer = query(host, {"log": "System", "providers": [SCHANNEL], "ids": [36888]})
    [event] = answer["events"]
    assert event["level_name"] == "Fehler"
    assert "70" in event["message"] and "fatal" not in event["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"system": {"locale": "xx-XX"}}, "system.locale"),
        ({"events": [{"provider": SCHANNEL, "id": 36888, "fault": "broken"}]}, "events[0].fault"),
    ],
)
def test_host_file_errors_name_the_field(tmp_path: Path, change: dict[str, t.Any], field: str) -> None:
    import yaml

    document = yaml.safe_load((HOSTS / "healthy.yml").read_text(encoding="utf-8"))
    document.update(change)
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    with pytest.raises(HostFileError, match=field.replace("[", r"\[").replace("]", r"\]")):
        WindowsHost.from_file(path)


# -- the agent before issue 9 (Get-WinEvent -FilterHashtable -ErrorAction Stop), answered as Windows answers it ----

BEFORE = agent_code.analyse(
    (Path(__file__).resolve().parent / "data" / "agent_before_issue9.ps1.txt").read_text(encoding="utf-8")
)
# The System query the facts module sent before: two providers, 21 IDs and the start time (24 expressions).
OLD_SYSTEM_QUERY = {
    "log": "System",
    "providers": [SCHANNEL, RCM],
    "ids": [36870, 36871, 36874, 36887, 36888, *range(1050, 1066)],
}


def test_before_an_oversize_query_came_back_as_no_events_now_it_is_refused() -> None:
    host = load("events-history")
    assert BEFORE.events_from_hashtable and not agent_code.current().events_from_hashtable
    with agent_code.using(BEFORE):
        before = query(host, OLD_SYSTEM_QUERY)
    # Defect 3: five matching events, and neither an event nor an error to say so.
    assert before == {"events": [], "unavailable": []}
    now = query(host, OLD_SYSTEM_QUERY)
    assert now["events"] == [] and [item["log"] for item in now["invalid_queries"]] == ["System"]


def test_before_one_unreadable_record_lost_its_log_now_it_costs_only_itself() -> None:
    host = load("events-corrupt-records")
    with agent_code.using(BEFORE):
        before = query(host, {"log": "Security", "ids": [4625]})
    # Defect 4: the readable 4625 is lost with the unreadable one.
    assert before == {"events": [], "unavailable": [{"log": "Security", "reason": "The data is invalid."}]}
    now = query(host, {"log": "Security", "ids": [4625]})
    assert [item["id"] for item in now["events"]] == [4625]
    assert now["unreadable"] == [{"log": "Security", "count": 1, "reason": "The data is invalid."}]


def test_before_the_level_was_the_localised_display_name_now_it_is_the_number() -> None:
    host = load("events-history-de")
    with agent_code.using(BEFORE):
        before = query(host, {"log": "System", "providers": [SCHANNEL], "ids": [36888]})
    # Defect 11: what the agent reported depended on the UI language.
    assert [item["level"] for item in before["events"]] == ["Fehler"]
    now = query(host, {"log": "System", "providers": [SCHANNEL], "ids": [36888]})
    assert [(item["level"], item["level_name"]) for item in now["events"]] == [(2, "Fehler")]


def test_the_agent_writes_each_query_as_the_lab_counts_it() -> None:
    """The lab counts a provider, a single ID and the start time as one expression each and a range as two; the
    agent's XPath must be written that way, read without tolerating query errors."""
    from rdplab.bootstrap import collection_root

    text = (collection_root() / "plugins" / "plugin_utils" / "_agent.ps1").read_text(encoding="utf-8")
    block = agent_code._operation(text, "events.query")
    assert "Provider[@Name='$providerName']" in block
    assert "'(EventID>=' + [int]$id[0] + ' and EventID<=' + [int]$id[1] + ')'" in block
    assert "'EventID=' + [int]$id" in block
    assert "TimeCreated[@SystemTime>='$sinceXPath']" in block
    code = "\n".join(line.split("#", 1)[0] for line in block.splitlines())  # the code, without comments
    assert "EventLogReader" in code and "Get-WinEvent" not in code and "TolerateQueryErrors" not in code
