"""The fault matrix: host files x fault x point of a repair, each run through Ansible's own winrm connection (pywinrm,
HTTPS) against the lab, the action plugins driven in-process.

For every run: nothing is lost (every certificate and key file of the host before the run is still there, or is named
by a manifest on the host whose backup file exists), no security setting is weakened, no session is dropped without
consent, the result is true to what happened (an unreachable or failed result that says nothing was changed left the
host as it was; a lost answer is reported with its outcome and manifest id, never as "failed to run"), a plain rerun
converges, and restoring every manifest newest first gives back the exact pre-run state.

``make test`` runs the small matrix (MATRIX below); RDPFIX_FAULT_MATRIX=full runs the large one (docs/reliability.md
gives both and their figures). The rows that rely on the per-host lock and the write guards (late logons, concurrent
runs) are always in the matrix; a test fails when an operation they rely on is missing from the controller, the agent
or the lab (a rename would otherwise drop them silently).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import json
import os
import random
import threading
import typing as t
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from ansible.playbook.play_context import PlayContext
from ansible.plugins.loader import connection_loader, shell_loader

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _agent

rdplab_server = pytest.importorskip("rdplab.server")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")
rdplab_winrm = pytest.importorskip("rdplab.winrm")
restore_view = pytest.importorskip("rdplab.restore_view")
comparable = restore_view.comparable
differences = restore_view.differences

pytestmark = pytest.mark.faults

HOSTS_DIR = Path(__file__).resolve().parents[3] / "lab" / "hosts"
BACKUPS = restore_view.BACKUP_ROOT
RDP_TCP = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations\\RDP-Tcp"
SCHANNEL = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\SecurityProviders\\SCHANNEL\\Protocols"
# Client timeouts as a test inventory sets them: a held answer costs two seconds, not thirty.
OPERATION_TIMEOUT, READ_TIMEOUT = 1, 2
HELD = 3  # seconds a delayed answer is held: past the read timeout

# Which module repairs which host file (and with which options).
MODULES: dict[str, tuple[str, dict[str, t.Any]]] = {
    "expired-selfsigned": ("certificate", {}),
    "missing-selfsigned": ("certificate", {}),
    "machinekeys-rdp-key-no-ns": ("machinekeys", {}),
    "machinekeys-folder-acl": ("machinekeys", {}),
    "firewall-rules-disabled": ("firewall", {}),
    "tls-security-layer-rdp": ("tls", {}),
    "active-sessions": ("certificate", {"restart_service": "TermService"}),
}

# Host files repaired by rdpfix.rdp.server (the role's module: rdpfix.rdp.facts, then every concern planned from its
# snapshot, their changes in one shared apply batch), with the concerns it is given.
SERVER: dict[str, tuple[str, ...]] = {
    "combined-machinekeys-firewall": ("machinekeys", "certificate", "firewall", "tls"),
}

# The operations the late-logon rows (the session guard at the write) and the concurrent rows (the run lock) rely on.
RELIED_ON = ("guard", "lock.acquire", "lock.release")


@dataclass(frozen=True)
class Case:
    host: str
    fault: str  # a label: transport:<kind>@<point>, write:<error>@<where>, service:<name>, restore:<kind>, ...
    transport: dict[str, t.Any] | None = None
    model_faults: tuple[tuple[str, dict[str, t.Any]], ...] = ()
    in_restore: dict[str, t.Any] | None = None
    late_logon: bool = False
    concurrent: bool = False
    args: tuple[tuple[str, t.Any], ...] = ()
    # Cut the shared apply batch of rdpfix.rdp.server right before this concern's first operation.
    cut_before: str | None = None
    # After the fault, every later command is dropped too: reading the host again after a lost answer fails.
    then_down: bool = False
    # The connection the runs go through: Ansible's winrm, psrp or ssh connection plugin.
    via: str = "winrm"

    @property
    def id(self) -> str:
        return f"{self.host}-{self.fault}" if self.via == "winrm" else f"{self.host}-{self.via}:{self.fault}"


POINTS = {"read": 0, "apply": 1, "verify": 2}


def transport_case(
    host: str, kind: str, point: str, *, then_down: bool = False, via: str = "winrm", **extra: t.Any
) -> Case:
    params: dict[str, t.Any] = {"kind": kind, "skip": POINTS[point], **extra}
    if kind == "delay_after":
        params["seconds"] = HELD
    if kind == "cut_at_op":
        params["seconds"] = 20
    label = f"transport:{kind}{extra.get('op', '')}@{point}" + ("+down" if then_down else "")
    return Case(host, label, transport=params, then_down=then_down, via=via)


# The transports besides WinRS, and the faults they meet: a request dropped before it ran, an answer dropped after
# it ran, an answer held past the client's read timeout (psrp; OpenSSH has no read timeout: the held answer arrives
# late), and a dropped answer to a read.
OTHER_TRANSPORTS = ("psrp", "ssh")


# What a run over each transport says under each fault (the small matrix's rows): a dropped request or answer of the
# apply batch is an unknown outcome, resolved by reading the host again; a held answer is one over WinRS (the client
# times out), arrives late over psrp (pypsrp sends the same Receive again after its read timeout, and the host answers
# it again) and over ssh (no read timeout); a dropped answer to a read is unreachable, nothing having been changed.
EXPECTED: dict[tuple[str, str, str], str] = {
    **{(via, "drop_before", "apply"): "outcome:not_made" for via in ("winrm", *OTHER_TRANSPORTS)},
    **{(via, "drop_after", "apply"): "outcome:made" for via in ("winrm", *OTHER_TRANSPORTS)},
    **{(via, "drop_after", "read"): "unreachable" for via in ("winrm", *OTHER_TRANSPORTS)},
    ("winrm", "delay_after", "apply"): "outcome:made",
    ("psrp", "delay_after", "apply"): "changed",
    ("ssh", "delay_after", "apply"): "changed",
}


def other_transport_cases(host: str) -> list[Case]:
    return [
        transport_case(host, kind, point, via=via)
        for via in OTHER_TRANSPORTS
        for kind, point in (
            ("drop_before", "apply"),
            ("drop_after", "apply"),
            ("delay_after", "apply"),
            ("drop_after", "read"),
        )
    ]


def cut_between(host: str, concern: str, *, then_down: bool = False) -> Case:
    """rdpfix.rdp.server's shared apply batch cut right before ``concern``'s part: the concerns before it ran."""
    label = f"transport:cut_before_{concern}@apply" + ("+down" if then_down else "")
    params = {"kind": "cut_at_op", "skip": POINTS["apply"], "seconds": 20}
    return Case(host, label, transport=params, cut_before=concern, then_down=then_down)


def write_case(host: str, error: str, where: str) -> Case:
    path = {"backups": "C:\\ProgramData\\rdpfix", "machinekeys": "C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys"}
    return Case(
        host, f"write:{error}@{where}", model_faults=(("fail_writes_under", {"path": path[where], "error": error}),)
    )


def service_case(host: str, name: str) -> Case:
    return Case(host, f"service:{name}-stopped", model_faults=(("stop_service", {"name": name}),))


def small_matrix() -> list[Case]:
    cases = [
        transport_case("expired-selfsigned", "drop_after", "apply"),
        transport_case("expired-selfsigned", "http500_after", "apply"),
        transport_case("expired-selfsigned", "delay_after", "apply"),
        transport_case("expired-selfsigned", "drop_before", "apply"),
        transport_case("expired-selfsigned", "cut_at_op", "apply", op=6),
        transport_case("expired-selfsigned", "drop_after", "read"),
        transport_case("expired-selfsigned", "drop_after", "verify"),
        transport_case("machinekeys-rdp-key-no-ns", "drop_after", "apply"),
        transport_case("machinekeys-rdp-key-no-ns", "cut_at_op", "apply", op=4),
        transport_case("firewall-rules-disabled", "http500_after", "apply"),
        write_case("expired-selfsigned", "DiskFull", "backups"),
        write_case("expired-selfsigned", "DiskFull", "machinekeys"),
        write_case("machinekeys-rdp-key-no-ns", "AccessDenied", "machinekeys"),
        service_case("expired-selfsigned", "CertPropSvc"),
        Case("expired-selfsigned", "restore:drop_after", in_restore={"kind": "drop_after", "skip": 1}),
        Case("machinekeys-rdp-key-no-ns", "restore:cut_at_op3", in_restore={"kind": "cut_at_op", "op": 3, "skip": 1}),
    ]
    # Through rdpfix.rdp.server: the answer to the shared batch lost after it ran, the batch cut between two concerns
    # (each concern says what became of its own changes, naming its own manifest), and the same cut when reading the
    # host again fails too (each concern's outcome unknown; the next run names the manifests the cut batch wrote).
    cases += [
        transport_case("combined-machinekeys-firewall", "drop_after", "apply"),
        cut_between("combined-machinekeys-firewall", "firewall"),
        cut_between("combined-machinekeys-firewall", "firewall", then_down=True),
        transport_case("expired-selfsigned", "cut_at_op", "apply", op=6, then_down=True),
        *other_transport_cases("firewall-rules-disabled"),
    ]
    # No session at the read, so the plan restarts TermService; a user logs on before the apply.
    cases.append(Case("expired-selfsigned", "late-logon", late_logon=True, args=(("restart_service", "TermService"),)))
    cases.append(Case("expired-selfsigned", "concurrent", concurrent=True))
    return cases


def full_matrix() -> list[Case]:
    cases: list[Case] = []
    kinds = ("drop_before", "drop_after", "http500_after", "delay_after")
    for host in MODULES:
        if host == "active-sessions":
            continue
        for point in POINTS:
            cases += [transport_case(host, kind, point) for kind in kinds]
        cases += [transport_case(host, "cut_at_op", "apply", op=op) for op in range(1, 10)]
        cases += [
            write_case(host, error, where)
            for error in ("DiskFull", "AccessDenied")
            for where in ("backups", "machinekeys")
        ]
        cases += [service_case(host, name) for name in ("CertPropSvc", "TermService", "SessionEnv")]
        cases += [
            Case(
                host,
                f"restore:{kind}",
                in_restore={"kind": kind, "skip": 1, **({"seconds": HELD} if kind == "delay_after" else {})},
            )
            for kind in kinds
        ]
        cases += [
            Case(host, f"restore:cut_at_op{op}", in_restore={"kind": "cut_at_op", "op": op, "skip": 1})
            for op in (2, 4, 6)
        ]
    cases += [
        Case(host, "late-logon", late_logon=True, args=(("restart_service", "TermService"),))
        for host in ("expired-selfsigned", "missing-selfsigned")
    ]
    cases += [Case(host, "concurrent", concurrent=True) for host in MODULES if host != "active-sessions"]
    for host in ("expired-selfsigned", "machinekeys-rdp-key-no-ns", "firewall-rules-disabled"):
        cases += [
            transport_case(host, kind, point, via=via)
            for via in OTHER_TRANSPORTS
            for kind in ("drop_before", "drop_after", "http500_after", "delay_after")
            for point in POINTS
        ]
    for host, concerns in SERVER.items():
        for point in POINTS:
            cases += [transport_case(host, kind, point) for kind in kinds]
        # The firewall concern's changes follow the machinekeys concern's in the shared batch.
        cases += [cut_between(host, concerns[2], then_down=down) for down in (False, True)]
        cases += [transport_case(host, kind, "apply", then_down=True) for kind in ("drop_after", "http500_after")]
    return cases


MATRIX = full_matrix() if os.environ.get("RDPFIX_FAULT_MATRIX") == "full" else small_matrix()


# ------------------------------------------------------------------------------------------------------ the lab


def free_network() -> str:
    """A random 127.a.b network whose host and control addresses have their ports free: pytest workers and parallel
    runs never meet."""
    for _attempt in range(200):
        network = f"127.{random.randint(100, 254)}.{random.randint(0, 255)}"
        addresses = [f"{network}.1", *(f"{network}.{10 + index}" for index in range(len(MODULES) + len(SERVER)))]
        if all(rdplab_winrm.port_free(address, port) for address in addresses for port in (5985, 5986, 3389, 5999)):
            return network
    raise RuntimeError("no free loopback network found")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[t.Any]:
    files = [HOSTS_DIR / f"{name}.yml" for name in (*MODULES, *SERVER)]
    running = rdplab_server.Lab(files, free_network())
    running.start()
    # The lab's SSH client key and host keys, for Ansible's ssh connection.
    running.ssh_files = rdplab_server.write_ssh_files(tmp_path_factory.mktemp("lab-ssh"), running)
    try:
        yield running
    finally:
        running.stop()
        # The figures docs/reliability.md quotes: RDPFIX_FAULT_FIGURES=<file> (one worker: -p no:xdist).
        figures = os.environ.get("RDPFIX_FAULT_FIGURES")
        if figures:
            document = {"cases": len(MATRIX), "runs": TALLY.runs, "outcomes": dict(sorted(TALLY.outcomes.items()))}
            Path(figures).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def fresh(lab: t.Any, name: str) -> t.Any:
    host = rdplab_fleet.load_fleet([HOSTS_DIR / f"{name}.yml"])[0]
    lab.runtime(name).slot.replace_host(host)
    return host


# The connection plugin the current case's runs go through (Case.via; each pytest worker runs one case at a time).
VIA: contextvars.ContextVar[str] = contextvars.ContextVar("via", default="winrm")


def connection(lab: t.Any, name: str) -> t.Any:
    runtime = lab.runtime(name)
    host = runtime.slot.host
    play_context = PlayContext()
    via = VIA.get()
    if via == "psrp":
        conn = connection_loader.get("psrp", play_context, shell=shell_loader.get("powershell"))
        conn.set_options(
            var_options={
                "ansible_host": runtime.slot.address,
                "ansible_user": host.username,
                "ansible_password": host.password,
                "ansible_port": 5985,
                "ansible_psrp_protocol": "http",
                "ansible_psrp_auth": "negotiate",
                "ansible_psrp_operation_timeout": OPERATION_TIMEOUT,
                "ansible_psrp_read_timeout": READ_TIMEOUT,
            }
        )
        return conn
    if via == "ssh":
        play_context.shell = "powershell"
        conn = connection_loader.get("ssh", play_context, shell=shell_loader.get("powershell"))
        files = lab.ssh_files
        conn.set_options(
            var_options={
                "ansible_host": runtime.slot.address,
                "ansible_user": host.username,
                "ansible_port": runtime.ssh.bound_port,
                "ansible_ssh_private_key_file": files["private_key"],
                "ansible_ssh_host_key_checking": True,
                "ansible_ssh_common_args": f"-o UserKnownHostsFile={files['known_hosts']} -o StrictHostKeyChecking=yes",
                # No control master left running after a run (Ansible's default keeps one for 60 s).
                "ansible_ssh_args": "-o ControlMaster=no",
            }
        )
        return conn
    conn = connection_loader.get("winrm", play_context)
    conn.set_options(
        var_options={
            "ansible_host": runtime.slot.address,
            "ansible_user": host.username,
            "ansible_password": host.password,
            "ansible_port": 5986,
            "ansible_winrm_scheme": "https",
            "ansible_winrm_transport": ["basic"],
            # pywinrm's own options reach it as the connection's extras, as inventory variables do.
            "_extras": {
                "ansible_winrm_server_cert_validation": "ignore",
                "ansible_winrm_operation_timeout_sec": OPERATION_TIMEOUT,
                "ansible_winrm_read_timeout_sec": READ_TIMEOUT,
            },
        }
    )
    return conn


def run_module(lab: t.Any, name: str, module: str, **args: t.Any) -> dict[str, t.Any]:
    """One task of ``module`` on host ``name``, through a new winrm connection (as a new play would)."""
    plugin = importlib.import_module(f"ansible_collections.rdpfix.rdp.plugins.action.{module}")
    task = SimpleNamespace(
        args=args, check_mode=False, diff=False, async_val=0, action=f"rdpfix.rdp.{module}", environment=None
    )
    conn = connection(lab, name)
    action = plugin.ActionModule(task, conn, conn._play_context, None, None, None)
    try:
        return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": name}))
    finally:
        # As Ansible's task executor, which only logs a failed close (psrp after a dropped answer).
        with contextlib.suppress(Exception):
            conn.close()


def run_repair(lab: t.Any, name: str, **args: t.Any) -> dict[str, t.Any]:
    """One repair of host ``name``: its module, or for a host of SERVER rdpfix.rdp.facts and then rdpfix.rdp.server
    from its snapshot (as the server role runs them; a fault at point ``apply`` meets the shared apply batch)."""
    if name not in SERVER:
        module, defaults = MODULES[name]
        return run_module(lab, name, module, **{**defaults, **args})
    facts = run_module(lab, name, "facts")
    if facts.get("failed") or facts.get("unreachable"):
        return facts
    return run_module(lab, name, "server", snapshot=facts, **{concern: {} for concern in SERVER[name]})


def first_op_of(lab: t.Any, name: str, concern: str) -> int:
    """The position, in the shared apply batch rdpfix.rdp.server sends to a fresh ``name``, of ``concern``'s first
    operation (its backup folder): found by running the repair once and looking at the batch the host received."""
    host = fresh(lab, name)
    batches: list[list[dict[str, t.Any]]] = []
    original = host.run_batch

    def recording(batch: dict[str, t.Any]) -> dict[str, t.Any]:
        batches.append(list(batch["ops"]))
        return original(batch)

    host.run_batch = recording  # type: ignore[method-assign]
    try:
        run_repair(lab, name)
    finally:
        del host.run_batch
    marker = f"-{concern}-"
    for ops in batches:
        for position, item in enumerate(ops):
            if item["op"] == "dir.create" and marker in str(item["args"].get("path", "")):
                if position == 0 or not any(op["op"] == "dir.create" for op in ops[:position]):
                    raise AssertionError(f"{concern} does not share its apply batch with another concern")
                return position
    raise AssertionError(f"no apply batch carries {concern}'s changes")


# -------------------------------------------------------------------------------------------------- invariants


def difference(before: dict[str, t.Any], after: dict[str, t.Any]) -> str:
    """Where two comparable states differ, briefly (for assertion messages)."""
    return "; ".join(differences(before, after)[:10])


def manifests_text(host: t.Any) -> tuple[str, set[str]]:
    """Every manifest on the host (concatenated, lower case) and the paths of every backup file."""
    texts: list[str] = []
    paths: set[str] = set()
    for path, entry in host.filesystem.entries.items():
        if not path.lower().startswith(BACKUPS):
            continue
        paths.add(path.lower())
        if path.lower().endswith("\\manifest.json") and getattr(entry, "content", None):
            texts.append(bytes(entry.content).decode("utf-8", errors="replace").lower())
    return "\n".join(texts), paths


def valuables(snapshot: dict[str, t.Any]) -> dict[str, str]:
    """What must never be lost: certificates (by thumbprint) and key files (by path) -> a description."""
    found: dict[str, str] = {}
    for store, certificates in snapshot["certificates"].items():
        for cert in certificates:
            found[cert["thumbprint"].lower()] = f"certificate {cert['thumbprint']} in {store}"
    for path in snapshot["files"]["entries"]:
        lowered = path.lower()
        in_key_folder = "\\crypto\\" in lowered and ("\\machinekeys\\" in lowered or "\\keys\\" in lowered)
        if in_key_folder and not lowered.endswith(("\\machinekeys", "\\keys")):
            found[lowered] = f"key file {path}"
    return found


def assert_nothing_lost(before: dict[str, t.Any], host: t.Any) -> None:
    now = valuables(host.snapshot())
    text, _paths = manifests_text(host)
    for key, what in valuables(before).items():
        if key in now:
            continue
        name = key.rsplit("\\", 1)[-1]
        assert key in text or name in text, f"{what} is gone and no manifest names it"


def security(snapshot: dict[str, t.Any]) -> dict[str, t.Any]:
    registry = snapshot["registry"]

    def value(path: str, name: str) -> t.Any:
        item = (registry.get(path) or {}).get(name)
        return item.get("value") if isinstance(item, dict) else item

    legacy = {
        version: value(f"{SCHANNEL}\\{version}\\Server", "Enabled") for version in ("SSL 3.0", "TLS 1.0", "TLS 1.1")
    }
    open_public = sorted(
        rule["name"]
        for rule in snapshot["firewall"]["rules"]
        if rule["enabled"]
        and rule["action"] == "Allow"
        and rule["remote_addresses"] == ["Any"]
        and rule["profiles"] in (0, 4)
    )
    return {
        "security_layer": value(RDP_TCP, "SecurityLayer"),
        "nla": value(RDP_TCP, "UserAuthentication"),
        "legacy": legacy,
        "open_public": open_public,
    }


def assert_not_weakened(before: dict[str, t.Any], after: dict[str, t.Any]) -> None:
    old, new = security(before), security(after)
    if old["security_layer"] not in (None, 0):
        assert new["security_layer"] not in (0,), "SecurityLayer lowered to 0"
    if old["nla"] == 1:
        assert new["nla"] == 1, "NLA turned off"
    for version, enabled in new["legacy"].items():
        if enabled not in (None, 0) and old["legacy"][version] in (None, 0):
            raise AssertionError(f"{version} enabled")
    assert set(new["open_public"]) <= set(old["open_public"]), "a rule opened to any address on Public"


def active_users(snapshot: dict[str, t.Any]) -> set[str]:
    return {s["user"] for s in snapshot["sessions"] if s["user"] and s["state"] == "Active"}


@dataclass
class Tally:
    runs: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def add(self, label: str) -> None:
        self.runs += 1
        self.outcomes[label] = self.outcomes.get(label, 0) + 1


TALLY = Tally()


def outcome_of(result: dict[str, t.Any]) -> str:
    if result.get("unreachable"):
        return "unreachable"
    if "outcomes" in result:
        # rdpfix.rdp.server after a lost answer: each concern's own outcome.
        return "server " + ", ".join(f"{name}:{outcome}" for name, outcome in result["outcomes"].items())
    if "outcome" in result:
        return f"outcome:{result['outcome']}"
    if result.get("failed"):
        return "failed"
    return "changed" if result.get("changed") else "ok"


def assert_truthful(case: Case, result: dict[str, t.Any], before: dict[str, t.Any], host: t.Any) -> None:
    msg = str(result.get("msg") or "")
    after = comparable(host.snapshot())
    baseline = comparable(before)
    if case.late_logon:
        # The new session is the test's doing, not the run's (sessions are checked on their own).
        after.pop("sessions")
        baseline.pop("sessions")
    unchanged = after == baseline
    assert "Traceback" not in msg
    if "nothing was changed" in msg and "already made changes" not in msg:
        assert unchanged, f"{case.id}: said nothing was changed, but: {difference(baseline, after)}: {msg}"
    if not result.get("failed") and not result.get("unreachable") and not result.get("changed"):
        assert unchanged, f"{case.id}: ok/unchanged, but: {difference(baseline, after)}"
    if result.get("changed") and not result.get("failed"):
        assert not unchanged or result.get("outcome") == "made", f"{case.id}: changed, but the host is as before"
    if "outcome" in result:
        assert result["outcome"] in ("made", "partial", "not_made", "not_needed", "unknown")
        manifest = (result.get("backup") or {}).get("manifest_id")
        assert manifest, f"{case.id}: a lost answer without its manifest id"
        if result["outcome"] == "unknown":
            assert manifest in msg
        if result["outcome"] == "not_made":
            assert unchanged, f"{case.id}: 'not made' but the host changed"
    if case.transport and case.transport["skip"] == POINTS["apply"] and case.transport["kind"] != "drop_before":
        # The changes were sent: whatever happened, it is never "failed to run" or unreachable.
        fired = any(f.fired for f in host.transport_faults)
        if fired:
            assert not result.get("unreachable"), f"{case.id}: a lost answer reported as unreachable: {msg}"


def lost_manifests(result: dict[str, t.Any]) -> list[str]:
    """The manifest ids a result names as those of a lost answer: its own, or each concern's (rdpfix.rdp.server)."""
    results = [result, *(result.get("concerns") or {}).values()]
    return [str(item["backup"]["manifest_id"]) for item in results if "outcome" in item and item.get("backup")]


