"""Run playbooks/fix_rdp.yml against a lab fleet and measure each phase: audit (check mode), apply, rerun.

    .venv/bin/python benchmarks/fleet.py [--hosts 50] [--forks 5,20] [--network 127.0.88] [--template FILE ...]
                                         [--baseline GIT_REF]

The fleet is N copies of a few lab host files (healthy and broken ones), renamed <stem>-<n>. Per phase it prints the
wall time of ansible-playbook, WinRM commands per host (min/avg/max, from the lab's counters), write operations, hosts
changed and hosts failed. With several --forks values the whole sequence runs once per value, the lab reloaded from
the host files in between. Measurements only: nothing here passes or fails on time.

--baseline GIT_REF (a tag or commit of an earlier release, such as the 0.1.0 release commit) first runs the same
fleet and phases with the collection as it was at GIT_REF - its role, modules, lab and host files, extracted with
`git archive` into a scratch collections path - and then with this checkout, so that both are measured side by side
on the same machine in one run; a last table compares them (controller CPU per host and phase, WinRM commands and
task runs per host).

A lab network holds 245 hosts (<network>.10 to .254); larger fleets are spread over consecutive networks, one lab
process each. Every lab started is stopped on exit, also after an error, Ctrl-C, SIGTERM or SIGHUP: such a signal stops
ansible-playbook and its workers, lets a lab that is starting finish starting, stops every lab and removes the scratch
directory (a second Ctrl-C meanwhile is held, not acted on). The exit code is then 130.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import resource
import shutil
import signal
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
# (an expired certificate renewed through SessionEnv, the role's default restart_service, which keeps the sessions).
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
# Signals that end a run: each becomes a KeyboardInterrupt, so the run unwinds through the code that stops the labs.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# How long ansible-playbook gets to end after SIGTERM before its process group is killed.
ANSIBLE_STOP_SECONDS = 10.0
RECAP_LINE = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)\s+skipped=(?P<skipped>\d+)\s+rescued=(?P<rescued>\d+)\s+ignored=(?P<ignored>\d+)"
)


@dataclasses.dataclass(frozen=True)
class Variant:
    """What runs: this checkout, or an earlier release extracted from git (its collection, lab and host files)."""

    name: str
    root: Path
    collections: Path

    @property
    def hosts_dir(self) -> Path:
        return self.root / "tests" / "lab" / "hosts"

    @property
    def playbook(self) -> Path:
        return self.root / "playbooks" / "fix_rdp.yml"

    def env(self) -> dict[str, str]:
        """The environment of its rdplab and ansible-playbook: its own lab package and collection."""
        env = dict(os.environ)
        env.update(
            ANSIBLE_CONFIG=str(self.root / "ansible.cfg"),
            ANSIBLE_COLLECTIONS_PATH=str(self.collections),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_FORCE_COLOR="0",
            PYTHONPATH=os.pathsep.join([str(self.root / "tests" / "lab"), env.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
        )
        return env


CURRENT = Variant("current", ROOT, ROOT / ".cache" / "collections")


def extract_baseline(ref: str, work: Path) -> Variant:
    """The collection at ``ref`` as an installed collection in a scratch collections path."""
    collections = work / "baseline-collections"
    root = collections / "ansible_collections" / "rdpfix" / "rdp"
    root.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref], capture_output=True, check=False)
    if archive.returncode != 0:
        raise BenchmarkError(f"--baseline {ref}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    # An older lab waited a fixed 30 s for its listeners; a large fleet on a busy machine needs longer (the current
    # lab allows 0.5 s more per host). The same allowance for both: only the start-up wait changes, not the lab.
    cli = root / "tests" / "lab" / "rdplab" / "cli.py"
    if cli.is_file():
        text = cli.read_text(encoding="utf-8")
        cli.write_text(text.replace("START_TIMEOUT = 30.0\n", "START_TIMEOUT = 30.0 + 0.5 * 245\n"), encoding="utf-8")
    return Variant(f"baseline {ref}", root, collections)


class BenchmarkError(Exception):
    """A clear failure to report without a traceback."""


class Interrupts:
    """Turns STOP_SIGNALS into KeyboardInterrupt, except inside `held()`, which keeps one until its block ends.

    Starting or stopping a lab is never cut in half: a lab process whose `rdplab up` was killed before it recorded
    the lab would keep running with nothing left to stop it.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False

    def handler(self, signum: int, _frame: object) -> None:
        if self.depth:
            self.pending = True
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextlib.contextmanager
    def held(self) -> t.Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending:
                self.pending = False
                raise KeyboardInterrupt


