# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Planner side of rdpfix.rdp.facts: one read batch for every concern, and the findings of all of them.

The audit must never disagree with the fixes, so nothing here judges a host by itself where a fixing module already
does: each concern's planner adds its own reads to its share of one merged batch (the same ``add_reads`` /
``build_read_batch`` its action plugin uses), parses them with its own ``state_from`` / ``parse_state``, and plans
with the options the fix would use; its findings are reported as they are. What only the audit looks at - the event
log, the services and switches that decide whether RDP listens at all, the name clients use - is judged here and in
``_events``; none of it has a fix, because no module changes it.

A concern is a pair of functions: ``reads(options)`` returns the concern's read batch and the positions it needs, and
``evaluate(result, positions, options, now)`` turns that batch's results into facts and findings. The merged batch
sends each distinct operation once; each concern then sees its results at the positions its own batch had.
"""

from __future__ import annotations

import json
import typing as t
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_names import (
    certificate_matches,
    is_ip_address,
    same_host_name,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _certificate as certificate
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _events as events_mod
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _firewall as firewall
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _machinekeys as mk
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _tls as tls
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _transport as transport
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch, BatchResult
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._findings import SEVERITY_ORDER, finding, urgency

TERMINAL_SERVER_KEY = r"HKLM:\SYSTEM\CurrentControlSet\Control\Terminal Server"
# The transport mode that leaves the policy alone (the role's default); the transport module has no such mode.
KEEP = "keep"
TRANSPORT_MODES = (KEEP, *transport.MODES)
FIREWALL_SIDES = ("server", "client")


class FactsOptionError(ValueError):
    """An option the argument spec cannot check is wrong; raised before any host is touched."""


@dataclass(frozen=True)
class FactsOptions:
    """The options the fixing modules would run with: the audit judges the host by the same standard."""

    event_days: int = 7
    max_events: int = 100
    expiry_threshold_days: int = 30
    restart_service: str = "SessionEnv"
    # The certificate module's choices the role passes on: the audit refuses, pins and re-pins where the fix would.
    certificate_replacement_thumbprint: str | None = None
    certificate_replace_when: str = "unusable"
    certificate_repin_renewal: bool = False
    machinekeys_strategy: str = "permissions"
    firewall_profiles: tuple[str, ...] = ("Domain", "Private")
    firewall_sides: tuple[str, ...] = FIREWALL_SIDES
    # keep: the transport policy is left alone, so it is reported but not judged (the role's default).
    transport_mode: str = "tcp_only"
    transport_sides: tuple[str, ...] = ("server",)
    tls_legacy_protocols: tuple[str, ...] = ()
    tls_nla: str = "enabled"
    # Whether the tls repair may write Group Policy values (override_policy): judged the same way here.
    tls_override_policy: bool = False
    connect_name: str | None = None

    def validate(self) -> None:
        if not 1 <= self.event_days <= 365:
            raise FactsOptionError(f"event_days must be from 1 to 365, not {self.event_days}")
        if not 1 <= self.max_events <= 1000:
            raise FactsOptionError(f"max_events must be from 1 to 1000, not {self.max_events}")
        if not 0 <= self.expiry_threshold_days <= 3650:
            raise FactsOptionError(
                f"expiry_threshold_days must be between 0 and 3650, not {self.expiry_threshold_days}"
            )
        if not self.firewall_profiles:
            raise FactsOptionError("firewall_profiles must name at least one of Domain, Private, Public")
        if not self.transport_sides:
            raise FactsOptionError("transport_sides must name at least one of server, client")
        if self.connect_name is not None and not self.connect_name.strip():
            raise FactsOptionError("connect_name must not be empty (omit it to skip the name checks)")
        try:
            self.certificate_options()
        except certificate.PlanError as exc:
            raise FactsOptionError(str(exc)) from exc

    def certificate_options(self) -> certificate.CertificateOptions:
        """The certificate module's options, checked as its action plugin checks them (PlanError)."""
        return certificate.CertificateOptions.from_params(
            {
                "expiry_threshold_days": self.expiry_threshold_days,
                "restart_service": self.restart_service,
                "replacement_thumbprint": self.certificate_replacement_thumbprint,
                "replace_when": self.certificate_replace_when,
                "repin_renewal": self.certificate_repin_renewal,
            }
        )

    def machinekeys_options(self) -> mk.Options:
        return mk.Options(strategy=self.machinekeys_strategy, restart_service=self.restart_service)

    def firewall_options(self) -> firewall.FirewallOptions:
        return firewall.FirewallOptions(sides=self.firewall_sides, profiles=self.firewall_profiles)

    def tls_options(self) -> tls.TlsOptions:
        return tls.TlsOptions(
            legacy_protocols=self.tls_legacy_protocols, nla=self.tls_nla, override_policy=self.tls_override_policy
        )


