"""The run lock as the lab models it (rdplab.ops.lock, docs/agent-protocol.md "The run lock", docs/lab.md): its
folder's DACL, the owner of a file a standard user creates, a lock's life tied to the batch that holds its file open
(not to a process that outlives the batch under PSRP), the expiry cap, and release's bounded retries."""

from __future__ import annotations

import json
import threading
import typing as t
from datetime import timedelta
from pathlib import Path

import pytest

from rdplab import transport_faults
from rdplab.model import host as host_model
from rdplab.model import sddl
from rdplab.model.errors import AccessDenied
from rdplab.model.faults import STANDARD_USER_SID
from rdplab.model.filesystem import PROGRAM_DATA_CHILD_SDDL
from rdplab.model.host import WindowsHost
from rdplab.ops.lock import LOCK_FILE_SDDL, LOCK_FOLDER_SDDL, RELEASE_ATTEMPTS

HOSTS = Path(__file__).resolve().parents[2] / "lab" / "hosts"
FOLDER = "C:\\ProgramData\\rdpfix"
LOCK_FILE = FOLDER + "\\run.lock"
OWNER = {"controller": "ctl01", "run": "r1"}


def load() -> WindowsHost:
    return WindowsHost.from_file(HOSTS / "healthy.yml")


def acquire(token: str = "r1", **extra: t.Any) -> dict[str, t.Any]:
    # As the controller asks for its own folder (_lock.RunLock.acquire_args): secure_folder.
    args = {"token": token, "owner": OWNER, "ttl_seconds": 900, "wait_ms": 30000, "poll_ms": 1000}
    args |= {"secure_folder": True, **extra} if "path" not in extra else extra
    return {"op": "lock.acquire", "args": args}


def release(token: str = "r1") -> dict[str, t.Any]:
    return {"op": "lock.release", "args": {"token": token}, "always": True}


def run(host: WindowsHost, *ops: dict[str, t.Any]) -> list[dict[str, t.Any]]:
    return t.cast(list[dict[str, t.Any]], host.run_batch({"v": 1, "on_error": "stop", "ops": list(ops)})["results"])


def test_the_folder_is_created_protected_and_a_standard_user_cannot_plant_a_lock() -> None:
    host = load()
    [taken, released] = run(host, acquire(), release())
    assert taken["ok"] and released["data"] == {"released": True, "holder": None}
    assert taken["data"]["folder"]["created"] is True and taken["data"]["folder"]["open_to"] == []
    assert host.filesystem.get(FOLDER).sddl == LOCK_FOLDER_SDDL
    assert taken["data"]["lock"]["held"] is True
    with pytest.raises(AccessDenied):
        host.inject_fault("plant_run_lock", {})
    assert not host.filesystem.exists(LOCK_FILE)


def test_a_lock_a_user_planted_in_an_older_versions_folder_is_taken_over_and_the_folder_closed() -> None:
    host = load()
    host.inject_fault("plant_run_lock", {})
    planted = host.filesystem.get(LOCK_FILE)
    # Windows: the creator's token's default owner (the user's own SID); CREATOR OWNER's entry becomes the user's.
    assert sddl.owner_sid(planted.sddl) == STANDARD_USER_SID and f"FA;;;{STANDARD_USER_SID}" not in planted.sddl
    assert f"(A;ID;0x1f01ff;;;{STANDARD_USER_SID})" in planted.sddl
    assert host.filesystem.get(FOLDER).sddl == PROGRAM_DATA_CHILD_SDDL
    [taken, released] = run(host, acquire(), release())
    # The planted record (far expiry, a process the user keeps running) held nothing: its file is not Administrators'.
    assert taken["ok"] and taken["data"]["waited_ms"] == 0
    assert taken["data"]["previous"]["token"] == "planted"
    assert taken["data"]["previous"]["file_owner"] == STANDARD_USER_SID
    folder = taken["data"]["folder"]
    assert folder["open_to"] == ["S-1-5-32-545"] and folder["corrected"] is True
    assert folder["previous_sddl"] == PROGRAM_DATA_CHILD_SDDL
    assert host.filesystem.get(FOLDER).sddl == LOCK_FOLDER_SDDL
    assert released["data"]["released"] is True
    with pytest.raises(AccessDenied):
        host.inject_fault("plant_run_lock", {})


def test_a_folder_the_caller_named_is_reported_never_changed() -> None:
    host = load()
    host.filesystem.make_dirs("C:\\ProgramData\\locks")
    [taken, _released] = run(host, acquire(path="C:\\ProgramData\\locks\\run.lock"), release())
    assert taken["data"]["folder"]["open_to"] == ["S-1-5-32-545"] and taken["data"]["folder"]["corrected"] is False
    assert host.filesystem.get("C:\\ProgramData\\locks").sddl == PROGRAM_DATA_CHILD_SDDL


