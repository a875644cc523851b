# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The self-test: every read operation of the agent once, each answer checked against its JSON Schema, and a report.

Pure functions: ``first_batch`` and ``second_batch`` build the two read batches, ``build_report`` turns their results
into the report a user attaches to a bug report. The schemas live in ``_op_schemas.json`` next to this file; the tests
validate the lab's answers with the same file, so the lab and a real host are held to one shape contract.

The validator here implements the part of JSON Schema (draft 2020-12) the schema file uses - ``type``, ``enum``,
``const``, ``pattern``, ``minimum``/``maximum``, ``minItems``, ``properties``/``required``/``additionalProperties``,
``items``, ``anyOf`` and local ``$ref`` - so the collection needs no extra package on the controller. The tests check
that it agrees with the ``jsonschema`` package on every lab answer and on broken ones.
"""

from __future__ import annotations

import json
import ntpath
import os
import re
import typing as t
from dataclasses import dataclass
from datetime import datetime, timedelta

from ._agent import READ_OPERATIONS, Batch, BatchResult

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_op_schemas.json")
REPORT_VERSION = 1

RDP_TCP = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations\\RDP-Tcp"
SERVICES = ("TermService", "SessionEnv", "UmRdpService", "CertPropSvc")
# A file that never exists: file.read is exercised without moving any real file's content (a key!) over the network.
ABSENT_FILE = "rdpfix-selftest-absent.txt"
EVENT_DAYS = 7  # as rdpfix.rdp.facts by default
MAX_EVENTS = 20

# .NET Framework 4.5+ Release values, the smallest Release of each version, newest first
# (learn.microsoft.com/dotnet/framework/install/how-to-determine-which-versions-are-installed).
DOTNET_RELEASES: tuple[tuple[int, str], ...] = (
    (533320, "4.8.1"),
    (528040, "4.8"),
    (461808, "4.7.2"),
    (461308, "4.7.1"),
    (460798, "4.7"),
    (394802, "4.6.2"),
    (394254, "4.6.1"),
    (393295, "4.6"),
    (379893, "4.5.2"),
    (378675, "4.5.1"),
    (378389, "4.5"),
)

# system.info keys the report shows on their own; any other key (the caller's identity, groups, privileges) is
# reported as it came under environment.caller.
_SYSTEM_KEYS = frozenset(
    {
        "hostname",
        "fqdn",
        "domain",
        "os_build",
        "os_caption",
        "machine_guid",
        "connection_broker",
        "boot_time",
        "program_data",
        "runtime",
    }
)

JSON = t.Any


# --------------------------------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------------------------------


def load_schemas(path: str = SCHEMA_PATH) -> dict[str, JSON]:
    with open(path, encoding="utf-8") as handle:
        document: dict[str, JSON] = json.load(handle)
    return document


def operation_schema(document: dict[str, JSON], op: str) -> dict[str, JSON]:
    """One operation's schema as a standalone JSON Schema (the shared ``$defs`` attached)."""
    schema = dict(document["operations"][op])
    schema["$defs"] = document["$defs"]
    schema["$schema"] = document["$schema"]
    return schema


_TYPES: dict[str, t.Callable[[JSON], bool]] = {
    "null": lambda value: value is None,
    "boolean": lambda value: isinstance(value, bool),
    "integer": lambda value: isinstance(value, int) and not isinstance(value, bool),
    "number": lambda value: isinstance(value, int | float) and not isinstance(value, bool),
    "string": lambda value: isinstance(value, str),
    "array": lambda value: isinstance(value, list),
    "object": lambda value: isinstance(value, dict),
}


