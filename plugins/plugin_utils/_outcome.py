# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a module says when the answer to its changes was lost: it reads the host again and tells what it finds.

``_agent.run_batch`` raises ``OutcomeUnknown`` when a batch that changes the host was sent and its answer did not come
back (docs/reliability.md). The module then opens a new connection, fences the lost batch off and looks for the
backup manifest it was to write (the controller chose its id before sending), and plans again from the host as it is
now, in check mode:

* nothing left to do and the manifest is there: the changes were made - ``changed``, ``outcome: made``, a warning;
* changes left: failed, ``outcome: partial`` (the batch claimed its backup folder: it ran, maybe not to its end, maybe
  is still running) or ``outcome: not_made`` (this run claimed the folder first: the batch never wrote and never will),
  listing what is still to do;
* the host cannot be read again: failed, ``outcome: unknown``, naming the manifest to look at.

The fence: on Windows a command goes on after its connection dropped (a WinRM shell lives on, a Run Command cannot be
cancelled), so a lost batch may still be waiting for the run lock when the host is read again, and write after. A
missing manifest alone proves nothing. Every apply batch starts by creating its backup folder with a claim file, atomic
on the host (dir.create ``claim``), and stops before any write if the file is there. ``fence`` claims the folder of the
lost batch in the round trip that reads its manifest: claimed - the batch can no longer write; already claimed - the
batch got there first, and its manifest tells the rest.
"""

from __future__ import annotations

import ntpath
import typing as t

from ansible.errors import AnsibleError

from ._agent import Batch, BatchResult, OutcomeUnknown
from ._guards import GUARD_OP

if t.TYPE_CHECKING:
    from ._action import RdpfixAction

MANIFEST_FILE = "manifest.json"


# dir.create's error when the claim file is already there.
ALREADY_CLAIMED = "AlreadyClaimed"


def fence(action: RdpfixAction, lost: OutcomeUnknown) -> bool | None:
    """Claim the lost batch's backup folder, and read its manifest, in one round trip. True: the manifest is there (the
    batch ran); False: this run claimed the folder - the batch never wrote and never will; None: neither is known (the
    batch had no backup folder, or claimed it and has no manifest yet, or the claim failed)."""
    from ._action import BACKUP_DIR_SDDL, CLAIM_FILE, FENCED  # noqa: PLC0415 (_action imports this module)

    if not lost.manifest_dir:
        return None
    # The manifest read first, the claim last: "stop" (a batch inside rdpfix.rdp.server's run lock must stop on a
    # failure) skips nothing. A claim made after a read that found no manifest still fences: the batch writes its
    # manifest only after its own claim.
    batch = Batch(on_error="stop")
    position = batch.add("file.stat", path=ntpath.join(lost.manifest_dir, MANIFEST_FILE))
    claim = batch.add(
        "dir.create",
        path=lost.manifest_dir,
        sddl=BACKUP_DIR_SDDL,
        claim=CLAIM_FILE,
        claim_text=f"{FENCED}: the answer to batch {lost.manifest_id} was lost; the run that read the host again "
        "claimed this folder so that the batch can no longer write",
        # Claimed first by the batch: told, not failed (a failure would stop the other modules' reads in
        # rdpfix.rdp.server's shared batch).
        must_claim=False,
    )
    # Outside the run lock: the lost batch may hold it, and the claim is atomic by itself.
    answered = action.send(batch, locked=False)
    stat = answered[position]
    if stat.ok and stat.data.get("exists"):
        return True
    return False if answered[claim].ok and answered[claim].data.get("claimed") is True else None


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
        present = fence(action, lost)
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
        made = present is not False
        action.warn(
            f"The answer to the changes was lost ({lost.reason}); read again, "
            + (
                "the host shows them made" + (f", recorded in {where}" if present else "")
                if made
                else "the host already is as planned; the lost batch made none of it"
            )
        )
        return again | {"changed": made, "outcome": "made" if made else "not_needed", "backup": backup}
    todo = _still_to_do(again)
    if present:
        state = f"the batch ran, perhaps not to its end: {where} is on the host with what it saved"
        outcome = "partial"
    elif present is False:
        state = f"nothing was changed ({where} is not on the host: the batch never reached these changes)"
        outcome = "not_made"
    elif lost.manifest_dir:
        state = (
            f"the batch started, perhaps is still running: its backup folder {lost.manifest_dir} could not be claimed "
            f"and holds no manifest yet"
        )
        outcome = "partial"
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
    if failed.op == GUARD_OP and failed_at < len(batch.ops):
        # A guard whose read failed (AccessDenied...): a GuardFailed is handled before, as a host that changed.
        label = (batch.ops[failed_at].get("args") or {}).get("label") or "the state the plan relied on"
        return f"{host}: the check before the changes could not be made: {label} ({error}); nothing was changed"
    if failed.op == "dir.create" and failed.error_type == ALREADY_CLAIMED:
        # A claim of this batch's own (an earlier execution of it) is an unknown outcome, raised by _agent.run_batch:
        # here the claim is another run's (the fence of a run that read the host again).
        return (
            f"{host}: the backup folder {backup.directory} was claimed by another run first ({error}); nothing was "
            "changed"
        )
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
