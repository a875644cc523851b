"""The fleet report's renderers: escaping of hostile host data, sort keys, JUnit structure, JSON schema, gating."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import typing as t
from html.parser import HTMLParser
from xml.etree import ElementTree as ET

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from report_fleet import finding, fleet

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _report as report_mod
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._report import (
    REPORT_JSON_SCHEMA,
    STATUS_RANK,
    FleetReport,
    HostResult,
    ReportInputError,
    gate,
    host_from_result,
    parse_finding,
    render_html,
    render_json,
    render_junit,
    status_for,
    summarise,
    to_plain,
    write_report,
)
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._report_assets import REPORT_CSS, REPORT_JS

HOSTILE_NAME = '<script>window.pwned=1</script>"><img src="http://127.0.0.1:9/x" onerror="pwned=2">'
HOSTILE_EVIDENCE = "</pre></td></tr></table><svg onload=alert(1)><a href='//evil.example/'>x</a>&amp;"
# Tags the renderer itself emits; anything else in the parsed page came from host data.
ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "h1", "p", "time", "section", "div", "span",
    "figure", "figcaption", "svg", "rect", "text", "g", "label", "input", "table", "thead", "tbody", "tr", "th",
    "td", "details", "summary", "code", "pre", "h4", "script",
}  # fmt: skip


class PageParser(HTMLParser):
    """Collects every start tag with its attributes, the text inside <script>/<style>, and all text data."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.raw: dict[str, list[str]] = {"script": [], "style": []}
        self.text: list[str] = []
        self._inside: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag in self.raw:
            self._inside = tag

    def handle_endtag(self, tag: str) -> None:
        if tag == self._inside:
            self._inside = None

    def handle_data(self, data: str) -> None:
        if self._inside:
            self.raw[self._inside].append(data)
        else:
            self.text.append(data)


