"""Run playbooks/fix_rdp.yml against a lab fleet and measure each phase: audit (check mode), apply, rerun.

    .venv/bin/python benchmarks/fleet.py [--hosts 50] [--forks 5,20] [--network 127.0.88] [--template FILE ...]

The fleet is N copies of a few lab host files (healthy and broken ones), renamed <stem>-<n>. Per phase it prints the
wall time of ansible-playbook, WinRM commands per host (min/avg/max, from the lab's counters), write operations, hosts
changed and hosts failed. With several --forks values the whole sequence runs once per value, the lab reloaded from
the host files in between. Measurements only: nothing here passes or fails on time.

A lab network holds 245 hosts (<network>.10 to .254); larger fleets are spread over consecutive networks, one lab
process each. Every lab started is stopped on exit, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import typing as t
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
HOSTS_DIR = ROOT / "tests" / "lab" / "hosts"
PLAYBOOK = ROOT / "playbooks" / "fix_rdp.yml"
# rdplab gives hosts <network>.10 upwards; .255 is not used.
FIRST_HOST_OCTET = 10
HOSTS_PER_NETWORK = 255 - FIRST_HOST_OCTET
# A mix of what a fleet looks like: mostly healthy, the usual causes of 0x904 / 0x7, and one host with active sessions
# (its certificate repair waits for permission to end them, so it stays pending in every phase).
DEFAULT_TEMPLATES = (
    "healthy",
    "healthy",
    "healthy-legacy",
    "expired-selfsigned",
    "missing-selfsigned",
    "pinned-missing",
    "machinekeys-folder-acl",
    "firewall-rules-disabled",
    "active-sessions",
)
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("audit (--check --diff)", ("--check", "--diff")),
    ("apply", ()),
    ("rerun", ()),
)
RECAP_LINE = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)"
)


class BenchmarkError(Exception):
    """A clear failure to report without a traceback."""


@dataclasses.dataclass
class Lab:
    network: str
    state_dir: Path
    inventory: Path


@dataclasses.dataclass
class PhaseResult:
    forks: int
    phase: str
    wall_seconds: float
    exit_code: int
    commands_per_host: list[int]
    writes: int
    hosts_written: int
    hosts_changed: int
    hosts_failed: int
    log: Path

    def as_dict(self) -> dict[str, t.Any]:
        commands = self.commands_per_host
        return {
            "forks": self.forks,
            "phase": self.phase,
            "wall_seconds": round(self.wall_seconds, 2),
            "exit_code": self.exit_code,
            "winrm_commands_per_host": {
                "min": min(commands),
                "avg": round(statistics.fmean(commands), 2),
                "max": max(commands),
            },
            "writes": self.writes,
            "hosts_written": self.hosts_written,
            "hosts_changed": self.hosts_changed,
            "hosts_failed": self.hosts_failed,
            "log": str(self.log),
        }


# --- the fleet ------------------------------------------------------------------------------------------------------


def template_path(name: str) -> Path:
    """A host file by path, or by name from the lab's host directory."""
    path = Path(name)
    if path.suffix in (".yml", ".yaml") and path.is_file():
        return path
    candidate = HOSTS_DIR / f"{name}.yml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in HOSTS_DIR.glob("*.yml")))
    raise BenchmarkError(f"no host file {name!r} (give a path or one of: {known})")


def write_fleet(count: int, templates: t.Sequence[Path], directory: Path) -> list[list[Path]]:
    """Copies of the templates, round robin, each renamed <stem>-<n>; grouped per lab network."""
    documents = {path: yaml.safe_load(path.read_text(encoding="utf-8")) for path in set(templates)}
    width = len(str(count))
    files: list[Path] = []
    for index in range(count):
        template = templates[index % len(templates)]
        document = dict(documents[template])
        document["name"] = f"{template.stem}-{index + 1:0{width}d}"
        # The file name keeps the fleet order (the lab loads a directory sorted, and addresses follow that order).
        path = directory / f"{index + 1:0{width}d}-{document['name']}.yml"
        path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        files.append(path)
    return [files[start : start + HOSTS_PER_NETWORK] for start in range(0, count, HOSTS_PER_NETWORK)]


