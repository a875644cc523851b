"""Truthful outcomes: a failure of the connection classified by where it happened, and failure messages that say what
was and was not changed, from the batch's own results."""

from __future__ import annotations

import json
import typing as t

import pytest
import requests
from ansible.errors import AnsibleConnectionFailure, AnsibleError
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError, ReadTimeoutError
from winrm.exceptions import InvalidCredentialsError, WinRMError

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _outcome
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._action import BackupSet
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import (
    PROTOCOL_VERSION,
    Batch,
    BatchResult,
    OpResult,
    OutcomeUnknown,
    WireCommand,
    run_batch,
    transport_failure,
)


def write_batch() -> Batch:
    batch = Batch(on_error="stop")
    backup = BackupSet.create("certificate", "WEB01", "C:\\ProgramData\\rdpfix\\backups")
    backup.begin(batch)
    backup.finish(batch)
    batch.add("cert.remove", store="Remote Desktop", thumbprint="AB" * 20)
    batch.add("service.restart", name="SessionEnv")
    return batch


def read_batch() -> Batch:
    batch = Batch()
    batch.add("system.info")
    return batch


def chained(outer: BaseException, inner: BaseException) -> BaseException:
    """``outer`` raised while handling ``inner``, as the connection plugins raise them."""
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 - the implicit context is the point
    except BaseException as exc:
        return exc


def refused() -> BaseException:
    """What requests raises for a port nothing listens on."""
    connect = NewConnectionError(t.cast(t.Any, None), "Failed to establish a new connection: [Errno 111] refused")
    connect.__cause__ = ConnectionRefusedError(111, "Connection refused")
    return requests.exceptions.ConnectionError(MaxRetryError(t.cast(t.Any, None), "/wsman", connect))


def read_timeout() -> BaseException:
    return requests.exceptions.ReadTimeout(ReadTimeoutError(t.cast(t.Any, None), "/wsman", "Read timed out."))


def dropped() -> BaseException:
    return requests.exceptions.ConnectionError(
        ProtocolError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer"))
    )


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(read_timeout(), id="read-timeout"),
        pytest.param(dropped(), id="connection-dropped"),
        pytest.param(WinRMError("Bad HTTP response returned from server. Code 500"), id="http-500"),
        # Ansible's winrm connection turns a requests Timeout into AnsibleConnectionFailure, raised while handling it.
        pytest.param(chained(AnsibleConnectionFailure("winrm connection error"), read_timeout()), id="ansible-timeout"),
        # ... and a stdin failure whose output held no result into a plain AnsibleError.
        pytest.param(AnsibleError("winrm send_input failed; stdout: "), id="send-input"),
        pytest.param(RuntimeError("something nobody classified"), id="unclassified"),
    ],
)
def test_a_write_batch_whose_answer_was_lost_is_outcome_unknown_with_its_manifest(failure: BaseException) -> None:
    batch = write_batch()
    found = transport_failure("web01", batch, failure, True, True)
    assert isinstance(found, OutcomeUnknown)
    assert not isinstance(found, AnsibleConnectionFailure)
    assert batch.manifest_id and found.manifest_id == batch.manifest_id
    assert batch.manifest_id in found.message and "outcome unknown" in found.message


@pytest.mark.parametrize(
    ("failure", "before", "after"),
    [
        pytest.param(refused(), True, True, id="connection-refused"),
        pytest.param(InvalidCredentialsError("the specified credentials were rejected"), True, True, id="auth"),
        pytest.param(
            chained(
                AnsibleConnectionFailure("winrm connection error"), requests.exceptions.ConnectTimeout("timed out")
            ),
            True,
            True,
            id="connect-timeout",
        ),
        # The connection plugin raised before it ever connected (its own logon failed): nothing was sent.
        pytest.param(AnsibleConnectionFailure("basic: the specified credentials"), False, False, id="never-connected"),
    ],
)
def test_a_failure_before_sending_is_unreachable_and_says_nothing_changed(
    failure: BaseException, before: bool, after: bool
) -> None:
    found = transport_failure("web01", write_batch(), failure, before, after)
    assert isinstance(found, AnsibleConnectionFailure) and not isinstance(found, OutcomeUnknown)
    assert "nothing was changed" in found.message and "not sent" in found.message


def test_a_refusal_seen_with_a_lost_answer_stays_unknown() -> None:
    # Ansible's cleanup (terminate) after a read timeout can itself be refused: the chain holds both, and the read
    # timeout means the command was sent.
    failure = chained(refused(), read_timeout())
    assert isinstance(transport_failure("web01", write_batch(), failure, True, True), OutcomeUnknown)


