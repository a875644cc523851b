# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The per-host run lock: every batch that writes takes the host's lock first and releases it last.

The agent's ``lock.acquire`` and ``lock.release`` (docs/agent-protocol.md, "The run lock") are primitives on a file
under ``%ProgramData%\\rdpfix``; this module is the policy. ``wrap`` puts ``lock.acquire`` at the front of a write
batch and ``lock.release`` at its end, flagged ``always`` so that it runs even after a failure stopped the batch.
So two controllers, two AWX jobs or two forks on one host never interleave their changes: the second waits at most
``LOCK_WAIT_MS`` on the host (the agent polls every ``LOCK_POLL_MS``), then fails saying who holds the lock and until
when. A batch killed half-way (a cut connection, a crash) cannot release: its record names its agent process, which
the next run sees gone, and in any case the record expires after ``LOCK_TTL_SECONDS``.

The lock covers the writes; what changed between a plan's read and its writes is the guards' concern (``_guards``).
"""

from __future__ import annotations

import dataclasses
import getpass
import ntpath
import os
import secrets
import socket
import typing as t
from dataclasses import dataclass

from ._agent import Batch, BatchResult, OpResult

ACQUIRE = "lock.acquire"
RELEASE = "lock.release"
LOCKED = "Locked"
OPERATIONS = frozenset({ACQUIRE, RELEASE})

# Longer than any apply batch can run: each service stop and start it waits for is bounded at 60 s, and no batch
# restarts more than a few services. A crashed batch's record is normally taken over at once (its process is gone).
LOCK_TTL_SECONDS = 900
# How long a run waits for another run's lock, on the host, before it fails; and how often the agent looks again.
LOCK_WAIT_MS = 30000
LOCK_POLL_MS = 1000


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for the uid (a container without a passwd entry)
        return None


@dataclass(frozen=True)
class RunLock:
    """The lock one module run takes: its token (unique per run) and the owner record the host shows to others."""

    token: str
    owner: dict[str, t.Any]
    ttl_seconds: int = LOCK_TTL_SECONDS
    wait_ms: int = LOCK_WAIT_MS
    poll_ms: int = LOCK_POLL_MS
    path: str | None = None  # None: %ProgramData%\rdpfix\run.lock

    @classmethod
    def for_run(cls, module: str, host: str, run: str | None = None, **policy: t.Any) -> RunLock:
        """The lock of one module run on ``host``: owner = this controller, process and run."""
        token = f"{run or secrets.token_hex(8)}"
        owner = {
            "controller": socket.gethostname(),
            "pid": os.getpid(),
            "user": _user(),
            "module": f"rdpfix.rdp.{module}",
            "host": host,
            "run": token,
        }
        return cls(token=token, owner=owner, **policy)

    def acquire_args(self) -> dict[str, t.Any]:
        args: dict[str, t.Any] = {
            "token": self.token,
            "owner": self.owner,
            "ttl_seconds": self.ttl_seconds,
            "wait_ms": self.wait_ms,
            "poll_ms": self.poll_ms,
        }
        if self.path:
            args["path"] = self.path
        else:
            # rdpfix's own folder: a DACL that lets others than SYSTEM and Administrators create files there (an older
            # version's, inherited from ProgramData) is tightened to the protected one. A folder a caller names is
            # only reported (folder_warning).
            args["secure_folder"] = True
        return args

    def release_args(self) -> dict[str, t.Any]:
        args: dict[str, t.Any] = {"token": self.token}
        if self.path:
            args["path"] = self.path
        return args


@dataclass(frozen=True)
class LockedBatch:
    """A write batch inside the lock: what is sent, and where the caller's own operations are in its results."""

    batch: Batch
    acquire: int
    release: int
    count: int  # the caller's operations, at positions acquire + 1 .. acquire + count

    def own(self, result: BatchResult) -> BatchResult:
        """The results of the caller's operations, at the positions the caller gave them."""
        return BatchResult(result.host, list(result.results[self.acquire + 1 : self.acquire + 1 + self.count]))


def is_locked(batch: Batch) -> bool:
    return bool(batch.ops) and batch.ops[0]["op"] == ACQUIRE


# The file every backup folder's manifest is written to (_action.BackupSet).
MANIFEST_FILE = "manifest.json"


