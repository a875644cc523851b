"""Decide what a command received over WinRM may do on a simulated host.

The lab executes nothing but what the collection really sends. A command is run only when a *recogniser* claims it:
today the rdpfix agent bootstrap (the exact command line of ``_agent.bootstrap_command()`` with the batch and the exact
agent script on stdin). Everything else is refused with exit code 1 and a message on stderr, so that a command the lab
does not model can never look like it succeeded. Further recognisers (the fixed commands ansible.windows.win_reboot
sends, for instance) are added to ``RECOGNISERS``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import threading
import typing as t
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from rdplab.ops.services import CommandHangs
from rdplab.reboot import WinReboot

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost

REFUSAL = (
    "rdplab: this simulated Windows host only runs the rdpfix agent (the exact bootstrap command line with the batch "
    "and the unmodified plugins/plugin_utils/_agent.ps1 on stdin); refused: {reason}\r\n"
)

COLLECTION_ROOT_ENV = "RDPLAB_COLLECTION_ROOT"


@dataclass(frozen=True)
class CommandOutcome:
    """What the simulated process returns: exit code and raw output streams."""

    rc: int
    stdout: bytes
    stderr: bytes


def refusal(reason: str) -> CommandOutcome:
    return CommandOutcome(rc=1, stdout=b"", stderr=REFUSAL.format(reason=reason).encode("utf-8"))


def collection_root() -> Path:
    """The collection checkout whose agent the lab accepts (this package lives in <root>/tests/lab/rdplab)."""
    override = os.environ.get(COLLECTION_ROOT_ENV)
    if override:
        return Path(override).resolve()
    return Path(__file__).resolve().parents[3]


class _AgentSource:
    """The collection's ``_agent.py`` and ``_agent.ps1``, re-read whenever they change on disk.

    Both files are edited while the lab runs (and tests point the lab at other checkouts), so neither the bootstrap
    command line nor the script hash is fixed at import time: they are cached by path, modification time and size.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._module_key: tuple[str, int, int] | None = None
        self._module: ModuleType | None = None
        self._script_key: tuple[str, int, int] | None = None
        self._script_digest: bytes | None = None

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int]:
        info = path.stat()
        return (str(path), info.st_mtime_ns, info.st_size)

    def module(self) -> ModuleType:
        path = collection_root() / "plugins" / "plugin_utils" / "_agent.py"
        with self._lock:
            key = self._key(path)
            if self._module is None or key != self._module_key:
                spec = importlib.util.spec_from_file_location("rdplab._collection_agent", path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load the agent runner from {path}")
                module = importlib.util.module_from_spec(spec)
                # dataclasses resolve their module through sys.modules while the class body executes.
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
                self._module, self._module_key = module, key
            return self._module

    def bootstrap_command(self) -> str:
        return str(self.module().bootstrap_command())

    def script_digest(self) -> bytes:
        """SHA-256 of the agent script exactly as the controller sends it.

        The controller reads _agent.ps1 as UTF-8 text (universal newlines) and sends it UTF-8 encoded, so that
        is what is hashed here; any other byte on the wire is a different script.
        """
        path = collection_root() / "plugins" / "plugin_utils" / "_agent.ps1"
        with self._lock:
            key = self._key(path)
            if self._script_digest is None or key != self._script_key:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
                self._script_digest = hashlib.sha256(text.encode("utf-8")).digest()
                self._script_key = key
            return self._script_digest


AGENT_SOURCE = _AgentSource()


class Recogniser(t.Protocol):
    """One kind of command the lab knows how to emulate."""

    name: str

    def matches(self, command_line: str) -> bool:
        """Whether this recogniser claims the command line (decided when the Command arrives)."""

    def wants_stdin(self) -> bool:
        """True: run once stdin is closed (End="true"); False: run as soon as the command starts."""

    def run(self, host: WindowsHost, command_line: str, stdin: bytes) -> CommandOutcome:
        """Emulate the command on the host."""


class AgentBootstrap:
    """The rdpfix agent: bootstrap command line, stdin = batch JSON line + agent script."""

    name = "rdpfix-agent"

    def matches(self, command_line: str) -> bool:
        try:
            return command_line == AGENT_SOURCE.bootstrap_command()
        except (OSError, ImportError) as exc:
            # No collection to compare with: nothing can match, and the refusal must say why.
            raise RecogniserUnavailable(f"the collection's agent runner cannot be loaded: {exc}") from exc

    def wants_stdin(self) -> bool:
        return True

    def run(self, host: WindowsHost, command_line: str, stdin: bytes) -> CommandOutcome:
        split = stdin.find(b"\n")
        if split < 0:
            return refusal("stdin is not '<batch JSON line>\\n<agent script>'")
        batch_line, script = stdin[:split], stdin[split + 1 :]
        try:
            expected = AGENT_SOURCE.script_digest()
        except OSError as exc:
            return refusal(f"the collection's agent script cannot be read: {exc}")
        if hashlib.sha256(script).digest() != expected:
            return refusal("the agent script on stdin differs from the collection's _agent.ps1")
        try:
            batch = json.loads(batch_line.decode("utf-8"))
        except ValueError as exc:
            return refusal(f"the batch line is not JSON: {exc}")
        if not isinstance(batch, dict):
            return refusal("the batch line is not a JSON object")
        try:
            with host.lock:
                document = host.run_batch(batch)
        except CommandHangs as exc:
            # On Windows the command would never return: the controller's WinRM operation times out with no result
            # document. The lab ends it at once (no stdout, rc 1) and says why, rather than hold the shell.
            message = f"rdplab: the agent hangs and this WinRM command would never return a result: {exc}\r\n"
            return CommandOutcome(rc=1, stdout=b"", stderr=message.encode("utf-8"))
        except ValueError as exc:
            # BatchError: the real agent stops without a result document and a non-zero exit.
            message = f"rdpfix agent: invalid batch: {exc}\r\n"
            return CommandOutcome(rc=1, stdout=b"", stderr=message.encode("utf-8"))
        # Write-Output of one string: one line, terminated the Windows way.
        body = json.dumps(document, separators=(",", ":"), ensure_ascii=False) + "\r\n"
        return CommandOutcome(rc=0, stdout=body.encode("utf-8"), stderr=b"")


class RecogniserUnavailable(Exception):
    """A recogniser cannot decide (its reference files are missing)."""


RECOGNISERS: list[Recogniser] = [AgentBootstrap(), WinReboot()]


def command_line_of(command: str, arguments: t.Sequence[str]) -> str:
    """Reassemble what the client meant to run: WinRM carries the program and its arguments separately."""
    return " ".join([command, *arguments]) if arguments else command


def recognise(command_line: str) -> Recogniser | CommandOutcome:
    """The recogniser that claims the command line, or the refusal to return at once."""
    problems: list[str] = []
    for recogniser in RECOGNISERS:
        try:
            if recogniser.matches(command_line):
                return recogniser
        except RecogniserUnavailable as exc:
            problems.append(str(exc))
    shown = command_line if len(command_line) <= 120 else command_line[:117] + "..."
    reason = f"command line {shown!r} is not the agent bootstrap"
    if problems:
        reason += " (" + "; ".join(problems) + ")"
    return refusal(reason)


def execute(host: WindowsHost, command_line: str, stdin: bytes) -> CommandOutcome:
    """Recognise and run in one step (used when stdin is already complete)."""
    found = recognise(command_line)
    if isinstance(found, CommandOutcome):
        return found
    return run_safely(found, host, command_line, stdin)


def run_safely(recogniser: Recogniser, host: WindowsHost, command_line: str, stdin: bytes) -> CommandOutcome:
    """Run a recogniser; a bug in the lab becomes a failed command with its message, not a dead connection."""
    try:
        return recogniser.run(host, command_line, stdin)
    except Exception as exc:
        message = f"rdplab: internal error while emulating {recogniser.name}: {type(exc).__name__}: {exc}\r\n"
        return CommandOutcome(rc=1, stdout=b"", stderr=message.encode("utf-8"))
