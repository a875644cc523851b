# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The shared base of every rdpfix.rdp action plugin, and the backup manifest they all write.

A module's action plugin subclasses ``RdpfixAction``, declares its argument spec and implements ``run_task``. The base
validates the arguments before the connection is touched, runs agent batches while counting round trips, and turns
the agent's and the connection's exceptions into the results Ansible users expect: ``failed`` naming the host, or
``unreachable``.
"""

from __future__ import annotations

import abc
import base64
import dataclasses
import json
import ntpath
import secrets
import typing as t
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ansible.errors import AnsibleActionFail, AnsibleConnectionFailure, AnsibleError
from ansible.plugins.action import ActionBase

from . import _agent, _lock, _outcome
from ._agent import (
    READ_OPERATIONS,
    AgentError,
    Batch,
    BatchResult,
    Builder,
    OperationError,
    OpResult,
    OutcomeUnknown,
    run_batch,
)
from ._guards import GUARD_FAILED, GUARD_OP, Guard, HostChanged
from ._snapshot import Snapshot, SnapshotError, describe, expectation, guard_match, guarded

# Options every module that changes a host shares; documented once in the ``rdpfix.rdp.common`` doc fragment (and the
# modules that take it form the ``rdpfix.rdp.backup`` action group).
COMMON_ARGUMENT_SPEC: dict[str, dict[str, t.Any]] = {
    "backup_root": {"type": "str"},
}

# Only the modules with a step that can end RDP sessions (a service restart) take this option; documented in the
# ``rdpfix.rdp.session_disruption`` fragment.
SESSION_ARGUMENT_SPEC: dict[str, dict[str, t.Any]] = {
    "allow_session_disruption": {"type": "bool", "default": False},
}

# The fixing modules' ``snapshot`` option: plan from a snapshot taken earlier in the play (rdpfix.rdp.facts) instead of
# reading the host again; documented in the ``rdpfix.rdp.snapshot`` fragment.
SNAPSHOT_ARGUMENT_SPEC: dict[str, dict[str, t.Any]] = {
    "snapshot": {"type": "raw"},
}

# Backups hold private keys: only SYSTEM and Administrators may read them, nothing is inherited from ProgramData.
BACKUP_DIR_SDDL = "O:BAG:SYD:PAI(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)"
MANIFEST_FILE = "manifest.json"
# Created with the backup folder by its one writer, atomically (dir.create's ``claim``): the apply batch, or - when the
# batch's answer was lost and its folder is not there yet - the run reading the host again, which so fences the lost
# batch off (_outcome.resolve). A folder claimed by that run holds only this file, its text starting with FENCED.
CLAIM_FILE = "claim.txt"
FENCED = "fenced"
MANIFEST_VERSION = 1
# Manifests whose carried-out items say what was done of them (``status``); rdpfix.rdp.restore reads 1 and 2.
MANIFEST_VERSION_STATUS = 2
# An item's status: in the manifest on the host (``planned`` before the changes, ``done`` in the done-record after
# them), and in a module's ``backup`` result, from the batch's own results (``done``, ``failed``, ``not_run``).
ITEM_STATUSES = ("planned", "done", "failed", "not_run")


# How many operations at the end of a batch re-read what the plan relied on (set on the batches run_batch sends).
REREADS_ATTRIBUTE = "rdpfix_rereads"


class StaleSnapshot(HostChanged):
    """A guard at the start of an apply batch found the host changed since what the plan relied on; nothing was
    written."""


class ActionFailed(Exception):
    """Raised by ``run_task`` to end the task as failed, with a message and any extra result keys."""

    def __init__(self, msg: str, **result: t.Any) -> None:
        super().__init__(msg)
        self.msg = msg
        self.result = result


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_manifest_id(module: str, now: datetime | None = None, token: str | None = None) -> str:
    """``20261125T103000Z-certificate-1f40c``: sortable by time, unique per run, and says which module wrote it.

    The token starts with the milliseconds (three hex digits), so two manifests of the same second (a run that failed
    and its rerun) still sort in the order they were made: a newest-first restore depends on it."""
    moment = (now or utc_now()).astimezone(UTC)
    token = token or f"{moment.microsecond // 1000:03x}{secrets.token_hex(1)}"
    return f"{moment.strftime('%Y%m%dT%H%M%SZ')}-{module}-{token}"


def backup_root(params: dict[str, t.Any], program_data: str | None) -> str:
    """The folder holding every manifest folder: the ``backup_root`` option, else ``%ProgramData%\\rdpfix\\backups``."""
    configured = params.get("backup_root")
    if configured:
        return str(configured)
    return ntpath.join(program_data or "C:\\ProgramData", "rdpfix", "backups")


@dataclass
class BackupSet:
    """The backup of one apply batch: a folder, the saved items, and the manifest that lists them.

    Use in this order within one ``on_error: stop`` batch: ``begin`` (creates the folder), ``save_*`` / ``record``
    for each item, ``finish`` (writes manifest.json), then the destructive operations, each added with ``change``
    (or linked with ``carry``) to the item it carries out, then ``finish_done`` (the done-record). If any backup step
    fails, the agent skips everything after it, so nothing is changed whose backup is incomplete.

    What was done is recorded per item (version 2, docs/agent-protocol.md "Backups and manifests"): an item some
    operation carries out has ``status: planned`` in the manifest written before the changes; the done-record is the
    same manifest written again right after the last change, its items ``done``. A batch that stopped in between
    leaves ``planned``: a restore judges such an item on the host. ``statuses`` gives each item's status from the
    batch's own results (``done``, ``failed``, ``not_run``), which the module's ``backup`` result shows.
    """

    manifest_id: str
    directory: str
    module: str
    host: str
    created: str
    items: list[dict[str, t.Any]] = field(default_factory=list)
    planned_actions: list[str] = field(default_factory=list)
    # Item index -> the positions, in the apply batch, of the operations that carry it out.
    carried: dict[int, list[int]] = field(default_factory=dict)
    # Where manifest.json and the done-record were added (None: not yet, or nothing is carried out).
    manifest_position: int | None = None
    done_position: int | None = None

    @classmethod
    def create(cls, module: str, host: str, root: str, now: datetime | None = None) -> BackupSet:
        moment = now or utc_now()
        manifest_id = new_manifest_id(module, moment)
        return cls(manifest_id, ntpath.join(root, manifest_id), module, host, iso_utc(moment))

    def begin(self, batch: Batch) -> int:
        # Named by the batch, so that a lost answer reports this manifest (OutcomeUnknown).
        batch.manifest_id, batch.manifest_dir = self.manifest_id, self.directory
        # Claimed: a folder someone else claimed first (the run that found this batch's answer lost) stops the batch
        # here, before any write.
        return batch.add(
            "dir.create",
            path=self.directory,
            sddl=BACKUP_DIR_SDDL,
            claim=CLAIM_FILE,
            claim_text=f"rdpfix.rdp.{self.module} {self.manifest_id}",
        )

    @property
    def last_item(self) -> int:
        """The index of the item recorded last."""
        return len(self.items) - 1

    def save_content(self, batch: Batch, file_name: str, content: bytes, kind: str, **details: t.Any) -> int:
        """Write bytes the controller already holds (a certificate's DER, for instance)."""
        path = ntpath.join(self.directory, file_name)
        self.items.append({"kind": kind, "file": file_name, **details})
        return batch.add("file.write", path=path, content_b64=base64.b64encode(content).decode("ascii"))

    def save_file_copy(self, batch: Batch, source: str, file_name: str, kind: str, **details: t.Any) -> int:
        """Copy a file on the host (a private key file, for instance) without it crossing the network."""
        self.items.append({"kind": kind, "file": file_name, "source": source, **details})
        return batch.add("file.copy", src=source, dest=ntpath.join(self.directory, file_name))

    def record(self, kind: str, **details: t.Any) -> int:
        """Keep a small value (a registry value's previous content) in the manifest itself; returns the item's index."""
        self.items.append({"kind": kind, **details})
        return self.last_item

    def carry(self, item: int, position: int) -> int:
        """The operation at ``position`` of the apply batch carries out (part of) ``item``; returns ``position``."""
        if not 0 <= item < len(self.items):
            raise IndexError(f"the backup has no item {item}")
        self.carried.setdefault(item, []).append(position)
        return position

    def change(self, batch: Batch, item: int, op: str, **args: t.Any) -> int:
        """Add a change that carries out ``item`` to the batch; returns its position."""
        return self.carry(item, batch.add(op, **args))

    def manifest(self, done: bool = False, statuses: t.Mapping[int, str] | None = None) -> dict[str, t.Any]:
        """The manifest: version 2, with each carried-out item's ``status``, when any item is carried out
        (``planned``; ``done`` in the done-record; ``statuses``: what a stopped batch did of each item)."""
        default = "done" if done else "planned"
        document: dict[str, t.Any] = {
            "v": MANIFEST_VERSION_STATUS if self.carried else MANIFEST_VERSION,
            "id": self.manifest_id,
            "module": f"rdpfix.rdp.{self.module}",
            "host": self.host,
            "created": self.created,
            "items": [
                item | ({"status": (statuses or {}).get(position, default)} if position in self.carried else {})
                for position, item in enumerate(self.items)
            ],
            "actions": self.planned_actions,
        }
        return document

    def manifest_op(self, done: bool = False, statuses: t.Mapping[int, str] | None = None) -> dict[str, t.Any]:
        """The ``file.write`` of manifest.json (``done``: the done-record), as a batch operation."""
        document = json.dumps(self.manifest(done, statuses), indent=2, sort_keys=True).encode("utf-8")
        return {
            "op": "file.write",
            "args": {
                "path": ntpath.join(self.directory, MANIFEST_FILE),
                "content_b64": base64.b64encode(document).decode("ascii"),
            },
        }

    def finish(self, batch: Batch) -> int:
        """Write manifest.json (every carried-out item ``planned``); returns its position."""
        batch.ops.append(self.manifest_op())
        self.manifest_position = len(batch.ops) - 1
        return self.manifest_position

    def finish_done(self, batch: Batch) -> int | None:
        """After the last change: the done-record (manifest.json again, its carried-out items ``done``); returns its
        position, None when nothing is carried out. The manifest written by ``finish`` is written anew in place (same
        position), now that the batch has said which items it carries out."""
        if self.manifest_position is not None:
            batch.ops[self.manifest_position] = self.manifest_op()
        if not self.carried:
            return None
        batch.ops.append(self.manifest_op(done=True))
        self.done_position = len(batch.ops) - 1
        return self.done_position

    def statuses(self, result: BatchResult | None) -> dict[int, str]:
        """What the apply batch did of each carried-out item: ``done`` (every operation of it succeeded), ``failed``
        (one failed: a failed write has not happened), ``not_run`` (the batch stopped before it, or was not
        answered: None). Items that only record a backup are not listed."""
        found: dict[int, str] = {}
        for item, positions in self.carried.items():
            status = "done"
            for position in positions:
                outcome = result[position] if result is not None and position < len(result.results) else None
                if outcome is None or outcome.skipped:
                    status = "not_run" if status == "done" else status
                elif not outcome.ok:
                    status = "failed"
            found[item] = status
        return found

    def stopped_between(self, result: BatchResult) -> bool:
        """Whether the answered apply batch wrote the manifest and then stopped before its done-record: the manifest
        on the host says ``planned`` where the batch knows better."""
        written = self.manifest_position is not None and self.manifest_position < len(result.results)
        if not self.carried or not written or not result[t.cast(int, self.manifest_position)].ok:
            return False
        position = self.done_position
        return position is None or position >= len(result.results) or not result[position].ok

    def summary(self, result: BatchResult | None = None) -> dict[str, t.Any]:
        """The ``backup`` return value; with the apply batch's ``result``, each carried-out item's status."""
        statuses = self.statuses(result) if result is not None else dict.fromkeys(self.carried, "planned")
        return {
            "manifest_id": self.manifest_id,
            "path": self.directory,
            "items": [
                item | ({"status": statuses[position]} if position in statuses else {})
                for position, item in enumerate(self.items)
            ],
        }


def async_refusal(action: str) -> str:
    """Why an rdpfix module refuses ``async`` with ``poll: 0`` (docs/architecture.md, "async")."""
    return (
        f"{action} does not support async with poll: 0: it decides on the controller between its round trips to the "
        "host (read, plan, back up and change, verify), each of which runs as a background job on the host that the "
        "controller waits for, so it cannot be left to run on its own. Use poll: 1 or more (the task then runs "
        "its batches as async jobs), or no async"
    )


def not_windows(action: str, host: str, shell: object) -> str:
    """The refusal for a host that is not reached through a Windows shell (a delegation to localhost, for instance)."""
    family = getattr(shell, "SHELL_FAMILY", None) or type(shell).__module__.rsplit(".", 1)[-1]
    return (
        f"{action} runs on Windows hosts only, and {host} is reached with the '{family}' shell: nothing was sent. "
        "Target (or delegate_to) a Windows host: ansible_connection winrm or psrp, or ssh with "
        "ansible_shell_type powershell"
    )


class RdpfixAction(ActionBase, metaclass=abc.ABCMeta):
    """Base of the rdpfix.rdp action plugins.

    Subclasses set ``MODULE_NAME`` and ``ARGUMENT_SPEC`` (plus the optional constraint lists) and implement
    ``run_task(params)``, which returns the module's result keys. Inside ``run_task``: ``self.run_batch`` sends one
    batch (one round trip), ``self.warn`` adds a warning, ``self.check_mode`` / ``self.diff_mode`` / ``self.host`` /
    ``self.now`` describe the run, and raising ``ActionFailed`` ends the task as failed with extra result keys.
    """

    MODULE_NAME: t.ClassVar[str] = ""
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {}
    MUTUALLY_EXCLUSIVE: t.ClassVar[list[list[str]]] = []
    REQUIRED_TOGETHER: t.ClassVar[list[list[str]]] = []
    REQUIRED_IF: t.ClassVar[list[t.Any]] = []
    REQUIRED_BY: t.ClassVar[dict[str, list[str]]] = {}

    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_async = False

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        self.host = ""
        self.check_mode = False
        self.diff_mode = False
        self.round_trips = 0
        self.warnings: list[str] = []
        self.lasting_warnings: list[str] = []
        self.now = utc_now()
        # Planning from a snapshot: the snapshot (kept current by every read and write of this run), and the reads
        # the plan took from it, which the next write batch guards and re-reads.
        self.snapshot: Snapshot | None = None
        self.relied_on: dict[str, tuple[str, dict[str, t.Any], dict[str, t.Any]]] = {}
        self.replanned: str | None = None
        # Whether the result carries the snapshot for later tasks (rdpfix.rdp.server's return_snapshot).
        self.returns_snapshot = True
        # Set by rdpfix.rdp.server to carry the write batches of several modules in one round trip.
        self.batch_sender: Callable[[Batch], BatchResult] | None = None
        # Set by rdpfix.rdp.server when a module that failed may still send the manifest of what it did
        # (record_statuses) before the server decides which module failed first.
        self.record_statuses_shared = False
        # The host's run lock this run takes in each write batch (_lock), created at the first write.
        self.run_lock: _lock.RunLock | None = None
        self.task_vars: dict[str, t.Any] = {}
        self._builder: Builder | None = None
        self._jobs: t.Any = None

    @abc.abstractmethod
    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        """Do the module's work with validated ``params``; return its result keys."""

    def validate_params(self, params: dict[str, t.Any]) -> None:
        """Checks the argument spec cannot express; raise ``ActionFailed``. Runs before the connection is used."""

    def send(self, batch: Batch, *, locked: bool = True) -> BatchResult:
        """Send one batch: exactly one command over the connection, counted in ``round_trips``. ``locked=False``: a
        write batch sent outside the run lock (the fence of _outcome.resolve, atomic by itself)."""
        if self.batch_sender is not None:
            return self.batch_sender(batch)
        if locked and batch.writes and not _lock.is_locked(batch):
            return self._send_locked(batch)
        if batch.ops:
            self.round_trips += 1
        answered = run_batch(self.channel(), self.host, batch, self.wire_builder())
        if (
            locked
            and batch.writes
            and any(
                item.ok and item.op in _agent.WRITE_OPERATIONS and item.op not in _lock.OPERATIONS
                for item in answered.results
            )
        ):
            self.written.append(batch.manifest_id)
        return answered

    def _send_locked(self, batch: Batch) -> BatchResult:
        """A write batch inside the host's run lock (``_lock``): ``lock.acquire`` first, ``lock.release`` last (it
        runs even when the batch stops). A run that does not get the lock fails naming the holder; nothing was
        changed. The caller sees the results of its own operations only."""
        if self.run_lock is None:
            self.run_lock = _lock.RunLock.for_run(self.MODULE_NAME, self.host)
        locked = _lock.wrap(batch, self.run_lock)
        sent = self.send(locked.batch)
        acquired = sent[locked.acquire]
        folder = _lock.folder_warning(self.host, sent, locked)
        if folder:
            self.warn(folder)
        if not acquired.ok:
            raise ActionFailed(_lock.refusal(self.host, acquired, self.run_lock))
        for warning in (
            _lock.takeover_warning(self.host, sent, locked),
            _lock.release_warning(self.host, sent, locked),
        ):
            if warning:
                self.warn(warning, lasting=True)
        return locked.own(sent)

    def wire_builder(self) -> Builder:
        """How this task's batches are sent: Ansible's PowerShell module exec wrapper with the agent as the module,
        the task's become (runas) and ``environment:`` (``_wrapper.ModuleWrapper``); for an async task, as a job."""
        if self._builder is None:
            # Imported here: _wrapper imports ansible-core's executor, which the local runner of the Windows CI (where
            # Ansible cannot run) never needs.
            from ._payload import builder_for  # noqa: PLC0415
            from ._wrapper import AsyncJobs, wrapper_for  # noqa: PLC0415

            environment: dict[str, t.Any] = {}
            if getattr(self._task, "environment", None) and self._templar is not None:
                self._compute_environment_string(environment)
            timeout = int(self._task.async_val or 0)
            builder = wrapper_for(self._connection, self.task_vars, environment, async_timeout=timeout)
            # The payload built once per run where it holds no secret (_payload), else by ansible-core per batch.
            self._builder = builder_for(builder)
            if timeout:
                self._jobs = AsyncJobs(
                    self._connection,
                    builder,
                    poll=float(self._task.poll),
                    timeout=timeout,
                    warn=lambda message: self.warn(message, lasting=True),
                )
        return self._builder

    def channel(self) -> t.Any:
        """What a batch is sent over: the connection, or for an async task the job runner around it (each batch a
        background job on the host, polled until it ends: _wrapper.AsyncJobs)."""
        self.wire_builder()
        return self._jobs if self._jobs is not None else self._connection

    def _finish_async(self, result: dict[str, t.Any]) -> dict[str, t.Any]:
        """An async task hands its result to Ansible the way a job does: written to the last job's result file, for
        the polling Ansible does after the task (ansible.windows.async_status) to read and remove.

        ansible-core polls every result of an async task that is not ``failed`` (task_executor): a failed result is
        returned as it is, and an unreachable one is marked ``failed`` as well, so that its message is what the user
        sees (the host then counts as failed, not unreachable). A run that sent no batch (planned from the snapshot,
        nothing to change) runs an empty batch as a job to have a result file. When the result cannot be handed over,
        the module's own result is returned, failed (Ansible would otherwise poll a file that does not hold it), with
        a warning saying so."""
        jobs = self._jobs
        if result.get("unreachable"):
            result["failed"] = True
        if result.get("failed"):
            if jobs is not None:
                self.round_trips += jobs.commands
            return self._finish(result)
        try:
            jid, results_file = self._result_job()
        except AnsibleError as exc:
            return self._handover_failed(result, exc, None)
        self.round_trips += 1  # the write below
        final = self._finish(result) | {"ansible_job_id": jid, "started": 1, "finished": 1}
        document = b"\xef\xbb\xbf" + json.dumps(final).encode("utf-8")  # UTF-8 with a BOM, as Set-Content writes
        batch = Batch(on_error="stop")
        batch.add("file.write", path=results_file, content_b64=base64.b64encode(document).decode("ascii"))
        try:
            run_batch(self._connection, self.host, batch, self._sync_builder()).raise_for_errors()
        except AnsibleError as exc:
            # Any failure, a lost answer (OutcomeUnknown) included: the module's result stays what it was.
            return self._handover_failed(result, exc, results_file)
        return {
            "ansible_job_id": jid,
            "results_file": results_file,
            "started": 1,
            "finished": 0,
            "changed": final.get("changed", False),
        }

    def _result_job(self) -> tuple[str, str]:
        """The job whose result file receives the task's result: the last batch's, or - when no batch ran as a job -
        an empty batch run as one (its start and polls; its result file is kept for the result). Counts the polls and
        cleanups sent in ``round_trips``."""
        from ._wrapper import AsyncJobs  # noqa: PLC0415 - see wire_builder

        builder = self.wire_builder()
        jobs = t.cast(AsyncJobs, self._jobs)
        try:
            if jobs.last_job is None:
                self.round_trips += 1
                rc, stdout, stderr = jobs.run_job(builder(Batch(on_error="stop")), cleanup=False)
                _agent.parse_output(self.host, rc, stdout, stderr, expected=0)
        except AnsibleError:
            raise
        except Exception as exc:  # the connection's own failures: judged as for any batch that only reads
            raise _agent.transport_failure(self.host, Batch(), exc, None, None) from exc
        finally:
            self.round_trips += jobs.commands
        if jobs.last_job is None:
            raise AgentError(f"{self.host}: no async job was started to hand the result over in")
        return jobs.last_job

    def _handover_failed(
        self, result: dict[str, t.Any], exc: AnsibleError, results_file: str | None
    ) -> dict[str, t.Any]:
        """The module's own result, when it could not be written where Ansible's async polling reads it."""
        where = f" (the job's result file {results_file} may be left on the host)" if results_file else ""
        detail = f"the answer to its write was lost: {exc.reason}" if isinstance(exc, OutcomeUnknown) else str(exc)
        message = f"{self.host}: the module's result could not be handed over to Ansible's async polling ({detail})"
        message += where
        self.warn(message)
        said = result.get("msg")
        handed = result | {"failed": True, "msg": message + (f"; the module said: {said}" if said else "")}
        return self._finish(handed)

    def _sync_builder(self) -> Builder:
        from ._wrapper import wrapper_for  # noqa: PLC0415

        return wrapper_for(self._connection, self.task_vars)

    def run_batch(self, batch: Batch) -> BatchResult:
        """Send one batch (one round trip). The first batch that writes after ``read`` starts with a guard per read
        the plan relied on (from the snapshot, or this run's own read when there is none); a failed guard raises
        StaleSnapshot (nothing was written) and ``run`` reads and plans once more. Planning from a snapshot, the
        batch also ends by re-reading them; every read keeps the snapshot current."""
        if not batch.ops or (self.snapshot is None and not (batch.writes and self.relied_on)):
            return self.send(batch)
        guards: list[dict[str, t.Any]] = []
        rereads: list[dict[str, t.Any]] = []
        if batch.writes and self.relied_on:
            source = "the snapshot" if self.snapshot is not None else "this run's read"
            for op, args, data in self.relied_on.values():
                guard = Guard(describe(op, args, source), op, args, expectation(op, data), match=guard_match(op))
                guards.append({"op": GUARD_OP, "args": guard.op_args()})
                if self.snapshot is not None:
                    rereads.append({"op": op, "args": args})
            self.relied_on = {}
        wire = dataclasses.replace(batch, ops=[*guards, *batch.ops, *rereads])
        # rdpfix.rdp.server moves every module's re-reads after all the writes of a shared batch.
        setattr(wire, REREADS_ATTRIBUTE, len(rereads))
        sent = self.send(wire)
        for position, outcome in enumerate(sent.results[: len(guards)]):
            if not outcome.ok:
                label = guards[position]["args"]["label"]
                if outcome.error_type == GUARD_FAILED:
                    raise StaleSnapshot(outcome.error_message or label)
                raise ActionFailed(
                    f"{self.host}: the check of {label} before the changes failed "
                    f"({outcome.error_type or 'Failed'}: {outcome.error_message or ''}); nothing was changed"
                )
        own = sent.results[len(guards) : len(guards) + len(batch.ops)]
        answered = [*own, *sent.results[len(guards) + len(batch.ops) :]]
        if self.snapshot is not None:
            for operation, outcome in zip([*batch.ops, *rereads], answered, strict=True):
                if operation["op"] in READ_OPERATIONS and outcome.ok:
                    self.snapshot.put(operation["op"], operation["args"], outcome)
        return BatchResult(sent.host, list(own))

    def read(self, batch: Batch) -> BatchResult:
        """The results of a read batch: from the snapshot when one was given (what is not in it is read from the
        host, in one batch), else from the host. A batch that waits on the host (a poll) is always sent. The results
        are what the plan relies on: the next write batch guards them (``run_batch``)."""
        if any(item["op"] == "util.sleep" for item in batch.ops):
            return self.run_batch(batch)
        snapshot = self.snapshot
        found: list[OpResult | None] = [
            None if snapshot is None else snapshot.lookup(item["op"], item["args"]) for item in batch.ops
        ]
        missing = [position for position, outcome in enumerate(found) if outcome is None]
        if missing:
            fresh = self.run_batch(dataclasses.replace(batch, ops=[batch.ops[position] for position in missing]))
            for position, outcome in zip(missing, fresh.results, strict=True):
                found[position] = outcome
        results = [outcome for outcome in found if outcome is not None]
        for item, outcome in zip(batch.ops, results, strict=True):
            if outcome.ok and guarded(item["op"]):
                key = json.dumps([item["op"], item["args"]], sort_keys=True)
                self.relied_on[key] = (item["op"], item["args"], outcome.data)
        return BatchResult(self.host, results)

    def apply_with_backup(
        self,
        params: dict[str, t.Any],
        system: dict[str, t.Any],
        result: dict[str, t.Any],
        stage: Callable[[Batch, BackupSet], int],
        saved: str,
    ) -> BatchResult:
        """Send one ``on_error: stop`` apply batch: the backup first, then the changes; sets ``result["backup"]``.

        ``stage`` adds the backup (``begin``, the items, ``finish``), then the changes (each carrying out its item:
        ``BackupSet.change``) and the done-record (``finish_done``) to the batch, and returns the position of the
        manifest write; ``result["backup"]`` gives each item's status. ``system`` is ``system.info``'s data (host
        name and ProgramData for the backup folder). A failed operation ends the task as failed with ``result``:
        before the manifest was written nothing was changed; after it, the message names the manifest that holds
        ``saved`` (what was backed up).
        """
        backup = BackupSet.create(
            self.MODULE_NAME,
            str(system.get("hostname") or self.host),
            backup_root(params, system.get("program_data")),
            self.now,
        )
        batch = Batch(on_error="stop")
        manifest = stage(batch, backup)
        applied = self.run_batch(batch)
        result["backup"] = backup.summary(applied)
        failed_at = next((position for position, item in enumerate(applied.results) if not item.ok), None)
        if failed_at is not None:
            changes = [
                position
                for position, item in enumerate(batch.ops)
                if position > manifest and item["op"] in _agent.WRITE_OPERATIONS and position != backup.done_position
            ]
            message = _outcome.failure_message(
                self.host, batch, applied, failed_at=failed_at, manifest=manifest, changes=changes, backup=backup
            )
            self.record_statuses(backup, applied)
            if failed_at > manifest:
                message += f" ({saved} are recorded in the manifest)"
            raise ActionFailed(message, **result)
        return applied

    def record_statuses(self, backup: BackupSet, applied: BatchResult) -> None:
        """After an apply batch that stopped between its manifest and its done-record (an operation failed): write the
        manifest once more with what the batch did of each item (``done``, ``failed``, ``not_run``), so that the record
        on the host tells the whole truth. One more round trip, on this failure path only; when it cannot be written,
        the manifest keeps ``planned`` and a restore judges those items on the host (a warning says so)."""
        if not backup.stopped_between(applied):
            return
        if self.batch_sender is not None and not self.record_statuses_shared:
            # Inside rdpfix.rdp.server's shared batch, a second batch from a module that failed would let the server
            # name a later module (whose changes the failure skipped) as the one that failed: the server sets
            # record_statuses_shared once it waits for such a batch. Until then the manifest keeps planned.
            return
        batch = Batch(on_error="stop")
        batch.manifest_id, batch.manifest_dir = backup.manifest_id, backup.directory
        batch.ops.append(backup.manifest_op(statuses=backup.statuses(applied)))
        try:
            written = self.run_batch(batch)
            failure = None if written[0].ok else f"{written[0].error_type}: {written[0].error_message}"
        except (AnsibleError, ActionFailed, HostChanged) as exc:
            failure = str(exc)
        if failure is not None:
            self.warn(
                f"the manifest {backup.manifest_id} could not be updated with what the run did ({failure}); it says "
                "planned for what the run did not finish, and a restore judges those items on the host"
            )

    def unresolved(self, params: dict[str, t.Any], findings: t.Sequence[dict[str, t.Any]]) -> list[str]:
        """Ids of the findings this run leaves for someone to decide: critical ones reported without a fix, and any
        whose fix needs options (or another module) this run was not given. The role's final verification expects RDP
        to connect only after a repair that left none of these."""
        own = f"rdpfix.rdp.{self.MODULE_NAME}"
        left: list[str] = []
        for item in findings:
            if not isinstance(item, dict):
                continue
            repair = item.get("fix")
            if not repair:
                if item.get("severity") == "critical":
                    left.append(str(item.get("id")))
                continue
            options = repair.get("options") or {}
            if repair.get("module") != own or any(params.get(k) != v for k, v in options.items()):
                left.append(str(item.get("id")))
        return left

    def _written_note(self) -> str:
        """For a failure after changes were made in this run: which manifests hold them."""
        if not self.written:
            return ""
        named = ", ".join(manifest or "(no manifest)" for manifest in self.written)
        return f"; this run had already made changes on the host before (backup manifest {named})"

    def warn(self, message: str, lasting: bool = False) -> None:
        """Add a warning. ``lasting``: it tells of something that happened on the host (a lock taken over, a job file
        left), so it stays when the plan is made anew; the other warnings belong to the plan and go with it."""
        if message not in self.warnings:
            self.warnings.append(message)
        if lasting and message not in self.lasting_warnings:
            self.lasting_warnings.append(message)

    def delegated_host(self, task_vars: dict[str, t.Any]) -> str | None:
        """The inventory name of the host a ``delegate_to`` task contacts (None without delegation)."""
        target = getattr(self._task, "delegate_to", None)
        if not target:
            return None
        delegated = (task_vars.get("ansible_delegated_vars") or {}).get(target) or {}
        return str(delegated.get("inventory_hostname") or target)

    def run(self, tmp: str | None = None, task_vars: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
        # ActionBase.run is not called: it would prepare a remote temporary directory, which the agent never needs.
        del tmp
        task_vars = task_vars or {}
        self.host = str(task_vars.get("inventory_hostname") or getattr(self._play_context, "remote_addr", "") or "")
        self.check_mode = bool(self._task.check_mode)
        self.diff_mode = bool(self._task.diff)
        self.round_trips = 0
        self.warnings = []
        self.lasting_warnings = []
        self.now = utc_now()
        self.snapshot, self.relied_on, self.replanned = None, {}, None
        self.returns_snapshot = True
        # Manifest ids of the write batches this run has had answered (a later failure says changes were made).
        self.written: list[str | None] = []
        self.task_vars, self._builder, self._jobs = task_vars, None, None
        result: dict[str, t.Any] = {"changed": False}

        delegated = self.delegated_host(task_vars)
        if delegated:
            # Label everything with the host actually contacted.
            self.host = delegated
        if self._task.async_val and not getattr(self._task, "poll", 0):
            return self._finish(result | {"failed": True, "msg": async_refusal(self._task.action)})
        shell = getattr(self._connection, "_shell", None)
        if shell is not None and not getattr(shell, "_IS_WINDOWS", False):
            return self._finish(result | {"failed": True, "msg": not_windows(self._task.action, self.host, shell)})
        try:
            _validation, params = self.validate_argument_spec(
                argument_spec=self.ARGUMENT_SPEC,
                mutually_exclusive=self.MUTUALLY_EXCLUSIVE or None,
                required_together=self.REQUIRED_TOGETHER or None,
                required_if=self.REQUIRED_IF or None,
                required_by=self.REQUIRED_BY or None,
            )
            self.validate_params(params)
            if params.get("snapshot") is not None:
                self.snapshot = Snapshot.from_option(params["snapshot"], self.host)
        except SnapshotError as exc:
            return self._finish(result | {"failed": True, "msg": f"Invalid arguments: snapshot: {exc}"})
        except AnsibleActionFail as exc:
            return self._finish(result | {"failed": True, "msg": f"Invalid arguments: {exc.message}"})
        except ActionFailed as exc:
            return self._finish(result | exc.result | {"failed": True, "msg": f"Invalid arguments: {exc.msg}"})

        try:
            try:
                result.update(self.run_task(params))
            except HostChanged as exc:
                # Nothing was written: read the host again and plan once more from what it is now.
                self.replanned = str(exc)
                self.warnings = list(self.lasting_warnings)
                since = "the snapshot" if self.snapshot is not None else "it was read"
                self.warn(f"The host changed since {since} ({exc}); it was read again and the plan made anew")
                if self.snapshot is not None:
                    self.snapshot.reads.clear()
                self.relied_on = {}
                try:
                    result.update(self.run_task(params))
                except HostChanged as again:
                    raise ActionFailed(
                        f"{self.host}: the host changed again between the new read and the write ({again}); "
                        "nothing was changed"
                    ) from again
            if "findings" in result:
                result["unresolved"] = self.unresolved(params, result["findings"])
        except ActionFailed as exc:
            result.update(exc.result)
            result.update(failed=True, msg=exc.msg)
        except OutcomeUnknown as exc:
            # The changes were sent and the answer lost: read the host again and say what it shows (_outcome).
            result.update(_outcome.resolve(self, params, exc))
        except AnsibleConnectionFailure as exc:
            result.update(unreachable=True, msg=f"{self.host}: {exc.message}{self._written_note()}")
            result["changed"] = result.get("changed") or bool(self.written)
        except OperationError as exc:
            result.update(failed=True, msg=exc.message, failed_operation=exc.op, error_type=exc.error_type)
        except AgentError as exc:
            result.update(failed=True, msg=exc.message)
        if not self.diff_mode:
            result.pop("diff", None)
        if self.snapshot is not None:
            if self.returns_snapshot:
                result["snapshot"] = self.snapshot.to_dict()
            result["replanned"] = self.replanned
        if self._task.async_val and self.batch_sender is None:
            return self._finish_async(result)
        return self._finish(result)

    def _finish(self, result: dict[str, t.Any]) -> dict[str, t.Any]:
        result["round_trips"] = self.round_trips
        if self.warnings:
            result["warnings"] = list(self.warnings)
        return result
