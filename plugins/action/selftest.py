# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Action plugin of rdpfix.rdp.selftest: every read operation once, checked against its schema; a JSON report.

It never writes to the host: both batches hold read operations only (the agent runner refuses nothing here, so this
is checked in the tests). The report is written on the controller.
"""

from __future__ import annotations

import json
import os
import typing as t

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _events as events
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _selftest as selftest
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import ActionFailed, RdpfixAction, iso_utc
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._machinekeys import DEFAULT_PROGRAM_DATA


class ActionModule(RdpfixAction):
    MODULE_NAME = "selftest"
    ARGUMENT_SPEC: t.ClassVar[dict[str, dict[str, t.Any]]] = {
        "dest": {"type": "path"},
        "include_data": {"type": "bool", "default": True},
        "fail_on_problems": {"type": "bool", "default": True},
    }

    def run_task(self, params: dict[str, t.Any]) -> dict[str, t.Any]:
        schemas = selftest.load_schemas()
        batch, planned = selftest.first_batch(self.now, events.QUERIES)
        if batch.writes:  # the plan is fixed: a write here would be a defect of this module
            raise ActionFailed("the self-test planned a write; refusing to run it")
        results = selftest.collect(planned, self.run_batch(batch))
        system = results["system.info"].get("data") or {}
        program_data = str(system.get("program_data") or DEFAULT_PROGRAM_DATA)
        key = selftest.rdp_key_record(results["listener.get"].get("data"), results["cert.list"].get("data"))
        key_path = key.get("path") if key else None
        batch, planned = selftest.second_batch(program_data, key_path if isinstance(key_path, str) else None)
        results.update(selftest.collect(planned, self.run_batch(batch)))

        report = selftest.build_report(
            self.host,
            results,
            schemas,
            generated_at=iso_utc(self.now),
            round_trips=self.round_trips,
            include_data=params["include_data"],
        )
        result: dict[str, t.Any] = {
            "changed": False,
            "status": report["status"],
            "counts": report["counts"],
            "environment": report["environment"],
            "problems": selftest.problems(report),
            "report": report,
        }
        dest = params["dest"]
        if dest and not self.check_mode:
            self._write(dest, report)
            result["dest"] = dest
        if params["fail_on_problems"] and result["problems"]:
            raise ActionFailed(
                f"{self.host}: {len(result['problems'])} read operation(s) failed or answered outside their schema: "
                + "; ".join(result["problems"][:5]),
                **result,
            )
        return result

    def _write(self, dest: str, report: dict[str, t.Any]) -> None:
        folder = os.path.dirname(os.path.abspath(dest))
        try:
            os.makedirs(folder, exist_ok=True)
            temporary = f"{dest}.tmp"
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(report, handle, indent=2, sort_keys=True)
                handle.write("\n")
            os.replace(temporary, dest)
        except OSError as exc:
            raise ActionFailed(f"cannot write the self-test report to {dest}: {exc.strerror or exc}") from exc
