# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Planner of rdpfix.rdp.machinekeys: is the key store and the RDP listener's private key usable, and how to repair it.

Pure functions and data, like the certificate planner it builds on: the read batch, the state parsed from its results,
the findings and the plan, the apply batch, and the plan that puts a previous run back (``state: restored``).

Windows behaviour relied upon (sources in docs/modules/machinekeys.md):
- CAPI machine keys live in %ProgramData%\\Microsoft\\Crypto\\RSA\\MachineKeys, CNG keys in ...\\Crypto\\Keys. The
  self-signed RDP certificate's key is the container TSSecKeySet1, file f686aace6942fb7f7ceb231212eef4a4_<MachineGuid>.
- Default folder ACL (Server 2012 R2..2025): O:SYG:SYD:PAI(A;;0x12019f;;;WD)(A;;FA;;;BA). The folder ACL has no
  inheritable entries: every key file carries its own, explicit ACL.
- The RDP key file: owner SYSTEM, SYSTEM full control, NETWORK SERVICE read (TermService runs as NETWORK SERVICE), plus
  Administrators read up to build 14393 or NT SERVICE\\SessionEnv full control from build 17763.
- An unreadable key makes TermService fail to build its TLS credential: Schannel 36870 and RCM 1057/1058, and the
  client sees 0x904 / extended 0x7. Windows does not replace a valid certificate whose key is unreadable.
- A recursive grant on the folder gives NETWORK SERVICE every machine key on the server (IIS, SQL, VPN...): the
  repair only ever touches the RDP key file's own ACL and the folder's.