def manifests_of(batch: Batch) -> list[dict[str, str]]:
    """The backup manifests a batch writes (``{id, path}`` each, in order, once each: a manifest written again after
    the changes, its done-record, counts once). Several when rdpfix.rdp.server carries several modules' changes."""
    found: list[dict[str, str]] = []
    for item in batch.ops:
        path = str((item.get("args") or {}).get("path") or "") if item["op"] == "file.write" else ""
        if ntpath.basename(path).lower() != MANIFEST_FILE:
            continue
        folder = ntpath.dirname(path)
        if all(entry["path"].lower() != folder.lower() for entry in found):
            found.append({"id": ntpath.basename(folder), "path": folder})
    return found


def wrap(batch: Batch, lock: RunLock) -> LockedBatch:
    """The batch with ``lock.acquire`` first and ``lock.release`` last (always run). A read-only batch is never
    locked: audits and check mode neither wait nor write.

    The owner record the host keeps while the batch runs names the batch's backup manifests: a batch killed before
    its release (cut, crashed) leaves the record, and the next run that takes the lock over says which manifests
    hold what the interrupted run did (``takeover_warning``)."""
    if not batch.writes:
        raise ValueError("only a batch that writes takes the run lock")
    if batch.on_error != "stop":
        raise ValueError("a locked batch runs with on_error: stop, so that nothing runs without the lock")
    wire = dataclasses.replace(batch, ops=[])
    args = lock.acquire_args()
    manifests = manifests_of(batch)
    if manifests:
        args["owner"] = {**lock.owner, "manifests": manifests}
    acquire = wire.add(ACQUIRE, **args)
    wire.ops.extend(batch.ops)
    release = wire.add_always(RELEASE, **lock.release_args())
    return LockedBatch(wire, acquire, release, len(batch.ops))


def describe_holder(holder: object) -> str:
    """``run 1a2b of rdpfix.rdp.certificate from ctl01 (pid 4242, user awx), taken 2026-..Z, expires 2026-..Z``."""
    if not isinstance(holder, dict):
        return "another run (its lock record could not be read)"
    if holder.get("file_owner") and not holder.get("token"):
        return f"a lock file owned by {holder['file_owner']} (not SYSTEM or Administrators) whose record cannot be read"
    found = holder.get("owner")
    owner: dict[str, t.Any] = found if isinstance(found, dict) else {}
    if not owner:
        who = "a run that left no owner (the lock file is not an rdpfix record)"
    else:
        details = [
            f"pid {owner['pid']}" if owner.get("pid") is not None else "",
            f"user {owner.get('user')}" if owner.get("user") else "",
        ]
        extra = ", ".join(item for item in details if item)
        who = (
            f"run {owner.get('run') or holder.get('token')} of {owner.get('module') or 'rdpfix'} "
            f"from {owner.get('controller') or 'an unknown controller'}" + (f" ({extra})" if extra else "")
        )
    return (
        f"{who}, taken {holder.get('acquired') or 'at an unknown time'}, expires {holder.get('expires') or 'unknown'}"
    )


def holder_manifests(holder: object) -> list[dict[str, str]]:
    """The backup manifests a lock record's owner names (none for a record without them)."""
    owner = holder.get("owner") if isinstance(holder, dict) else None
    found = owner.get("manifests") if isinstance(owner, dict) else None
    if isinstance(found, dict):  # a one-element list, unrolled on the way
        found = [found]
    if not isinstance(found, list):
        return []
    return [
        {"id": str(entry.get("id")), "path": str(entry.get("path") or "")}
        for entry in found
        if isinstance(entry, dict) and entry.get("id")
    ]


def named_manifests(holder: object) -> str:
    """``backup manifest 2026...-firewall-1a2b3 (C:\\...)`` for each manifest the holder names, joined."""
    return ", ".join(f"{entry['id']} ({entry['path']})" for entry in holder_manifests(holder))


