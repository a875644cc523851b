# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which Remote Desktop sessions a step would end: the gate before a reboot (and before a TermService restart).

Pure: ``add_reads`` puts ``session.list`` into a batch, ``state_from`` parses it, ``user_sessions`` picks the sessions
a restart of the computer (or of TermService) ends: every session with a user in it, Active or Disconnected, the
console's included; never session 0 (Services) or the listener. The same rule as the certificate module's gate.
"""

from __future__ import annotations

import typing as t

from ._agent import Batch, BatchResult
from ._certificate import DISRUPTED_SESSION_STATES, USER_SESSION_STATES


def add_reads(batch: Batch) -> int:
    return batch.add("session.list")


def state_from(result: BatchResult, position: int) -> list[dict[str, t.Any]]:
    """Every session ``session.list`` returned; a failed read raises OperationError (a gate never guesses)."""
    return [item for item in result.data(position).get("sessions") or [] if isinstance(item, dict)]


def user_sessions(sessions: t.Sequence[dict[str, t.Any]]) -> list[dict[str, t.Any]]:
    """The sessions a reboot ends: Active or Disconnected ones, and connected ones with a user logged on."""
    return [
        session
        for session in sessions
        if session.get("id") not in (0, "0")
        and (
            session.get("state") in DISRUPTED_SESSION_STATES
            or (session.get("state") in USER_SESSION_STATES and session.get("user"))
        )
    ]


def describe(sessions: t.Sequence[dict[str, t.Any]]) -> str:
    """``CORP\\alice (Active, session 2), CORP\\bob (Disconnected, session 3)``; empty when there are none."""
    return ", ".join(
        f"{session.get('user') or '(no user)'} ({session.get('state')}, session {session.get('id')})"
        for session in sessions
    )