INTERRUPTS = Interrupts()


@dataclasses.dataclass
class Lab:
    network: str
    state_dir: Path
    inventory: Path
    variant: Variant = CURRENT

    def cpu_seconds(self) -> float:
        """CPU time the lab process has used (user + system): the simulated hosts' share of the machine."""
        try:
            pid = json.loads((self.state_dir / "state.json").read_text(encoding="utf-8"))["pid"]
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, KeyError, IndexError):
            return float("nan")
        # utime and stime are fields 14 and 15 of /proc/<pid>/stat; after the command name, index 0 is field 3.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class PhaseResult:
    variant: str
    forks: int
    phase: str
    wall_seconds: float
    lab_cpu_seconds: float
    ansible_cpu_seconds: float
    exit_code: int
    commands_per_host: list[int]
    # Host file (the <stem> of <stem>-<n>) -> the WinRM commands of each of its copies.
    commands_by_template: dict[str, list[int]]
    writes: int
    hosts_written: int
    hosts_changed: int
    hosts_failed: int
    log: Path | None
    # Task runs per host (PLAY RECAP ok + failed + skipped + ignored): what the controller pays per host.
    tasks_per_host: list[int] = dataclasses.field(default_factory=list)
    # The machine's 1-minute load average when the phase started and when it ended (others' work shares the cores).
    load_average: tuple[float, float] = (0.0, 0.0)

    def as_dict(self) -> dict[str, t.Any]:
        commands = self.commands_per_host
        hosts = len(commands)
        return {
            "variant": self.variant,
            "forks": self.forks,
            "phase": self.phase,
            "wall_seconds": round(self.wall_seconds, 2),
            # NaN (the lab's /proc entry was unreadable) is not JSON: null instead.
            "lab_cpu_seconds": None if math.isnan(self.lab_cpu_seconds) else round(self.lab_cpu_seconds, 2),
            "ansible_cpu_seconds": round(self.ansible_cpu_seconds, 2),
            "ansible_cpu_ms_per_host": round(1000 * self.ansible_cpu_seconds / hosts, 1),
            "tasks_per_host": {
                "min": min(self.tasks_per_host, default=0),
                "avg": round(statistics.fmean(self.tasks_per_host), 2) if self.tasks_per_host else 0,
                "max": max(self.tasks_per_host, default=0),
            },
            "exit_code": self.exit_code,
            "load_average_start_end": [round(value, 2) for value in self.load_average],
            "winrm_commands_per_host": {
                "min": min(commands),
                "avg": round(statistics.fmean(commands), 2),
                "max": max(commands),
            },
            "winrm_commands_by_host_file": {
                template: sorted(set(values)) for template, values in sorted(self.commands_by_template.items())
            },
            "writes": self.writes,
            "hosts_written": self.hosts_written,
            "hosts_changed": self.hosts_changed,
            "hosts_failed": self.hosts_failed,
            "log": None if self.log is None else str(self.log),
        }


# --- the fleet ------------------------------------------------------------------------------------------------------


def template_path(name: str, hosts_dir: Path = HOSTS_DIR) -> Path:
    """A host file by path, or by name from the lab's host directory."""
    path = Path(name)
    if path.suffix in (".yml", ".yaml") and path.is_file():
        return path
    candidate = hosts_dir / f"{name}.yml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in hosts_dir.glob("*.yml")))
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


def rdplab(*args: str, variant: Variant = CURRENT) -> str:
    """Run one rdplab command to its end. In its own session, so a Ctrl-C at the terminal does not reach it, and with
    signals held, so `up` always gets to record the lab it started (and `down` to stop it)."""
    with INTERRUPTS.held():
        completed = subprocess.run(
            [sys.executable, "-m", "rdplab.cli", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            cwd=variant.root,
            env=variant.env(),
            start_new_session=True,
        )
    if completed.returncode != 0:
        raise BenchmarkError(f"rdplab {args[0]} failed: {completed.stderr.strip() or completed.stdout.strip()}")
    return completed.stdout


def start_labs(
    groups: list[list[Path]], networks: list[str], work: Path, labs: list[Lab], variant: Variant = CURRENT
) -> None:
    """Appends each lab to `labs` as soon as it runs, so the caller stops it whatever happens next."""
    for group, network in zip(groups, networks, strict=True):
        lab = Lab(network, work / f"lab-{network}", work / f"inventory-{network}.yml", variant)
        group_dir = work / f"hosts-{network}"
        group_dir.mkdir()
        for path in group:
            path.rename(group_dir / path.name)
        # Known before it starts: stop_labs() then stops it whatever happens (`down` without a lab does nothing).
        labs.append(lab)
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
            variant=variant,
        )
        print(f"lab {network}: {len(group)} hosts up in {time.perf_counter() - started:.1f} s", flush=True)


