# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Planner of rdpfix.rdp.certificate: which certificate the RDP listener uses, what is wrong with it, what to do.

Pure functions and data: the read batch to send, the host state parsed from its results, the plan (findings, actions,
before/after), the apply batch, and the verification of the re-read state. Nothing here touches a connection, so the
whole decision logic is unit-tested with certificates built in the tests.

Windows behaviour relied upon (sources in docs/modules/certificate.md):
- The listener's certificate is reported by Win32_TSGeneralSetting (SSLCertificateSHA1Hash, hash type 1 self-signed,
  2 GPO template, 3 custom). A registry value SSLCertificateSHA1Hash under the WinStation key means an administrator
  pinned a certificate; Windows never writes it for its own self-signed certificate.
- Removing the self-signed certificate from LocalMachine\\Remote Desktop and restarting SessionEnv (or TermService)
  makes Windows create a new one within seconds, provided CertPropSvc, KeyIso, CryptSvc and SessionEnv run.
- Restarting TermService disconnects every RDP session; restarting SessionEnv does not.
- On an RD Connection Broker the pinned value must not be removed.
"""

from __future__ import annotations

import base64
import binascii
import re
import typing as t
from dataclasses import dataclass, field, replace
from datetime import datetime

from ansible_collections.rdpfix.rdp.plugins.module_utils._x509 import summarize_certificate

from . import _guards, _sddl
from ._action import BackupSet
from ._agent import AgentContractError, Batch, BatchResult, OpResult
from ._findings import finding, fix

WINSTATIONS_KEY = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations"
PIN_VALUE_NAME = "SSLCertificateSHA1Hash"
SELF_SIGNED_STORE = "Remote Desktop"
PERSONAL_STORE = "My"
# Services that must run for Windows to (re)create the self-signed certificate [AzEvent][InternalErr][Repair].
PREREQUISITE_SERVICES = ("CertPropSvc", "KeyIso", "CryptSvc", "SessionEnv")
RESTARTABLE_SERVICES = ("SessionEnv", "TermService")
READ_SERVICES = (*PREREQUISITE_SERVICES, "TermService", "UmRdpService")
# Sessions a TermService restart would disturb: it disconnects them (not documented as a logoff); what becomes of a
# session already disconnected is not documented either, so logged-on users count whether active or disconnected.
# Session 0 (services) is "Disconnected" on every host and the console's logon screen is "Connected" without a user:
# neither counts.
DISRUPTED_SESSION_STATES = frozenset({"Active", "Disconnected"})
USER_SESSION_STATES = frozenset({"Connected", "ConnectQuery", "Shadow"})

HASH_TYPE_SOURCES = {1: "self_signed", 2: "gpo_template", 3: "pinned"}
# Pin states after which the listener falls back to the self-signed certificate: RCM's events 1051 (missing), 1053
# (expired), 1054 (wrong EKU) and 1055 (key inaccessible) each say "The default certificate will be used ... from
# now on".
PIN_FALLBACK_STATES = frozenset({"missing", "expired", "wrong_eku", "no_private_key", "key_unreadable"})
PIN_PROBLEM_STATES = PIN_FALLBACK_STATES | {"expired", "expiring", "not_yet_valid"}
# Pin states for which a newer certificate of the same subject in LocalMachine\My is the pinned one's renewal
# (auto-enrollment puts it there and leaves the pin alone).
RENEWABLE_PIN_STATES = frozenset({"expired", "expiring"})

# After the restart the apply batch waits this long before re-reading; then up to VERIFY_POLLS read-only polls.
SETTLE_MS = 3000
POLL_MS = 5000
VERIFY_POLLS = 2

_THUMBPRINT_RE = re.compile(r"^[0-9A-F]{40}$")
# Characters Windows' certificate dialog puts around a copied thumbprint (spaces, an invisible left-to-right mark).
_THUMBPRINT_NOISE = re.compile(r"[\s:\u200e\u200f\ufeff]")


class PlanError(ValueError):
    """The requested change cannot be made safely; nothing has been touched."""


def normalize_thumbprint(value: str) -> str:
    """Upper-case hex without separators; raises PlanError with the offending value otherwise."""
    cleaned = _THUMBPRINT_NOISE.sub("", value).upper()
    if not _THUMBPRINT_RE.match(cleaned):
        raise PlanError(f"{value!r} is not a certificate thumbprint (40 hexadecimal characters, SHA-1)")
    return cleaned


# ---------------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class CertificateOptions:
    expiry_threshold_days: int = 30
    regenerate_self_signed: bool = True
    remove_missing_pin: bool = True
    replacement_thumbprint: str | None = None
    replace_when: str = "unusable"
    restart_service: str = "SessionEnv"
    start_stopped_services: bool = False
    allow_session_disruption: bool = False
    terminal_name: str = "RDP-Tcp"
    repin_renewal: bool = False

    @classmethod
    def from_params(cls, params: dict[str, t.Any]) -> CertificateOptions:
        """Build from validated module arguments; raises PlanError for values the argument spec cannot check."""
        threshold = int(params.get("expiry_threshold_days", 30))
        if not 0 <= threshold <= 3650:
            raise PlanError(f"expiry_threshold_days must be between 0 and 3650, not {threshold}")
        terminal_name = str(params.get("terminal_name") or "RDP-Tcp")
        if not re.match(r"^[A-Za-z0-9#._-]{1,64}$", terminal_name):
            raise PlanError(f"terminal_name {terminal_name!r} is not a WinStation name such as RDP-Tcp")
        replacement = params.get("replacement_thumbprint")
        replace_when = str(params.get("replace_when") or "unusable")
        if replace_when == "always" and not replacement:
            raise PlanError("replace_when=always needs replacement_thumbprint")
        return cls(
            expiry_threshold_days=threshold,
            regenerate_self_signed=bool(params.get("regenerate_self_signed", True)),
            remove_missing_pin=bool(params.get("remove_missing_pin", True)),
            replacement_thumbprint=normalize_thumbprint(str(replacement)) if replacement else None,
            replace_when=replace_when,
            restart_service=str(params.get("restart_service") or "SessionEnv"),
            start_stopped_services=bool(params.get("start_stopped_services", False)),
            allow_session_disruption=bool(params.get("allow_session_disruption", False)),
            terminal_name=terminal_name,
            repin_renewal=bool(params.get("repin_renewal", False)),
        )

    @property
    def winstation_key(self) -> str:
        return f"{WINSTATIONS_KEY}\\{self.terminal_name}"


# ---------------------------------------------------------------------------------------------------- host state


def key_readable_by_network_service(sddl: str) -> bool | None:
    """Whether TermService's account (NETWORK SERVICE) may read a key file with this SDDL; None when unparseable."""
    try:
        descriptor = _sddl.parse(sddl)
    except _sddl.SddlError:
        return None
    return _sddl.can_read(descriptor, _sddl.NETWORK_SERVICE_IDENTITIES)