def parse_page(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def hostile_report() -> FleetReport:
    bad_finding = finding(0)
    bad_finding["title"] = HOSTILE_NAME
    bad_finding["evidence"] = {HOSTILE_NAME: HOSTILE_EVIDENCE, "nested": {"x": [HOSTILE_EVIDENCE]}}
    bad_finding["fix"]["description"] = HOSTILE_EVIDENCE
    hosts = (
        host_from_result(HOSTILE_NAME, HOSTILE_EVIDENCE, {"findings": [bad_finding], "gathered_at": HOSTILE_NAME}),
        host_from_result("plain", "10.0.0.1", {"unreachable": True, "msg": HOSTILE_EVIDENCE}),
        host_from_result("probe", "10.0.0.2", {"findings": [], "handshake": {"verdict": HOSTILE_NAME}}),
    )
    return FleetReport(title=HOSTILE_NAME, generated_at="2026-11-25T10:42:00Z", hosts=hosts, fail_on="critical")


# --------------------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------------------


def test_hostile_host_data_stays_text() -> None:
    page = render_html(hostile_report())
    parsed = parse_page(page)
    tags = {tag for tag, _attributes in parsed.tags}
    assert tags <= ALLOWED_TAGS, tags - ALLOWED_TAGS
    for tag, attrs in parsed.tags:
        assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
        assert "src" not in attrs and "href" not in attrs, (tag, attrs)
    # Exactly the renderer's own script, once; the hostile <script> is text.
    assert [tag for tag, _attributes in parsed.tags].count("script") == 1
    assert "".join(parsed.raw["script"]) == REPORT_JS
    text = "".join(parsed.text)
    assert HOSTILE_NAME in text
    assert HOSTILE_EVIDENCE in text


def test_page_has_no_external_reference() -> None:
    page = render_html(fleet(30))
    assert "://" not in page
    assert not re.search(r"\b(src|href|action|srcset)\s*=", page)
    assert "@import" not in page and "url(" not in page


def test_csp_allows_exactly_the_inline_assets() -> None:
    page = render_html(fleet(3))
    parsed = parse_page(page)
    csp = next(attrs["content"] for tag, attrs in parsed.tags if tag == "meta" and attrs.get("http-equiv"))
    assert csp is not None
    directives = dict(part.strip().split(" ", 1) for part in csp.split(";"))
    assert directives["default-src"] == "'none'"
    for directive, source in (("script-src", REPORT_JS), ("style-src", REPORT_CSS)):
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert directives[directive] == f"'sha256-{digest}'"
    assert "".join(parsed.raw["style"]) == REPORT_CSS


def rows_of(page: str) -> list[list[dict[str, str | None]]]:
    """The <td> attributes of each body row (cells in column order)."""
    parsed = parse_page(page)
    rows: list[list[dict[str, str | None]]] = []
    in_body = False
    for tag, attrs in parsed.tags:
        if tag == "tbody":
            in_body = True
        elif in_body and tag == "tr" and "data-search" in attrs:
            rows.append([])
        elif in_body and tag == "td" and len(rows[-1]) < 9:
            rows[-1].append(attrs)
    return rows


def test_one_row_per_host_with_sort_keys() -> None:
    report = fleet(200)
    rows = rows_of(render_html(report))
    assert len(rows) == len(report.hosts)
    by_name = {host.name.lower(): host for host in report.hosts}
    for cells in rows:
        host = by_name[t.cast(str, cells[0]["data-v"])]
        assert cells[2]["data-v"] == str(STATUS_RANK[host.status])
        critical = sum(1 for item in host.findings if item.severity == "critical")
        warnings = sum(1 for item in host.findings if item.severity in ("warning", "security"))
        assert cells[3]["data-v"] == str(critical)
        assert cells[4]["data-v"] == str(warnings)
    # The page opens most urgent first.
    ranks = [int(t.cast(str, cells[2]["data-v"])) for cells in rows]
    assert ranks == sorted(ranks)


def test_address_sort_key_is_numeric_for_ipv4() -> None:
    hosts = tuple(
        host_from_result(name, address, {"findings": []})
        for name, address in (("a", "10.0.0.10"), ("b", "10.0.0.9"), ("c", "web.example"), ("d", "9.1.1.1"))
    )
    rows = rows_of(render_html(FleetReport("t", "now", hosts)))
    keys = {t.cast(str, cells[0]["data-v"]): t.cast(str, cells[1]["data-v"]) for cells in rows}
    assert sorted(keys, key=keys.__getitem__) == ["d", "b", "a", "c"]


def test_findings_are_expandable_with_evidence_and_fix() -> None:
    page = render_html(fleet(1, seed=3))
    report = fleet(1, seed=3)
    for item in report.hosts[0].findings:
        assert f'<code class="fid">{item.id}</code>' in page
        for key in item.evidence:
            assert f"<th>{key}</th>" in page
    assert page.count('<details class="finding') == len(report.hosts[0].findings)


def test_cause_chart_counts_hosts_per_cause() -> None:
    report = fleet(120)
    summary = summarise(report)
    page = render_html(report)
    for cause, total in summary.hosts_by_cause().items():
        cause_bar = re.search(rf'<g class="bar" data-cause="{cause}">(.*?)</g>', page)
        assert cause_bar is not None, cause
        assert cause_bar.group(1).endswith(f'class="total">{total}</text>')
    expected = sum(1 for host in report.hosts if any(item.cause == "certificate" for item in host.findings))
    assert summary.hosts_by_cause()["certificate"] == expected


# --------------------------------------------------------------------------------------------------------------------
# JUnit
# --------------------------------------------------------------------------------------------------------------------


def test_junit_structure() -> None:
    report = fleet(80)
    root = ET.fromstring(render_junit(report))
    assert root.tag == "testsuites"
    suites = root.findall("testsuite")
    assert len(suites) == 1
    suite = suites[0]
    cases = suite.findall("testcase")
    assert [case.get("name") for case in cases] == [host.name for host in report.hosts]
    for case, host in zip(cases, report.hosts, strict=True):
        critical = [item for item in host.findings if item.severity == "critical"]
        failure = case.find("failure")
        error = case.find("error")
        if host.status in ("unreachable", "failed"):
            assert error is not None and error.get("type") == host.status
            assert failure is None
        elif critical:
            assert failure is not None
            assert failure.get("message") == f"{len(critical)} finding(s): " + ", ".join(i.id for i in critical)
        else:
            assert failure is None and error is None
    assert suite.get("tests") == str(len(report.hosts))
    assert suite.get("failures") == str(sum(1 for case in cases if case.find("failure") is not None))
    assert suite.get("errors") == str(sum(1 for case in cases if case.find("error") is not None))
    properties = {prop.get("name"): prop.get("value") for prop in suite.iter("property")}
    summary = summarise(report)
    assert properties["hosts"] == str(summary.hosts)
    assert properties["status.critical"] == str(summary.by_status["critical"])
    assert properties["schema_version"] == "1"


def test_junit_threshold_follows_fail_on() -> None:
    warning_only = host_from_result("w", "w", {"findings": [finding(3)]})
    for fail_on, failures in (("none", 0), ("critical", 0), ("warning", 1), ("info", 1)):
        report = FleetReport("t", "now", (warning_only,), fail_on=fail_on)
        suite = ET.fromstring(render_junit(report)).find("testsuite")
        assert suite is not None and suite.get("failures") == str(failures), fail_on


def test_junit_survives_control_characters() -> None:
    name = "host\x00\x07\x1b[31mred\ufffe"
    report = FleetReport("t\x0c", "now", (host_from_result(name, "a", {"failed": True, "msg": "bad\x01"}),))
    root = ET.fromstring(render_junit(report))
    case = root.find("testsuite/testcase")
    assert case is not None and case.get("name") == "host\ufffd\ufffd\ufffd[31mred\ufffd"


@settings(max_examples=60, deadline=None)
@given(name=st.text(min_size=1, max_size=40), evidence=st.text(max_size=60))
def test_any_text_renders_well_formed(name: str, evidence: str) -> None:
    item = finding(0)
    item["evidence"] = {name: evidence}
    report = FleetReport(name, "now", (host_from_result(name, evidence, {"findings": [item]}),))
    ET.fromstring(render_junit(report))
    parsed = parse_page(render_html(report))
    assert {tag for tag, _attributes in parsed.tags} <= ALLOWED_TAGS
    assert json.loads(render_json(report))["hosts"][0]["name"] == name


# --------------------------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------------------------


def test_json_matches_schema_and_counts() -> None:
    report = fleet(150, fail_on="warning")
    document = json.loads(render_json(report))
    jsonschema.validate(document, REPORT_JSON_SCHEMA)
    assert document["schema_version"] == 1
    assert [host["name"] for host in document["hosts"]] == [host.name for host in report.hosts]
    statuses = [host["status"] for host in document["hosts"]]
    assert document["summary"]["by_status"] == {status: statuses.count(status) for status in report_mod.STATUSES}
    assert document["summary"]["failing_hosts"] == gate(report)


def test_schema_rejects_a_broken_document() -> None:
    document = json.loads(render_json(fleet(5)))
    document["hosts"][0]["status"] = "fine"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, REPORT_JSON_SCHEMA)


