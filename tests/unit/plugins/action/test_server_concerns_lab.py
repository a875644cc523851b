"""rdpfix.rdp.server when one concern goes wrong, against the lab (DirectConnection, the action plugins in-process):

- every concern's options are checked before any batch is sent: one concern's bad input leaves the host untouched;
- a concern that fails after the shared batch carried the others' changes does not hide them: each concern whose
  changes went out keeps its result (changes, manifest, reboot_required); only those that sent nothing are not run;
- a concern whose operations the shared batch skipped after an earlier concern's failure says it did not run
  because of that concern (nothing changed), and the earlier concern is the one named as failed;
- a lost answer to a failed concern's manifest written again does not turn its failure into a lost apply batch;
- a slow shared batch is waited for as long as the connection waits: no concern ends as "no answer" without its
  manifest.
"""

from __future__ import annotations

import time
import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")

from ansible_collections.rdpfix.rdp.plugins.action import facts as facts_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import machinekeys as machinekeys_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import server as server_action  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
BACKUPS = "C:\\ProgramData\\rdpfix\\backups"
TLS12 = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\SecurityProviders\\SCHANNEL\\Protocols\\TLS 1.2\\Server"


def load(name: str) -> t.Any:
    return rdplab_fleet.load_fleet([HOSTS / f"{name}.yml"])[0]


def run(action_class: t.Any, host: t.Any, connection: t.Any = None, **args: t.Any) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=False, diff=True, async_val=0, action="rdpfix.rdp.test")
    action = action_class(
        task,
        connection or rdplab_direct.DirectConnection(host),
        SimpleNamespace(remote_addr="127.0.0.2"),
        None,
        None,
        None,
    )
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name}))


def snapshot_of(host: t.Any) -> dict[str, t.Any]:
    facts = run(facts_action.ActionModule, host, gather_events=False)
    assert "snapshot" in facts, facts.get("msg")
    return facts


def manifests(host: t.Any) -> list[str]:
    if not host.filesystem.exists(BACKUPS):
        return []
    return [entry.path.rsplit("\\", 1)[-1] for entry in host.filesystem.children(BACKUPS)]


@pytest.mark.parametrize(
    ("concerns", "said"),
    [
        ({"firewall": {}, "tls": {"nla": "bogus"}}, "tls: value of nla must be one of"),
        ({"firewall": {"remote_addresses": ["10.0.0.0/99"]}, "tls": {}}, "firewall: "),
    ],
    ids=["tls-option", "firewall-check"],
)
def test_bad_input_in_any_concern_is_refused_before_the_host_is_touched(concerns: dict[str, t.Any], said: str) -> None:
    host = load("combined-firewall-tls-expired")
    facts = snapshot_of(host)
    before = host.counters.winrm_commands
    result = run(server_action.ActionModule, host, snapshot=facts, **concerns)
    # Nothing was sent: no concern wrote before the bad option was found.
    assert host.counters.winrm_commands == before and manifests(host) == [], result.get("msg")
    assert result["failed"] is True and result["round_trips"] == 0 and "concerns" not in result
    assert result["msg"].startswith("Invalid arguments: ") and said in result["msg"]


def test_a_concern_failing_after_the_shared_batch_keeps_the_others_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    # The key store's repair and TLS travel in one apply batch; the key store's own verification then fails (as when
    # Windows does not show the repaired ACL yet). TLS's changes were made all the same: its result - changes,
    # manifest, the reboot Schannel needs - is the truth about the host. The certificate, planned only after the key
    # store, never ran.
    host = load("combined-machinekeys-tls12")
    facts = snapshot_of(host)

    def unverified(self: t.Any, after: t.Any, decided: t.Any) -> list[str]:
        return ["the RDP key file does not show NETWORK SERVICE read yet"]

    monkeypatch.setattr(machinekeys_action.ActionModule, "_verify", unverified)
    result = run(
        server_action.ActionModule, host, snapshot=facts, machinekeys={}, certificate={}, tls={"nla": "enabled"}
    )
    assert result["failed"] is True and result["failed_concern"] == "machinekeys"
    assert result["round_trips"] == 1
    assert list(result["concerns"]) == ["machinekeys", "tls"] and result["not_run_concerns"] == ["certificate"]
    tls = result["concerns"]["tls"]
    assert tls["changed"] is True and not tls.get("failed"), tls.get("msg")
    assert tls["reboot_required"] is True
    assert {result["concerns"][name]["backup"]["manifest_id"] for name in ("machinekeys", "tls")} == set(
        manifests(host)
    )
    assert host.registry.dword(TLS12, "Enabled") == 1
    assert result["changed"] is True
    assert "changes made by tls" in result["msg"]
    assert result["msg"].endswith("(not run because machinekeys failed, nothing changed: certificate)")


