# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.transport: read the policy values, plan, back up, apply. Documented in
modules/transport.py."""

from __future__ import annotations

import typing as t

from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import (
    COMMON_ARGUMENT_SPEC,
    ActionFailed,
    BackupSet,
    RdpfixAction,
    backup_root,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._transport import (
    CLIENT_POLICY_KEY,
    CLIENT_SETTING_KEY,
    MODES,
    POLICY_KEY,
    SIDES,
    RegistryChange,
    TransportState,
    plan_transport,
    validate,
)


def add_registry_changes(batch: Batch, backup: BackupSet, changes: t.Sequence[RegistryChange]) -> list[int]:
    """Record every previous value in the manifest (written first), then the changes; returns their positions."""
    backup.begin(batch)
    for change in changes:
        backup.record("registry_value", path=change.path, name=change.name, previous=change.previous)
        backup.planned_actions.append(change.describe())
    backup.finish(batch)
    positions = []
    for change in changes:
        if change.removes:
            positions.append(batch.add("registry.remove", path=change.path, name=change.name))
        else:
            positions.append(
                batch.add(
                    "registry.set", path=change.path, name=change.name, type=change.value_type, value=change.value
                )
            )
    return positions


class ActionModule(RdpfixAction):
    MODULE_NAME = "transport"
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {
        **COMMON_ARGUMENT_SPEC,
        "mode": {"type": "str", "default": "tcp_only", "choices": list(MODES)},
        "sides": {"type": "list", "elements": "str", "default": ["server"], "choices": list(SIDES)},
    }

    def validate_params(self, params: dict[str, t.Any]) -> None:
        problems = validate(params["mode"], params["sides"])
        if problems:
            raise ActionFailed("; ".join(problems))

    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        read = Batch(on_error="continue")
        system_index = read.add("system.info")
        indexes = {
            key: read.add("registry.get", path=key) for key in (POLICY_KEY, CLIENT_POLICY_KEY, CLIENT_SETTING_KEY)
        }
        found = self.run_batch(read)
        values = {key: found.data(index).get("values", {}) for key, index in indexes.items()}
        system = found.data(system_index)
        state = TransportState(values[POLICY_KEY], values[CLIENT_POLICY_KEY], values[CLIENT_SETTING_KEY])
        plan = plan_transport(state, params["mode"], params["sides"])
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
        backup = BackupSet.create(
            self.MODULE_NAME,
            str(system.get("hostname") or self.host),
            backup_root(params, system.get("program_data")),
            self.now,
        )
        apply = Batch(on_error="stop")
        add_registry_changes(apply, backup, plan.changes)
        applied = self.run_batch(apply)
        result["backup"] = backup.summary()
        failures = [item for item in applied.results if not item.ok and not item.skipped]
        if failures:
            raise ActionFailed(
                f"{self.host}: {failures[0].op} failed: {failures[0].error_type}: {failures[0].error_message}. "
                f"Previous values are recorded in backup manifest {backup.manifest_id}",
                **result,
            )
        if plan.restart_required:
            self.warn("The server transport policy takes effect when TermService restarts (or at the next reboot)")
        return result
