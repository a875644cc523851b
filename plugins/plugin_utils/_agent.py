# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run batches of agent operations on a Windows host over the task's connection.

One batch is one ``exec_command`` call, that is one command over WinRM, PSRP or SSH (one round trip). What is sent is
built by a *builder* (``_wrapper.ModuleWrapper`` in the action plugins: Ansible's PowerShell module exec wrapper with
the agent as the module and the batch as its argument); this module only sends it and reads the result document.
See docs/agent-protocol.md. It imports nothing from ansible-core but its exception classes.
"""

from __future__ import annotations

import json
import os
import typing as t
from dataclasses import dataclass, field

from ansible.errors import AnsibleConnectionFailure, AnsibleError

PROTOCOL_VERSION = 1

AGENT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_agent.ps1")

READ_OPERATIONS: frozenset[str] = frozenset(
    {
        "system.info",
        "registry.get",
        "listener.get",
        "cert.list",
        "service.get",
        "session.list",
        "file.stat",
        "file.read",
        "dir.list",
        "dir.read_each",
        "util.sleep",
        "dir.stat",
        "events.query",
        "firewall.rules.list",
        "security_products.list",
        "tls.cipher_suites.list",
        "guard",
    }
)

WRITE_OPERATIONS: frozenset[str] = frozenset(
    {
        "registry.set",
        "registry.remove",
        "listener.set_certificate",
        "cert.remove",
        "cert.import",
        "cert.repair_key_link",
        "service.restart",
        "service.start",
        "dir.create",
        "file.write",
        "file.copy",
        "acl.set",
        "file.move",
        "dir.move",
        "firewall.rule.set",
        "firewall.rule.new",
        "firewall.rule.remove",
        "lock.acquire",
        "lock.release",
    }
)

OPERATIONS: frozenset[str] = READ_OPERATIONS | WRITE_OPERATIONS


class AgentError(AnsibleError):
    """The agent itself failed: no result document, a malformed one, or a non-zero exit."""


class AgentContractError(AgentError):
    """An operation's data does not have the shape docs/agent-protocol.md gives it: a defect of the agent (or of
    what Windows returned to it), never coerced into something that looks right."""


def contract_string_list(op: str, field: str, value: object) -> list[str]:
    """A field the protocol types as a list of strings; a scalar (PowerShell's unrolled one-element array) or any
    other shape raises AgentContractError, so that "3389" never becomes ['3', '3', '8', '9']."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AgentContractError(
            f"agent contract: {op} must report {field} as a list of strings, got {type(value).__name__} {value!r:.100}"
        )
    return list(value)


class OperationError(AnsibleError):
    """One operation of a batch failed on the host."""

    def __init__(self, host: str, op: str, error_type: str, message: str) -> None:
        super().__init__(f"{op} failed on {host}: {error_type}: {message}")
        self.host = host
        self.op = op
        self.error_type = error_type
        self.error_message = message


class OutcomeUnknown(AnsibleError):
    """A batch that changes the host was sent, and its answer was lost (dropped connection, read timeout, an HTTP 500
    after the command ran): the host may have applied all, part or none of it.

    Not an AnsibleConnectionFailure: the host was reached, so the task fails (its result, with the manifest id, stays
    in the play's results and reaches ``rescue``) instead of the host silently leaving the play as unreachable. The
    backup manifest the controller chose before sending (``manifest_id`` in ``manifest_dir``) tells, on the host,
    what the batch did (docs/reliability.md).
    """

    def __init__(self, host: str, reason: str, manifest_id: str | None = None, manifest_dir: str | None = None) -> None:
        if manifest_id:
            where = (
                f"backup manifest {manifest_id} ({manifest_dir}) on the host records what this run planned and did"
                if manifest_dir
                else f"backup manifest {manifest_id} on the host records what this run planned and did"
            )
        else:
            where = "this batch writes no backup manifest"
        # Ansible appends the message of the failure this is raised from (the lost answer's cause) after a colon.
        super().__init__(
            f"outcome unknown: changes were sent to {host} and may have been made in full, in part or not at all; "
            f"{where}; run the task again to find out what is left. The answer was lost"
        )
        self.host = host
        self.reason = reason
        self.manifest_id = manifest_id
        self.manifest_dir = manifest_dir


