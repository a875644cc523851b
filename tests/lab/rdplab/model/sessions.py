"""Remote Desktop sessions as WTSEnumerateSessions reports them."""

from __future__ import annotations

from dataclasses import dataclass, field

WTS_STATES = (
    "Active",
    "Connected",
    "ConnectQuery",
    "Shadow",
    "Disconnected",
    "Idle",
    "Listen",
    "Reset",
    "Down",
    "Init",
)
# The listener's own session id on Windows Server (qwinsta shows rdp-tcp in Listen state with this id).
LISTENER_SESSION_ID = 65536


@dataclass
class Session:
    id: int
    user: str
    state: str
    station: str

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "user": self.user, "state": self.state, "station": self.station}


def default_sessions() -> list[Session]:
    return [
        Session(0, "", "Disconnected", "Services"),
        Session(1, "", "Connected", "Console"),
        Session(LISTENER_SESSION_ID, "", "Listen", "RDP-Tcp"),
    ]


@dataclass
class Sessions:
    sessions: list[Session] = field(default_factory=default_sessions)

    def add(self, user: str, state: str) -> Session:
        """A user session as a client connection would create it (next free id, next RDP-Tcp#N station)."""
        next_id = max((s.id for s in self.sessions if s.id < LISTENER_SESSION_ID), default=1) + 1
        station = f"RDP-Tcp#{next_id}" if state in ("Active", "Connected", "Shadow") else ""
        session = Session(next_id, user, state, station)
        self.sessions.append(session)
        return session

    def disconnect_user_sessions(self) -> list[Session]:
        """What a TermService stop or restart does: it "temporarily disconnects all active RDP sessions" [RunCmd
        readmes]; no source says they are logged off. Every remote session with a user is left Disconnected (no
        station), a Disconnected one stays so, one without a user (a logon screen) goes; Services, Console and the
        listener stay. Returns the sessions that changed or went."""
        kept: list[Session] = []
        changed: list[Session] = []
        for session in self.sessions:
            if session.id == 0 or session.station == "Console" or session.state == "Listen":
                kept.append(session)
                continue
            if not session.user:
                changed.append(session)
                continue
            if session.state != "Disconnected" or session.station:
                session.state, session.station = "Disconnected", ""
                changed.append(session)
            kept.append(session)
        self.sessions = kept
        return changed

    def drop_user_sessions(self) -> list[Session]:
        """What a restart of the computer does: every remote session ends; Services, Console and the listener stay."""
        kept = [s for s in self.sessions if s.id == 0 or s.station == "Console" or s.state == "Listen"]
        dropped = [s for s in self.sessions if s not in kept]
        self.sessions = kept
        return dropped

    def snapshot(self) -> list[dict[str, object]]:
        return [session.to_json() for session in sorted(self.sessions, key=lambda s: s.id)]
