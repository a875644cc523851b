# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.tls: read Schannel, listener and policy state, plan, back up, apply.
Documented in modules/tls.py."""

from __future__ import annotations

import base64
import typing as t

from ansible_collections.rdpfix.rdp.plugins.action.transport import add_registry_changes
from ansible_collections.rdpfix.rdp.plugins.module_utils._x509 import CertificateParseError, summarize_certificate
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import (
    COMMON_ARGUMENT_SPEC,
    ActionFailed,
    BackupSet,
    RdpfixAction,
    backup_root,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch, BatchResult
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._tls import (
    CIPHER_POLICY_KEY,
    FIPS_KEY,
    LEGACY_CHOICES,
    LISTENER_KEY,
    NLA_CHOICES,
    PROTOCOLS,
    TlsOptions,
    TlsState,
    plan_tls,
    protocol_key,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._transport import POLICY_KEY

CERT_STORES = ("My", "Remote Desktop")


def listener_key_type(found: BatchResult, listener_index: int, store_indexes: t.Sequence[int]) -> str | None:
    """The key type of the certificate the listener presents (the pinned one, else the self-signed one)."""
    listener = found[listener_index].data if found[listener_index].ok else {}
    wanted = (listener.get("ssl_certificate_sha1_hash") or "").upper()
    candidates: list[dict[str, t.Any]] = []
    for index in store_indexes:
        if found[index].ok:
            candidates.extend(found[index].data.get("certificates") or [])
    chosen = next((c for c in candidates if str(c.get("thumbprint", "")).upper() == wanted), None) if wanted else None
    if chosen is None:
        chosen = next((c for c in candidates if c.get("has_private_key")), None)
    if chosen is None:
        return None
    try:
        return t.cast(str | None, summarize_certificate(base64.b64decode(chosen["der_b64"])).get("key_type"))
    except (CertificateParseError, KeyError, ValueError):
        return None


class ActionModule(RdpfixAction):
    MODULE_NAME = "tls"
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {
        **COMMON_ARGUMENT_SPEC,
        "enable_tls12": {"type": "bool", "default": True},
        "enable_tls13": {"type": "bool", "default": True},
        "legacy_protocols": {"type": "list", "elements": "str", "default": [], "choices": list(LEGACY_CHOICES)},
        "restore_security_layer": {"type": "bool", "default": True},
        "nla": {"type": "str", "default": "enabled", "choices": list(NLA_CHOICES)},
        "restore_cipher_suites": {"type": "bool", "default": True},
    }

    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        options = TlsOptions(
            enable_tls12=params["enable_tls12"],
            enable_tls13=params["enable_tls13"],
            legacy_protocols=tuple(params["legacy_protocols"]),
            restore_security_layer=params["restore_security_layer"],
            nla=params["nla"],
            restore_cipher_suites=params["restore_cipher_suites"],
        )
        read = Batch(on_error="continue")
        system_index = read.add("system.info")
        protocol_indexes = {p: read.add("registry.get", path=protocol_key(p)) for p in PROTOCOLS}
        key_indexes = {
            key: read.add("registry.get", path=key) for key in (CIPHER_POLICY_KEY, FIPS_KEY, LISTENER_KEY, POLICY_KEY)
        }
        suites_index = read.add("tls.cipher_suites.list")
        listener_index = read.add("listener.get")
        store_indexes = [read.add("cert.list", store=store) for store in CERT_STORES]
        found = self.run_batch(read)
        system = found.data(system_index)
        suites = found.data(suites_index)
        values = {key: found.data(index).get("values", {}) for key, index in key_indexes.items()}
        state = TlsState(
            os_build=int(system.get("os_build") or 0),
            protocols={p: found.data(index).get("values", {}) for p, index in protocol_indexes.items()},
            cipher_suites=[s["name"] for s in suites.get("suites", [])] if suites.get("available") else None,
            cipher_policy=values[CIPHER_POLICY_KEY],
            key_type=listener_key_type(found, listener_index, store_indexes),
            fips=values[FIPS_KEY],
            listener=values[LISTENER_KEY],
            policy=values[POLICY_KEY],
        )
        plan = plan_tls(state, options)
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
        if plan.reboot_required:
            self.warn("Schannel reads protocol and cipher-suite settings at boot: reboot for them to take effect")
        return result
