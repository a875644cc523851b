# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.server: the server concerns of one host planned from one snapshot and repaired in one
apply batch. Documented in modules/server.py.

Each concern is run by its own module's action plugin (the same code as a task of that module, with the options given
under the concern's name and the snapshot), each in its own thread. Whenever a module sends a batch, it waits; once
every running module is waiting or done, the batches wait for are sent together, in the role's order, as one batch
(one round trip): every module's guards first, then each module's backup and changes. The certificate is planned
after the key store's repair is done, since that repair can change what the certificate needs. The connection is used
by this thread only.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import typing as t

from ansible.errors import AnsibleConnectionFailure

from ansible_collections.rdpfix.rdp.plugins.action import certificate as certificate_action
from ansible_collections.rdpfix.rdp.plugins.action import firewall as firewall_action
from ansible_collections.rdpfix.rdp.plugins.action import machinekeys as machinekeys_action
from ansible_collections.rdpfix.rdp.plugins.action import tls as tls_action
from ansible_collections.rdpfix.rdp.plugins.action import transport as transport_action
from ansible_collections.rdpfix.rdp.plugins.module_utils import _rdp_probe
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _reboot_gate, _server_read, _sessions, _verification
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import (
    REREADS_ATTRIBUTE,
    SNAPSHOT_ARGUMENT_SPEC,
    ActionFailed,
    RdpfixAction,
    StaleSnapshot,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import (
    WRITE_OPERATIONS,
    Batch,
    BatchResult,
    OutcomeUnknown,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._guards import GUARD_OP
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._snapshot import Snapshot, SnapshotError

# The role's order: the key store before the certificate (Windows never renews a certificate whose key it cannot
# read), then the firewall, the transport policy and TLS.
CONCERNS: dict[str, type[RdpfixAction]] = {
    "machinekeys": machinekeys_action.ActionModule,
    "certificate": certificate_action.ActionModule,
    "firewall": firewall_action.ActionModule,
    "transport": transport_action.ActionModule,
    "tls": tls_action.ActionModule,
}
# A concern planned only once the ones named here are done (their writes change what it plans from).
AFTER: dict[str, tuple[str, ...]] = {"certificate": ("machinekeys",)}
# The action that reboots (ansible.windows, a declared dependency of the collection).
WIN_REBOOT = "ansible.windows.win_reboot"
# What the task itself adds after the concerns ran, which O(report) with O(report_from) shows by name as well.
OWN_RESULTS = ("reboot", "verification")
# Longest wait for the modules' threads to plan (pure and fast; a stuck module fails the host instead of hanging the
# play). A module waiting for a batch's answer waits as long as this thread sends it: the connection (and an async
# job's deadline) owns that timing, so a slow shared batch is never cut short by a thread.
THREAD_WAIT_S = 300.0


@dataclasses.dataclass
class _Concern:
    name: str
    action: RdpfixAction
    thread: threading.Thread | None = None
    pending: Batch | None = None
    reply: BatchResult | BaseException | None = None
    result: dict[str, t.Any] | None = None
    carried: int = 0
    # Set when the answer to a shared batch carrying this module's changes was lost: it is reading the host again to
    # find out what was made (_outcome.resolve), and is never stopped by another module's failure meanwhile.
    lost: OutcomeUnknown | None = None
    # Set once a shared batch carrying this module's writes was answered: its changes may be made, so it is never
    # stopped by another module's failure and its result (changes, manifest, reboot_required) is always kept.
    wrote: bool = False
    # Set when another module's failure stopped it before it sent any write.
    stopped: bool = False
    # The module whose failed operation stopped a shared batch before any of this module's operations ran (all of
    # them skipped): this module did not run, and its result says so.
    skipped_by: str | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def skipped(self) -> bool:
        """It failed only because another module's failure skipped all its operations: it did not run."""
        return self.skipped_by is not None and not self.wrote and bool((self.result or {}).get("failed"))


class ActionModule(RdpfixAction):
    MODULE_NAME = "server"
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {
        **SNAPSHOT_ARGUMENT_SPEC,
        **{name: {"type": "dict"} for name in CONCERNS},
        # Every concern to run and its options in one dict (name -> options): one template for a role to fill in
        # instead of one per concern (Ansible compiles each template of a task anew on every host).
        "concerns": {"type": "dict"},
        # A result (one item of an earlier run's concerns), or the name of one - a concern, reboot or verification - in
        # the registered result named by report_from, which is then read as it is, never templated (the cheap way, for
        # a loop on every host).
        "report": {"type": "raw"},
        "report_from": {"type": "str"},
        # The backup_root of every concern whose options give none: a member of the backup action group, so that
        # module_defaults for group/rdpfix.rdp.backup reach the concerns (a task that passes a concern's backup_root,
        # even as omit, would hide the module default; a concern's own backup_root still wins).
        "backup_root": {"type": "str"},
        "verify": _verification.OPTION_SPEC,
        "reboot": _reboot_gate.OPTION_SPEC,
        "return_snapshot": {"type": "bool", "default": True},
    }
    MUTUALLY_EXCLUSIVE: t.ClassVar[list[list[str]]] = [
        ["report", "snapshot"],
        ["report", "verify"],
        ["report", "reboot"],
        ["report", "concerns"],
        *(["concerns", name] for name in CONCERNS),
        *(["report", name] for name in CONCERNS),
    ]
    REQUIRED_BY: t.ClassVar[dict[str, list[str]]] = {"report_from": ["report"]}
    # The read options when this task takes the snapshot itself (no snapshot given).
    _read_options: t.Any = None
    # The result O(report) shows.
    _reported: t.Mapping[str, t.Any] = {}

    def validate_params(self, params: dict[str, t.Any]) -> None:
        # The role plans nothing more from the snapshot: without it, the result Ansible keeps for every host stays
        # small (a third of its size), which the controller pays for in every later task of the play.
        self.returns_snapshot = bool(params["return_snapshot"])
        if params["report"] is not None:
            self._reported = self._report_source(params["report"], params["report_from"])
            return
        if params["verify"] is not None:
            wrong = _verification.problems(params["verify"])
            if wrong:
                raise ActionFailed("; ".join(wrong))
        if params["reboot"] is not None:
            wrong = _reboot_gate.problems(params["reboot"], int(self._task.async_val or 0))
            if not wrong and params["reboot"]["allow"] and not self.win_reboot_installed():
                # Refused now, not after every change was made, when the reboot would find no action to run.
                wrong.append(
                    f"reboot.allow needs {WIN_REBOOT} (the collection ansible.windows), which is not installed"
                )
            if wrong:
                raise ActionFailed("; ".join(wrong))
        if params["concerns"] is not None:
            if not params["concerns"]:
                raise ActionFailed(f"concerns is empty: name at least one concern to run: {', '.join(CONCERNS)}")
            unknown = sorted(set(params["concerns"]) - set(CONCERNS))
            if unknown:
                known = ", ".join(CONCERNS)
                raise ActionFailed(f"concerns: unknown concern(s) {', '.join(unknown)}; choose from {known}")
            for name, options in params["concerns"].items():
                # None leaves the concern alone, as its own option does when omitted.
                if options is not None and not isinstance(options, dict):
                    raise ActionFailed(f"concerns.{name}: give the options of {name} as a dictionary")
                params[name] = None if options is None else dict(options)
        if not any(params[name] is not None for name in CONCERNS):
            raise ActionFailed(f"name at least one concern to run: {', '.join(CONCERNS)}")
        for name in CONCERNS:
            if params[name] is not None and "snapshot" in params[name]:
                raise ActionFailed(f"{name}.snapshot: give the snapshot once, as this module's snapshot option")
        # Every concern's options are checked - its module's argument spec, then its own checks - before any batch is
        # sent: one concern's bad input never lets the others write first.
        given: dict[str, dict[str, t.Any]] = {}
        for name, module in CONCERNS.items():
            if params[name] is None:
                continue
            try:
                given[name] = _server_read.validated(name, module, params[name])
            except _server_read.ConcernOptionsError as exc:
                raise ActionFailed(str(exc)) from exc
            checker = module(
                self._task, self._connection, self._play_context, self._loader, self._templar, self._shared_loader_obj
            )
            try:
                checker.validate_params(given[name])
            except ActionFailed as exc:
                raise ActionFailed(f"{name}: {exc.msg}", **exc.result) from exc
        self._read_options = None
        if params["snapshot"] is None:
            # No snapshot: this task takes it (one read batch) - with the concerns' options checked first, before the
            # host is contacted (_server_read).
            try:
                self._read_options = _server_read.facts_options(given)
            except _server_read.ConcernOptionsError as exc:
                raise ActionFailed(str(exc)) from exc

    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        if params["report"] is not None:
            return self._report(self._reported)
        if self.snapshot is None:
            if self._read_options is None:  # validate_params sets them when no snapshot is given
                raise ActionFailed(f"{self.host}: rdpfix.rdp.server needs a snapshot")
            self.snapshot = _server_read.take(self.host, self.now, self._read_options, self.run_batch)
        self._lock = threading.Condition()
        self._task_vars = getattr(self, "_rdpfix_task_vars", {})
        self._backup_root = params["backup_root"]
        order = [name for name in CONCERNS if params[name] is not None]
        concerns: dict[str, _Concern] = {}
        self._abandoned = False
        try:
            outcome = self._run_concerns(params, self.snapshot, order, concerns)
        finally:
            # A module thread still waiting for an answer (this thread failed) is released, never left hanging.
            with self._lock:
                self._abandoned = True
                self._lock.notify_all()
        ran = not outcome.get("failed") and not outcome.get("unreachable")
        if params["reboot"] is not None and ran:
            self._reboot_after_repair(params["reboot"], outcome)
            ran = not outcome.get("failed") and not outcome.get("unreachable")
        if params["verify"] is not None and not self.check_mode and ran:
            # After every real run, one that changed nothing too: a host whose RDP does not connect must not look
            # converged. After the reboot, when there was one: what it made effective is what a client meets. Check
            # mode predicts and probes nothing (the audit has its own probe).
            outcome["verification"] = _verification.verify(params["verify"], outcome["concerns"], self.probe)
            if outcome["verification"].get("failed"):
                outcome.update(failed=True, msg=outcome["verification"]["msg"])
        return outcome

    def _reboot_after_repair(self, options: dict[str, t.Any], outcome: dict[str, t.Any]) -> None:
        """The reboot a concern's change needs (O(reboot)), once every concern ran: read the sessions right before it
        (check mode: the snapshot's), reboot when allowed and nobody's session would end without consent, and record it
        in the concerns' results (RV(reboot))."""
        needed = _reboot_gate.required_by(outcome["concerns"])
        if not needed:
            return
        users: list[dict[str, t.Any]] = []
        gate = _reboot_gate.Outcome(needed, "not_allowed", check_mode=self.check_mode)
        if options["allow"]:
            reading = Batch(on_error="stop")
            read = _sessions.add_reads(reading)
            # At the reboot, not from the read before the repair: a user who logged on since must be seen. Check
            # mode predicts from the snapshot (the facts read lists the sessions), so the audit stays one command.
            try:
                answered = self.read(reading) if self.check_mode else self.send(reading)
                users = _sessions.user_sessions(_sessions.state_from(answered, read))
                gate.users = _sessions.describe(users)
            except AnsibleConnectionFailure as exc:  # the host is gone: unreachable, the concerns' results kept
                gate.failed_msg = f"the sessions could not be read right before it, so it was not made ({exc})"
                gate.unreachable = True
            except Exception as exc:  # a gate never guesses; the concerns' results must survive it
                gate.failed_msg = f"the sessions could not be read right before it, so it was not made ({exc})"
        gate.decision = _reboot_gate.decide(options, needed, users)
        if gate.failed_msg is None and gate.decision == "reboot":
            if self.check_mode:
                gate.rebooted = True  # what the real run will do, as ansible.windows.win_reboot says in check mode
            else:
                rebooted = self.reboot_host(options)
                gate.elapsed = rebooted.get("elapsed")
                # A reboot that began and then timed out (the host not back, its test failing) did reboot: every
                # session ended and Schannel read its settings. Its failure is said, never its reboot hidden.
                gate.rebooted = bool(rebooted.get("rebooted"))
                if rebooted.get("unreachable"):
                    gate.unreachable = True
                    gate.failed_msg = str(rebooted.get("msg") or "the host could not be reached to reboot it")
                elif rebooted.get("failed") or not gate.rebooted:
                    gate.failed_msg = str(rebooted.get("msg") or "ansible.windows.win_reboot did not reboot the host")
        _reboot_gate.record(outcome["concerns"], gate, (tls_action.REBOOT_WARNING,))
        outcome["reboot"] = gate.result(self.host)
        if outcome["reboot"]["changed"]:
            outcome["changed"] = True
        if gate.failed_msg is not None:
            outcome["msg"] = outcome["reboot"]["msg"]
            outcome["unreachable" if gate.unreachable else "failed"] = True

    def win_reboot_installed(self) -> bool:
        """Whether ansible.windows.win_reboot's action can be loaded (True when the loader cannot tell)."""
        try:
            return bool(self._shared_loader_obj.action_loader.has_plugin(WIN_REBOOT))
        except Exception:  # the reboot itself says it, if it comes to that
            return True

    def reboot_host(self, options: dict[str, t.Any]) -> dict[str, t.Any]:
        """Reboot through ansible.windows.win_reboot's action, on this task's connection (it waits for the host to
        come back, as that module's own task does); its result, or a failed one - never an exception, which would
        lose the concerns' results."""
        try:
            task = self._task.copy(exclude_parent=False, exclude_tasks=True)
            task.args = {"msg": options["msg"], "reboot_timeout": options["reboot_timeout"]}
            action = self._shared_loader_obj.action_loader.get(
                WIN_REBOOT,
                task=task,
                connection=self._connection,
                play_context=self._play_context,
                loader=self._loader,
                templar=self._templar,
                shared_loader_obj=self._shared_loader_obj,
            )
            if action is None:
                return {"failed": True, "msg": "the collection ansible.windows (its win_reboot) is not installed"}
            return t.cast(dict[str, t.Any], action.run(task_vars=self.task_vars))
        except AnsibleConnectionFailure as exc:
            return {"unreachable": True, "msg": f"{self.host}: {exc}"}
        except Exception as exc:  # the host's failure, said in its result: the concerns' results stay
            return {"failed": True, "msg": f"{type(exc).__name__}: {exc}"}

    @staticmethod
    def probe(options: _rdp_probe.ProbeOptions) -> dict[str, t.Any]:
        """rdpfix.rdp.handshake's probe, from the controller (this task's process) to the host's RDP port."""
        return _rdp_probe.run_probe(options)

    def _run_concerns(
        self, params: dict[str, t.Any], snapshot: Snapshot, order: list[str], concerns: dict[str, _Concern]
    ) -> dict[str, t.Any]:
        stopped_at: str | None = None
        # The module that failed while one before it was still running: no module starts meanwhile.
        failing: str | None = None
        while True:
            started = False
            merged = self._merge(snapshot, [concerns[name] for name in order if name in concerns])
            for name in order:
                if name in concerns or stopped_at or failing or not self._ready(name, order, concerns):
                    continue
                if any(
                    (concerns[before].result or {}).get("failed")
                    for before in order[: order.index(name)]
                    if before in concerns
                ):
                    continue  # a module before it failed: it does not start (not_run_concerns)
                concerns[name] = self._start(name, params[name], merged)
                started = True
            self._wait_quiet(list(concerns.values()))
            if started:
                # A module that was waiting for another may start now: every batch that can travel together does.
                continue
            failed = next(
                (name for name in order if name in concerns and (concerns[name].result or {}).get("failed")), None
            )
            if failed is not None and stopped_at is None:
                # As in the role's separate tasks: a module that fails ends the host's run; those after it change
                # nothing more. A module whose changes a shared batch already carried (or lost) finishes - its
                # verification included: its result is the truth about the host.
                for name in order[order.index(failed) + 1 :]:
                    item = concerns.get(name)
                    if item is not None and not item.done and not item.wrote and item.lost is None:
                        item.stopped = True
                        self._answer(item, ActionFailed(f"not run: {failed} failed before this module sent a change"))
                self._wait_quiet(list(concerns.values()))
                # A module before it that is still running (recording in its manifest what its failed batch did, say)
                # may be the cause - a later module whose operations the failure skipped fails too: the one that
                # failed first in the role's order is named once every module before it is done.
                failing = failed
                if not any(not concerns[name].done for name in order[: order.index(failed)] if name in concerns):
                    stopped_at = failed
            waiting = [concerns[name] for name in order if name in concerns and concerns[name].pending is not None]
            if waiting:
                self._send_together(waiting)
                continue
            if all(item.done for item in concerns.values()) and (
                stopped_at is not None or all(name in concerns for name in order)
            ):
                break
        # Every module that ran to its own end keeps its result - those whose changes a shared batch carried or lost
        # above all; a module stopped before it sent a change, or never started, did not run (not_run_concerns).
        kept = [name for name in order if name in concerns and not concerns[name].stopped]
        # ... and one whose operations the shared batch skipped after an earlier module's failure did not run either,
        # though its result (saying so) is kept.
        not_run = [name for name in order if name not in kept or concerns[name].skipped]
        results = {name: self._shaped(concerns[name]) for name in kept}
        self.snapshot = self._merge(snapshot, [concerns[name] for name in kept])
        replanned = [name for name, result in results.items() if result.get("replanned")]
        for name in replanned:
            self.warn(f"{name}: the host changed since the snapshot; it was read again and the plan made anew")
        outcome: dict[str, t.Any] = {
            "changed": any(result.get("changed") for result in results.values()),
            "concerns": results,
            "replanned_concerns": replanned,
            "not_run_concerns": not_run,
        }
        unreachable = next((result for result in results.values() if result.get("unreachable")), None)
        if unreachable is not None:
            # The connection failed under a batch: the host is unreachable, as for a task of that module.
            outcome.update(unreachable=True, msg=str(unreachable.get("msg") or f"{self.host}: unreachable"))
        elif stopped_at is not None:
            outcome["failed_concern"] = stopped_at
            outcome["failed"] = True
            outcome["msg"] = str(results.get(stopped_at, {}).get("msg") or f"{stopped_at} failed")
            made = [name for name, result in results.items() if name != stopped_at and result.get("changed")]
            if made:
                outcome["msg"] += f" (changes made by {', '.join(made)}: see their results)"
            if not_run:
                outcome["msg"] += f" (not run because {stopped_at} failed, nothing changed: {', '.join(not_run)})"
        # A lost answer whose concern read the host again (its result has an outcome): not one to the manifest a failed
        # concern writes again after its answered batch (record_statuses warns of that itself).
        lost = [
            item.lost
            for name, item in ((name, concerns[name]) for name in kept)
            if item.lost is not None and "outcome" in results[name]
        ]
        if lost and unreachable is None:
            # Each concern's own result names its manifest and what it found; the task's says it for all of them.
            outcome["outcomes"] = {name: result["outcome"] for name, result in results.items() if "outcome" in result}
            if outcome.get("failed"):
                outcome["msg"] = self._lost_message(results, lost[0].reason)
            else:
                self.warn(self._lost_message(results, lost[0].reason))
        return outcome

    # ------------------------------------------------------------------------------------------------ threads

    @staticmethod
    def _ready(name: str, order: list[str], concerns: dict[str, _Concern]) -> bool:
        """Whether every concern this one is planned after is done (or not run at all)."""
        return all(
            before not in order or (before in concerns and concerns[before].done) for before in AFTER.get(name, ())
        )

    def _start(self, name: str, args: dict[str, t.Any], snapshot: Snapshot) -> _Concern:
        task = self._task.copy(exclude_parent=False, exclude_tasks=True) if hasattr(self._task, "copy") else None
        if task is None:
            task = copy.copy(self._task)
        task.args = dict(args, snapshot=snapshot.to_dict())
        if not task.args.get("backup_root") and self._backup_root:
            task.args["backup_root"] = self._backup_root
        action = CONCERNS[name](
            task, self._connection, self._play_context, self._loader, self._templar, self._shared_loader_obj
        )
        item = _Concern(name, action)

        def sender(batch: Batch) -> BatchResult:
            with self._lock:
                item.pending, item.reply = batch, None
                self._lock.notify_all()
                # No timeout: this thread sends the batch, and the connection's timeouts bound it.
                self._lock.wait_for(lambda: item.reply is not None or self._abandoned)
                if item.reply is None:
                    raise ActionFailed(f"{self.host}: {name}: the run ended before its batch was sent")
                reply, item.reply = item.reply, None
            if isinstance(reply, BaseException):
                raise reply
            if reply is None:
                raise ActionFailed(f"{self.host}: {name}: the shared batch gave no answer")
            return reply

        action.batch_sender = sender
        # A module that failed may send one more batch - its manifest written again with what the failed batch did
        # (record_statuses): the failure is named only once every module before it is done (_run_concerns).
        action.record_statuses_shared = True

        def work() -> None:
            try:
                result = action.run(task_vars=self._task_vars)
            except BaseException as exc:  # reported as the concern's failure, never lost in a thread
                result = {"failed": True, "msg": f"{self.host}: {name}: {exc}"}
            with self._lock:
                item.result = result
                item.pending = None
                self._lock.notify_all()

        item.thread = threading.Thread(target=work, name=f"rdpfix-{name}", daemon=True)
        item.thread.start()
        return item

    def _wait_quiet(self, items: list[_Concern]) -> None:
        """Until every started module is done or waits for a batch."""
        with self._lock:
            quiet = self._lock.wait_for(
                lambda: all(item.done or (item.pending is not None and item.reply is None) for item in items),
                timeout=THREAD_WAIT_S,
            )
        if not quiet:
            raise ActionFailed(f"{self.host}: a module did not finish planning in {THREAD_WAIT_S:g} s")

    def _answer(self, item: _Concern, reply: BatchResult | BaseException) -> None:
        with self._lock:
            item.pending, item.reply = None, reply
            self._lock.notify_all()

    def _send_together(self, waiting: list[_Concern]) -> None:
        """One round trip for every waiting module whose batch stops at an error (writes), one for those that read
        on (polls); within each, the role's order, every module's guards first."""
        for on_error in ("stop", "continue"):
            group = [item for item in waiting if item.pending is not None and item.pending.on_error == on_error]
            if not group:
                continue
            batches = [item.pending for item in group if item.pending is not None]
            guards = [[op for op in batch.ops if op["op"] == GUARD_OP] for batch in batches]
            counts = [int(getattr(batch, REREADS_ATTRIBUTE, 0)) for batch in batches]
            rest = [[op for op in batch.ops if op["op"] != GUARD_OP] for batch in batches]
            own = [part[: len(part) - count] for part, count in zip(rest, counts, strict=True)]
            rereads = [part[len(part) - count :] for part, count in zip(rest, counts, strict=True)]
            # Guards first, then each module's changes in order, then every re-read, so that what the snapshot keeps
            # is the host after all of them.
            ops = [op for part in (*guards, *own, *rereads) for op in part]
            combined = dataclasses.replace(batches[0], ops=ops)
            try:
                sent = self.send(combined)
            except OutcomeUnknown as exc:
                self._answer_lost(group, exc)
                continue
            except BaseException as exc:  # every module waiting on it learns why
                for item in group:
                    self._answer(item, exc)
                continue
            guard_results = sent.results[: sum(len(part) for part in guards)]
            stale = next((result for result in guard_results if not result.ok), None)
            # The module whose own operation failed and stopped the batch (those after it were skipped), if any.
            cause = self._stopped_by(group, own, sent.results[len(guard_results) :]) if stale is None else None
            offset_guard = 0
            offset_own = len(guard_results)
            offset_reread = offset_own + sum(len(part) for part in own)
            for item, own_guards, own_ops, own_rereads in zip(group, guards, own, rereads, strict=True):
                item.carried += 1
                mine = (
                    sent.results[offset_guard : offset_guard + len(own_guards)]
                    + sent.results[offset_own : offset_own + len(own_ops)]
                    + sent.results[offset_reread : offset_reread + len(own_rereads)]
                )
                offset_guard += len(own_guards)
                offset_own += len(own_ops)
                offset_reread += len(own_rereads)
                own_stale = any(not result.ok for result in mine[: len(own_guards)])
                if stale is not None and not own_stale:
                    # Its own guards held, but another module's stopped the batch before anything was written.
                    self._answer(item, StaleSnapshot(stale.error_message or "another concern's guard failed"))
                else:
                    ran = mine[len(own_guards) : len(own_guards) + len(own_ops)]
                    if cause is not None and cause != item.name and ran and all(result.skipped for result in ran):
                        # Another module's failure stopped the batch before any of this module's operations ran.
                        item.skipped_by = cause
                    elif stale is None and any(op["op"] in WRITE_OPERATIONS for op in own_ops):
                        item.wrote = True
                    self._answer(item, BatchResult(sent.host, mine))
            self._wait_quiet(group)

    @staticmethod
    def _stopped_by(group: list[_Concern], own: list[list[dict[str, t.Any]]], results: list[t.Any]) -> str | None:
        """The module whose own operation failed first in a shared batch (``results`` after the guards), or None."""
        offset = 0
        for item, ops in zip(group, own, strict=True):
            if any(not result.ok and not result.skipped for result in results[offset : offset + len(ops)]):
                return item.name
            offset += len(ops)
        return None

    def _answer_lost(self, group: list[_Concern], lost: OutcomeUnknown) -> None:
        """The answer to a shared batch that writes was lost: each module whose changes it carried learns that the
        outcome of *its* changes is unknown, naming *its* manifest, and reads the host again on a new connection to
        find out (_outcome.resolve, through this module: its reads travel together again). A module whose part only
        read changed nothing: its batch stays pending and is sent again with the next shared batch."""
        reset = getattr(self._connection, "reset", None)
        if callable(reset):
            try:
                reset()
            except Exception as exc:  # the reads that follow fail and say it, each module on its own
                self.warn(f"{self.host}: reconnecting after the lost answer failed: {exc}")
        for item in group:
            batch = item.pending
            if batch is None:
                continue
            if not batch.writes:
                continue
            item.carried += 1
            own = OutcomeUnknown(self.host, lost.reason, batch.manifest_id, batch.manifest_dir)
            own.__cause__ = lost.__cause__
            item.lost = own
            self._answer(item, own)

    def _lost_message(self, results: dict[str, dict[str, t.Any]], reason: str) -> str:
        """The task's message when a shared batch's answer was lost: each module's outcome and manifest."""
        words = {
            "made": "made",
            "partial": "made in part",
            "not_made": "not made",
            "not_needed": "not needed any more",
            "unknown": "unknown",
        }
        parts = []
        for name, result in results.items():
            if "outcome" not in result:
                continue
            backup = result.get("backup") or {}
            parts.append(
                f"{name}: {words.get(str(result['outcome']), str(result['outcome']))} "
                f"(backup manifest {backup.get('manifest_id')}, {backup.get('path')})"
            )
        return (
            f"{self.host}: the answer to the apply batch the concerns shared was lost ({reason}); each concern read "
            f"the host again: {'; '.join(parts)}"
        )

    # ------------------------------------------------------------------------------------------------ results

    @staticmethod
    def _merge(base: Snapshot, items: list[_Concern]) -> Snapshot:
        """The snapshot with what each module read or re-read after its writes, in the role's order."""
        merged = Snapshot(dict(base.host), base.taken, dict(base.reads))
        for item in items:
            own = item.action.snapshot
            if own is None:
                continue
            for key, entry in own.reads.items():
                if base.reads.get(key) != entry:
                    merged.reads[key] = entry
        return merged

    def _shaped(self, item: _Concern) -> dict[str, t.Any]:
        result = dict(item.result or {})
        result.pop("snapshot", None)
        if item.skipped:
            # Its own words would blame its first skipped operation ("the backup could not be written"): the
            # module did not run, because the one named failed before it in the same batch.
            result["changed"] = False
            result["msg"] = (
                f"{self.host}: {item.name} did not run because {item.skipped_by} failed before it in the shared "
                "batch (its operations were skipped); nothing was changed"
            )
        # The round trips that carried this module's batches (shared with the other modules in them).
        result["round_trips"] = item.carried + int(result.get("round_trips") or 0)
        result["module"] = f"rdpfix.rdp.{item.name}"
        return result

    def unresolved(self, params: dict[str, t.Any], findings: t.Sequence[dict[str, t.Any]]) -> list[str]:
        if params["report"] is not None:
            # A reported result keeps its own module's judgement (this module's name would count every finding).
            return [str(item) for item in self._reported.get("unresolved") or []]
        return super().unresolved(params, findings)

    def _report_source(self, report: t.Any, source_name: str | None) -> t.Mapping[str, t.Any]:
        """The result O(report) names (or is)."""
        if source_name is None:
            if not isinstance(report, t.Mapping):
                raise ActionFailed("report: give one item of an earlier run's concerns, or its name with report_from")
            return report
        source = self._rdpfix_task_vars.get(source_name)
        if not isinstance(source, t.Mapping):
            raise ActionFailed(f"report_from: {source_name} is not a registered result of rdpfix.rdp.server here")
        if not isinstance(report, str):
            raise ActionFailed("report: with report_from, give the name of a concern (or reboot, or verification)")
        found = source.get(report) if report in OWN_RESULTS else (source.get("concerns") or {}).get(report)
        if not isinstance(found, t.Mapping):
            raise ActionFailed(f"report: {source_name} has no result for {report}")
        return found

    def _report(self, report: t.Mapping[str, t.Any]) -> dict[str, t.Any]:
        """One module's result from an earlier run of this module, as this task's result: nothing is sent."""
        shown = dict(report)
        for warning in shown.pop("warnings", None) or []:
            self.warn(str(warning))
        if shown.get("failed"):
            raise ActionFailed(str(shown.pop("msg", "failed")), **{k: v for k, v in shown.items() if k != "failed"})
        self.reported_round_trips = int(shown.pop("round_trips", 0) or 0)
        return shown

    reported_round_trips: int | None = None

    def run(self, tmp: str | None = None, task_vars: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
        self._rdpfix_task_vars = task_vars or {}
        self.reported_round_trips = None
        result = super().run(tmp, task_vars)
        if self.reported_round_trips is not None:
            result["round_trips"] = self.reported_round_trips
        return result


__all__ = ["ActionModule", "SnapshotError"]
