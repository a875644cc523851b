# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a module says when the answer to its changes was lost: it reads the host again and tells what it finds.

``_agent.run_batch`` raises ``OutcomeUnknown`` when a batch that changes the host was sent and its answer did not come
back (docs/reliability.md). The module then opens a new connection, looks for the backup manifest the lost batch was
to write (the controller chose its id before sending), and plans again from the host as it is now, in check mode:

* nothing left to do and the manifest is there: the changes were made - ``changed``, ``outcome: made``, a warning;
* changes left: failed, ``outcome: partial`` (the manifest is there: the batch ran, maybe not to its end) or
  ``outcome: not_made`` (no manifest: nothing was changed), listing what is still to do;
* the host cannot be read again: failed, ``outcome: unknown``, naming the manifest to look at.
"""

from __future__ import annotations

import ntpath
import typing as t

from ansible.errors import AnsibleError

from ._agent import Batch, BatchResult, OutcomeUnknown

if t.TYPE_CHECKING:
    from ._action import RdpfixAction

MANIFEST_FILE = "manifest.json"


def manifest_written(action: RdpfixAction, lost: OutcomeUnknown) -> bool | None:
    """Whether the lost batch's manifest is on the host (None: the batch had none)."""
    if not lost.manifest_dir:
        return None
    batch = Batch(on_error="continue")
    position = batch.add("file.stat", path=ntpath.join(lost.manifest_dir, MANIFEST_FILE))
    stat = action.send(batch)[position]
    return bool(stat.ok and stat.data.get("exists"))


def _still_to_do(again: dict[str, t.Any]) -> list[str]:
    actions = again.get("actions") or []
    return [
        str(item.get("description") or item.get("action") or item)
        for item in actions
        if isinstance(item, dict) and item.get("status") in (None, "planned")
    ]


def resolve(action: RdpfixAction, params: dict[str, t.Any], lost: OutcomeUnknown) -> dict[str, t.Any]:
    """The task's result after ``lost``: what a new connection and a new read of the host show."""
    from ._action import ActionFailed, StaleSnapshot  # noqa: PLC0415 (_action imports this module)

    backup = {"manifest_id": lost.manifest_id, "path": lost.manifest_dir}
    unknown: dict[str, t.Any] = {
        "failed": True,
        "changed": False,
        "outcome": "unknown",
        "msg": f"{action.host}: {lost.message}",
        "backup": backup,
    }
    check_mode = action.check_mode
    try:
        # A module whose batches travel inside another's (rdpfix.rdp.server) leaves the connection to its owner.
        reset = getattr(action._connection, "reset", None) if action.batch_sender is None else None
        if callable(reset):
            reset()
        present = manifest_written(action, lost)
        action.check_mode = True
        action.snapshot, action.relied_on = None, {}
        again = action.run_task(params)
    except (AnsibleError, ActionFailed, StaleSnapshot) as exc:
        detail = getattr(exc, "message", None) or getattr(exc, "msg", None) or str(exc)
        unknown["msg"] += f". Reading the host again failed too: {detail}"
        return unknown
    finally:
        action.check_mode = check_mode
    where = f"backup manifest {lost.manifest_id} ({lost.manifest_dir})"
    if not again.get("changed"):
        action.warn(
            f"The answer to the changes was lost ({lost.reason}); read again, the host shows them made"
            + (f", recorded in {where}" if present else "")
        )
        made = present is not False
        return again | {"changed": made, "outcome": "made" if made else "not_needed", "backup": backup}
    todo = _still_to_do(again)
    if present:
        state = f"the batch ran, perhaps not to its end: {where} is on the host with what it saved"
        outcome = "partial"
    elif present is False:
        state = f"nothing was changed ({where} is not on the host: the batch never reached these changes)"
        outcome = "not_made"
    else:
        state = "the host still needs changes"
        outcome = "partial"
    return again | {
        "failed": True,
        "changed": bool(present),
        "outcome": outcome,
        "backup": backup,
        "still_to_do": todo,
        "msg": (
            f"{action.host}: the answer to the changes was lost ({lost.reason}); read again: {state}. "
            f"Still to do: {'; '.join(todo) or 'see findings'}. Run the task again to finish the repair"
        ),
    }


def describe_op(item: dict[str, t.Any]) -> str:
    """One operation of a batch in a few words, for failure messages."""
    op = str(item.get("op"))
    args = item.get("args") or {}
    if "src" in args and "dest" in args:
        return f"{op} {args['src']} -> {args['dest']}"
    for key in ("path", "thumbprint", "name", "display_name"):
        if args.get(key):
            target = str(args[key])
            if key == "path" and args.get("name"):
                target = f"{target}\\{args['name']}"
            return f"{op} {target}"
    return op


def change_report(
    batch: Batch, applied: BatchResult, changes: t.Iterable[int], labels: t.Mapping[int, str] | None = None
) -> tuple[list[str], list[str]]:
    """From the batch's own results: the changes (positions in ``batch``) that were made, and those that were not,
    each named by its label (the plan's words for it) or by the operation itself."""
    made: list[str] = []
    not_made: list[str] = []
    for position in sorted(set(changes)):
        if position >= len(applied.results) or position >= len(batch.ops):
            continue
        name = (labels or {}).get(position) or describe_op(batch.ops[position])
        (made if applied.results[position].ok else not_made).append(name)
    return made, not_made


def failure_message(
    host: str,
    batch: Batch,
    applied: BatchResult,
    *,
    failed_at: int,
    manifest: int,
    changes: t.Iterable[int],
    backup: t.Any,
    labels: t.Mapping[int, str] | None = None,
) -> str:
    """The message of an apply batch that stopped at ``failed_at``: what was and was not changed, and where the backup
    is. ``manifest`` is the position of the manifest write, ``changes`` the positions of the changes after it,
    ``labels`` the plan's words for some of them."""
    failed = applied[failed_at]
    error = f"{failed.op} failed: {failed.error_type or 'Failed'}: {failed.error_message or ''}".rstrip(": ")
    where = f"manifest {backup.manifest_id} ({backup.directory})"
    if failed_at <= manifest:
        return f"{host}: the backup could not be written to {backup.directory} ({error}); nothing was changed"
    made, not_made = change_report(batch, applied, changes, labels)
    if not made:
        return (
            f"{host}: {error}; none of the repair was made (not made: {'; '.join(not_made) or 'every change'}). "
            f"Only the backup was written: {where}; nothing needs restoring"
        )
    return (
        f"{host}: {error} after part of the repair was made. Made: {'; '.join(made)}. Not made: "
        f"{'; '.join(not_made) or 'nothing else'}. Everything changed is saved under backup {where}; put it back "
        f"with rdpfix.rdp.restore manifest_id={backup.manifest_id}"
    )
