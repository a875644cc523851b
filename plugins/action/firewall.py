# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.firewall: list the rules, plan, back up, apply. Documented in modules/firewall.py."""

from __future__ import annotations

import functools
import typing as t

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _firewall as firewall
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import (
    COMMON_ARGUMENT_SPEC,
    SNAPSHOT_ARGUMENT_SPEC,
    ActionFailed,
    RdpfixAction,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch


class ActionModule(RdpfixAction):
    MODULE_NAME = "firewall"
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {
        **COMMON_ARGUMENT_SPEC,
        **SNAPSHOT_ARGUMENT_SPEC,
        "sides": {"type": "list", "elements": "str", "default": ["server"], "choices": ["server", "client"]},
        "profiles": {
            "type": "list",
            "elements": "str",
            "default": ["Domain", "Private"],
            "choices": list(firewall.PROFILE_BITS),
        },
        "remote_addresses": {"type": "list", "elements": "str"},
        "allow_public_any": {"type": "bool", "default": False},
        "disable_blocking_rules": {"type": "bool", "default": False},
        "udp": {"type": "bool", "default": True},
        "client_programs": {"type": "list", "elements": "str", "default": []},
    }

    options: firewall.FirewallOptions

    def validate_params(self, params: dict[str, t.Any]) -> None:
        addresses = params.get("remote_addresses")
        self.options = firewall.FirewallOptions(
            sides=tuple(params["sides"]),
            profiles=tuple(params["profiles"]),
            remote_addresses=None if addresses is None else tuple(addresses),
            allow_public_any=params["allow_public_any"],
            disable_blocking_rules=params["disable_blocking_rules"],
            udp=params["udp"],
            client_programs=tuple(params["client_programs"]),
        )
        try:
            firewall.validate(self.options)
        except firewall.FirewallOptionError as exc:
            raise ActionFailed(str(exc)) from exc

    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        read = Batch(on_error="continue")
        system_index = read.add("system.info")
        reads = firewall.add_reads(read, self.options)
        found = self.read(read)
        try:
            plan = firewall.plan_state(firewall.state_from(found, reads), self.options)
        except firewall.FirewallPlanError as exc:
            raise ActionFailed(f"{self.host}: {exc}; nothing was changed") from exc
        for warning in plan.warnings:
            self.warn(warning)
        result: dict[str, t.Any] = {
            "changed": bool(plan.changes),
            "findings": plan.findings,
            "firewall": plan.report,
            "changes": [{"operation": c.kind, "rule": c.name, "reason": c.reason} for c in plan.changes],
            "backup": None,
            "diff": {"before": plan.before, "after": plan.after},
        }
        if not plan.changes or self.check_mode:
            return result
        stage = functools.partial(firewall.stage_rule_changes, changes=plan.changes)
        self.apply_with_backup(params, found.data(system_index), result, stage, "Previous rules")
        return result
