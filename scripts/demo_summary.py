"""Per-host summary for the demo: what the lab's counters say and what a client sees from outside.

The outside view comes from rdpfix.rdp's own handshake probe (X.224, TLS) against each host's RDP port, so the
summary does not take the fixing modules' word for it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import typing as t
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".cache" / "collections"))

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import probe  # noqa: E402


def lab_state(state_dir: str) -> dict[str, t.Any]:
    rdplab = Path(sys.executable).parent / "rdplab"
    out = subprocess.run([str(rdplab), "state", "--state-dir", state_dir], capture_output=True, text=True, check=True)
    return t.cast(dict[str, t.Any], json.loads(out.stdout))


def outside_view(address: str, port: int | None) -> dict[str, t.Any]:
    if port is None:
        return {"verdict": "not listening", "certificate": None}
    report = probe(address, port, checks=["tcp", "negotiation", "tls"], tls_versions=["TLSv1.2"])
    cert = (report.get("tls") or {}).get("certificate") or {}
    return {
        "verdict": report["verdict"],
        "connectable": report["connectable"],
        "certificate": {"thumbprint": cert.get("thumbprint"), "days_left": cert.get("days_left")} if cert else None,
    }


def load_report(directory: str) -> dict[str, t.Any]:
    return t.cast(dict[str, t.Any], json.loads((Path(directory) / "report.json").read_text(encoding="utf-8")))


def print_report(directory: str, before_directory: str | None) -> None:
    """The fleet report's verdict per host (before -> after when given) and the causes it counted across the fleet."""
    report = load_report(directory)
    earlier = {host["name"]: host for host in load_report(before_directory)["hosts"]} if before_directory else {}
    summary = report["summary"]
    print(f"\nfleet report: {Path(directory) / 'report.html'} (also report.json, report.junit.xml)")
    statuses = ", ".join(f"{status} {count}" for status, count in summary["by_status"].items() if count)
    causes = "; ".join(
        f"{cause}: " + ", ".join(f"{count} {severity}" for severity, count in by_severity.items())
        for cause, by_severity in sorted(summary["by_cause"].items())
    )
    print(f"hosts by status: {statuses}")
    print(f"hosts per cause (by the most severe finding of that cause): {causes}")
    header = f"{'host':<22} {'status':<22} findings (id)"
    print(f"{header}\n{'-' * 100}")
    for host in report["hosts"]:
        status = host["status"]
        if host["name"] in earlier and earlier[host["name"]]["status"] != status:
            status = f"{earlier[host['name']]['status']} -> {status}"
        ids = ", ".join(finding["id"] for finding in host["findings"]) or "-"
        print(f"{host['name']:<22} {status:<22} {ids}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--inventory", required=True)
    parser.add_argument("--phase", required=True)
    parser.add_argument("--save", help="write the outside view per host to this JSON file")
    parser.add_argument("--before", help="a file written with --save, to show before -> after")
    parser.add_argument("--report", help="a fleet report directory (audit_rdp.yml) to summarise")
    parser.add_argument("--report-before", help="an earlier report directory, to show status before -> after")
    parser.add_argument("--expect-no-writes", action="store_true", help="exit 1 if any host was written to")
    args = parser.parse_args()

    state = lab_state(args.state_dir)
    with ThreadPoolExecutor(max_workers=8) as pool:
        outside_views = pool.map(lambda name: outside_view(state[name]["address"], state[name]["rdp_port"]), state)
        views = dict(zip(state, outside_views, strict=True))
    before: dict[str, t.Any] = json.loads(Path(args.before).read_text()) if args.before else {}

    header = (
        f"{'host':<22} {'groups':<16} {'RDP from outside':<34} {'listener cert (days left)':<28} "
        f"{'WinRM cmds':>10} {'writes':>7}"
    )
    print(f"\n[{args.phase}]\n{header}\n{'-' * len(header)}")
    for name, host in state.items():
        view = views[name]
        cert = view["certificate"]
        cert_text = f"{cert['thumbprint'][:12]}... ({cert['days_left']})" if cert else "-"
        verdict = view["verdict"]
        if name in before and before[name]["verdict"] != verdict:
            verdict = f"{before[name]['verdict']} -> {verdict}"
        groups = ",".join(g for g in host["snapshot"]["groups"] if g != "windows") or "-"
        counters = host["counters"]
        print(
            f"{name:<22} {groups:<16} {verdict:<34} {cert_text:<28} {counters['winrm_commands']:>10} "
            f"{counters['writes']:>7}"
        )
    if args.report:
        print_report(args.report, args.report_before)
    if args.save:
        Path(args.save).write_text(json.dumps(views, indent=2))
    if args.expect_no_writes:
        written = {name: host["counters"]["writes"] for name, host in state.items() if host["counters"]["writes"]}
        if written:
            print(f"UNEXPECTED WRITES: {written}", file=sys.stderr)
            return 1
        print("no host was written to")
    return 0


if __name__ == "__main__":
    sys.exit(main())
