# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.certificate: read, plan, back up, apply, verify. Documented in modules/certificate.py."""

from __future__ import annotations

import typing as t
from datetime import timedelta

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _guards, _outcome
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import (
    COMMON_ARGUMENT_SPEC,
    SESSION_ARGUMENT_SPEC,
    SNAPSHOT_ARGUMENT_SPEC,
    ActionFailed,
    BackupSet,
    RdpfixAction,
    backup_root,
    iso_utc,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import (
    WRITE_OPERATIONS,
    Batch,
    BatchResult,
    OperationError,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._certificate import (
    RESTARTABLE_SERVICES,
    VERIFY_POLLS,
    ApplyIndex,
    CertificateOptions,
    CertificatePlan,
    HostState,
    PlanError,
    VerifyIndex,
    build_apply_batch,
    build_poll_batch,
    build_read_batch,
    describe,
    diff_view,
    parse_state,
    plan,
    predicted_view,
    refresh_state,
    refusal_finding,
    verification_problems,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._events import parse_events

RCM_PROVIDER = "Microsoft-Windows-TerminalServices-RemoteConnectionManager"


class ActionModule(RdpfixAction):
    MODULE_NAME = "certificate"
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {
        **COMMON_ARGUMENT_SPEC,
        **SESSION_ARGUMENT_SPEC,
        **SNAPSHOT_ARGUMENT_SPEC,
        "expiry_threshold_days": {"type": "int", "default": 30},
        "regenerate_self_signed": {"type": "bool", "default": True},
        "remove_missing_pin": {"type": "bool", "default": True},
        "replacement_thumbprint": {"type": "str"},
        "replace_when": {"type": "str", "default": "unusable", "choices": ["unusable", "always"]},
        "restart_service": {"type": "str", "default": "SessionEnv", "choices": list(RESTARTABLE_SERVICES)},
        "start_stopped_services": {"type": "bool", "default": False},
        "terminal_name": {"type": "str", "default": "RDP-Tcp"},
        "repin_renewal": {"type": "bool", "default": False},
    }
    REQUIRED_IF: t.ClassVar[list[t.Any]] = [("replace_when", "always", ["replacement_thumbprint"])]

    options: CertificateOptions

    def validate_params(self, params: dict[str, t.Any]) -> None:
        try:
            self.options = CertificateOptions.from_params(params)
        except PlanError as exc:
            raise ActionFailed(str(exc)) from exc

    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        options = self.options
        threshold = options.expiry_threshold_days
        read_batch, read_index = build_read_batch(options)
        state = parse_state(self.read(read_batch), read_index, self.now)
        result: dict[str, t.Any] = {
            "changed": False,
            "certificate": describe(state, threshold),
            "before": diff_view(state, threshold),
            "backup": None,
            "restart_pending": False,
        }
        try:
            decided = plan(state, options)
        except PlanError as exc:
            # Check mode fails the same way: --check predicts the refusal, and the audit reports it (plan_refused).
            raise ActionFailed(
                f"{self.host}: {exc}; nothing was changed",
                **result,
                after=result["before"],
                findings=[refusal_finding(str(exc))],
            ) from exc

        result["findings"] = decided.findings
        result["restart_pending"] = decided.restart_pending
        if decided.restart_pending:
            self.warn(next(f["title"] for f in decided.findings if f["id"] == "certificate.restart_pending"))

        if not decided.has_changes or self.check_mode:
            status = "planned" if self.check_mode else "pending"
            result["actions"] = [action.to_dict(status) for action in decided.actions]
            result["actions"] += [action.to_dict("pending") for action in decided.pending]
            result["after"] = predicted_view(state, options, decided)
            result["changed"] = decided.has_changes
            return self._conclude(result, decided, warn=not decided.has_changes)

        backup = BackupSet.create(self.MODULE_NAME, state.hostname, backup_root(params, state.program_data), self.now)
        apply_batch, apply_index = build_apply_batch(state, options, decided, backup)
        applied = self.run_batch(apply_batch)
        changed_since = _guards.guard_failure(applied, apply_index.guards)
        if changed_since is not None:
            # Stopped before its first write (no backup either): read again and plan once more.
            raise _guards.HostChanged(str(changed_since))
        result["backup"] = backup.summary(applied)
        last_action = max((position for position, _action in apply_index.actions), default=apply_index.manifest)
        failed_at = next((position for position, item in enumerate(applied.results) if not item.ok), None)
        if failed_at is not None and failed_at <= last_action:
            self.record_statuses(backup, applied)
            raise ActionFailed(self._apply_failure(apply_batch, applied, failed_at, apply_index, backup), **result)

        result["changed"] = True
        result["actions"] = [action.to_dict("done") for action in decided.actions]
        result["actions"] += [action.to_dict("pending") for action in decided.pending]
        after_state, problems = self._reread(state, applied, apply_index.verify, decided)
        polls = 0
        while problems and polls < VERIFY_POLLS:
            polls += 1
            poll_batch, poll_index = build_poll_batch(options, personal=decided.grant_key_read is not None)
            after_state, problems = self._reread(state, self.run_batch(poll_batch), poll_index, decided)
        refused = self._regeneration_refused() if problems and decided.regenerate else None
        if refused:
            # Windows said why it made no certificate (a full or unwritable MachineKeys folder, a stopped service):
            # that is the cause, not the time it takes.
            raise ActionFailed(
                f"{self.host}: Windows could not create the new self-signed certificate: {refused}. "
                f"What was removed is saved under backup manifest {backup.manifest_id} ({backup.directory}); put it "
                f"back with rdpfix.rdp.restore manifest_id={backup.manifest_id}",
                **result,
                after=diff_view(after_state, threshold),
            )
        if problems:
            raise ActionFailed(
                f"{self.host}: the changes were made but are not visible yet: {'; '.join(problems)}. "
                f"Everything changed is saved under backup manifest {backup.manifest_id} ({backup.directory}) "
                "and can be restored from it",
                **result,
                after=diff_view(after_state, threshold),
            )
        result["certificate"] = describe(after_state, threshold)
        result["after"] = diff_view(after_state, threshold)
        try:
            remaining = plan(after_state, options)
        except PlanError:
            remaining = CertificatePlan()
        result["remaining_findings"] = remaining.findings
        return self._conclude(result, remaining, warn=True)

    def _reread(
        self, before: HostState, batch_result: BatchResult, index: VerifyIndex, applied: CertificatePlan
    ) -> tuple[HostState, list[str]]:
        try:
            after = refresh_state(before, batch_result, index, self.now)
        except OperationError as exc:  # a read after the restart failed: not visible yet, poll again
            return before, [f"the state could not be re-read ({exc.message})"]
        return after, verification_problems(before, after, self.options, applied)

    def _conclude(self, result: dict[str, t.Any], final: CertificatePlan, warn: bool) -> dict[str, t.Any]:
        """Set ``compliant`` from the plan of the state the run ends with, warn about what nothing fixes, add the diff.

        ``warn`` is false for a check-mode run that would change things: its problems are the ones it would fix.
        """
        remaining_problems = final.problems()
        result["compliant"] = not remaining_problems and not final.has_changes and not final.restart_pending
        if warn:
            for item in remaining_problems:
                self.warn(f"{item['title']} ({item['id']})")
        result["diff"] = {"before": result["before"], "after": result["after"]}
        return result

    def _regeneration_refused(self) -> str | None:
        """The newest Remote Connection Manager 1057/1058 logged since this run started ("failed to create / replace
        the self-signed certificate", with Windows' status), or None."""
        batch = Batch(on_error="continue")
        position = batch.add(
            "events.query",
            since=iso_utc(self.now - timedelta(minutes=1)),
            queries=[{"log": "System", "providers": [RCM_PROVIDER], "ids": [1057, 1058]}],
            max_events=5,
        )
        answer = self.run_batch(batch)[position]
        if not answer.ok:
            return None
        events = parse_events(answer.data.get("events") or [])
        if not events:
            return None
        event = events[0]
        status = event.data.get("status") or event.message[:300]
        return f"Remote Connection Manager event {event.id} at {event.time}: {status}"

    def _apply_failure(
        self, batch: Batch, applied: BatchResult, failed_at: int, index: ApplyIndex, backup: BackupSet
    ) -> str:
        # What was and was not changed, from the batch's own results.
        changes = [
            position
            for position, item in enumerate(batch.ops)
            if position > index.manifest and item["op"] in WRITE_OPERATIONS
        ]
        return _outcome.failure_message(
            self.host,
            batch,
            applied,
            failed_at=failed_at,
            manifest=index.manifest,
            changes=changes,
            backup=backup,
            labels={position: action.description for position, action in index.actions},
        )