def assert_concerns_truthful(case: Case, result: dict[str, t.Any], host: t.Any) -> None:
    """rdpfix.rdp.server: each concern whose changes travelled in a lost batch says what became of them, naming its
    own manifest; the task names every one of them; a concern that says it made nothing has no manifest on the host."""
    concerns = result.get("concerns") or {}
    lost = {name: item for name, item in concerns.items() if "outcome" in item}
    fired = case.transport is not None and case.transport["skip"] == POINTS["apply"]
    if not fired or result.get("unreachable"):
        return
    if case.transport is not None and case.transport["kind"] == "drop_before" and not case.then_down:
        # The request never reached a command (the client cannot know it: a dropped connection): nothing was made.
        assert all(item["outcome"] == "not_made" for item in lost.values()), {n: i["outcome"] for n, i in lost.items()}
    assert len(lost) >= 2, f"{case.id}: the shared batch carried two concerns' changes, lost: {sorted(lost)}"
    ids = [str(item["backup"]["manifest_id"]) for item in lost.values()]
    assert len(set(ids)) == len(ids), f"{case.id}: concerns share a manifest id: {ids}"
    text = str(result.get("msg") or "") + " ".join(result.get("warnings") or [])
    _manifests, paths = manifests_text(host)
    for name, item in lost.items():
        backup = item["backup"]
        assert backup["manifest_id"] in text, f"{case.id}: the task does not name {name}'s manifest: {text}"
        assert backup["manifest_id"] in str(item.get("msg") or "") or item["outcome"] == "made", item
        on_host = any(path.startswith(str(backup["path"]).lower() + "\\manifest.json") for path in paths)
        if item["outcome"] in ("not_made", "not_needed"):
            assert not on_host, f"{case.id}: {name} says nothing was made, but its manifest is on the host"
        if item["outcome"] in ("made", "partial"):
            assert on_host, f"{case.id}: {name} says {item['outcome']}, but its manifest is not on the host"
        if case.then_down:
            assert item["outcome"] == "unknown" and item.get("failed"), f"{case.id}: {name}: {item.get('msg')}"
    assert result["outcomes"] == {name: item["outcome"] for name, item in lost.items()}
    if case.cut_before and not case.then_down:
        before = [name for name in lost if name != case.cut_before]
        assert lost[case.cut_before]["outcome"] == "not_made", lost[case.cut_before].get("msg")
        assert all(lost[name]["outcome"] == "made" for name in before), {n: lost[n]["outcome"] for n in before}