def test_a_read_batch_failure_is_unreachable_without_claiming_a_manifest() -> None:
    found = transport_failure("web01", read_batch(), read_timeout(), True, True)
    assert isinstance(found, AnsibleConnectionFailure) and not isinstance(found, OutcomeUnknown)
    assert "only reads" in found.message
    other = AnsibleError("a failure of the connection plugin itself")
    assert transport_failure("web01", read_batch(), other, True, True) is other


class FailingConnection:
    connected = True

    def __init__(self, failure: BaseException) -> None:
        self.failure = failure

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        raise self.failure


def test_run_batch_raises_outcome_unknown_chained_to_the_lost_answer() -> None:
    batch = write_batch()
    with pytest.raises(OutcomeUnknown) as raised:
        run_batch(FailingConnection(read_timeout()), "web01", batch, lambda _b: WireCommand("cmd", b""))
    assert isinstance(raised.value.__cause__, requests.exceptions.ReadTimeout)
    assert raised.value.manifest_dir == batch.manifest_dir
    # Ansible appends the cause: the user reads why the answer was lost.
    assert "Read timed out" in raised.value.message


class SshConnection(FailingConnection):
    """As Ansible's ssh connection: one OpenSSH process per command, never recorded as connected."""

    transport = "ssh"
    connected = False


def test_an_ssh_answer_dropped_after_the_command_ran_is_an_unknown_outcome_not_never_connected() -> None:
    # Ansible's ssh connection raises this for an exit status 255 with input sent (the connection closed under it).
    dropped = AnsibleConnectionFailure(
        'Data could not be sent to remote host "web01". Make sure this host can be reached over ssh: '
        "Connection to web01 closed by remote host."
    )
    with pytest.raises(OutcomeUnknown):
        run_batch(SshConnection(dropped), "web01", write_batch(), lambda _b: WireCommand("cmd", b""))
    # A plugin that tracks its connection and never connected: nothing was sent.
    never = FailingConnection(AnsibleConnectionFailure("basic: the specified credentials were rejected"))
    never.connected = False
    with pytest.raises(AnsibleConnectionFailure) as raised:
        run_batch(never, "web01", write_batch(), lambda _b: WireCommand("cmd", b""))
    assert not isinstance(raised.value, OutcomeUnknown)


def results(*oks: bool) -> BatchResult:
    items = []
    stopped = False
    for ok in oks:
        if stopped:
            items.append(OpResult(op="x", ok=False, skipped=True))
            continue
        items.append(OpResult(op="x", ok=ok, error_type=None if ok else "DiskFull", error_message="disk full"))
        stopped = not ok
    return BatchResult("web01", items)


def test_first_change_failed_says_none_of_the_repair_was_made() -> None:
    batch = write_batch()
    backup = t.cast(t.Any, type("B", (), {"manifest_id": batch.manifest_id, "directory": batch.manifest_dir}))
    message = _outcome.failure_message(
        "web01", batch, results(True, True, False, False), failed_at=2, manifest=1, changes=[2, 3], backup=backup
    )
    assert "none of the repair was made" in message and "after part" not in message
    assert "cert.remove" in message and "service.restart SessionEnv" in message
    assert "nothing needs restoring" in message


def test_a_later_change_failed_lists_made_and_not_made() -> None:
    batch = write_batch()
    backup = t.cast(t.Any, type("B", (), {"manifest_id": batch.manifest_id, "directory": batch.manifest_dir}))
    message = _outcome.failure_message(
        "web01", batch, results(True, True, True, False), failed_at=3, manifest=1, changes=[2, 3], backup=backup
    )
    assert "after part of the repair was made" in message
    made, not_made = message.split("Made: ")[1].split(". Not made: ")
    assert "cert.remove" in made and not_made.startswith("service.restart SessionEnv")
    assert f"manifest_id={batch.manifest_id}" in message


def test_backup_failure_says_nothing_was_changed() -> None:
    batch = write_batch()
    backup = t.cast(t.Any, type("B", (), {"manifest_id": batch.manifest_id, "directory": batch.manifest_dir}))
    message = _outcome.failure_message(
        "web01", batch, results(False, False, False, False), failed_at=0, manifest=1, changes=[2, 3], backup=backup
    )
    assert "nothing was changed" in message and "could not be written" in message


class _Unreachable:
    """A connection whose reconnect fails too."""

    connected = True

    def reset(self) -> None:
        raise AnsibleConnectionFailure("connection refused")