# Exception class names (anywhere in a failure's chain) that mean the request never reached a command on the host:
# the connection or the logon was refused, the name did not resolve, the TCP connect timed out.
_NOT_SENT = frozenset(
    {
        "ConnectionRefusedError",
        "NewConnectionError",
        "NameResolutionError",
        "gaierror",
        "ConnectTimeout",
        "ConnectTimeoutError",
        "InvalidCredentialsError",
        "AnsibleAuthenticationFailure",
        "SSLCertVerificationError",
        # rdpfix.rdp.azure_run_command: Azure refused the Run Command or was not reached; no script ran.
        "RunCommandNotSent",
    }
)
# ... and names that mean the request went out and the answer did not come back.
_SENT = frozenset(
    {
        "ReadTimeout",
        "ReadTimeoutError",
        "RemoteDisconnected",
        "ProtocolError",
        "ChunkedEncodingError",
        "IncompleteRead",
        "ConnectionResetError",
        "BrokenPipeError",
        "WinRMError",
        "WinRMTransportError",
        "WSManFaultError",
        "WinRMOperationTimeoutError",
        # rdpfix.rdp.azure_run_command: the Run Command was accepted; its result was not obtained.
        "RunCommandOutcomeUnknown",
    }
)


def _failure_kinds(exc: BaseException) -> set[str]:
    """ "sent" / "not_sent" for an exception and everything it was raised from or wraps, each judged by its own class
    and bases (a refusal's class is judged a refusal even when it derives from a class that means sent)."""
    kinds: set[str] = set()
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending:
        item = pending.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        names = {cls.__name__ for cls in type(item).__mro__}
        if names & _NOT_SENT:
            kinds.add("not_sent")
        elif names & _SENT:
            kinds.add("sent")
        pending.extend([item.__cause__, item.__context__, getattr(item, "reason", None), *item.args])
    return kinds


def transport_failure(
    host: str, batch: Batch, exc: BaseException, connected_before: bool | None, connected_after: bool | None
) -> AnsibleError:
    """What a failure of the connection while it carried ``batch`` means for the user.

    A batch that only reads changed nothing: the host is unreachable. A batch that writes: unreachable only when the
    request certainly never reached a command (no connection was made, or the failure is a refusal); otherwise the
    outcome is unknown (OutcomeUnknown, naming the batch's manifest).
    """
    kinds = _failure_kinds(exc)
    detail = str(exc) or type(exc).__name__
    never_connected = connected_before is False and connected_after is False
    not_sent = never_connected or ("not_sent" in kinds and "sent" not in kinds)
    if not batch.writes:
        if isinstance(exc, AnsibleError):
            return exc
        return AnsibleConnectionFailure(
            f"failed to run the rdpfix agent on {host} (a batch that only reads: nothing was changed by it)"
        )
    if not_sent:
        return AnsibleConnectionFailure(f"failed to reach {host}: the changes were not sent, nothing was changed")
    return OutcomeUnknown(host, detail, batch.manifest_id, batch.manifest_dir)


@dataclass(frozen=True)
class OpResult:
    """The outcome of one operation of a batch."""

    op: str
    ok: bool
    data: dict[str, t.Any] = field(default_factory=dict)
    skipped: bool = False
    error_type: str | None = None
    error_message: str | None = None

    def raise_for_error(self, host: str) -> None:
        if not self.ok:
            if self.skipped:
                raise OperationError(host, self.op, "Skipped", "not run: an earlier operation of the batch failed")
            raise OperationError(host, self.op, self.error_type or "Failed", self.error_message or "")