def clear_faults(host: t.Any) -> None:
    host.transport_faults.clear()
    host.filesystem.faults.clear()
    for name in ("CertPropSvc", "TermService", "SessionEnv", "KeyIso", "CryptSvc"):
        service = host.services.get(name)
        if service is not None and service.status != "Running" and service.start_type != "Disabled":
            host.start_service(name)


def restore_all(lab: t.Any, name: str) -> dict[str, t.Any]:
    """Put back every run of the repair modules, newest first (the module orders them), as playbooks/restore_rdp.yml
    does with the listed ids: not the restore's own manifests (they undo a restore), not those already restored, and
    not a folder without a manifest (a batch cut before its manifest changed nothing; the listing names its error)."""
    listing = run_module(lab, name, "restore")
    assert not listing.get("failed"), listing.get("msg")
    entries = listing.get("manifests") or []
    for entry in entries:
        if entry.get("error"):
            assert "no backup manifest" in entry["error"], entry
    ids = [
        entry["id"]
        for entry in entries
        if not entry.get("error") and entry.get("module") != "rdpfix.rdp.restore" and not entry.get("restored")
    ]
    if not ids:
        return listing
    return run_module(lab, name, "restore", manifest_id=ids)


# ------------------------------------------------------------------------------------------------------ the test


