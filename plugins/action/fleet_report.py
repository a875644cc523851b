# Copyright: rdpfix maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.fleet_report: gather every host's facts result from hostvars and write the report.

It runs on the controller only and contacts no host, so it subclasses ansible-core's ActionBase directly instead of the
collection's agent-running base class.
"""

from __future__ import annotations

import keyword
import os
import typing as t
from datetime import UTC, datetime

from ansible.errors import AnsibleActionFail
from ansible.plugins.action import ActionBase

from ansible_collections.rdpfix.rdp.plugins.plugin_utils._report import (
    FAIL_ON_CHOICES,
    FORMATS,
    FleetReport,
    HostResult,
    ReportInputError,
    changed_paths,
    gate,
    host_from_result,
    report_paths,
    summarise,
    to_plain,
    write_report,
)

ARGUMENT_SPEC: dict[str, dict[str, t.Any]] = {
    "hosts": {"type": "list", "elements": "str"},
    "findings_var": {"type": "str", "required": True},
    "handshake_var": {"type": "str"},
    "dest": {"type": "path", "required": True},
    "formats": {"type": "list", "elements": "str", "choices": list(FORMATS), "default": list(FORMATS)},
    "title": {"type": "str", "default": "Remote Desktop fleet report"},
    "fail_on": {"type": "str", "choices": list(FAIL_ON_CHOICES), "default": "none"},
}


def _valid_variable_name(name: str) -> bool:
    return name.isidentifier() and not keyword.iskeyword(name)


class ActionModule(ActionBase):  # type: ignore[misc]  # ansible-core ships no type information
    TRANSFERS_FILES = False
    _supports_check_mode = True
    _supports_async = False
    # Everything happens on the controller: no connection to the (delegated) host is needed at all.
    _requires_connection = False

    def run(self, tmp: str | None = None, task_vars: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
        result: dict[str, t.Any] = super().run(tmp, task_vars)
        task_vars = task_vars or {}
        _validation, params = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)

        for option in ("findings_var", "handshake_var"):
            name = params[option]
            if name is not None and not _valid_variable_name(name):
                raise AnsibleActionFail(f"{option}: {name!r} is not a valid variable name")
        if not params["formats"]:
            raise AnsibleActionFail("formats: name at least one of " + ", ".join(FORMATS))
        formats = list(dict.fromkeys(params["formats"]))
        if not params["title"].strip():
            raise AnsibleActionFail("title: must not be empty")

        host_names = params["hosts"]
        if host_names is None:
            host_names = list(task_vars.get("ansible_play_hosts_all") or [])
        host_names = list(dict.fromkeys(str(name) for name in host_names))
        hostvars = task_vars.get("hostvars")
        if hostvars is None:
            raise AnsibleActionFail("hostvars are not available to this task")
        unknown = [name for name in host_names if name not in hostvars]
        if unknown:
            raise AnsibleActionFail("hosts: not in the inventory: " + ", ".join(sorted(unknown)))

        # Like fetch's dest, a relative path is taken from the playbook's directory, not from where Ansible started.
        dest = params["dest"]
        if not os.path.isabs(dest):
            dest = self._loader.path_dwim(dest)
        if os.path.exists(dest) and not os.path.isdir(dest):
            raise AnsibleActionFail(f"dest: {dest} exists and is not a directory")

        hosts = [
            self._host_result(name, hostvars, params["findings_var"], params["handshake_var"]) for name in host_names
        ]
        if not self._task.run_once and len(host_names) > 1:
            self._display.warning(
                "rdpfix.rdp.fleet_report writes one report for the whole play; run it with run_once: true "
                "(and delegate_to: localhost) so it is not written once per host"
            )
        report = FleetReport(
            title=params["title"],
            generated_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            hosts=tuple(hosts),
            fail_on=params["fail_on"],
        )

        # Changed: a file is new or says something else than before (a new time stamp alone is no change). Check mode
        # writes nothing and says which files it would write and which of them would change.
        changed = changed_paths(report, dest, formats)
        write = not self._task.check_mode
        if write:
            try:
                paths = write_report(report, dest, formats)
            except OSError as error:
                raise AnsibleActionFail(f"could not write the report into {dest}: {error}") from error
        else:
            paths = report_paths(dest, formats)

        summary = summarise(report)
        failing = gate(report)
        result.update(
            changed=bool(changed),
            changed_paths=changed,
            written=write,
            dest=dest,
            paths=paths,
            hosts=summary.hosts,
            counts={
                "status": summary.by_status,
                "severity": summary.by_severity,
                "cause": summary.hosts_by_cause(),
            },
            failing_hosts=failing,
        )
        if failing:
            result["failed"] = True
            shown = ", ".join(failing[:10]) + (f" and {len(failing) - 10} more" if len(failing) > 10 else "")
            result["msg"] = (
                f"{len(failing)} of {summary.hosts} host(s) fail the gate fail_on={report.fail_on}: {shown}"
                + (f" (report written to {dest})" if write else f" (check mode: report not written to {dest})")
            )
        elif write:
            result["msg"] = f"fleet report of {summary.hosts} host(s) written to {dest}" + (
                f" ({len(changed)} file(s) changed)" if changed else " (unchanged)"
            )
        else:
            names = ", ".join(os.path.basename(path) for path in paths.values())
            result["msg"] = (
                f"check mode: would write the fleet report of {summary.hosts} host(s) to {dest} ({names}); "
                + (f"{len(changed)} file(s) would change" if changed else "no file would change")
            )
        return result

    def _host_result(self, name: str, hostvars: t.Any, findings_var: str, handshake_var: str | None) -> HostResult:
        """One host's line of the report; a host whose variables cannot be read is reported, never raised."""
        address = name
        try:
            variables = hostvars[name]
            raw_address = variables.get("ansible_host") if "ansible_host" in variables else None
            if raw_address:
                address = str(raw_address)
            raw_result = variables.get(findings_var) if findings_var in variables else None
            raw_handshake = None
            if handshake_var and handshake_var in variables:
                raw_handshake = variables.get(handshake_var)
            return host_from_result(name, address, to_plain(raw_result), to_plain(raw_handshake))
        except ReportInputError as error:
            return HostResult(name, address, "failed", message=f"malformed facts result: {error}")
        except Exception as error:  # a template error in one host's vars must not hide the fleet
            return HostResult(name, address, "failed", message=f"could not read this host's variables: {error}")
