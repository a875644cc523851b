"""lock.acquire / lock.release: the host's rdpfix run lock (docs/agent-protocol.md, "The run lock").

As the agent does it: one file whose JSON record names the holder ``{token, owner, acquired, expires, process,
held}``, held open by the batch that took it for as long as that batch runs (``host.open_lock_files``; the host model
closes a batch's lock files when the batch ends, however it ends). A file nobody holds open is free when its record
says ``held`` (its batch has ended, whatever became of its process: under PSRP the host process outlives the batch);
an older version's record (no ``held``) is judged by its time - never beyond its last write plus the longest time to
live - and its process. A lock file not owned by SYSTEM or Administrators (a standard user's) is made Administrators'
and taken over when nobody holds it open. The folder is created with a protected SYSTEM/Administrators DACL; an
existing folder that lets anyone else create or change files is reported, and corrected when the caller asks
(``secure_folder``: the controller does for rdpfix's own folder).

Windows would wait; the lab knows the outcome of the wait at once (no other batch runs while one runs in the lab, and
the lab's other holders - the ``hold_run_lock`` and ``plant_run_lock`` faults - never release on their own), so it
answers without sleeping, as ``util.sleep`` does: an older version's lock is taken when its time runs out within the
wait, a lock held open is ``Locked`` after ``wait_ms``, and a file another agent holds for a moment (the
``busy_run_lock`` fault) costs one poll per busy open.
"""

from __future__ import annotations

import json
import ntpath
import typing as t
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from rdplab.model import sddl as sddl_mod
from rdplab.model.errors import InvalidArgument, Locked
from rdplab.model.filesystem import Entry, normalize, validate_path
from rdplab.model.timeutil import iso
from rdplab.ops import _args

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost

MAX_TTL_SECONDS = 86400
MAX_WAIT_MS = 60000
ISO = "%Y-%m-%dT%H:%M:%SZ"
# lock.release's bounded retries of a file held open for a moment (the agent's $LockReleaseAttempts and pause).
RELEASE_ATTEMPTS = 10
RELEASE_PAUSE_MS = 200
TRUSTED_SIDS = (sddl_mod.SID_SYSTEM, sddl_mod.SID_ADMINISTRATORS)
CREATOR_SIDS = ("S-1-3-0", "S-1-3-1")
LOCK_FOLDER_SDDL = "O:BAG:SYD:PAI(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)"
LOCK_FILE_SDDL = "O:BAG:SYD:PAI(A;;FA;;;SY)(A;;FA;;;BA)"
# add file, add subfolder, delete child, delete, write DAC, write owner, generic all, generic write.
OPEN_RIGHTS = 0x2 | 0x4 | 0x40 | 0x10000 | 0x40000 | 0x80000 | 0x10000000 | 0x40000000
# Holders in host.open_lock_files: this batch, another run's batch (shares read: its record can be read), and a
# standard user's process holding its planted file with FileShare.None (nothing can be read).
HOLDER_BATCH = "batch"
HOLDER_OTHER_RUN = "other"
HOLDER_USER = "user"
# A holder whose record cannot be read (the agent's, for a standard user's file held open).
_EMPTY_HOLDER: dict[str, t.Any] = {
    "token": None,
    "owner": None,
    "acquired": None,
    "expires": None,
    "process": None,
    "held": False,
}


def lock_path(host: WindowsHost, args: dict[str, t.Any]) -> str:
    path = args.get("path")
    if path is None or path == "":
        return ntpath.join(host.system.program_data, "rdpfix", "run.lock")
    return validate_path(path)


