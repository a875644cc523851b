"""The Windows CI harness (tests/windows/rdpfix_local.py) against the lab: its powershell.exe is a stand-in
(tests/windows/fake_powershell.py) that hands the process's arguments and stdin to a simulated host, which accepts
nothing but the runner's exact local bootstrap and the unmodified agent script (``LocalPowerShellHost`` below, as
powershell.exe would run them) - so the local runner's command construction is what is tested."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socketserver
import subprocess
import sys
import threading
import typing as t
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

rdplab_bootstrap = pytest.importorskip("rdplab.bootstrap")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _agent  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WINDOWS = ROOT / "tests" / "windows"
RUNNER = WINDOWS / "rdpfix_local.py"
FAKE = WINDOWS / "fake_powershell.py"
HOSTS = ROOT / "tests" / "lab" / "hosts"
sys.path.insert(0, str(WINDOWS))

import rdpfix_local  # noqa: E402


def local_powershell(host: t.Any, command_line: str, stdin: bytes) -> tuple[int, bytes, bytes]:
    """powershell.exe running the runner's local bootstrap on a simulated host: only that command line, only the
    collection's agent script after the batch line; the agent's answer is its one-line document."""
    if command_line != rdpfix_local.LOCAL_COMMAND:
        return 1, b"", f"not the local bootstrap: {command_line[:80]!r}".encode()
    line, _newline, script = stdin.partition(b"\n")
    with open(_agent.AGENT_PATH, encoding="utf-8") as handle:
        expected = handle.read().encode("utf-8")
    if hashlib.sha256(script).digest() != hashlib.sha256(expected).digest():
        return 1, b"", b"the script on stdin differs from the collection's _agent.ps1"
    try:
        with host.lock:
            document = host.run_batch(json.loads(line))
    except ValueError as exc:
        failed = {"failed": True, "msg": f"rdpfix agent: invalid batch: {exc}"}
        return 1, json.dumps(failed).encode() + b"\r\n", b""
    return 0, json.dumps(document).encode() + b"\r\n", b""


class FakeWindows:
    """One simulated host behind the stand-in powershell.exe; records every process's arguments."""

    def __init__(self, host: t.Any) -> None:
        self.host = host
        self.calls: list[list[str]] = []
        owner = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                request = json.loads(self.rfile.read().decode("utf-8"))
                owner.calls.append(request["argv"])
                with owner.host.lock:
                    owner.host.counters.winrm_commands += 1
                command_line = " ".join(["PowerShell", *request["argv"]])
                rc, stdout, stderr = local_powershell(owner.host, command_line, base64.b64decode(request["stdin_b64"]))
                answer = {
                    "rc": rc,
                    "stdout_b64": base64.b64encode(stdout).decode("ascii"),
                    "stderr_b64": base64.b64encode(stderr).decode("ascii"),
                }
                self.wfile.write(json.dumps(answer).encode("utf-8"))

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], FakeWindows]]:
    started: list[FakeWindows] = []

    def start(name: str) -> FakeWindows:
        fake = FakeWindows(rdplab_fleet.load_fleet([HOSTS / f"{name}.yml"])[0])
        monkeypatch.setenv("RDPFIX_FAKE_POWERSHELL", fake.address)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.close()


STAND_IN = [sys.executable, str(FAKE)]


@pytest.fixture
def scenario(tmp_path: Path) -> Callable[..., tuple[int, dict[str, t.Any]]]:
    """Run one scenario through the stand-in powershell.exe: (exit code, the outcome document it wrote)."""
    out = tmp_path / "outcome.json"

    def run_scenario(*argv: str) -> tuple[int, dict[str, t.Any]]:
        code = rdpfix_local.main(["--powershell", STAND_IN[0], "--powershell", STAND_IN[1], "--out", str(out), *argv])
        return code, t.cast(dict[str, t.Any], json.loads(out.read_text(encoding="utf-8")))

    return run_scenario


Scenario = Callable[..., tuple[int, dict[str, t.Any]]]
Windows = Callable[[str], FakeWindows]