"""

from __future__ import annotations

import base64
import binascii
import json
import ntpath
import typing as t
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from . import _certificate as certificate
from . import _findings as findings
from . import _guards
from . import _sddl as sd
from ._action import BackupSet
from ._agent import Batch, BatchResult

STRATEGIES = ("permissions", "regenerate", "rename_store")
DEFAULT_PROGRAM_DATA = "C:\\ProgramData"
MACHINE_KEYS_SUBPATH = "Microsoft\\Crypto\\RSA\\MachineKeys"
CNG_KEYS_SUBPATH = "Microsoft\\Crypto\\Keys"
RDP_KEY_PREFIX = "f686aace6942fb7f7ceb231212eef4a4_"
DEFAULT_FOLDER_SDDL = "O:SYG:SYD:PAI(A;;0x12019f;;;WD)(A;;FA;;;BA)"
# The first build that gives NT SERVICE\SessionEnv full control instead of Administrators read [Repair]. Builds
# between 14393 and 17763 (semi-annual releases) are not documented: they are treated like 14393 (UNCONFIRMED).
SESSIONENV_KEY_ACL_BUILD = 17763

# Events that show a key access failure of the listener [AzEvent], as ``events.query`` queries of the System log.
EVENT_QUERIES: tuple[dict[str, t.Any], ...] = (
    {"log": "System", "providers": ["Schannel"], "ids": [36870]},
    {
        "log": "System",
        "providers": ["Microsoft-Windows-TerminalServices-RemoteConnectionManager"],
        "ids": [1055, 1057, 1058],
    },
)
EVENT_MAX = 20
# The events are evidence only; key errors older than this say nothing about the key as it is now.
EVENT_DAYS = 30
MANIFEST_FILE = "manifest.json"
RESTORED_MARKER = "restored.json"
# The manifest versions state=restored reads (version 2: per-item status, _action.BackupSet).
MANIFEST_VERSIONS = (1, 2)


# The ACL a restored key file has while certutil -repairstore re-links it; its recorded ACL replaces it right after.
RELINK_KEY_SDDL = "O:SYG:SYD:P(A;;FA;;;SY)(A;;FA;;;BA)"


class PlanError(ValueError):
    """The request cannot be honoured safely; nothing has been touched."""


# ---------------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    strategy: str = "permissions"
    state: str = "present"
    manifest_id: str | None = None
    restart_service: str = "SessionEnv"
    allow_session_disruption: bool = False
    start_stopped_services: bool = False

    @classmethod
    def from_params(cls, params: dict[str, t.Any]) -> Options:
        state = str(params.get("state") or "present")
        manifest_id = params.get("manifest_id")
        if state == "restored":
            if not manifest_id:
                raise PlanError("state=restored needs manifest_id (the backup.manifest_id of the run to undo)")
            text = str(manifest_id)
            # A manifest id becomes a folder name on the host: refuse anything that could leave the backup folder.
            if not text or any(char in text for char in '\\/:*?"<>|') or text in (".", "..") or len(text) > 120:
                raise PlanError(f"manifest_id {text!r} is not a manifest id such as 20261125T103000Z-machinekeys-1a2b")
        elif manifest_id:
            raise PlanError("manifest_id is only used with state=restored")
        return cls(
            strategy=str(params.get("strategy") or "permissions"),
            state=state,
            manifest_id=str(manifest_id) if manifest_id else None,
            restart_service=str(params.get("restart_service") or "SessionEnv"),
            allow_session_disruption=bool(params.get("allow_session_disruption", False)),
            start_stopped_services=bool(params.get("start_stopped_services", False)),
        )

    def certificate_options(self) -> certificate.CertificateOptions:
        """The certificate planner's options for a regeneration: only the self-signed certificate is considered.

        The threshold of 0 days and ``remove_missing_pin=False`` keep this module from doing the certificate module's
        work (renewing expiring certificates, unpinning): it regenerates only because of the key.
        """
        return certificate.CertificateOptions(
            expiry_threshold_days=0,
            regenerate_self_signed=True,
            remove_missing_pin=False,
            restart_service=self.restart_service,
            start_stopped_services=self.start_stopped_services,
            allow_session_disruption=self.allow_session_disruption,
        )


# ---------------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class StoredFile:
    """A file or folder as ``dir.stat`` reports it; ``sddl`` is None when its ACL could not be read."""

    path: str
    name: str
    is_dir: bool
    size: int | None
    owner: str | None
    sddl: str | None

    def view(self) -> dict[str, t.Any]:
        return {"path": self.path, "size": self.size, "owner": self.owner, "sddl": self.sddl}


@dataclass(frozen=True)
class Folder:
    path: str
    exists: bool
    owner: str | None = None
    sddl: str | None = None
    entries: tuple[StoredFile, ...] = ()

    def find(self, name: str) -> StoredFile | None:
        wanted = name.casefold()
        return next((entry for entry in self.entries if entry.name.casefold() == wanted), None)

    def contains(self, path: str) -> bool:
        return ntpath.dirname(path).casefold() == self.path.casefold()


def machine_keys_path(program_data: str | None) -> str:
    return ntpath.join(program_data or DEFAULT_PROGRAM_DATA, MACHINE_KEYS_SUBPATH)


def cng_keys_path(program_data: str | None) -> str:
    return ntpath.join(program_data or DEFAULT_PROGRAM_DATA, CNG_KEYS_SUBPATH)


@dataclass(frozen=True)
class State:
    cert: certificate.HostState
    os_build: int | None
    machine_guid: str | None
    program_data: str
    store: Folder
    cng_store: Folder
    events: tuple[dict[str, t.Any], ...]
    read_errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReadIndex:
    cert: certificate.ReadIndex
    cert_count: int
    store: int
    cng_store: int
    events: int


def build_read_batch(
    options: Options, now: datetime, program_data: str = DEFAULT_PROGRAM_DATA, wait_ms: int = 0
) -> tuple[Batch, ReadIndex]:
    """The certificate module's read batch plus both key folders and the key access events: one round trip.

    The folders are read at ``program_data`` before ``system.info`` has said where ProgramData is; on the rare host
    where it is elsewhere the action reads again with the right path.
    """
    batch, cert_index = certificate.build_read_batch(options.certificate_options(), wait_ms)
    cert_count = len(batch.ops)
    store = batch.add("dir.stat", path=machine_keys_path(program_data))
    cng_store = batch.add("dir.stat", path=cng_keys_path(program_data))
    since = (now - timedelta(days=EVENT_DAYS)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    events = batch.add("events.query", since=since, queries=list(EVENT_QUERIES), max_events=EVENT_MAX)
    return batch, ReadIndex(cert_index, cert_count, store, cng_store, events)


def _folder(path: str, data: dict[str, t.Any]) -> Folder:
    if not data.get("exists"):
        return Folder(path=path, exists=False)
    entries = []
    for item in data.get("entries") or []:
        if not isinstance(item, dict) or not item.get("name"):
            continue
        name = str(item["name"])
        size = item.get("size")
        entries.append(
            StoredFile(
                path=ntpath.join(path, name),
                name=name,
                is_dir=bool(item.get("is_dir")),
                size=int(size) if isinstance(size, int) else None,
                owner=item.get("owner"),
                sddl=item.get("sddl") or None,
            )
        )
    return Folder(path, True, data.get("owner"), data.get("sddl") or None, tuple(entries))


def folder_from_result(result: BatchResult, position: int, path: str) -> Folder:
    item = result[position]
    return _folder(path, item.data if item.ok else {})


def parse_state(result: BatchResult, index: ReadIndex, now: datetime, program_data: str) -> State:
    # The certificate planner judges only its own reads: a failed event query must not stop its decisions.
    cert_result = BatchResult(result.host, result.results[: index.cert_count])
    cert_state = certificate.parse_state(cert_result, index.cert, now)
    system = result[index.cert.system].data if result[index.cert.system].ok else {}
    errors = list(cert_state.read_errors)
    for position in (index.store, index.cng_store):
        item = result[position]
        if not item.ok:
            errors.append(f"{item.op}: {item.error_type or 'Failed'}: {item.error_message or ''}")
    # Events are evidence only: an unreadable log costs the evidence, not the repair.
    logged = result[index.events]
    events = [event for event in (logged.data if logged.ok else {}).get("events") or [] if isinstance(event, dict)]
    build = system.get("os_build")
    return State(
        cert=cert_state,
        os_build=int(build) if isinstance(build, int) else None,
        machine_guid=system.get("machine_guid"),
        program_data=program_data,
        store=folder_from_result(result, index.store, machine_keys_path(program_data)),
        cng_store=folder_from_result(result, index.cng_store, cng_keys_path(program_data)),
        events=tuple(sorted(events, key=lambda event: str(event.get("time") or ""), reverse=True)),
        read_errors=tuple(errors),
    )


# ---------------------------------------------------------------------------------------------------- assessment


def expected_key_requirements(os_build: int | None) -> list[sd.Requirement]:
    """The entries the RDP key file must hold on this build [Repair]."""
    required = [
        sd.Requirement(sd.SID_SYSTEM, sd.FILE_ALL_ACCESS),
        sd.Requirement(sd.SID_NETWORK_SERVICE, sd.FILE_GENERIC_READ),
    ]
    if os_build is not None and os_build >= SESSIONENV_KEY_ACL_BUILD:
        required.append(sd.Requirement(sd.SID_SESSIONENV, sd.FILE_ALL_ACCESS))
    else:
        required.append(sd.Requirement(sd.SID_ADMINISTRATORS, sd.FILE_GENERIC_READ))
    return required


@dataclass(frozen=True)
class RdpKey:
    """The private key file behind one of the listener's certificates, and what is wrong with it."""

    role: str  # self_signed | pinned | template
    cert: certificate.StoredCertificate
    path: str | None
    provider: str  # capi | cng | unknown
    exists: bool
    size: int | None
    owner: str | None
    sddl: str | None
    # missing | inaccessible | empty | acl_unreadable | acl_invalid | not_readable | entries | owner
    problems: tuple[str, ...]
    missing: tuple[sd.Requirement, ...] = ()

    @property
    def broken(self) -> bool:
        """TermService cannot use it: the listener fails (or falls back) now."""
        return bool({"missing", "empty", "acl_invalid", "not_readable"} & set(self.problems))

    @property
    def undetermined(self) -> bool:
        """The key exists, but the account rdpfix runs as could not read its ACL (``acl_unreadable``: without
        SeBackupPrivilege) or find its file (``inaccessible``: a CNG key its provider refused to open). Whether
        TermService can use it is unknown, so nothing is changed for it: a healthy key is never regenerated."""
        return bool({"acl_unreadable", "inaccessible"} & set(self.problems)) and not self.broken

    @property
    def acl_repairable(self) -> bool:
        return self.exists and not {"missing", "inaccessible", "empty", "acl_unreadable", "acl_invalid"} & set(
            self.problems
        )

    def view(self) -> dict[str, t.Any]:
        return {
            "role": self.role,
            "thumbprint": self.cert.thumbprint,
            "path": self.path,
            "provider": self.provider,
            "exists": self.exists,
            "size": self.size,
            "owner": self.owner,
            "sddl": self.sddl,
            "problems": list(self.problems),
        }


def _key_file(
    state: State, cert: certificate.StoredCertificate, role: str
) -> tuple[str | None, str, StoredFile | None]:
    key = cert.key or {}
    path = key.get("path") or None
    provider = str(key.get("provider_kind") or "unknown")
    if not path and role == "self_signed" and state.machine_guid:
        # The agent could not open the key (that is often the fault itself): the self-signed certificate's container
        # is always TSSecKeySet1, whose file name is fixed [Repair].
        path = ntpath.join(state.store.path, RDP_KEY_PREFIX + str(state.machine_guid))
        provider = "capi"
    if not path:
        return None, provider, None
    for folder in (state.store, state.cng_store):
        if folder.contains(str(path)):
            return str(path), provider, folder.find(ntpath.basename(str(path)))
    return str(path), provider, None


