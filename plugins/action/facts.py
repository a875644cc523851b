# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.facts: one read batch, every planner, findings. Documented in modules/facts.py.

It never writes: there is no apply batch, and check mode runs exactly the same reads.
"""

from __future__ import annotations

import concurrent.futures
import socket
import typing as t

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_names import is_ip_address, system_resolver
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _facts as facts
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _machinekeys as mk
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import ActionFailed, RdpfixAction, iso_utc
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._findings import urgency
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._firewall import PROFILE_BITS
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._snapshot import Snapshot
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._tls import LEGACY_CHOICES, NLA_CHOICES
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._transport import SIDES

# A name lookup that hangs must not hold up the audit of a fleet.
RESOLVE_TIMEOUT_S = 5.0


def resolve(name: str, timeout: float = RESOLVE_TIMEOUT_S) -> tuple[list[str] | None, str | None]:
    """(addresses, None) or (None, why not) for ``name``, from the controller, within ``timeout`` seconds."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(system_resolver, name).result(timeout=timeout), None
    except concurrent.futures.TimeoutError:
        return None, f"no answer within {timeout:g} s"
    except (OSError, UnicodeError) as exc:
        return None, str(exc.strerror if isinstance(exc, socket.gaierror) else exc)
    finally:
        pool.shutdown(wait=False)


class ActionModule(RdpfixAction):
    MODULE_NAME = "facts"
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {
        "event_days": {"type": "int", "default": 7},
        "max_events": {"type": "int", "default": 100},
        "expiry_threshold_days": {"type": "int", "default": 30},
        "restart_service": {"type": "str", "default": "SessionEnv", "choices": ["SessionEnv", "TermService"]},
        "certificate_replacement_thumbprint": {"type": "str"},
        "certificate_replace_when": {"type": "str", "default": "unusable", "choices": ["unusable", "always"]},
        "certificate_repin_renewal": {"type": "bool", "default": False},
        "machinekeys_strategy": {"type": "str", "default": "permissions", "choices": list(mk.STRATEGIES)},
        "firewall_profiles": {
            "type": "list",
            "elements": "str",
            "default": ["Domain", "Private"],
            "choices": list(PROFILE_BITS),
        },
        "transport_mode": {"type": "str", "default": "tcp_only", "choices": list(facts.TRANSPORT_MODES)},
        "transport_sides": {"type": "list", "elements": "str", "default": ["server"], "choices": list(SIDES)},
        "tls_legacy_protocols": {"type": "list", "elements": "str", "default": [], "choices": list(LEGACY_CHOICES)},
        "tls_nla": {"type": "str", "default": "enabled", "choices": list(NLA_CHOICES)},
        "tls_override_policy": {"type": "bool", "default": False},
        "connect_name": {"type": "str"},
        "gather_events": {"type": "bool", "default": True},
    }

    options: facts.FactsOptions

    def validate_params(self, params: dict[str, t.Any]) -> None:
        self.options = facts.FactsOptions(
            event_days=params["event_days"],
            max_events=params["max_events"],
            expiry_threshold_days=params["expiry_threshold_days"],
            restart_service=params["restart_service"],
            certificate_replacement_thumbprint=params["certificate_replacement_thumbprint"] or None,
            certificate_replace_when=params["certificate_replace_when"],
            certificate_repin_renewal=params["certificate_repin_renewal"],
            machinekeys_strategy=params["machinekeys_strategy"],
            firewall_profiles=tuple(dict.fromkeys(params["firewall_profiles"])),
            transport_mode=params["transport_mode"],
            transport_sides=tuple(dict.fromkeys(params["transport_sides"])),
            tls_legacy_protocols=tuple(dict.fromkeys(params["tls_legacy_protocols"])),
            tls_nla=params["tls_nla"],
            tls_override_policy=params["tls_override_policy"],
            connect_name=params["connect_name"],
        )
        try:
            self.options.validate()
        except facts.FactsOptionError as exc:
            raise ActionFailed(str(exc)) from exc

    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        # Without the event log history: the read a fixing run needs (the role's snapshot), and no more.
        concerns = facts.CONCERNS if params["gather_events"] else tuple(c for c in facts.CONCERNS if c.name != "events")
        read = facts.build_read_batch(self.options, self.now, concerns)
        result = self.run_batch(read.merged.batch)
        gathered = facts.evaluate(read, result, self.options, self.now, concerns)
        # Every fixing module's reads (the event log history is the audit's alone): what they plan from when given
        # this result as their snapshot.
        kept = sorted({p for name, mapped in read.merged.positions.items() if name != "events" for p in mapped})
        snapshot = Snapshot.from_batch(self.host, iso_utc(self.now), read.merged.batch, result, kept)
        address = self._address()
        if self.options.connect_name:
            gathered.findings += self._name_findings(self.options.connect_name, address, gathered.facts)
            gathered.findings.sort(key=urgency)
        overview = facts.summary(gathered.findings)
        for item in gathered.findings:
            if item.get("severity") == "critical":
                self.warn(f"{item['title']} ({item['id']})")
        return {
            "changed": False,
            "gathered_at": iso_utc(self.now),
            "address": address,
            "status": overview["status"],
            "counts": overview["by_severity"],
            "fixed_by": overview["fixed_by"],
            "findings": gathered.findings,
            "rdp": gathered.facts,
            "snapshot": snapshot.to_dict(),
            "ansible_facts": {"rdpfix_rdp": dict(gathered.facts, findings=gathered.findings)},
        }

    def _address(self) -> str:
        """Where Ansible reaches the host: ``ansible_host``, else the inventory name."""
        remote = getattr(self._play_context, "remote_addr", None)
        return str(remote or self.host)

    def _name_findings(self, name: str, address: str, gathered: dict[str, t.Any]) -> list[dict[str, t.Any]]:
        resolved, error = (None, None) if is_ip_address(name) else resolve(name)
        system = gathered.get("system") or {}
        return facts.name_findings(
            name,
            address,
            resolved=resolved,
            resolve_error=error,
            hostname=system.get("hostname"),
            fqdn=system.get("fqdn"),
            cert=gathered.get("certificate"),
        )