def failed_checks(document: dict[str, t.Any]) -> list[t.Any]:
    return [check for check in document["checks"] if not check["ok"]]


def test_the_process_gets_the_bootstrap_arguments() -> None:
    connection = rdpfix_local.LocalPowerShell(STAND_IN)
    command = rdpfix_local.LOCAL_COMMAND
    argv = connection.argv(command)
    assert argv[:2] == STAND_IN
    encoded = command.rsplit(" ", 1)[1]
    assert argv[2:] == ["-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Unrestricted", "-EncodedCommand", encoded]
    assert " ".join(["PowerShell", *argv[2:]]) == command
    with pytest.raises(ValueError, match="not a PowerShell command line"):
        connection.argv("cmd.exe /c dir")


def test_default_is_windows_powershell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SYSTEMROOT", raising=False)
    assert rdpfix_local.default_powershell() == ["powershell.exe"]
    program = tmp_path / "System32" / "WindowsPowerShell" / "v1.0" / "powershell.exe"
    program.parent.mkdir(parents=True)
    program.write_bytes(b"")
    monkeypatch.setenv("SYSTEMROOT", str(tmp_path))
    assert rdpfix_local.default_powershell() == [str(program)]


def test_one_batch_is_one_process_the_lab_accepts(windows: Windows) -> None:
    fake = windows("healthy")
    connection = rdpfix_local.LocalPowerShell(STAND_IN)
    result = rdpfix_local.run(connection, [("system.info", {}), ("listener.get", {})])
    assert [item.ok for item in result.results] == [True, True]
    assert result[0].data["hostname"] == "WEB01"
    assert (connection.commands, len(fake.calls), fake.host.counters.winrm_commands) == (1, 1, 1)


def test_a_changed_agent_is_refused_and_reported(windows: Windows) -> None:
    windows("healthy")
    connection = rdpfix_local.LocalPowerShell(STAND_IN)
    batch = _agent.Batch(on_error="continue")
    batch.add("system.info")
    wire = rdpfix_local.local_command(batch, script="Write-Output 'not the agent'")
    rc, stdout, stderr = connection.exec_command(wire.command, wire.stdin)
    assert (rc, stdout) == (1, b"")
    assert b"differs from the collection's _agent.ps1" in stderr


def test_selftest_scenario(windows: Windows, scenario: Scenario) -> None:
    fake = windows("healthy")
    code, document = scenario("selftest")
    assert code == 0, failed_checks(document)
    assert document["powershell_commands"] == 2 and fake.host.counters.writes == 0
    report = document["observed"]["report"]
    assert report["counts"]["ok"] == len(_agent.READ_OPERATIONS)


def test_key_file_scenario_copies_the_rdp_key(windows: Windows, scenario: Scenario) -> None:
    fake = windows("healthy")
    code, document = scenario("key-file")
    assert code == 0, failed_checks(document)
    observed = document["observed"]
    assert observed["key"]["path"].startswith("C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys\\")
    assert observed["file_copy"]["data"]["sha256"] == observed["file_stat"]["data"]["sha256"]
    assert fake.host.filesystem.exists(observed["copy_path"])


def test_key_file_scenario_reports_a_missing_key(windows: Windows, scenario: Scenario) -> None:
    windows("missing-selfsigned")
    code, document = scenario("key-file")
    assert code == 1
    assert [check["name"] for check in failed_checks(document)] == ["a certificate with a key file"]


def test_events_scenario_with_the_facts_queries(windows: Windows, scenario: Scenario) -> None:
    windows("events-history")
    code, document = scenario("events")
    assert code == 0, failed_checks(document)
    assert document["observed"]["facts_queries"]["data"]["events"]


def test_events_scenario_fails_on_a_silently_empty_answer(windows: Windows, scenario: Scenario) -> None:
    # Nothing was written to this log: a query for 30 IDs that answers neither the events nor "invalid" is the
    # silent failure the scenario exists to catch on Windows.
    windows("healthy")
    code, document = scenario("events", "--written", "5", "--first-id", "100")
    names = [check["name"] for check in failed_checks(document)]
    assert code == 1 and names == [
        "every written event found, or the query reported as invalid - never a silent 'no events'"
    ]