def assess_key(state: State, cert: certificate.StoredCertificate, role: str) -> RdpKey:
    path, provider, listed = _key_file(state, cert, role)
    key = cert.key or {}
    if listed is not None:
        exists, size, owner, acl = True, listed.size, listed.owner, listed.sddl
    elif path and ntpath.dirname(path).casefold() in (state.store.path.casefold(), state.cng_store.path.casefold()):
        exists, size, owner, acl = False, None, None, None
    else:
        exists = bool(key.get("exists")) if key else False
        size = key.get("size") if isinstance(key.get("size"), int) else None
        owner, acl = key.get("owner"), key.get("sddl") or None
    problems: list[str] = []
    missing: list[sd.Requirement] = []
    if (
        not exists
        and listed is None
        and path is None
        and key.get("exists") is None
        and key.get("open_error")
        not in (
            None,
            "NotFound",
        )
    ):
        # The provider refused to open the key (a CNG key whose ACL leaves the caller out) and its file was not found
        # by name: it exists, it is not missing; re-importing a PFX is not the answer.
        problems.append("inaccessible")
    elif not exists:
        problems.append("missing")
    elif size == 0:
        problems.append("empty")
    if exists and acl is None:
        problems.append("acl_unreadable")
    elif exists and acl is not None:
        try:
            descriptor = sd.parse(acl)
        except sd.SddlError:
            problems.append("acl_invalid")
        else:
            if not sd.can_read(descriptor, sd.NETWORK_SERVICE_IDENTITIES):
                problems.append("not_readable")
            if role == "self_signed":
                missing = sd.missing_entries(descriptor, expected_key_requirements(state.os_build))
                if missing:
                    problems.append("entries")
                if descriptor.owner != sd.SID_SYSTEM:
                    problems.append("owner")
            # A pinned or template certificate's key belongs to its owner (IIS, an auto-enrolled template...): the
            # listener needs NETWORK SERVICE's read on it [Listener] and nothing else, so nothing else is asked of it.
    return RdpKey(role, cert, path, provider, exists, size, owner, acl, tuple(problems), tuple(missing))


def rdp_keys(state: State) -> list[RdpKey]:
    """The keys behind the listener's certificates: the self-signed one it uses or falls back to, and a pinned one."""
    found: list[RdpKey] = []
    # A usable pin means the self-signed certificate is not used at all: its key is then none of our business.
    source, used = certificate.listener_certificate(state.cert, 0)
    if source == "self_signed" and used is not None and used.has_private_key:
        found.append(assess_key(state, used, "self_signed"))
    elif source == "gpo_template" and used is not None and used.has_private_key:
        found.append(assess_key(state, used, "template"))
    pinned = state.cert.find(state.cert.pinned_thumbprint, (certificate.PERSONAL_STORE,))
    if pinned is not None and pinned.has_private_key:
        found.append(assess_key(state, pinned, "pinned"))
    return found


# ---------------------------------------------------------------------------------------------------- plan


def finding(
    finding_id: str,
    severity: str,
    title: str,
    evidence: dict[str, t.Any],
    fix: dict[str, t.Any] | None,
) -> dict[str, t.Any]:
    """A finding of this planner: its id under ``machinekeys.``, its cause family ``machinekeys``."""
    return findings.finding(f"machinekeys.{finding_id}", severity, title, "machinekeys", evidence, fix)


def _fix(strategy: str, description: str) -> dict[str, t.Any]:
    return findings.fix("machinekeys", {"strategy": strategy}, description)


@dataclass(frozen=True)
class AclChange:
    path: str
    previous: str | None
    sddl: str
    reason: str


@dataclass(frozen=True)
class Regeneration:
    """Move the broken self-signed key aside and let Windows create a new certificate (certificate planner)."""

    key: RdpKey
    cert_state: certificate.HostState
    cert_plan: certificate.CertificatePlan


@dataclass(frozen=True)
class StoreRename:
    """Keep the old store whole in the backup, create a fresh one, carry every key over but a broken RDP key."""

    path: str
    previous_sddl: str | None
    carried: tuple[StoredFile, ...]
    left_behind: tuple[str, ...]


@dataclass
class Plan:
    findings: list[dict[str, t.Any]] = field(default_factory=list)
    acl_changes: list[AclChange] = field(default_factory=list)
    create_store: bool = False
    regeneration: Regeneration | None = None
    rename: StoreRename | None = None
    unfixable: list[str] = field(default_factory=list)
    restart_pending: bool = False

    @property
    def has_changes(self) -> bool:
        return bool(self.acl_changes or self.create_store or self.regeneration or self.rename)

    def actions(self) -> list[dict[str, t.Any]]:
        """What the apply batch does, in order, for the result and the manifest."""
        ordered: list[dict[str, t.Any]] = []
        if self.rename is not None:
            ordered.append(
                {
                    "action": "rename_store",
                    "path": self.rename.path,
                    "description": f"move {self.rename.path} whole into the backup, create a fresh folder with the "
                    f"default ACL and carry {len(self.rename.carried)} key file(s) over (ACLs kept)",
                    "left_behind": list(self.rename.left_behind),
                }
            )
        if self.create_store:
            ordered.append({"action": "create_store", "description": "create the missing MachineKeys folder"})
        ordered += [
            {"action": "set_acl", "path": change.path, "sddl": change.sddl, "description": change.reason}
            for change in self.acl_changes
        ]
        if self.regeneration is not None:
            key = self.regeneration.key
            if self.rename is None:
                ordered.append(
                    {
                        "action": "move_key",
                        "path": key.path,
                        "description": f"move the RDP key file {key.path} into the backup",
                    }
                )
            ordered += [
                action.to_dict("planned") | {"action": action.id} for action in self.regeneration.cert_plan.actions
            ]
        return ordered


def _folder_findings(state: State, options: Options, result: Plan) -> None:
    store = state.store
    if not store.exists:
        result.findings.append(
            finding(
                "store_missing",
                "critical",
                f"The MachineKeys folder {store.path} does not exist: no machine key can be used or created",
                {"path": store.path},
                _fix(options.strategy, "create the folder with the default ACL"),
            )
        )
        result.create_store = True
        return
    expected = sd.parse(DEFAULT_FOLDER_SDDL)
    actual: sd.SecurityDescriptor | None = None
    if store.sddl is not None:
        try:
            actual = sd.parse(store.sddl)
        except sd.SddlError:
            actual = None
    if actual is not None and sd.equivalent(actual, expected):
        return
    evidence: dict[str, t.Any] = {"path": store.path, "sddl": store.sddl, "expected_sddl": DEFAULT_FOLDER_SDDL}
    if actual is not None:
        evidence["differences"] = sd.differences(actual, expected)
    result.findings.append(
        finding(
            "folder_acl",
            "warning",
            "The MachineKeys folder ACL differs from the Windows default: Windows may fail to create or open "
            "machine keys, including a new RDP key",
            evidence,
            _fix(options.strategy, "restore the folder's default ACL (the folder only: no key file inherits from it)"),
        )
    )
    if options.strategy != "rename_store":
        result.acl_changes.append(
            AclChange(store.path, store.sddl, DEFAULT_FOLDER_SDDL, f"restore the default ACL of {store.path}")
        )