@dataclass(frozen=True)
class StoredCertificate:
    """One certificate of a LocalMachine store as the agent's cert.list reports it."""

    store: str
    thumbprint: str
    der: bytes
    has_private_key: bool
    key: dict[str, t.Any] | None
    summary: dict[str, t.Any] | None
    parse_error: str | None = None

    @classmethod
    def from_agent(cls, store: str, item: dict[str, t.Any], now: datetime) -> StoredCertificate:
        thumbprint = str(item.get("thumbprint") or "").upper()
        der = b""
        summary: dict[str, t.Any] | None = None
        parse_error: str | None = None
        try:
            der = base64.b64decode(str(item.get("der_b64") or ""), validate=True)
            summary = summarize_certificate(der, now)
        except (binascii.Error, ValueError) as exc:  # CertificateParseError is a ValueError
            parse_error = str(exc)
        key = item.get("key")
        return cls(
            store=store,
            thumbprint=thumbprint or (summary["thumbprint"] if summary else ""),
            der=der,
            has_private_key=bool(item.get("has_private_key")),
            key=key if isinstance(key, dict) else None,
            summary=summary,
            parse_error=parse_error,
        )

    @property
    def key_state(self) -> str:
        """``readable``, ``unreadable`` (NETWORK SERVICE cannot read it), ``missing``, ``inaccessible`` (the key
        exists but the account rdpfix runs as could read neither it nor its ACL) or ``unknown``.

        Only an explicit ``exists: false`` is missing: a key the provider could not open (a CNG key whose file was not
        found by name, ``exists`` null) is not, and its ``open_error`` says why.
        """
        if not self.has_private_key:
            return "missing"
        if self.key is None:
            return "unknown"
        exists = self.key.get("exists")
        if exists is False or self.key.get("size") == 0:
            return "missing"
        sddl = self.key.get("sddl")
        readable = key_readable_by_network_service(str(sddl)) if sddl else None
        if readable is None:
            if exists is True or self.key.get("open_error") == "AccessDenied":
                return "inaccessible"
            return "unknown"
        return "readable" if readable else "unreadable"

    @property
    def days_left(self) -> int | None:
        return int(self.summary["days_left"]) if self.summary else None

    def report(self) -> dict[str, t.Any]:
        """The certificate as returned to the user (no DER, no key ACL)."""
        described: dict[str, t.Any] = {"store": self.store, "thumbprint": self.thumbprint}
        if self.summary:
            described.update({name: value for name, value in self.summary.items() if name != "thumbprint"})
        else:
            described["parse_error"] = self.parse_error
        described["has_private_key"] = self.has_private_key
        described["key_state"] = self.key_state
        described["key_readable"] = {"readable": True, "unreadable": False, "missing": False}.get(self.key_state)
        if self.key:
            described["key_path"] = self.key.get("path")
        return described

    def label(self) -> str:
        if self.summary:
            return f"{self.thumbprint} ({self.summary['subject']}, expires {self.summary['not_after']})"
        return f"{self.thumbprint} (unreadable certificate)"


@dataclass(frozen=True)
class HostState:
    hostname: str
    fqdn: str | None
    connection_broker: bool
    program_data: str | None
    listener_thumbprint: str | None
    listener_hash_type: int | None
    pinned_thumbprint: str | None
    pinned_value: dict[str, t.Any] | None
    self_signed: tuple[StoredCertificate, ...]
    personal: tuple[StoredCertificate, ...]
    services: dict[str, dict[str, t.Any]]
    sessions: tuple[dict[str, t.Any], ...]
    read_errors: tuple[str, ...] = ()

    def find(
        self, thumbprint: str | None, stores: t.Iterable[str] = (PERSONAL_STORE, SELF_SIGNED_STORE)
    ) -> StoredCertificate | None:
        if not thumbprint:
            return None
        for store in stores:
            for cert in self.personal if store == PERSONAL_STORE else self.self_signed:
                if cert.thumbprint == thumbprint:
                    return cert
        return None


@dataclass(frozen=True)
class ReadIndex:
    system: int
    listener: int
    registry: int
    self_signed: int
    personal: int
    services: int
    sessions: int


@dataclass(frozen=True)
class VerifyIndex:
    listener: int
    registry: int
    self_signed: int
    personal: int | None = None  # LocalMachine\My, re-read when a key ACL was changed


def build_read_batch(options: CertificateOptions, wait_ms: int = 0) -> tuple[Batch, ReadIndex]:
    """The one read-only batch every run starts with (one round trip); ``wait_ms`` first waits on the host (a poll
    after a restart gives Windows time to create the certificate)."""
    batch = Batch(on_error="continue")
    if wait_ms:
        batch.add("util.sleep", milliseconds=wait_ms)
    index = ReadIndex(
        system=batch.add("system.info"),
        listener=batch.add("listener.get", terminal_name=options.terminal_name),
        registry=batch.add("registry.get", path=options.winstation_key, names=[PIN_VALUE_NAME]),
        self_signed=batch.add("cert.list", store=SELF_SIGNED_STORE),
        personal=batch.add("cert.list", store=PERSONAL_STORE),
        services=batch.add("service.get", names=list(READ_SERVICES)),
        sessions=batch.add("session.list"),
    )
    return batch, index


def add_verify_reads(batch: Batch, options: CertificateOptions, personal: bool = False) -> VerifyIndex:
    return VerifyIndex(
        listener=batch.add("listener.get", terminal_name=options.terminal_name),
        registry=batch.add("registry.get", path=options.winstation_key, names=[PIN_VALUE_NAME]),
        self_signed=batch.add("cert.list", store=SELF_SIGNED_STORE),
        personal=batch.add("cert.list", store=PERSONAL_STORE) if personal else None,
    )


