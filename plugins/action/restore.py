# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.restore: list the backup manifests, or put back what runs changed (docs: modules/)."""

from __future__ import annotations

import typing as t
from datetime import datetime

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _certificate as certificate
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _restore as rs
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import (
    COMMON_ARGUMENT_SPEC,
    SESSION_ARGUMENT_SPEC,
    ActionFailed,
    BackupSet,
    RdpfixAction,
    backup_root,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import BatchResult
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._machinekeys import DEFAULT_PROGRAM_DATA


class ActionModule(RdpfixAction):
    MODULE_NAME = rs.MODULE
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {
        **COMMON_ARGUMENT_SPEC,
        **SESSION_ARGUMENT_SPEC,
        "manifest_id": {"type": "list", "elements": "str"},
        "restart_service": {"type": "str", "default": "SessionEnv", "choices": list(certificate.RESTARTABLE_SERVICES)},
        "accept_certificate_renewal": {"type": "bool", "default": False},
    }

    options: rs.Options

    def validate_params(self, params: dict[str, t.Any]) -> None:
        try:
            self.options = rs.Options.from_params(params)
        except rs.RestoreError as exc:
            raise ActionFailed(str(exc)) from exc

    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        # Round trip 1 (a second one only where ProgramData is not C:\ProgramData and backup_root is not given).
        guessed = backup_root(params, DEFAULT_PROGRAM_DATA)
        batch, index = rs.build_discovery_batch(guessed, self.options.manifest_ids)
        found = self.run_batch(batch)
        system = found.data(index.system)
        program_data = str(system.get("program_data") or DEFAULT_PROGRAM_DATA)
        root = backup_root(params, program_data)
        if root.casefold() != guessed.casefold():
            batch, index = rs.build_discovery_batch(root, self.options.manifest_ids)
            found = self.run_batch(batch)
        if not self.options.manifest_ids:
            return self._list(found, index, root)
        return self._restore(found, index, root, program_data, str(system.get("hostname") or self.host))

    # -------------------------------------------------------------------------------------------------- listing

    def _list(self, found: BatchResult, index: rs.DiscoveryIndex, root: str) -> dict[str, t.Any]:
        manifests: list[dict[str, t.Any]] = []
        if index.listing is not None:
            # The discovery batch read every manifest already: a listing is one round trip.
            read, positions = rs.listed_manifests(found, index.listing)
            manifests = [rs.list_entry(read, where, manifest_id, root) for manifest_id, where in positions.items()]
        return {"changed": False, "backup_root": root, "manifests": manifests}

    # -------------------------------------------------------------------------------------------------- restoring

    def _fail(self, message: str, **result: t.Any) -> ActionFailed:
        return ActionFailed(f"{self.host}: {message}", **result)

    def _restore(
        self, found: BatchResult, index: rs.DiscoveryIndex, root: str, program_data: str, hostname: str
    ) -> dict[str, t.Any]:
        options = self.options
        try:
            manifests = [rs.parse_manifest(found, index.manifests[i], i, root) for i in options.manifest_ids]
            for manifest in manifests:
                rs.check_restorable(manifest)
        except rs.RestoreError as exc:
            raise self._fail(f"{exc}; nothing was changed") from exc
        summaries = {manifest.id: rs.result_summary(manifest, "already_restored") for manifest in manifests}
        todo = rs.newest_first(manifest for manifest in manifests if manifest.restored is None)
        result: dict[str, t.Any] = {
            "changed": False,
            "backup_root": root,
            "manifests": [],
            "actions": [],
            "backup": [],
            "before": {},
            "after": {},
            "restart_pending": False,
            "reboot_required": False,
            "restart_required": [],
            "renewal_predicted": [],
        }
        if not todo:
            result["manifests"] = list(summaries.values())
            result["msg"] = "every manifest was restored already: nothing to do"
            return result

        # Round trip 2: everything the manifests touch, as it is now.
        needs = rs.needs_of(todo, root)
        batch, state_index = rs.build_state_batch(needs, program_data, self.now)
        state = rs.parse_state(self.run_batch(batch), state_index, needs, self.now, program_data)
        times = rs.backup_times(self.now, len(todo))
        plans = [
            self._plan(state, manifest, root, hostname, moment, result)
            for manifest, moment in zip(todo, times, strict=True)
        ]

        # A restore that cannot be exact is refused before it starts (in check mode too), unless accepted.
        renewals = {renewal.manifest_id: renewal for renewal in rs.predicted_renewals(state, plans, self.now)}
        if renewals and not options.accept_certificate_renewal:
            for plan in plans:
                status = "refused" if plan.manifest.id in renewals else "not_started"
                summaries[plan.manifest.id] = rs.result_summary(plan.manifest, status)
            result["manifests"] = list(summaries.values())
            result["renewal_predicted"] = list(renewals)
            raise self._fail(
                "cannot be restored exactly: "
                + "; ".join(renewal.describe() for renewal in renewals.values())
                + ". Nothing was changed. Set accept_certificate_renewal: true to restore anyway and let Windows "
                "create the new self-signed certificate",
                **result,
            )
        for renewal in renewals.values():
            self.warn(f"{renewal.describe()}; restoring anyway (accept_certificate_renewal)")
        result["renewal_predicted"] = list(renewals)

        disabled = rs.disabled_restarts(state, plans)
        if disabled:
            for plan in plans:
                status = "refused" if plan.restart_service in disabled else "not_started"
                summaries[plan.manifest.id] = rs.result_summary(plan.manifest, status)
            result["manifests"] = list(summaries.values())
            raise self._fail(
                f"the restore would restart {', '.join(disabled)}, which is disabled: the restart would stop it and it "
                "could not start again. Nothing was changed; enable it or give another restart_service",
                **result,
            )
        sessions = [session for plan in plans for session in rs.pending_restart(state, plan, options)]
        if sessions or self.check_mode:
            return self._predict(result, summaries, state, plans, pending=bool(sessions))

        # One apply round trip per manifest, newest first; each re-reads the state the next one is planned on.
        plan = plans[0]
        for position, manifest in enumerate(todo):
            if position:
                plan = self._plan(state, manifest, root, hostname, times[position], result, summaries)
            if not plan.has_changes:
                summaries[manifest.id] = rs.result_summary(manifest, "unchanged")
                continue
            batch, apply_index = rs.build_apply_batch(
                state, plan, root, needs=needs, program_data=program_data, now=self.now
            )
            applied = self.run_batch(batch)
            result["backup"].append(plan.backup.summary(applied))
            self._raise_on_failure(applied, apply_index, plan, result, summaries)
            before, _predicted = plan.diff()
            state = rs.parse_state(applied, apply_index.reads, needs, self.now, program_data)
            result["changed"] = True
            result["actions"] += plan.actions("done")
            result["before"][manifest.id] = before
            result["after"][manifest.id] = rs.after_view(state, plan)
            self._note_effects(result, plan)
            renewed = manifest.id in renewals and bool(rs.renewed_certificates(state, plan, self.now))
            summaries[manifest.id] = rs.result_summary(
                manifest, "restored_renewed" if renewed else "restored", plan.backup
            )
            if renewed:
                self.warn(
                    f"{manifest.id}: restored; as predicted, Windows then created the self-signed certificate "
                    f"{', '.join(rs.renewed_certificates(state, plan, self.now))} in place of the restored one"
                )
                continue
            left = rs.remaining(state, manifest, root, options) + rs.store_differences(state, plan)
            if left:
                self.warn(f"{manifest.id}: restored, but the host still differs: {'; '.join(left)}")
        result["manifests"] = list(summaries.values())
        result["diff"] = {"before": result["before"], "after": result["after"]}
        return result

    def _plan(  # noqa: PLR0917 - the run's context, passed on rather than kept on the plugin
        self,
        state: rs.HostState,
        manifest: rs.Manifest,
        root: str,
        hostname: str,
        moment: datetime,
        result: dict[str, t.Any],
        summaries: dict[str, dict[str, t.Any]] | None = None,
    ) -> rs.ManifestPlan:
        """Plan one manifest; a manifest that cannot be restored ends the task, saying what was restored before it."""
        backup = BackupSet.create(rs.MODULE, hostname, root, moment)
        try:
            plan = rs.plan_manifest(state, manifest, root, backup, self.options)
        except rs.RestoreError as exc:
            done = [item["id"] for item in (summaries or {}).values() if item["status"] == "restored"]
            if summaries is not None:
                result["manifests"] = list(summaries.values())
            if summaries is None:
                raise self._fail(f"{manifest.id}: {exc}; nothing was changed", **result) from exc
            before = f" Restored before it: {', '.join(done)}." if done else ""
            raise self._fail(f"{manifest.id}: {exc}; nothing of it was changed.{before}", **result) from exc
        for warning in plan.warnings:
            self.warn(f"{manifest.id}: {warning}")
        return plan

    def _predict(
        self,
        result: dict[str, t.Any],
        summaries: dict[str, dict[str, t.Any]],
        state: rs.HostState,
        plans: list[rs.ManifestPlan],
        pending: bool,
    ) -> dict[str, t.Any]:
        """Check mode, or a restart that would disconnect sessions: report what would be put back; write nothing."""
        status = "pending" if pending else "planned"
        for plan in plans:
            summaries[plan.manifest.id] = rs.result_summary(plan.manifest, status if plan.has_changes else "unchanged")
            if not plan.has_changes:
                continue
            before, after = plan.diff()
            result["actions"] += plan.actions(status)
            result["before"][plan.manifest.id] = before
            result["after"][plan.manifest.id] = after
            self._note_effects(result, plan)
        if pending:
            sessions = [session for plan in plans for session in rs.pending_restart(state, plan, self.options)]
            users = ", ".join(f"{session.get('user') or '?'} ({session.get('state')})" for session in sessions)
            self.warn(
                f"restoring the pinned certificate restarts TermService, which would disconnect {len(sessions)} RDP "
                f"session(s): {users}. Nothing was changed; set allow_session_disruption to proceed, or use "
                "restart_service=SessionEnv, which keeps sessions"
            )
            result["restart_pending"] = True
        else:
            result["changed"] = any(plan.has_changes for plan in plans)
        result["manifests"] = list(summaries.values())
        result["diff"] = {"before": result["before"], "after": result["after"]}
        return result

    def _note_effects(self, result: dict[str, t.Any], plan: rs.ManifestPlan) -> None:
        if plan.reboot_required:
            result["reboot_required"] = True
            self.warn("Schannel reads protocol and cipher-suite settings at boot: reboot for the restored ones")
        for service in plan.restart_required:
            if service not in result["restart_required"]:
                result["restart_required"].append(service)
                self.warn(f"the restored transport policy takes effect when {service} restarts (or at the next reboot)")

    def _raise_on_failure(
        self,
        applied: BatchResult,
        index: rs.ApplyIndex,
        plan: rs.ManifestPlan,
        result: dict[str, t.Any],
        summaries: dict[str, dict[str, t.Any]],
    ) -> None:
        failed_at = next((position for position, item in enumerate(applied.results) if not item.ok), None)
        if failed_at is None or failed_at > index.last_change:
            return  # only a re-read after the complete restore failed: the next plan will say so
        failed = applied[failed_at]
        error = f"{failed.op} failed: {failed.error_type or 'Failed'}: {failed.error_message or ''}".rstrip(": ")
        done = [summary["id"] for summary in summaries.values() if summary["status"] == "restored"]
        before = f" Restored before it: {', '.join(done)}." if done else ""
        summaries[plan.manifest.id] = rs.result_summary(plan.manifest, "failed", plan.backup)
        result["manifests"] = list(summaries.values())
        if failed_at <= index.manifest:
            result["backup"].pop()  # never written
            raise self._fail(
                f"the backup could not be written to {plan.backup.directory} ({error}); nothing of "
                f"{plan.manifest.id} was changed.{before}",
                **result,
            )
        result["changed"] = True
        self.record_statuses(plan.backup, applied)
        raise self._fail(
            f"restoring {plan.manifest.id} stopped: {error}. What it had replaced so far is saved under backup "
            f"manifest {plan.backup.manifest_id} ({plan.backup.directory}).{before}",
            **result,
        )