_KEY_TITLES = {
    "missing": "The private key file of the {role} RDP certificate {thumb} is missing",
    "empty": "The private key file of the {role} RDP certificate {thumb} is empty (0 bytes)",
    "inaccessible": "The private key of the {role} RDP certificate {thumb} exists, but the account rdpfix runs as "
    "may not open it and its file was not found in Crypto\\Keys",
    "acl_unreadable": "The ACL of the private key file of the {role} RDP certificate {thumb} cannot be read by the "
    "account rdpfix runs as (SeBackupPrivilege not held or not enabled: see the token in rdpfix.rdp.selftest)",
    "acl_invalid": "The ACL of the private key file of the {role} RDP certificate {thumb} is not valid SDDL",
    "not_readable": "NETWORK SERVICE cannot read the private key of the {role} RDP certificate {thumb}",
    "entries": "The private key file of the {role} RDP certificate {thumb} lacks entries Windows gives it",
}


def _key_events(state: State) -> list[dict[str, t.Any]]:
    return [
        {name: event.get(name) for name in ("time", "provider", "id", "level", "message")} for event in state.events
    ]


def leaves_to_certificate(key: RdpKey, options: Options) -> bool:
    """A self-signed certificate whose key file is gone: rdpfix.rdp.certificate regenerates it by default.

    With nothing to move aside, a regeneration is the certificate module's own (remove the certificate, restart
    SessionEnv), so under ``permissions`` this module reports the key and neither repairs it nor refuses the run: a
    refusal here would stop the role before the certificate module's repair. An empty file is different: it must be
    moved aside before Windows can create the key again, which only ``regenerate`` (or ``rename_store``) does.
    """
    return key.role == "self_signed" and "missing" in key.problems and options.strategy == "permissions"


def _key_findings(state: State, options: Options, key: RdpKey, result: Plan) -> None:
    role = key.role.replace("_", "-")
    primary = next((problem for problem in _KEY_TITLES if problem in key.problems), None)
    if primary is None:
        if "owner" not in key.problems:
            return
        primary = "entries"
    evidence: dict[str, t.Any] = {
        "thumbprint": key.cert.thumbprint,
        "path": key.path,
        "provider": key.provider,
        "size": key.size,
        "owner": key.owner,
        "sddl": key.sddl,
        "problems": list(key.problems),
        "missing_entries": [requirement.describe() for requirement in key.missing],
        "os_build": state.os_build,
    }
    if key.broken:
        evidence["events"] = _key_events(state)
    severity = "critical" if key.broken else "warning"
    title = _KEY_TITLES[primary].format(role=role, thumb=key.cert.thumbprint)
    left_to_certificate = leaves_to_certificate(key, options)
    if key.acl_repairable:
        fix = _fix(options.strategy, "add the missing entries to this key file's ACL only (and make SYSTEM its owner)")
    elif left_to_certificate:
        # No file to move aside: removing the certificate and restarting SessionEnv is all a regeneration needs, and
        # that is what rdpfix.rdp.certificate does by default. Its finding carries the fix; this one says why.
        title += "; rdpfix.rdp.certificate regenerates the certificate (its default), this module leaves it alone"
        evidence["repaired_by"] = "rdpfix.rdp.certificate"
        fix = None
    elif key.role == "self_signed":
        fix = _fix("regenerate", "move the key and its certificate into the backup; Windows creates new ones")
    else:
        fix = None  # a CA-issued certificate's key can only come back from its PFX
    if key.undetermined:
        # Not known to be broken: reported, never repaired or regenerated on a guess.
        evidence["open_error"] = (key.cert.key or {}).get("open_error")
        fix = None
    result.findings.append(finding(f"rdp_key_{primary}", severity, title, evidence, fix))
    if left_to_certificate or key.undetermined:
        return

    # An ACL repair is used whenever it suffices, except where the user chose to regenerate a broken self-signed key:
    # a usable key whose ACL only lacks entries is never regenerated, and a CA-issued key cannot be.
    if key.acl_repairable and (options.strategy == "permissions" or key.role != "self_signed" or not key.broken):
        _plan_key_acl(key, result)
        return
    if key.role != "self_signed":
        # Reported, not refused: the listener falls back to its self-signed certificate (1055), which the other
        # modules keep repairing; only the certificate's owner can bring the key back (its PFX).
        result.findings[-1]["title"] += (
            "; re-import the certificate with its private key (PFX): this module never regenerates a CA-issued key"
        )
        return
    if options.strategy == "permissions":
        if key.acl_repairable:
            return
        result.unfixable.append(
            f"the RDP key file {key.path} is {primary.replace('_', ' ')}: permissions cannot repair it; "
            "run again with strategy=regenerate (or rename_store)"
        )
        return
    _plan_regeneration(state, options, key, result)


def _plan_key_acl(key: RdpKey, result: Plan) -> None:
    if key.sddl is None or key.path is None:
        return
    repaired = sd.with_entries(sd.parse(key.sddl), key.missing, owner=sd.SID_SYSTEM)
    if "not_readable" in key.problems:
        repaired = sd.with_entries(
            repaired, [sd.Requirement(sd.SID_NETWORK_SERVICE, sd.FILE_GENERIC_READ)], owner=sd.SID_SYSTEM
        )
    names = ", ".join(str(requirement.describe()["account"]) for requirement in key.missing) or "owner"
    result.acl_changes.append(
        AclChange(key.path, key.sddl, repaired.to_sddl(), f"add the missing entries ({names}) to {key.path} only")
    )


def _plan_regeneration(state: State, options: Options, key: RdpKey, result: Plan) -> None:
    """Reuse the certificate planner on the state as it will be once the key is moved aside."""
    without_key = replace(key.cert, has_private_key=False, key=None)
    cert_state = replace(
        state.cert,
        self_signed=tuple(
            without_key if cert.thumbprint == key.cert.thumbprint else cert for cert in state.cert.self_signed
        ),
    )
    cert_plan = certificate.plan(cert_state, options.certificate_options())
    if cert_plan.restart_pending:
        result.restart_pending = True
    stopped_by = ("certificate.regeneration_blocked", "certificate.restart_pending")
    blocked = [item for item in cert_plan.findings if item["id"] in stopped_by]
    for item in blocked:
        pending = item["id"] == "certificate.restart_pending"
        result.findings.append(
            finding(
                f"regeneration_{'pending' if pending else 'blocked'}",
                "warning" if pending else "critical",
                item["title"],
                {"thumbprint": key.cert.thumbprint},
                None,
            )
        )
    if not cert_plan.regenerate:
        if not blocked:
            result.unfixable.append(f"the certificate planner does not regenerate {key.cert.thumbprint}")
        return
    # Only the certificate whose key this module moves is removed; the store's other certificates are not ours.
    cert_plan.remove_certificates = [
        cert for cert in cert_plan.remove_certificates if cert.thumbprint == key.cert.thumbprint
    ]
    result.regeneration = Regeneration(key, cert_state, cert_plan)


