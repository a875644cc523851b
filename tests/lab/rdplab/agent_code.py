"""What the lab reads from the agent's own code, where a result depends on how the agent is written.

The lab cannot run PowerShell. Most operations return what Windows holds whatever script asks, so the lab's Python
operations answer from the host's state. A few answers depend on *how* the agent asks: PowerShell unrolls a
one-element array assigned from an ``if`` statement, ``-ErrorAction SilentlyContinue`` turns a failure into nothing,
``ServiceController.StartType`` does not exist on .NET Framework 4.5.2, ``Restart-Service`` stops a disabled service
and then fails to start it. For those, the lab reads the agent script it was sent (the recogniser has checked that it
is the collection's ``_agent.ps1`` byte for byte) and answers as Windows would answer *that* code. An agent whose
code the lab cannot classify is an error of the lab, never a guess (docs/lab.md, "How the lab follows the agent's
code").
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

# The list fields of a firewall rule record (docs/agent-protocol.md, "rule record").
RULE_LIST_FIELDS = ("local_ports", "remote_ports", "remote_addresses")


class AgentCodeUnknown(RuntimeError):
    """The agent's code no longer has a shape the lab can classify: the lab must be taught, not guess."""


@dataclass(frozen=True)
class AgentCode:
    """Facts about the agent script that decide what Windows would return to it."""

    # Rule record list fields the agent assigns without ``@(...)``: a one-element list reaches JSON as a scalar,
    # an empty one as null.
    unrolled_rule_lists: frozenset[str]
    # The rule listing reads with -ErrorAction SilentlyContinue/Ignore: a provider failure is an empty list.
    rule_read_errors_silenced: bool
    # Filters are read from ActiveStore in bulk and joined to rules by InstanceID only: a Group Policy rule and a
    # local rule with the same ID get the same filters.
    filters_joined_across_stores: bool
    # service.get reads ServiceController.StartType (.NET Framework 4.6.1+) instead of Win32_Service.StartMode.
    start_type_from_service_controller: bool
    # service.restart calls Restart-Service: no Disabled check before the stop, and waits without a bound.
    restart_with_cmdlet: bool
    # events.query reads with Get-WinEvent -FilterHashtable -ErrorAction Stop: a query the event log refuses is
    # tolerated into "No events were found", one unreadable record loses its whole query, and the level is the
    # localised LevelDisplayName (rdplab.ops.events).
    events_from_hashtable: bool = False
    # firewall.rule.new looks for an existing Name in the local store only (Get-NetFirewallRule's default store):
    # a Name only Group Policy has is created again locally, where the policy's rule shadows it.
    rule_new_checks_local_store_only: bool = False


def _block(text: str, start: re.Pattern[str], what: str) -> str:
    """The text from ``start`` to the end of its brace block (the agent's style: the closing brace at the indent of
    the line that opened it)."""
    match = start.search(text)
    if match is None:
        raise AgentCodeUnknown(f"the agent has no {what}")
    line_start = text.rfind("\n", 0, match.start()) + 1
    indent = len(text[line_start:]) - len(text[line_start:].lstrip(" "))
    end = re.compile(rf"^ {{{indent}}}\}}", re.MULTILINE).search(text, match.end())
    if end is None:
        raise AgentCodeUnknown(f"the end of the agent's {what} cannot be found")
    return text[match.start() : end.end()]


def _function(text: str, name: str) -> str:
    return _block(text, re.compile(rf"^function {re.escape(name)} \{{", re.MULTILINE), f"function {name}")


def _operation(text: str, name: str) -> str:
    return _block(text, re.compile(rf"^ +'{re.escape(name)}' = \{{", re.MULTILINE), f"operation {name}")


_SILENT = re.compile(r"SilentlyContinue|ErrorAction\s*=?\s*'?Ignore", re.IGNORECASE)


def analyse(text: str) -> AgentCode:
    """Classify an agent script (raises AgentCodeUnknown when a fact cannot be read from it)."""
    records = _function(text, "Get-FirewallRuleRecords")
    unrolled: set[str] = set()
    for name in RULE_LIST_FIELDS:
        found = re.search(rf"^\s*{name}\s*=\s*(\S.*)$", records, re.MULTILINE)
        if found is None:
            raise AgentCodeUnknown(f"Get-FirewallRuleRecords does not assign {name}")
        if not found[1].startswith("@("):
            unrolled.add(name)
    listing = _operation(text, "firewall.rules.list")
    service_get = _operation(text, "service.get")
    if "StartType" not in service_get and "StartMode" not in service_get:
        raise AgentCodeUnknown("service.get reads neither ServiceController.StartType nor Win32_Service.StartMode")
    restart = _operation(text, "service.restart")
    new_rule = _operation(text, "firewall.rule.new")
    events = _operation(text, "events.query")
    if "FilterHashtable" not in events and "EventLogReader" not in events:
        raise AgentCodeUnknown("events.query reads with neither Get-WinEvent -FilterHashtable nor EventLogReader")
    return AgentCode(
        unrolled_rule_lists=frozenset(unrolled),
        rule_read_errors_silenced=bool(_SILENT.search(records) or _SILENT.search(listing)),
        filters_joined_across_stores=bool(re.search(r"-All\s+-PolicyStore\s+ActiveStore", records)),
        start_type_from_service_controller=bool(re.search(r"\.StartType\b", service_get)),
        restart_with_cmdlet=bool(re.search(r"\bRestart-Service\b", restart)),
        events_from_hashtable="FilterHashtable" in events,
        rule_new_checks_local_store_only=not re.search(r"RSOP|\$FirewallRuleStores", new_rule),
    )


class _Cache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, int, int] | None = None
        self._code: AgentCode | None = None
        self.override: AgentCode | None = None

    def current(self) -> AgentCode:
        if self.override is not None:
            return self.override
        from rdplab.bootstrap import collection_root

        path = collection_root() / "plugins" / "plugin_utils" / "_agent.ps1"
        with self._lock:
            info = path.stat()
            key = (str(path), info.st_mtime_ns, info.st_size)
            if self._code is None or key != self._key:
                self._code = analyse(path.read_text(encoding="utf-8"))
                self._key = key
            return self._code


_CACHE = _Cache()


def current() -> AgentCode:
    """The facts of the agent the lab accepts (the collection's ``_agent.ps1``, re-read when it changes)."""
    return _CACHE.current()


class using:
    """Answer as Windows would answer another agent text (tests: the agent as it was before a fix)."""

    def __init__(self, code: AgentCode) -> None:
        self.code = code
        self._previous: AgentCode | None = None

    def __enter__(self) -> AgentCode:
        self._previous = _CACHE.override
        _CACHE.override = self.code
        return self.code

    def __exit__(self, *exc: object) -> None:
        _CACHE.override = self._previous
