# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The filters rdpfix.rdp.run_summary and rdpfix.rdp.run_summaries (documentation: run_summary.yml and
run_summaries.yml next to this file)."""

from __future__ import annotations

import typing as t

from ansible.errors import AnsibleFilterError

from ansible_collections.rdpfix.rdp.plugins.plugin_utils._summary import summary_lines


def run_summary(result: t.Any, summary: t.Any = None, check_mode: t.Any = False, left: t.Any = False) -> list[str]:
    """The run summary of one host, as lines."""
    for name, value in (("result", result), ("summary", summary)):
        if value is not None and not isinstance(value, t.Mapping):
            raise AnsibleFilterError(
                f"rdpfix.rdp.run_summary: {name} must be a dictionary (a registered result), not {type(value).__name__}"
            )
    return summary_lines(result, summary, check_mode=bool(check_mode), left=bool(left))


def run_summaries(hostvars: t.Any, hosts: t.Any, left: t.Any = (), check_mode: t.Any = False) -> dict[str, list[str]]:
    """Every host's run summary by host name, read from ``hostvars`` (each host's registered ``rdpfix_server_result``
    and ``rdpfix_server_summary`` when a play recorded one): one task for the whole run instead of one per host."""
    if not isinstance(hostvars, t.Mapping):
        raise AnsibleFilterError(f"rdpfix.rdp.run_summaries: give hostvars, not {type(hostvars).__name__}")
    if isinstance(hosts, (str, bytes)) or not isinstance(hosts, t.Iterable):
        raise AnsibleFilterError("rdpfix.rdp.run_summaries: hosts must be a list of host names, not a string")
    gone = {str(name) for name in left or ()}
    summaries: dict[str, list[str]] = {}
    for host in hosts:
        name = str(host)
        try:
            own = hostvars.get(name)
            if own is None:
                own = {}
            result = own.get("rdpfix_server_result")
            recorded = own.get("rdpfix_server_summary")
        except Exception as exc:
            # One host's broken variables must not cost every host its summary: the task runs once for the whole run,
            # and an error here would fail every host of the run.
            summaries[name] = [f"NO SUMMARY: its variables could not be read ({type(exc).__name__}: {exc})"]
            continue
        summaries[name] = run_summary(
            result if isinstance(result, t.Mapping) else {},
            recorded if isinstance(recorded, t.Mapping) else None,
            check_mode,
            name in gone,
        )
    return summaries


class FilterModule:
    """rdpfix.rdp filters."""

    def filters(self) -> dict[str, t.Callable[..., t.Any]]:
        return {"run_summary": run_summary, "run_summaries": run_summaries}