def stop_labs(labs: list[Lab]) -> None:
    """Stop every lab, also when one of them cannot be stopped (that one is named)."""
    for lab in labs:
        try:
            rdplab("down", "--state-dir", str(lab.state_dir), variant=lab.variant)
        except BenchmarkError as exc:
            print(f"fleet.py: warning: lab {lab.network} may still be running: {exc}", file=sys.stderr)


def counters(labs: list[Lab], reset: bool) -> dict[str, dict[str, int]]:
    """Each host's counters (winrm_shells, winrm_commands, writes, rdp_connections); reset zeroes them after reading."""
    found: dict[str, dict[str, int]] = {}
    for lab in labs:
        args = ["state", "--state-dir", str(lab.state_dir)] + (["--reset-counters"] if reset else [])
        for name, host in json.loads(rdplab(*args, variant=lab.variant)).items():
            found[name] = {key: int(value) for key, value in host["counters"].items()}
    return found


# --- the phases -----------------------------------------------------------------------------------------------------


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP per host: ok, changed, unreachable, failed, skipped, rescued, ignored."""
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


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stop_process_group(process: subprocess.Popen[str]) -> None:
    """End a process started with start_new_session and everything it forked: SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, ANSIBLE_STOP_SECONDS), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.communicate(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_ansible(command: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """ansible-playbook in its own session: when the benchmark is interrupted, its workers are stopped with it."""
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate()
    except BaseException:
        with INTERRUPTS.held():
            stop_process_group(process)
        raise
    return process.returncode, stdout, stderr


def run_phase(
    labs: list[Lab],
    forks: int,
    phase: str,
    extra: t.Sequence[str],
    log: Path,
    *,
    keep_log: bool,
    variant: Variant = CURRENT,
) -> PhaseResult:
    counters(labs, reset=True)
    command = [str(Path(sys.executable).parent / "ansible-playbook"), str(variant.playbook), "--forks", str(forks)]
    for lab in labs:
        command += ["-i", str(lab.inventory)]
    command += list(extra)
    env = variant.env()
    lab_cpu_before = sum(lab.cpu_seconds() for lab in labs)
    ansible_cpu_before = _children_cpu_seconds()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    returncode, stdout, stderr = run_ansible(command, env)
    wall = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    # ansible-playbook and its workers (waited for by it, so counted in its children's usage when it ends).
    ansible_cpu = _children_cpu_seconds() - ansible_cpu_before
    lab_cpu = sum(lab.cpu_seconds() for lab in labs) - lab_cpu_before
    log.write_text(stdout + stderr, encoding="utf-8")

    per_host = counters(labs, reset=False)
    outcome = recap(stdout)
    if not outcome:
        tail = "\n".join((stdout + stderr).splitlines()[-15:])
        raise BenchmarkError(f"ansible-playbook ended with {returncode} and no PLAY RECAP:\n{tail}")
    return PhaseResult(
        variant=variant.name,
        forks=forks,
        phase=phase,
        wall_seconds=wall,
        lab_cpu_seconds=lab_cpu,
        ansible_cpu_seconds=ansible_cpu,
        exit_code=returncode,
        commands_per_host=[host["winrm_commands"] for host in per_host.values()],
        commands_by_template=by_template(per_host),
        writes=sum(host["writes"] for host in per_host.values()),
        hosts_written=sum(1 for host in per_host.values() if host["writes"]),
        hosts_changed=sum(1 for host in outcome.values() if host["changed"]),
        hosts_failed=sum(1 for host in outcome.values() if host["failed"] or host["unreachable"]),
        log=log if keep_log else None,
        tasks_per_host=[
            host["ok"] + host["failed"] + host["skipped"] + host["ignored"] + host["unreachable"]
            for host in outcome.values()
        ],
        load_average=(load_before, load_after),
    )


def by_template(per_host: dict[str, dict[str, int]]) -> dict[str, list[int]]:
    grouped: dict[str, list[int]] = {}
    for name, host in per_host.items():
        grouped.setdefault(name.rsplit("-", 1)[0], []).append(host["winrm_commands"])
    return grouped


def print_table(results: t.Sequence[PhaseResult], hosts: int) -> None:
    for variant in dict.fromkeys(result.variant for result in results):
        rows = [result for result in results if result.variant == variant]
        print()
        print(
            f"{variant}, {hosts} hosts. CPU s: ansible-playbook with its workers / the lab process. "
            "WinRM commands and task runs per host."
        )
        header = (
            f"{'forks':>5}  {'phase':<22} {'wall s':>6} {'s/host':>6} {'CPU s ansible/lab':>17} {'CPU ms/host':>11}  "
            f"{'cmds min/avg/max':>16} {'tasks/host':>10}  {'writes':>6} {'hosts written':>13} {'changed':>7} "
            f"{'failed':>6}"
        )
        print(header)
        print("-" * len(header))
        for result in rows:
            commands = result.commands_per_host
            spread = f"{min(commands)}/{statistics.fmean(commands):.2f}/{max(commands)}"
            cpu = f"{result.ansible_cpu_seconds:.1f}/{result.lab_cpu_seconds:.1f}"
            per_host = 1000 * result.ansible_cpu_seconds / hosts
            tasks = statistics.fmean(result.tasks_per_host) if result.tasks_per_host else 0.0
            print(
                f"{result.forks:>5}  {result.phase:<22} {result.wall_seconds:>6.1f} "
                f"{result.wall_seconds / hosts:>6.2f} {cpu:>17} {per_host:>11.0f}  {spread:>16} {tasks:>10.2f}  "
                f"{result.writes:>6} {result.hosts_written:>13} {result.hosts_changed:>7} {result.hosts_failed:>6}"
            )
        print_commands_by_template(rows)
    print_comparison(results)


def print_comparison(results: t.Sequence[PhaseResult]) -> None:
    """Baseline against current, per --forks and phase: controller CPU per host and its ratio, commands, tasks."""
    variants = list(dict.fromkeys(result.variant for result in results))
    if len(variants) < 2:
        return
    baseline, current = variants[0], variants[-1]
    found = {(r.variant, r.forks, r.phase): r for r in results}
    print()
    print(f"{baseline} against {current}: controller CPU per host (ms), WinRM commands and task runs per host (avg)")
    header = (
        f"{'forks':>5}  {'phase':<22} {'CPU ms/host':>11} {'now':>6} {'lower by':>8}  {'cmds':>5} {'now':>5}  "
        f"{'tasks':>5} {'now':>5}  {'wall s':>6} {'now':>6}"
    )
    print(header)
    print("-" * len(header))
    for forks, phase in dict.fromkeys((r.forks, r.phase) for r in results):
        old, new = found.get((baseline, forks, phase)), found.get((current, forks, phase))
        if old is None or new is None:
            continue
        old_ms = 1000 * old.ansible_cpu_seconds / len(old.commands_per_host)
        new_ms = 1000 * new.ansible_cpu_seconds / len(new.commands_per_host)
        print(
            f"{forks:>5}  {phase:<22} {old_ms:>11.0f} {new_ms:>6.0f} {old_ms / new_ms:>7.1f}x  "
            f"{statistics.fmean(old.commands_per_host):>5.2f} {statistics.fmean(new.commands_per_host):>5.2f}  "
            f"{statistics.fmean(old.tasks_per_host):>5.1f} {statistics.fmean(new.tasks_per_host):>5.1f}  "
            f"{old.wall_seconds:>6.1f} {new.wall_seconds:>6.1f}"
        )


def print_commands_by_template(results: t.Sequence[PhaseResult]) -> None:
    """WinRM commands per host of each host file and phase, over every --forks round (a-b: the copies differed)."""
    phases = [phase for phase, _extra in PHASES]
    cells: dict[str, dict[str, set[int]]] = {}
    for result in results:
        for template, values in result.commands_by_template.items():
            cells.setdefault(template, {}).setdefault(result.phase, set()).update(values)
    width = max([len("host file"), *(len(name) for name in cells)])
    print()
    print("WinRM commands per host, by host file")
    header = f"{'host file':<{width}}  " + "  ".join(f"{phase.split()[0]:>6}" for phase in phases)
    print(header)
    print("-" * len(header))
    for template in sorted(cells):
        row = []
        for phase in phases:
            seen = cells[template].get(phase, set())
            text = "-" if not seen else f"{min(seen)}" + (f"-{max(seen)}" if max(seen) != min(seen) else "")
            row.append(f"{text:>6}")
        print(f"{template:<{width}}  " + "  ".join(row))


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
    parser.add_argument(
        "--baseline",
        metavar="GIT_REF",
        help="first run the same fleet with the collection (role, modules, lab, host files) as of this git tag or "
        "commit, e.g. the 0.1.0 release, then with this checkout, and compare them",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this file as JSON")
    parser.add_argument(
        "--keep-logs", type=Path, help="directory for the ansible-playbook output of each phase (default: discarded)"
    )
    return parser


def run(options: argparse.Namespace, labs: list[Lab], results: list[PhaseResult]) -> None:
    """The whole benchmark; every lab it starts is in `labs` (for the caller to stop) before it starts."""
    lab_count = -(-options.hosts // HOSTS_PER_NETWORK)
    networks = networks_from(options.network, lab_count)
    work = Path(tempfile.mkdtemp(prefix="rdpfix-fleet-"))
    try:
        log_dir = options.keep_logs or work
        log_dir.mkdir(parents=True, exist_ok=True)
        variants = [CURRENT]
        if options.baseline:
            variants.insert(0, extract_baseline(options.baseline, work))
        for variant in variants:
            run_variant(
                options,
                variant,
                networks=networks,
                work=work / variant.name.replace(" ", "-"),
                log_dir=log_dir,
                labs=labs,
                results=results,
            )
    finally:
        # Held: a second Ctrl-C must not leave a lab running or the scratch directory behind.
        with INTERRUPTS.held():
            stop_labs(labs)
            shutil.rmtree(work, ignore_errors=True)


def run_variant(
    options: argparse.Namespace,
    variant: Variant,
    *,
    networks: list[str],
    work: Path,
    log_dir: Path,
    labs: list[Lab],
    results: list[PhaseResult],
) -> None:
    """Every --forks round of the three phases with one variant; its labs are stopped before the next variant."""
    work.mkdir(parents=True)
    templates = [template_path(name, variant.hosts_dir) for name in (options.template or DEFAULT_TEMPLATES)]
    groups = write_fleet(options.hosts, templates, work)
    print(
        f"{variant.name}: {options.hosts} hosts from {len(set(templates))} host file(s): "
        + ", ".join(sorted({p.stem for p in templates})),
        flush=True,
    )
    own: list[Lab] = []
    try:
        start_labs(groups, networks, work, own, variant)
    finally:
        labs.extend(own)
    for round_index, forks in enumerate(options.forks):
        if round_index:
            for lab in own:
                rdplab("reset", "--state-dir", str(lab.state_dir), variant=variant)
        for phase_index, (phase, extra) in enumerate(PHASES):
            prefix = variant.name.replace(" ", "-")
            log = log_dir / f"{prefix}-forks{forks}-{phase_index + 1}-{phase.split()[0]}.log"
            result = run_phase(own, forks, phase, extra, log, keep_log=options.keep_logs is not None, variant=variant)
            results.append(result)
            print(
                f"{variant.name}: forks {forks:>3} {phase:<22} {result.wall_seconds:6.1f} s, "
                f"{result.ansible_cpu_seconds:.1f} CPU s, load average {result.load_average[0]:.1f} -> "
                f"{result.load_average[1]:.1f}"
                + (f"  (ansible-playbook exit {result.exit_code})" if result.exit_code else ""),
                flush=True,
            )
    # The next variant reuses the networks: this one's labs stop first.
    with INTERRUPTS.held():
        stop_labs(own)
        for lab in own:
            labs.remove(lab)


def main(argv: t.Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    if options.hosts < 1:
        print("fleet.py: --hosts must be at least 1", file=sys.stderr)
        return 2
    # Stopped by Ctrl-C, `kill` or a closed terminal: unwind through the code that stops the labs.
    previous = {sig: signal.signal(sig, INTERRUPTS.handler) for sig in STOP_SIGNALS}
    labs: list[Lab] = []
    results: list[PhaseResult] = []
    try:
        run(options, labs, results)
    except BenchmarkError as exc:
        print(f"fleet.py: {exc}", file=sys.stderr)
        # What was measured before the error is still shown (and written).
        if results:
            print_table(results, options.hosts)
            if options.json:
                options.json.write_text(json.dumps([r.as_dict() for r in results], indent=2) + "\n", encoding="utf-8")
        return 1
    except KeyboardInterrupt:
        print(f"fleet.py: interrupted; {len(labs)} lab(s) stopped, scratch directory removed", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
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