def _other_key_findings(state: State, keys: list[RdpKey], result: Plan) -> None:
    rdp_paths = {key.path.casefold() for key in keys if key.path}
    empty: list[str] = []
    unreadable: list[str] = []
    for entry in state.store.entries:
        if entry.is_dir or entry.path.casefold() in rdp_paths:
            continue
        if entry.size == 0:
            empty.append(entry.name)
        if entry.sddl is None:
            unreadable.append(entry.name)
            continue
        try:
            if not sd.can_read(sd.parse(entry.sddl), sd.SYSTEM_IDENTITIES):
                unreadable.append(entry.name)
        except sd.SddlError:
            unreadable.append(entry.name)
    if empty:
        result.findings.append(
            finding(
                "other_keys_empty",
                "info",
                f"{len(empty)} other machine key file(s) are empty; they belong to other software and are left alone",
                {"files": empty},
                None,
            )
        )
    if unreadable:
        result.findings.append(
            finding(
                "other_keys_unreadable",
                "info",
                f"{len(unreadable)} other machine key file(s) cannot be read by SYSTEM; they belong to other "
                "software and are left alone",
                {"files": unreadable},
                None,
            )
        )


def _plan_rename(state: State, keys: list[RdpKey], result: Plan) -> None:
    broken_paths = {key.path.casefold() for key in keys if key.broken and key.role == "self_signed" and key.path}
    carried = tuple(
        entry for entry in state.store.entries if not entry.is_dir and entry.path.casefold() not in broken_paths
    )
    left = tuple(entry.name for entry in state.store.entries if entry.path.casefold() in broken_paths)
    # ACL changes of key files still apply: they are staged after the copies, onto the carried files.
    result.rename = StoreRename(state.store.path, state.store.sddl, carried, left)


def plan(state: State, options: Options) -> Plan:
    """Decide what to report and what to change (``state: present``)."""
    result = Plan()
    if state.read_errors:
        result.findings.append(
            finding(
                "read_failed",
                "warning",
                "Part of the host's state could not be read; nothing is changed",
                {"errors": list(state.read_errors)},
                None,
            )
        )
        return result
    _folder_findings(state, options, result)
    keys = rdp_keys(state)
    for key in keys:
        _key_findings(state, options, key, result)
    _other_key_findings(state, keys, result)
    if result.unfixable:
        # The run refuses (and changes nothing), in check mode too: the audit reports it where the run would fail.
        result.findings.append(
            finding(
                "repair_refused",
                "warning",
                "rdpfix.rdp.machinekeys refuses to run on this host with strategy "
                f"{options.strategy} and changes nothing: " + "; ".join(result.unfixable),
                {"strategy": options.strategy, "reasons": list(result.unfixable)},
                None,
            )
        )
    folder_wrong = any(item["id"] == "machinekeys.folder_acl" for item in result.findings)
    rdp_broken = any(key.broken for key in keys)
    if options.strategy == "rename_store" and state.store.exists and (folder_wrong or rdp_broken):
        _plan_rename(state, keys, result)
    if not keys and state.events:
        result.findings.append(
            finding(
                "past_key_errors",
                "info",
                "Key access errors were logged, but no key of the listener's certificates is broken now",
                {"events": _key_events(state)},
                None,
            )
        )
    elif not any(key.broken for key in keys) and state.events:
        result.findings.append(
            finding(
                "past_key_errors",
                "info",
                "Key access errors were logged earlier; the listener's key is readable now",
                {"events": _key_events(state)},
                None,
            )
        )
    return result


# ---------------------------------------------------------------------------------------------------- views


def view(state: State) -> dict[str, t.Any]:
    """The before/after of --diff and the ``machinekeys`` return value."""
    return {
        "folder": {
            "path": state.store.path,
            "exists": state.store.exists,
            "owner": state.store.owner,
            "sddl": state.store.sddl,
        },
        "key_files": len([entry for entry in state.store.entries if not entry.is_dir]),
        "rdp_keys": [key.view() for key in rdp_keys(state)],
    }


def predicted_view(state: State, result: Plan) -> dict[str, t.Any]:
    predicted = view(state)
    changes = {change.path.casefold(): change.sddl for change in result.acl_changes}
    if result.create_store or result.rename is not None:
        predicted["folder"] = {
            "path": state.store.path,
            "exists": True,
            "owner": "NT AUTHORITY\\SYSTEM",
            "sddl": DEFAULT_FOLDER_SDDL,
        }
    elif state.store.path.casefold() in changes:
        predicted["folder"]["sddl"] = changes[state.store.path.casefold()]
        predicted["folder"]["owner"] = "NT AUTHORITY\\SYSTEM"
    if result.rename is not None:
        predicted["key_files"] = len(result.rename.carried)
    for key_view in predicted["rdp_keys"]:
        path = str(key_view.get("path") or "").casefold()
        if path in changes:
            key_view.update(sddl=changes[path], owner="NT AUTHORITY\\SYSTEM", problems=[])
        if result.regeneration is not None and key_view["thumbprint"] == result.regeneration.key.cert.thumbprint:
            key_view.update(thumbprint="(new self-signed certificate)", size=None, sddl="(set by Windows)", problems=[])
    return predicted


# ---------------------------------------------------------------------------------------------------- apply


class _StagedBackup(BackupSet):
    """A BackupSet that appends this module's changes right after the manifest.

    The certificate planner's ``build_apply_batch`` writes the backup, then the manifest, then its own changes. This
    module's changes (ACLs, moving the key or the store aside) must come after the manifest and before the certificate
    is removed; ``finish`` is the one point between the two. Each staged operation carries out the item recorded just
    before it (``BackupSet.carry``: its status, planned then done, in the manifest and the result).
    """

    # For each staged operation: the manifest item it carries out, the operation and its arguments.
    staged: list[tuple[int, str, dict[str, t.Any]]]
    staged_positions: list[int]

    def stage(self, op: str, **args: t.Any) -> None:
        self.staged.append((self.last_item, op, args))

    def finish(self, batch: Batch) -> int:
        position = super().finish(batch)
        self.staged_positions = [self.change(batch, item, op, **args) for item, op, args in self.staged]
        return position