def test_the_operations_the_late_logon_and_concurrent_rows_rely_on_exist() -> None:
    from rdplab.ops import OPS

    agent_text = Path(_agent.AGENT_PATH).read_text(encoding="utf-8")
    for op in RELIED_ON:
        assert op in _agent.OPERATIONS, f"the controller has no {op}"
        assert f"    '{op}' = {{" in agent_text, f"the agent has no {op}"
        assert op in OPS, f"the lab has no {op}"
    assert {case.id for case in small_matrix()} >= {"expired-selfsigned-late-logon", "expired-selfsigned-concurrent"}


@pytest.mark.parametrize("case", MATRIX, ids=[case.id for case in MATRIX])
def test_fault(lab: t.Any, case: Case) -> None:
    module, args = MODULES.get(case.host, ("server", {}))
    args = {**args, **dict(case.args)}
    transport = dict(case.transport or {})
    if case.cut_before:
        transport["op"] = first_op_of(lab, case.host, case.cut_before)
    VIA.set(case.via)
    host = fresh(lab, case.host)
    before = host.snapshot()
    users = active_users(before)
    for fault, params in case.model_faults:
        host.inject_fault(fault, params)
    # What "nothing was changed" is measured against: the host with its fault (a stopped service stays stopped).
    baseline = host.snapshot()
    if transport:
        host.inject_fault("transport", transport)
    if case.then_down:
        host.inject_fault("transport", {"kind": "drop_before", "skip": transport["skip"] + 1, "count": 0})

    if case.concurrent:
        results: list[dict[str, t.Any]] = []
        threads = [
            threading.Thread(target=lambda: results.append(run_repair(lab, case.host, **dict(case.args))))
            for _twice in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert len(results) == 2
        assert sum(1 for r in results if r.get("changed") and not r.get("failed")) <= 1, results
        result = next((r for r in results if r.get("failed")), results[0])
    elif case.late_logon:
        # A user logs on between the read and the apply: the write is guarded, the session survives.
        original = host.run_batch
        calls = {"n": 0}

        def late(batch: dict[str, t.Any]) -> dict[str, t.Any]:
            calls["n"] += 1
            if calls["n"] == 2:
                host.sessions.add("CORP\\late", "Active")
            return original(batch)

        host.run_batch = late  # type: ignore[method-assign]
        try:
            result = run_repair(lab, case.host, **dict(case.args))
        finally:
            del host.run_batch
        assert calls["n"] >= 2, "the run never reached its apply batch"
        assert "CORP\\late" in active_users(host.snapshot()), f"the late session was dropped: {result.get('msg')}"
    else:
        result = run_repair(lab, case.host, **dict(case.args))
    TALLY.add(outcome_of(result))
    if case.transport and not case.then_down and not case.cut_before and case.host in MODULES:
        point = next(name for name, skip in POINTS.items() if skip == case.transport["skip"])
        expected = EXPECTED.get((case.via, case.transport["kind"], point))
        if expected is not None:
            assert outcome_of(result) == expected, f"{case.id}: {outcome_of(result)}: {result.get('msg')}"

    assert_truthful(case, result, baseline, host)
    if module == "server":
        assert_concerns_truthful(case, result, host)
    assert_nothing_lost(before, host)
    assert_not_weakened(before, host.snapshot())
    if not args.get("allow_session_disruption"):
        assert users <= active_users(host.snapshot()), f"{case.id}: a session was dropped without consent"

    # A plain rerun, the fault gone, converges.
    clear_faults(host)
    rerun = run_repair(lab, case.host, **dict(case.args))
    assert not rerun.get("failed") and not rerun.get("unreachable"), rerun.get("msg")
    if case.then_down and transport.get("kind") == "cut_at_op":
        # The cut batch could not release the host's run lock, and its run never learnt what it made: the next run
        # takes the lock over and names every manifest the cut batch was writing.
        warnings = " ".join(rerun.get("warnings") or [])
        for manifest in lost_manifests(result):
            assert manifest in warnings, f"{case.id}: the next run does not name {manifest}: {warnings}"
    settled = run_repair(lab, case.host, **dict(case.args))
    assert settled.get("changed") is False and not settled.get("failed"), settled.get("msg")
    assert_nothing_lost(before, host)

    # Every manifest restored newest first gives back the exact pre-run state; a fault inside the restore is met
    # the same way (truthful result, plain rerun).
    if case.in_restore:
        host.inject_fault("transport", case.in_restore)
        cut = restore_all(lab, case.host)
        TALLY.add("restore " + outcome_of(cut))
        assert "Traceback" not in str(cut.get("msg"))
        assert_nothing_lost(before, host)
        clear_faults(host)
    restored = restore_all(lab, case.host)
    assert not restored.get("failed") and not restored.get("unreachable"), restored.get("msg")
    final, original = comparable(host.snapshot()), comparable(before)
    if case.late_logon:
        final.pop("sessions")
        original.pop("sessions")
    assert final == original, f"{case.id}: the restore is not exact: {difference(original, final)}"