def test_firewall_scenario(windows: Windows, scenario: Scenario) -> None:
    windows("firewall-block-rule")
    code, document = scenario("firewall")
    assert code == 0, failed_checks(document)
    assert document["observed"]["summary"]["rules"] > 0


def test_restore_rule_scenario_recreates_the_rule_and_cleans_up(windows: Windows, scenario: Scenario) -> None:
    fake = windows("healthy")
    code, document = scenario("restore-rule", "--rule-name", "rdpfix-ci-test")
    assert code == 0, failed_checks(document)
    assert document["observed"]["recreated"]["local_ports"] == ["3390"]
    names = [
        rule["name"]
        for rule in rdpfix_local.run(rdpfix_local.LocalPowerShell(STAND_IN), [("firewall.rules.list", {})])[0].data[
            "rules"
        ]
    ]
    assert "rdpfix-ci-test" not in names
    assert fake.host.counters.writes == 4  # new, remove, re-create, clean-up remove


def test_batch_scenario_from_a_file(windows: Windows, tmp_path: Path, scenario: Scenario) -> None:
    windows("healthy")
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"ops": [{"op": "util.sleep", "args": {"milliseconds": 1}}]}), encoding="utf-8")
    code, document = scenario("batch", str(batch))
    assert code == 0 and document["observed"]["results"] == [{"op": "util.sleep", "ok": True, "data": {"slept_ms": 1}}]


def test_the_command_line_entry_point_runs_without_ansible(windows: Windows, tmp_path: Path) -> None:
    """As on Windows, where Ansible cannot be imported: the runner brings its own stand-ins and finds the checkout."""
    windows("healthy")
    out = tmp_path / "selftest.json"
    program = (
        "import sys, runpy\n"
        "sys.modules['ansible'] = None\n"
        "sys.modules['ansible_collections'] = None\n"
        f"sys.argv = ['rdpfix_local.py', '--powershell', {sys.executable!r}, '--powershell', {str(FAKE)!r},"
        f" '--out', {str(out)!r}, 'selftest']\n"
        f"runpy.run_path({str(RUNNER)!r}, run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=False, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["ok"] is True and document["powershell_commands"] == 2


def test_guards_lock_scenario(windows: Windows, scenario: Scenario) -> None:
    windows("healthy")
    code, document = scenario("guards-lock")
    assert code == 0, failed_checks(document)
    assert len(document["checks"]) == 18
    names = [check["name"] for check in document["checks"]]
    assert "the lock file is Administrators' with a protected SYSTEM/Administrators DACL" in names
    assert "the record says its batch held the file open (held)" in names


def test_the_stopped_batch_wrapper_runs_the_agent_twice_in_one_process() -> None:
    # Windows PowerShell only (the lab runs one process per batch): what can be checked here is what it is sent.
    local = rdpfix_local
    stopped = local.agent.Batch(on_error="stop")
    stopped.add("lock.acquire", token="t", owner={}, ttl_seconds=60)
    script = local.stopped_batch_wrapper(stopped, "C:\\Temp\\it's\\run.lock")
    assert script.isascii() and script.startswith("param([string]$BatchJson)\n")
    encoded = re.findall(r"FromBase64String\('([A-Za-z0-9+/=]+)'\)", script)
    assert [base64.b64decode(text).decode("utf-8") for text in encoded] == [
        local.agent.agent_script(),
        stopped.to_json(),
    ]
    assert "Exists('C:\\Temp\\it''s\\run.lock')" in script and "$rdpfixInner.Stop()" in script


def test_guards_lock_scenario_fails_where_a_guard_does_not_hold(
    windows: Windows, scenario: Scenario, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A comparison that lets everything through (what a broken agent would do) fails the scenario's "guard fails"
    # checks: the scenario can tell.
    from rdplab.ops import guard as lab_guard

    windows("healthy")
    monkeypatch.setattr(lab_guard, "first_difference", lambda *args, **kwargs: None)
    code, document = scenario("guards-lock")
    assert code == 1
    assert any(check["name"].startswith("guard fails:") for check in failed_checks(document))
