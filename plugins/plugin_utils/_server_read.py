# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The snapshot rdpfix.rdp.server takes itself when it is given none: the read of rdpfix.rdp.facts (every planner's
reads, without the event log history) in one batch, judged with the options the concerns run with.

The concerns' options are checked against their modules' argument specs first, so bad input is refused before the
host is contacted, and the read uses the same values (defaults included) the modules then plan with. The result is
the snapshot rdpfix.rdp.facts would have returned with the same options (its ``snapshot``), so a task that reads and
repairs at once plans exactly as the two tasks did, in as many round trips.
"""

from __future__ import annotations

import typing as t
from datetime import datetime

from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _facts as facts
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import iso_utc
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch, BatchResult
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._snapshot import Snapshot


class ConcernOptionsError(ValueError):
    """A concern's options do not pass its module's argument spec."""


def validated(name: str, action: t.Any, args: dict[str, t.Any]) -> dict[str, t.Any]:
    """A concern's options with its module's defaults, or ConcernOptionsError naming what is wrong."""
    validator = ArgumentSpecValidator(
        action.ARGUMENT_SPEC,
        mutually_exclusive=action.MUTUALLY_EXCLUSIVE or None,
        required_together=action.REQUIRED_TOGETHER or None,
        required_if=action.REQUIRED_IF or None,
        required_by=action.REQUIRED_BY or None,
    )
    outcome = validator.validate(dict(args))
    if outcome.error_messages:
        raise ConcernOptionsError(f"{name}: " + "; ".join(str(message) for message in outcome.error_messages))
    return dict(outcome.validated_parameters)


def facts_options(concerns: dict[str, dict[str, t.Any]]) -> facts.FactsOptions:
    """The rdpfix.rdp.facts options that read (and judge) what these concerns plan from."""
    defaults = facts.FactsOptions()
    keys = concerns.get("machinekeys") or {}
    cert = concerns.get("certificate") or {}
    wall = concerns.get("firewall") or {}
    transport = concerns.get("transport")
    tls = concerns.get("tls") or {}
    options = facts.FactsOptions(
        expiry_threshold_days=cert.get("expiry_threshold_days", defaults.expiry_threshold_days),
        restart_service=cert.get("restart_service") or keys.get("restart_service") or defaults.restart_service,
        certificate_replacement_thumbprint=cert.get("replacement_thumbprint") or None,
        certificate_replace_when=cert.get("replace_when") or defaults.certificate_replace_when,
        certificate_repin_renewal=bool(cert.get("repin_renewal", defaults.certificate_repin_renewal)),
        machinekeys_strategy=keys.get("strategy") or defaults.machinekeys_strategy,
        firewall_profiles=tuple(dict.fromkeys(wall.get("profiles") or defaults.firewall_profiles)),
        # Without the transport concern, the transport policy is left alone (reported, not judged).
        transport_mode=facts.KEEP if transport is None else str(transport["mode"]),
        transport_sides=tuple(dict.fromkeys((transport or {}).get("sides") or defaults.transport_sides)),
        tls_legacy_protocols=tuple(dict.fromkeys(tls.get("legacy_protocols") or ())),
        tls_nla=tls.get("nla") or defaults.tls_nla,
        tls_override_policy=bool(tls.get("override_policy", defaults.tls_override_policy)),
    )
    try:
        options.validate()
    except facts.FactsOptionError as exc:
        raise ConcernOptionsError(str(exc)) from exc
    return options


def read_batch(options: facts.FactsOptions, now: datetime) -> tuple[Batch, list[int]]:
    """The facts read without the event log history, and the positions the snapshot keeps (all of them)."""
    concerns = tuple(concern for concern in facts.CONCERNS if concern.name != "events")
    read = facts.build_read_batch(options, now, concerns)
    kept = sorted({position for mapped in read.merged.positions.values() for position in mapped})
    return read.merged.batch, kept


def take(host: str, now: datetime, options: facts.FactsOptions, send: t.Callable[[Batch], BatchResult]) -> Snapshot:
    """Read the host once (one round trip through ``send``) and return the snapshot."""
    batch, kept = read_batch(options, now)
    result = send(batch)
    return Snapshot.from_batch(host, iso_utc(now), batch, result, kept)
