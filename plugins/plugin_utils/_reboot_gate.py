# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Whether rdpfix.rdp.server reboots the host after its repair (its option ``reboot``), and what it says about it.

Pure: the action plugin reads the sessions (from the snapshot in check mode, on the host right before the reboot in
a real run), asks ``decide``, runs ansible.windows.win_reboot's action when told to, and records what happened with
``record``. A reboot ends every session on the host: with users on it, it waits for ``allow_session_disruption``
and says whose sessions it waits for (docs/reliability.md, "Active users are not kicked silently").

The rules are those of the role's earlier reboot tasks (read the sessions right before the reboot, reboot only when
allowed, say it is pending otherwise), moved into the repair task so that a host that needs no reboot costs the
controller no task of its own.
"""

from __future__ import annotations

import dataclasses
import typing as t

DEFAULT_MSG = "rdpfix.rdp is rebooting to apply Schannel (TLS) changes"
# The longest comment shutdown.exe /c accepts (docs/lab.md, [Shutdown]).
MAX_MSG = 512

OPTION_SPEC: dict[str, t.Any] = {
    "type": "dict",
    "options": {
        "allow": {"type": "bool", "default": False},
        "allow_session_disruption": {"type": "bool", "default": False},
        "msg": {"type": "str", "default": DEFAULT_MSG},
        "reboot_timeout": {"type": "int", "default": 600},
    },
}

# What the user sets to allow the reboot: the module's option, and the role's variables that fill it.
ALLOW_HINT = "reboot.allow (the role: rdpfix_server_allow_reboot=true)"
DISRUPTION_HINT = "reboot.allow_session_disruption (the role: rdpfix_server_allow_session_disruption=true)"

Decision = t.Literal["not_needed", "not_allowed", "waits", "reboot"]


def problems(options: t.Mapping[str, t.Any], async_val: int) -> list[str]:
    """What is wrong with the reboot options, checked before the host is contacted (empty when nothing is)."""
    found: list[str] = []
    message = str(options["msg"])
    # win_reboot replaces an empty message with its own; shutdown.exe /c takes at most 512 characters and would fail
    # the reboot only after every change was made.
    if not message.strip():
        found.append("reboot.msg must not be empty")
    elif len(message) > MAX_MSG:
        found.append(f"reboot.msg is {len(message)} characters long; Windows takes at most {MAX_MSG} (shutdown /c)")
    if int(options["reboot_timeout"]) <= 0:
        found.append(f"reboot.reboot_timeout must be a positive number of seconds, not {options['reboot_timeout']}")
    if options["allow"] and async_val:
        # The reboot drops the connection an async job's polling needs.
        found.append("reboot.allow is not supported under async: run the task without async to let it reboot")
    return found


def required_by(concerns: t.Mapping[str, t.Mapping[str, t.Any]]) -> list[str]:
    """The concerns whose changes take effect only after a reboot (``reboot_required``), in the run's order."""
    return [name for name, result in concerns.items() if result.get("reboot_required") and not result.get("failed")]


def decide(options: t.Mapping[str, t.Any], needed_by: t.Sequence[str], users: t.Sequence[object]) -> Decision:
    """Reboot, or why not: nothing needs one, the user did not allow it, or users are on the host."""
    if not needed_by:
        return "not_needed"
    if not options["allow"]:
        return "not_allowed"
    if users and not options["allow_session_disruption"]:
        return "waits"
    return "reboot"


@dataclasses.dataclass
class Outcome:
    """The reboot's result (RV(reboot) of rdpfix.rdp.server), before the concerns' results are updated with it."""

    needed_by: list[str]
    decision: Decision
    # The users' sessions in words ("" when nobody is on the host); None when they were not read.
    users: str | None = None
    check_mode: bool = False
    # In check mode: what the real run will do.
    rebooted: bool = False
    failed_msg: str | None = None
    # The host could not be reached for the sessions read, or by win_reboot before it rebooted (a host that rebooted
    # and is not back in time is a failure of win_reboot's, with rebooted true).
    unreachable: bool = False
    elapsed: object = None

    def result(self, host: str) -> dict[str, t.Any]:
        what = ", ".join(self.needed_by)
        result: dict[str, t.Any] = {
            "changed": self.rebooted,
            "required_by": list(self.needed_by),
            "rebooted": self.rebooted,
            "pending": not self.rebooted,
            "users": self.users,
        }
        if self.elapsed is not None:
            result["elapsed"] = self.elapsed
        if self.failed_msg is not None:
            # A reboot that began and then failed (the host not back in time) still rebooted: said as it is.
            began = " (the reboot began: the host restarted)" if self.rebooted else ""
            result.update(
                msg=f"{host}: the reboot the changes of {what} need failed{began}: {self.failed_msg}",
                **({"unreachable": True} if self.unreachable else {"failed": True}),
            )
            return result
        if self.decision == "not_allowed":
            result["msg"] = (
                f"{host}: a reboot is needed for the changes of {what} to take effect; it was not allowed: set "
                f"{ALLOW_HINT} to let the run reboot"
            )
            result["warnings"] = [result["msg"]]
        elif self.decision == "waits":
            result["waits_for_sessions"] = self.users
            result["msg"] = (
                f"{host}: a reboot is needed for the changes of {what} to take effect, but it would end the "
                f"session(s) of {self.users}; it waits: set {DISRUPTION_HINT} to reboot anyway"
            )
            result["warnings"] = [result["msg"]]
        elif self.check_mode:
            result["msg"] = f"{host}: would reboot for the changes of {what} (check mode)"
        else:
            result["msg"] = f"{host}: rebooted for the changes of {what}"
        return result


def record(concerns: dict[str, dict[str, t.Any]], outcome: Outcome, stale_warnings: t.Container[str] = ()) -> None:
    """The concerns' results as the run summary and the final verification read them after the reboot: a reboot that
    happened (even one that failed afterwards) is no longer required, and a concern's warning asking for it
    (``stale_warnings``) goes; one that waits names the users it waits for. Check mode changes nothing here but the
    wait: the host still needs its reboot, and the summary says so, as the real run's would before it."""
    for name in outcome.needed_by:
        concern = concerns.get(name)
        if concern is None:
            continue
        if outcome.rebooted and not outcome.check_mode:
            concern.update(reboot_required=False, rebooted=True)
            kept = [warning for warning in concern.get("warnings") or [] if warning not in stale_warnings]
            if kept:
                concern["warnings"] = kept
            else:
                concern.pop("warnings", None)
        elif outcome.decision == "waits":
            concern["reboot_waits_for_sessions"] = outcome.users or ""
