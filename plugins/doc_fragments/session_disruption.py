# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The option of the rdpfix.rdp modules that have a step able to end RDP sessions (a service restart)."""

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  allow_session_disruption:
    description:
      - Allow a step that disturbs active or disconnected RDP sessions, such as a restart of C(TermService), which
        disconnects them.
      - When V(false) and such a step is needed, nothing that depends on it is changed; the module returns
        C(restart_pending=true), C(changed=false) for that part, and a warning naming the sessions.
    type: bool
    default: false
"""