def networks_from(first: str, count: int) -> list[str]:
    parts = first.split(".")
    if len(parts) != 3 or parts[0] != "127" or not all(p.isdigit() and 0 <= int(p) <= 255 for p in parts):
        raise BenchmarkError(f"--network must be the first three octets of a loopback address, not {first!r}")
    if int(parts[2]) + count - 1 > 255:
        raise BenchmarkError(f"{count} lab network(s) from {first} run past {parts[0]}.{parts[1]}.255")
    return [f"{parts[0]}.{parts[1]}.{int(parts[2]) + offset}" for offset in range(count)]


# --- the lab --------------------------------------------------------------------------------------------------------


def rdplab(*args: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "rdplab.cli", *args], capture_output=True, text=True, check=False, cwd=ROOT
    )
    if completed.returncode != 0:
        raise BenchmarkError(f"rdplab {args[0]} failed: {completed.stderr.strip() or completed.stdout.strip()}")
    return completed.stdout


def start_labs(groups: list[list[Path]], networks: list[str], work: Path, labs: list[Lab]) -> None:
    """Appends each lab to `labs` as soon as it runs, so the caller stops it whatever happens next."""
    for group, network in zip(groups, networks, strict=True):
        lab = Lab(network, work / f"lab-{network}", work / f"inventory-{network}.yml")
        group_dir = work / f"hosts-{network}"
        group_dir.mkdir()
        for path in group:
            path.rename(group_dir / path.name)
        started = time.perf_counter()
        rdplab(
            "up",
            "--network",
            network,
            "--state-dir",
            str(lab.state_dir),
            "--inventory",
            str(lab.inventory),
            str(group_dir),
        )
        labs.append(lab)
        print(f"lab {network}: {len(group)} hosts up in {time.perf_counter() - started:.1f} s", flush=True)


def stop_labs(labs: list[Lab]) -> None:
    for lab in labs:
        try:
            rdplab("down", "--state-dir", str(lab.state_dir))
        except BenchmarkError as exc:
            print(f"warning: {exc}", file=sys.stderr)


def counters(labs: list[Lab], reset: bool) -> dict[str, dict[str, int]]:
    """Each host's counters (winrm_shells, winrm_commands, writes, rdp_connections); reset zeroes them after reading."""
    found: dict[str, dict[str, int]] = {}
    for lab in labs:
        args = ["state", "--state-dir", str(lab.state_dir)] + (["--reset-counters"] if reset else [])
        for name, host in json.loads(rdplab(*args)).items():
            found[name] = {key: int(value) for key, value in host["counters"].items()}
    return found