def refusal(host: str, outcome: OpResult, lock: RunLock) -> str:
    """The message of a run that did not get the lock (nothing was changed: every later operation was skipped)."""
    if outcome.error_type == LOCKED:
        holder = outcome.data.get("holder")
        if isinstance(holder, dict) and holder.get("file_owner"):
            return (
                f"{host}: the rdpfix run lock file ({outcome.data.get('path') or 'run.lock'}) is owned by "
                f"{holder['file_owner']}, not SYSTEM or Administrators, and a process holds it open, so it cannot be "
                "taken over: a standard user may have created it to block rdpfix runs. End that process (or restart "
                "the host) and run again; nothing was changed"
            )
        waited = outcome.data.get("waited_ms")
        seconds = (int(waited) if isinstance(waited, int) else lock.wait_ms) // 1000
        until = holder.get("expires") if isinstance(holder, dict) else None
        return (
            f"{host}: another rdpfix run holds this host's run lock ({outcome.data.get('path') or 'run.lock'}): "
            f"{describe_holder(holder)}. Waited {seconds} s; nothing was changed. Run again when it has finished"
            + (f"; its lock expires at {until} at the latest" if until else "")
        )
    return (
        f"{host}: the rdpfix run lock could not be taken ({outcome.error_type or 'Failed'}: "
        f"{outcome.error_message or ''}); nothing was changed"
    )


def release_warning(host: str, result: BatchResult, locked: LockedBatch) -> str | None:
    """A warning when the release did not release this run's lock (taken over meanwhile, or the release failed)."""
    outcome = result[locked.release]
    if outcome.skipped:
        return None
    if not outcome.ok:
        return (
            f"{host}: the rdpfix run lock could not be released ({outcome.error_type}: {outcome.error_message}); "
            f"it expires on its own"
        )
    if outcome.data.get("released") is False and outcome.data.get("holder") is not None:
        return (
            f"{host}: this run's lock had been taken over before it ended, by {describe_holder(outcome.data['holder'])}"
        )
    return None


def takeover_warning(host: str, result: BatchResult, locked: LockedBatch) -> str | None:
    """A warning when this run took over a lock left by another run (expired, or its agent process was gone)."""
    outcome = result[locked.acquire]
    previous = outcome.data.get("previous") if outcome.ok else None
    if not previous:
        return None
    if previous.get("file_owner"):
        return (
            f"{host}: took over the rdpfix run lock file, which was owned by {previous['file_owner']}, not SYSTEM or "
            "Administrators (a standard user may have created it to block rdpfix runs): its record "
            f"({describe_holder(dict(previous, file_owner=None))}) was not trusted, and the file is Administrators' now"
        )
    named = named_manifests(previous)
    if not named:
        return (
            f"{host}: took over the rdpfix run lock left by {describe_holder(previous)}: that run ended without "
            "releasing it (cut or crashed); its changes, if any, are in its backup manifest"
        )
    return (
        f"{host}: took over the rdpfix run lock left by {describe_holder(previous)}: that run's apply batch ended "
        f"before its last operation (cut or crashed), so it may have made part of its changes. The backup manifests "
        f"it was writing: {named} (rdpfix.rdp.restore lists those on the host, each item with its status; one not on "
        "the host was never reached, and nothing of its changes was made). This run planned from the host as that "
        "run left it"
    )


def folder_warning(host: str, result: BatchResult, locked: LockedBatch) -> str | None:
    """A warning when the lock's folder let others than SYSTEM and Administrators create or change files in it (any
    of them could block every run by creating the lock file): rdpfix's own folder is given the protected DACL, a
    folder the lock's ``path`` named is only reported."""
    outcome = result[locked.acquire]
    folder = outcome.data.get("folder") if (outcome.ok or outcome.error_type == LOCKED) else None
    if not isinstance(folder, dict) or not folder.get("open_to"):
        return None
    found = folder["open_to"]
    who = ", ".join(str(sid) for sid in (found if isinstance(found, list) else [found]))
    where = folder.get("path") or "the run lock's folder"
    if folder.get("corrected"):
        return (
            f"{host}: the rdpfix run lock's folder {where} let others than SYSTEM and Administrators create or change "
            f"files in it ({who}); it now has the protected SYSTEM/Administrators DACL rdpfix gives its own folders "
            f"(it was {folder.get('previous_sddl')})"
        )
    return (
        f"{host}: the rdpfix run lock's folder {where} lets others than SYSTEM and Administrators create or change "
        f"files in it ({who}): any of them can block every rdpfix run by creating the lock file. Give it a DACL for "
        "SYSTEM and Administrators only (rdpfix changes the DACL of its own folder only, %ProgramData%\\rdpfix)"
    )
