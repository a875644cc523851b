"""A lost answer whose batch is still running on the host: Windows goes on with a command after its connection dropped
(a WinRM shell lives on, a Run Command cannot be cancelled), so the batch may write after the module read the host
again. The module fences it off (_outcome.fence) before it says ``not_made``; these tests run the held batch after the
module's answer and look at the host."""

from __future__ import annotations

import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from urllib3.exceptions import ReadTimeoutError

rdplab_direct = pytest.importorskip("rdplab.direct")
bootstrap = pytest.importorskip("rdplab.bootstrap")
rdplab_host = pytest.importorskip("rdplab.model.host")

from ansible_collections.rdpfix.rdp.plugins.action.certificate import ActionModule as CertificateAction  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action.restore import ActionModule as RestoreAction  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _action, _agent  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
BACKUPS = "C:\\ProgramData\\rdpfix\\backups"


class HoldingConnection(rdplab_direct.DirectConnection):  # type: ignore[misc]
    """The command numbered ``hold`` (0: the first) reaches the host only when the test lets it go; its client meets
    a read timeout, as Ansible's winrm connection does when the host is slow to answer."""

    def __init__(self, host: t.Any, hold: int) -> None:
        super().__init__(host)
        self.hold = hold
        self.sent = 0
        self.held: tuple[str, bytes] | None = None

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        number, self.sent = self.sent, self.sent + 1
        if number != self.hold:
            return t.cast(tuple[int, bytes, bytes], super().exec_command(cmd, in_data, sudoable))
        self.held = (cmd, in_data or b"")
        raise requests.exceptions.ReadTimeout(ReadTimeoutError(t.cast(t.Any, None), "/wsman", "Read timed out."))

    def let_go(self) -> dict[str, t.Any]:
        """The held batch runs now, on the host, after the module's answer: its result document."""
        assert self.held is not None
        cmd, in_data = self.held
        outcome = bootstrap.execute(self.host, cmd, in_data)
        return _agent.last_json(outcome.stdout.decode("utf-8"))  # type: ignore[no-any-return]


def run(action_class: t.Any, connection: t.Any, **args: t.Any) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=False, diff=False, async_val=0, action="rdpfix.rdp.x")
    action = action_class(task, connection, SimpleNamespace(remote_addr="127.0.0.2"), None, None, None)
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": connection.host.name}))


def test_a_lost_batch_that_runs_after_the_module_said_not_made_writes_nothing() -> None:
    host = rdplab_host.WindowsHost.from_file(HOSTS / "expired-selfsigned.yml")
    connection = HoldingConnection(host, hold=1)  # 0: the read, 1: the apply batch
    result = run(CertificateAction, connection)
    assert result["failed"] and result["outcome"] == "not_made", result["msg"]
    manifest_id = result["backup"]["manifest_id"]
    folder = f"{BACKUPS}\\{manifest_id}"
    before = host.snapshot()

    # The lost batch was waiting (for the run lock, behind a slow host): it runs now, and must change nothing.
    answer = connection.let_go()
    after = host.snapshot()
    assert after["certificates"] == before["certificates"]
    assert after["listener"] == before["listener"] and after["registry"] == before["registry"]
    assert after["services"] == before["services"]
    assert host.filesystem.get(f"{folder}\\manifest.json") is None
    changed = {
        path
        for path in {*before["files"]["entries"], *after["files"]["entries"]}
        if before["files"]["entries"].get(path) != after["files"]["entries"].get(path)
    }
    # Only the run lock's folder, which lock.acquire (before the backup folder) secures again.
    assert changed <= {"C:\\ProgramData\\rdpfix"}, changed
    # It stopped at its backup folder, claimed by the module's second look.
    create = next(item for item in answer["results"] if item["op"] == "dir.create")
    assert not create["ok"] and create["error"]["type"] == "AlreadyClaimed"
    claim = host.filesystem.get(f"{folder}\\{_action.CLAIM_FILE}")
    assert claim is not None and claim.content.decode("utf-8").startswith(_action.FENCED)

    # The fenced folder is no backup: rdpfix.rdp.restore lists nothing to restore.
    listed = run(RestoreAction, rdplab_direct.DirectConnection(host))
    assert not listed.get("failed") and [item["id"] for item in listed["manifests"]] == [], listed

    # A plain rerun repairs the host.
    rerun = run(CertificateAction, rdplab_direct.DirectConnection(host))
    assert rerun["changed"] and not rerun.get("failed"), rerun.get("msg")


def test_a_batch_that_claimed_its_folder_first_is_judged_by_its_manifest() -> None:
    host = rdplab_host.WindowsHost.from_file(HOSTS / "expired-selfsigned.yml")
    connection = HoldingConnection(host, hold=1)
    original = connection.exec_command

    def ran_then_lost(cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        # The apply batch runs to its end; only its answer is lost (drop_after).
        if connection.sent == connection.hold:
            rdplab_direct.DirectConnection.exec_command(connection, cmd, in_data, sudoable)
        return original(cmd, in_data, sudoable)

    connection.exec_command = ran_then_lost
    result = run(CertificateAction, connection)
    assert result["outcome"] == "made" and result["changed"], result.get("msg")
    manifest = host.filesystem.get(f"{BACKUPS}\\{result['backup']['manifest_id']}\\manifest.json")
    assert manifest is not None
    claim = host.filesystem.get(f"{BACKUPS}\\{result['backup']['manifest_id']}\\{_action.CLAIM_FILE}")
    assert claim is not None and not claim.content.decode("utf-8").startswith(_action.FENCED)


def test_a_batch_run_again_after_its_own_claim_is_not_said_to_have_changed_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same batch executed twice (ssh's reconnection_retries run a command again after an exit 255, a client
    # library re-sends a request): the first execution claimed the backup folder, wrote its manifest and was cut
    # before its changes; the second finds the folder claimed - by this very batch - and its answer is the one that
    # comes back. "Claimed by another run, nothing was changed" would be untrue: the manifest judges.
    host = rdplab_host.WindowsHost.from_file(HOSTS / "expired-selfsigned.yml")
    connection = rdplab_direct.DirectConnection(host)
    begun: list[_action.BackupSet] = []
    begin = _action.BackupSet.begin

    def recorded(self: _action.BackupSet, batch: _agent.Batch) -> int:
        begun.append(self)
        return begin(self, batch)

    monkeypatch.setattr(_action.BackupSet, "begin", recorded)
    original = connection.exec_command

    def first_execution_cut(cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        if begun and not host.filesystem.exists(begun[0].directory):
            # What the first execution left: its own claim and its manifest.
            planned = _agent.Batch()
            own = str(planned.ops[begin(begun[0], planned)]["args"]["claim_text"])
            host.filesystem.make_dirs(begun[0].directory)
            host.filesystem.write(f"{begun[0].directory}\\{_action.CLAIM_FILE}", own.encode("utf-8"))
            host.filesystem.write(f"{begun[0].directory}\\manifest.json", b"{}")
        return t.cast(tuple[int, bytes, bytes], original(cmd, in_data, sudoable))

    connection.exec_command = first_execution_cut
    result = run(CertificateAction, connection)
    assert "nothing was changed" not in str(result.get("msg")), result.get("msg")
    assert result["failed"] and result["outcome"] == "partial" and result["changed"], result.get("msg")
    assert result["backup"]["manifest_id"] == begun[0].manifest_id and result["still_to_do"], result