@dataclass
class Batch:
    """An ordered list of operations sent to the host in one round trip."""

    on_error: str = "stop"
    ops: list[dict[str, t.Any]] = field(default_factory=list)
    # The backup manifest this batch writes (chosen on the controller before sending): named when its answer is lost.
    manifest_id: str | None = None
    manifest_dir: str | None = None

    def add(self, op: str, **args: t.Any) -> int:
        """Append an operation; returns its index in the batch's results."""
        if op not in OPERATIONS:
            raise ValueError(f"unknown agent operation {op!r}")
        self.ops.append({"op": op, "args": args})
        return len(self.ops) - 1

    def require(self, position: int, data: dict[str, t.Any]) -> int:
        """Require an operation's data to hold ``data`` (compared as a guard's ``subset``): one that ran but did less
        (``cert.remove`` answering ``removed: false``) fails with ``NotDone`` and, with ``on_error: stop``, stops the
        batch there. See docs/agent-protocol.md, "Batch"."""
        self.ops[position]["expect"] = data
        return position

    def add_always(self, op: str, **args: t.Any) -> int:
        """Append an operation that runs even after a failure stopped the batch (a lock's release); the operations
        after it are still skipped. See docs/agent-protocol.md, "Batch"."""
        position = self.add(op, **args)
        self.ops[position]["always"] = True
        return position

    @property
    def writes(self) -> bool:
        return any(item["op"] in WRITE_OPERATIONS for item in self.ops)

    def to_json(self) -> str:
        if self.on_error not in ("stop", "continue"):
            raise ValueError(f"on_error must be 'stop' or 'continue', not {self.on_error!r}")
        return json.dumps({"v": PROTOCOL_VERSION, "on_error": self.on_error, "ops": self.ops}, separators=(",", ":"))


@dataclass(frozen=True)
class BatchResult:
    host: str
    results: list[OpResult]

    def __getitem__(self, index: int) -> OpResult:
        return self.results[index]

    def data(self, index: int) -> dict[str, t.Any]:
        """The data of one operation, raising OperationError when it failed."""
        result = self.results[index]
        result.raise_for_error(self.host)
        return result.data

    @property
    def failures(self) -> list[OpResult]:
        return [r for r in self.results if not r.ok and not r.skipped]

    def raise_for_errors(self) -> None:
        for result in self.results:
            result.raise_for_error(self.host)


class _Connection(t.Protocol):
    def exec_command(
        self, cmd: str, in_data: bytes | None = None, sudoable: bool = True
    ) -> tuple[int, bytes, bytes]: ...


@dataclass(frozen=True)
class WireCommand:
    """What one batch sends: the command line and its standard input."""

    command: str
    stdin: bytes


# Builds the command of one batch (``_wrapper.ModuleWrapper``: Ansible's module exec wrapper carrying the agent).
Builder = t.Callable[[Batch], WireCommand]


def agent_script() -> str:
    with open(AGENT_PATH, encoding="utf-8") as handle:
        return handle.read()