# --------------------------------------------------------------------------------------------------------------------
# Input, status, gate
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("severities", "status"),
    [
        ([], "ok"),
        (["info"], "ok"),
        (["info", "security"], "warning"),
        (["warning"], "warning"),
        (["warning", "critical", "info"], "critical"),
    ],
)
def test_status_from_findings(severities: list[str], status: str) -> None:
    findings = [parse_finding({**finding(0), "severity": sev}, "t") for sev in severities]
    assert status_for(findings) == status


@pytest.mark.parametrize(
    ("result", "status", "message"),
    [
        (None, "failed", "no result recorded"),
        ({"unreachable": True, "msg": "Failed to connect"}, "unreachable", "Failed to connect"),
        ({"failed": True, "msg": "AccessDenied"}, "failed", "AccessDenied"),
        ({"skipped": True}, "failed", "skipped"),
        ({"changed": False}, "failed", "no 'findings' list"),
        ({"findings": [{"id": "nodot", "severity": "critical"}]}, "failed", "not of the form"),
        ({"findings": [{**finding(0), "severity": "fatal"}]}, "failed", "severity 'fatal'"),
        ({"findings": [{**finding(0), "evidence": [1]}]}, "failed", "'evidence' must be a mapping"),
        ("text", "failed", "not a mapping"),
    ],
)
def test_host_results_from_ansible_shapes(result: t.Any, status: str, message: str) -> None:
    host = host_from_result("h", "10.0.0.1", result)
    assert host.status == status
    assert host.message is not None and message in host.message
    assert host.findings == ()