def open_principals(sddl: str) -> list[str]:
    """The agent's Get-LockOpenPrincipals: a non-trusted owner, then every allowed SID (inherit-only entries included)
    with a right to create or change files, in the DACL's order."""
    owner = sddl_mod.owner_sid(sddl) or ""
    found = [] if owner in TRUSTED_SIDS else [owner]
    if "D:" not in sddl:
        return [*found, sddl_mod.SID_EVERYONE]
    for ace in sddl_mod.dacl(sddl, inherit_only=True):
        if not ace.allow or ace.sid in TRUSTED_SIDS or ace.sid in CREATOR_SIDS or ace.sid in found:
            continue
        if ace.mask & OPEN_RIGHTS:
            found.append(ace.sid)
    return found


def ensure_folder(host: WindowsHost, folder: str, secure: bool) -> dict[str, t.Any]:
    """The agent's Initialize-LockFolder."""
    report: dict[str, t.Any] = {
        "path": folder,
        "created": False,
        "open_to": [],
        "corrected": False,
        "previous_sddl": None,
    }
    entry = host.filesystem.get(folder)
    if entry is None:
        host.filesystem.make_dirs(folder, LOCK_FOLDER_SDDL)
        report["created"] = True
        return report
    found = open_principals(entry.sddl)
    if not found:
        return report
    report["open_to"] = found
    report["previous_sddl"] = entry.sddl
    if secure:
        host.filesystem.set_sddl(folder, LOCK_FOLDER_SDDL)
        report["corrected"] = True
    return report


@dataclass(frozen=True)
class Found:
    record: dict[str, t.Any]
    expires: datetime