# --- the phases -----------------------------------------------------------------------------------------------------


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP per host: ok, changed, unreachable, failed."""
    hosts: dict[str, dict[str, int]] = {}
    in_recap = False
    for line in output.splitlines():
        if line.startswith("PLAY RECAP"):
            in_recap = True
            continue
        match = RECAP_LINE.match(line) if in_recap else None
        if match:
            hosts[match["host"]] = {key: int(value) for key, value in match.groupdict().items() if key != "host"}
    return hosts


def run_phase(labs: list[Lab], forks: int, phase: str, extra: t.Sequence[str], log: Path) -> PhaseResult:
    counters(labs, reset=True)
    command = [str(Path(sys.executable).parent / "ansible-playbook"), str(PLAYBOOK), "--forks", str(forks)]
    for lab in labs:
        command += ["-i", str(lab.inventory)]
    command += list(extra)
    env = dict(os.environ)
    env.update(
        ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
        ANSIBLE_COLLECTIONS_PATH=str(ROOT / ".cache" / "collections"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
    )
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    wall = time.perf_counter() - started
    log.write_text(completed.stdout + completed.stderr, encoding="utf-8")

    per_host = counters(labs, reset=False)
    outcome = recap(completed.stdout)
    if not outcome:
        tail = "\n".join((completed.stdout + completed.stderr).splitlines()[-15:])
        raise BenchmarkError(f"ansible-playbook ended with {completed.returncode} and no PLAY RECAP:\n{tail}")
    return PhaseResult(
        forks=forks,
        phase=phase,
        wall_seconds=wall,
        exit_code=completed.returncode,
        commands_per_host=[host["winrm_commands"] for host in per_host.values()],
        writes=sum(host["writes"] for host in per_host.values()),
        hosts_written=sum(1 for host in per_host.values() if host["writes"]),
        hosts_changed=sum(1 for host in outcome.values() if host["changed"]),
        hosts_failed=sum(1 for host in outcome.values() if host["failed"] or host["unreachable"]),
        log=log,
    )


def print_table(results: t.Sequence[PhaseResult], hosts: int) -> None:
    print()
    print(f"{hosts} hosts")
    header = (
        f"{'forks':>5}  {'phase':<22} {'wall s':>7} {'s/host':>7}  {'WinRM cmds/host min/avg/max':>27}  "
        f"{'writes':>6} {'hosts written':>13} {'changed':>7} {'failed':>6}"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        commands = result.commands_per_host
        spread = f"{min(commands)}/{statistics.fmean(commands):.2f}/{max(commands)}"
        print(
            f"{result.forks:>5}  {result.phase:<22} {result.wall_seconds:>7.1f} {result.wall_seconds / hosts:>7.3f}  "
            f"{spread:>27}  {result.writes:>6} {result.hosts_written:>13} {result.hosts_changed:>7} "
            f"{result.hosts_failed:>6}"
        )


# --- main -----------------------------------------------------------------------------------------------------------


def parse_forks(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"--forks takes positive integers separated by commas, not {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=50, help="number of hosts in the fleet (default 50)")
    parser.add_argument(
        "--forks", type=parse_forks, default=[5], help="ansible-playbook --forks; several: 5,20 (default 5)"
    )
    parser.add_argument("--network", default="127.0.88", help="first lab network (default 127.0.88)")
    parser.add_argument(
        "--template",
        action="append",
        help="host file (path or name in tests/lab/hosts) to copy; repeat for a mix (default: a healthy/broken mix)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file as JSON")
    parser.add_argument(
        "--keep-logs", type=Path, help="directory for the ansible-playbook output of each phase (default: discarded)"
    )
    return parser


def main(argv: t.Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    if options.hosts < 1:
        print("fleet.py: --hosts must be at least 1", file=sys.stderr)
        return 2
    labs: list[Lab] = []
    results: list[PhaseResult] = []
    try:
        templates = [template_path(name) for name in (options.template or DEFAULT_TEMPLATES)]
        lab_count = -(-options.hosts // HOSTS_PER_NETWORK)
        networks = networks_from(options.network, lab_count)
        with tempfile.TemporaryDirectory(prefix="rdpfix-fleet-") as scratch:
            work = Path(scratch)
            log_dir = options.keep_logs or work
            log_dir.mkdir(parents=True, exist_ok=True)
            groups = write_fleet(options.hosts, templates, work)
            print(
                f"fleet: {options.hosts} hosts from {len(set(templates))} host file(s): "
                + ", ".join(sorted({p.stem for p in templates})),
                flush=True,
            )
            try:
                start_labs(groups, networks, work, labs)
                for round_index, forks in enumerate(options.forks):
                    if round_index:
                        for lab in labs:
                            rdplab("reset", "--state-dir", str(lab.state_dir))
                    for phase_index, (phase, extra) in enumerate(PHASES):
                        log = log_dir / f"forks{forks}-{phase_index + 1}-{phase.split()[0]}.log"
                        result = run_phase(labs, forks, phase, extra, log)
                        results.append(result)
                        print(
                            f"forks {forks:>3} {phase:<22} {result.wall_seconds:6.1f} s"
                            + (f"  (ansible-playbook exit {result.exit_code})" if result.exit_code else ""),
                            flush=True,
                        )
            finally:
                stop_labs(labs)
    except BenchmarkError as exc:
        print(f"fleet.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fleet.py: interrupted; the labs were stopped", file=sys.stderr)
        return 130
    print_table(results, options.hosts)
    if options.json:
        try:
            options.json.write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"fleet.py: cannot write {options.json}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