def new_backup(host: str, root: str, now: datetime | None = None) -> _StagedBackup:
    base = BackupSet.create("machinekeys", host, root, now)
    backup = _StagedBackup(base.manifest_id, base.directory, base.module, base.host, base.created)
    backup.staged = []
    backup.staged_positions = []
    return backup


@dataclass(frozen=True)
class ApplyIndex:
    manifest: int  # a failure at or before this index means nothing was changed
    changes: list[int]
    cert: certificate.ApplyIndex | None
    store: int
    cng_store: int
    guards: list[int] = field(default_factory=list)  # checked before the first write (_guards)


def _stage_changes(state: State, result: Plan, backup: _StagedBackup) -> None:
    if result.rename is not None:
        rename = result.rename
        saved = ntpath.join(backup.directory, "MachineKeys")
        backup.record(
            "store_moved",
            source=rename.path,
            file="MachineKeys",
            sddl=rename.previous_sddl,
            entries=[entry.name for entry in state.store.entries],
            carried=[entry.name for entry in rename.carried],
        )
        backup.stage("dir.move", src=rename.path, dest=saved)
        backup.stage("dir.create", path=rename.path, sddl=DEFAULT_FOLDER_SDDL)
        for entry in rename.carried:
            backup.stage("file.copy", src=ntpath.join(saved, entry.name), dest=entry.path)
            if entry.sddl is not None:
                # A copy gets a new ACL: give it back the original's, owner included.
                backup.stage("acl.set", path=entry.path, sddl=entry.sddl)
    if result.create_store:
        backup.record("store_created", path=state.store.path)
        backup.stage("dir.create", path=state.store.path, sddl=DEFAULT_FOLDER_SDDL)
    for change in result.acl_changes:
        backup.record("acl", path=change.path, previous_sddl=change.previous, sddl=change.sddl)
        backup.stage("acl.set", path=change.path, sddl=change.sddl)
    if result.regeneration is not None:
        key = result.regeneration.key
        cert = key.cert
        backup.record(
            "rdp_certificate",
            store=cert.store,
            thumbprint=cert.thumbprint,
            der_b64=base64.b64encode(cert.der).decode("ascii"),
            store_thumbprints=[item.thumbprint for item in state.cert.self_signed],
            # Where its key file is and the ACL it had: a restore re-links the key under a temporary ACL.
            key_path=key.path if key.exists else None,
            key_sddl=key.sddl if key.exists else None,
        )
        if result.rename is None and key.exists and key.path:
            name = f"{ntpath.basename(key.path)}.key"
            backup.record(
                "key_moved", source=key.path, file=name, sddl=key.sddl, size=key.size, thumbprint=cert.thumbprint
            )
            backup.stage("file.move", src=key.path, dest=ntpath.join(backup.directory, name))


def write_guards(state: State, result: Plan) -> list[_guards.Guard]:
    """What this module's plan relied on, checked before its first write (docs/agent-protocol.md, "Guards"): the
    key file it moves aside is still the certificate's, with the size, owner and ACL it read; each file or folder whose
    ACL it replaces still has the ACL it read (the backup records that ACL as the one to restore)."""
    guards: list[_guards.Guard] = []
    if result.regeneration is not None:
        key = result.regeneration.key
        guards.append(
            _guards.certificate_unchanged(key.cert.store, {"thumbprint": key.cert.thumbprint, "key": key.cert.key})
        )
    for change in result.acl_changes:
        guards.append(
            _guards.Guard(
                label=f"the ACL of {change.path} is the one the plan saw",
                op="file.stat",
                args={"path": change.path},
                expect={"exists": True, "sddl": change.previous},
                match="subset",
            )
        )
    return guards


def build_apply_batch(state: State, options: Options, result: Plan, backup: _StagedBackup) -> tuple[Batch, ApplyIndex]:
    """Guards, backup and manifest, this module's changes, then the certificate planner's regeneration, then
    re-reads."""
    _stage_changes(state, result, backup)
    actions = [str(action["description"]) for action in result.actions()]
    cert_index: certificate.ApplyIndex | None = None
    guards = write_guards(state, result)
    guarded: list[int] = []
    if result.regeneration is not None:
        regeneration = result.regeneration
        batch, cert_index = certificate.build_apply_batch(
            regeneration.cert_state, options.certificate_options(), regeneration.cert_plan, backup, guards
        )
        backup.planned_actions = actions
        manifest = cert_index.manifest
        # build_apply_batch wrote the manifest before this module's planned action list was complete: rewrite it in
        # place (same position, so no index moves), and its done-record after the certificate's changes.
        batch.ops[manifest] = backup.manifest_op()
        if backup.done_position is not None:
            batch.ops[backup.done_position] = backup.manifest_op(done=True)
    else:
        batch = Batch(on_error="stop")
        guarded = _guards.add_guards(batch, guards)
        backup.planned_actions = actions
        backup.begin(batch)
        manifest = backup.finish(batch)
        backup.finish_done(batch)
    store = batch.add("dir.stat", path=state.store.path)
    cng_store = batch.add("dir.stat", path=state.cng_store.path)
    guard_positions = cert_index.guards if cert_index is not None else guarded
    return batch, ApplyIndex(manifest, list(backup.staged_positions), cert_index, store, cng_store, guard_positions)


def state_after(state: State, result: BatchResult, index: ApplyIndex, now: datetime) -> State:
    """The state the apply batch re-read: key folders, and the self-signed store when a certificate was regenerated."""
    cert_state = state.cert
    if index.cert is not None:
        try:
            cert_state = certificate.refresh_state(state.cert, result, index.cert.verify, now)
        except certificate.PlanError:
            cert_state = state.cert
    return replace(
        state,
        cert=cert_state,
        store=folder_from_result(result, index.store, state.store.path),
        cng_store=folder_from_result(result, index.cng_store, state.cng_store.path),
    )


def remaining_problems(after: State, options: Options | None = None) -> list[str]:
    """What still looks wrong after an apply: each RDP key that is still broken (but the ones this module leaves to
    the certificate module), a folder still not default."""
    problems: list[str] = []
    if not after.store.exists:
        problems.append(f"{after.store.path} does not exist")
    elif after.store.sddl is None or not sd.equivalent(sd.parse(after.store.sddl), sd.parse(DEFAULT_FOLDER_SDDL)):
        problems.append(f"the ACL of {after.store.path} is not the default")
    for key in rdp_keys(after):
        if key.broken and not (options is not None and leaves_to_certificate(key, options)):
            problems.append(f"the RDP key {key.path} is still {', '.join(key.problems)}")
    return problems


# ---------------------------------------------------------------------------------------------------- restore


def manifest_dir(root: str, manifest_id: str) -> str:
    return ntpath.join(root, manifest_id)