def _error_text(result: OpResult) -> str:
    if result.skipped:
        return f"{result.op}: not run"
    return f"{result.op}: {result.error_type or 'Failed'}: {result.error_message or ''}".rstrip(": ")


def _pin_from_registry(data: dict[str, t.Any]) -> tuple[str | None, dict[str, t.Any] | None]:
    value = (data.get("values") or {}).get(PIN_VALUE_NAME)
    if not isinstance(value, dict) or value.get("value") in (None, ""):
        return None, None
    raw = value["value"]
    text = "".join(f"{byte:02X}" for byte in raw) if isinstance(raw, list) else str(raw)
    return _THUMBPRINT_NOISE.sub("", text).upper(), value


def _certificates(store: str, data: dict[str, t.Any], now: datetime) -> tuple[StoredCertificate, ...]:
    items = data.get("certificates") or []
    return tuple(StoredCertificate.from_agent(store, item, now) for item in items if isinstance(item, dict))


def parse_state(result: BatchResult, index: ReadIndex, now: datetime) -> HostState:
    """The host's state from the read batch; operations that failed are listed in ``read_errors``."""
    errors = [_error_text(item) for item in result.results if not item.ok]

    def data(position: int) -> dict[str, t.Any]:
        item = result[position]
        return item.data if item.ok else {}

    system = data(index.system)
    listener = data(index.listener)
    pinned, pinned_value = _pin_from_registry(data(index.registry))
    listener_hash = listener.get("ssl_certificate_sha1_hash")
    hash_type = listener.get("ssl_certificate_sha1_hash_type")
    services = data(index.services).get("services") or {}
    return HostState(
        hostname=str(system.get("hostname") or result.host),
        fqdn=system.get("fqdn"),
        # Unknown broker role counts as a broker: the one thing never to do there is to remove the pin.
        connection_broker=bool(system.get("connection_broker", not result[index.system].ok)),
        program_data=system.get("program_data"),
        listener_thumbprint=str(listener_hash).upper() if listener_hash else None,
        listener_hash_type=int(hash_type) if isinstance(hash_type, int) else None,
        pinned_thumbprint=pinned,
        pinned_value=pinned_value,
        self_signed=_certificates(SELF_SIGNED_STORE, data(index.self_signed), now),
        personal=_certificates(PERSONAL_STORE, data(index.personal), now),
        services=service_records(services),
        sessions=tuple(item for item in data(index.sessions).get("sessions") or [] if isinstance(item, dict)),
        read_errors=tuple(errors),
    )


def refresh_state(state: HostState, result: BatchResult, index: VerifyIndex, now: datetime) -> HostState:
    """The state after the apply batch: the listener, the pin and the self-signed store re-read."""
    listener = result.data(index.listener)
    pinned, pinned_value = _pin_from_registry(result.data(index.registry))
    listener_hash = listener.get("ssl_certificate_sha1_hash")
    hash_type = listener.get("ssl_certificate_sha1_hash_type")
    return replace(
        state,
        listener_thumbprint=str(listener_hash).upper() if listener_hash else None,
        listener_hash_type=int(hash_type) if isinstance(hash_type, int) else None,
        pinned_thumbprint=pinned,
        pinned_value=pinned_value,
        self_signed=_certificates(SELF_SIGNED_STORE, result.data(index.self_signed), now),
        personal=state.personal
        if index.personal is None
        else _certificates(PERSONAL_STORE, result.data(index.personal), now),
    )


# ---------------------------------------------------------------------------------------------------- assessment


def certificate_problem(cert: StoredCertificate | None, threshold_days: int) -> str | None:
    """Why ``cert`` cannot serve the listener well: a pin state name, or None when it is fine."""
    if cert is None:
        return "missing"
    if cert.summary is None:
        return "unparseable"
    if cert.summary["expired"]:
        return "expired"
    if cert.summary["not_yet_valid"]:
        return "not_yet_valid"
    if not cert.summary["server_auth"]:
        return "wrong_eku"
    key_state = cert.key_state
    if key_state == "missing":
        return "no_private_key"
    if key_state == "unreadable":
        return "key_unreadable"
    if cert.summary["days_left"] <= threshold_days:
        return "expiring"
    return None


def current_self_signed(state: HostState) -> StoredCertificate | None:
    """The self-signed certificate the listener uses or falls back to: the one it names, else the newest."""
    named = state.find(state.listener_thumbprint, (SELF_SIGNED_STORE,))
    if named is not None:
        return named
    readable = [cert for cert in state.self_signed if cert.summary]
    if not readable:
        return state.self_signed[0] if state.self_signed else None
    return max(readable, key=lambda cert: str(cert.summary["not_after"] if cert.summary else ""))


def pin_state(state: HostState, threshold_days: int) -> str | None:
    if not state.pinned_thumbprint:
        return None
    problem = certificate_problem(state.find(state.pinned_thumbprint, (PERSONAL_STORE,)), threshold_days)
    return "unparseable_pin" if problem == "unparseable" else (problem or "ok")


def listener_certificate(state: HostState, threshold_days: int) -> tuple[str, StoredCertificate | None]:
    """Which certificate the listener presents to a new connection, and where it comes from."""
    pin = pin_state(state, threshold_days)
    if pin is not None and pin not in PIN_FALLBACK_STATES:
        return "pinned", state.find(state.pinned_thumbprint, (PERSONAL_STORE,))
    if state.listener_hash_type == 2:
        return "gpo_template", state.find(state.listener_thumbprint)
    cert = current_self_signed(state)
    return ("self_signed" if cert is not None else "none"), cert


def describe(state: HostState, threshold_days: int) -> dict[str, t.Any]:
    """The ``certificate`` return value: the listener's certificate and where it comes from."""
    source, cert = listener_certificate(state, threshold_days)
    described: dict[str, t.Any] = cert.report() if cert else {"thumbprint": None}
    described.update(
        source=source,
        pinned_thumbprint=state.pinned_thumbprint,
        listener_thumbprint=state.listener_thumbprint,
        listener_hash_type=state.listener_hash_type,
    )
    return described


def diff_view(state: HostState, threshold_days: int) -> dict[str, t.Any]:
    """The compact view shown by --diff."""
    source, cert = listener_certificate(state, threshold_days)
    return {
        "source": source,
        "thumbprint": cert.thumbprint if cert else None,
        "subject": cert.summary["subject"] if cert and cert.summary else None,
        "not_after": cert.summary["not_after"] if cert and cert.summary else None,
        "pinned_thumbprint": state.pinned_thumbprint,
        "self_signed_store": [cert.label() for cert in state.self_signed],
    }


