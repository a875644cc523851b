"""The win_reboot recogniser: the installed plugin's exact commands are emulated, anything else is refused.

The commands are produced by the installed ansible.windows code itself (its ``_execute_command`` and
``reboot_host``), so these tests fail when a new version sends something the lab would not recognise.
"""

from __future__ import annotations

import base64
import json
import time
import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest
from ansible_collections.ansible.windows.plugins.plugin_utils import _reboot

from rdplab import bootstrap, reboot
from rdplab.direct import DirectConnection
from rdplab.model import schannel
from rdplab.model.host import WindowsHost
from rdplab.model.registry import make_value

HOSTS = Path(__file__).resolve().parent.parent / "hosts"
AUTOLOGON_CHECKED_KEY = "HKLM:\\SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion\\Winlogon\\AutoLogonChecked"
TLS12_SERVER = "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\SecurityProviders\\SCHANNEL\\Protocols\\TLS 1.2\\Server"


def load(name: str) -> WindowsHost:
    return WindowsHost.from_file(HOSTS / f"{name}.yml")


class PluginConnection(DirectConnection):
    """DirectConnection plus the connection-plugin methods win_reboot calls around exec_command."""

    def __init__(self, host: WindowsHost) -> None:
        super().__init__(host)
        self.sent: list[str] = []
        self.resets = 0

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        self.sent.append(cmd)
        return super().exec_command(cmd, in_data, sudoable)

    def get_option(self, name: str) -> t.Any:
        raise KeyError(name)  # as a plugin without connection_timeout: win_reboot then leaves it alone

    def reset(self) -> None:
        self.resets += 1


class Recorder:
    """Captures the command line win_reboot's _execute_command builds, answering with a canned result."""

    def __init__(self, rc: int = 0, stdout: bytes = b"") -> None:
        self.commands: list[str] = []
        self.answer = (rc, stdout, b"")

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        self.commands.append(cmd)
        return self.answer

    def get_option(self, name: str) -> t.Any:
        raise KeyError(name)

    def close(self) -> None:
        """Nothing to close."""

    def reset(self) -> None:
        """Nothing to reset."""


def wire(script: str) -> str:
    """The exact command line the installed win_reboot sends for a script."""
    recorder = Recorder()
    _reboot._execute_command("win_reboot", t.cast(t.Any, recorder), script)
    return recorder.commands[0]


def reboot_script(msg: str = "Reboot initiated by Ansible", delay: int = 2, flag: bool = True) -> str:
    """Rebuild the installed reboot script by capturing reboot_host's second command (after the boot-time query)."""
    recorder = Recorder(stdout=b"1")
    with pytest.MonkeyPatch.context() as patch:
        # Stop after the reboot command: the first wait raises instead of sleeping.
        patch.setattr(_reboot.time, "sleep", _raise)
        _reboot.reboot_host(
            "win_reboot",
            t.cast(t.Any, recorder),
            msg=msg,
            pre_reboot_delay=delay,
            test_command=None if flag else "whoami",
        )
    return recorder.commands[1]


def _raise(_seconds: float) -> None:
    raise RuntimeError("stop here")


def decoded(command_line: str) -> str:
    prefix = "PowerShell -NoProfile -NonInteractive -ExecutionPolicy Unrestricted -EncodedCommand "
    return base64.b64decode(command_line[len(prefix) :]).decode("utf-16-le")


def encoded(script: str) -> str:
    prefix = "PowerShell -NoProfile -NonInteractive -ExecutionPolicy Unrestricted -EncodedCommand "
    return prefix + base64.b64encode(script.encode("utf-16-le")).decode()


@pytest.fixture(autouse=True)
def _no_leftover_timers() -> t.Iterator[None]:
    yield
    for host in list(reboot._PENDING):
        found = reboot._PENDING.pop(host, None)
        if found is not None:
            found.timer.cancel()


