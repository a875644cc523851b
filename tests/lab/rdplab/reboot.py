"""Emulate the commands ansible.windows.win_reboot sends, and the reboot they cause, on a simulated host.

The server role reboots with ``ansible.windows.win_reboot`` (only when the user allows it). That plugin runs four
kinds of PowerShell command through the connection's ``exec_command``, each wrapped by its ``_execute_command`` as
``PowerShell -NoProfile -NonInteractive -ExecutionPolicy Unrestricted -EncodedCommand <UTF-16LE base64>`` of
``<script>; If (-not $?) { ... exit ... }``:

- the boot-time query ``(Get-CimInstance ... Win32_OperatingSystem ...).LastBootUpTime.ToFileTime()``;
- the reboot script: removes the ``Winlogon\\AutoLogonChecked`` key, runs ``shutdown.exe /r /t <delay> /c <msg>`` and
  prints ``{"stdout", "stderr", "rc"}`` as JSON;
- ``shutdown.exe /a`` when shutdown.exe answered 1190 (a shutdown is already scheduled), before trying again;
- the post-reboot test ``Get-Item -LiteralPath '<AutoLogonChecked key>' -ErrorAction Stop; 'success-<uuid4>'``.

The script texts are not copied here: they are read from the installed plugin's source (``plugin_utils/_reboot.py``)
when this module is imported, so a new ansible.windows that changes them is noticed (its commands are refused, or the
recogniser reports that it cannot read the new source) instead of being accepted on trust.

The emulated reboot follows what Windows does with ``shutdown /r /t N``: the command returns at once, the restart
begins N seconds later. Until then the boot time is unchanged, so win_reboot's own loop waits and polls as it would
against a real server. The restart itself is instantaneous in the lab (the WinRM endpoint never goes away, and shells
opened before it keep working): boot time, services, sessions, Schannel and the AutoLogonChecked key all change at
once.

The key is ``HKLM:\\SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion\\Winlogon\\AutoLogonChecked``; the plugin
keeps it in its constant ``_LOGON_UI_KEY`` because LogonUI creates it when it shows the logon prompt, which is how the
plugin knows the host is back.
"""

from __future__ import annotations

import ast
import base64
import binascii
import importlib.util
import json
import re
import threading
import typing as t
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rdplab.model import schannel
from rdplab.model.registry import canonical_path

if t.TYPE_CHECKING:
    from rdplab.bootstrap import CommandOutcome
    from rdplab.model.host import WindowsHost

# The plugin whose commands are recognised (bootstrap imports this module, so nothing here imports bootstrap at load).
WIN_REBOOT_MODULE = "ansible_collections.ansible.windows.plugins.plugin_utils._reboot"

# Windows FILETIME: 100-nanosecond ticks since 1601-01-01 UTC (what DateTime.ToFileTime() returns).
FILETIME_EPOCH = datetime(1601, 1, 1, tzinfo=UTC)

# shutdown.exe exit codes (Win32 error codes) and the messages it prints for them.
ERROR_SHUTDOWN_IN_PROGRESS = 1190
ERROR_NO_SHUTDOWN_IN_PROGRESS = 1116
SHUTDOWN_IN_PROGRESS_TEXT = "A system shutdown has already been scheduled.(1190)"
NO_SHUTDOWN_TEXT = "Unable to abort the system shutdown because no shutdown was in progress.(1116)"

# Event log entries a restart leaves [Windows: User32 1074, EventLog 6006 / 6005].
USER32 = "User32"
EVENTLOG = "EventLog"

# Services Windows starts at boot whatever their state before the restart (TermService is a demand-start service that
# is running on every booted server: UNCONFIRMED which trigger starts it). Start order: what renewal needs first.
BOOT_STARTED = ("TermService",)
START_ORDER = ("CryptSvc", "KeyIso", "CertPropSvc", "TermService", "SessionEnv", "UmRdpService")

_QUOTES = "'\u2018\u2019\u201a\u201b"  # PowerShell treats all five as single quotes
_UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


class WinRebootSourceError(Exception):
    """The installed win_reboot plugin's source does not have the shape this recogniser was written against."""


@dataclass(frozen=True)
class WinRebootScripts:
    """Everything win_reboot sends, as read from its source."""

    source: Path
    command_prefix: str  # "PowerShell ... -EncodedCommand " (then the base64)
    rc_suffix: str  # appended to every script before encoding
    boot_time_command: str
    autologon_checked_key: str
    reboot_template: str  # four %s: test-command flag, AutoLogonChecked key, delay, quoted message
    reboot_pattern: re.Pattern[str]
    test_pattern: re.Pattern[str]
    abort_command: str


