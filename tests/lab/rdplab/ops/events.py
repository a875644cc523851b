"""events.query: the operation rdpfix.rdp.facts added - several logs and channels since a time, in one call.

It reads the model's event log exactly as the PowerShell agent's entry of the same name reads Windows
(docs/agent-protocol.md): one Get-WinEvent FilterHashtable per query (log, providers, ids, StartTime), the matches of
every query together newest first, each with its named EventData values. A channel the host does not have is reported
in ``unavailable`` rather than failing the operation, as Get-WinEvent's "no event log" error is on Windows.
"""

from __future__ import annotations

import typing as t

from rdplab.model.errors import InvalidArgument
from rdplab.model.events import RCM
from rdplab.model.timeutil import iso, parse_time
from rdplab.ops import _args

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost

# The channels every modelled host has: the classic logs and the RD Session Host's own channels.
CHANNELS = frozenset(
    name.casefold()
    for name in (
        "System",
        "Security",
        "Application",
        f"{RCM}/Admin",
        f"{RCM}/Operational",
    )
)


def _query(raw: object, index: int) -> tuple[str, list[str] | None, list[int] | None]:
    where = f"queries[{index}]"
    if not isinstance(raw, dict):
        raise InvalidArgument(f"argument {where} must be a mapping, got {raw!r}")
    log = raw.get("log")
    if not isinstance(log, str) or not log:
        raise InvalidArgument(f"argument {where}.log must be a non-empty string, got {log!r}")
    providers = raw.get("providers")
    if providers is not None and (
        not isinstance(providers, list) or not all(isinstance(item, str) and item for item in providers)
    ):
        raise InvalidArgument(f"argument {where}.providers must be a list of strings, got {providers!r}")
    ids = raw.get("ids")
    if ids is not None and (
        not isinstance(ids, list) or not all(isinstance(item, int) and not isinstance(item, bool) for item in ids)
    ):
        raise InvalidArgument(f"argument {where}.ids must be a list of integers, got {ids!r}")
    return log, providers, ids


def events_query(host: WindowsHost, args: dict[str, t.Any]) -> dict[str, t.Any]:
    since_text = _args.string(args, "since")
    try:
        since = parse_time(since_text, host.clock())
    except ValueError:
        raise InvalidArgument(f"argument 'since' must be an ISO 8601 time, got {since_text!r}") from None
    max_events = _args.integer(args, "max_events", 1, 1000) if "max_events" in args else 100
    queries = args.get("queries")
    if not isinstance(queries, list):
        raise InvalidArgument(f"argument 'queries' must be a list, got {queries!r}")
    parsed = [_query(raw, index) for index, raw in enumerate(queries)]

    found: list[dict[str, t.Any]] = []
    unavailable: list[dict[str, str]] = []
    for log, providers, ids in parsed:
        if log.casefold() not in CHANNELS:
            unavailable.append(
                {"log": log, "reason": f'There is not an event log on the localhost computer that matches "{log}".'}
            )
            continue
        wanted_providers = {name.casefold() for name in providers} if providers is not None else None
        matching = [
            event
            for event in host.events.events
            if event.log.casefold() == log.casefold()
            and event.time >= since
            and (wanted_providers is None or event.provider.casefold() in wanted_providers)
            and (ids is None or event.id in ids)
        ]
        # Get-WinEvent returns the newest first and stops at MaxEvents, per query.
        for event in sorted(matching, key=lambda item: item.time, reverse=True)[:max_events]:
            found.append(
                {
                    "log": event.log,
                    "provider": event.provider,
                    "id": event.id,
                    "level": event.level,
                    "time": iso(event.time),
                    "message": event.message,
                    "data": dict(sorted(event.data.items())),
                }
            )
    found.sort(key=lambda item: str(item["time"]), reverse=True)
    return {"events": found, "unavailable": unavailable}