def test_the_installed_plugin_is_read() -> None:
    scripts = reboot.SCRIPTS
    assert isinstance(scripts, reboot.WinRebootScripts), scripts
    assert scripts.autologon_checked_key == _reboot._LOGON_UI_KEY
    assert scripts.boot_time_command == _reboot._DEFAULT_BOOT_TIME_COMMAND
    assert "shutdown.exe /r /t %s /c %s" in scripts.reboot_template


def test_every_command_of_a_real_reboot_is_recognised_and_nothing_else() -> None:
    boot = wire(_reboot._DEFAULT_BOOT_TIME_COMMAND)
    abort = wire(r"C:\Windows\System32\shutdown.exe /a")
    marker = "success-00000000-1111-4222-8333-444444444444"
    test = wire(f"Get-Item -LiteralPath '{_reboot._LOGON_UI_KEY}' -ErrorAction Stop; '{marker}'")
    scheduled = reboot_script("rdpfix.rdp is rebooting to apply Schannel (TLS) changes")
    for line, kind in [(boot, "boot_time"), (abort, "abort"), (test, "test"), (scheduled, "reboot")]:
        found = bootstrap.recognise(line)
        assert isinstance(found, reboot.WinReboot), line
        assert isinstance(reboot.SCRIPTS, reboot.WinRebootScripts)
        result = reboot.decode(reboot.SCRIPTS, line)
        assert result is not None and result.kind == kind
    request = reboot.decode(t.cast(reboot.WinRebootScripts, reboot.SCRIPTS), scheduled)
    assert request is not None and request.reboot == reboot.RebootRequest(
        True, 2, "rdpfix.rdp is rebooting to apply Schannel (TLS) changes"
    )


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda s: s.replace("/r /t 2", "/s /t 2"), id="shutdown-instead-of-restart"),
        pytest.param(lambda s: s.replace("ConvertTo-Json", "ConvertTo-Xml"), id="other-output"),
        pytest.param(lambda s: s + "\nRemove-Item C:\\ -Recurse", id="appended-command"),
        pytest.param(lambda s: s.replace("; If (-not $?)", ";If (-not $?)"), id="different-suffix"),
        pytest.param(lambda s: s.replace("'Continue'", "'Stop'"), id="changed-preference"),
        pytest.param(lambda s: s.replace("/c 'Reboot", "/c 'Re'boot"), id="broken-quoting"),
        pytest.param(lambda s: s.replace("/t 2", "/t 02"), id="not-int-formatted"),
    ],
)
def test_a_modified_reboot_script_is_refused(mutate: t.Callable[[str], str]) -> None:
    original = decoded(reboot_script())
    changed = mutate(original)
    assert changed != original
    host = load("healthy")
    outcome = bootstrap.execute(host, encoded(changed), b"")
    assert outcome.rc == 1 and b"rdplab" in outcome.stderr
    assert reboot.pending(host) is None
    assert host.counters.writes == 0


@pytest.mark.parametrize(
    "command_line",
    [
        pytest.param(lambda: wire("(Get-CimInstance Win32_OperatingSystem).LastBootUpTime"), id="custom-boot-query"),
        pytest.param(lambda: wire("Get-Item -LiteralPath 'HKLM:\\SOFTWARE' -ErrorAction Stop; 'ok'"), id="custom-test"),
        pytest.param(lambda: wire("C:\\Windows\\System32\\shutdown.exe /a /f"), id="other-abort"),
        pytest.param(lambda: wire(_reboot._DEFAULT_BOOT_TIME_COMMAND).replace("PowerShell", "pwsh"), id="other-shell"),
        pytest.param(lambda: wire(_reboot._DEFAULT_BOOT_TIME_COMMAND) + "=", id="padding"),
        pytest.param(lambda: wire(wire(_reboot._DEFAULT_BOOT_TIME_COMMAND)), id="encoded-twice"),
    ],
)
def test_other_commands_are_refused(command_line: t.Callable[[], str]) -> None:
    host = load("healthy")
    outcome = bootstrap.execute(host, command_line(), b"")
    assert outcome.rc == 1
    assert b"only runs the rdpfix agent" in outcome.stderr