@dataclass(frozen=True)
class RebootRequest:
    """The parameters of one reboot script."""

    remove_autologon_checked_key: bool
    delay_seconds: int
    message: str


@dataclass(frozen=True)
class Decoded:
    """A win_reboot command recognised: which one, and the reboot parameters when it is the reboot script."""

    kind: str  # boot_time | reboot | abort | test
    reboot: RebootRequest | None = None


# -- reading the plugin's source ---------------------------------------------------------------------------------


def _module_constants(tree: ast.Module) -> dict[str, str]:
    found: dict[str, str] = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            found[node.targets[0].id] = node.value.value
    return found


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise WinRebootSourceError(f"function {name}() not found")


def _assignment(function: ast.FunctionDef, target: str, kind: type[ast.expr] = ast.expr) -> ast.expr:
    """The value of the first ``target = <kind>`` in the function (nested blocks included)."""
    for node in ast.walk(function):
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == target
            and isinstance(node.value, kind)
        ):
            return node.value
    raise WinRebootSourceError(f"{function.name}() no longer assigns {target}")


def _fstring_pattern(node: ast.expr, holes: dict[str, str], where: str) -> str:
    """A regular expression for an f-string: literal parts escaped, each ``{expr}`` replaced by ``holes[expr]``."""
    if not isinstance(node, ast.JoinedStr):
        raise WinRebootSourceError(f"{where} is no longer an f-string")
    parts: list[str] = []
    for value in node.values:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            parts.append(re.escape(value.value))
        elif isinstance(value, ast.FormattedValue) and value.conversion == -1 and value.format_spec is None:
            expression = ast.unparse(value.value)
            if expression not in holes:
                raise WinRebootSourceError(f"{where} now interpolates {expression!r}")
            parts.append(holes[expression])
        else:
            raise WinRebootSourceError(f"{where} uses a formatting this recogniser does not know")
    return "".join(parts)


def _constant_str(node: ast.expr, where: str) -> str:
    if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
        raise WinRebootSourceError(f"{where} is no longer a string literal")
    return node.value


def read_scripts(source: Path) -> WinRebootScripts:
    """Read win_reboot's commands from ``plugin_utils/_reboot.py``; WinRebootSourceError when its shape changed."""
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
    except (OSError, SyntaxError, UnicodeDecodeError) as exc:
        raise WinRebootSourceError(f"cannot read {source}: {exc}") from exc
    constants = _module_constants(tree)
    try:
        autologon_checked_key = constants["_LOGON_UI_KEY"]
        boot_time_command = constants["_DEFAULT_BOOT_TIME_COMMAND"]
    except KeyError as exc:
        raise WinRebootSourceError(f"module constant {exc} not found") from exc

    # _execute_command: pwsh_script = command + "<suffix>"; encoded as UTF-16LE base64; f"<prefix>{encoded_command}".
    execute = _function(tree, "_execute_command")
    script = _assignment(execute, "pwsh_script")
    if not (isinstance(script, ast.BinOp) and isinstance(script.op, ast.Add) and ast.unparse(script.left) == "command"):
        raise WinRebootSourceError("_execute_command() no longer appends a suffix to the command")
    rc_suffix = _constant_str(script.right, "the exit-code suffix")
    encoding = ast.unparse(_assignment(execute, "encoded_command"))
    if encoding != "base64.b64encode(pwsh_script.encode('utf-16-le')).decode()":
        raise WinRebootSourceError(f"_execute_command() now encodes the script as {encoding}")
    wrapper = _assignment(execute, "command")
    if not (
        isinstance(wrapper, ast.JoinedStr)
        and len(wrapper.values) == 2
        and isinstance(wrapper.values[1], ast.FormattedValue)
        and ast.unparse(wrapper.values[1].value) == "encoded_command"
    ):
        raise WinRebootSourceError("_execute_command() no longer builds 'PowerShell ... -EncodedCommand {encoded}'")
    command_prefix = _constant_str(wrapper.values[0], "the PowerShell command line")

    # reboot_host: reboot_command = r"""...""" % (str(not test_command), _LOGON_UI_KEY, int(delay), quote_pwsh(msg)).
    reboot_host = _function(tree, "reboot_host")
    reboot = _assignment(reboot_host, "reboot_command")
    if not (isinstance(reboot, ast.BinOp) and isinstance(reboot.op, ast.Mod) and isinstance(reboot.right, ast.Tuple)):
        raise WinRebootSourceError("reboot_host() no longer %-formats the reboot script")
    reboot_template = _constant_str(reboot.left, "the reboot script")
    arguments = [ast.unparse(item) for item in reboot.right.elts]
    expected = ["str(not test_command)", "_LOGON_UI_KEY", "int(pre_reboot_delay)", "quote_pwsh(msg)"]
    if arguments != expected or reboot_template.count("%") != 4 or reboot_template.count("%s") != 4:
        raise WinRebootSourceError(f"the reboot script's parameters changed: {', '.join(arguments)}")
    literal, flag_hole, key_hole, delay_hole, message_hole = reboot_template.split("%s")
    reboot_pattern = re.compile(
        re.escape(literal)
        + "(True|False)"
        + re.escape(flag_hole)
        + re.escape(autologon_checked_key)
        + re.escape(key_hole)
        + "([0-9]+)"
        + re.escape(delay_hole)
        + f"([{_QUOTES}].*[{_QUOTES}])"
        + re.escape(message_hole),
        re.DOTALL,
    )

    # The default test command and the random marker it echoes.
    marker = _fstring_pattern(
        # It is first set to None (a user-defined test command has no expected output), then to the f-string.
        _assignment(reboot_host, "expected_test_result", ast.JoinedStr),
        {"uuid.uuid4()": _UUID4},
        "expected_test_result",
    )
    test_pattern = re.compile(
        _fstring_pattern(
            _assignment(reboot_host, "test_command", ast.JoinedStr),
            {"_LOGON_UI_KEY": re.escape(autologon_checked_key), "expected_test_result": f"({marker})"},
            "the post-reboot test command",
        )
    )

    aborts = [
        node.value
        for node in ast.walk(_function(tree, "_perform_reboot"))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "shutdown.exe /a" in node.value
    ]
    if len(aborts) != 1:
        raise WinRebootSourceError("_perform_reboot() no longer sends exactly one 'shutdown.exe /a'")
    return WinRebootScripts(
        source=source,
        command_prefix=command_prefix,
        rc_suffix=rc_suffix,
        boot_time_command=boot_time_command,
        autologon_checked_key=autologon_checked_key,
        reboot_template=reboot_template,
        reboot_pattern=reboot_pattern,
        test_pattern=test_pattern,
        abort_command=aborts[0],
    )


