# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.firewall: list the rules, plan, back up, apply. Documented in modules/firewall.py."""

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
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._firewall import (
    DEFAULT_PORT,
    FirewallOptionError,
    FirewallOptions,
    FirewallPlanError,
    plan_firewall,
    validate,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._tls import LISTENER_KEY


class ActionModule(RdpfixAction):
    MODULE_NAME = "firewall"
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {
        **COMMON_ARGUMENT_SPEC,
        "sides": {"type": "list", "elements": "str", "default": ["server"], "choices": ["server", "client"]},
        "profiles": {
            "type": "list",
            "elements": "str",
            "default": ["Domain", "Private"],
            "choices": ["Domain", "Private", "Public"],
        },
        "remote_addresses": {"type": "list", "elements": "str"},
        "allow_public_any": {"type": "bool", "default": False},
        "disable_blocking_rules": {"type": "bool", "default": False},
        "udp": {"type": "bool", "default": True},
        "client_programs": {"type": "list", "elements": "str", "default": []},
    }

    options: FirewallOptions

    def validate_params(self, params: dict[str, t.Any]) -> None:
        addresses = params.get("remote_addresses")
        self.options = FirewallOptions(
            sides=tuple(params["sides"]),
            profiles=tuple(params["profiles"]),
            remote_addresses=None if addresses is None else tuple(addresses),
            allow_public_any=params["allow_public_any"],
            disable_blocking_rules=params["disable_blocking_rules"],
            udp=params["udp"],
            client_programs=tuple(params["client_programs"]),
        )
        try:
            validate(self.options)
        except FirewallOptionError as exc:
            raise ActionFailed(str(exc)) from exc

    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        read = Batch(on_error="continue")
        system_index = read.add("system.info")
        rules_index = read.add("firewall.rules.list")
        port_index = read.add("registry.get", path=LISTENER_KEY, names=["PortNumber"])
        products_index = read.add("security_products.list") if "client" in self.options.sides else None
        found = self.run_batch(read)
        system = found.data(system_index)
        listing = found.data(rules_index)
        port_value = found.data(port_index).get("values", {}).get("PortNumber") or {}
        port = int(port_value.get("value") or DEFAULT_PORT)
        products = found.data(products_index) if products_index is not None else None
        try:
            plan = plan_firewall(listing.get("rules") or [], port, self.options, products)
        except FirewallPlanError as exc:
            raise ActionFailed(f"{self.host}: {exc}; nothing was changed") from exc
        for warning in plan.warnings:
            self.warn(warning)
        plan.report["profiles"] = listing.get("profiles")
        plan.report["network_categories"] = listing.get("network_categories")
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
        backup = BackupSet.create(
            self.MODULE_NAME,
            str(system.get("hostname") or self.host),
            backup_root(params, system.get("program_data")),
            self.now,
        )
        apply = Batch(on_error="stop")
        backup.begin(apply)
        for change in plan.changes:
            # The whole previous rule record: enough to put the rule back exactly as it was.
            backup.record("firewall_rule", name=change.name, operation=change.kind, previous=change.previous)
            backup.planned_actions.append(change.reason)
        backup.finish(apply)
        for change in plan.changes:
            apply.add(change.kind, **change.args)
        applied = self.run_batch(apply)
        result["backup"] = backup.summary()
        failures = [item for item in applied.results if not item.ok and not item.skipped]
        if failures:
            raise ActionFailed(
                f"{self.host}: {failures[0].op} failed: {failures[0].error_type}: {failures[0].error_message}. "
                f"Previous rules are recorded in backup manifest {backup.manifest_id}",
                **result,
            )
        return result
