"""rdpfix.rdp.fleet_report through the real ansible-playbook: hostvars of every host, an unreachable and a failed host
kept by ignore_unreachable/ignore_errors, gating, check mode, and bad options refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing as t
from pathlib import Path
from xml.etree import ElementTree as ET

import jsonschema
import pytest
import yaml
from report_fleet import finding

from ansible_collections.rdpfix.rdp.plugins.plugin_utils._report import REPORT_JSON_SCHEMA

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# A stand-in for the facts task: reads a host's findings from a file. `gone` is unreachable (nothing listens on
# port 1), `broken` fails (its file is missing); both keep their registered result thanks to the ignore_* keywords.
PLAYBOOK = """
- name: Audit
  hosts: all
  gather_facts: false
  tasks:
    - name: Gather findings
      ansible.builtin.command: cat {{ facts_file }}
      register: raw_facts
      changed_when: false
      check_mode: false  # reads only; the real facts module also reads in check mode
      ignore_unreachable: true
      ignore_errors: true

    - name: Keep the facts result (or Ansible's failure) under one name
      ansible.builtin.set_fact:
        rdp_facts: >-
          {{ raw_facts if (raw_facts.unreachable | default(false) or raw_facts.failed | default(false))
             else (raw_facts.stdout | from_json) }}

    - name: Write the fleet report
      rdpfix.rdp.fleet_report:
        findings_var: rdp_facts
        dest: "{{ report_dest }}"
        title: "{{ report_title | default('Lab audit') }}"
        fail_on: "{{ gate | default('none') }}"
        formats: "{{ report_formats | default(['html', 'json', 'junit']) }}"
        hosts: "{{ report_hosts | default(omit) }}"
      run_once: true
      delegate_to: localhost
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    facts = {
        "web01": {"findings": [finding(0), finding(6)], "gathered_at": "2026-11-25T10:00:00Z"},
        "web02": {"findings": [finding(3)], "gathered_at": "2026-11-25T10:00:01Z"},
        "sql01": {"findings": [], "gathered_at": "2026-11-25T10:00:02Z"},
    }
    hosts: dict[str, t.Any] = {}
    for name, result in facts.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(result))
        hosts[name] = {"ansible_connection": "local", "facts_file": str(path)}
    hosts["web01"]["ansible_host"] = "10.0.0.5"
    hosts["broken"] = {"ansible_connection": "local", "facts_file": str(tmp_path / "missing.json")}
    hosts["gone"] = {
        "ansible_connection": "ssh",
        "ansible_host": "127.0.0.1",
        "ansible_port": 1,
        "ansible_ssh_common_args": "-o ConnectTimeout=5 -o BatchMode=yes",
        "facts_file": "none",
    }
    inventory = {"all": {"hosts": hosts, "vars": {"ansible_python_interpreter": sys.executable}}}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    (tmp_path / "audit.yml").write_text(PLAYBOOK)
    return tmp_path


def run_playbook(project: Path, *args: str, **extra_vars: t.Any) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_COLLECTIONS_PATH=str(ROOT / ".cache" / "collections"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_HOST_KEY_CHECKING="False",
        ANSIBLE_LOCAL_TEMP=str(project / ".ansible-tmp"),
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    command = [str(BIN / "ansible-playbook"), "-i", str(project / "inventory.yml"), str(project / "audit.yml")]
    command += ["-e", json.dumps({"report_dest": "reports", **extra_vars}), *args]
    return subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=300, check=False)


def report_task(run: subprocess.CompletedProcess[str]) -> dict[str, t.Any]:
    """The fleet_report task's result, from the json callback's output (run_once: one host carries it)."""
    output = json.loads(run.stdout)
    task = next(task for task in output["plays"][0]["tasks"] if task["task"]["name"] == "Write the fleet report")
    return t.cast(dict[str, t.Any], next(iter(task["hosts"].values())))