def installed_source() -> Path:
    """Where the installed ansible.windows keeps ``plugin_utils/_reboot.py`` (found without importing it)."""
    try:
        spec = importlib.util.find_spec(WIN_REBOOT_MODULE)
    except (ImportError, ValueError) as exc:
        raise WinRebootSourceError(f"ansible.windows is not installed: {exc}") from exc
    if spec is None or spec.origin is None:
        raise WinRebootSourceError("ansible.windows is not installed (no plugin_utils/_reboot.py)")
    return Path(spec.origin)


def _load_installed() -> WinRebootScripts | WinRebootSourceError:
    try:
        return read_scripts(installed_source())
    except WinRebootSourceError as exc:
        return exc


# -- decoding a command line -------------------------------------------------------------------------------------


def _unquote_pwsh(quoted: str) -> str | None:
    """The text of a single-quoted PowerShell string as quote_pwsh writes it (each quote doubled), or None."""
    if len(quoted) < 2 or quoted[0] != "'" or quoted[-1] != "'":
        return None
    inner, text, index = quoted[1:-1], [], 0
    while index < len(inner):
        char = inner[index]
        if char in _QUOTES:
            if index + 1 >= len(inner) or inner[index + 1] != char:
                return None  # a lone quote would end the string early: not what quote_pwsh produces
            index += 1
        text.append(char)
        index += 1
    return "".join(text)


def decode(scripts: WinRebootScripts, command_line: str) -> Decoded | None:
    """Which win_reboot command the command line is, or None when it is none of them, byte for byte."""
    if not command_line.startswith(scripts.command_prefix):
        return None
    encoded = command_line[len(scripts.command_prefix) :]
    try:
        script = base64.b64decode(encoded, validate=True).decode("utf-16-le")
    except (binascii.Error, UnicodeDecodeError):
        return None
    # Only the canonical encoding of the text counts (no padding games, no BOM, nothing appended).
    if not encoded or base64.b64encode(script.encode("utf-16-le")).decode("ascii") != encoded:
        return None
    if not script.endswith(scripts.rc_suffix):
        return None
    command = script[: -len(scripts.rc_suffix)]
    if command == scripts.boot_time_command:
        return Decoded("boot_time")
    if command == scripts.abort_command:
        return Decoded("abort")
    if scripts.test_pattern.fullmatch(command):
        return Decoded("test")
    match = scripts.reboot_pattern.fullmatch(command)
    if match is None:
        return None
    flag, delay, quoted = match.groups()
    message = _unquote_pwsh(quoted)
    if message is None or command != scripts.reboot_template % (flag, scripts.autologon_checked_key, delay, quoted):
        return None
    if str(int(delay)) != delay:
        return None  # int() formatting never writes leading zeros
    return Decoded("reboot", RebootRequest(flag == "True", int(delay), message))


