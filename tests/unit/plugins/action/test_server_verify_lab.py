"""rdpfix.rdp.server's options for the role's one-task-per-host path, against the lab's simulated hosts:

- ``verify``: after a real run the task probes RDP from the controller (its own process, no WinRM command) and fails
  when RDP does not connect although the run left nothing pending; what the run left pending excuses it; check mode
  probes nothing;
- ``concerns``: every concern and its options in one dict plans exactly as the per-concern options do;
- ``return_snapshot: false``: the same result without the snapshot;
- ``report`` with ``report_from``: one concern's (or the verification's) result read from a registered result by name.

The probe here meets a closed port on 127.0.0.1 (the in-process lab has no RDP listener); a listener that connects is
verified through ansible-playbook by the system tests (tests/system/test_fix_rdp_playbook.py, test_promises.py).
"""

from __future__ import annotations

import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")

from ansible_collections.rdpfix.rdp.plugins.action import server as server_action  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
CONCERNS: dict[str, dict[str, t.Any]] = {"machinekeys": {}, "certificate": {}, "firewall": {}, "tls": {}}
# Without the firewall concern, which would read the listener's port (3389) and have it probed on 127.0.0.1.
NO_FIREWALL: dict[str, dict[str, t.Any]] = {"machinekeys": {}, "certificate": {}, "tls": {}}
VOLATILE = ("round_trips", "backup", "diff")


def load(name: str) -> t.Any:
    return rdplab_fleet.load_fleet([HOSTS / f"{name}.yml"])[0]


def run(
    host: t.Any, check_mode: bool = False, task_vars: dict[str, t.Any] | None = None, **args: t.Any
) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=True, async_val=0, action="rdpfix.rdp.server")
    action = server_action.ActionModule(
        task, rdplab_direct.DirectConnection(host), SimpleNamespace(remote_addr="127.0.0.2"), None, None, None
    )
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name, **(task_vars or {})}))


def plans(result: dict[str, t.Any]) -> dict[str, dict[str, t.Any]]:
    return {
        name: {key: value for key, value in item.items() if key not in VOLATILE}
        for name, item in result["concerns"].items()
    }


def test_a_compliant_host_whose_rdp_does_not_connect_fails_the_verification_with_no_winrm_command(
    closed_port: int,
) -> None:
    host = load("healthy")
    port = closed_port
    # Without the firewall concern the fallback port is probed: a closed one, for real.
    result = run(host, verify={"host": "127.0.0.1", "fallback_port": port}, machinekeys={}, certificate={}, tls={})
    # The read only: the probe goes from the controller to the RDP port.
    assert host.counters.winrm_commands == 1 == result["round_trips"]
    assert result["failed"] is True and result["changed"] is False
    verification = result["verification"]
    assert verification["failed"] is True and verification["connectable"] is False
    assert verification["target"]["port"] == port and verification["pending"] == []
    assert result["msg"] == verification["msg"]
    assert verification["msg"].startswith("RDP still does not connect after the repair (unreachable)")
    assert "rdpfix_server_verify=false" in verification["msg"]
    # Every concern's result is still there, none of them failed.
    assert set(result["concerns"]) == {"machinekeys", "certificate", "tls"}
    assert not any(item.get("failed") for item in result["concerns"].values())


def test_the_listeners_port_as_the_firewall_read_it_is_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    ports: list[int] = []

    def refused(options: t.Any) -> dict[str, t.Any]:
        ports.append(options.port)
        return {"connectable": False, "verdict": "refused", "summary": "refused", "findings": []}

    monkeypatch.setattr(server_action.ActionModule, "probe", staticmethod(refused))
    result = run(load("firewall-moved-port"), verify={"host": "127.0.0.1", "fallback_port": 3389}, **CONCERNS)
    assert result["concerns"]["firewall"]["changed"] is True
    assert ports == [3390]
    assert result["verification"]["failed"] is True