# ---------------------------------------------------------------------------------------------------- plan


# Severities (docs/findings.md): a self-signed certificate the listener cannot use breaks RDP now (critical: TermService
# cannot build its TLS credential, the server closes the connection, 0x904 / 0x7). A pinned or template certificate
# that cannot be used is a warning: the listener falls back to the self-signed certificate (clients that trusted the
# pinned one now warn), or presents one that expires soon. Expiring is a warning; what only informs is info.
# The self-signed problems a regeneration repairs.
REGENERATION_TRIGGERS = frozenset(
    f"self_signed_{problem}" for problem in ("expired", "expiring", "missing", "no_private_key", "unparseable")
)
# What each finding shows as evidence: the listener's certificate as ``describe`` reports it.
EVIDENCE_FIELDS = ("source", "thumbprint", "subject", "not_after", "days_left", "key_state", "pinned_thumbprint")


def refusal_finding(reason: str) -> dict[str, t.Any]:
    """``certificate.plan_refused``: the module's run fails on this host (in check mode too) and changes nothing."""
    return finding(
        "certificate.plan_refused",
        "warning",
        f"rdpfix.rdp.certificate refuses to run on this host with these options and changes nothing: {reason}",
        "certificate",
        {"reason": reason},
        None,
    )


def _finding(what: str, severity: str, message: str, **evidence: t.Any) -> dict[str, t.Any]:
    """A finding of this planner: id ``certificate.<what>``, cause ``certificate``; ``plan`` adds evidence and fix."""
    return finding(f"certificate.{what}", severity, message[:1].upper() + message[1:], "certificate", evidence, None)


@dataclass(frozen=True)
class Action:
    id: str  # start_service | remove_certificate | remove_pin | set_pin | restart_service
    description: str
    details: dict[str, t.Any] = field(default_factory=dict)

    def to_dict(self, status: str) -> dict[str, t.Any]:
        return {"action": self.id, "description": self.description, "status": status, **self.details}


@dataclass(frozen=True)
class KeyGrant:
    """NETWORK SERVICE read added to one private key file's ACL (the certificate about to be pinned), nothing else."""

    cert: StoredCertificate
    path: str
    previous_sddl: str
    sddl: str


@dataclass
class CertificatePlan:
    findings: list[dict[str, t.Any]] = field(default_factory=list)
    remove_certificates: list[StoredCertificate] = field(default_factory=list)
    remove_pin: bool = False
    set_pin: StoredCertificate | None = None
    grant_key_read: KeyGrant | None = None
    start_services: list[str] = field(default_factory=list)
    restart_service: str | None = None
    regenerate: bool = False
    restart_pending: bool = False
    pending: list[Action] = field(default_factory=list)

    @property
    def has_changes(self) -> bool:
        return bool(
            self.remove_certificates or self.remove_pin or self.set_pin or self.grant_key_read or self.restart_service
        )

    @property
    def actions(self) -> list[Action]:
        """What the apply batch does, in order."""
        ordered = [Action("start_service", f"start {name}", {"service": name}) for name in self.start_services]
        ordered += [
            Action(
                "remove_certificate",
                f"remove the self-signed certificate {cert.label()} from LocalMachine\\{cert.store}",
                {"store": cert.store, "thumbprint": cert.thumbprint},
            )
            for cert in self.remove_certificates
        ]
        if self.remove_pin:
            ordered.append(Action("remove_pin", f"remove the registry value {PIN_VALUE_NAME} (the pinned thumbprint)"))
        if self.grant_key_read is not None:
            grant = self.grant_key_read
            ordered.append(
                Action(
                    "grant_key_read",
                    f"give NETWORK SERVICE read on the private key file {grant.path} of {grant.cert.thumbprint} "
                    "(that file only)",
                    {"path": grant.path, "thumbprint": grant.cert.thumbprint, "sddl": grant.sddl},
                )
            )
        if self.set_pin is not None:
            ordered.append(
                Action(
                    "set_pin",
                    f"make the listener use {self.set_pin.label()} from LocalMachine\\My",
                    {"thumbprint": self.set_pin.thumbprint},
                )
            )
        if self.restart_service:
            ordered.append(
                Action("restart_service", f"restart {self.restart_service}", {"service": self.restart_service})
            )
        return ordered

    def problems(self) -> list[dict[str, t.Any]]:
        """The findings that keep the host from being compliant: every critical and warning one."""
        return [item for item in self.findings if item["severity"] in ("critical", "warning")]


SERVICE_START_TYPES = ("Automatic", "Manual", "Disabled", "Boot", "System")


def service_records(services: object) -> dict[str, dict[str, t.Any]]:
    """``service.get``'s services, held to the protocol: an existing service has a status and one of the start types.
    An empty start type (what ServiceController.StartType gives on .NET Framework 4.5.2) would make a disabled
    service look startable, so it is refused as an agent defect, never read as "not disabled"."""
    if not isinstance(services, dict):
        raise AgentContractError(
            f"agent contract: service.get must report services as a mapping, got {services!r:.100}"
        )
    records: dict[str, dict[str, t.Any]] = {}
    for name, info in services.items():
        if not isinstance(info, dict):
            raise AgentContractError(f"agent contract: service.get reported {name!r} as {info!r:.100}")
        if info.get("exists") and (
            info.get("start_type") not in SERVICE_START_TYPES or not isinstance(info.get("status"), str)
        ):
            raise AgentContractError(
                "agent contract: service.get must report the status and the start type "
                f"({', '.join(SERVICE_START_TYPES)}) of {name!r}, got status {info.get('status')!r}, "
                f"start_type {info.get('start_type')!r}"
            )
        records[str(name)] = info
    return records


def _service_status(state: HostState, name: str) -> tuple[bool, str, str]:
    info = state.services.get(name) or {}
    return bool(info.get("exists", bool(info))), str(info.get("status") or "Unknown"), str(info.get("start_type") or "")


def disrupted_sessions(state: HostState) -> list[dict[str, t.Any]]:
    return [
        session
        for session in state.sessions
        if session.get("id") not in (0, "0")
        and (
            session.get("state") in DISRUPTED_SESSION_STATES
            or (session.get("state") in USER_SESSION_STATES and session.get("user"))
        )
    ]