# -- the host side -----------------------------------------------------------------------------------------------


@dataclass
class _Pending:
    timer: threading.Timer
    request: RebootRequest
    autologon_checked_key: str


_PENDING: weakref.WeakKeyDictionary[WindowsHost, _Pending] = weakref.WeakKeyDictionary()
_PENDING_LOCK = threading.Lock()


def pending(host: WindowsHost) -> RebootRequest | None:
    """The scheduled restart that has not happened yet, if any."""
    with _PENDING_LOCK:
        found = _PENDING.get(host)
    return found.request if found else None


def complete_pending(host: WindowsHost) -> bool:
    """Restart now if a restart is scheduled (tests that do not want to wait); False when none is."""
    with _PENDING_LOCK:
        found = _PENDING.pop(host, None)
    if found is None:
        return False
    found.timer.cancel()
    restart(host, found.autologon_checked_key)
    return True


def filetime(moment: datetime) -> int:
    delta = moment - FILETIME_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 10_000_000 + delta.microseconds * 10


def restart(host: WindowsHost, autologon_checked_key: str | None = None) -> None:
    """The restart itself: what the host is like once it is back.

    Every service stops (TermService's stop ends every remote session), Schannel latches the registry's protocols and
    cipher suites, the boot time becomes now, then services start again: those that ran before, the automatic ones
    and TermService, never a disabled one; starting SessionEnv/TermService renews an expired self-signed certificate
    as it does at any start. LogonUI then shows the logon screen and creates the volatile AutoLogonChecked key.
    """
    if autologon_checked_key is None and isinstance(SCRIPTS, WinRebootScripts):
        autologon_checked_key = SCRIPTS.autologon_checked_key
    with host.lock:
        shutdown_at = host.clock()
        host.events.write(
            EVENTLOG, 6006, level="Information", time=shutdown_at, message="The Event log service was stopped."
        )
        services = list(host.services.services.values())
        was_running = {service.name for service in services if service.status == "Running"}
        for service in services:
            host.stop_service(service.name)
        host.sessions.drop_user_sessions()
        schannel.reboot(host)
        host.system.boot_time = host.clock()
        order = {name.casefold(): index for index, name in enumerate(START_ORDER)}
        for service in sorted(services, key=lambda item: order.get(item.name.casefold(), len(order))):
            wanted = service.name in was_running or service.start_type == "Automatic" or service.name in BOOT_STARTED
            if wanted and service.start_type != "Disabled":
                host.start_service(service.name)
        if autologon_checked_key is not None:
            host.registry.create_key(autologon_checked_key)
        host.events.write(
            EVENTLOG,
            6005,
            level="Information",
            time=host.system.boot_time,
            message="The Event log service was started.",
        )


def _restart_when_due(host: WindowsHost) -> None:
    with _PENDING_LOCK:
        found = _PENDING.pop(host, None)
    if found is not None:
        restart(host, found.autologon_checked_key)


def _outcome(rc: int, stdout: str = "", stderr: str = "") -> CommandOutcome:
    from rdplab.bootstrap import CommandOutcome

    return CommandOutcome(rc=rc, stdout=stdout.encode("utf-8"), stderr=stderr.encode("utf-8"))


def _shutdown_json(rc: int, stderr: str = "") -> str:
    # ConvertTo-Json -Compress of the script's hashtable; Write-Output ends the line the Windows way.
    return json.dumps({"stdout": "", "stderr": stderr, "rc": rc}, separators=(",", ":")) + "\r\n"


