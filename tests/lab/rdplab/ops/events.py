"""events.query: the operation rdpfix.rdp.facts added - several logs and channels since a time, in one call.

It reads the model's event log as the PowerShell agent's entry of the same name reads Windows
(docs/agent-protocol.md): per query one XPath over System/Provider, System/EventID (single IDs and ranges) and
System/TimeCreated, read newest first with EventLogReader, at most ``max_events`` records per query. Windows'
failures are kept (docs/lab.md, "Event log"):

- a query with more expressions than the event log takes is refused with "The specified query is invalid." - the
  agent does not tolerate query errors, so it is reported in ``invalid_queries``, never answered as "no events";
- a channel the host does not have is reported in ``unavailable``, and the other queries still run;
- a record that cannot be read is skipped and counted in ``unreadable``; a record whose description cannot be
  rendered is kept with ``message`` null;
- ``level`` is the number, ``level_name`` and ``message`` are rendered in the host's UI language.
"""

from __future__ import annotations

import typing as t
from datetime import datetime

from rdplab import agent_code
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

# The most expressions (provider tests, EventID comparisons, the time test) an event log query is answered with:
# 22 EventIDs work, 24 are refused (elastic/beats#1491; PowerShell/PowerShell#12303). Where exactly between 22 and 24
# Windows draws the line, and how it counts the other expressions, is UNCONFIRMED: the lab refuses above 22.
MAX_TERMS = 22
INVALID_QUERY = "The specified query is invalid."  # ERROR_EVT_INVALID_QUERY (15001)
CHANNEL_NOT_FOUND = "The specified channel could not be found."  # ERROR_EVT_CHANNEL_NOT_FOUND (15007)
UNREADABLE = "The data is invalid."  # EventLogInvalidDataException, as Get-WinEvent reports such a record
# The agent stops reading a query after this many unreadable records in a row.
MAX_UNREADABLE = 100

IdSpec = tuple[int, int]


class _Query(t.NamedTuple):
    log: str
    providers: list[str] | None
    ids: list[IdSpec] | None  # (low, high); a single ID is (n, n)
    terms: int


def _query(raw: object, index: int) -> _Query:
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
    raw_ids = raw.get("ids")
    if raw_ids is not None and not isinstance(raw_ids, list):
        raise InvalidArgument(f"argument {where}.ids must be a list, got {raw_ids!r}")
    ids: list[IdSpec] | None = None
    terms = len(providers or []) + 1
    if raw_ids is not None:
        ids = []
        for item in raw_ids:
            if _number(item):
                ids.append((item, item))
                terms += 1
            elif isinstance(item, list) and len(item) == 2 and all(_number(end) for end in item) and item[0] <= item[1]:
                ids.append((item[0], item[1]))
                terms += 2
            else:
                raise InvalidArgument(f"argument {where}.ids must hold integers and [low, high] ranges, got {item!r}")
    return _Query(log, providers, ids, terms)


def _number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    if agent_code.current().events_from_hashtable:
        return _as_get_winevent_answers(host, since, max_events, queries)
    parsed = [_query(raw, index) for index, raw in enumerate(queries)]
    locale = host.system.locale

    found: list[dict[str, t.Any]] = []
    unavailable: list[dict[str, str]] = []
    invalid: list[dict[str, t.Any]] = []
    unreadable: list[dict[str, t.Any]] = []
    for index, query in enumerate(parsed):
        if query.log.casefold() not in CHANNELS:
            unavailable.append({"log": query.log, "reason": CHANNEL_NOT_FOUND})
            continue
        if query.terms > MAX_TERMS:
            invalid.append({"index": index, "log": query.log, "reason": INVALID_QUERY})
            continue
        wanted_providers = {name.casefold() for name in query.providers} if query.providers is not None else None
        matching = [
            event
            for event in host.events.events
            if event.log.casefold() == query.log.casefold()
            and event.time >= since
            and (wanted_providers is None or event.provider.casefold() in wanted_providers)
            and (query.ids is None or any(low <= event.id <= high for low, high in query.ids))
        ]
        returned = skipped = 0
        # EventLogReader with ReverseDirection: the newest first, stopping at max_events records read.
        for event in sorted(matching, key=lambda item: item.time, reverse=True):
            if returned >= max_events or skipped >= MAX_UNREADABLE:
                break
            if event.fault == "read":
                skipped += 1
                continue
            level_name, message = event.render(locale)
            found.append(
                {
                    "log": event.log,
                    "provider": event.provider,
                    "id": event.id,
                    "level": event.level_value,
                    "level_name": level_name,
                    "time": iso(event.time),
                    "message": None if event.fault == "message" else message,
                    "data": dict(sorted(event.data.items())),
                }
            )
            returned += 1
        if skipped:
            unreadable.append({"log": query.log, "count": skipped, "reason": UNREADABLE})
    found.sort(key=lambda item: str(item["time"]), reverse=True)
    return {"events": found, "unavailable": unavailable, "invalid_queries": invalid, "unreadable": unreadable}


def _as_get_winevent_answers(
    host: WindowsHost, since: datetime, max_events: int, queries: list[t.Any]
) -> dict[str, t.Any]:
    """What an agent reading with ``Get-WinEvent -FilterHashtable ... -ErrorAction Stop`` gets (the agent before
    issue 9): Get-WinEvent builds its query with TolerateQueryErrors, so a query the event log refuses reads nothing
    and ends in "No events were found", which that agent took for no events; the error of one record it cannot read
    or render stops the cmdlet, and that agent reported the whole log unavailable; the level is LevelDisplayName
    [GetWinEvent]."""
    found: list[dict[str, t.Any]] = []
    unavailable: list[dict[str, str]] = []
    for index, raw in enumerate(queries):
        query = _query(raw, index)
        if query.ids is not None and any(low != high for low, high in query.ids):
            raise InvalidArgument(f'queries[{index}].ids: Cannot convert the "System.Object[]" value to "System.Int32"')
        if query.log.casefold() not in CHANNELS:
            unavailable.append(
                {
                    "log": query.log,
                    "reason": f'There is not an event log on the localhost computer that matches "{query.log}".',
                }
            )
            continue
        if query.terms > MAX_TERMS:
            continue
        wanted = {name.casefold() for name in query.providers} if query.providers is not None else None
        matching = sorted(
            (
                event
                for event in host.events.events
                if event.log.casefold() == query.log.casefold()
                and event.time >= since
                and (wanted is None or event.provider.casefold() in wanted)
                and (query.ids is None or any(low <= event.id <= high for low, high in query.ids))
            ),
            key=lambda item: item.time,
            reverse=True,
        )[:max_events]
        if any(event.fault for event in matching):
            unavailable.append({"log": query.log, "reason": UNREADABLE})
            continue
        for event in matching:
            level_name, message = event.render(host.system.locale)
            found.append(
                {
                    "log": event.log,
                    "provider": event.provider,
                    "id": event.id,
                    "level": level_name,
                    "time": iso(event.time),
                    "message": message,
                    "data": dict(sorted(event.data.items())),
                }
            )
    found.sort(key=lambda item: str(item["time"]), reverse=True)
    return {"events": found, "unavailable": unavailable}
