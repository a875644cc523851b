# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.tls: read Schannel, listener and policy state, plan, back up, apply.
Documented in modules/tls.py."""

from __future__ import annotations

import functools
import typing as t

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _tls as tls
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import (
    COMMON_ARGUMENT_SPEC,
    SNAPSHOT_ARGUMENT_SPEC,
    RdpfixAction,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._transport import stage_registry_changes

# Dropped from the result by rdpfix.rdp.server once it rebooted the host (_reboot_gate.record).
REBOOT_WARNING = "Schannel reads protocol and cipher-suite settings at boot: reboot for them to take effect"


class ActionModule(RdpfixAction):
    MODULE_NAME = "tls"
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {
        **COMMON_ARGUMENT_SPEC,
        **SNAPSHOT_ARGUMENT_SPEC,
        "enable_tls12": {"type": "bool", "default": True},
        "enable_tls13": {"type": "bool", "default": True},
        "legacy_protocols": {"type": "list", "elements": "str", "default": [], "choices": list(tls.LEGACY_CHOICES)},
        "restore_security_layer": {"type": "bool", "default": True},
        "nla": {"type": "str", "default": "enabled", "choices": list(tls.NLA_CHOICES)},
        "restore_cipher_suites": {"type": "bool", "default": True},
        "override_policy": {"type": "bool", "default": False},
    }

    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        options = tls.TlsOptions(
            enable_tls12=params["enable_tls12"],
            enable_tls13=params["enable_tls13"],
            legacy_protocols=tuple(params["legacy_protocols"]),
            restore_security_layer=params["restore_security_layer"],
            nla=params["nla"],
            restore_cipher_suites=params["restore_cipher_suites"],
            override_policy=params["override_policy"],
        )
        read = Batch(on_error="continue")
        reads = tls.add_reads(read)
        found = self.read(read)
        plan = tls.plan_tls(tls.state_from(found, reads), options)
        for warning in plan.warnings:
            self.warn(warning)
        result: dict[str, t.Any] = {
            "changed": bool(plan.changes),
            "findings": plan.findings,
            "tls": plan.report,
            "reboot_required": plan.reboot_required,
            "changes": [change.describe() for change in plan.changes],
            "backup": None,
            "diff": {"before": plan.before, "after": plan.after},
        }
        if not plan.changes or self.check_mode:
            return result
        stage = functools.partial(stage_registry_changes, changes=plan.changes)
        self.apply_with_backup(params, found.data(reads.system), result, stage, "Previous values")
        if plan.reboot_required:
            self.warn(REBOOT_WARNING)
        return result
