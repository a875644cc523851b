# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A host snapshot: the results of one read batch, kept so that later modules plan from it instead of reading again.

``rdpfix.rdp.facts`` returns one (``snapshot``); every fixing module takes it as its ``snapshot`` option. A module
looks each operation of its own read batch up in the snapshot (an operation it does not find is read from the host,
in one batch); the results it took from the snapshot are what its plan relied on, and its apply batch starts with one
``guard`` per such read (docs/agent-protocol.md), so a host that changed since the snapshot stops the batch before its
first write. After a write, the module re-reads those operations in the same batch and returns the snapshot with
their new results, so the next module plans from the host as it is now.

A snapshot is plain data (it travels through registered variables): ``format``, the host it was taken on
(``host``: the inventory name, the Windows host name and MachineGuid), ``taken`` and ``reads``, a list of
``{op, args, ok, data, error}``.
"""

from __future__ import annotations

import copy
import json
import typing as t
from dataclasses import dataclass, field

from ._agent import Batch, BatchResult, OpResult

SNAPSHOT_FORMAT = 1

# Reads that describe a moment, not a state a plan relies on: never guarded. A batch that waits on the host
# (util.sleep) is a poll and is always sent.
UNGUARDED_READS = frozenset({"session.list", "events.query", "util.sleep", "file.read", "dir.read_each", "dir.list"})
# Of system.info, what identifies the machine and where its files are: the rest (boot time, runtime) may change.
SYSTEM_IDENTITY = ("hostname", "machine_guid", "program_data")
# Arguments that name the moment of the read rather than what is read (the start of an event query).
MOMENT_ARGS = {"events.query": ("since",)}


class SnapshotError(ValueError):
    """The snapshot option cannot be used (wrong shape, another host, another format); raised before any I/O."""


def op_key(op: str, args: dict[str, t.Any]) -> str:
    """Identity of a read: the operation and its arguments, without those that only name the moment."""
    moment = MOMENT_ARGS.get(op, ())
    kept = {name: value for name, value in args.items() if name not in moment}
    return json.dumps({"op": op, "args": kept}, sort_keys=True, separators=(",", ":"))


@dataclass
class Snapshot:
    host: dict[str, t.Any]
    taken: str
    reads: dict[str, dict[str, t.Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def from_batch(
        cls, inventory_host: str, taken: str, batch: Batch, result: BatchResult, positions: t.Iterable[int]
    ) -> Snapshot:
        """The reads at ``positions`` of a sent batch; the host is identified by its system.info, when read."""
        snapshot = cls({"inventory_hostname": inventory_host}, taken)
        for position in positions:
            operation = batch.ops[position]
            snapshot.put(operation["op"], operation["args"], result[position])
        system = next((entry for entry in snapshot.reads.values() if entry["op"] == "system.info"), None)
        if system and system["ok"]:
            snapshot.host.update({name: system["data"].get(name) for name in ("hostname", "machine_guid")})
        return snapshot

    def put(self, op: str, args: dict[str, t.Any], outcome: OpResult) -> None:
        if outcome.skipped:
            return
        self.reads[op_key(op, args)] = {
            "op": op,
            "args": args,
            "ok": outcome.ok,
            "data": outcome.data,
            "error": None if outcome.ok else {"type": outcome.error_type, "message": outcome.error_message},
        }

    def to_dict(self) -> dict[str, t.Any]:
        return {"format": SNAPSHOT_FORMAT, "host": self.host, "taken": self.taken, "reads": list(self.reads.values())}

    # ------------------------------------------------------------------------------------------------ reading

    @classmethod
    def from_option(cls, value: object, inventory_host: str) -> Snapshot:
        """The ``snapshot`` option: a registered rdpfix.rdp.facts result (or a fixing module's result, or the
        ``snapshot`` of either). Refused with a clear message when it cannot be trusted for this host."""
        document = value.get("snapshot") if isinstance(value, dict) and "reads" not in value else value
        if not isinstance(document, dict):
            hint = ""
            if isinstance(value, dict) and (value.get("failed") or value.get("unreachable")):
                hint = " (the task that should have taken it failed on this host)"
            raise SnapshotError(
                "snapshot must be the registered result of rdpfix.rdp.facts (or of a module given a snapshot), "
                f"or its 'snapshot' value{hint}"
            )
        found_format = document.get("format")
        if found_format != SNAPSHOT_FORMAT:
            raise SnapshotError(
                f"the snapshot has format {found_format!r}, this collection reads format {SNAPSHOT_FORMAT}: take it "
                "again with rdpfix.rdp.facts from this version of the collection"
            )
        host = document.get("host")
        reads = document.get("reads")
        if not isinstance(host, dict) or not isinstance(reads, list):
            raise SnapshotError("the snapshot is malformed (no host or no reads): take it again with rdpfix.rdp.facts")
        taken_on = host.get("inventory_hostname")
        if taken_on != inventory_host:
            raise SnapshotError(
                f"the snapshot was taken on {taken_on!r}, not on {inventory_host!r}: give each host its own "
                "(hostvars[inventory_hostname]), never another host's"
            )
        snapshot = cls(dict(host), str(document.get("taken") or ""))
        for entry in reads:
            if not isinstance(entry, dict) or not isinstance(entry.get("op"), str):
                raise SnapshotError("the snapshot is malformed (a read without op): take it again")
            if entry.get("data") is not None and not isinstance(entry["data"], dict):
                raise SnapshotError(
                    f"the snapshot is malformed (the data of its {entry['op']} read is "
                    f"{type(entry['data']).__name__}, not an object): take it again with rdpfix.rdp.facts"
                )
            if entry.get("error") is not None and not isinstance(entry["error"], dict):
                raise SnapshotError(
                    f"the snapshot is malformed (the error of its {entry['op']} read is not an object): take it again"
                )
            raw_args = entry.get("args")
            args: dict[str, t.Any] = raw_args if isinstance(raw_args, dict) else {}
            snapshot.reads[op_key(entry["op"], args)] = copy.deepcopy(entry)
        return snapshot

    def lookup(self, op: str, args: dict[str, t.Any]) -> OpResult | None:
        entry = self.reads.get(op_key(op, args))
        if entry is None:
            return None
        error = entry.get("error") or {}
        return OpResult(
            op=op,
            ok=bool(entry.get("ok")),
            data=copy.deepcopy(entry.get("data") or {}),
            error_type=error.get("type"),
            error_message=error.get("message"),
        )


def guarded(op: str) -> bool:
    return op not in UNGUARDED_READS


def expectation(op: str, data: dict[str, t.Any]) -> dict[str, t.Any]:
    """What a guard compares: the whole data of the read, or for system.info the machine's identity."""
    if op == "system.info":
        return {name: data[name] for name in SYSTEM_IDENTITY if name in data}
    return data


def guard_match(op: str) -> str:
    """How a guard compares (docs/agent-protocol.md, "Guards"): ``equal`` - a member that appeared since the read
    (a registry value Group Policy or an administrator created) is a change like any other - except for system.info,
    whose identity is a part of its data (``subset``)."""
    return "subset" if op == "system.info" else "equal"


def describe(op: str, args: dict[str, t.Any], source: str = "the snapshot") -> str:
    """Human words for a guard's label: what the plan relied on, as read in ``source``."""
    for name in ("path", "store", "names", "terminal_name"):
        if name in args:
            value = args[name]
            return f"{op} {', '.join(value) if isinstance(value, list) else value} as read in {source}"
    return f"{op} as read in {source}"
