"""The event log entries the model writes (RCM and Schannel), for diagnosis work and tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from rdplab.model.timeutil import iso

RCM = "Microsoft-Windows-TerminalServices-RemoteConnectionManager"
SCHANNEL = "Schannel"
LEVELS = ("Critical", "Error", "Warning", "Information", "Verbose")


@dataclass(frozen=True)
class Event:
    log: str
    provider: str
    id: int
    level: str
    time: datetime
    message: str
    data: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "log": self.log,
            "provider": self.provider,
            "id": self.id,
            "level": self.level,
            "time": iso(self.time),
            "message": self.message,
            "data": dict(sorted(self.data.items())),
        }


@dataclass
class EventLog:
    events: list[Event] = field(default_factory=list)

    def write(
        self,
        provider: str,
        event_id: int,
        *,
        level: str,
        time: datetime,
        message: str,
        data: dict[str, str] | None = None,
        log: str = "System",
    ) -> Event:
        event = Event(log, provider, event_id, level, time, message, dict(data or {}))
        self.events.append(event)
        return event

    def ids(self, provider: str | None = None) -> list[int]:
        return [event.id for event in self.events if provider is None or event.provider == provider]

    def snapshot(self) -> list[dict[str, object]]:
        return [event.to_json() for event in self.events]
