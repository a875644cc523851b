"""The event log entries the model writes (RCM and Schannel), for diagnosis work and tests.

Entries are stored as Windows stores them: a numeric level, the event data as the provider defines it - named
``<Data Name=...>`` values for manifest providers (Schannel, Security auditing), unnamed ``<Data>`` values for classic
(message-table) events, which the agent reads as ``param0``, ``param1``... in document order - and the English
message. The level's display name and the message are rendered in the host's UI language when read
(``render``), as ``EventLogRecord.LevelDisplayName`` and ``FormatDescription()`` are (docs/lab.md, "Event log").
"""

from __future__ import annotations

import string
import typing as t
from dataclasses import dataclass, field
from datetime import datetime

from rdplab.model.timeutil import iso

RCM = "Microsoft-Windows-TerminalServices-RemoteConnectionManager"
SCHANNEL = "Schannel"
USER32 = "User32"
EVENTLOG = "EventLog"
LEVELS = ("Critical", "Error", "Warning", "Information", "Verbose")
# The System/Level values of the event schema: 1 Critical, 2 Error, 3 Warning, 4 Information, 5 Verbose.
LEVEL_VALUES = {name: index + 1 for index, name in enumerate(LEVELS)}

# (provider, log) pairs whose events are classic message-table events: RCM's entries in the System log carry their
# insertion strings as unnamed <Data> elements ([RCMdump]: the IDs carry the classic severity bits, 0xC000041D for
# 1053, and the texts use %1, %2).
CLASSIC = frozenset({(RCM.casefold(), "system")})

# Per-record failures a host file can inject (``fault``): "read" - the record cannot be read (EventLogReader.ReadEvent
# throws); "message" - its description cannot be rendered (FormatDescription throws).
RECORD_FAULTS = ("read", "message")

LOCALES = ("en-US", "de-DE")
DEFAULT_LOCALE = "en-US"

# LevelDisplayName per UI language. de-DE: "Fehler", "Warnung", "Informationen" as German Event Viewer and scripts
# written for German hosts show them (docs/lab.md, "Event log"); "Kritisch" and "Ausführlich" UNCONFIRMED.
LEVEL_NAMES: dict[str, dict[int, str]] = {
    "en-US": {1: "Critical", 2: "Error", 3: "Warning", 4: "Information", 5: "Verbose"},
    "de-DE": {1: "Kritisch", 2: "Fehler", 3: "Warnung", 4: "Informationen", 5: "Ausführlich"},
}

