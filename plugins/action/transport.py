# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.transport: read the policy values, plan, back up, apply. Documented in
modules/transport.py."""

from __future__ import annotations

import functools
import typing as t

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _transport as transport
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import (
    COMMON_ARGUMENT_SPEC,
    SNAPSHOT_ARGUMENT_SPEC,
    ActionFailed,
    RdpfixAction,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch


class ActionModule(RdpfixAction):
    MODULE_NAME = "transport"
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {
        **COMMON_ARGUMENT_SPEC,
        **SNAPSHOT_ARGUMENT_SPEC,
        "mode": {"type": "str", "default": "tcp_only", "choices": list(transport.MODES)},
        "sides": {"type": "list", "elements": "str", "default": ["server"], "choices": list(transport.SIDES)},
    }

    def validate_params(self, params: dict[str, t.Any]) -> None:
        problems = transport.validate(params["mode"], params["sides"])
        if problems:
            raise ActionFailed("; ".join(problems))

    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        read = Batch(on_error="continue")
        system_index = read.add("system.info")
        reads = transport.add_reads(read)
        found = self.read(read)
        plan = transport.plan_transport(transport.state_from(found, reads), params["mode"], params["sides"])
        result: dict[str, t.Any] = {
            "changed": bool(plan.changes),
            "findings": plan.findings,
            "restart_required": plan.restart_required,
            "new_client_session_required": plan.new_client_session_required,
            "changes": [change.describe() for change in plan.changes],
            "backup": None,
            "diff": {"before": plan.before, "after": plan.after},
        }
        if not plan.changes or self.check_mode:
            return result
        stage = functools.partial(transport.stage_registry_changes, changes=plan.changes)
        self.apply_with_backup(params, found.data(system_index), result, stage, "Previous values")
        if plan.restart_required:
            self.warn("The server transport policy takes effect when TermService restarts (or at the next reboot)")
        return result