def test_a_planted_lock_the_user_holds_open_fails_the_run_naming_its_owner() -> None:
    host = load()
    host.inject_fault("plant_run_lock", {"held_open": True})
    [refused, _released] = run(host, acquire(), release())
    assert refused["error"]["type"] == "Locked"
    assert refused["data"]["holder"]["file_owner"] == STANDARD_USER_SID
    # Made Administrators' all the same (its ownership changes without opening it): after a reboot it is taken over.
    assert host.filesystem.get(LOCK_FILE).sddl == LOCK_FILE_SDDL


def test_an_older_versions_far_future_expiry_counts_no_longer_than_its_last_write_plus_the_longest_time() -> None:
    host = load()
    host.inject_fault("hold_run_lock", {"legacy": True, "seconds": 10 * 86400, "written_ago": 86400 + 60})
    [taken, _released] = run(host, acquire(), release())
    assert taken["ok"], taken
    previous = taken["data"]["previous"]
    written = host.clock() - timedelta(seconds=86400 + 60)
    assert previous["expires"] == (written + timedelta(seconds=86400)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_lock_held_open_by_a_batch_in_progress_is_waited_for_then_refused() -> None:
    host = load()
    host.inject_fault("hold_run_lock", {"seconds": 5})
    [refused, released] = run(host, acquire(), release())
    # Its time runs out within the wait, but its batch still runs: a live lock is never taken by time.
    assert refused["error"]["type"] == "Locked" and refused["data"]["holder"]["token"] == "other-run-token"
    assert released["data"]["released"] is False


def cut_after_acquire(host: WindowsHost, process: dict[str, t.Any] | None) -> None:
    """A batch that takes the lock and is stopped by a terminate before its next operation (its release never runs),
    in ``process``."""
    fault = transport_faults.TransportFault(kind="cut_at_op", op=1, seconds=10)
    context = transport_faults.CommandContext(fault=fault)

    def batch() -> None:
        with (
            host_model.hosted_by(process),
            transport_faults.running(context),
            pytest.raises(transport_faults.BatchCancelled),
        ):
            run(host, acquire("cut-run"), {"op": "util.sleep", "args": {"milliseconds": 0}}, release("cut-run"))

    thread = threading.Thread(target=batch)
    thread.start()
    assert context.stalled.wait(10)
    transport_faults.terminate(context)
    thread.join(10)
    assert json.loads(host.filesystem.get(LOCK_FILE).content)["token"] == "cut-run"


def test_a_lock_left_by_a_stopped_batch_is_free_although_its_psrp_host_process_lives_on() -> None:
    host = load()
    pool = host.open_host_process()
    cut_after_acquire(host, pool)
    assert host.agent_process_alive(pool)
    with host_model.hosted_by(pool):
        [taken, released] = run(host, acquire("rerun"), release("rerun"))
    # Not a 30 s wait ending in Locked: the stopped batch closed its handle, so its `held` record holds nothing.
    assert taken["ok"] and taken["data"]["waited_ms"] == 0, taken
    assert taken["data"]["previous"]["token"] == "cut-run" and taken["data"]["previous"]["process"] == pool
    assert released["data"]["released"] is True and not host.filesystem.exists(LOCK_FILE)


def test_release_tries_again_when_another_agent_holds_the_file_for_a_moment() -> None:
    host = load()
    cut_after_acquire(host, None)
    host.inject_fault("busy_run_lock", {"opens": RELEASE_ATTEMPTS - 1})
    [released] = run(host, {"op": "lock.release", "args": {"token": "cut-run"}})
    assert released["data"] == {"released": True, "holder": None}
    cut_after_acquire(host, None)
    host.inject_fault("busy_run_lock", {"opens": RELEASE_ATTEMPTS})
    [stuck] = run(host, {"op": "lock.release", "args": {"token": "cut-run"}})
    assert stuck["error"]["type"] == "Locked" and "was not released" in stuck["error"]["message"]
    assert host.filesystem.exists(LOCK_FILE)


def test_data_deeper_than_the_result_document_keeps_reaches_the_controller_and_the_guard_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ConvertTo-Json -Depth 10 on the document leaves an operation's data 7 levels; the agent's guard sends the data
    # through JSON at that depth too, so both see the same string where the data went deeper (rdplab.model.jsondepth).
    from rdplab import ops as lab_ops
    from rdplab.model import jsondepth

    deep: dict[str, t.Any] = {"leaf": 1}
    for _level in range(9):
        deep = {"next": deep}
    spec = lab_ops.OPS["system.info"]
    monkeypatch.setitem(lab_ops.OPS, "system.info", type(spec)(lambda host, args: deep, writes=False))
    host = load()
    [answer, guard] = run(
        host,
        {"op": "system.info", "args": {}},
        {"op": "guard", "args": {"label": "deep", "read": {"op": "system.info", "args": {}}, "expect": deep}},
    )
    level = answer["data"]
    for _step in range(jsondepth.DATA_JSON_DEPTH):
        level = level["next"]
    assert level == {"next": jsondepth.DICTIONARY_TYPE}
    assert guard["error"]["type"] == "GuardFailed"
    assert 'found "System.Collections.Specialized.OrderedDictionary"' in guard["error"]["message"]
    assert guard["data"]["actual"] == answer["data"]