@dataclass
class Outcome:
    """What one concern contributes: facts under its name, and findings."""

    facts: dict[str, t.Any] = field(default_factory=dict)
    findings: list[dict[str, t.Any]] = field(default_factory=list)


Positions = dict[str, t.Any]
Reads = Callable[[FactsOptions, datetime], tuple[Batch, Positions]]
Evaluate = Callable[[BatchResult, Positions, FactsOptions, datetime], Outcome]


@dataclass(frozen=True)
class Concern:
    name: str
    reads: Reads
    evaluate: Evaluate


def _ok(result: BatchResult, position: int) -> dict[str, t.Any]:
    item = result[position]
    return item.data if item.ok else {}


# ---------------------------------------------------------------------------------------------------- machinekeys
# The machinekeys read batch contains the certificate module's: both planners judge the same reads.


def _machinekeys_reads(options: FactsOptions, now: datetime) -> tuple[Batch, Positions]:
    batch, index = mk.build_read_batch(options.machinekeys_options(), now)
    return batch, {"index": index}


def _machinekeys_evaluate(result: BatchResult, positions: Positions, options: FactsOptions, now: datetime) -> Outcome:
    index: mk.ReadIndex = positions["index"]
    system = _ok(result, index.cert.system)
    program_data = str(system.get("program_data") or mk.DEFAULT_PROGRAM_DATA)
    state = mk.parse_state(result, index, now, program_data)
    outcome = Outcome()
    cert_state = state.cert
    threshold = options.expiry_threshold_days
    outcome.facts["system"] = system
    outcome.facts["listener"] = _ok(result, index.cert.listener)
    outcome.facts["certificate"] = certificate.describe(cert_state, threshold)
    outcome.facts["services"] = cert_state.services
    outcome.facts["sessions"] = list(cert_state.sessions)
    outcome.facts["machinekeys"] = mk.view(state)
    if not cert_state.read_errors:
        try:
            outcome.findings += certificate.plan(cert_state, options.certificate_options()).findings
        except certificate.PlanError as exc:
            # Where the certificate module's run would fail (and change nothing), the audit says so.
            outcome.findings.append(certificate.refusal_finding(str(exc)))
    if not state.read_errors:
        outcome.findings += mk.plan(state, options.machinekeys_options()).findings
    return outcome


# ---------------------------------------------------------------------------------------------------- firewall


def _firewall_reads(options: FactsOptions, now: datetime) -> tuple[Batch, Positions]:
    batch = Batch(on_error="continue")
    return batch, {"reads": firewall.add_reads(batch, options.firewall_options())}


def _firewall_evaluate(result: BatchResult, positions: Positions, options: FactsOptions, now: datetime) -> Outcome:
    state = firewall.state_from(result, positions["reads"])
    outcome = Outcome()
    try:
        plan = firewall.plan_state(state, options.firewall_options())
    except firewall.FirewallPlanError as exc:
        outcome.findings.append(
            finding(
                "firewall.plan_refused",
                "warning",
                f"The firewall repair needs consent: {exc}",
                "firewall",
                {"port": state.port, "profiles": list(options.firewall_profiles)},
                None,
            )
        )
        return outcome
    outcome.facts["firewall"] = plan.report
    outcome.findings += plan.findings
    return outcome


# ---------------------------------------------------------------------------------------------------- transport