def test_boot_time_is_the_hosts_as_filetime() -> None:
    host = load("healthy")
    rc, stdout, _stderr = DirectConnection(host).exec_command(wire(_reboot._DEFAULT_BOOT_TIME_COMMAND))
    assert rc == 0
    ticks = int(stdout.decode().strip())
    seconds = ticks / 10_000_000 - 11_644_473_600  # FILETIME epoch 1601 -> Unix epoch
    assert seconds == pytest.approx(host.system.boot_time.timestamp(), abs=1e-6)
    assert host.counters.writes == 0


def test_win_reboot_runs_its_real_loop_and_the_host_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    host = load("tls-tls12-disabled")
    assert "TLSv1.2" not in host.rdp_view(connect=False).tls_versions
    # What rdpfix.rdp.tls writes for tls.tls12_disabled; Schannel latched the old state at boot.
    host.registry.set(TLS12_SERVER, "Enabled", make_value("REG_DWORD", 1))
    host.registry.set(TLS12_SERVER, "DisabledByDefault", make_value("REG_DWORD", 0))
    assert "TLSv1.2" not in host.rdp_view(connect=False).tls_versions
    host.inject_fault("add_session", {"user": "CORP\\alice", "state": "Active"})
    boot_before = host.system.boot_time
    sleeps: list[float] = []
    real_sleep = time.sleep

    def short_sleep(seconds: float) -> None:
        # win_reboot backs off 1, 2, 4... seconds between polls; poll every 0.2 s instead.
        sleeps.append(seconds)
        real_sleep(0.2)

    monkeypatch.setattr(_reboot, "time", SimpleNamespace(sleep=short_sleep))
    connection = PluginConnection(host)
    started = time.monotonic()
    result = _reboot.reboot_host("win_reboot", t.cast(t.Any, connection), msg="rdpfix test reboot")
    elapsed = time.monotonic() - started

    assert result["failed"] is False, result
    assert result["rebooted"] is True and result["changed"] is True
    # shutdown /t 2: the boot time changes about two seconds later, so the plugin had to poll for it.
    assert sleeps, "win_reboot must have waited for the boot time to change"
    assert 1.8 <= elapsed < 10
    assert host.system.boot_time > boot_before
    assert not any(s.user == "CORP\\alice" for s in host.sessions.sessions)
    assert "TLSv1.2" in host.rdp_view(connect=False).tls_versions
    assert "TLS 1.2" in schannel.effective(host).protocols
    assert host.registry.key(AUTOLOGON_CHECKED_KEY) is not None
    events = [(e.provider, e.id) for e in host.events.events]
    assert ("User32", 1074) in events and ("EventLog", 6006) in events and ("EventLog", 6005) in events
    assert all(host.services.running(name) for name in ("TermService", "SessionEnv", "UmRdpService"))
    # Every command went through the recogniser and was counted; only the reboot command wrote.
    kinds = [
        t.cast(reboot.Decoded, reboot.decode(t.cast(reboot.WinRebootScripts, reboot.SCRIPTS), c)).kind
        for c in connection.sent
    ]
    assert kinds[0] == "boot_time" and kinds[1] == "reboot" and kinds[-1] == "test"
    assert kinds.count("boot_time") >= 3  # before, at least one "unchanged", then changed
    assert host.counters.winrm_commands == len(connection.sent)
    assert host.counters.writes == 1


def test_a_second_shutdown_is_refused_with_1190_and_can_be_aborted() -> None:
    host = load("healthy")
    connection = DirectConnection(host)
    command = reboot_script(delay=60)
    rc, stdout, _stderr = connection.exec_command(command)
    assert rc == 0 and json.loads(stdout) == {"stdout": "", "stderr": "", "rc": 0}
    assert reboot.pending(host) is not None
    rc, stdout, _stderr = connection.exec_command(command)
    assert rc == 0 and json.loads(stdout)["rc"] == 1190
    abort = wire(r"C:\Windows\System32\shutdown.exe /a")
    assert connection.exec_command(abort)[0] == 0
    assert reboot.pending(host) is None
    rc, _stdout, stderr = connection.exec_command(abort)
    assert rc == 1116 and b"(1116)" in stderr


