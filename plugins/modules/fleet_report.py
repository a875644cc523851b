# Copyright: rdpfix maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# The module is implemented by the action plugin of the same name (plugins/action/fleet_report.py); this file holds
# its documentation only.

from __future__ import annotations

DOCUMENTATION = r"""
---
module: fleet_report
short_description: Write the Remote Desktop fleet report (HTML, JSON, JUnit XML) on the controller
version_added: "0.1.0"
description:
  - "Collects, from C(hostvars), the result that a facts task registered on every host of the play, and writes one
    fleet report on the controller: a self-contained HTML page (sortable and filterable host table, status colours,
    each finding expandable with its evidence and fix, a chart of causes across the fleet), a JSON document for tooling
    and a JUnit XML file for CI systems and AWX."
  - "Run it once, on the controller, after the facts task - C(run_once: true) and C(delegate_to: localhost). It contacts
    no host."
  - "A host whose facts task failed or could not reach it appears in the report with the status C(failed) or
    C(unreachable) and Ansible's message, provided the facts task ran with C(ignore_unreachable: true) and
    C(ignore_errors: true) and registered its result. A host that has no registered result at all (it dropped out of
    the play before the facts task) is reported as C(failed)."
  - A host's status is C(critical) when any finding is critical, C(warning) when any finding is C(warning) or
    C(security), else C(ok).
  - The report files are replaced atomically, so a reader never sees half a report.
  - The HTML page loads nothing from the network. Its Content-Security-Policy allows only its own inline stylesheet and
    script (by hash), so hostile text from a host cannot run script or make the browser send a request.
author:
  - rdpfix maintainers (@rdpfix)
options:
  hosts:
    description:
      - Inventory names of the hosts to report on, in any order (the report sorts them).
      - Defaults to C(ansible_play_hosts_all), every host of the play including those that failed or were unreachable.
      - A name that is not in the inventory fails the task before anything is written.
    type: list
    elements: str
  findings_var:
    description:
      - Name of the host variable that holds the registered result of the facts task on each host.
      - The expected shape is a mapping with C(findings) (a list of findings as documented in docs/findings.md) and
        optionally C(gathered_at) (ISO 8601 time), C(address) and C(handshake) (the handshake probe's result, a
        mapping whose C(verdict) string is shown in the table).
      - Ansible's failure shapes are understood too - C(unreachable=true) or C(failed=true) with C(msg).
    type: str
    required: true
  handshake_var:
    description:
      - Name of a host variable holding the handshake probe's registered result, when the playbook registers it
        separately from the facts result. Overrides the facts result's C(handshake).
    type: str
  dest:
    description:
      - Directory the report files are written into; created when missing.
      - A relative path is taken from the playbook's directory, like the C(dest) of M(ansible.builtin.fetch).
    type: path
    required: true
  formats:
    description:
      - Which files to write - C(html) is C(report.html), C(json) is C(report.json), C(junit) is C(report.junit.xml).
    type: list
    elements: str
    choices: [html, json, junit]
    default: [html, json, junit]
  title:
    description: Title of the HTML page, of the JSON document and of the JUnit test suite.
    type: str
    default: Remote Desktop fleet report
  fail_on:
    description:
      - Gate for CI - after writing the report, fail the task when any host has a finding of this severity or a more
        urgent one (C(info) < C(security) < C(warning) < C(critical)), or when any host is C(unreachable) or
        C(failed), since a host that could not be read cannot be certified.
      - C(none) never fails the task.
      - The same threshold decides which findings are JUnit C(<failure>)s; critical findings are failures even with
        C(none).
    type: str
    choices: [none, critical, warning, security, info]
    default: none
extends_documentation_fragment:
  - rdpfix.rdp.attributes
attributes:
  check_mode:
    support: full
    details: >-
      Changes no host. In check mode nothing is written; the result names the files it would write (RV(paths)) and
      those that would change (RV(changed_paths)).
  diff_mode:
    support: none
  platform:
    platforms: posix
    details: Runs on the controller only.
notes:
  - Returns C(changed=true) when a report file is new or says something else than the file it replaces. Each file
    carries a digest of its content less its time stamps, so a rerun over an unchanged fleet reports C(changed=false)
    although the files get new time stamps.
  - The JSON document has a C(schema_version); fields are only added within a version.
  - The collection's docs/report.md describes the report and gating in CI and AWX.
"""

EXAMPLES = r"""
- name: Gather findings on every host; keep failures as results instead of dropping the host
  rdpfix.rdp.facts:
  register: rdp_facts
  ignore_unreachable: true
  ignore_errors: true

- name: Write the fleet report
  rdpfix.rdp.fleet_report:
    findings_var: rdp_facts
    dest: "{{ playbook_dir }}/reports"
  run_once: true
  delegate_to: localhost

- name: Gate a CI pipeline on critical findings (after the report is written)
  rdpfix.rdp.fleet_report:
    findings_var: rdp_facts
    dest: reports
    formats: [junit, json]
    fail_on: critical
  run_once: true
  delegate_to: localhost
"""

RETURN = r"""
written:
  description: Whether the files were written (false in check mode).
  returned: always
  type: bool
  sample: true
dest:
  description: Absolute path of the report directory.
  returned: always
  type: str
  sample: /home/admin/rdp/reports
changed_paths:
  description: The files that are new or say something else than before (in check mode, that would be).
  returned: always
  type: list
  elements: str
  sample: [/home/admin/rdp/reports/report.html]
paths:
  description: Path of each file, by format (in check mode, the files it would write).
  returned: always
  type: dict
  sample: {"html": "/home/admin/rdp/reports/report.html", "json": "/home/admin/rdp/reports/report.json"}
hosts:
  description: Number of hosts in the report.
  returned: always
  type: int
  sample: 40
counts:
  description: Hosts per status, findings per severity, and hosts affected per cause family.
  returned: always
  type: dict
  sample:
    status: {critical: 3, failed: 0, unreachable: 1, warning: 5, ok: 31}
    severity: {critical: 3, warning: 6, security: 1, info: 12}
    cause: {certificate: 4, firewall: 2, machinekeys: 1}
failing_hosts:
  description: Hosts that fail the O(fail_on) gate; empty when O(fail_on=none).
  returned: always
  type: list
  elements: str
  sample: [web01, sql03]
"""