def last_json(output: bytes | str) -> dict[str, t.Any] | None:
    """The last line of a module's output that is a JSON object (None when there is none). PowerShell may print a BOM
    or noise around the document; the agent, Ansible's async wrapper and async_status each write theirs on one line."""
    text = output.decode("utf-8", errors="replace") if isinstance(output, bytes) else output
    for raw_line in reversed(text.splitlines()):
        line = raw_line.strip().lstrip("\ufeff")
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def parse_output(host: str, rc: int, stdout: bytes, stderr: bytes, expected: int) -> BatchResult:
    """Turn the module result on stdout (the agent's document) into a BatchResult, or raise AgentError saying what
    went wrong: no document, a failed module result (the agent's own failure, or the exec wrapper's: a become that was
    refused, for instance), or a document of the wrong shape."""
    text = stdout.decode("utf-8", errors="replace").strip()
    document = last_json(text)
    if document is None:
        detail = stderr.decode("utf-8", errors="replace").strip() or text or "no output"
        raise AgentError(f"the rdpfix agent on {host} returned no result (rc={rc}): {detail[:2000]}")
    if document.get("failed") and "results" not in document:
        message = str(document.get("msg") or "failed without a message")
        detail = stderr.decode("utf-8", errors="replace").strip()
        raise AgentError(
            f"the rdpfix agent on {host} failed (rc={rc}): {message[:2000]}" + (f" [{detail[:500]}]" if detail else "")
        )
    if document.get("v") != PROTOCOL_VERSION or not isinstance(document.get("results"), list):
        raise AgentError(f"the rdpfix agent on {host} returned an unexpected document: {text[:2000]}")
    results: list[OpResult] = []
    for item in document["results"]:
        if not isinstance(item, dict) or not isinstance(item.get("op"), str):
            raise AgentError(f"the rdpfix agent on {host} returned a malformed result: {item!r}")
        error = item.get("error") or {}
        results.append(
            OpResult(
                op=item["op"],
                ok=bool(item.get("ok")),
                data=item.get("data") or {},
                skipped=bool(item.get("skipped")),
                error_type=error.get("type"),
                error_message=error.get("message"),
            )
        )
    if len(results) != expected:
        raise AgentError(f"the rdpfix agent on {host} answered {len(results)} operations of {expected}")
    return BatchResult(host=host, results=results)


# Connection plugins whose ``connected`` says nothing: Ansible's ssh connection runs one OpenSSH process per command
# and never records itself connected, so "never connected" cannot be told from it (a dropped answer after the command
# ran would pass for a request that never left).
_UNTRACKED_TRANSPORTS = frozenset({"ssh"})


def _connected(connection: object) -> bool | None:
    """Whether the connection plugin says it holds a connection (None: it does not track it)."""
    if getattr(connection, "transport", None) in _UNTRACKED_TRANSPORTS:
        return None
    value = getattr(connection, "connected", None)
    return value if isinstance(value, bool) else None


def run_batch(connection: _Connection, host: str, batch: Batch, build: Builder) -> BatchResult:
    """Send one batch over the connection: exactly one exec_command (one round trip), as ``build`` makes it.

    ``sudoable=True``: the task's become (runas) travels inside the payload, as for any Windows module."""
    if not batch.ops:
        return BatchResult(host=host, results=[])
    wire = build(batch)
    connected_before = _connected(connection)
    try:
        rc, stdout, stderr = connection.exec_command(wire.command, in_data=wire.stdin, sudoable=True)
    except Exception as exc:  # the connection's own failures and requests/pywinrm/pypsrp transport errors
        failure = transport_failure(host, batch, exc, connected_before, _connected(connection))
        if failure is exc:
            raise
        raise failure from exc
    answered = parse_output(host, rc, stdout, stderr, expected=len(batch.ops))
    if own_claim_found(batch, answered):
        raise OutcomeUnknown(
            host,
            "the batch found its backup folder already claimed by itself: an earlier execution of this same batch "
            "(a command sent again after its connection dropped) ran, and its answer was lost",
            batch.manifest_id,
            batch.manifest_dir,
        )
    return answered


def own_claim_found(batch: Batch, answered: BatchResult) -> bool:
    """Whether a claim of the batch (dir.create ``claim``) failed on a claim file holding the batch's own claim text
    (or one that could not be read): an earlier execution of this very batch claimed the folder - a command sent again
    after its connection dropped (ssh's reconnection retries, a request re-sent by a client library) - and may have
    made every change. Only a claim with another text (the fence of a run that read the host again) proves that the
    batch changed nothing."""
    for position, item in enumerate(answered.results):
        if item.ok or item.op != "dir.create" or item.error_type != "AlreadyClaimed" or position >= len(batch.ops):
            continue
        own = (batch.ops[position].get("args") or {}).get("claim_text")
        if not own:
            continue
        found = item.data.get("claim_text")
        return found is None or found == own
    return False