def _problem_text(problem: str, cert: StoredCertificate | None, threshold_days: int) -> str:
    days = cert.days_left if cert else None
    return {
        "missing": "is missing",
        "unparseable": f"cannot be read ({cert.parse_error if cert else ''})",
        "expired": f"expired {-(days or 0)} day(s) ago",
        "not_yet_valid": "is not valid yet",
        "wrong_eku": "lacks both the Server Authentication (1.3.6.1.5.5.7.3.1) and Remote Desktop Authentication EKUs",
        "no_private_key": "has no private key",
        "key_unreadable": "has a private key NETWORK SERVICE cannot read",
        "expiring": f"expires in {days} day(s), within the {threshold_days}-day threshold",
    }.get(problem, problem)


def plan(state: HostState, options: CertificateOptions) -> CertificatePlan:
    """Decide what to report and what to change. Raises PlanError when the user's request cannot be honoured.

    Every finding shows the listener's certificate as evidence, and carries a fix when this plan's actions repair it.
    """
    if state.read_errors:
        result = CertificatePlan()
        result.findings.append(
            _finding(
                "read_failed",
                "warning",
                "part of the host's state could not be read; nothing is changed while it is unknown",
                errors=list(state.read_errors),
            )
        )
        return result
    result = _decide(state, options)
    described = describe(state, options.expiry_threshold_days)
    evidence = {name: described.get(name) for name in EVIDENCE_FIELDS if name in described}
    repair = fix("certificate", {}, "; ".join(action.description for action in result.actions))
    for item in result.findings:
        item["evidence"] = {**evidence, **item["evidence"]}
        what = str(item["id"]).removeprefix("certificate.")
        repaired = (
            (result.regenerate and what in REGENERATION_TRIGGERS)
            or (result.remove_pin and what == "pinned_missing")
            or (
                result.set_pin is not None
                and what.startswith("pinned_")
                and (what != "pinned_renewal_available" or item.get("fix") is not None)
            )
        )
        if repaired and result.has_changes:
            item["fix"] = dict(repair)
    return result


def _decide(state: HostState, options: CertificateOptions) -> CertificatePlan:
    result = CertificatePlan()
    threshold = options.expiry_threshold_days
    findings = result.findings

    # --- the pinned certificate
    pin = pin_state(state, threshold)
    pinned_cert = state.find(state.pinned_thumbprint, (PERSONAL_STORE,))
    pin_in_use = pin is not None
    if pin is not None and pin != "ok":
        findings.append(
            _finding(
                f"pinned_{pin}",
                "warning",
                f"the pinned certificate {state.pinned_thumbprint} "
                f"{_problem_text(pin, pinned_cert, threshold)}"
                + (" (the listener falls back to the self-signed certificate)" if pin in PIN_FALLBACK_STATES else ""),
            )
        )

    # --- a renewal of the pinned certificate waiting, unpinned, in LocalMachine\My (auto-enrollment)
    renewal = find_renewal(state, pinned_cert) if pin in RENEWABLE_PIN_STATES else None
    grant: KeyGrant | None = None
    renewal_blockers: list[str] = []
    if renewal is not None:
        grant, renewal_blockers = renewal_access(renewal)
        findings.append(_renewal_finding(renewal, grant, renewal_blockers))

    replacement_needed = bool(options.replacement_thumbprint) and (
        (options.replace_when == "always" and state.pinned_thumbprint != options.replacement_thumbprint)
        or (options.replace_when == "unusable" and pin in PIN_PROBLEM_STATES | {"unparseable_pin"})
    )
    if replacement_needed and options.replacement_thumbprint:
        replacement = state.find(options.replacement_thumbprint, (PERSONAL_STORE,))
        problem = certificate_problem(replacement, threshold)
        if replacement is None or problem is not None:
            raise PlanError(
                f"replacement_thumbprint {options.replacement_thumbprint} cannot be used: the certificate "
                f"{_problem_text(problem or 'missing', replacement, threshold)} in LocalMachine\\My"
            )
        names = {name.lower() for name in [*(replacement.summary or {}).get("sans", [])]}
        if replacement.summary and replacement.summary.get("common_name"):
            names.add(str(replacement.summary["common_name"]).lower())
        host_names = {name.lower() for name in (state.hostname, state.fqdn) if name}
        if not names & host_names:
            findings.append(
                _finding(
                    "replacement_name_mismatch",
                    "warning",
                    f"the replacement certificate names {sorted(names)}, not {sorted(host_names)}: "
                    "clients will warn about the name",
                )
            )
        if state.connection_broker:
            findings.append(
                _finding(
                    "connection_broker_pin",
                    "warning",
                    "this host is an RD Connection Broker: the RD deployment's certificate settings may set the "
                    "listener's certificate again",
                )
            )
        result.set_pin = replacement
        pin_in_use = True
    elif renewal is not None and options.repin_renewal:
        if renewal_blockers:
            raise PlanError(
                f"repin_renewal: the renewal {renewal.label()} of the pinned certificate cannot be used: "
                + "; ".join(renewal_blockers)
            )
        result.set_pin = renewal
        result.grant_key_read = grant
        pin_in_use = True
    elif pin == "missing":
        if state.connection_broker:
            findings.append(
                _finding(
                    "connection_broker_pin",
                    "warning",
                    "this host is an RD Connection Broker: the pinned value is never removed there; import the "
                    "certificate into LocalMachine\\My or give replacement_thumbprint",
                )
            )
        elif options.remove_missing_pin:
            result.remove_pin = True
            pin_in_use = False
        else:
            findings.append(
                _finding("pin_kept", "info", "remove_missing_pin is false: the pinned value of a missing cert stays")
            )
    elif pin in PIN_FALLBACK_STATES:
        pin_in_use = False  # the listener falls back to the self-signed certificate
    if renewal is not None and result.set_pin is not None and result.set_pin is not renewal:
        # replacement_thumbprint wins: the renewal stays reported, and no fix is claimed for it.
        findings[[item["id"] for item in findings].index("certificate.pinned_renewal_available")]["fix"] = None

    # --- the self-signed certificate, when the listener uses it or falls back to it
    template_in_use = not pin_in_use and state.listener_hash_type == 2
    if template_in_use:
        template_cert = state.find(state.listener_thumbprint)
        problem = certificate_problem(template_cert, threshold)
        if problem:
            findings.append(
                _finding(
                    f"template_{problem}",
                    "warning",
                    f"the certificate from the Group Policy template {_problem_text(problem, template_cert, threshold)}"
                    "; it is renewed by autoenrollment (certutil -pulse), not by this module",
                )
            )
    if not pin_in_use and not template_in_use:
        _plan_self_signed(state, options, result)

    # --- restart: needed to make Windows create the self-signed certificate or re-read the removed pin
    if result.regenerate or result.remove_pin:
        _plan_restart(state, options, result)

    if not pin_in_use and not template_in_use and not result.regenerate:
        _suggest_available_certificate(state, threshold, findings)
    return result