def _resolve(root: dict[str, JSON], reference: str) -> dict[str, JSON]:
    if not reference.startswith("#/"):
        raise ValueError(f"only local references are supported, not {reference!r}")
    node: JSON = root
    for part in reference[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return t.cast(dict[str, JSON], node)


def _describe(value: JSON) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate(
    instance: JSON, schema: dict[str, JSON], root: dict[str, JSON] | None = None, where: str = "$"
) -> list[str]:
    """Every way ``instance`` breaks ``schema``, as ``path: reason`` strings (empty when it conforms)."""
    root = schema if root is None else root
    if "$ref" in schema:
        return validate(instance, _resolve(root, schema["$ref"]), root, where)
    errors: list[str] = []
    if "type" in schema:
        allowed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[name](instance) for name in allowed):
            return [f"{where}: expected {' or '.join(allowed)}, got {_describe(instance)}"]
    if "const" in schema and not _equal(instance, schema["const"]):
        errors.append(f"{where}: expected {_describe(schema['const'])}, got {_describe(instance)}")
    if "enum" in schema and not any(_equal(instance, option) for option in schema["enum"]):
        errors.append(f"{where}: {_describe(instance)} is not one of {_describe(schema['enum'])}")
    if "anyOf" in schema:
        branches = [validate(instance, branch, root, where) for branch in schema["anyOf"]]
        if all(branches):
            # The closest form: one whose type matched, with the fewest errors.
            mismatch = f"{where}: expected "
            typed = [found for found in branches if not (len(found) == 1 and found[0].startswith(mismatch))]
            closest = min(typed or branches, key=len)
            errors.append(f"{where}: matches none of the allowed forms (closest: {'; '.join(closest)})")
    if isinstance(instance, str) and "pattern" in schema and not re.search(schema["pattern"], instance):
        errors.append(f"{where}: {_describe(instance)} does not match {schema['pattern']}")
    if _TYPES["number"](instance):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{where}: {instance} is below {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            errors.append(f"{where}: {instance} is above {schema['maximum']}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append(f"{where}: at least {schema['minItems']} item(s) expected, got {len(instance)}")
        if "items" in schema:
            for index, item in enumerate(instance):
                errors += validate(item, schema["items"], root, f"{where}[{index}]")
    if isinstance(instance, dict):
        properties: dict[str, JSON] = schema.get("properties", {})
        errors += [f"{where}: missing {name!r}" for name in schema.get("required", []) if name not in instance]
        extra = schema.get("additionalProperties", True)
        for name, value in instance.items():
            child = f"{where}.{name}"
            if name in properties:
                errors += validate(value, properties[name], root, child)
            elif extra is False:
                errors.append(f"{where}: unexpected key {name!r}")
            elif isinstance(extra, dict):
                errors += validate(value, extra, root, child)
    return errors


def _equal(left: JSON, right: JSON) -> bool:
    """JSON equality: true is not 1."""
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left is right
    return bool(left == right)


def validate_operation(document: dict[str, JSON], op: str, data: JSON) -> list[str]:
    """Schema violations of one read operation's data."""
    if op not in document["operations"]:
        return [f"no schema for operation {op!r}"]
    schema = operation_schema(document, op)
    return validate(data, schema)


# --------------------------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    op: str
    args: dict[str, JSON]


def first_batch(now: datetime, event_queries: t.Sequence[dict[str, JSON]]) -> tuple[Batch, list[Planned]]:
    """Every read operation that needs no path from the host, once, in one ``on_error: continue`` batch."""
    since = (now - timedelta(days=EVENT_DAYS)).strftime("%Y-%m-%dT%H:%M:%SZ")
    planned = [
        Planned("system.info", {}),
        Planned("registry.get", {"path": RDP_TCP}),
        Planned("listener.get", {}),
        Planned("cert.list", {"store": "Remote Desktop"}),
        Planned("service.get", {"names": list(SERVICES)}),
        Planned("session.list", {}),
        Planned("util.sleep", {"milliseconds": 0}),
        # A guard that holds: its read, the JSON round trip and the comparison run as in an apply batch.
        Planned(
            "guard",
            {
                "label": "the self-test's own guard",
                "read": {"op": "util.sleep", "args": {"milliseconds": 0}},
                "expect": {"slept_ms": 0},
                "match": "equal",
            },
        ),
        Planned(
            "events.query", {"since": since, "queries": [dict(q) for q in event_queries], "max_events": MAX_EVENTS}
        ),
        Planned("firewall.rules.list", {}),
        Planned("security_products.list", {}),
        Planned("tls.cipher_suites.list", {}),
    ]
    return _batch(planned), planned


def machinekeys_folder(program_data: str) -> str:
    return ntpath.join(program_data, "Microsoft", "Crypto", "RSA", "MachineKeys")


def rdp_key_record(listener: JSON, certificates: JSON) -> dict[str, JSON] | None:
    """The key record of the certificate the listener presents, when it is in the Remote Desktop store."""
    if not isinstance(listener, dict) or not isinstance(certificates, dict):
        return None
    thumbprint = listener.get("ssl_certificate_sha1_hash")
    for certificate in certificates.get("certificates") or []:
        if isinstance(certificate, dict) and certificate.get("thumbprint") == thumbprint:
            key = certificate.get("key")
            return key if isinstance(key, dict) else None
    return None


def second_batch(program_data: str, key_path: str | None) -> tuple[Batch, list[Planned]]:
    """The file-system reads, at the paths the first batch reported: ProgramData, the RDP key file."""
    folder = machinekeys_folder(program_data)
    planned = [
        Planned("file.stat", {"path": key_path or folder}),
        Planned("file.read", {"path": ntpath.join(program_data, "rdpfix", ABSENT_FILE)}),
        Planned("dir.list", {"path": folder}),
        Planned("dir.read_each", {"path": ntpath.join(program_data, "rdpfix", "backups"), "names": ["manifest.json"]}),
        Planned("dir.stat", {"path": folder}),
    ]
    return _batch(planned), planned


def _batch(planned: list[Planned]) -> Batch:
    batch = Batch(on_error="continue")
    for item in planned:
        batch.add(item.op, **item.args)
    return batch


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def dotnet_version(release: JSON) -> str | None:
    if not isinstance(release, int) or isinstance(release, bool):
        return None
    return next((name for floor, name in DOTNET_RELEASES if release >= floor), "older than 4.5")


def _data(results: dict[str, dict[str, JSON]], op: str) -> JSON:
    entry = results.get(op) or {}
    return entry.get("data") if entry.get("ok") else None


def environment(results: dict[str, dict[str, JSON]]) -> dict[str, JSON]:
    """What runs the agent, and whether the RDP key file and its ACL can be read by it."""
    found = _data(results, "system.info")
    system: dict[str, JSON] = found if isinstance(found, dict) else {}
    runtime: dict[str, JSON] = system["runtime"] if isinstance(system.get("runtime"), dict) else {}
    caller: dict[str, JSON] = dict(system["caller"]) if isinstance(system.get("caller"), dict) else {}
    # Anything else system.info reports that this report does not show on its own.
    caller.update({key: value for key, value in system.items() if key not in _SYSTEM_KEYS and key != "caller"})
    privileges: dict[str, JSON] = caller["privileges"] if isinstance(caller.get("privileges"), dict) else {}
    key = rdp_key_record(_data(results, "listener.get"), _data(results, "cert.list"))
    key_stat = _data(results, "file.stat")
    rdp_key: dict[str, JSON] = {
        "path": None,
        "provider_kind": None,
        "exists": None,
        "acl_readable": None,
        "content_readable": None,
    }
    if key is not None:
        rdp_key.update(path=key.get("path"), exists=key.get("exists"), provider_kind=key.get("provider_kind"))
        if key.get("exists"):
            rdp_key["acl_readable"] = key.get("sddl") is not None
        stat_args = (results.get("file.stat") or {}).get("args") or {}
        if key.get("path") and stat_args.get("path") == key.get("path") and isinstance(key_stat, dict):
            rdp_key["content_readable"] = key_stat.get("sha256") is not None if key_stat.get("exists") else None
    return {
        "os_build": system.get("os_build"),
        "os_caption": system.get("os_caption"),
        "ui_culture": runtime.get("ui_culture"),
        "powershell_version": runtime.get("powershell_version"),
        "powershell_edition": runtime.get("powershell_edition"),
        "clr_version": runtime.get("clr_version"),
        "dotnet_framework_release": runtime.get("dotnet_framework_release"),
        "dotnet_framework_version": dotnet_version(runtime.get("dotnet_framework_release")),
        "language_mode": runtime.get("language_mode"),
        # The caller's token (identity, groups, privileges) as system.info reports it; empty from an agent that does
        # not report it.
        "caller": caller,
        "privileges_enabled": sorted(name for name, enabled in privileges.items() if enabled is True),
        "privileges_disabled": sorted(name for name, enabled in privileges.items() if enabled is False),
        "rdp_key": rdp_key,
    }


def collect(planned: t.Sequence[Planned], result: BatchResult) -> dict[str, dict[str, JSON]]:
    """op -> {args, ok, data | error}, from one batch's results."""
    collected: dict[str, dict[str, JSON]] = {}
    for item, outcome in zip(planned, result.results, strict=True):
        entry: dict[str, JSON] = {"args": item.args, "ok": outcome.ok}
        if outcome.ok:
            entry["data"] = outcome.data
        elif outcome.skipped:
            entry["error"] = {"type": "Skipped", "message": "not run"}
        else:
            entry["error"] = {"type": outcome.error_type or "Failed", "message": outcome.error_message or ""}
        collected[item.op] = entry
    return collected


def build_report(
    host: str,
    results: dict[str, dict[str, JSON]],
    schemas: dict[str, JSON],
    *,
    generated_at: str,
    round_trips: int,
    include_data: bool = True,
) -> dict[str, JSON]:
    """The self-test report: environment, and per read operation whether it answered and in its documented shape."""
    operations: list[dict[str, JSON]] = []
    for op in sorted(READ_OPERATIONS):
        entry = results.get(op)
        if entry is None:
            operations.append({"op": op, "status": "not_run", "args": None, "schema_errors": []})
            continue
        record: dict[str, JSON] = {"op": op, "args": entry["args"]}
        if entry["ok"]:
            problems = validate_operation(schemas, op, entry["data"])
            record.update(status="invalid" if problems else "ok", schema_errors=problems)
            if include_data:
                record["data"] = entry["data"]
        else:
            record.update(status="error", error=entry["error"], schema_errors=[])
        operations.append(record)
    counts = dict.fromkeys(("ok", "invalid", "error", "not_run"), 0)
    for record in operations:
        counts[record["status"]] += 1
    return {
        "v": REPORT_VERSION,
        "host": host,
        "generated_at": generated_at,
        "round_trips": round_trips,
        "status": "ok" if counts["ok"] == len(operations) else "problems",
        "counts": counts,
        "environment": environment(results),
        "operations": operations,
    }


def problems(report: dict[str, JSON]) -> list[str]:
    """One line per operation that did not answer in its documented shape."""
    lines: list[str] = []
    for record in report["operations"]:
        if record["status"] == "invalid":
            lines += [f"{record['op']}: {error}" for error in record["schema_errors"]]
        elif record["status"] == "error":
            lines.append(f"{record['op']}: {record['error']['type']}: {record['error']['message']}")
        elif record["status"] == "not_run":
            lines.append(f"{record['op']}: not run")
    return lines
