"""Reading the rdpfix_server role's per-concern results out of a playbook run.

The role plans every concern from one snapshot and applies them in one batch (rdpfix.rdp.server); its last task
shows each concern's result as one loop item, in the shape of that module's own result.
"""

from __future__ import annotations

import typing as t

from harness import PlaybookRun

# The read (the snapshot) and the repair are one task: rdpfix.rdp.server taking the snapshot itself.
APPLY_TASK = (
    "rdpfix.rdp.rdpfix_server : Read the host once and repair every concern from that read, all changes in one apply "
    "batch"
)
REPORT_TASK = "rdpfix.rdp.rdpfix_server : Show each concern's result (one line, and with --diff one diff, per concern)"
# The concerns, then the repair task's reboot and final verification (shown as the loop's last items).
CONCERNS = ("machinekeys", "certificate", "firewall", "transport", "tls", "reboot", "verification")


def concern_results(run: PlaybookRun, concern: str) -> dict[str, dict[str, t.Any]]:
    """host -> the result the role shows for one concern (module name ``rdpfix.rdp.<concern>`` or the concern)."""
    name = concern.removeprefix("rdpfix.rdp.")
    found: dict[str, dict[str, t.Any]] = {}
    for host, result in run.results(REPORT_TASK).items():
        for item in result.get("results") or []:
            if item.get("item") == name:
                found[host] = item
    return found


def failed_concern(run: PlaybookRun, host: str) -> str | None:
    """The module (rdpfix.rdp.<concern>) whose result failed the host, or None."""
    for item in run.results(REPORT_TASK).get(host, {}).get("results") or []:
        if item.get("failed"):
            return f"rdpfix.rdp.{item.get('item')}"
    return None


def results_of(run: PlaybookRun, task: str) -> dict[str, dict[str, t.Any]]:
    """host -> result of a task by its name, or of a concern (``tls``, ``rdpfix.rdp.tls``) as the role shows it."""
    if task.removeprefix("rdpfix.rdp.") in CONCERNS:
        return concern_results(run, task)
    return run.results(task)


SUMMARY_TASK = "Show what was found and done"


def run_summaries(run: PlaybookRun) -> dict[str, list[str]]:
    """host -> its lines in playbooks/fix_rdp.yml's run summary (one task, run once, for every host of the run)."""
    results = run.results(SUMMARY_TASK)
    assert len(results) == 1, f"the summary runs once, not for {sorted(results)}"
    (result,) = results.values()
    return t.cast(dict[str, list[str]], result["msg"])
