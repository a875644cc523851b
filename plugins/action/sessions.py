# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.sessions: one read of the Remote Desktop sessions. Documented in modules/sessions.py."""

from __future__ import annotations

import typing as t

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _sessions as sessions
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import RdpfixAction
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch


class ActionModule(RdpfixAction):
    MODULE_NAME = "sessions"
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {}

    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        del params
        read = Batch(on_error="stop")
        position = sessions.add_reads(read)
        found = sessions.state_from(self.run_batch(read), position)
        users = sessions.user_sessions(found)
        return {
            "changed": False,
            "sessions": found,
            "user_sessions": users,
            "users": sessions.describe(users),
        }