def _schedule(scripts: WinRebootScripts, host: WindowsHost, request: RebootRequest) -> CommandOutcome:
    with host.lock:
        if request.remove_autologon_checked_key:
            # Remove-Item -Force on a key without subkeys (AutoLogonChecked has none).
            host.registry.keys.pop(canonical_path(scripts.autologon_checked_key).casefold(), None)
        with _PENDING_LOCK:
            if host in _PENDING:
                return _outcome(0, _shutdown_json(ERROR_SHUTDOWN_IN_PROGRESS, SHUTDOWN_IN_PROGRESS_TEXT))
            timer = threading.Timer(request.delay_seconds, _restart_when_due, args=(host,))
            timer.daemon = True
            _PENDING[host] = _Pending(timer, request, scripts.autologon_checked_key)
        computer = host.system.hostname
        host.events.write(
            USER32,
            1074,
            level="Information",
            time=host.clock(),
            message=(
                f"The process C:\\Windows\\System32\\shutdown.exe ({computer}) has initiated the restart of computer "
                f"{computer} on behalf of user {computer}\\{host.username} for the following reason: No title for "
                "this reason could be found\r\n Reason Code: 0x800000ff\r\n Shutdown Type: restart\r\n Comment: "
                f"{request.message}"
            ),
            data={"process": "C:\\Windows\\System32\\shutdown.exe", "type": "restart", "comment": request.message},
        )
        host.counters.writes += 1
    timer.start()
    return _outcome(0, _shutdown_json(0))


def _abort(host: WindowsHost) -> CommandOutcome:
    with _PENDING_LOCK:
        found = _PENDING.pop(host, None)
    if found is None:
        # The rc suffix exits with shutdown.exe's code when it fails.
        return _outcome(ERROR_NO_SHUTDOWN_IN_PROGRESS, stderr=NO_SHUTDOWN_TEXT + "\r\n")
    found.timer.cancel()
    with host.lock:
        host.counters.writes += 1
    return _outcome(0)


def _boot_time(host: WindowsHost) -> CommandOutcome:
    with host.lock:
        return _outcome(0, f"{filetime(host.system.boot_time)}\r\n")


def _test(scripts: WinRebootScripts, host: WindowsHost, command: str) -> CommandOutcome:
    match = scripts.test_pattern.fullmatch(command)
    marker = match.group(1) if match else ""
    path = canonical_path(scripts.autologon_checked_key)
    with host.lock:
        present = host.registry.key(path) is not None
    if not present:
        return _outcome(
            1,
            stderr=(
                f"Get-Item : Cannot find path '{scripts.autologon_checked_key}' because it does not exist.\r\n"
                f"    + CategoryInfo          : ObjectNotFound: ({scripts.autologon_checked_key}:String) [Get-Item], "
                "ItemNotFoundException\r\n"
            ),
        )
    parent, _backslash, leaf = path.rpartition("\\")
    hive = parent.replace("HKLM:", "HKEY_LOCAL_MACHINE", 1)
    listing = f"\r\n\r\n    Hive: {hive}\r\n\r\n\r\n{'Name':<31}Property\r\n{'----':<31}--------\r\n{leaf}\r\n\r\n\r\n"
    return _outcome(0, listing + marker + "\r\n")


class WinReboot:
    """The commands of ansible.windows.win_reboot (the installed version's exact texts)."""

    name = "ansible.windows.win_reboot"

    def __init__(self, scripts: WinRebootScripts | WinRebootSourceError | None = None) -> None:
        # None: the installed plugin, read at import time (SCRIPTS).
        self._scripts = scripts

    @property
    def scripts(self) -> WinRebootScripts | WinRebootSourceError:
        return SCRIPTS if self._scripts is None else self._scripts

    def _require(self, command_line: str) -> WinRebootScripts | None:
        scripts = self.scripts
        if isinstance(scripts, WinRebootScripts):
            return scripts
        if command_line.startswith("PowerShell "):
            from rdplab.bootstrap import RecogniserUnavailable

            # Only a PowerShell command could have been win_reboot's: say why it cannot be recognised.
            raise RecogniserUnavailable(f"the installed win_reboot plugin cannot be read: {scripts}")
        return None

    def matches(self, command_line: str) -> bool:
        scripts = self._require(command_line)
        return scripts is not None and decode(scripts, command_line) is not None

    def wants_stdin(self) -> bool:
        # win_reboot sends no input; the command runs as soon as it arrives, as a real process would.
        return False

    def run(self, host: WindowsHost, command_line: str, stdin: bytes) -> CommandOutcome:
        scripts = self._require(command_line)
        decoded = decode(scripts, command_line) if scripts is not None else None
        if scripts is None or decoded is None:
            return _outcome(1, stderr="rdplab: not a win_reboot command\r\n")
        if decoded.kind == "boot_time":
            return _boot_time(host)
        if decoded.kind == "abort":
            return _abort(host)
        if decoded.kind == "test":
            script = base64.b64decode(command_line[len(scripts.command_prefix) :]).decode("utf-16-le")
            return _test(scripts, host, script[: -len(scripts.rc_suffix)])
        assert decoded.reboot is not None
        return _schedule(scripts, host, decoded.reboot)


SCRIPTS: WinRebootScripts | WinRebootSourceError = _load_installed()
