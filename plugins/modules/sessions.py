# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# The code is the action plugin plugins/action/sessions.py; this file holds its documentation.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: sessions
short_description: List the Remote Desktop sessions a reboot would end
version_added: 0.1.0
description:
  - Reads the host's Remote Desktop sessions (C(WTSEnumerateSessions), what C(qwinsta) shows) in one WinRM command and
    returns the ones a restart of the computer would end, or a restart of TermService would disconnect, as
    RV(user_sessions) - every session with a user in it, Active or Disconnected, the console's included, never session
    0 or the listener.
  - The C(rdpfix.rdp.rdpfix_server) role runs it right before a reboot, so that the reboot waits for
    C(rdpfix_server_allow_session_disruption) while users are on the host (sessions are read at the time of the
    reboot, not taken from an earlier read). A logon in the seconds between this read and the reboot is not seen.
  - Read-only; runs in check mode.
extends_documentation_fragment:
  - rdpfix.rdp.attributes
  - rdpfix.rdp.attributes.windows
attributes:
  check_mode:
    support: full
    description: The module never changes anything; check mode runs the same read.
  diff_mode:
    support: none
  platform:
    platforms: windows
options: {}
author: rdpfix maintainers (@rdpfix)
"""

EXAMPLES = r"""
- name: Read the sessions right before rebooting
  rdpfix.rdp.sessions:
  register: sessions

- name: Reboot only when nobody is on the host
  ansible.windows.win_reboot:
  when: not sessions.user_sessions
"""

RETURN = r"""
sessions:
  description: Every session (id, user, state, station), as C(session.list) returns them.
  returned: success
  type: list
  elements: dict
user_sessions:
  description: The sessions a reboot or a TermService restart ends.
  returned: success
  type: list
  elements: dict
users:
  description: The user sessions in words, for example C(CORP\alice (Active, session 2)); empty when there are none.
  returned: success
  type: str
round_trips:
  description: WinRM commands the task sent (always 1).
  returned: always
  type: int
"""