# German renderings of the events the lab itself writes, with the event's data inserted ({param0}, {AlertDesc}...).
# The lab's own wording, UNCONFIRMED: no cited source gives Windows' German texts. What matters for the tests is that
# they are not the English ones. Events a host file writes keep the message the file gives.
MESSAGES_DE: dict[tuple[str, int], str] = {
    (RCM, 1051): "Der RD-Sitzungshostserver ist für die Verwendung von SSL mit einem vom Benutzer ausgewählten "
    "Zertifikat konfiguriert, es wurde jedoch kein verwendbares Zertifikat gefunden. Ab sofort wird das "
    "Standardzertifikat verwendet.",
    (RCM, 1052): "Der RD-Sitzungshostserver ist für die Verwendung eines Zertifikats konfiguriert, das in {param1} "
    "Tagen abläuft. {param0}",
    (RCM, 1053): "Der RD-Sitzungshostserver ist für die Verwendung eines abgelaufenen Zertifikats konfiguriert. "
    "{param0} Ab sofort wird das Standardzertifikat verwendet.",
    (RCM, 1054): "Das für den RD-Sitzungshostserver konfigurierte Zertifikat enthält nicht die erweiterte "
    "Schlüsselverwendung Serverauthentifizierung. {param0} Ab sofort wird das Standardzertifikat verwendet.",
    (RCM, 1055): "Der RD-Sitzungshostserver kann nicht auf den privaten Schlüssel des konfigurierten Zertifikats "
    "zugreifen. {param0} Ab sofort wird das Standardzertifikat verwendet.",
    (RCM, 1056): "Ein neues selbstsigniertes Zertifikat für die Authentifizierung des RD-Sitzungshostservers bei "
    "SSL-Verbindungen wurde generiert. Der Name dieses Zertifikats lautet {param0}.",
    (RCM, 1057): "Der RD-Sitzungshostserver konnte kein neues selbstsigniertes Zertifikat für die Authentifizierung "
    "bei SSL-Verbindungen erstellen. Relevanter Statuscode: {param0}.",
    (RCM, 1058): "Der RD-Sitzungshostserver konnte das abgelaufene selbstsignierte Zertifikat für die "
    "Authentifizierung bei SSL-Verbindungen nicht ersetzen. Relevanter Statuscode: {param0}.",
    (
        SCHANNEL,
        36870,
    ): "Schwerwiegender Fehler beim Zugriff auf den privaten Schlüssel der TLS-Serveranmeldeinformationen. "
    "Vom Kryptografiemodul zurückgegebener Fehlercode: {ErrorCode}. Interner Fehlerstatus: {ErrorStatus}.",
    (SCHANNEL, 36871): "Schwerwiegender Fehler beim Erstellen von TLS-Serveranmeldeinformationen. Interner "
    "Fehlerstatus: {ErrorState}.",
    (SCHANNEL, 36874): "Von einer Remoteclientanwendung wurde eine {Protocol}-Verbindungsanforderung empfangen, aber "
    "keine der von der Clientanwendung unterstützten Verschlüsselungssammlungen wird vom Server unterstützt.",
    (SCHANNEL, 36887): "Vom Remoteendpunkt wurde eine schwerwiegende Warnung empfangen. Der im TLS-Protokoll "
    "definierte Warnungscode lautet {AlertDesc}.",
    (SCHANNEL, 36888): "Eine schwerwiegende Warnung wurde generiert und an den Remoteendpunkt gesendet. Der im "
    "TLS-Protokoll definierte Fehlercode lautet {AlertDesc}. Interner Fehlerstatus: {ErrorState}.",
    (EVENTLOG, 6005): "Der Ereignisprotokolldienst wurde gestartet.",
    (EVENTLOG, 6006): "Der Ereignisprotokolldienst wurde beendet.",
}
MESSAGES: dict[str, dict[tuple[str, int], str]] = {"de-DE": MESSAGES_DE}


class _Blank(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


@dataclass(frozen=True)
class Event:
    log: str
    provider: str
    id: int
    level: str
    time: datetime
    message: str
    data: dict[str, str] = field(default_factory=dict)
    fault: str | None = None
    # True for the lab's own entries, whose text the lab renders per UI language; a host file's message is kept.
    generated: bool = True

    @property
    def level_value(self) -> int:
        return LEVEL_VALUES.get(self.level, 4)

    def render(self, locale: str) -> tuple[str, str]:
        """LevelDisplayName and the message as a reader in ``locale`` gets them."""
        names = LEVEL_NAMES.get(locale, LEVEL_NAMES[DEFAULT_LOCALE])
        level_name = names.get(self.level_value, str(self.level_value))
        template = MESSAGES.get(locale, {}).get((self.provider, self.id)) if self.generated else None
        if template is None:
            return level_name, self.message
        return level_name, string.Formatter().vformat(template, (), _Blank(self.data))

    def to_json(self) -> dict[str, object]:
        shown: dict[str, object] = {
            "log": self.log,
            "provider": self.provider,
            "id": self.id,
            "level": self.level,
            "time": iso(self.time),
            "message": self.message,
            "data": dict(sorted(self.data.items())),
        }
        if self.fault is not None:
            shown["fault"] = self.fault
        return shown


def classic(provider: str, log: str) -> bool:
    return (provider.casefold(), log.casefold()) in CLASSIC


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
        data: t.Mapping[str, str] | None = None,
        log: str = "System",
        fault: str | None = None,
        generated: bool = True,
    ) -> Event:
        values = dict(data or {})
        if classic(provider, log) and generated:
            # A classic event has insertion strings, not names: the values in the order given become param0, ...
            values = {f"param{index}": str(value) for index, value in enumerate(values.values())}
        if fault is not None and fault not in RECORD_FAULTS:
            raise ValueError(f"an event fault is one of {', '.join(RECORD_FAULTS)}, not {fault!r}")
        event = Event(log, provider, event_id, level, time, message, values, fault, generated)
        self.events.append(event)
        return event

    def ids(self, provider: str | None = None) -> list[int]:
        return [event.id for event in self.events if provider is None or event.provider == provider]

    def snapshot(self) -> list[dict[str, object]]:
        return [event.to_json() for event in self.events]