def test_a_concern_skipped_by_an_earlier_failure_says_it_did_not_run() -> None:
    # The key store's ACL write is refused inside the shared batch: TLS's operations after it are skipped. TLS did not
    # run because the key store failed - its result and the task's message say so (not "the backup could not be
    # written"), it changed nothing and left no manifest; the key store is the module that failed.
    host = load("combined-machinekeys-tls12")
    facts = snapshot_of(host)
    tls12_before = host.registry.dword(TLS12, "Enabled")
    host.filesystem.add_fault("C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys", "AccessDenied")
    result = run(
        server_action.ActionModule, host, snapshot=facts, machinekeys={}, certificate={}, tls={"nla": "enabled"}
    )
    assert result["failed"] is True and result["failed_concern"] == "machinekeys"
    # The shared apply batch, then the key store's manifest written again with its items' statuses.
    assert result["round_trips"] == 2
    assert list(result["concerns"]) == ["machinekeys", "tls"]
    assert result["not_run_concerns"] == ["certificate", "tls"]
    tls = result["concerns"]["tls"]
    assert tls["failed"] is True and tls["changed"] is False and tls["round_trips"] == 1
    assert tls["msg"] == (
        f"{host.name}: tls did not run because machinekeys failed before it in the shared batch (its operations were "
        "skipped); nothing was changed"
    )
    assert result["changed"] is False and "changes made by" not in result["msg"]
    assert result["msg"].startswith(f"{host.name}: acl.set failed: AccessDenied")
    assert result["msg"].endswith("(not run because machinekeys failed, nothing changed: certificate, tls)")
    assert manifests(host) == [result["concerns"]["machinekeys"]["backup"]["manifest_id"]]
    assert tls12_before != 1 and host.registry.dword(TLS12, "Enabled") == tls12_before


class DropSecond(rdplab_direct.DirectConnection):  # type: ignore[misc]
    """The second command (the snapshot was given: the batch after the apply batch) runs, and its answer is lost."""

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        answer: tuple[int, bytes, bytes] = super().exec_command(cmd, in_data, sudoable)
        if len(self.wire) == 2:
            raise ConnectionResetError("connection reset by peer")
        return answer


def test_a_lost_answer_to_the_failed_concerns_status_record_keeps_its_failure() -> None:
    # The apply batch was answered (the key store's ACL write refused); only the answer to the key store's manifest
    # written again is lost. The task still fails naming the key store with its own message - not "the answer to the
    # apply batch the concerns shared was lost" - and the key store warns that its manifest may still say planned.
    host = load("combined-machinekeys-tls12")
    facts = snapshot_of(host)
    host.filesystem.add_fault("C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys", "AccessDenied")
    result = run(server_action.ActionModule, host, DropSecond(host), snapshot=facts, machinekeys={}, tls={})
    assert result["failed"] is True and result["failed_concern"] == "machinekeys"
    assert result["round_trips"] == 2 and "outcomes" not in result
    assert result["msg"].startswith(f"{host.name}: acl.set failed: AccessDenied"), result["msg"]
    machinekeys = result["concerns"]["machinekeys"]
    assert "outcome" not in machinekeys and machinekeys["msg"] in result["msg"]
    assert any("could not be updated with what the run did" in item for item in machinekeys["warnings"])


class Slow(rdplab_direct.DirectConnection):  # type: ignore[misc]
    """The apply batch (the first command: the snapshot was given) takes ``seconds`` to answer."""

    def __init__(self, host: t.Any, seconds: float) -> None:
        super().__init__(host)
        self.seconds = seconds

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        answer: tuple[int, bytes, bytes] = super().exec_command(cmd, in_data, sudoable)
        if len(self.wire) == 1:
            time.sleep(self.seconds)
        return answer


def test_a_slow_shared_batch_is_waited_for_as_long_as_the_connection_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    # The modules' threads no longer time the batch the main thread sends: an answer slower than their planning
    # limit still reaches them (before, each ended "no answer from the batch it waits for", no manifest named).
    monkeypatch.setattr(server_action, "THREAD_WAIT_S", 1.0)
    host = load("combined-firewall-tls-expired")
    facts = snapshot_of(host)
    result = run(server_action.ActionModule, host, Slow(host, 2.0), snapshot=facts, firewall={}, tls={})
    assert not result.get("failed"), result.get("msg")
    assert [name for name, item in result["concerns"].items() if item["changed"]] == ["firewall", "tls"]
    assert sorted(item["backup"]["manifest_id"] for item in result["concerns"].values()) == sorted(manifests(host))