def find_renewal(state: HostState, pinned: StoredCertificate | None) -> StoredCertificate | None:
    """The renewal of the pinned certificate in LocalMachine\\My: same subject, Server Authentication, valid now and
    longer than the pinned one; the one that expires last. Its key may still need NETWORK SERVICE's read."""
    if pinned is None or pinned.summary is None:
        return None
    found = [
        cert
        for cert in state.personal
        if cert.thumbprint != pinned.thumbprint
        and cert.summary is not None
        and cert.summary["subject"] == pinned.summary["subject"]
        and cert.summary["server_auth"]
        and not cert.summary["expired"]
        and not cert.summary["not_yet_valid"]
        and str(cert.summary["not_after"]) > str(pinned.summary["not_after"])
    ]
    return max(found, key=lambda cert: str((cert.summary or {}).get("not_after")), default=None)


def renewal_access(cert: StoredCertificate) -> tuple[KeyGrant | None, list[str]]:
    """What it takes for the listener to read the renewal's key: a grant of NETWORK SERVICE read on its key file
    (or nothing), and what no grant can solve."""
    key = cert.key or {}
    path, sddl = str(key.get("path") or ""), key.get("sddl")
    state = cert.key_state
    if state == "readable":
        return None, []
    if state == "missing":
        return None, ["it has no private key on this host: import it with its private key (PFX)"]
    if state in ("unknown", "inaccessible") or not path or not sddl:
        return None, [f"the ACL of its private key file {path or '(not found)'} could not be read"]
    descriptor = _sddl.parse(str(sddl))
    needed = [_sddl.Requirement(_sddl.SID_NETWORK_SERVICE, _sddl.FILE_GENERIC_READ)]
    if _sddl.blocking_denies(descriptor, needed):
        return None, [f"a deny entry in the ACL of its private key file {path} keeps NETWORK SERVICE out"]
    granted = _sddl.with_entries(descriptor, needed)
    return KeyGrant(cert, path, str(sddl), granted.to_sddl()), []


def _renewal_finding(cert: StoredCertificate, grant: KeyGrant | None, blockers: list[str]) -> dict[str, t.Any]:
    blocked_by = ([f"NETWORK SERVICE cannot read its private key file {grant.path}"] if grant else []) + blockers
    title = (
        f"LocalMachine\\My holds {cert.label()}, the renewal of the pinned certificate (same subject, Server "
        "Authentication, valid longer), but it is not pinned"
    )
    title += f"; what blocks using it: {'; '.join(blocked_by)}" if blocked_by else "; nothing blocks using it"
    item = _finding("pinned_renewal_available", "warning", title)
    item["evidence"] = {
        "renewal": {
            "thumbprint": cert.thumbprint,
            "subject": (cert.summary or {}).get("subject"),
            "not_after": (cert.summary or {}).get("not_after"),
            "days_left": cert.days_left,
            "key_state": cert.key_state,
            "key_path": (cert.key or {}).get("path"),
            "key_sddl": (cert.key or {}).get("sddl"),
        },
        "blocked_by": blocked_by,
    }
    if not blockers:
        description = f"pin {cert.thumbprint}"
        if grant is not None:
            description = f"give NETWORK SERVICE read on {grant.path} (that file only, saved first), then {description}"
        item["fix"] = fix("certificate", {"repin_renewal": True}, description)
    return item


def _plan_self_signed(state: HostState, options: CertificateOptions, result: CertificatePlan) -> None:
    threshold = options.expiry_threshold_days
    current = current_self_signed(state)
    problem = certificate_problem(current, threshold)
    if problem in (None, "wrong_eku"):
        return  # Windows' own certificate always carries Server Authentication; nothing to regenerate
    if problem == "not_yet_valid":
        result.findings.append(
            _finding(
                "self_signed_not_yet_valid",
                "critical",
                f"the self-signed certificate {current.label() if current else ''} is not valid yet: check the clock",
            )
        )
        return
    if problem == "key_unreadable":
        result.findings.append(
            _finding(
                "self_signed_key_unreadable",
                "critical",
                f"the self-signed certificate {current.label() if current else ''} has a private key NETWORK SERVICE "
                "cannot read; Windows does not replace a valid certificate for that, repair the key's permissions "
                "(rdpfix.rdp.machinekeys)",
            )
        )
        return
    result.findings.append(
        _finding(
            f"self_signed_{problem}",
            "warning" if problem == "expiring" else "critical",
            f"the self-signed certificate {current.label() + ' ' if current else ''}"
            f"{_problem_text(problem, current, threshold)}",
        )
    )
    if not options.regenerate_self_signed:
        result.findings.append(_finding("regeneration_disabled", "info", "regenerate_self_signed is false"))
        return
    blockers: list[str] = []
    for name in dict.fromkeys((*PREREQUISITE_SERVICES, options.restart_service)):
        exists, status, start_type = _service_status(state, name)
        if exists and start_type == "Disabled" and name == options.restart_service:
            # Running or not: a restart stops it and a disabled service cannot start again.
            blockers.append(f"{name} is disabled (a restart would stop it for good)")
            continue
        if exists and status == "Running":
            continue
        if not exists:
            blockers.append(f"{name} does not exist")
        elif start_type == "Disabled":
            blockers.append(f"{name} is disabled")
        elif name == options.restart_service:
            continue  # restarting a stopped service starts it: that is the requested operation
        elif options.start_stopped_services:
            result.start_services.append(name)
        else:
            blockers.append(f"{name} is {status} (set start_stopped_services to start it)")
    if blockers:
        result.start_services.clear()
        result.findings.append(
            _finding(
                "regeneration_blocked",
                # As urgent as the problem the regeneration was for: an expiring certificate still works today.
                "warning" if problem == "expiring" else "critical",
                "Windows cannot create a new self-signed certificate: " + "; ".join(blockers),
            )
        )
        return
    # Bad certificates are removed so Windows creates a new one; the store's valid certificates stay.
    result.remove_certificates = [
        cert
        for cert in state.self_signed
        if certificate_problem(cert, threshold) in ("unparseable", "expired", "expiring", "no_private_key")
    ]
    result.regenerate = True