def build_manifest_read(root: str, manifest_id: str) -> tuple[Batch, int, int, int]:
    """The manifest, its restored marker, and its folder's listing (what the backup holds): one round trip."""
    batch = Batch(on_error="continue")
    directory = manifest_dir(root, manifest_id)
    manifest = batch.add("file.read", path=ntpath.join(directory, MANIFEST_FILE))
    marker = batch.add("file.read", path=ntpath.join(directory, RESTORED_MARKER))
    saved = batch.add("dir.stat", path=directory)
    return batch, manifest, marker, saved


MOVE_KINDS = ("store_moved", "key_moved")


# Items a restore leaves out when their record says they were not carried out. The others are judged on the host
# whatever their status: a certificate's saved key file also tells which file its certificate re-links to.
SKIPPED_WHEN_NOT_DONE = frozenset({"registry_value", "firewall_rule", "acl", "store_created", *MOVE_KINDS})


def never_done(item: dict[str, t.Any]) -> bool:
    """An item whose record says it was not carried out (``failed``, ``not_run``: the manifest written again after
    a batch that stopped at a failed operation): nothing of it to put back."""
    return item.get("status") in ("failed", "not_run") and item.get("kind") in SKIPPED_WHEN_NOT_DONE


def move_not_done(item: dict[str, t.Any], saved: bool, source: bool, source_size: int | None) -> bool:
    """Whether a ``store_moved`` / ``key_moved`` item was never carried out: its run wrote the manifest first, then
    the move failed or never ran. The manifest's own record says so (``status``, version 2: ``done`` was done;
    ``failed`` and ``not_run``, as a result shows them, were not); ``planned`` (the batch stopped before its
    done-record) and version 1 are judged on the host: nothing in the backup (``saved``), and the source still where it
    was (``source``; a key file of the same size)."""
    status = item.get("status")
    if status in ("failed", "not_run"):
        return True
    if status == "done":
        return False
    if saved or not item.get("source") or not source:
        return False
    return item.get("kind") != "key_moved" or item.get("size") in (None, source_size)


def unmade_moves(state: State, manifest: dict[str, t.Any], saved: Folder) -> list[dict[str, t.Any]]:
    """The moves of ``manifest`` that never happened (``move_not_done``), judged on the key folders and the backup
    folder's listing ``saved``; raises PlanError for a move that was made whose saved copy is gone."""
    found: list[dict[str, t.Any]] = []
    for item in manifest["items"]:
        if not isinstance(item, dict) or item.get("kind") not in MOVE_KINDS:
            continue
        source = str(item.get("source") or "")
        exists, size = False, None
        if source and source.casefold() == state.store.path.casefold():
            exists = state.store.exists
        else:
            for folder in (state.store, state.cng_store):
                entry = folder.find(ntpath.basename(source)) if source and folder.contains(source) else None
                if entry is not None:
                    exists, size = True, entry.size
        in_backup = saved.find(str(item.get("file") or "")) is not None
        if move_not_done(item, in_backup, exists, size):
            found.append(item)
        elif not in_backup:
            raise PlanError(
                f"{ntpath.join(saved.path, str(item.get('file')))} is no longer in the backup (an earlier restore put "
                "it back, and a later one saved it again under its own manifest): restore the newest manifest that "
                "holds it instead"
            )
    return found


