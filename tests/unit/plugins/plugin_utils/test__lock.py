"""The per-host run lock (plugins/plugin_utils/_lock.py) against a lab host: taken first and released last by every
write batch, released after a stop, refused clearly while another run holds it, taken over when that run's agent
process is gone or its time ran out (docs/agent-protocol.md, "The run lock")."""

from __future__ import annotations

import json
import typing as t
from pathlib import Path

import pytest

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _lock
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch, BatchResult, parse_output

rdplab_host = pytest.importorskip("rdplab.model.host")

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
LOCK_FILE = "C:\\ProgramData\\rdpfix\\run.lock"
RDP_TCP = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations\\RDP-Tcp"


def load() -> t.Any:
    return rdplab_host.WindowsHost.from_file(HOSTS / "healthy.yml")


def send(host: t.Any, batch: Batch) -> BatchResult:
    document = host.run_batch(json.loads(batch.to_json()))
    return parse_output(host.name, 0, json.dumps(document).encode(), b"", expected=len(batch.ops))


def write_batch(value: int = 1, fail: bool = False) -> Batch:
    batch = Batch(on_error="stop")
    batch.add("registry.set", path=RDP_TCP, name="rdpfixProbe", type="REG_DWORD", value=value)
    if fail:
        batch.add("file.write", path="C:\\ProgramData\\rdpfix\\full\\x.bin", content_b64="AA==")
    batch.add("registry.set", path=RDP_TCP, name="rdpfixProbe2", type="REG_DWORD", value=value)
    return batch


def probe(host: t.Any) -> dict[str, t.Any]:
    got = send(host, _read(RDP_TCP))
    values: dict[str, t.Any] = got.data(0)["values"]
    return values


def _read(path: str) -> Batch:
    batch = Batch(on_error="continue")
    batch.add("registry.get", path=path, names=["rdpfixProbe", "rdpfixProbe2"])
    return batch


def test_a_write_batch_takes_the_lock_first_and_releases_it_last() -> None:
    host = load()
    lock = _lock.RunLock.for_run("certificate", host.name)
    locked = _lock.wrap(write_batch(), lock)
    assert [item["op"] for item in locked.batch.ops] == ["lock.acquire", "registry.set", "registry.set", "lock.release"]
    assert locked.batch.ops[-1]["always"] is True
    result = send(host, locked.batch)
    acquired = result.data(locked.acquire)
    assert acquired["acquired"] is True and acquired["previous"] is None
    assert acquired["lock"]["owner"] == lock.owner and acquired["lock"]["token"] == lock.token
    assert result.data(locked.release) == {"released": True, "holder": None}
    assert [item.op for item in locked.own(result).results] == ["registry.set", "registry.set"]
    assert host.filesystem.get(LOCK_FILE) is None
    assert _lock.release_warning(host.name, result, locked) is None
    with pytest.raises(ValueError, match="only a batch that writes"):
        _lock.wrap(_read(RDP_TCP), lock)


def test_a_batch_stopped_half_way_still_releases_the_lock() -> None:
    host = load()
    host.inject_fault("fail_writes_under", {"path": "C:\\ProgramData\\rdpfix\\full", "error": "DiskFull"})
    locked = _lock.wrap(write_batch(fail=True), _lock.RunLock.for_run("tls", host.name))
    result = send(host, locked.batch)
    assert [(item.op, item.ok, item.skipped) for item in result.results] == [
        ("lock.acquire", True, False),
        ("registry.set", True, False),
        ("file.write", False, False),
        ("registry.set", False, True),
        ("lock.release", True, False),
    ]
    assert result.data(locked.release)["released"] is True
    assert host.filesystem.get(LOCK_FILE) is None
    # The next run is not held up by the failed one.
    assert send(host, _lock.wrap(write_batch(2), _lock.RunLock.for_run("tls", host.name)).batch)[0].ok


def test_another_runs_lock_is_waited_for_then_refused_naming_the_holder_and_nothing_is_written() -> None:
    host = load()
    owner = {"controller": "ctl02", "pid": 4242, "user": "awx", "module": "rdpfix.rdp.tls", "run": "job-77"}
    host.inject_fault("hold_run_lock", {"seconds": 600, "owner": owner, "token": "job-77"})
    before = probe(host)
    lock = _lock.RunLock.for_run("certificate", host.name)
    locked = _lock.wrap(write_batch(), lock)
    result = send(host, locked.batch)
    acquire = result[locked.acquire]
    assert acquire.error_type == "Locked"
    assert acquire.data["holder"]["owner"] == owner and acquire.data["waited_ms"] == _lock.LOCK_WAIT_MS
    assert all(item.skipped for item in result.results[1:-1])
    # The release runs (always), and leaves the other run's lock alone.
    assert result.data(locked.release) == {"released": False, "holder": acquire.data["holder"]}
    assert probe(host) == before
    message = _lock.refusal(host.name, acquire, lock)
    assert "another rdpfix run holds this host's run lock" in message
    assert "run job-77 of rdpfix.rdp.tls from ctl02 (pid 4242, user awx)" in message
    assert "Waited 30 s; nothing was changed" in message
    assert f"expires at {acquire.data['holder']['expires']}" in message
    assert json.loads(host.filesystem.get(LOCK_FILE).content)["token"] == "job-77"


