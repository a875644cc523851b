# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# The code is the action plugin plugins/action/selftest.py; this file holds its documentation.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: selftest
short_description: Check that the rdpfix agent reads a Windows host correctly, and write a report for a bug report
version_added: 0.1.0
description:
  - Runs every read operation of the collection's PowerShell agent once on the host and checks each answer against
    the JSON Schema of that operation (the collection's C(plugins/plugin_utils/_op_schemas.json); the collection's
    tests hold its simulated hosts to the same schemas).
  - Reports the environment the agent runs in - Windows PowerShell and .NET Framework versions, OS build and installed
    UI language, language mode, the caller's identity, groups and privileges as the agent reports them - and whether
    the listener's RDP key file and its ACL can be read by the account Ansible uses.
  - Writes the report as JSON on the controller (O(dest)), to attach to a bug report.
  - Never changes the host; every operation it sends is a read. The file read it exercises is of a file that does not
    exist, so no file content (and no private key) leaves the host.
options:
  dest:
    description:
      - Path on the controller to write the JSON report to; its folder is created if needed. An existing file is
        replaced.
      - Omitted, the report is only returned (RV(report)). In check mode nothing is written on the controller either.
    type: path
  include_data:
    description:
      - Include each operation's answer in the report. Set to V(false) to share only the environment, the statuses
        and the schema errors (the answers hold firewall rules, event messages, certificate bodies and ACLs).
    type: bool
    default: true
  fail_on_problems:
    description:
      - Fail the task when an operation failed or answered outside its schema. The report is written first either
        way.
    type: bool
    default: true
extends_documentation_fragment:
  - rdpfix.rdp.attributes
  - rdpfix.rdp.attributes.windows
attributes:
  check_mode:
    support: full
    description: The module never changes the host; check mode runs the same reads and writes no report file.
  diff_mode:
    support: none
  platform:
    platforms: windows
notes:
  - Two WinRM commands per host, both read-only. The first runs every read operation that needs no path from the
    host; the second the file-system reads at the paths the first reported (the ProgramData folder, the listener's
    RDP key file).
  - The Security log needs an account allowed to read it; when it cannot be read, RV(report) says so under
    C(events.query) and the other logs are still read.
seealso:
  - module: rdpfix.rdp.facts
author: rdpfix maintainers (@rdpfix)
"""

EXAMPLES = r"""
- name: Self-test the agent on the host and keep the report
  rdpfix.rdp.selftest:
    dest: "reports/selftest/{{ inventory_hostname }}.json"

- name: Only the environment and the statuses, without the answers
  rdpfix.rdp.selftest:
    dest: "reports/selftest/{{ inventory_hostname }}.json"
    include_data: false
    fail_on_problems: false
  register: selftest

- name: Show whether the account can read the RDP key file
  ansible.builtin.debug:
    var: selftest.environment.rdp_key
"""

RETURN = r"""
status:
  description: C(ok) when every read operation answered in its documented shape, else C(problems).
  returned: success
  type: str
  sample: ok
counts:
  description: Number of operations per status (C(ok), C(invalid) - answered outside its schema, C(error) - failed, C(not_run)).
  returned: success
  type: dict
  sample: {ok: 16, invalid: 0, error: 0, not_run: 0}
problems:
  description: One line per operation that failed or answered outside its schema, with the schema errors.
  returned: success
  type: list
  elements: str
environment:
  description:
    - C(os_build), C(os_caption), C(ui_culture), C(powershell_version), C(powershell_edition), C(clr_version),
      C(dotnet_framework_release) and C(dotnet_framework_version), C(language_mode);
    - C(caller) - the account the agent runs as, as C(system.info) reports it - C(user), C(sid), C(system),
      C(administrator), C(groups), C(privileges) (name to enabled), C(agent_enabled);
    - C(privileges_enabled), C(privileges_disabled) - the token's privileges by state;
    - C(rdp_key) - the listener's RDP key file - C(path), C(provider_kind), C(exists), C(acl_readable),
      C(content_readable) (null when not known).
  returned: success
  type: dict
report:
  description:
    - The whole report, as written to O(dest) - C(v), C(host), C(generated_at), C(round_trips), C(status),
      C(counts), C(environment), and C(operations), one per read operation, with C(op), C(args), C(status),
      C(schema_errors), C(error) and C(data) (unless O(include_data=false)).
  returned: success
  type: dict
dest:
  description: Where the report was written.
  returned: when O(dest) is given and not in check mode
  type: str
round_trips:
  description: WinRM commands used (2).
  returned: always
  type: int
"""
