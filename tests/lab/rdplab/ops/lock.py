"""lock.acquire / lock.release: the host's rdpfix run lock (docs/agent-protocol.md, "The run lock").

As the agent does it: one file whose JSON record names the holder ``{token, owner, acquired, expires, process}``; a
record is taken over when it has expired or its agent process is gone (a batch that was cut), renewed when its token
is the caller's, and otherwise held until ``wait_ms`` has passed. Windows would wait; the lab knows the outcome of
the wait at once (no other batch runs while one runs in the lab, and the lab's other holders - the
``hold_run_lock`` fault - never release on their own), so it answers without sleeping, as ``util.sleep`` does: the
lock is taken when the holder's time runs out within the wait, else the answer is ``Locked`` after ``wait_ms``.
"""

from __future__ import annotations

import json
import ntpath
import typing as t
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from rdplab.model.errors import InvalidArgument, Locked
from rdplab.model.filesystem import validate_path
from rdplab.model.timeutil import iso
from rdplab.ops import _args

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost

MAX_TTL_SECONDS = 86400
MAX_WAIT_MS = 60000
ISO = "%Y-%m-%dT%H:%M:%SZ"


def lock_path(host: WindowsHost, args: dict[str, t.Any]) -> str:
    path = args.get("path")
    if path is None or path == "":
        return ntpath.join(host.system.program_data, "rdpfix", "run.lock")
    return validate_path(path)


@dataclass(frozen=True)
class Found:
    record: dict[str, t.Any]
    expires: datetime


def read_record(host: WindowsHost, path: str, ttl_seconds: int) -> Found | None:
    """The lock file's record; a file that is not a record is held by nobody known until it was written plus the
    caller's time to live (the lab's files keep no times: it counts as written just now)."""
    entry = host.filesystem.get(path)
    if entry is None:
        return None
    try:
        record = json.loads(entry.content.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        record = None
    if isinstance(record, dict) and isinstance(record.get("token"), str):
        expires = _utc(record.get("expires"))
        if expires is not None:
            return Found(
                {
                    "token": record["token"],
                    "owner": record.get("owner"),
                    "acquired": record.get("acquired"),
                    "expires": iso(expires),
                    "process": record.get("process"),
                },
                expires,
            )
    written = host.clock()
    expires = written + timedelta(seconds=ttl_seconds)
    return Found(
        {"token": None, "owner": None, "acquired": iso(written), "expires": iso(expires), "process": None}, expires
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


def lock_acquire(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    path = lock_path(host, args)
    token = _args.string(args, "token")
    owner = args.get("owner")
    if not isinstance(owner, dict):
        raise InvalidArgument("argument 'owner' must be an object")
    ttl = _integer(args, "ttl_seconds", 1, MAX_TTL_SECONDS, None)
    wait = _integer(args, "wait_ms", 0, MAX_WAIT_MS, 0)
    _integer(args, "poll_ms", 100, 10000, 1000)
    now = host.clock()
    process = host.agent_process_record()
    found = read_record(host, path, ttl)
    waited = 0
    previous: dict[str, t.Any] | None = None
    acquired = now
    if found is not None:
        ours = found.record["token"] == token
        held = not ours and found.expires > now and host.agent_process_alive(found.record["process"])
        if held:
            until = (found.expires - now).total_seconds() * 1000
            if until > wait:
                raise Locked(
                    f"the rdpfix run lock {path} is held by another run until {found.record['expires']}",
                    data={"path": path, "holder": found.record, "now": iso(now), "waited_ms": wait},
                )
            # Windows would poll until the holder's time ran out, then take the lock over.
            waited = int(until)
        if ours:
            acquired = _utc(found.record["acquired"]) or now
        else:
            previous = found.record
    record = {
        "token": token,
        "owner": owner,
        "acquired": iso(acquired),
        "expires": iso(now + timedelta(seconds=ttl)),
        "process": process,
    }
    host.filesystem.make_dirs(ntpath.dirname(path))
    host.filesystem.write(path, json.dumps(record, separators=(",", ":")).encode("utf-8"))
    return {"acquired": True, "path": path, "lock": record, "previous": previous, "waited_ms": waited}


def lock_release(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    path = lock_path(host, args)
    token = _args.string(args, "token")
    found = read_record(host, path, 0)
    if found is None:
        return {"released": False, "holder": None}
    if found.record["token"] != token:
        return {"released": False, "holder": found.record}
    host.filesystem.remove(path)
    return {"released": True, "holder": None}