def parse_manifest(result: BatchResult, position: int, manifest_id: str) -> dict[str, t.Any]:
    item = result[position]
    if not item.ok or not item.data.get("exists"):
        detail = item.error_message if not item.ok else "it does not exist"
        raise PlanError(f"the manifest of {manifest_id} cannot be read on {result.host}: {detail}")
    try:
        document = json.loads(base64.b64decode(str(item.data.get("content_b64") or ""), validate=True))
    except (binascii.Error, ValueError) as exc:
        raise PlanError(f"the manifest of {manifest_id} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("module") != "rdpfix.rdp.machinekeys":
        module = document.get("module") if isinstance(document, dict) else None
        raise PlanError(
            f"{manifest_id} is a manifest of {module or 'an unknown module'}, not of rdpfix.rdp.machinekeys"
        )
    if document.get("id") != manifest_id or not isinstance(document.get("items"), list):
        raise PlanError(f"the manifest of {manifest_id} is malformed")
    if document.get("v") not in MANIFEST_VERSIONS:
        raise PlanError(f"the manifest of {manifest_id} has version {document.get('v')!r}; this module reads 1 and 2")
    return document


def already_restored(result: BatchResult, position: int) -> dict[str, t.Any] | None:
    item = result[position]
    if not item.ok or not item.data.get("exists"):
        return None
    try:
        marker = json.loads(base64.b64decode(str(item.data.get("content_b64") or "")))
    except (binascii.Error, ValueError):
        return {"restored_by": "unknown"}
    return marker if isinstance(marker, dict) else {"restored_by": "unknown"}


@dataclass
class RestorePlan:
    actions: list[dict[str, t.Any]] = field(default_factory=list)
    ops: list[tuple[str, dict[str, t.Any]]] = field(default_factory=list)
    # Certificates Windows created after the run: saved into the restore's own backup before they are removed.
    save_certificates: list[certificate.StoredCertificate] = field(default_factory=list)
    # Position in ``ops`` -> the item of the restore's own manifest that operation carries out (its status).
    carries: dict[int, int] = field(default_factory=dict)

    @property
    def has_changes(self) -> bool:
        return bool(self.ops)

    def carry(self, item: int) -> None:
        """The operation added last carries out ``item`` of the restore's manifest."""
        self.carries[len(self.ops) - 1] = item


def plan_restore(state: State, manifest: dict[str, t.Any], root: str, backup: BackupSet) -> RestorePlan:
    """Undo a previous run exactly. Whatever the undo replaces is recorded in ``backup`` first (nothing is lost)."""
    source_dir = manifest_dir(root, str(manifest["id"]))
    items = [item for item in manifest["items"] if isinstance(item, dict) and not never_done(item)]
    kinds = {str(item.get("kind")) for item in items}
    result = RestorePlan()

    for item in items:
        if item.get("kind") == "store_moved":
            path = str(item["source"])
            if state.store.exists:
                backup.record(
                    "store_moved",
                    source=path,
                    file="MachineKeys",
                    sddl=state.store.sddl,
                    entries=[entry.name for entry in state.store.entries],
                    carried=[],
                )
                result.ops.append(("dir.move", {"src": path, "dest": ntpath.join(backup.directory, "MachineKeys")}))
                result.carry(backup.last_item)
            result.ops.append(("dir.move", {"src": ntpath.join(source_dir, str(item["file"])), "dest": path}))
            result.actions.append(
                {
                    "action": "restore_store",
                    "path": path,
                    "description": f"put the original {path} back; the current one goes into the new backup",
                }
            )
        elif item.get("kind") == "store_created" and state.store.exists:
            path = str(item["path"])
            backup.record("store_moved", source=path, file="MachineKeys", sddl=state.store.sddl, entries=[], carried=[])
            result.ops.append(("dir.move", {"src": path, "dest": ntpath.join(backup.directory, "MachineKeys")}))
            result.carry(backup.last_item)
            result.actions.append(
                {"action": "remove_store", "path": path, "description": f"move the created {path} aside"}
            )

    for item in items:
        if item.get("kind") != "rdp_certificate":
            continue
        store = str(item["store"])
        before = {str(thumb).upper() for thumb in item.get("store_thumbprints") or []}
        for cert in state.cert.self_signed:
            if cert.thumbprint in before:
                continue
            result.save_certificates.append(cert)
            key = assess_key(state, cert, "self_signed")
            if key.exists and key.path and "store_moved" not in kinds:
                name = f"{ntpath.basename(key.path)}.new.key"
                backup.record(
                    "key_moved", source=key.path, file=name, sddl=key.sddl, size=key.size, thumbprint=cert.thumbprint
                )
                result.ops.append(("file.move", {"src": key.path, "dest": ntpath.join(backup.directory, name)}))
                result.carry(backup.last_item)
            result.ops.append(("cert.remove", {"store": store, "thumbprint": cert.thumbprint}))
            result.actions.append(
                {
                    "action": "remove_certificate",
                    "thumbprint": cert.thumbprint,
                    "description": f"remove the certificate {cert.thumbprint} Windows created after the run",
                }
            )
        if str(item["thumbprint"]).upper() not in {cert.thumbprint for cert in state.cert.self_signed}:
            result.ops.append(("cert.import", {"store": store, "der_b64": item["der_b64"]}))
            result.actions.append(
                {
                    "action": "import_certificate",
                    "thumbprint": item["thumbprint"],
                    "description": f"put the certificate {item['thumbprint']} back into LocalMachine\\{store}",
                }
            )

    key_acls: list[tuple[str, str]] = []
    for item in items:
        if item.get("kind") != "key_moved":
            continue
        path = str(item["source"])
        result.ops.append(("file.copy", {"src": ntpath.join(source_dir, str(item["file"])), "dest": path}))
        if item.get("sddl"):
            key_acls.append((path, str(item["sddl"])))
        result.actions.append({"action": "restore_key", "path": path, "description": f"put the key file {path} back"})

    # The key files this restore puts back: moved ones, and every file of a store that comes back whole.
    restored_files = {str(item["source"]).casefold() for item in items if item.get("kind") == "key_moved"}
    for item in items:
        if item.get("kind") == "store_moved":
            restored_files |= {
                ntpath.join(str(item["source"]), str(name)).casefold() for name in item.get("entries") or []
            }
    for item in items:
        if item.get("kind") == "rdp_certificate" and any(op == "cert.import" for op, _args in result.ops):
            # The re-imported certificate finds its key file again (certutil -repairstore). certutil opens the key
            # through its provider, with the caller's token and without backup semantics: a key file whose ACL
            # names no Administrators (the 17763+ default) gets SYSTEM and Administrators for the re-link only.
            key_path, key_sddl = item.get("key_path"), item.get("key_sddl")
            relink = bool(key_path and key_sddl and str(key_path).casefold() in restored_files)
            if relink:
                result.ops.append(("acl.set", {"path": key_path, "sddl": RELINK_KEY_SDDL}))
            result.ops.append(("cert.repair_key_link", {"store": item["store"], "thumbprint": item["thumbprint"]}))
            if relink:
                key_acls = [(path, sddl) for path, sddl in key_acls if path.casefold() != str(key_path).casefold()]
                result.ops.append(("acl.set", {"path": key_path, "sddl": key_sddl}))

    # The key files' recorded ACLs go on after the re-link: certutil opens the key through its provider, with the
    # caller's token and without backup semantics, and from build 17763 the RDP key's ACL names no Administrators.
    for path, sddl in key_acls:
        result.ops.append(("acl.set", {"path": path, "sddl": sddl}))

    for item in reversed(items):
        if item.get("kind") != "acl" or not item.get("previous_sddl"):
            continue
        path = str(item["path"])
        previous = str(item["previous_sddl"])
        if "store_moved" in kinds and (path.casefold() == state.store.path.casefold() or state.store.contains(path)):
            continue  # the original store came back whole, with its original ACLs
        current = _current_sddl(state, path)
        if current == previous:
            continue
        backup.record("acl", path=path, previous_sddl=current, sddl=previous)
        result.ops.append(("acl.set", {"path": path, "sddl": previous}))
        result.carry(backup.last_item)
        result.actions.append(
            {"action": "set_acl", "path": path, "sddl": previous, "description": f"put the previous ACL of {path} back"}
        )
    return result


def build_restore_batch(
    state: State, restore: RestorePlan, original_id: str, root: str, backup: BackupSet
) -> tuple[Batch, int, int, int]:
    """Backup of what the undo replaces, its manifest, the undo, a marker on the original backup, re-reads."""
    batch = Batch(on_error="stop")
    backup.planned_actions = [str(action["description"]) for action in restore.actions]
    backup.record("restores", manifest_id=original_id)
    backup.begin(batch)
    removed: dict[str, int] = {}
    for cert in restore.save_certificates:
        certificate.save_certificate(batch, backup, cert)
        removed[cert.thumbprint] = backup.last_item
        backup.record(
            "rdp_certificate",
            store=cert.store,
            thumbprint=cert.thumbprint,
            der_b64=base64.b64encode(cert.der).decode("ascii"),
            store_thumbprints=[],
        )
    manifest = backup.finish(batch)
    for position, (op, args) in enumerate(restore.ops):
        added = batch.add(op, **args)
        item = restore.carries.get(position)
        if item is None and op == "cert.remove":
            item = removed.get(str(args.get("thumbprint")))
        if item is not None:
            backup.carry(item, added)
    # The done-record (every item the undo carried out done), then the marker on the original manifest.
    backup.finish_done(batch)
    marker = json.dumps({"restored_by": backup.manifest_id, "time": backup.created}).encode("utf-8")
    batch.add(
        "file.write",
        path=ntpath.join(manifest_dir(root, original_id), RESTORED_MARKER),
        content_b64=base64.b64encode(marker).decode("ascii"),
    )
    store = batch.add("dir.stat", path=state.store.path)
    cng_store = batch.add("dir.stat", path=state.cng_store.path)
    return batch, manifest, store, cng_store


def _current_sddl(state: State, path: str) -> str | None:
    if path.casefold() == state.store.path.casefold():
        return state.store.sddl
    for folder in (state.store, state.cng_store):
        if folder.contains(path):
            entry = folder.find(ntpath.basename(path))
            return entry.sddl if entry else None
    return None
