# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.machinekeys: read, plan, back up, apply, verify, or undo a run (docs: modules/)."""

from __future__ import annotations

import typing as t

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _certificate as certificate
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _guards, _outcome
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _machinekeys as mk
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import (
    COMMON_ARGUMENT_SPEC,
    SESSION_ARGUMENT_SPEC,
    SNAPSHOT_ARGUMENT_SPEC,
    ActionFailed,
    BackupSet,
    RdpfixAction,
    backup_root,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch, BatchResult


class ActionModule(RdpfixAction):
    MODULE_NAME = "machinekeys"
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {
        **COMMON_ARGUMENT_SPEC,
        **SESSION_ARGUMENT_SPEC,
        **SNAPSHOT_ARGUMENT_SPEC,
        "strategy": {"type": "str", "default": "permissions", "choices": list(mk.STRATEGIES)},
        "state": {"type": "str", "default": "present", "choices": ["present", "restored"]},
        "manifest_id": {"type": "str"},
        "restart_service": {"type": "str", "default": "SessionEnv", "choices": list(certificate.RESTARTABLE_SERVICES)},
        "start_stopped_services": {"type": "bool", "default": False},
    }
    REQUIRED_IF: t.ClassVar[list[t.Any]] = [("state", "restored", ["manifest_id"])]

    options: mk.Options

    def validate_params(self, params: dict[str, t.Any]) -> None:
        try:
            self.options = mk.Options.from_params(params)
        except mk.PlanError as exc:
            raise ActionFailed(str(exc)) from exc

    # -------------------------------------------------------------------------------------------------- reading

    def _read_state(self, wait_ms: int = 0) -> mk.State:
        """One round trip; a second only on a host whose ProgramData is not C:\\ProgramData. ``wait_ms``: wait on
        the host before reading (polls after a restart)."""
        batch, index = mk.build_read_batch(self.options, self.now, wait_ms=wait_ms)
        result = self.read(batch)
        system = result[index.cert.system]
        program_data = str((system.data if system.ok else {}).get("program_data") or mk.DEFAULT_PROGRAM_DATA)
        if program_data.casefold() != mk.DEFAULT_PROGRAM_DATA.casefold():
            batch, index = mk.build_read_batch(self.options, self.now, program_data)
            result = self.read(batch)
        return mk.parse_state(result, index, self.now, program_data)

    # -------------------------------------------------------------------------------------------------- run

    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        state = self._read_state()
        root = backup_root(params, state.program_data)
        if self.options.state == "restored":
            return self._restore(state, root)

        decided = mk.plan(state, self.options)
        before = mk.view(state)
        result: dict[str, t.Any] = {
            "changed": False,
            "strategy": self.options.strategy,
            "findings": decided.findings,
            "machinekeys": before,
            "before": before,
            "backup": None,
            "restart_pending": decided.restart_pending,
        }
        if decided.restart_pending:
            self.warn(
                next(item["title"] for item in decided.findings if item["id"] == "machinekeys.regeneration_pending")
            )
        if decided.unfixable:
            # A refusal is a refusal in check mode too: --check fails the host where the real run would.
            message = f"{self.host}: " + "; ".join(decided.unfixable)
            raise ActionFailed(
                message + "; nothing was changed",
                **result,
                actions=decided.actions(),
            )

        actions = decided.actions()
        if not decided.has_changes or self.check_mode:
            result["actions"] = [action | {"status": "planned"} for action in actions]
            result["after"] = mk.predicted_view(state, decided)
            result["changed"] = decided.has_changes
            result["diff"] = {"before": before, "after": result["after"]}
            return result

        backup = mk.new_backup(state.cert.hostname, root, self.now)
        batch, index = mk.build_apply_batch(state, self.options, decided, backup)
        applied = self.run_batch(batch)
        changed_since = _guards.guard_failure(applied, index.guards)
        if changed_since is not None:
            # Stopped before its first write (no backup either): read again and plan once more.
            raise _guards.HostChanged(str(changed_since))
        result["backup"] = backup.summary(applied)
        self._raise_on_apply_failure(batch, applied, index, backup, result)

        result["changed"] = True
        result["actions"] = [action | {"status": "done"} for action in actions]
        after_state = mk.state_after(state, applied, index, self.now)
        problems = self._verify(after_state, decided)
        polls = 0
        while problems and polls < certificate.VERIFY_POLLS and decided.regeneration is not None:
            polls += 1
            # As the certificate module's polls: give Windows time to create the certificate before reading again.
            after_state = self._read_state(wait_ms=certificate.POLL_MS)
            problems = self._verify(after_state, decided)
        result["after"] = mk.view(after_state)
        result["machinekeys"] = result["after"]
        result["diff"] = {"before": before, "after": result["after"]}
        if problems:
            raise ActionFailed(
                f"{self.host}: the changes were made but the host does not show them yet: {'; '.join(problems)}. "
                f"Everything changed is saved under backup manifest {backup.manifest_id} ({backup.directory}); "
                "restore it with state=restored",
                **result,
            )
        return result

    def _verify(self, after: mk.State, decided: mk.Plan) -> list[str]:
        problems = mk.remaining_problems(after, self.options)
        if decided.regeneration is not None:
            problems += certificate.verification_problems(
                decided.regeneration.cert_state,
                after.cert,
                self.options.certificate_options(),
                decided.regeneration.cert_plan,
            )
        return problems

    def _raise_on_apply_failure(
        self, batch: Batch, applied: BatchResult, index: mk.ApplyIndex, backup: BackupSet, result: dict[str, t.Any]
    ) -> None:
        changes = [*index.changes, *(pos for pos, _a in (index.cert.actions if index.cert else []))]
        last_change = max(changes, default=index.manifest)
        failed_at = next((position for position, item in enumerate(applied.results) if not item.ok), None)
        if failed_at is None or failed_at > last_change:
            return
        # What was and was not changed comes from the batch's own results: a first change that failed made nothing.
        message = _outcome.failure_message(
            self.host, batch, applied, failed_at=failed_at, manifest=index.manifest, changes=changes, backup=backup
        )
        self.record_statuses(backup, applied)
        raise ActionFailed(message, **result)

    # -------------------------------------------------------------------------------------------------- restore

    def _restore(self, state: mk.State, root: str) -> dict[str, t.Any]:
        manifest_id = str(self.options.manifest_id)
        batch, manifest_position, marker_position, saved_position = mk.build_manifest_read(root, manifest_id)
        read = self.run_batch(batch)
        saved = mk.folder_from_result(read, saved_position, mk.manifest_dir(root, manifest_id))
        try:
            manifest = mk.parse_manifest(read, manifest_position, manifest_id)
            unmade = [] if mk.already_restored(read, marker_position) else mk.unmade_moves(state, manifest, saved)
        except mk.PlanError as exc:
            raise ActionFailed(f"{self.host}: {exc}; nothing was changed") from exc
        for item in unmade:
            # Nothing of it to put back (its run stopped before or at that move): the rest of the manifest is restored.
            self.warn(
                f"{item.get('source')} was not moved by {manifest_id} (its run stopped before or at that move): it is "
                "where it was, nothing of it to put back"
            )
        manifest = manifest | {"items": [item for item in manifest["items"] if item not in unmade]}
        result: dict[str, t.Any] = {"changed": False, "restored": manifest_id, "before": mk.view(state), "backup": None}
        marker = mk.already_restored(read, marker_position)
        if marker is not None:
            result["after"] = result["before"]
            result["msg"] = f"{manifest_id} was already restored (by {marker.get('restored_by')})"
            result["actions"] = []
            return result
        backup = BackupSet.create(self.MODULE_NAME, state.cert.hostname, root, self.now)
        undo = mk.plan_restore(state, manifest, root, backup)
        result["actions"] = [action | {"status": "planned" if self.check_mode else "done"} for action in undo.actions]
        if self.check_mode:
            result["changed"] = True
            result["after"] = {"restored_from": manifest_id}
            result["diff"] = {"before": result["before"], "after": result["after"]}
            return result
        apply_batch, manifest_index, store_index, cng_index = mk.build_restore_batch(
            state, undo, manifest_id, root, backup
        )
        applied = self.run_batch(apply_batch)
        result["backup"] = backup.summary(applied)
        failed_at = next((position for position, item in enumerate(applied.results) if not item.ok), None)
        if failed_at is not None:
            failed = applied[failed_at]
            error = f"{failed.op} failed: {failed.error_type or 'Failed'}: {failed.error_message or ''}"
            if failed_at <= manifest_index:
                raise ActionFailed(
                    f"{self.host}: the backup could not be written to {backup.directory} ({error}); "
                    "nothing was changed",
                    **result,
                )
            self.record_statuses(backup, applied)
            raise ActionFailed(
                f"{self.host}: the restore stopped: {error}. What it replaced is saved under {backup.manifest_id}",
                **result,
            )
        after = mk.State(
            cert=state.cert,
            os_build=state.os_build,
            machine_guid=state.machine_guid,
            program_data=state.program_data,
            store=mk.folder_from_result(applied, store_index, state.store.path),
            cng_store=mk.folder_from_result(applied, cng_index, state.cng_store.path),
            events=state.events,
        )
        result["changed"] = True
        result["after"] = {"folder": mk.view(after)["folder"], "key_files": mk.view(after)["key_files"]}
        result["diff"] = {"before": result["before"], "after": result["after"]}
        return result
