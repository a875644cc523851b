# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Planner of rdpfix.rdp.restore: list the backup manifests on a host, and put back what a run changed.

Pure functions and data, like every planner: the batches to send, the state parsed from their results, and per
manifest a plan that (1) saves what the restore will overwrite into a new manifest of its own, (2) puts the recorded
previous state back, (3) marks the original manifest restored (``restored.json``, the marker machinekeys writes too).

Item kinds and how they come back (the manifests of docs/agent-protocol.md, "Backups and manifests"):

- ``registry_value`` (certificate's pin, transport, tls, restore): ``registry.set`` of the previous type and value,
  ``registry.remove`` when there was none;
- ``firewall_rule`` (firewall, restore): a rule the run created is removed, a changed one gets its settable fields back,
  a removed one is re-created;
- ``certificate`` (certificate, restore): re-imported from its saved DER and re-linked to its key
  (``cert.repair_key_link``); ``private_key_file``: the saved copy goes back to its path, with its ACL;
- ``certificate_imported`` (restore): removed, saved first;
- ``rdp_certificate``, ``key_moved``, ``store_moved``, ``store_created``, ``acl`` (machinekeys): machinekeys' own
  restore planner, ``_machinekeys.plan_restore``;
- ``restores``, ``marker_moved``, ``marker_placed`` (restore, machinekeys): the ``restored.json`` markers. Undoing a
  restore makes the manifest it restored restorable again.

A certificate manifest does not list the certificate Windows created after the run: when the run regenerated (see
``regenerated``), a certificate in ``LocalMachine\\Remote Desktop`` that the run did not remove and whose NotBefore lies
between ``REGENERATION_BACKDATE`` plus ``REGENERATION_SLACK`` before and ``REGENERATION_WINDOW`` after the
manifest's creation time is taken as Windows' answer to the run; it is saved and removed, its key file moved into the
new backup.

A restore that cannot be exact is refused before it starts: ``predicted_renewals`` finds a restored pin whose restart
would make Windows replace the expired (or missing) self-signed certificate the restore puts back.
"""

from __future__ import annotations

import base64
import binascii
import json
import ntpath
import re
import typing as t
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from ansible_collections.rdpfix.rdp.plugins.module_utils._x509 import summarize_certificate

from . import _certificate as certificate
from . import _machinekeys as mk
from ._action import CLAIM_FILE, FENCED, BackupSet
from ._agent import Batch, BatchResult, OpResult, contract_string_list
from ._firewall import OWN_GROUP, OWN_RULE_DESCRIPTION
from ._tls import CIPHER_POLICY_KEY, FIPS_KEY, SCHANNEL_PROTOCOLS_KEY
from ._transport import POLICY_KEY, SELECT_TRANSPORT

MODULE = "restore"
MODULE_PREFIX = "rdpfix.rdp."
MANIFEST_FILE = "manifest.json"
RESTORED_MARKER = mk.RESTORED_MARKER
MANIFEST_VERSION = 1
# Version 2 (every module's manifest): the items a run carries out say whether they were done (``status``: planned in
# the manifest written before the changes, done in the done-record written after them).
MANIFEST_VERSIONS = mk.MANIFEST_VERSIONS
# 20261125T103000Z-certificate-1a2b: what new_manifest_id makes. Anything else is refused before a host is contacted.
MANIFEST_ID_RE = re.compile(r"^(?P<time>\d{8}T\d{6}Z)-(?P<module>[a-z][a-z0-9_]{0,39})-(?P<token>[0-9a-f]{4,32})$")
# A self-signed certificate whose NotBefore lies between the certificate run's creation time minus the back-dating
# and the slack (the controller's and the host's clocks, NotBefore rounding) and plus the window counts as Windows'
# answer to the run. Windows back-dates the NotBefore of the RDP self-signed certificate by about a day (observed on
# freshly deployed hosts; evidence in docs/modules/restore.md).
REGENERATION_BACKDATE = timedelta(days=1)
REGENERATION_SLACK = timedelta(minutes=5)
REGENERATION_WINDOW = timedelta(hours=1)

GENERIC_KINDS = frozenset(
    {"registry_value", "firewall_rule", "certificate", "private_key_file", "certificate_imported"}
)
MACHINEKEYS_KINDS = frozenset({"rdp_certificate", "key_moved", "store_moved", "store_created", "acl"})
MARKER_KINDS = frozenset({"restores", "marker_moved", "marker_placed"})
# A machinekeys manifest also lists the certificate it removed as ``certificate`` (the certificate planner's backup);
# machinekeys' restore planner puts it back from its ``rdp_certificate`` item.
MACHINEKEYS_PATH_KINDS = MACHINEKEYS_KINDS | MARKER_KINDS | {"certificate"}

# Fields ``firewall.rule.set`` can put back; the others of a rule record are fixed once the rule exists.
RULE_SETTABLE = ("enabled", "profiles", "local_ports", "remote_addresses", "program")
RULE_FIXED = ("display_name", "group", "direction", "action", "protocol", "remote_ports", "service")


class RestoreError(ValueError):
    """The request cannot be carried out safely; nothing has been changed by the step that raised it."""


# ---------------------------------------------------------------------------------------------------- options


def validate_manifest_ids(value: object) -> tuple[str, ...]:
    """The requested ids, checked before any host is contacted (an id becomes a folder name on the host)."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise RestoreError(f"manifest_id must be a manifest id or a list of them, not {value!r}")
    ids: list[str] = []
    for item in items:
        text = str(item).strip()
        if not MANIFEST_ID_RE.match(text):
            raise RestoreError(
                f"manifest_id {text!r} is not a manifest id such as 20261125T103000Z-certificate-1a2b "
                "(the backup.manifest_id a module returned)"
            )
        if text not in ids:
            ids.append(text)
    return tuple(ids)


@dataclass(frozen=True)
class Options:
    manifest_ids: tuple[str, ...] = ()
    restart_service: str = "SessionEnv"
    allow_session_disruption: bool = False
    # A restore whose restart makes Windows renew the self-signed certificate it put back cannot be exact: refused
    # before it starts unless this is true (see predicted_renewals).
    accept_certificate_renewal: bool = False

    @classmethod
    def from_params(cls, params: dict[str, t.Any]) -> Options:
        return cls(
            manifest_ids=validate_manifest_ids(params.get("manifest_id") or None),
            restart_service=str(params.get("restart_service") or "SessionEnv"),
            allow_session_disruption=bool(params.get("allow_session_disruption", False)),
            accept_certificate_renewal=bool(params.get("accept_certificate_renewal", False)),
        )


def _parse_time(text: object) -> datetime | None:
    for pattern in ("%Y-%m-%dT%H:%M:%SZ", "%Y%m%dT%H%M%SZ"):
        try:
            return datetime.strptime(str(text), pattern).replace(tzinfo=UTC)
        except ValueError:
            continue
    return None


def manifest_dir(root: str, manifest_id: str) -> str:
    return ntpath.join(root, manifest_id)


def marker_path(root: str, manifest_id: str) -> str:
    return ntpath.join(manifest_dir(root, manifest_id), RESTORED_MARKER)


# ---------------------------------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class Manifest:
    """One backup manifest as read from the host, and whether it was restored already."""

    id: str
    module: str
    host: str | None
    created: datetime
    items: tuple[dict[str, t.Any], ...]
    actions: tuple[str, ...]
    directory: str
    restored: dict[str, t.Any] | None = None

    @property
    def kinds(self) -> frozenset[str]:
        return frozenset(str(item.get("kind")) for item in self.items)

    @property
    def machinekeys(self) -> bool:
        """Restored by machinekeys' own planner: its manifests, and the restore manifests that planner wrote."""
        return self.module == "rdpfix.rdp.machinekeys" or bool(self.kinds & MACHINEKEYS_KINDS)

    def raw(self) -> dict[str, t.Any]:
        return {"id": self.id, "module": self.module, "items": [dict(item) for item in self.items]}

    def summary(self) -> dict[str, t.Any]:
        """What the list shows: no certificate bodies, everything else as recorded."""
        restores = [str(item.get("manifest_id")) for item in self.items if item.get("kind") == "restores"]
        return {
            "id": self.id,
            "module": self.module,
            "host": self.host,
            "created": self.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "path": self.directory,
            "actions": list(self.actions),
            "items": [{name: value for name, value in item.items() if name != "der_b64"} for item in self.items],
            "restored": self.restored is not None,
            "restored_by": (self.restored or {}).get("restored_by"),
            "restores": restores[0] if restores else None,
        }


def _decode_json(item_data: dict[str, t.Any]) -> t.Any:
    return json.loads(base64.b64decode(str(item_data.get("content_b64") or ""), validate=True))


def parse_manifest(result: BatchResult, positions: tuple[int, int], manifest_id: str, root: str) -> Manifest:
    """The manifest read at ``positions`` (manifest.json, restored.json); RestoreError naming the host when unusable."""
    read, marker = (result[position] for position in positions)
    directory = manifest_dir(root, manifest_id)
    if not read.ok:
        raise RestoreError(f"the manifest {manifest_id} cannot be read: {read.error_type}: {read.error_message}")
    if not read.data.get("exists"):
        raise RestoreError(
            f"there is no backup manifest {manifest_id} in {directory} "
            "(rdpfix.rdp.restore without manifest_id lists the manifests on the host)"
        )
    try:
        document = _decode_json(read.data)
    except (binascii.Error, ValueError) as exc:
        raise RestoreError(f"the manifest {manifest_id} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("items"), list):
        raise RestoreError(f"the manifest {manifest_id} is malformed (no item list)")
    if document.get("id") != manifest_id:
        raise RestoreError(f"the manifest in {directory} names {document.get('id')!r}, not {manifest_id}")
    if document.get("v") not in MANIFEST_VERSIONS:
        raise RestoreError(
            f"the manifest {manifest_id} has version {document.get('v')!r}; this module reads versions 1 and 2"
        )
    module = str(document.get("module") or "")
    if not module.startswith(MODULE_PREFIX):
        raise RestoreError(f"the manifest {manifest_id} was not written by rdpfix.rdp (module {module!r})")
    restored: dict[str, t.Any] | None = None
    if marker.ok and marker.data.get("exists"):
        try:
            decoded = _decode_json(marker.data)
        except (binascii.Error, ValueError):
            decoded = None
        restored = decoded if isinstance(decoded, dict) else {"restored_by": "unknown"}
    match = MANIFEST_ID_RE.match(manifest_id)
    created = _parse_time(document.get("created")) or _parse_time(match["time"] if match else "") or datetime.min
    return Manifest(
        id=manifest_id,
        module=module,
        host=document.get("host"),
        created=created.replace(tzinfo=UTC) if created.tzinfo is None else created,
        items=tuple(item for item in document["items"] if isinstance(item, dict)),
        actions=tuple(str(action) for action in document.get("actions") or []),
        directory=directory,
        restored=restored,
    )


def check_restorable(manifest: Manifest) -> None:
    """Refuse a manifest with items this planner does not know: it could not be restored exactly."""
    allowed = MACHINEKEYS_PATH_KINDS if manifest.machinekeys else GENERIC_KINDS | MARKER_KINDS
    unknown = sorted(manifest.kinds - allowed)
    if unknown:
        raise RestoreError(
            f"the manifest {manifest.id} has items rdpfix.rdp.restore cannot put back: {', '.join(unknown)}"
        )
    for item in manifest.items:
        # Saved files live in the manifest's own folder, markers in other manifests' folders: nothing else is read.
        name = item.get("file")
        if name is not None and (
            not str(name) or any(char in str(name) for char in "\\/:") or str(name) in (".", "..")
        ):
            raise RestoreError(f"the manifest {manifest.id} names a saved file outside its folder: {name!r}")
        if item.get("kind") == "restores" and not MANIFEST_ID_RE.match(str(item.get("manifest_id") or "")):
            raise RestoreError(f"the manifest {manifest.id} restores {item.get('manifest_id')!r}, not a manifest id")


def newest_first(manifests: t.Iterable[Manifest]) -> list[Manifest]:
    return sorted(manifests, key=lambda manifest: (manifest.created, manifest.id), reverse=True)


# ---------------------------------------------------------------------------------------------------- round trip 1


@dataclass(frozen=True)
class DiscoveryIndex:
    system: int
    listing: int | None  # dir.read_each of the backup root: every manifest and marker (listing only)
    manifests: dict[str, tuple[int, int]]  # id -> (manifest.json, restored.json)


def add_manifest_reads(batch: Batch, root: str, manifest_ids: t.Iterable[str]) -> dict[str, tuple[int, int]]:
    positions: dict[str, tuple[int, int]] = {}
    for manifest_id in manifest_ids:
        directory = manifest_dir(root, manifest_id)
        positions[manifest_id] = (
            batch.add("file.read", path=ntpath.join(directory, MANIFEST_FILE)),
            batch.add("file.read", path=ntpath.join(directory, RESTORED_MARKER)),
        )
    return positions


def build_discovery_batch(root: str, manifest_ids: t.Sequence[str]) -> tuple[Batch, DiscoveryIndex]:
    """Round trip 1: ``system.info`` and either the backup folder's listing (no ids) or the requested manifests."""
    batch = Batch(on_error="continue")
    system = batch.add("system.info")
    names = [MANIFEST_FILE, RESTORED_MARKER, CLAIM_FILE]
    listing = None if manifest_ids else batch.add("dir.read_each", path=root, names=names)
    return batch, DiscoveryIndex(system, listing, add_manifest_reads(batch, root, manifest_ids))


def _fenced(folder: dict[str, t.Any]) -> bool:
    """A folder without manifest claimed by the run that found its batch's answer lost (_outcome.fence): that batch
    never wrote, there is nothing in it to list or restore."""
    files = folder.get("files") or {}
    if files.get(MANIFEST_FILE) is not None or not files.get(CLAIM_FILE):
        return False
    try:
        text = base64.b64decode(str(files[CLAIM_FILE]), validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return False
    return text.startswith(FENCED)


def listed_manifests(result: BatchResult, position: int) -> tuple[BatchResult, dict[str, tuple[int, int]]]:
    """The manifests the listing read (``dir.read_each``), newest first, as ``file.read`` results at positions, so
    ``parse_manifest`` reads them as it reads requested ones. A file that could not be read keeps its error."""
    data = result.data(position)
    folders: dict[str, dict[str, t.Any]] = {}
    for folder in data.get("folders") or []:
        name = str(folder.get("name") or "") if isinstance(folder, dict) else ""
        if MANIFEST_ID_RE.match(name) and not _fenced(folder):
            folders[name] = folder
    reads: list[OpResult] = []
    positions: dict[str, tuple[int, int]] = {}
    for name in sorted(folders, reverse=True):
        files = folders[name].get("files") or {}
        errors = folders[name].get("errors") or {}
        positions[name] = (len(reads), len(reads) + 1)
        for file_name in (MANIFEST_FILE, RESTORED_MARKER):
            if file_name in errors:
                reads.append(OpResult("file.read", False, error_type="ReadError", error_message=str(errors[file_name])))
                continue
            content = files.get(file_name)
            reads.append(OpResult("file.read", True, {"exists": content is not None, "content_b64": content}))
    return BatchResult(result.host, reads), positions


def list_entry(result: BatchResult, positions: tuple[int, int], manifest_id: str, root: str) -> dict[str, t.Any]:
    """One manifest for the list; an unreadable one is listed with its error rather than hidden."""
    try:
        return parse_manifest(result, positions, manifest_id, root).summary()
    except RestoreError as exc:
        match = MANIFEST_ID_RE.match(manifest_id)
        created = _parse_time(match["time"]) if match else None
        return {
            "id": manifest_id,
            "module": f"{MODULE_PREFIX}{match['module']}" if match else None,
            "created": created.strftime("%Y-%m-%dT%H:%M:%SZ") if created else None,
            "path": manifest_dir(root, manifest_id),
            "error": str(exc),
        }


# ---------------------------------------------------------------------------------------------------- round trip 2


def _casefold_key(*parts: str) -> tuple[str, ...]:
    return tuple(part.casefold() for part in parts)


def _is_pin(path: str, name: str) -> bool:
    return name.casefold() == certificate.PIN_VALUE_NAME.casefold() and path.casefold().startswith(
        certificate.WINSTATIONS_KEY.casefold() + "\\"
    )


@dataclass
class Needs:
    """What the state read must cover for a set of manifests."""

    registry: dict[str, list[str]] = field(default_factory=dict)  # path -> value names
    firewall: bool = False
    certificate: bool = False  # the certificate module's read batch: stores My and Remote Desktop, services, sessions
    stores: set[str] = field(default_factory=set)  # other stores
    stats: dict[str, str] = field(default_factory=dict)  # casefolded path -> path
    contents: dict[str, str] = field(default_factory=dict)
    machinekeys: bool = False

    def stat(self, path: str) -> None:
        self.stats.setdefault(path.casefold(), path)

    def read(self, path: str) -> None:
        self.contents.setdefault(path.casefold(), path)


def needs_of(manifests: t.Iterable[Manifest], root: str) -> Needs:
    needs = Needs()
    for manifest in manifests:
        if manifest.machinekeys:
            needs.machinekeys = True
        for item in manifest.items:
            kind = item.get("kind")
            if kind == "registry_value" and not manifest.machinekeys:
                names = needs.registry.setdefault(str(item["path"]), [])
                if str(item["name"]) not in names:
                    names.append(str(item["name"]))
                if _is_pin(str(item["path"]), str(item["name"])):
                    needs.certificate = True
            elif kind == "firewall_rule":
                needs.firewall = True
            elif kind in ("certificate", "certificate_imported") and not manifest.machinekeys:
                needs.certificate = True
                store = str(item.get("store") or "")
                if store not in (certificate.PERSONAL_STORE, certificate.SELF_SIGNED_STORE):
                    needs.stores.add(store)
                if kind == "certificate":
                    needs.read(ntpath.join(manifest.directory, str(item["file"])))
            elif kind == "private_key_file":
                needs.stat(str(item["source"]))
                needs.stat(ntpath.join(manifest.directory, str(item["file"])))
            elif kind == "restores":
                needs.stat(marker_path(root, str(item["manifest_id"])))
            elif kind == "marker_moved":
                needs.stat(str(item["source"]))
                needs.stat(ntpath.join(manifest.directory, str(item["file"])))
            elif kind == "marker_placed":
                needs.stat(str(item["path"]))
            elif kind in ("store_moved", "key_moved"):
                needs.stat(ntpath.join(manifest.directory, str(item["file"])))
                # Where it was moved from: still there when the move never happened (it failed, or never ran).
                if item.get("source"):
                    needs.stat(str(item["source"]))
        if manifest.module == "rdpfix.rdp.certificate":
            needs.certificate = True  # the certificate Windows created after the run
    return needs


@dataclass(frozen=True)
class StateIndex:
    cert: tuple[int, int, certificate.ReadIndex] | None  # offset, length, index within the slice
    machinekeys: tuple[int, int, mk.ReadIndex] | None
    stores: dict[str, int]
    registry: dict[str, int]
    firewall: int | None
    stats: dict[str, int]
    contents: dict[str, int]


def _append(batch: Batch, other: Batch) -> tuple[int, int]:
    offset = len(batch.ops)
    batch.ops.extend(other.ops)
    return offset, len(other.ops)


def add_state_reads(batch: Batch, needs: Needs, program_data: str, now: datetime) -> StateIndex:
    """The reads of everything the manifests touch (read-only); used before the first restore and after each."""
    cert = None
    if needs.certificate:
        cert_batch, cert_index = certificate.build_read_batch(certificate.CertificateOptions())
        cert = (*_append(batch, cert_batch), cert_index)
    keys = None
    if needs.machinekeys:
        mk_batch, mk_index = mk.build_read_batch(mk.Options(), now, program_data)
        keys = (*_append(batch, mk_batch), mk_index)
    return StateIndex(
        cert=cert,
        machinekeys=keys,
        stores={store: batch.add("cert.list", store=store) for store in sorted(needs.stores)},
        registry={path: batch.add("registry.get", path=path, names=names) for path, names in needs.registry.items()},
        firewall=batch.add("firewall.rules.list") if needs.firewall else None,
        stats={key: batch.add("file.stat", path=path) for key, path in needs.stats.items()},
        contents={key: batch.add("file.read", path=path) for key, path in needs.contents.items()},
    )


def build_state_batch(needs: Needs, program_data: str, now: datetime) -> tuple[Batch, StateIndex]:
    batch = Batch(on_error="continue")
    return batch, add_state_reads(batch, needs, program_data, now)


@dataclass(frozen=True)
class FileState:
    exists: bool
    sha256: str | None = None
    sddl: str | None = None
    size: int | None = None

    def view(self) -> dict[str, t.Any] | None:
        return {"sha256": self.sha256, "sddl": self.sddl} if self.exists else None


@dataclass(frozen=True)
class HostState:
    """What the manifests touch, as the host shows it now."""

    cert: certificate.HostState | None
    keys: mk.State | None
    stores: dict[str, tuple[certificate.StoredCertificate, ...]]
    registry: dict[tuple[str, ...], dict[str, t.Any] | None]  # (path, name) casefolded -> {type, value} or None
    rules: dict[str, dict[str, t.Any]] | None  # casefolded Name -> rule record
    files: dict[str, FileState]  # casefolded path
    contents: dict[str, bytes | None]
    read_errors: tuple[str, ...] = ()

    def certificates(self, store: str) -> tuple[certificate.StoredCertificate, ...]:
        if self.cert is not None and store == certificate.SELF_SIGNED_STORE:
            return self.cert.self_signed
        if self.cert is not None and store == certificate.PERSONAL_STORE:
            return self.cert.personal
        return self.stores.get(store, ())

    def find(self, store: str, thumbprint: str) -> certificate.StoredCertificate | None:
        wanted = thumbprint.upper()
        return next((cert for cert in self.certificates(store) if cert.thumbprint == wanted), None)

    def file(self, path: str) -> FileState:
        return self.files.get(path.casefold(), FileState(False))

    def value(self, path: str, name: str) -> dict[str, t.Any] | None:
        return self.registry.get(_casefold_key(path, name))


def _slice(result: BatchResult, offset: int, length: int) -> BatchResult:
    return BatchResult(result.host, result.results[offset : offset + length])


def _error(result: BatchResult, position: int) -> str | None:
    item = result[position]
    if item.ok:
        return None
    if item.skipped:
        return f"{item.op}: not run"
    return f"{item.op}: {item.error_type or 'Failed'}: {item.error_message or ''}".rstrip(": ")


def parse_state(result: BatchResult, index: StateIndex, needs: Needs, now: datetime, program_data: str) -> HostState:
    errors: list[str] = []
    cert_state = None
    if index.cert is not None:
        offset, length, cert_index = index.cert
        cert_state = certificate.parse_state(_slice(result, offset, length), cert_index, now)
        errors += cert_state.read_errors
    keys = None
    if index.machinekeys is not None:
        offset, length, mk_index = index.machinekeys
        keys = mk.parse_state(_slice(result, offset, length), mk_index, now, program_data)
        errors += keys.read_errors
    stores: dict[str, tuple[certificate.StoredCertificate, ...]] = {}
    for store, position in index.stores.items():
        item = result[position]
        if item.ok:
            listed = [cert for cert in item.data.get("certificates") or [] if isinstance(cert, dict)]
            stores[store] = tuple(certificate.StoredCertificate.from_agent(store, cert, now) for cert in listed)
        else:
            errors.append(_error(result, position) or "")
    registry: dict[tuple[str, ...], dict[str, t.Any] | None] = {}
    for path, position in index.registry.items():
        item = result[position]
        if not item.ok:
            errors.append(_error(result, position) or "")
            continue
        values = {str(name).casefold(): value for name, value in (item.data.get("values") or {}).items()}
        for name in needs.registry.get(path, []):
            found = values.get(name.casefold())
            registry[_casefold_key(path, name)] = found if isinstance(found, dict) else None
    rules = None
    if index.firewall is not None:
        item = result[index.firewall]
        if item.ok:
            listed_rules = [rule for rule in item.data.get("rules") or [] if isinstance(rule, dict)]
            # Only the local store's rules were changed and can be put back; Group Policy's are its own.
            rules = {
                str(rule.get("name") or "").casefold(): rule
                for rule in listed_rules
                if str(rule.get("policy_store_source_type") or "Local").casefold() == "local"
            }
        else:
            errors.append(_error(result, index.firewall) or "")
    files: dict[str, FileState] = {}
    for key, position in index.stats.items():
        item = result[position]
        if not item.ok:
            errors.append(_error(result, position) or "")
            continue
        data = item.data
        size = data.get("size")
        files[key] = FileState(
            bool(data.get("exists")),
            data.get("sha256"),
            data.get("sddl") or None,
            size if isinstance(size, int) and not isinstance(size, bool) else None,
        )
    contents: dict[str, bytes | None] = {}
    for key, position in index.contents.items():
        item = result[position]
        if not item.ok:
            errors.append(_error(result, position) or "")
            continue
        try:
            body = base64.b64decode(str(item.data.get("content_b64") or ""), validate=True)
        except (binascii.Error, ValueError):
            body = b""
        contents[key] = body if item.data.get("exists") else None
    return HostState(cert_state, keys, stores, registry, rules, files, contents, tuple(errors))


# ---------------------------------------------------------------------------------------------------- plan


# A target is what a step changes, as a tuple: ("registry", path, name), ("firewall", name), ("store", name),
# ("file", path), ("marker", path), ("machinekeys",). Its value is what the diff shows before and after.
Target = tuple[str, ...]


def observe(state: HostState, target: Target) -> t.Any:
    """The current value of a target, in the shape of the diff."""
    kind = target[0]
    if kind == "registry":
        return state.value(target[1], target[2])
    if kind == "firewall":
        return (state.rules or {}).get(target[1].casefold())
    if kind == "store":
        return sorted(cert.thumbprint for cert in state.certificates(target[1]))
    if kind in ("file", "marker"):
        found = state.file(target[1])
        return found.view() if kind == "file" else found.exists
    if kind == "machinekeys":
        return mk.view(state.keys) if state.keys is not None else None
    raise ValueError(f"unknown target {target!r}")


def label(target: Target) -> str:
    kind = target[0]
    if kind == "registry":
        return f"registry {target[1]}\\{target[2]}"
    if kind == "firewall":
        return f"firewall rule {target[1]}"
    if kind == "store":
        return f"certificates LocalMachine\\{target[1]}"
    if kind == "file":
        return f"file {target[1]}"
    if kind == "marker":
        return f"restored marker {target[1]}"
    return "machinekeys"


@dataclass(frozen=True)
class Step:
    op: str
    args: dict[str, t.Any]
    action: str
    description: str
    # The item of the restore's own manifest this step carries out (its status: BackupSet.carry), if any.
    carries: int | None = None


@dataclass
class ManifestPlan:
    """How one manifest comes back: the saves (before the new manifest is written) and the steps (after it)."""

    manifest: Manifest
    backup: BackupSet
    saves: Batch = field(default_factory=lambda: Batch(on_error="stop"))
    steps: list[Step] = field(default_factory=list)
    before: dict[Target, t.Any] = field(default_factory=dict)
    after: dict[Target, t.Any] = field(default_factory=dict)
    restart_service: str | None = None
    reboot_required: bool = False
    restart_required: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    machinekeys: mk.RestorePlan | None = None
    # Certificates the restore imports, by thumbprint: their DER (to predict what Windows makes of them).
    imported_der: dict[str, bytes] = field(default_factory=dict)

    @property
    def has_changes(self) -> bool:
        return bool(self.steps) or (self.machinekeys is not None and self.machinekeys.has_changes)

    def step(self, op: str, action: str, description: str, /, carries: int | None = None, **args: t.Any) -> None:
        self.steps.append(Step(op, args, action, description, carries))

    def change(self, state: HostState, target: Target, value: t.Any) -> None:
        """Record the value ``target`` will have after the restore (its current value is taken once)."""
        if target not in self.before:
            self.before[target] = observe(state, target)
        self.after[target] = value

    def predicted(self, state: HostState, target: Target) -> t.Any:
        return self.after[target] if target in self.after else observe(state, target)

    def actions(self, status: str) -> list[dict[str, t.Any]]:
        if self.machinekeys is not None:
            listed = [dict(action) for action in self.machinekeys.actions]
            listed += [{"action": step.action, "description": step.description} for step in self.steps]
        else:
            listed = [{"action": step.action, "description": step.description} for step in self.steps]
        if self.restart_service:
            listed.append(
                {
                    "action": "restart_service",
                    "service": self.restart_service,
                    "description": f"restart {self.restart_service} so the listener reads the pinned certificate",
                }
            )
        return [action | {"manifest_id": self.manifest.id, "status": status} for action in listed]

    def diff(self) -> tuple[dict[str, t.Any], dict[str, t.Any]]:
        before = {label(target): value for target, value in self.before.items()}
        after = {label(target): value for target, value in self.after.items()}
        return before, after


def plan_manifest(state: HostState, manifest: Manifest, root: str, backup: BackupSet, options: Options) -> ManifestPlan:
    """Plan putting ``manifest`` back on a host in ``state``; raises RestoreError when that cannot be done exactly."""
    if state.read_errors:
        raise RestoreError("part of the host's state could not be read: " + "; ".join(state.read_errors))
    check_restorable(manifest)
    result = ManifestPlan(manifest, backup)
    # A value, rule, ACL or move the manifest says was never done (status failed or not_run) has nothing to put back;
    # the rest - done, only planned (the batch stopped before its done-record), version 1 - is judged on the host.
    # (Moves are machinekeys' restore's to judge and name: _plan_machinekeys.)
    skipped = [item for item in manifest.items if mk.never_done(item) and item.get("kind") not in mk.MOVE_KINDS]
    done = replace(manifest, items=tuple(item for item in manifest.items if item not in skipped))
    for item in skipped:
        what = item.get("name") or item.get("path") or item.get("kind")
        result.warnings.append(
            f"{item.get('kind')} {what} was not changed by {manifest.id} (its change {item.get('status')}): nothing "
            "of it to put back"
        )
    if manifest.machinekeys:
        _plan_machinekeys(state, done, root, result)  # its batch records "restores" itself
    else:
        backup.record("restores", manifest_id=manifest.id)
        _plan_certificates(state, done, result)
        _plan_registry(state, done, result, options)
        _plan_firewall(state, done, result)
    _plan_markers(state, done, root, result)
    backup.planned_actions = [str(action["description"]) for action in result.actions("planned")]
    return result


def move_not_done(state: HostState, manifest: Manifest, item: dict[str, t.Any]) -> bool:
    """Whether a ``store_moved`` / ``key_moved`` item of ``manifest`` was never carried out
    (``_machinekeys.move_not_done``: its status, or for ``planned`` and version 1 the host)."""
    saved = state.file(ntpath.join(manifest.directory, str(item["file"])))
    source = state.file(str(item.get("source") or ""))
    return mk.move_not_done(item, saved.exists, source.exists, source.size)


def _plan_machinekeys(state: HostState, manifest: Manifest, root: str, result: ManifestPlan) -> None:
    if state.keys is None:
        raise RestoreError(f"the key store was not read for {manifest.id}")
    skipped: list[dict[str, t.Any]] = []
    for item in manifest.items:
        if item.get("kind") in ("store_moved", "key_moved"):
            saved = ntpath.join(manifest.directory, str(item["file"]))
            if move_not_done(state, manifest, item):
                # Nothing of it to put back: the rest of the manifest is restored.
                skipped.append(item)
                result.warnings.append(
                    f"{item.get('source')} was not moved by {manifest.id} (its run stopped before or at that move): "
                    "it is where it was, nothing of it to put back"
                )
                continue
            if not state.file(saved).exists:
                # machinekeys' restore moves a saved store back into place: a later restore holds it now.
                raise RestoreError(
                    f"{saved} is no longer in the backup (an earlier restore put it back, and a later one saved it "
                    "again under its own manifest): restore the newest manifest that holds it instead"
                )
    raw = manifest.raw()
    raw["items"] = [item for item in raw["items"] if item not in skipped]
    result.machinekeys = mk.plan_restore(state.keys, raw, root, result.backup)
    if result.machinekeys.has_changes:
        result.change(state, ("machinekeys",), {"restored_from": manifest.id})


# --- certificates and their key files


def regenerated(manifest: Manifest) -> bool:
    """Whether a certificate run made Windows create a self-signed certificate.

    The certificate planner restarts a service for two reasons only: a regeneration, or re-reading a removed pin (which
    always leaves a ``registry_value`` item). So a regeneration shows as removed ``Remote Desktop`` certificates, or as
    a manifest without items (the certificate was missing: nothing to save, only the restart).
    """
    if manifest.module != "rdpfix.rdp.certificate":
        return False
    removed = [item for item in manifest.items if item.get("kind") == "certificate"]
    return not manifest.items or any(item.get("store") == certificate.SELF_SIGNED_STORE for item in removed)


def _windows_created(state: HostState, manifest: Manifest, removed: set[str]) -> list[certificate.StoredCertificate]:
    """Self-signed certificates Windows created in answer to a certificate run (see the module docstring)."""
    if not regenerated(manifest):
        return []
    earliest = manifest.created - REGENERATION_BACKDATE - REGENERATION_SLACK
    latest = manifest.created + REGENERATION_WINDOW
    found = []
    for cert in state.certificates(certificate.SELF_SIGNED_STORE):
        if cert.thumbprint in removed or cert.summary is None:
            continue
        not_before = _parse_time(cert.summary.get("not_before"))
        if not_before is not None and earliest <= not_before <= latest:
            found.append(cert)
    return found


def _key_owner(state: HostState, path: str) -> str | None:
    """The certificate whose private key is the file at ``path``, if one of the read stores has it."""
    for store in (certificate.SELF_SIGNED_STORE, certificate.PERSONAL_STORE, *state.stores):
        for cert in state.certificates(store):
            if str((cert.key or {}).get("path") or "").casefold() == path.casefold():
                return cert.thumbprint
    return None


# The ACL a restored key file has while certutil -repairstore re-links it (the key provider opens it with the caller's
# token, without backup semantics); its recorded ACL replaces it right after.
RELINK_KEY_SDDL = "O:SYG:SYD:P(A;;FA;;;SY)(A;;FA;;;BA)"


def _plan_certificates(state: HostState, manifest: Manifest, result: ManifestPlan) -> None:
    items = manifest.items
    backup = result.backup
    cert_items = [item for item in items if item.get("kind") == "certificate"]
    key_items = [item for item in items if item.get("kind") == "private_key_file"]
    recorded = {str(item.get("thumbprint") or "").upper() for item in cert_items}
    copy_targets = {str(item["source"]).casefold() for item in key_items}

    # 1. Certificates to take out: the ones a restore imported, and the one Windows created after a certificate run.
    removals: list[tuple[certificate.StoredCertificate, bool]] = []
    for item in items:
        if item.get("kind") == "certificate_imported":
            found = state.find(str(item["store"]), str(item["thumbprint"]))
            if found is not None:
                removals.append((found, False))
    removals += [(cert, True) for cert in _windows_created(state, manifest, recorded)]
    for cert, move_key in removals:
        target: Target = ("store", cert.store)
        certificate.save_certificate(result.saves, backup, cert)
        saved_cert = backup.last_item
        key = cert.key or {}
        key_path = str(key.get("path") or "")
        if move_key and key_path and key.get("exists") and key_path.casefold() not in copy_targets:
            # Windows created this key file with the certificate: it goes into the backup with it.
            name = f"{cert.thumbprint}.key"
            moved = backup.record(
                "private_key_file",
                file=name,
                source=key_path,
                thumbprint=cert.thumbprint,
                sddl=key.get("sddl"),
                owner=key.get("owner"),
            )
            result.step(
                "file.move",
                "move_key",
                f"move the key file {key_path} of {cert.thumbprint} into the backup",
                carries=moved,
                src=key_path,
                dest=ntpath.join(backup.directory, name),
            )
            result.change(state, ("file", key_path), None)
        result.step(
            "cert.remove",
            "remove_certificate",
            f"remove {cert.label()} from LocalMachine\\{cert.store} (created after the restored run; saved first)",
            carries=saved_cert,
            store=cert.store,
            thumbprint=cert.thumbprint,
        )
        result.change(state, target, [thumb for thumb in result.predicted(state, target) if thumb != cert.thumbprint])

    # 2. Key files back, before the certificates are re-linked to them. Their recorded ACLs go on only after the
    # re-link: certutil -repairstore opens the key through its provider, with the caller's token and without backup
    # semantics, so a key file whose ACL names no Administrators (build 17763 and later) could not be re-linked.
    acl_steps: dict[str, tuple[str, str]] = {}
    relink_files: dict[str, tuple[str, str]] = {}  # thumbprint -> (key file, the ACL it ends with)
    prepared: set[str] = set()  # key files already given the temporary ACL
    for item in key_items:
        source = str(item["source"])
        saved_path = ntpath.join(manifest.directory, str(item["file"]))
        saved = state.file(saved_path)
        current = state.file(source)
        if not saved.exists:
            raise RestoreError(f"the saved key file {saved_path} of {manifest.id} is missing")
        sddl = item.get("sddl") or current.sddl
        if sddl and item.get("thumbprint"):
            relink_files[str(item["thumbprint"]).upper()] = (source, str(sddl))
        if current.exists and saved.sha256 is not None and current.sha256 == saved.sha256 and current.sddl == sddl:
            continue
        replaced: int | None = None
        if current.exists:
            name = f"{ntpath.basename(source)}.replaced.key"
            backup.save_file_copy(
                result.saves, source, name, "private_key_file", thumbprint=_key_owner(state, source), sddl=current.sddl
            )
            replaced = backup.last_item
        if current.exists:
            # The copy replaces the file in place and takes over its ACL, which from build 17763 names no
            # Administrators (not even READ_CONTROL): SYSTEM and Administrators first, the recorded ACL at the end.
            result.step(
                "acl.set",
                "set_acl",
                f"let the copy and the re-link open {source}: SYSTEM and Administrators only until its ACL is restored",
                carries=replaced,
                path=source,
                sddl=RELINK_KEY_SDDL,
            )
            prepared.add(source.casefold())
        result.step(
            "file.copy", "restore_key", f"put the key file {source} back", carries=replaced, src=saved_path, dest=source
        )
        if sddl:
            acl_steps[source.casefold()] = (source, str(sddl))
        else:
            result.warnings.append(
                f"the ACL of {source} was not recorded by {manifest.module}: the restored key file has the ACL "
                "Windows gives a new file there; check it with rdpfix.rdp.machinekeys"
            )
        result.change(state, ("file", source), {"sha256": saved.sha256, "sddl": sddl or None})

    # 3. Certificates back, re-linked to their key files.
    saved_keys = {str(item.get("thumbprint") or "").upper() for item in key_items}
    for item in cert_items:
        store = str(item["store"])
        thumbprint = str(item["thumbprint"]).upper()
        present = state.find(store, thumbprint)
        with_key = bool(item.get("has_private_key"))
        if present is None:
            body = state.contents.get(ntpath.join(manifest.directory, str(item["file"])).casefold())
            if not body:
                raise RestoreError(f"the saved certificate {item['file']} of {manifest.id} is missing")
            imported = backup.record("certificate_imported", store=store, thumbprint=thumbprint)
            result.step(
                "cert.import",
                "import_certificate",
                f"put the certificate {thumbprint} back into LocalMachine\\{store}",
                carries=imported,
                store=store,
                der_b64=base64.b64encode(body).decode("ascii"),
            )
            result.imported_der[thumbprint] = body
            target = ("store", store)
            result.change(state, target, sorted([*result.predicted(state, target), thumbprint]))
        if with_key and thumbprint not in saved_keys:
            # The run found no key file to save (its key was missing or empty: what it repaired): there is nothing to
            # link the certificate to, so it comes back without its dangling key link - said before the restore.
            result.warnings.append(
                f"the certificate {thumbprint} had no key file when the run removed it: it comes back without a key "
                "link (there is nothing to link it to), as unusable as it was"
            )
        elif with_key and (present is None or not present.has_private_key):
            relink = relink_files.get(thumbprint)
            if relink is not None and relink[0].casefold() not in prepared:
                # An overwritten file keeps its ACL, which from build 17763 names no Administrators: certutil could
                # not open the key. SYSTEM and Administrators only while it re-links, then the recorded ACL.
                result.step(
                    "acl.set",
                    "set_acl",
                    f"let the re-link open {relink[0]}: SYSTEM and Administrators only until its ACL is restored",
                    path=relink[0],
                    sddl=RELINK_KEY_SDDL,
                )
            result.step(
                "cert.repair_key_link",
                "link_key",
                f"link {thumbprint} to its key file again (certutil -repairstore)",
                store=store,
                thumbprint=thumbprint,
            )
            if relink is not None:
                acl_steps.pop(relink[0].casefold(), None)
                result.step("acl.set", "set_acl", f"give {relink[0]} its ACL", path=relink[0], sddl=relink[1])

    # 4. The other restored key files' own ACLs.
    for source, sddl in acl_steps.values():
        result.step("acl.set", "set_acl", f"give {source} its ACL", path=source, sddl=sddl)


# --- registry values


def _same_value(left: dict[str, t.Any] | None, right: dict[str, t.Any] | None) -> bool:
    if left is None or right is None:
        return left is None and right is None
    if left.get("type") != right.get("type"):
        return False
    if left.get("type") == "REG_BINARY":
        return str(left.get("value") or "").lower() == str(right.get("value") or "").lower()
    return bool(left.get("value") == right.get("value"))


def _plan_registry(state: HostState, manifest: Manifest, result: ManifestPlan, options: Options) -> None:
    for item in manifest.items:
        if item.get("kind") != "registry_value":
            continue
        path, name = str(item["path"]), str(item["name"])
        previous = item.get("previous")
        previous = previous if isinstance(previous, dict) else None
        current = state.value(path, name)
        if _same_value(current, previous):
            continue
        recorded = result.backup.record("registry_value", path=path, name=name, previous=current)
        where = f"{path}\\{name}"
        if previous is None:
            result.step(
                "registry.remove",
                "remove_value",
                f"remove {where} (absent before the run)",
                carries=recorded,
                path=path,
                name=name,
            )
        else:
            result.step(
                "registry.set",
                "set_value",
                f"set {where} back to {previous.get('value')!r} ({previous.get('type')})",
                carries=recorded,
                path=path,
                name=name,
                type=previous.get("type"),
                value=previous.get("value"),
            )
        result.change(state, ("registry", path, name), previous)
        folded = path.casefold()
        if _is_pin(path, name):
            result.restart_service = options.restart_service
        if any(folded.startswith(key.casefold()) for key in (SCHANNEL_PROTOCOLS_KEY, CIPHER_POLICY_KEY, FIPS_KEY)):
            result.reboot_required = True
        if folded == POLICY_KEY.casefold() and name.casefold() == SELECT_TRANSPORT.casefold():
            result.restart_required = ["TermService"]


# --- firewall rules


def _new_rule_args(record: dict[str, t.Any]) -> dict[str, t.Any]:
    group = str(record.get("group") or "")
    if not group:
        raise RestoreError(f"the firewall rule {record.get('name')!r} has no group and cannot be re-created")
    args: dict[str, t.Any] = {
        "name": str(record["name"]),
        "display_name": str(record.get("display_name") or record["name"]),
        "group": group,
        "direction": str(record.get("direction") or "Inbound"),
        "action": str(record.get("action") or "Allow"),
        "enabled": bool(record.get("enabled")),
        "profiles": int(record.get("profiles") or 0),
        "protocol": str(record.get("protocol") or "Any"),
        # The manifest holds the rule record as firewall.rules.list gave it: lists, or an agent defect to refuse.
        "local_ports": contract_string_list(
            "firewall.rules.list", "a backed-up rule's local_ports", record.get("local_ports")
        ),
        "remote_addresses": contract_string_list(
            "firewall.rules.list", "a backed-up rule's remote_addresses", record.get("remote_addresses")
        ),
        "program": str(record.get("program") or "Any"),
        # The rule record does not carry the description: rdpfix's own rules get theirs back, others a note.
        "description": OWN_RULE_DESCRIPTION if group == OWN_GROUP else "Re-created by rdpfix.rdp.restore",
    }
    service = str(record.get("service") or "Any")
    if service.casefold() not in ("any", "*"):
        args["service"] = service
    return args


def _recreated_record(args: dict[str, t.Any]) -> dict[str, t.Any]:
    """The rule record ``firewall.rules.list`` will show for a rule created with ``args``."""
    return {
        "name": args["name"],
        "display_name": args["display_name"],
        "group": args["group"],
        "direction": args["direction"],
        "action": args["action"],
        "enabled": args["enabled"],
        "profiles": args["profiles"],
        "protocol": args["protocol"],
        "local_ports": args["local_ports"],
        "remote_ports": ["Any"],
        "remote_addresses": args["remote_addresses"],
        "program": args["program"],
        "service": args.get("service", "Any"),
        "policy_store_source_type": "Local",
    }


def _plan_firewall(state: HostState, manifest: Manifest, result: ManifestPlan) -> None:
    for item in manifest.items:
        if item.get("kind") != "firewall_rule":
            continue
        name = str(item["name"])
        previous = item.get("previous") if isinstance(item.get("previous"), dict) else None
        current = (state.rules or {}).get(name.casefold())
        target: Target = ("firewall", name)
        if item.get("operation") == "firewall.rule.new" or previous is None:
            # The run created the rule: it goes, its record into the new manifest.
            if current is None:
                continue
            recorded = result.backup.record(
                "firewall_rule", name=name, operation="firewall.rule.remove", previous=current
            )
            result.step(
                "firewall.rule.remove",
                "remove_rule",
                f"remove the rule {name!r} the run created",
                carries=recorded,
                name=name,
            )
            result.change(state, target, None)
            continue
        if current is None:
            args = _new_rule_args(previous)
            remote_ports = contract_string_list(
                "firewall.rules.list", "a backed-up rule's remote_ports", previous.get("remote_ports")
            )
            if remote_ports != ["Any"]:
                result.warnings.append(
                    f"the firewall rule {name!r} is re-created without its remote port filter "
                    f"{previous.get('remote_ports')}: firewall.rule.new does not set remote ports"
                )
            recorded = result.backup.record("firewall_rule", name=name, operation="firewall.rule.new", previous=None)
            result.step(
                "firewall.rule.new",
                "create_rule",
                f"re-create the rule {name!r} the run removed",
                carries=recorded,
                **args,
            )
            result.change(state, target, _recreated_record(args))
            continue
        fields = {key: previous[key] for key in RULE_SETTABLE if key in previous and previous[key] != current.get(key)}
        fixed = [key for key in RULE_FIXED if key in previous and previous[key] != current.get(key)]
        if fixed:
            result.warnings.append(
                f"the firewall rule {name!r} also differs in {', '.join(fixed)}, which firewall.rule.set cannot "
                "change: those stay as they are"
            )
        if not fields:
            continue
        recorded = result.backup.record("firewall_rule", name=name, operation="firewall.rule.set", previous=current)
        changed = ", ".join(f"{key}={value!r}" for key, value in fields.items())
        result.step(
            "firewall.rule.set",
            "set_rule",
            f"put the rule {name!r} back: {changed}",
            carries=recorded,
            name=name,
            **fields,
        )
        result.change(state, target, {**current, **fields})


# --- restored markers


def _plan_markers(state: HostState, manifest: Manifest, root: str, result: ManifestPlan) -> None:
    """Undoing a restore makes the manifest it restored restorable again (its marker moves into the new backup)."""
    for item in manifest.items:
        kind = item.get("kind")
        if kind == "restores":
            path = marker_path(root, str(item["manifest_id"]))
            if state.file(path).exists:
                _move_marker_aside(state, result, path, str(item["manifest_id"]))
        elif kind == "marker_placed":
            path = str(item["path"])
            if state.file(path).exists:
                _move_marker_aside(state, result, path, ntpath.basename(ntpath.dirname(path)))
        elif kind == "marker_moved":
            path = str(item["source"])
            saved = ntpath.join(manifest.directory, str(item["file"]))
            if state.file(saved).exists and not state.file(path).exists:
                recorded = result.backup.record("marker_placed", path=path)
                result.step(
                    "file.move",
                    "mark_restored",
                    f"mark {ntpath.basename(ntpath.dirname(path))} restored again",
                    carries=recorded,
                    src=saved,
                    dest=path,
                )
                result.change(state, ("marker", path), True)


def _move_marker_aside(state: HostState, result: ManifestPlan, path: str, manifest_id: str) -> None:
    name = f"restored-{manifest_id}.json"
    recorded = result.backup.record("marker_moved", source=path, file=name)
    result.step(
        "file.move",
        "unmark_restored",
        f"mark {manifest_id} as not restored (its restore is undone)",
        carries=recorded,
        src=path,
        dest=ntpath.join(result.backup.directory, name),
    )
    result.change(state, ("marker", path), False)


# ---------------------------------------------------------------------------------------------------- exactness


# Services Windows needs to create a self-signed certificate besides the one restarted [AzEvent][InternalErr][Repair].
RENEWAL_SERVICES = ("CertPropSvc", "KeyIso", "CryptSvc")


@dataclass(frozen=True)
class Renewal:
    """A restore whose restart makes Windows replace the self-signed certificate(s) it puts back: not exact."""

    manifest_id: str
    service: str
    certificates: tuple[str, ...]

    def describe(self) -> str:
        restored = ", ".join(self.certificates) or "none: the store would be empty"
        return (
            f"{self.manifest_id} restarts {self.service} (to re-read the restored pin), and with no valid self-signed "
            f"certificate in LocalMachine\\Remote Desktop (restored: {restored}) that restart makes Windows create a "
            "new one: the host would end neither as it was nor as it is"
        )


def predicted_renewals(state: HostState, plans: t.Sequence[ManifestPlan], now: datetime) -> list[Renewal]:
    """Where the restore cannot be exact, predicted before anything is changed.

    Starting SessionEnv or TermService makes Windows create a self-signed certificate when LocalMachine\\Remote
    Desktop holds no valid one [AzEvent][InternalErr][Repair]. A plan that restarts a service (a restored pin) after
    putting back only expired (or no) self-signed certificates would therefore end in a third state. The plans are
    followed in order, each one's store changes applied to the next; without the services a renewal needs, Windows
    creates nothing and the restore stays exact.
    """
    if state.cert is None:
        return []
    services = state.cert.services
    if not all((services.get(name) or {}).get("status") == "Running" for name in RENEWAL_SERVICES):
        return []
    target: Target = ("store", certificate.SELF_SIGNED_STORE)
    store: dict[str, dict[str, t.Any] | None] = {
        cert.thumbprint: cert.summary for cert in state.certificates(certificate.SELF_SIGNED_STORE)
    }
    found: list[Renewal] = []
    for plan in plans:
        if target in plan.after:
            before, after = set(plan.before.get(target) or []), set(plan.after[target] or [])
            for thumbprint in before - after:
                store.pop(thumbprint, None)
            for thumbprint in after - before:
                der = plan.imported_der.get(thumbprint)
                try:
                    store[thumbprint] = summarize_certificate(der, now) if der else None
                except ValueError:
                    store[thumbprint] = None
        if plan.restart_service not in certificate.RESTARTABLE_SERVICES:
            continue
        if any(summary is not None and not summary["expired"] for summary in store.values()):
            continue
        restored = tuple(
            f"{thumbprint} (expired {summary['not_after']})" if summary else f"{thumbprint} (unreadable)"
            for thumbprint, summary in store.items()
        )
        found.append(Renewal(plan.manifest.id, str(plan.restart_service), restored))
    return found


def disabled_restarts(state: HostState, plans: t.Sequence[ManifestPlan]) -> list[str]:
    """The services the plans would restart that are disabled: a restart would stop them for good."""
    if state.cert is None:
        return []
    found: list[str] = []
    for plan in plans:
        name = plan.restart_service
        if name and name not in found:
            info = state.cert.services.get(name) or {}
            if info.get("exists") and info.get("start_type") == "Disabled":
                found.append(name)
    return found


def renewed_certificates(state: HostState, plan: ManifestPlan, now: datetime) -> list[str]:
    """Valid self-signed certificates the re-read store holds that the plan did not put there (Windows' renewal)."""
    target: Target = ("store", certificate.SELF_SIGNED_STORE)
    put_back = set(plan.after.get(target) or observe(state, target))
    return [
        cert.thumbprint
        for cert in state.certificates(certificate.SELF_SIGNED_STORE)
        if cert.thumbprint not in put_back and cert.summary is not None and not cert.summary["expired"]
    ]


def store_differences(state: HostState, plan: ManifestPlan) -> list[str]:
    """Certificate stores the re-read state shows otherwise than the plan put them back (Windows acted on its own)."""
    return [
        f"{label(target)} holds {observe(state, target)}, not {plan.after[target]}"
        for target in plan.after
        if target[0] == "store" and sorted(observe(state, target)) != sorted(plan.after[target] or [])
    ]


# ---------------------------------------------------------------------------------------------------- sessions


def pending_restart(state: HostState, plan: ManifestPlan, options: Options) -> list[dict[str, t.Any]]:
    """The RDP sessions a TermService restart of this plan would disconnect, when the user did not allow it."""
    if plan.restart_service != "TermService" or options.allow_session_disruption or state.cert is None:
        return []
    return certificate.disrupted_sessions(state.cert)


# ---------------------------------------------------------------------------------------------------- apply


@dataclass(frozen=True)
class ApplyIndex:
    manifest: int  # a failure at or before this position means nothing was changed
    last_change: int  # the marker on the original manifest; after it come the re-reads
    reads: StateIndex


def build_apply_batch(
    state: HostState, plan: ManifestPlan, root: str, *, needs: Needs, program_data: str, now: datetime
) -> tuple[Batch, ApplyIndex]:
    """One ``on_error: stop`` batch: the new backup and its manifest, the steps, the marker, then the state re-read."""
    if plan.machinekeys is not None and state.keys is not None:
        # machinekeys' own batch (its backup, undo, marker and key folder re-reads), this planner's marker moves added
        # after its steps.
        steps = plan.steps
        own = len(plan.machinekeys.ops)
        restore = mk.RestorePlan(
            actions=[*plan.machinekeys.actions, *({"action": s.action, "description": s.description} for s in steps)],
            ops=[*plan.machinekeys.ops, *((step.op, step.args) for step in steps)],
            save_certificates=list(plan.machinekeys.save_certificates),
            carries={
                **plan.machinekeys.carries,
                **{own + n: step.carries for n, step in enumerate(steps) if step.carries is not None},
            },
        )
        batch, manifest, store, _cng = mk.build_restore_batch(state.keys, restore, plan.manifest.id, root, plan.backup)
        last_change = store - 1  # the marker on the original manifest
    else:
        batch = Batch(on_error="stop")
        plan.backup.begin(batch)
        batch.ops.extend(plan.saves.ops)
        manifest = plan.backup.finish(batch)
        for step in plan.steps:
            position = batch.add(step.op, **step.args)
            if step.carries is not None:
                plan.backup.carry(step.carries, position)
        if plan.restart_service:
            batch.add("service.restart", name=plan.restart_service, force=plan.restart_service == "TermService")
        # The done-record (the restore's manifest again, every item it carried out done), then the marker.
        plan.backup.finish_done(batch)
        marker = json.dumps({"restored_by": plan.backup.manifest_id, "time": plan.backup.created}).encode("utf-8")
        last_change = batch.add(
            "file.write",
            path=marker_path(root, plan.manifest.id),
            content_b64=base64.b64encode(marker).decode("ascii"),
        )
    return batch, ApplyIndex(manifest, last_change, add_state_reads(batch, needs, program_data, now))


def after_view(state: HostState, plan: ManifestPlan) -> dict[str, t.Any]:
    """The re-read values of everything the plan changed."""
    return {label(target): observe(state, target) for target in plan.after}


def remaining(state: HostState, manifest: Manifest, root: str, options: Options) -> list[str]:
    """What a fresh plan would still change after the restore: empty when everything came back (generic items)."""
    if manifest.machinekeys:
        return []
    scratch = BackupSet("check", "", MODULE, "", "")
    try:
        again = plan_manifest(state, manifest, root, scratch, options)
    except RestoreError as exc:
        return [str(exc)]
    return [step.description for step in again.steps if step.action not in ("unmark_restored", "mark_restored")]


def result_summary(manifest: Manifest, status: str, backup: BackupSet | None = None) -> dict[str, t.Any]:
    return {
        "id": manifest.id,
        "module": manifest.module,
        "created": manifest.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "status": status,
        "restored_by": (manifest.restored or {}).get("restored_by"),
        "backup": backup.manifest_id if backup is not None else None,
    }


def backup_times(now: datetime, count: int) -> list[datetime]:
    """One creation time per new manifest, a second apart, so their ids sort in the order they were made."""
    return [now + timedelta(seconds=position) for position in range(count)]
