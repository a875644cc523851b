# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The filter rdpfix.rdp.run_summary (documentation: run_summary.yml next to this file)."""

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


class FilterModule:
    """rdpfix.rdp filters."""

    def filters(self) -> dict[str, t.Callable[..., t.Any]]:
        return {"run_summary": run_summary}