def test_a_lost_answer_stays_unknown_with_its_manifest_when_the_host_cannot_be_read_again() -> None:
    batch = write_batch()
    lost = OutcomeUnknown("web01", "Read timed out.", batch.manifest_id, batch.manifest_dir)
    attributes = {"host": "web01", "check_mode": False, "_connection": _Unreachable(), "batch_sender": None}
    action = t.cast(t.Any, type("Action", (), attributes)())
    result = _outcome.resolve(action, {}, lost)
    assert result["failed"] is True and result["outcome"] == "unknown" and result["changed"] is False
    assert result["backup"]["manifest_id"] == batch.manifest_id and batch.manifest_id in result["msg"]
    assert "Reading the host again failed too" in result["msg"] and action.check_mode is False


def test_a_guard_whose_read_failed_is_named_not_reported_as_a_backup_failure() -> None:
    batch = Batch(on_error="stop")
    batch.add("guard", label="no one logged on", read={"op": "sessions.list", "args": {}}, expect=[], match="equal")
    backup = BackupSet.create("certificate", "WEB01", "C:\\ProgramData\\rdpfix\\backups")
    backup.begin(batch)
    manifest = backup.finish(batch)
    batch.add("cert.remove", store="Remote Desktop", thumbprint="AB" * 20)
    applied = BatchResult(
        "web01",
        [
            OpResult(op="guard", ok=False, error_type="AccessDenied", error_message="Access is denied"),
            *(OpResult(op="x", ok=False, skipped=True) for _op in batch.ops[1:]),
        ],
    )
    message = _outcome.failure_message(
        "web01", batch, applied, failed_at=0, manifest=manifest, changes=[manifest + 1], backup=backup
    )
    assert "could not be made: no one logged on" in message and "AccessDenied" in message
    assert "backup could not be written" not in message and "nothing was changed" in message
    # The backup folder claimed by another run first (the run that found this batch's answer lost).
    applied = BatchResult(
        "web01",
        [
            OpResult(op="guard", ok=True),
            OpResult(op="dir.create", ok=False, error_type="AlreadyClaimed", error_message="claimed first"),
            *(OpResult(op="x", ok=False, skipped=True) for _op in batch.ops[2:]),
        ],
    )
    message = _outcome.failure_message(
        "web01", batch, applied, failed_at=1, manifest=manifest, changes=[manifest + 1], backup=backup
    )
    assert "claimed by another run first" in message and "nothing was changed" in message


class AnsweringConnection:
    """Answers the batch as the agent does: its first operation (the backup folder's claim) refused, the claim file
    found holding ``found``."""

    def __init__(self, found: str | None) -> None:
        self.found = found

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        refused = {
            "op": "dir.create",
            "ok": False,
            "error": {"type": "AlreadyClaimed", "message": "claim.txt exists: the folder was claimed first"},
            "data": {"claim_text": self.found},
        }
        skipped = [{"op": "x", "ok": False, "skipped": True}] * (len(write_batch().ops) - 1)
        document = {"v": PROTOCOL_VERSION, "results": [refused, *skipped]}
        return 0, json.dumps(document).encode("utf-8"), b""


def test_a_batch_that_finds_its_own_claim_ran_before_and_its_outcome_is_unknown() -> None:
    # The same batch executed a second time (ssh's reconnection_retries, a re-sent request): the first claimed.
    batch = write_batch()
    own = str(batch.ops[0]["args"]["claim_text"])
    for found in (own, None):  # None: the claim file could not be read
        with pytest.raises(OutcomeUnknown) as raised:
            run_batch(AnsweringConnection(found), "web01", batch, lambda _b: WireCommand("cmd", b""))
        assert raised.value.manifest_id == batch.manifest_id and raised.value.manifest_dir == batch.manifest_dir
    # A folder fenced by a run that read the host again: the batch's own answer, which says nothing was changed.
    fenced = run_batch(AnsweringConnection("fenced: ..."), "web01", batch, lambda _b: WireCommand("cmd", b""))
    assert fenced[0].error_type == "AlreadyClaimed" and fenced[0].data == {"claim_text": "fenced: ..."}


def test_a_lost_batch_that_never_wrote_on_a_host_needing_nothing_is_not_said_to_have_made_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batch = write_batch()
    lost = OutcomeUnknown("web01", "Read timed out.", batch.manifest_id, batch.manifest_dir)
    warnings: list[str] = []
    attributes = {
        "host": "web01",
        "check_mode": False,
        "_connection": object(),
        "batch_sender": None,
        "warn": lambda self, text: warnings.append(text),
        "run_task": lambda self, params: {"changed": False},
    }
    action = t.cast(t.Any, type("Action", (), attributes)())
    monkeypatch.setattr(_outcome, "fence", lambda action, lost: False)  # this run claimed the folder
    result = _outcome.resolve(action, {}, lost)
    assert result["outcome"] == "not_needed" and result["changed"] is False
    assert len(warnings) == 1 and "shows them made" not in warnings[0], warnings
    assert "the host already is as planned; the lost batch made none of it" in warnings[0]