def test_a_lock_expiring_within_the_wait_is_taken_over_after_waiting() -> None:
    # An older version's record (no `held`: nobody holds its file open) whose process still runs: judged by its time.
    host = load()
    host.inject_fault("hold_run_lock", {"seconds": 10, "legacy": True})
    locked = _lock.wrap(write_batch(), _lock.RunLock.for_run("certificate", host.name))
    result = send(host, locked.batch)
    acquired = result.data(locked.acquire)
    assert acquired["previous"]["token"] == "other-run-token"
    assert 9000 <= acquired["waited_ms"] <= 10000
    assert result[1].ok and result.data(locked.release)["released"] is True
    warning = _lock.takeover_warning(host.name, result, locked)
    assert warning is not None and "ended without releasing it" in warning


def test_a_lock_whose_agent_process_is_gone_is_taken_over_at_once() -> None:
    # A batch cut half-way (its PowerShell process killed) could not release: its time has not run out, but its
    # process is gone, so the next run takes the lock without waiting.
    host = load()
    host.inject_fault("hold_run_lock", {"seconds": 600, "alive": False})
    locked = _lock.wrap(write_batch(), _lock.RunLock.for_run("certificate", host.name))
    result = send(host, locked.batch)
    acquired = result.data(locked.acquire)
    assert acquired["waited_ms"] == 0 and acquired["previous"]["token"] == "other-run-token"
    assert probe(host)["rdpfixProbe"]["value"] == 1


def test_a_lock_left_by_a_batch_of_this_lab_that_ended_is_stale() -> None:
    host = load()
    lock = _lock.RunLock.for_run("machinekeys", host.name)
    only_acquire = Batch(on_error="stop")
    only_acquire.add("lock.acquire", **lock.acquire_args())
    assert send(host, only_acquire)[0].ok
    # That batch (process) has ended without a release: the next run, another token, takes it over.
    locked = _lock.wrap(write_batch(), _lock.RunLock.for_run("machinekeys", host.name))
    assert send(host, locked.batch).data(locked.acquire)["previous"]["token"] == lock.token


def test_the_same_run_renews_its_own_lock() -> None:
    host = load()
    # An earlier batch of this run that ended without its release (the record is this run's token).
    host.inject_fault("hold_run_lock", {"seconds": 600, "token": "mine", "alive": False})
    lock = _lock.RunLock(token="mine", owner={"run": "mine"})
    locked = _lock.wrap(write_batch(), lock)
    result = send(host, locked.batch)
    assert result.data(locked.acquire)["previous"] is None
    assert result.data(locked.release)["released"] is True


def manifest_batch(*ids: str) -> Batch:
    """A write batch as an apply batch (or rdpfix.rdp.server's shared one) builds it: per manifest its folder, the
    manifest, a change, and the manifest again (its done-record)."""
    batch = Batch(on_error="stop")
    for manifest_id in ids:
        folder = f"C:\\ProgramData\\rdpfix\\backups\\{manifest_id}"
        batch.add("dir.create", path=folder)
        batch.add("file.write", path=f"{folder}\\manifest.json", content_b64="e30=")
        batch.add("registry.set", path=RDP_TCP, name="rdpfixProbe", type="REG_DWORD", value=1)
        batch.add("file.write", path=f"{folder}\\Manifest.JSON", content_b64="e30=")
    return batch


def test_the_lock_record_names_every_manifest_the_batch_writes_and_the_next_run_names_them() -> None:
    host = load()
    ids = ("20261203T101500Z-machinekeys-1a2b3", "20261203T101500Z-firewall-4c5d6")
    assert _lock.manifests_of(manifest_batch(*ids)) == [
        {"id": manifest_id, "path": f"C:\\ProgramData\\rdpfix\\backups\\{manifest_id}"} for manifest_id in ids
    ]
    assert _lock.manifests_of(write_batch()) == []
    # A batch killed after its first manifest (its process gone: no release) leaves the record naming both.
    lock = _lock.RunLock.for_run("server", host.name)
    killed = _lock.wrap(manifest_batch(*ids), lock)
    assert killed.batch.ops[killed.acquire]["args"]["owner"]["manifests"][1]["id"] == ids[1]
    cut = Batch(on_error="stop", ops=killed.batch.ops[:3])
    assert send(host, cut)[0].ok
    after = _lock.wrap(write_batch(), _lock.RunLock.for_run("firewall", host.name))
    result = send(host, after.batch)
    warning = _lock.takeover_warning(host.name, result, after)
    assert warning is not None
    for manifest_id in ids:
        assert f"{manifest_id} (C:\\ProgramData\\rdpfix\\backups\\{manifest_id})" in warning
    assert "was never reached" in warning
    # A record without manifests (an older collection's, or a batch without a backup) keeps the plain warning.
    assert _lock.named_manifests({"owner": {"run": "x"}}) == ""
    assert _lock.holder_manifests({"owner": {"manifests": {"id": "m1", "path": "C:\\b\\m1"}}}) == [
        {"id": "m1", "path": "C:\\b\\m1"}
    ]
