"""The guard operation (docs/agent-protocol.md, "Guards"): a read compared with what a plan relied on, stopping an
apply batch before its first write when the host changed."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest

from rdplab.model.host import WindowsHost
from rdplab.ops.guard import first_difference

HOSTS = Path(__file__).resolve().parent.parent / "hosts"
RDP_TCP = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations\\RDP-Tcp"


def load(name: str = "healthy") -> WindowsHost:
    return WindowsHost.from_file(HOSTS / f"{name}.yml")


def batch(*ops: dict[str, t.Any]) -> dict[str, t.Any]:
    return {"v": 1, "on_error": "stop", "ops": list(ops)}


def guard(expect: object, read: dict[str, t.Any], match: str = "equal", **extra: t.Any) -> dict[str, t.Any]:
    return {
        "op": "guard",
        "args": {"label": "the plan's view", "read": read, "expect": expect, "match": match, **extra},
    }


SESSIONS = {"op": "session.list", "args": {}}
WRITE = {"op": "registry.set", "args": {"path": RDP_TCP, "name": "rdpfixProbe", "type": "REG_DWORD", "value": 1}}


def test_a_guard_that_holds_lets_the_batch_write() -> None:
    host = load()
    sessions = host.sessions.snapshot()
    results = host.run_batch(batch(guard({"sessions": sessions}, SESSIONS), WRITE))["results"]
    assert results[0] == {"op": "guard", "ok": True, "data": {"actual": {"sessions": sessions}}}
    assert results[1]["ok"] is True
    assert host.counters.writes == 1


def test_a_user_who_logged_on_since_the_read_stops_the_batch_before_its_write() -> None:
    host = load()
    sessions = host.sessions.snapshot()
    host.inject_fault("add_session", {"user": "CORP\\carol"})
    before = host.snapshot()
    results = host.run_batch(batch(guard(sessions, SESSIONS, pick=["sessions"]), WRITE))["results"]
    failed, skipped = results
    assert failed["ok"] is False and failed["error"]["type"] == "GuardFailed"
    assert (
        failed["error"]["message"] == "the plan's view: sessions: expected a list of 3 items, found a list of 4 items"
    )
    assert [item["user"] for item in failed["data"]["actual"] if item["user"]] == ["CORP\\carol"]
    assert skipped == {"op": "registry.set", "ok": False, "skipped": True}
    after = host.snapshot()
    assert after.pop("counters")["writes"] == 0
    before.pop("counters")
    assert after == before


def test_pick_where_finds_a_certificate_by_thumbprint_and_names_the_difference() -> None:
    host = load("expired-selfsigned")
    [cert] = host.run_batch(batch({"op": "cert.list", "args": {"store": "Remote Desktop"}}))["results"][0]["data"][
        "certificates"
    ]
    read = {"op": "cert.list", "args": {"store": "Remote Desktop"}}
    pick = ["certificates", {"where": {"thumbprint": cert["thumbprint"]}}]
    expect = [{"thumbprint": cert["thumbprint"], "key": {"path": cert["key"]["path"], "sddl": cert["key"]["sddl"]}}]
    [held] = host.run_batch(batch(guard(expect, read, "subset", pick=pick)))["results"]
    assert held["ok"] is True and held["data"]["actual"][0]["der_b64"] == cert["der_b64"]
    # Equal needs every member: the same expectation fails on the first member it does not name.
    [strict] = host.run_batch(batch(guard(expect, read, "equal", pick=pick)))["results"]
    assert strict["error"]["type"] == "GuardFailed"
    assert strict["error"]["message"].startswith(
        f'the plan\'s view: certificates[thumbprint="{cert["thumbprint"]}"][0].key.provider_kind: expected nothing'
    )
    # The certificate gone: the where step keeps nothing.
    host.stores.remove("Remote Desktop", cert["thumbprint"])
    [gone] = host.run_batch(batch(guard(expect, read, "subset", pick=pick)))["results"]
    assert gone["error"]["message"].endswith(": expected a list of 1 item, found a list of 0 items")
    assert gone["data"] == {"actual": []}


def test_a_failed_read_keeps_its_own_error_type_and_a_write_is_no_guard_read() -> None:
    host = load()
    host.inject_fault("fail_writes_under", {"path": "C:\\ProgramData\\rdpfix", "error": "AccessDenied"})
    [bad] = host.run_batch(batch(guard({}, {"op": "dir.list", "args": {"path": "relative"}})))["results"]
    assert bad["error"]["type"] == "InvalidArgument"
    assert bad["error"]["message"].startswith("the plan's view: dir.list failed: ")
    assert "data" not in bad
    for op in ("registry.set", "guard", "no.such"):
        [refused] = host.run_batch(batch(guard({}, {"op": op, "args": {}})))["results"]
        assert refused["error"]["type"] == "InvalidArgument", op
    [no_expect] = host.run_batch(
        batch({"op": "guard", "args": {"label": "x", "read": SESSIONS}}),
    )["results"]
    assert no_expect["error"]["message"] == "missing argument 'expect'"
    [bad_pick] = host.run_batch(batch(guard([], SESSIONS, pick=[{"where": {}}])))["results"]
    assert bad_pick["error"]["type"] == "InvalidArgument"


@pytest.mark.parametrize(
    ("expected", "actual", "match", "difference"),
    [
        (1, 1.0, "equal", None),
        (True, 1, "equal", "value: expected true, found 1"),
        ("ABC", "abc", "equal", 'value: expected "ABC", found "abc"'),
        (["3389"], "3389", "equal", 'value: expected a list of 1 item, found "3389"'),
        ([1, 2], [2, 1], "equal", "value[0]: expected 1, found 2"),
        ({"a": None}, {}, "subset", "a: expected null, found nothing"),
        ({"a": None}, {"a": None, "b": 2}, "subset", None),
        ({"a": None}, {"a": None, "b": 2}, "equal", "b: expected nothing, found 2"),
        ({"a": [{"b": 1}]}, {"a": [{"b": 1, "c": 2}]}, "subset", None),
        ({"a": [{"b": 1}]}, {"a": [{"b": 1, "c": 2}]}, "equal", "a[0].c: expected nothing, found 2"),
        ({"A": 1}, {"a": 1}, "subset", "A: expected 1, found nothing"),
        (None, {"x": 1}, "equal", "value: expected null, found an object"),
        ("x" * 90, "y", "equal", f'value: expected "{"x" * 80}...", found "y"'),
    ],
)
def test_comparison_rules(expected: object, actual: object, match: str, difference: str | None) -> None:
    assert first_difference(expected, actual, match) == difference
