# Copyright: rdpfix maintainers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fleet report's inline stylesheet and script.

They live in Python strings rather than template files so the collection needs no package data lookups, and so the
renderer can put their SHA-256 hashes into the page's Content-Security-Policy: the browser then runs this script and
nothing else, even if a hostile host name ever got past the escaping.

The script does nothing per row on load; it only acts on a click (sort) or on typing in the filter box, so a report of
thousands of hosts opens as fast as the browser can lay out the static table.
"""

from __future__ import annotations

REPORT_CSS = """
:root { color-scheme: light; --critical: #c62828; --failed: #6d1b1b; --unreachable: #455a64; --warning: #ef8f00;
  --ok: #2e7d32; --security: #6a1b9a; --info: #546e7a; --line: #d5d9de; }
* { box-sizing: border-box; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 24px 24px; color: #1d2329; }
header h1 { font-size: 22px; margin: 18px 0 2px; }
.meta { color: #5b6670; margin: 0 0 8px; }
.gate { display: inline-block; padding: 4px 10px; border-radius: 4px; margin: 0 0 8px; }
.gate.fail { background: #fdecea; color: var(--critical); }
.gate.pass { background: #e8f5e9; color: var(--ok); }
.summary { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; margin-bottom: 16px; }
.tiles { display: flex; gap: 8px; }
.tile { min-width: 92px; padding: 8px 12px; border-radius: 6px; color: #fff; display: flex; flex-direction: column; }
.tile .count { font-size: 26px; font-weight: 600; }
.tile.st-critical { background: var(--critical); } .tile.st-failed { background: var(--failed); }
.tile.st-unreachable { background: var(--unreachable); } .tile.st-warning { background: var(--warning); }
.tile.st-ok { background: var(--ok); }
figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: 4px; }
.chart text { font-size: 12px; fill: #1d2329; } .chart .total { font-weight: 600; }
.filter input { width: 320px; padding: 4px 6px; margin: 0 8px 8px; }
#shown { color: #5b6670; }
table#hosts { border-collapse: collapse; width: 100%; }
#hosts th, #hosts td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
#hosts thead th { position: sticky; top: 0; background: #f3f5f7; white-space: nowrap; }
#hosts th[data-col] { cursor: pointer; user-select: none; }
#hosts th[aria-sort="ascending"]::after { content: " \\25B2"; }
#hosts th[aria-sort="descending"]::after { content: " \\25BC"; }
#hosts td.num { text-align: right; }
#hosts td.host { font-weight: 600; overflow-wrap: anywhere; min-width: 9em; }
#hosts td.when { font-size: 12px; }
#hosts tr.st-critical td:first-child { border-left: 4px solid var(--critical); }
#hosts tr.st-failed td:first-child { border-left: 4px solid var(--failed); }
#hosts tr.st-unreachable td:first-child { border-left: 4px solid var(--unreachable); }
#hosts tr.st-warning td:first-child { border-left: 4px solid var(--warning); }
#hosts tr.st-ok td:first-child { border-left: 4px solid var(--ok); }
.status, .badge { display: inline-block; padding: 0 6px; border-radius: 3px; color: #fff; font-size: 12px; }
.status.st-critical { background: var(--critical); } .status.st-failed { background: var(--failed); }
.status.st-unreachable { background: var(--unreachable); } .status.st-warning { background: var(--warning); }
.status.st-ok { background: var(--ok); }
.badge.sev-critical { background: var(--critical); } .badge.sev-warning { background: var(--warning); }
.badge.sev-security { background: var(--security); } .badge.sev-info { background: var(--info); }
details.probe > summary { cursor: pointer; font-weight: 600; }
details.probe.v-ok > summary { color: var(--ok); } details.probe.v-warning > summary { color: var(--warning); }
details.probe.v-critical > summary { color: var(--critical); } details.probe.v-unknown > summary { color: #5b6670; }
details.probe p { margin: 2px 0; max-width: 28em; }
td.findings { min-width: 340px; width: 45%; overflow-wrap: anywhere; }
#hosts td { overflow-wrap: break-word; }
.status, .badge { white-space: nowrap; }
details.finding { margin: 2px 0; }
details.finding > summary { cursor: pointer; }
details .body { margin: 4px 0 8px 16px; padding-left: 8px; border-left: 2px solid var(--line); }
details h4 { margin: 6px 0 2px; font-size: 12px; text-transform: uppercase; color: #5b6670; }
table.evidence th { font-weight: 500; color: #5b6670; padding: 1px 8px 1px 0; border: 0; }
table.evidence td { padding: 1px 0; border: 0; }
code.fid { color: #5b6670; font-size: 11px; }
pre { margin: 2px 0; white-space: pre-wrap; word-break: break-all; font-size: 12px; }
.message { color: var(--failed); margin: 0; }
.empty { color: #5b6670; margin: 0; }
tr[hidden] { display: none; }
"""

REPORT_JS = """
(function () {
  "use strict";
  var table = document.getElementById("hosts");
  var body = table.tBodies[0];
  var headers = table.tHead.rows[0].cells;
  var sorted = { col: -1, dir: 1 };

  function sortBy(th) {
    var col = Number(th.getAttribute("data-col"));
    var numeric = th.getAttribute("data-type") === "num";
    var dir = sorted.col === col ? -sorted.dir : 1;
    sorted = { col: col, dir: dir };
    var keyed = Array.prototype.map.call(body.rows, function (row, index) {
      var value = row.cells[col].getAttribute("data-v") || "";
      return { row: row, key: numeric ? Number(value) : value, index: index };
    });
    keyed.sort(function (a, b) {
      if (a.key < b.key) { return -dir; }
      if (a.key > b.key) { return dir; }
      return a.index - b.index;
    });
    var fragment = document.createDocumentFragment();
    keyed.forEach(function (item) { fragment.appendChild(item.row); });
    body.appendChild(fragment);
    for (var i = 0; i < headers.length; i++) {
      if (headers[i].hasAttribute("data-col")) { headers[i].setAttribute("aria-sort", "none"); }
    }
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
  }

  table.tHead.addEventListener("click", function (event) {
    var th = event.target.closest("th[data-col]");
    if (th) { sortBy(th); }
  });
  table.tHead.addEventListener("keydown", function (event) {
    var th = event.target.closest("th[data-col]");
    if (th && (event.key === "Enter" || event.key === " ")) { event.preventDefault(); sortBy(th); }
  });

  var filter = document.getElementById("filter");
  var shown = document.getElementById("shown");
  var pending = 0;
  function applyFilter() {
    pending = 0;
    var needle = filter.value.trim().toLowerCase();
    var count = 0;
    for (var i = 0; i < body.rows.length; i++) {
      var row = body.rows[i];
      var match = needle === "" || row.getAttribute("data-search").indexOf(needle) !== -1;
      row.hidden = !match;
      if (match) { count++; }
    }
    shown.textContent = count + " of " + body.rows.length + " shown";
  }
  filter.addEventListener("input", function () {
    if (!pending) { pending = window.requestAnimationFrame(applyFilter); }
  });
})();
"""
