"""The self-test's schemas and its small JSON Schema validator, which must agree with the jsonschema package."""

from __future__ import annotations

import copy
import typing as t
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _agent
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _selftest as selftest

jsonschema = pytest.importorskip("jsonschema")
rdplab_host = pytest.importorskip("rdplab.model.host")

SCHEMAS = selftest.load_schemas()
HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"


def test_every_read_operation_and_only_those_have_a_schema() -> None:
    assert set(SCHEMAS["operations"]) == set(_agent.READ_OPERATIONS)


@pytest.mark.parametrize("op", sorted(_agent.READ_OPERATIONS))
def test_schemas_are_valid_draft_2020_12(op: str) -> None:
    jsonschema.Draft202012Validator.check_schema(selftest.operation_schema(SCHEMAS, op))


def test_the_self_test_runs_every_read_operation_once() -> None:
    _batch, first = selftest.first_batch(datetime(2026, 12, 1, tzinfo=UTC), [{"log": "System"}])
    _batch2, second = selftest.second_batch("C:\\ProgramData", None)
    ops = [item.op for item in first + second]
    assert sorted(ops) == sorted(_agent.READ_OPERATIONS)
    assert not _batch.writes and not _batch2.writes
    assert _batch.on_error == _batch2.on_error == "continue"


def _lab_answers() -> list[tuple[str, t.Any]]:
    """Every read operation's answer on a lab host, as the self-test asks for it."""
    host = rdplab_host.WindowsHost.from_file(HOSTS / "healthy.yml")
    batch, planned = selftest.first_batch(datetime.now(UTC), [{"log": "System", "ids": [1056, 1057]}])
    answers = host.run_batch({"v": 1, "on_error": "continue", "ops": batch.ops})["results"]
    second, planned2 = selftest.second_batch("C:\\ProgramData", None)
    answers += host.run_batch({"v": 1, "on_error": "continue", "ops": second.ops})["results"]
    return [(item.op, answer["data"]) for item, answer in zip(planned + planned2, answers, strict=True)]


LAB_ANSWERS = _lab_answers()

# (op, how to break its answer, the path the error names)
BREAKS: list[tuple[str, t.Callable[[t.Any], None], str]] = [
    ("firewall.rules.list", lambda d: d["rules"][0].__setitem__("local_ports", "3389"), "$.rules[0].local_ports"),
    ("firewall.rules.list", lambda d: d["rules"][0].__setitem__("remote_addresses", []), "$.rules[0].remote_addresses"),
    ("firewall.rules.list", lambda d: d.__setitem__("network_categories", "Public"), "$.network_categories"),
    ("service.get", lambda d: d["services"]["TermService"].__setitem__("start_type", "Auto"), "start_type"),
    ("service.get", lambda d: d["services"]["TermService"].__setitem__("exists", "True"), "exists"),
    ("system.info", lambda d: d.pop("os_build"), "os_build"),
    ("system.info", lambda d: d["caller"].__setitem__("groups", {"S-1-5-32-544": "Administrators"}), "groups"),
    ("system.info", lambda d: d["caller"]["privileges"].__setitem__("SeBackupPrivilege", "Enabled"), "SeBackup"),
    ("system.info", lambda d: d["runtime"].__setitem__("dotnet_framework_release", "528049"), "release"),
    ("listener.get", lambda d: d.__setitem__("ssl_certificate_sha1_hash", "ab" * 20), "sha1_hash"),
    ("cert.list", lambda d: d["certificates"][0]["key"].__setitem__("open_error", "Zugriff verweigert"), "open_error"),
    ("cert.list", lambda d: d["certificates"][0]["key"].pop("path"), "path"),
    ("listener.get", lambda d: d.__setitem__("extra", 1), "extra"),
    ("registry.get", lambda d: d["values"]["PortNumber"].__setitem__("value", "3389"), "PortNumber"),
    ("session.list", lambda d: d["sessions"][0].__setitem__("state", "Aktiv"), "state"),
    ("events.query", lambda d: d.__setitem__("events", {}), "$.events"),
    ("util.sleep", lambda d: d.__setitem__("slept_ms", True), "slept_ms"),
    ("tls.cipher_suites.list", lambda d: d["suites"][0].__setitem__("protocols", 771), "protocols"),
    ("file.stat", lambda d: d.__setitem__("sha256", "ABC"), "sha256"),
]


@pytest.mark.parametrize(("op", "data"), LAB_ANSWERS, ids=[op for op, _data in LAB_ANSWERS])
def test_both_validators_accept_the_lab_answer(op: str, data: t.Any) -> None:
    assert selftest.validate_operation(SCHEMAS, op, data) == []
    jsonschema.validate(data, selftest.operation_schema(SCHEMAS, op))


@pytest.mark.parametrize(("op", "damage", "where"), BREAKS, ids=[f"{op}-{where}" for op, _d, where in BREAKS])
def test_both_validators_refuse_a_broken_answer(op: str, damage: t.Callable[[t.Any], None], where: str) -> None:
    data = copy.deepcopy(next(answer for name, answer in LAB_ANSWERS if name == op))
    damage(data)
    errors = selftest.validate_operation(SCHEMAS, op, data)
    assert errors and any(where in error for error in errors), errors
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, selftest.operation_schema(SCHEMAS, op))


def test_validator_keywords() -> None:
    schema = {
        "$defs": {"n": {"type": "integer", "minimum": 1, "maximum": 3}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"anyOf": [{"type": "null"}, {"const": "x"}]}},
        "required": ["a"],
        "additionalProperties": False,
    }
    assert selftest.validate({"a": 2, "b": None}, schema) == []
    assert selftest.validate({"a": 2, "b": "x"}, schema) == []
    assert selftest.validate({"a": 0}, schema) == ["$.a: 0 is below 1"]
    assert selftest.validate({"a": True}, schema) == ["$.a: expected integer, got true"]
    assert selftest.validate({"b": "y"}, schema)[0] == "$: missing 'a'"
    assert selftest.validate({"a": 1, "c": 1}, schema) == ["$: unexpected key 'c'"]
    assert selftest.validate([1], {"type": "array", "items": {"enum": [1, 2]}}) == []
    assert selftest.validate([True], {"type": "array", "items": {"enum": [1, 2]}}) == [
        "$[0]: true is not one of [1, 2]"
    ]


@pytest.mark.parametrize(
    ("release", "version"),
    [(378389, "4.5"), (379893, "4.5.2"), (394802, "4.6.2"), (528049, "4.8"), (533325, "4.8.1"), (1, "older than 4.5")],
)
def test_dotnet_release_names(release: int, version: str) -> None:
    assert selftest.dotnet_version(release) == version
    assert selftest.dotnet_version(None) is None