def test_without_the_firewall_concern_the_fallback_port_is_probed(closed_port: int) -> None:
    port = closed_port
    result = run(load("healthy"), verify={"host": "127.0.0.1", "fallback_port": port}, tls={})
    assert result["verification"]["target"]["port"] == port


def test_a_pending_reboot_excuses_rdp_that_does_not_connect_yet(closed_port: int) -> None:
    # (No firewall concern: the fallback port, a closed one, is probed.)
    result = run(load("tls-tls12-disabled"), verify={"host": "127.0.0.1", "fallback_port": closed_port}, **NO_FIREWALL)
    assert result["concerns"]["tls"]["reboot_required"] is True
    verification = result["verification"]
    assert verification["connectable"] is False and not verification.get("failed")
    assert "tls: a reboot is required" in verification["pending"]
    assert not result.get("failed")
    assert verification["msg"].endswith("Not failed: " + "; ".join(verification["pending"]) + ".")


def test_check_mode_and_a_failed_run_probe_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_probe(_options: t.Any) -> t.NoReturn:
        raise AssertionError("probed")

    monkeypatch.setattr(server_action.ActionModule, "probe", staticmethod(no_probe))
    verify = {"host": "127.0.0.1", "fallback_port": 3389}
    audit = run(load("healthy"), check_mode=True, verify=verify, **CONCERNS)
    assert "verification" not in audit and not audit.get("failed")
    # A concern that fails while the task runs: machinekeys refuses an empty RDP key without strategy=regenerate.
    host = load("machinekeys-rdp-key-empty-folder-acl")
    refused = run(host, verify=verify, **CONCERNS)
    assert refused["failed"] is True and refused["failed_concern"] == "machinekeys", refused["msg"]
    assert "verification" not in refused
    assert host.counters.winrm_commands == 1


def test_the_probe_gets_the_host_and_the_port_and_sends_no_winrm_command(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, int]] = []

    def connects(options: t.Any) -> dict[str, t.Any]:
        seen.append((options.host, options.port))
        return {"connectable": True, "verdict": "ok", "summary": "RDP connects", "findings": [], "tls": {}}

    monkeypatch.setattr(server_action.ActionModule, "probe", staticmethod(connects))
    host = load("expired-selfsigned")
    result = run(host, verify={"host": "rdp01.example.test", "fallback_port": 4000}, **CONCERNS)
    assert seen == [("rdp01.example.test", 3389)]
    assert not result.get("failed") and result["changed"] is True
    assert result["verification"]["connectable"] is True and "failed" not in result["verification"]
    # The read and the apply batch: the verification adds no WinRM command.
    assert host.counters.winrm_commands == 2 == result["round_trips"]


def test_the_concerns_option_plans_as_the_per_concern_options() -> None:
    apart = run(load("combined-all"), check_mode=True, **CONCERNS, transport={"mode": "tcp_only"})
    together = run(load("combined-all"), check_mode=True, concerns={**CONCERNS, "transport": {"mode": "tcp_only"}})
    assert plans(together) == plans(apart)
    assert (
        list(together["concerns"])
        == list(apart["concerns"])
        == [
            "machinekeys",
            "certificate",
            "firewall",
            "transport",
            "tls",
        ]
    )
    # The same read operations (their time-relative arguments - the snapshot's time, an event query's start - differ
    # between the two runs).
    assert [read["op"] for read in together["snapshot"]["reads"]] == [read["op"] for read in apart["snapshot"]["reads"]]


def test_a_concern_given_null_is_left_alone_and_all_null_is_refused() -> None:
    some = run(load("combined-all"), check_mode=True, concerns={"firewall": {}, "tls": None, "certificate": None})
    assert list(some["concerns"]) == ["firewall"]
    host = load("healthy")
    none = run(host, concerns={"tls": None})
    assert none["failed"] is True and "name at least one concern" in none["msg"]
    assert host.counters.winrm_commands == 0