def test_findings_sorted_most_urgent_first_and_address_from_result() -> None:
    host = host_from_result("h", "h", {"findings": [finding(7), finding(3), finding(0)], "address": "10.1.1.1"})
    assert [item.severity for item in host.findings] == ["critical", "warning", "info"]
    assert host.address == "10.1.1.1"


def test_gate_levels() -> None:
    hosts = (
        host_from_result("crit", "a", {"findings": [finding(0)]}),
        host_from_result("warn", "a", {"findings": [finding(3)]}),
        host_from_result("sec", "a", {"findings": [finding(6)]}),
        host_from_result("info", "a", {"findings": [finding(7)]}),
        host_from_result("lost", "a", {"unreachable": True}),
        host_from_result("fine", "a", {"findings": []}),
    )
    expected = {
        "none": [],
        "critical": ["crit", "lost"],
        "warning": ["crit", "warn", "lost"],
        "security": ["crit", "warn", "sec", "lost"],
        "info": ["crit", "warn", "sec", "info", "lost"],
    }
    for fail_on, failing in expected.items():
        assert gate(FleetReport("t", "now", hosts, fail_on=fail_on)) == failing, fail_on


def test_to_plain_copies_subclasses_and_odd_values() -> None:
    class TaggedStr(str):
        pass

    plain = to_plain({TaggedStr("k"): (TaggedStr("v"), float("nan"), b"\xff", {1}, None, True, 2.5)})
    assert plain == {"k": ["v", "nan", "\ufffd", [1], None, True, 2.5]}
    plain_key = next(iter(t.cast(dict[str, t.Any], plain)))
    assert isinstance(plain_key, str) and not isinstance(plain_key, TaggedStr)
    deep: t.Any = []
    for _level in range(70):
        deep = [deep]
    with pytest.raises(ReportInputError):
        to_plain(deep)


# --------------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------------


def test_write_report_replaces_files_atomically(tmp_path: t.Any) -> None:
    dest = tmp_path / "reports" / "run1"
    old_umask = os.umask(0o022)
    try:
        paths = write_report(fleet(5), str(dest), ["html", "json", "junit"])
        paths_again = write_report(fleet(7), str(dest), ["json"])
    finally:
        os.umask(old_umask)
    assert sorted(os.listdir(dest)) == ["report.html", "report.json", "report.junit.xml"]
    assert paths_again == {"json": str(dest / "report.json")}
    assert json.loads((dest / "report.json").read_text())["summary"]["hosts"] == 7
    for path in paths.values():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_write_report_leaves_no_temporary_file_on_failure(tmp_path: t.Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_replace(source: str, target: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(fleet(2), str(tmp_path), ["json"])
    assert os.listdir(tmp_path) == []


def test_unreachable_host_is_listed_with_its_message() -> None:
    report = FleetReport("t", "now", (HostResult("lost", "10.9.9.9", "unreachable", message="ssh: timed out"),))
    page = render_html(report)
    assert "ssh: timed out" in page
    assert 'class="status st-unreachable">unreachable<' in page