def _plan_restart(state: HostState, options: CertificateOptions, result: CertificatePlan) -> None:
    service = options.restart_service
    exists, _status, start_type = _service_status(state, service)
    if exists and start_type == "Disabled":
        # Reached for a pin removal (a regeneration is blocked before): the restart would stop the service for good.
        result.findings.append(
            _finding(
                "regeneration_blocked",
                "critical",
                f"{service} is disabled: restarting it would stop it and it could not start again, so the listener "
                "cannot be made to re-read its certificate; nothing was changed (enable it, or choose another "
                "restart_service)",
            )
        )
        result.remove_certificates = []
        result.remove_pin = False
        result.start_services = []
        result.regenerate = False
        result.restart_service = None
        return
    sessions = disrupted_sessions(state) if service == "TermService" else []
    result.restart_service = service
    if sessions and not options.allow_session_disruption:
        users = ", ".join(f"{session.get('user') or '?'} ({session.get('state')})" for session in sessions)
        # A replacement pin needs no restart and still goes ahead; everything else waits for the restart.
        result.pending = [action for action in result.actions if action.id != "set_pin"]
        result.restart_pending = True
        result.findings.append(
            _finding(
                "restart_pending",
                "warning",
                f"restarting TermService would disconnect {len(sessions)} RDP session(s): {users}. Nothing was "
                "changed; set allow_session_disruption to proceed, or use restart_service=SessionEnv, which keeps "
                "sessions",
            )
        )
        result.remove_certificates = []
        result.remove_pin = False
        result.start_services = []
        result.regenerate = False
        result.restart_service = None


def _suggest_available_certificate(state: HostState, threshold: int, findings: list[dict[str, t.Any]]) -> None:
    host_names = {name.lower() for name in (state.hostname, state.fqdn) if name}
    for cert in state.personal:
        if certificate_problem(cert, threshold) is not None or not cert.summary or cert.summary["self_signed"]:
            continue
        names = {str(name).lower() for name in cert.summary["sans"]} | {str(cert.summary["common_name"]).lower()}
        if names & host_names:
            findings.append(
                _finding(
                    "ca_certificate_available",
                    "info",
                    f"LocalMachine\\My holds {cert.label()}, issued by {cert.summary['issuer']}, usable by the "
                    "listener: set replacement_thumbprint and replace_when=always to use it",
                )
            )
            return


# ---------------------------------------------------------------------------------------------------- apply


@dataclass(frozen=True)
class ApplyIndex:
    manifest: int  # the last backup operation: a failure up to here means nothing was changed
    actions: list[tuple[int, Action]]
    verify: VerifyIndex
    guards: list[int] = field(default_factory=list)  # checked before the first write (_guards)


def save_certificate(batch: Batch, backup: BackupSet, cert: StoredCertificate) -> int:
    """Back up a certificate's DER (``<thumbprint>.cer``) with the store it came from; its key file is separate."""
    return backup.save_content(
        batch,
        f"{cert.thumbprint}.cer",
        cert.der,
        "certificate",
        store=cert.store,
        thumbprint=cert.thumbprint,
        has_private_key=cert.has_private_key,
    )


def write_guards(state: HostState, options: CertificateOptions, result: CertificatePlan) -> list[_guards.Guard]:
    """What the plan relied on that can change before its apply batch runs, checked by the batch's first operations
    (docs/agent-protocol.md, "Guards"): no user logged on since the read when it restarts TermService without
    allow_session_disruption; every certificate it removes, or whose key it re-ACLs, still there with the same key
    file record (path, size, owner, ACL); the listener still bound to the certificate it saw, and the pin as it read
    it; the services a restart and Windows' regeneration need, as they were (one stopped since would make the
    regeneration impossible after the certificate is gone)."""
    guards: list[_guards.Guard] = []
    restarts = {action.details["service"] for action in result.actions if action.id == "restart_service"}
    if "TermService" in restarts and not options.allow_session_disruption:
        guards.append(_guards.sessions_unchanged(state.sessions))
    touched = list(result.remove_certificates)
    if result.grant_key_read is not None:
        touched.append(result.grant_key_read.cert)
    for cert in touched:
        guards.append(_guards.certificate_unchanged(cert.store, {"thumbprint": cert.thumbprint, "key": cert.key}))
    if result.remove_certificates or result.remove_pin or result.set_pin is not None:
        guards.append(_guards.listener_binding(state.listener_thumbprint, options.terminal_name))
    if (result.remove_pin or result.set_pin is not None) and state.pinned_value is not None:
        guards.append(
            _guards.registry_values(options.winstation_key, [PIN_VALUE_NAME], {PIN_VALUE_NAME: state.pinned_value})
        )
    if result.regenerate or restarts or result.start_services:
        names = dict.fromkeys((*PREREQUISITE_SERVICES, *restarts, *result.start_services))
        services = {name: state.services[name] for name in names if name in state.services}
        if services:
            guards.append(_guards.services_unchanged(services))
    return guards


