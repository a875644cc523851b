"""Render the fleet report for a synthetic fleet and print render time and file size per format.

    .venv/bin/python benchmarks/report_1000_hosts.py [--hosts 1000] [--repeat 5]

Not part of pass/fail: timings depend on the machine. The browser's load time is printed by
tests/system/test_report_browser.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / ".cache" / "collections"), str(ROOT / "tests")]

from report_fleet import fleet  # noqa: E402

from ansible_collections.rdpfix.rdp.plugins.plugin_utils._report import FORMATS, render  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=1000, help="hosts in the synthetic fleet (default 1000)")
    parser.add_argument("--repeat", type=int, default=5, help="renders per format; median and min (default 5)")
    options = parser.parse_args()
    if options.hosts < 1 or options.repeat < 1:
        parser.error("--hosts and --repeat must be at least 1")
    started = time.perf_counter()
    report = fleet(options.hosts)
    print(
        f"{options.hosts} hosts, {sum(len(h.findings) for h in report.hosts)} findings "
        f"(built in {(time.perf_counter() - started) * 1000:.0f} ms)"
    )
    for fmt in FORMATS:
        timings = []
        for _repetition in range(options.repeat):
            started = time.perf_counter()
            text = render(report, fmt)
            timings.append(time.perf_counter() - started)
        size = len(text.encode("utf-8"))
        print(
            f"{fmt:6} median {statistics.median(timings) * 1000:7.1f} ms  "
            f"min {min(timings) * 1000:7.1f} ms  {size / 1024:8.0f} KiB"
        )


if __name__ == "__main__":
    main()