def _transport_reads(options: FactsOptions, now: datetime) -> tuple[Batch, Positions]:
    batch = Batch(on_error="continue")
    return batch, {"reads": transport.add_reads(batch)}


def _transport_evaluate(result: BatchResult, positions: Positions, options: FactsOptions, now: datetime) -> Outcome:
    state = transport.state_from(result, positions["reads"])
    if options.transport_mode == KEEP:
        # The fix leaves the policy alone, so the audit only shows it: a finding here would have no fix to match.
        return Outcome({"transport": dict(transport.current_values(state), mode_checked=KEEP)})
    plan = transport.plan_transport(state, options.transport_mode, list(options.transport_sides))
    return Outcome({"transport": dict(plan.before, mode_checked=options.transport_mode)}, list(plan.findings))


# ---------------------------------------------------------------------------------------------------- tls


def _tls_reads(options: FactsOptions, now: datetime) -> tuple[Batch, Positions]:
    batch = Batch(on_error="continue")
    return batch, {"reads": tls.add_reads(batch)}


def _tls_evaluate(result: BatchResult, positions: Positions, options: FactsOptions, now: datetime) -> Outcome:
    plan = tls.plan_tls(tls.state_from(result, positions["reads"]), options.tls_options())
    return Outcome({"tls": plan.report}, list(plan.findings))


# ---------------------------------------------------------------------------------------------------- listener
# Whether RDP accepts connections at all: nothing a fixing module changes, so these findings carry no fix.


def _listener_reads(options: FactsOptions, now: datetime) -> tuple[Batch, Positions]:
    batch = Batch(on_error="continue")
    positions: Positions = {
        "server": batch.add("registry.get", path=TERMINAL_SERVER_KEY, names=["fDenyTSConnections"]),
        "policy": batch.add("registry.get", path=transport.POLICY_KEY),
        "listener": batch.add("registry.get", path=tls.LISTENER_KEY),
        "services": batch.add("service.get", names=list(certificate.READ_SERVICES)),
    }
    return batch, positions


def _listener_evaluate(result: BatchResult, positions: Positions, options: FactsOptions, now: datetime) -> Outcome:
    server = result.data(positions["server"]).get("values", {})
    policy = result.data(positions["policy"]).get("values", {})
    listener = result.data(positions["listener"]).get("values", {})
    services = result.data(positions["services"]).get("services") or {}
    deny_policy = transport.dword(policy, "fDenyTSConnections")
    deny_local = transport.dword(server, "fDenyTSConnections")
    deny = deny_policy if deny_policy is not None else deny_local
    port = transport.dword(listener, "PortNumber") or firewall.DEFAULT_PORT
    outcome = Outcome()
    outcome.facts["remote_desktop"] = {
        "connections_allowed": deny != 1,
        "deny_from": "policy" if deny_policy is not None else "local",
        "port": port,
    }
    if deny == 1:
        outcome.findings.append(
            finding(
                "service.connections_denied",
                "critical",
                "Remote Desktop connections are turned off (fDenyTSConnections=1"
                + (" set by policy)" if deny_policy is not None else ")"),
                "service",
                {"policy": deny_policy, "local": deny_local},
                None,
            )
        )
    termservice = services.get("TermService") if isinstance(services, dict) else None
    if isinstance(termservice, dict) and termservice.get("status") != "Running":
        outcome.findings.append(
            finding(
                "service.termservice_not_running",
                "critical",
                f"Remote Desktop Services (TermService) is {termservice.get('status') or 'not running'}"
                + (" and disabled" if termservice.get("start_type") == "Disabled" else ""),
                "service",
                {"service": "TermService", **termservice},
                None,
            )
        )
    if port != firewall.DEFAULT_PORT:
        outcome.findings.append(
            finding(
                "service.nondefault_port",
                "info",
                f"The RDP listener uses port {port}, not {firewall.DEFAULT_PORT}: clients must connect to name:{port}",
                "service",
                {"port": port},
                None,
            )
        )
    return outcome


# ---------------------------------------------------------------------------------------------------- events