def test_a_reported_concern_keeps_its_own_unresolved_findings() -> None:
    # firewall-public-profile: the public profile is active; the role's options leave that for someone to decide.
    registered = run(load("firewall-public-profile"), check_mode=True, **CONCERNS)
    own = registered["concerns"]["firewall"]["unresolved"]
    assert own, registered["concerns"]["firewall"]
    task_vars = {"rdpfix_server_result": registered}
    shown = run(load("healthy"), task_vars=task_vars, report="firewall", report_from="rdpfix_server_result")
    assert shown["unresolved"] == own
    # A concern with nothing left to decide keeps its empty list (not every finding counted against rdpfix.rdp.server).
    tls = run(load("healthy"), task_vars=task_vars, report="tls", report_from="rdpfix_server_result")
    assert tls["unresolved"] == registered["concerns"]["tls"]["unresolved"] == []
    assert tls.get("findings"), "the tls concern reports findings that are not unresolved"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"concerns": {"firewall": {}, "dns": {}}}, "concerns: unknown concern(s) dns"),
        ({"concerns": {"firewall": "on"}}, "concerns.firewall: give the options of firewall as a dictionary"),
        ({"concerns": {"firewall": {}}, "firewall": {}}, "mutually exclusive: concerns|firewall"),
        ({"concerns": {"firewall": {"profiles": ["Nowhere"]}}}, "firewall"),
        ({"report": "tls"}, "report: give one item of an earlier run's concerns, or its name with report_from"),
        ({"report_from": "rdpfix_server_result"}, "missing parameter(s) required by 'report_from': report"),
        ({"verify": {"host": " ", "fallback_port": 3389}}, "verify.host must be a host name or IP address"),
        ({"verify": {"host": "rdp01", "fallback_port": 0}, "tls": {}}, "verify.fallback_port must be between 1"),
        ({"concerns": {}}, "concerns is empty"),
        ({"report": "tls", "report_from": "rdpfix_server_result", "tls": {}}, "mutually exclusive: report|tls"),
    ],
)
def test_bad_input_is_refused_before_the_host_is_contacted(args: dict[str, t.Any], message: str) -> None:
    host = load("healthy")
    result = run(host, **args)
    assert result["failed"] is True and message in result["msg"], result["msg"]
    assert host.counters.winrm_commands == 0


def test_without_return_snapshot_the_result_is_the_same_without_the_snapshot() -> None:
    kept = run(load("expired-selfsigned"), **CONCERNS)
    dropped = run(load("expired-selfsigned"), return_snapshot=False, **CONCERNS)
    assert "snapshot" in kept and "snapshot" not in dropped
    assert plans(dropped) == plans(kept)
    assert {k for k in kept if k != "snapshot"} == set(dropped)


def test_report_from_reads_one_result_by_name_from_a_registered_result(closed_port: int) -> None:
    registered = run(
        load("expired-selfsigned"), verify={"host": "127.0.0.1", "fallback_port": closed_port}, **NO_FIREWALL
    )
    task_vars = {"rdpfix_server_result": registered}
    shown = run(load("healthy"), task_vars=task_vars, report="certificate", report_from="rdpfix_server_result")
    assert shown["changed"] is True and shown["module"] == "rdpfix.rdp.certificate"
    assert shown["round_trips"] == registered["concerns"]["certificate"]["round_trips"]
    # The failed verification fails the item that shows it, with its message.
    verification = run(load("healthy"), task_vars=task_vars, report="verification", report_from="rdpfix_server_result")
    assert verification["failed"] is True and verification["msg"] == registered["verification"]["msg"]
    assert verification["connectable"] is False
    missing = run(load("healthy"), task_vars=task_vars, report="transport", report_from="rdpfix_server_result")
    assert missing["failed"] is True and "rdpfix_server_result has no result for transport" in missing["msg"]
    unknown = run(load("healthy"), task_vars=task_vars, report="tls", report_from="nothing_registered")
    assert unknown["failed"] is True and "report_from: nothing_registered is not a registered result" in unknown["msg"]