def build_apply_batch(
    state: HostState,
    options: CertificateOptions,
    result: CertificatePlan,
    backup: BackupSet,
    extra_guards: t.Sequence[_guards.Guard] = (),
) -> tuple[Batch, ApplyIndex]:
    """Guards, backup, manifest, changes, restart, settle, re-read: one ``on_error: stop`` batch (one round trip).
    ``extra_guards``: what a calling planner relied on besides (machinekeys: the key file it moves aside)."""
    batch = Batch(on_error="stop")
    guarded = _guards.add_guards(batch, [*extra_guards, *write_guards(state, options, result)])
    backup.planned_actions = [action.description for action in result.actions]
    backup.begin(batch)
    # The item each change carries out (docs/agent-protocol.md, "Backups and manifests": status per item).
    carries: dict[str, int] = {}
    for cert in result.remove_certificates:
        save_certificate(batch, backup, cert)
        carries[f"remove_certificate:{cert.thumbprint}"] = backup.last_item
        key_path = (cert.key or {}).get("path")
        if cert.key_state in ("readable", "unreadable", "inaccessible", "unknown") and key_path:
            # With its ACL and owner, as read: a restore puts the key file back as it was (a copy gets a new ACL).
            backup.save_file_copy(
                batch,
                str(key_path),
                f"{cert.thumbprint}.key",
                "private_key_file",
                thumbprint=cert.thumbprint,
                sddl=(cert.key or {}).get("sddl"),
                owner=(cert.key or {}).get("owner"),
            )
    if result.grant_key_read is not None:
        grant = result.grant_key_read
        # The key file itself is saved with its ACL and owner: rdpfix.rdp.restore puts both back.
        backup.save_file_copy(
            batch,
            grant.path,
            f"{grant.cert.thumbprint}.key",
            "private_key_file",
            thumbprint=grant.cert.thumbprint,
            sddl=grant.previous_sddl,
            owner=(grant.cert.key or {}).get("owner"),
        )
        carries["grant_key_read"] = backup.last_item
    if result.remove_pin or result.set_pin is not None:
        pin = backup.record(
            "registry_value",
            path=options.winstation_key,
            name=PIN_VALUE_NAME,
            previous=state.pinned_value,  # None: the value did not exist
        )
        carries["remove_pin"] = carries["set_pin"] = pin
    manifest = backup.finish(batch)

    positions: list[tuple[int, Action]] = []
    for action in result.actions:
        if action.id == "start_service":
            positions.append((batch.add("service.start", name=action.details["service"]), action))
        elif action.id == "remove_certificate":
            index = batch.add("cert.remove", store=action.details["store"], thumbprint=action.details["thumbprint"])
            # A certificate already gone (another run removed it) stops the batch before the restart.
            batch.require(index, {"removed": True})
            positions.append((index, action))
        elif action.id == "remove_pin":
            positions.append((batch.add("registry.remove", path=options.winstation_key, name=PIN_VALUE_NAME), action))
        elif action.id == "grant_key_read":
            positions.append((batch.add("acl.set", path=action.details["path"], sddl=action.details["sddl"]), action))
        elif action.id == "set_pin":
            index = batch.add(
                "listener.set_certificate", thumbprint=action.details["thumbprint"], terminal_name=options.terminal_name
            )
            positions.append((index, action))
        elif action.id == "restart_service":
            # TermService has dependents (UmRdpService): they are restarted with it.
            service = action.details["service"]
            index = batch.add("service.restart", name=service, force=service == "TermService")
            positions.append((index, action))
        key = f"{action.id}:{action.details.get('thumbprint')}" if action.id == "remove_certificate" else action.id
        if key in carries:
            backup.carry(carries[key], positions[-1][0])
    # The done-record after the last change (the restart included): every carried-out item done.
    backup.finish_done(batch)
    if result.restart_service:
        batch.add("util.sleep", milliseconds=SETTLE_MS)
    verify = add_verify_reads(batch, options, personal=result.grant_key_read is not None)
    return batch, ApplyIndex(manifest=manifest, actions=positions, verify=verify, guards=guarded)


def build_poll_batch(options: CertificateOptions, personal: bool = False) -> tuple[Batch, VerifyIndex]:
    batch = Batch(on_error="continue")
    batch.add("util.sleep", milliseconds=POLL_MS)
    return batch, add_verify_reads(batch, options, personal)


def verification_problems(
    before: HostState, after: HostState, options: CertificateOptions, done: CertificatePlan
) -> list[str]:
    """What the re-read state does not show yet; empty when the plan's effect is visible."""
    problems: list[str] = []
    if done.remove_pin and after.pinned_thumbprint:
        problems.append(f"the registry still pins {after.pinned_thumbprint}")
    if done.set_pin is not None and after.pinned_thumbprint != done.set_pin.thumbprint:
        problems.append(f"the listener does not use {done.set_pin.thumbprint} (it pins {after.pinned_thumbprint})")
    if done.grant_key_read is not None:
        thumbprint = done.grant_key_read.cert.thumbprint
        granted = after.find(thumbprint, (PERSONAL_STORE,))
        if granted is None or granted.key_state != "readable":
            problems.append(f"NETWORK SERVICE still cannot read the private key of {thumbprint}")
    if done.regenerate:
        removed = {cert.thumbprint for cert in done.remove_certificates}
        fresh = [
            cert
            for cert in after.self_signed
            if cert.thumbprint not in removed
            and cert.summary is not None
            and not cert.summary["expired"]
            and cert.key_state != "missing"
        ]
        # With a pin the listener falls back from (missing, expired, ...), WMI goes on reporting the pinned hash: the
        # new self-signed certificate is then what the listener presents, but not what WMI names.
        pin_reported = bool(after.pinned_thumbprint) and after.listener_thumbprint == after.pinned_thumbprint
        if not fresh:
            problems.append("no new self-signed certificate in LocalMachine\\Remote Desktop yet")
        elif not pin_reported and after.listener_thumbprint not in {cert.thumbprint for cert in fresh}:
            problems.append(
                f"the listener reports {after.listener_thumbprint}, not the new self-signed certificate "
                f"{fresh[0].thumbprint}"
            )
    return problems


def predicted_view(state: HostState, options: CertificateOptions, result: CertificatePlan) -> dict[str, t.Any]:
    """The --diff ``after`` of a check-mode run, or of a run whose restart is pending."""
    view = diff_view(state, options.expiry_threshold_days)
    if result.remove_pin:
        view["pinned_thumbprint"] = None
    if result.set_pin is not None:
        cert = result.set_pin
        view.update(
            source="pinned",
            thumbprint=cert.thumbprint,
            subject=cert.summary["subject"] if cert.summary else None,
            not_after=cert.summary["not_after"] if cert.summary else None,
            pinned_thumbprint=cert.thumbprint,
        )
    if result.regenerate:
        removed = {cert.thumbprint for cert in result.remove_certificates}
        view["self_signed_store"] = [
            *(cert.label() for cert in state.self_signed if cert.thumbprint not in removed),
            "(new self-signed certificate created by Windows)",
        ]
        if result.set_pin is None:
            view.update(source="self_signed", thumbprint="(new self-signed certificate)", subject=None, not_after=None)
    return view