def test_report_from_hostvars(project: Path) -> None:
    run = run_playbook(project)
    assert run.returncode == 0, run.stdout + run.stderr
    # Relative dest: next to the playbook.
    reports = project / "reports"
    document = json.loads((reports / "report.json").read_text())
    jsonschema.validate(document, REPORT_JSON_SCHEMA)
    statuses = {host["name"]: host["status"] for host in document["hosts"]}
    assert statuses == {
        "web01": "critical",
        "web02": "warning",
        "sql01": "ok",
        "broken": "failed",
        "gone": "unreachable",
    }
    by_name = {host["name"]: host for host in document["hosts"]}
    assert by_name["web01"]["address"] == "10.0.0.5"
    assert by_name["web01"]["findings"][0]["evidence"] == finding(0)["evidence"]
    assert "missing.json" in by_name["broken"]["message"]
    assert by_name["gone"]["message"]
    suite = ET.parse(reports / "report.junit.xml").getroot().find("testsuite")
    assert suite is not None and (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("5", "1", "2")
    assert "web01" in (reports / "report.html").read_text()
    # The module's own result, as the playbook sees it.
    result = report_task(run)
    assert result["changed"] is True and result["written"] is True
    assert sorted(result["changed_paths"]) == sorted(result["paths"].values())
    assert result["paths"]["json"] == str(reports / "report.json")
    assert result["hosts"] == 5
    assert result["counts"]["status"] == {"critical": 1, "failed": 1, "unreachable": 1, "warning": 1, "ok": 1}
    assert result["counts"]["cause"] == {"certificate": 2, "security_downgrade": 1}
    assert result["failing_hosts"] == []


def test_gate_fails_after_writing(project: Path) -> None:
    run = run_playbook(project, gate="warning")
    assert run.returncode != 0
    result = report_task(run)
    assert result["failed"] is True
    assert result["msg"].startswith("4 of 5 host(s) fail the gate fail_on=warning"), result["msg"]
    document = json.loads((project / "reports" / "report.json").read_text())
    assert sorted(document["summary"]["failing_hosts"]) == ["broken", "gone", "web01", "web02"]


def test_check_mode_writes_nothing_and_says_what_it_would_write(project: Path) -> None:
    run = run_playbook(project, "--check")
    assert run.returncode == 0, run.stdout
    result = report_task(run)
    assert not (project / "reports").exists()
    assert result["written"] is False and result["changed"] is True
    assert result["paths"]["html"] == str(project / "reports" / "report.html")
    assert sorted(result["changed_paths"]) == sorted(result["paths"].values())
    assert result["msg"].startswith("check mode: would write the fleet report of 5 host(s)"), result["msg"]


def test_changed_only_when_a_file_says_something_else(project: Path) -> None:
    assert report_task(run_playbook(project))["changed"] is True
    html = project / "reports" / "report.html"
    first = html.read_text()
    # The same findings again: the files get a new time stamp, and nothing changed.
    again = report_task(run_playbook(project))
    assert again["changed"] is False and again["changed_paths"] == [] and again["written"] is True
    assert report_task(run_playbook(project, "--check"))["changed"] is False
    # A file that said something else (here: another digest, as an older report has) is a change, for that file only.
    digest = json.loads((project / "reports" / "report.json").read_text())["content_digest"]
    assert digest in first
    html.write_text(first.replace(digest, "0" * 64))
    edited = report_task(run_playbook(project))
    assert edited["changed"] is True and edited["changed_paths"] == [str(html)]
    # Another title says something else in every file.
    retitled = report_task(run_playbook(project, "--check", report_title="Other title"))
    assert retitled["changed"] is True and len(retitled["changed_paths"]) == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"report_formats": ["pdf"]}, "value of formats must be one or more of"),
        ({"report_hosts": ["web01", "nosuchhost"]}, "not in the inventory: nosuchhost"),
        ({"gate": "severe"}, "value of fail_on must be one of"),
    ],
)
def test_bad_options_write_nothing(project: Path, extra: dict[str, t.Any], message: str) -> None:
    run = run_playbook(project, **extra)
    assert run.returncode != 0
    assert message in report_task(run)["msg"], run.stdout
    assert "Traceback" not in run.stdout + run.stderr
    assert not (project / "reports").exists()