def read_record(host: WindowsHost, entry: Entry, ttl_seconds: int) -> Found:
    """The lock file's record; a file that is not a record is held by nobody known until it was written plus the
    caller's time to live. No expiry counts beyond the last write (never later than now) plus the longest time to
    live (files whose last write the model does not keep count as written just now)."""
    now = host.clock()
    written = min(entry.written or now, now)
    latest = written + timedelta(seconds=MAX_TTL_SECONDS)
    try:
        record = json.loads(entry.content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        record = None
    if isinstance(record, dict) and isinstance(record.get("token"), str):
        expires = _utc(record.get("expires"))
        if expires is not None:
            expires = min(expires, latest)
            return Found(
                {
                    "token": record["token"],
                    "owner": record.get("owner"),
                    "acquired": record.get("acquired"),
                    "expires": iso(expires),
                    "process": record.get("process"),
                    "held": record.get("held") is True,
                },
                expires,
            )
    expires = written + timedelta(seconds=ttl_seconds)
    return Found(
        {
            "token": None,
            "owner": None,
            "acquired": iso(written),
            "expires": iso(expires),
            "process": None,
            "held": False,
        },
        expires,
    )


def _utc(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, ISO).replace(tzinfo=UTC)
    except ValueError:
        return None


def _integer(args: dict[str, t.Any], name: str, low: int, high: int, default: int | None) -> int:
    if name not in args and default is not None:
        return default
    return _args.integer(args, name, low, high)


def _busy(host: WindowsHost) -> bool:
    """One open of the lock file meets a sharing violation (the busy_run_lock fault)."""
    if host.lock_busy_opens > 0:
        host.lock_busy_opens -= 1
        return True
    return False


def _locked(path: str, holder: dict[str, t.Any] | None, now: datetime, waited: int, folder: dict[str, t.Any]) -> Locked:
    until = (holder or {}).get("expires") or "unknown"
    return Locked(
        f"the rdpfix run lock {path} is held by another run until {until}",
        data={"path": path, "holder": holder, "now": iso(now), "waited_ms": waited, "folder": folder},
    )


def lock_acquire(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    path = lock_path(host, args)
    secure = _args.boolean(args, "secure_folder", False)
    token = _args.string(args, "token")
    owner = args.get("owner")
    if not isinstance(owner, dict):
        raise InvalidArgument("argument 'owner' must be an object")
    ttl = _integer(args, "ttl_seconds", 1, MAX_TTL_SECONDS, None)
    wait = _integer(args, "wait_ms", 0, MAX_WAIT_MS, 0)
    poll = _integer(args, "poll_ms", 100, 10000, 1000)
    now = host.clock()
    process = host.agent_process_record()
    folder = ensure_folder(host, ntpath.dirname(path), secure)
    key = normalize(path)
    record = {
        "token": token,
        "owner": owner,
        "acquired": iso(now),
        "expires": iso(now + timedelta(seconds=ttl)),
        "process": process,
        "held": True,
    }
    entry = host.filesystem.get(path)
    if entry is None:
        created = host.filesystem.write(path, _bytes(record), LOCK_FILE_SDDL)
        created.written = now
        host.open_lock_files[key] = HOLDER_BATCH
        return {"acquired": True, "path": path, "lock": record, "previous": None, "waited_ms": 0, "folder": folder}
    kept = host.open_lock_files.get(key) == HOLDER_BATCH
    file_owner = sddl_mod.owner_sid(entry.sddl) or ""
    foreign = not kept and file_owner not in TRUSTED_SIDS
    if foreign:
        # Made Administrators' before it is opened (taking ownership needs no access to its content).
        entry.sddl = LOCK_FILE_SDDL
    waited = 0
    if not kept:
        holder_kind = host.open_lock_files.get(key)
        if holder_kind in (HOLDER_OTHER_RUN, HOLDER_USER):
            # Held open by a batch in progress (its record can be read) or by a user's process (FileShare.None:
            # nothing can be read): neither lets go within the lab's wait.
            holder = read_record(host, entry, ttl).record if holder_kind == HOLDER_OTHER_RUN else None
            if foreign:
                holder = (holder or _EMPTY_HOLDER) | {"file_owner": file_owner}
            raise _locked(path, holder, now, wait, folder)
        while _busy(host):
            # Another agent holds the file for a moment: the agent looks again after a poll.
            if waited >= wait:
                raise _locked(path, None, now, waited, folder)
            waited += min(poll, wait - waited)
    found = read_record(host, entry, ttl)
    current = found.record
    ours = current["token"] == token and not foreign
    alive = (
        not kept
        and not current["held"]
        and not foreign
        and found.expires > now
        and host.agent_process_alive(current["process"])
    )
    if not ours and alive:
        until = int((found.expires - now).total_seconds() * 1000)
        if until > wait:
            raise _locked(path, current, now, wait, folder)
        # Windows would poll until the holder's time ran out, then take the lock over.
        waited = max(waited, until)
    if ours:
        record["acquired"] = current["acquired"] or record["acquired"]
    entry.content = _bytes(record)
    entry.written = now
    if foreign:
        current["file_owner"] = file_owner
    host.open_lock_files[key] = HOLDER_BATCH
    previous = None if ours else current
    return {"acquired": True, "path": path, "lock": record, "previous": previous, "waited_ms": waited, "folder": folder}


def lock_release(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    path = lock_path(host, args)
    token = _args.string(args, "token")
    key = normalize(path)
    entry = host.filesystem.get(path)
    if host.open_lock_files.get(key) == HOLDER_BATCH and entry is not None:
        # This batch holds the file: nobody else wrote it since this batch took it.
        found = read_record(host, entry, 0)
        if found.record["token"] != token:
            return {"released": False, "holder": found.record}
        host.filesystem.remove(path)
        del host.open_lock_files[key]
        return {"released": True, "holder": None}
    if entry is None:
        return {"released": False, "holder": None}
    for _attempt in range(RELEASE_ATTEMPTS):
        if host.open_lock_files.get(key) == HOLDER_USER or _busy(host):
            continue
        found = read_record(host, entry, 0)
        if found.record["token"] != token:
            return {"released": False, "holder": found.record}
        host.filesystem.remove(path)
        return {"released": True, "holder": None}
    raise Locked(f"the rdpfix run lock {path} stayed open in another process; it was not released")


def _bytes(record: dict[str, t.Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode("utf-8")