def test_the_plugin_handles_a_pending_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shutdown scheduled by someone else: win_reboot aborts it, sends its own, and the host restarts once."""
    host = load("healthy")
    DirectConnection(host).exec_command(reboot_script(msg="someone else", delay=600))
    monkeypatch.setattr(_reboot, "time", SimpleNamespace(sleep=lambda _s: time.sleep(0.2)))
    result = _reboot.reboot_host("win_reboot", t.cast(t.Any, PluginConnection(host)), pre_reboot_delay=0)
    assert result["failed"] is False, result
    comments = [e.data.get("comment") for e in host.events.events if e.id == 1074]
    assert comments == ["someone else", "Reboot initiated by Ansible"]
    # The shutdown comment belongs to User32 1074 only; the EventLog service's start carries no data.
    assert [e.data for e in host.events.events if e.id == 6005] == [{}]


def test_the_test_command_fails_until_logon_ui_is_back() -> None:
    host = load("healthy")
    connection = DirectConnection(host)
    marker = "success-12345678-1234-4234-8234-123456789abc"
    test = wire(f"Get-Item -LiteralPath '{_reboot._LOGON_UI_KEY}' -ErrorAction Stop; '{marker}'")
    connection.exec_command(reboot_script(delay=600))  # removes the key, as the real script does
    rc, _stdout, stderr = connection.exec_command(test)
    assert rc == 1 and b"does not exist" in stderr
    assert reboot.complete_pending(host)
    rc, stdout, _stderr = connection.exec_command(test)
    assert rc == 0 and marker.encode() in stdout


def test_a_disabled_service_stays_stopped_and_a_stopped_termservice_comes_back() -> None:
    host = load("healthy")
    host.inject_fault("stop_service", {"name": "TermService"})
    host.service("CertPropSvc").start_type = "Disabled"
    host.stop_service("CertPropSvc")
    reboot.restart(host)
    assert host.services.running("TermService")
    assert not host.services.running("CertPropSvc")


def test_an_expired_self_signed_certificate_is_renewed_at_boot() -> None:
    host = load("expired-selfsigned")
    assert host.rdp_view(connect=False).failure == "reset_after_x224"
    reboot.restart(host)
    assert host.rdp_view(connect=False).failure is None


def test_a_changed_plugin_is_detected(tmp_path: Path) -> None:
    source = Path(_reboot.__file__).read_text(encoding="utf-8")
    changed = tmp_path / "_reboot.py"
    changed.write_text(source.replace("shutdown.exe /r /t %s /c %s", "shutdown.exe /r /f /t %s /c %s"))
    scripts = reboot.read_scripts(changed)
    # The new version's command is recognised by a recogniser built from it, and refused by the installed one.
    new_command = encoded(decoded(reboot_script()).replace("/r /t", "/r /f /t"))
    assert reboot.decode(scripts, new_command) is not None
    assert reboot.decode(t.cast(reboot.WinRebootScripts, reboot.SCRIPTS), new_command) is None

    broken = tmp_path / "broken.py"
    broken.write_text(source.replace("reboot_command = ", "shutdown_script = ").replace("reboot_command)", "x)"))
    with pytest.raises(reboot.WinRebootSourceError, match="reboot_command"):
        reboot.read_scripts(broken)


def test_an_unreadable_plugin_is_reported_in_the_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = reboot.WinRebootSourceError("ansible.windows is not installed")
    monkeypatch.setattr(reboot, "SCRIPTS", problem)
    outcome = bootstrap.execute(load("healthy"), wire(_reboot._DEFAULT_BOOT_TIME_COMMAND), b"")
    assert outcome.rc == 1 and b"ansible.windows is not installed" in outcome.stderr
