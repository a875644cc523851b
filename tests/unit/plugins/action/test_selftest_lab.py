"""rdpfix.rdp.selftest against every lab host file, through DirectConnection: the lab's answer to every read operation
conforms to the shape contract (plugins/plugin_utils/_op_schemas.json) that the self-test checks on real hosts."""

from __future__ import annotations

import json
import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")
jsonschema = pytest.importorskip("jsonschema")

from ansible_collections.rdpfix.rdp.plugins.action import selftest as selftest_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _agent  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _selftest as selftest  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
HOST_NAMES = sorted(path.stem for path in HOSTS.glob("*.yml"))
SCHEMAS = selftest.load_schemas()


def load(name: str) -> t.Any:
    return rdplab_fleet.load_fleet([HOSTS / f"{name}.yml"])[0]


def run_selftest(host: t.Any, check_mode: bool = False, **args: t.Any) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=False, async_val=0, action="rdpfix.rdp.selftest")
    action = selftest_action.ActionModule(
        task, rdplab_direct.DirectConnection(host), SimpleNamespace(remote_addr="127.0.0.2"), None, None, None
    )
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name}))


def snapshot(host: t.Any) -> dict[str, t.Any]:
    state: dict[str, t.Any] = host.snapshot()
    state.pop("counters")
    return state


@pytest.mark.parametrize("name", HOST_NAMES)
def test_every_read_operation_answers_in_its_schema(name: str, tmp_path: Path) -> None:
    host = load(name)
    before = snapshot(host)
    dest = tmp_path / "reports" / f"{name}.json"
    result = run_selftest(host, dest=str(dest))
    assert not result.get("failed"), result.get("msg")
    assert result["problems"] == []
    report = json.loads(dest.read_text(encoding="utf-8"))
    assert report == result["report"]
    assert [record["op"] for record in report["operations"]] == sorted(_agent.READ_OPERATIONS)
    assert {record["op"]: record["status"] for record in report["operations"]} == dict.fromkeys(
        _agent.READ_OPERATIONS, "ok"
    )
    # The same answers, held to the same schemas by the jsonschema package (draft 2020-12).
    for record in report["operations"]:
        jsonschema.validate(record["data"], selftest.operation_schema(SCHEMAS, record["op"]))
    # Read-only, in two WinRM commands.
    assert (host.counters.winrm_commands, host.counters.writes, result["round_trips"]) == (2, 0, 2)
    assert snapshot(host) == before
    assert result["changed"] is False

    environment = result["environment"]
    assert environment["os_build"] == host.system.os_build
    assert environment["language_mode"] == "FullLanguage"
    assert environment["dotnet_framework_version"] == host.system.dotnet_framework
    assert environment["powershell_version"].startswith("5.1.")
    assert environment["ui_culture"] == host.system.locale
    rdp_key = environment["rdp_key"]
    assert set(rdp_key) == {"path", "provider_kind", "exists", "acl_readable", "content_readable"}
    # The token: who, its groups, and its privileges split by state as whoami /priv shows them.
    caller = environment["caller"]
    assert caller["sid"].startswith("S-1-5-") and caller["groups"]
    privileges = caller["privileges"]
    assert environment["privileges_enabled"] == sorted(name for name, on in privileges.items() if on)
    assert environment["privileges_disabled"] == sorted(name for name, on in privileges.items() if not on)
    assert set(caller["agent_enabled"]) <= set(environment["privileges_enabled"])


def test_rdp_key_readability_is_the_key_files() -> None:
    environment = run_selftest(load("healthy"))["environment"]
    rdp_key = environment["rdp_key"]
    assert rdp_key["path"].startswith(
        "C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys\\f686aace6942fb7f7ceb231212eef4a4_"
    )
    assert rdp_key["exists"] is True
    assert isinstance(rdp_key["acl_readable"], bool) and isinstance(rdp_key["content_readable"], bool)


def test_events_are_checked_record_by_record() -> None:
    report = run_selftest(load("events-history"))["report"]
    [events] = [record for record in report["operations"] if record["op"] == "events.query"]
    assert events["status"] == "ok" and events["data"]["events"], "the lab host file has events of the last days"


def test_no_rdp_key_when_the_listener_has_no_self_signed_certificate() -> None:
    environment = run_selftest(load("missing-selfsigned"))["environment"]
    assert environment["rdp_key"]["path"] is None and environment["rdp_key"]["content_readable"] is None


def test_check_mode_reads_the_same_and_writes_no_report(tmp_path: Path) -> None:
    host = load("healthy")
    dest = tmp_path / "report.json"
    result = run_selftest(host, check_mode=True, dest=str(dest))
    assert result["status"] == "ok" and "dest" not in result
    assert not dest.exists()
    assert (host.counters.winrm_commands, host.counters.writes) == (2, 0)


def test_without_data_the_report_keeps_statuses_and_environment() -> None:
    report = run_selftest(load("healthy"), include_data=False)["report"]
    assert all("data" not in record for record in report["operations"])
    assert report["counts"]["ok"] == len(_agent.READ_OPERATIONS)


def test_a_failing_operation_fails_the_task_after_writing_the_report(tmp_path: Path) -> None:
    host = load("healthy")
    original = host.run_batch

    def broken(batch: dict[str, t.Any]) -> dict[str, t.Any]:
        document = original(batch)
        for result in document["results"]:
            if result["op"] == "firewall.rules.list":
                result["data"]["rules"][0]["local_ports"] = "3389"  # a one-element list unrolled to a scalar
            if result["op"] == "service.get":
                result.clear()
                result.update(op="service.get", ok=False, error={"type": "AccessDenied", "message": "denied"})
        return document

    host.run_batch = broken
    dest = tmp_path / "report.json"
    result = run_selftest(host, dest=str(dest))
    assert result["failed"] is True
    assert "firewall.rules.list: $.rules[0].local_ports: expected array" in result["msg"]
    assert "service.get: AccessDenied: denied" in result["problems"]
    report = json.loads(dest.read_text(encoding="utf-8"))
    statuses = {record["op"]: record["status"] for record in report["operations"]}
    assert (statuses["firewall.rules.list"], statuses["service.get"], statuses["system.info"]) == (
        "invalid",
        "error",
        "ok",
    )
    relaxed = run_selftest(host, fail_on_problems=False)
    assert not relaxed.get("failed") and relaxed["status"] == "problems"


def test_a_report_path_that_cannot_be_written_fails_with_a_message(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    result = run_selftest(load("healthy"), dest=str(blocker / "report.json"))
    assert result["failed"] is True and result["msg"].startswith("cannot write the self-test report to ")