def _events_reads(options: FactsOptions, now: datetime) -> tuple[Batch, Positions]:
    batch = Batch(on_error="continue")
    since = (now - timedelta(days=options.event_days)).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Each query is checked against the event log's limit here: an oversize one is refused before anything is sent.
    queries = [events_mod.check_query(query) for query in events_mod.QUERIES]
    position = batch.add("events.query", since=since, queries=queries, max_events=options.max_events)
    return batch, {"events": position, "since": since}


def _events_evaluate(result: BatchResult, positions: Positions, options: FactsOptions, now: datetime) -> Outcome:
    data = result.data(positions["events"])
    parsed = events_mod.parse_events(data.get("events") or [])
    unreadable = data.get("unreadable") or []
    invalid_queries = data.get("invalid_queries") or []
    return Outcome(
        {
            "events": {
                "since": positions["since"],
                "count": len(parsed),
                "by_id": _count_ids(parsed),
                "entries": [event.brief() for event in parsed[: options.max_events]],
                "unavailable": data.get("unavailable") or [],
                "unreadable": unreadable,
                "invalid_queries": invalid_queries,
                "_parsed": parsed,
            }
        },
        events_mod.read_findings(unreadable, invalid_queries),
    )


def _count_ids(parsed: t.Sequence[events_mod.Event]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in parsed:
        key = f"{event.provider} {event.id}"
        counts[key] = counts.get(key, 0) + 1
    return counts


CONCERNS: tuple[Concern, ...] = (
    Concern("machinekeys", _machinekeys_reads, _machinekeys_evaluate),
    Concern("firewall", _firewall_reads, _firewall_evaluate),
    Concern("transport", _transport_reads, _transport_evaluate),
    Concern("tls", _tls_reads, _tls_evaluate),
    Concern("listener", _listener_reads, _listener_evaluate),
    Concern("events", _events_reads, _events_evaluate),
)


# ---------------------------------------------------------------------------------------------------- the one batch


@dataclass
class MergedBatch:
    """Every concern's reads in one batch, each distinct operation once."""

    batch: Batch = field(default_factory=lambda: Batch(on_error="continue"))
    positions: dict[str, list[int]] = field(default_factory=dict)
    _seen: dict[str, int] = field(default_factory=dict)

    def include(self, name: str, concern_batch: Batch) -> None:
        mapped: list[int] = []
        for operation in concern_batch.ops:
            key = json.dumps(operation, sort_keys=True)
            if key not in self._seen:
                self._seen[key] = len(self.batch.ops)
                self.batch.ops.append(operation)
            mapped.append(self._seen[key])
        self.positions[name] = mapped

    def view(self, name: str, result: BatchResult) -> BatchResult:
        """The concern's own results, at the positions its own batch gave them."""
        return BatchResult(result.host, [result.results[position] for position in self.positions[name]])


@dataclass(frozen=True)
class FactsRead:
    merged: MergedBatch
    concern_positions: dict[str, Positions]


def build_read_batch(options: FactsOptions, now: datetime, concerns: t.Sequence[Concern] = CONCERNS) -> FactsRead:
    merged = MergedBatch()
    concern_positions: dict[str, Positions] = {}
    for concern in concerns:
        concern_batch, positions = concern.reads(options, now)
        merged.include(concern.name, concern_batch)
        concern_positions[concern.name] = positions
    return FactsRead(merged, concern_positions)


# ---------------------------------------------------------------------------------------------------- names


def name_findings(
    connect_name: str,
    address: str | None,
    *,
    resolved: list[str] | None,
    resolve_error: str | None,
    hostname: str | None,
    fqdn: str | None,
    cert: dict[str, t.Any] | None,
) -> list[dict[str, t.Any]]:
    """The name users type, checked from the controller: does it resolve, to this host, and match its certificate."""
    found: list[dict[str, t.Any]] = []
    if not is_ip_address(connect_name):
        if resolved is None:
            found.append(
                finding(
                    "name_resolution.unresolvable",
                    "critical",
                    f"{connect_name} does not resolve from the controller; clients using it cannot connect",
                    "name_resolution",
                    {"name": connect_name, "error": resolve_error},
                    None,
                )
            )
        elif address and is_ip_address(address) and address not in resolved:
            found.append(
                finding(
                    "name_resolution.other_address",
                    "warning",
                    f"{connect_name} resolves to {', '.join(resolved)}, not to {address} where this host answers: "
                    "clients reach another machine (stale DNS record, hosts file or split DNS)",
                    "name_resolution",
                    {"name": connect_name, "resolved": resolved, "host_address": address},
                    None,
                )
            )
        if not same_host_name(connect_name, fqdn, hostname):
            found.append(
                finding(
                    "name_resolution.alias",
                    "info",
                    f"{connect_name} is not the host's own name ({fqdn or hostname}): Kerberos cannot find the "
                    "server by it, so NLA falls back to NTLM",
                    "name_resolution",
                    {"name": connect_name, "hostname": hostname, "fqdn": fqdn},
                    None,
                )
            )
    if cert and cert.get("subject") is not None:
        matched, _entry = certificate_matches(connect_name, cert.get("common_name"), list(cert.get("sans") or []))
        if not matched:
            self_signed = bool(cert.get("self_signed"))
            found.append(
                finding(
                    "name_resolution.certificate_name_mismatch",
                    "info" if self_signed else "warning",
                    f"The listener's certificate does not name {connect_name}: clients show a name warning",
                    "name_resolution",
                    {
                        "name": connect_name,
                        "common_name": cert.get("common_name"),
                        "sans": cert.get("sans"),
                        "self_signed": self_signed,
                    },
                    None,
                )
            )
    return found


# ---------------------------------------------------------------------------------------------------- assembling

_LIKELY_CAUSES: tuple[tuple[str, str], ...] = (
    (
        "certificate.self_signed_expired",
        "Windows did not renew its self-signed certificate (a stopped CertPropSvc, KeyIso, CryptSvc or SessionEnv, "
        "or an unwritable MachineKeys folder); without a valid credential TLS fails and the server closes the "
        "connection (0x904 / 0x7).",
    ),
    ("certificate.self_signed_", "The listener's self-signed certificate or its key cannot be used for TLS."),
    ("certificate.regeneration_blocked", "Services Windows needs to create the certificate are stopped or disabled."),
    (
        "certificate.pinned_renewal_available",
        "Auto-enrollment renewed the pinned certificate into LocalMachine\\My, but nothing re-pins the listener "
        "to a renewal, and a new key's ACL does not give NETWORK SERVICE read.",
    ),
    ("certificate.pinned_", "The certificate an administrator bound to the listener cannot be used."),
    ("certificate.template_", "The Group Policy certificate template's certificate is not usable or renewed."),
    ("certificate.", "The listener's certificate."),
    (
        "machinekeys.",
        "Permissions on the MachineKeys folder or the RDP key file (often after a hardening script, a profile "
        "cleanup or a recursive icacls) keep TermService (NETWORK SERVICE) from reading the private key.",
    ),
    (
        "firewall.client_",
        "A firewall on the client side (Windows Firewall rules or a third-party suite) stops the RDP client.",
    ),
    (
        "firewall.rdp_tcp_blocked_active_profile",
        "The network the server is on has another category (often Public) than the profiles the Remote Desktop rules "
        "allow; that profile's default inbound action blocks RDP.",
    ),
    (
        "firewall.rdp_udp_blocked_active_profile",
        "The network the server is on has another category (often Public) than the profiles the Remote Desktop rules "
        "allow; that profile's default inbound action blocks RDP.",
    ),
    ("firewall.", "Windows Firewall on the server does not let RDP in, or a block rule shadows the allow rules."),
    (
        "transport.",
        "UDP transport over VPNs and tunnels with a small MTU breaks sessions after they start; TCP only is stable.",
    ),
    (
        "tls.security_layer_rdp_policy",
        "A Group Policy (Require use of specific security layer) enforces native RDP security; it returns at every "
        "policy refresh until the GPO changes.",
    ),
    (
        "tls.nla_disabled_policy",
        "A Group Policy (Require user authentication ... Network Level Authentication) turns NLA off; it returns at "
        "every policy refresh until the GPO changes.",
    ),
    ("tls.security_layer", "A reset script (such as Azure's ResetRDPCert) switched the listener to native RDP."),
    ("tls.nla_disabled", "A troubleshooting step (such as Azure's DisableNLA) turned NLA off and left it off."),
    ("tls.weak_protocols", "Old defaults or compatibility changes left deprecated protocols enabled."),
    (
        "tls.",
        "Schannel hardening (protocols or cipher-suite policy) left no TLS version or cipher suite that the listener's "
        "certificate and the clients can use together.",
    ),
    ("service.", "Remote Desktop is not accepting connections on this host."),
    ("name_resolution.", "The name clients use does not lead to this host, or does not match its certificate."),
)


def likely_cause(finding_id: str) -> str | None:
    return next((text for prefix, text in _LIKELY_CAUSES if finding_id.startswith(prefix)), None)


def read_failures(result: BatchResult) -> list[str]:
    return [
        f"{item.op}: {item.error_type or 'Failed'}: {item.error_message or ''}".rstrip(": ")
        for item in result.results
        if not item.ok and not item.skipped
    ]


@dataclass
class Gathered:
    facts: dict[str, t.Any]
    findings: list[dict[str, t.Any]]


def evaluate(
    read: FactsRead,
    result: BatchResult,
    options: FactsOptions,
    now: datetime,
    concerns: t.Sequence[Concern] = CONCERNS,
) -> Gathered:
    """Every concern's facts and findings from the merged batch's result, events folded in, most urgent first."""
    facts: dict[str, t.Any] = {}
    findings: list[dict[str, t.Any]] = []
    failures = read_failures(result)
    unjudged: list[str] = []
    for concern in concerns:
        view = read.merged.view(concern.name, result)
        try:
            outcome = concern.evaluate(view, read.concern_positions[concern.name], options, now)
        except Exception as exc:  # one unreadable concern must not hide the others (OperationError, bad data)
            unjudged.append(f"{concern.name}: {exc}")
            continue
        facts.update(outcome.facts)
        findings += outcome.findings
    # A concern's own "could not read" findings are replaced by one that names every failed operation.
    findings = [item for item in findings if not str(item.get("id", "")).endswith(".read_failed")]
    if failures or unjudged:
        findings.append(
            finding(
                "facts.read_failed",
                "warning",
                "Part of the host's state could not be read; the findings may be incomplete",
                "service",
                {"operations": failures, "concerns_not_judged": unjudged},
                None,
            )
        )
    parsed: list[events_mod.Event] = []
    event_facts = facts.get("events")
    if isinstance(event_facts, dict):
        parsed = event_facts.pop("_parsed", [])
    assessment = events_mod.assess(
        parsed, [str(item["id"]) for item in findings], event_facts and event_facts.get("since")
    )
    for item in findings:
        logged = assessment.evidence.get(str(item["id"]))
        if logged:
            evidence = item.setdefault("evidence", {})
            if isinstance(evidence, dict):
                evidence.setdefault("events", logged[: events_mod.EVIDENCE_EVENTS])
        if "likely_cause" not in item:
            text = likely_cause(str(item["id"]))
            if text:
                item["likely_cause"] = text
    findings += assessment.findings
    findings.sort(key=urgency)
    return Gathered(facts, findings)


def summary(findings: t.Sequence[dict[str, t.Any]]) -> dict[str, t.Any]:
    by_severity = dict.fromkeys(SEVERITY_ORDER, 0)
    for item in findings:
        severity = str(item.get("severity"))
        by_severity[severity] = by_severity.get(severity, 0) + 1
    fixable = sorted({str(item["fix"]["module"]) for item in findings if isinstance(item.get("fix"), dict)})
    if by_severity["critical"]:
        status = "critical"
    elif by_severity["warning"] or by_severity["security"]:
        status = "warning"
    else:
        status = "ok"
    return {"status": status, "by_severity": by_severity, "fixed_by": fixable}
