# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Unit tests of the Python side of the agent protocol: batches, output parsing, one exec_command per batch.

What a batch is wrapped in (Ansible's module exec wrapper) is tested in test__wrapper.py."""

from __future__ import annotations

import json
import typing as t

import pytest
from ansible.errors import AnsibleConnectionFailure, AnsibleError
from hypothesis import given
from hypothesis import strategies as st

from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import (
    AgentError,
    Batch,
    OperationError,
    WireCommand,
    parse_output,
    run_batch,
)

HOST = "web01"


def document(*results: dict[str, t.Any], version: int = 1) -> bytes:
    return json.dumps({"v": version, "results": list(results)}).encode("utf-8")


def ok(op: str, **data: t.Any) -> dict[str, t.Any]:
    return {"op": op, "ok": True, "data": data}


class RecordingConnection:
    """Stands in for the winrm connection: records every exec_command and answers with a fixed reply."""

    def __init__(self, reply: tuple[int, bytes, bytes] | None = None, raises: BaseException | None = None) -> None:
        self.reply = reply or (0, b"", b"")
        self.raises = raises
        self.calls: list[tuple[str, bytes | None, bool]] = []

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        self.calls.append((cmd, in_data, sudoable))
        if self.raises is not None:
            raise self.raises
        return self.reply


# --- what run_batch sends -----------------------------------------------------------------------------------------


def fixed_builder(command: str = "PowerShell -EncodedCommand X", stdin: bytes = b"payload") -> t.Any:
    """A builder that records the batches it is given and always builds the same command."""
    built: list[Batch] = []

    def build(batch: Batch) -> WireCommand:
        built.append(batch)
        return WireCommand(command=command, stdin=stdin)

    build.built = built  # type: ignore[attr-defined]
    return build


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.one_of(st.text(), st.integers(), st.booleans(), st.lists(st.text(), max_size=3)),
        max_size=4,
    )
)
def test_batch_line_is_one_ascii_line_whatever_the_arguments(args: dict[str, t.Any]) -> None:
    # Newlines or non-ASCII in arguments (paths, messages) must not split line 1 or depend on the code page.
    batch = Batch()
    batch.add("file.stat", **{"path": "C:\\x"} | {f"a_{key}": value for key, value in args.items()})
    line = batch.to_json()
    assert "\n" not in line and "\r" not in line
    assert line.isascii()
    assert json.loads(line)["ops"][0]["args"] == {"path": "C:\\x"} | {f"a_{key}": value for key, value in args.items()}


# --- Batch --------------------------------------------------------------------------------------------------------


def test_batch_add_returns_result_indexes() -> None:
    batch = Batch()
    assert batch.add("system.info") == 0
    assert batch.add("cert.list", store="My") == 1
    assert [item["op"] for item in batch.ops] == ["system.info", "cert.list"]


def test_batch_add_refuses_unknown_operations() -> None:
    batch = Batch()
    with pytest.raises(ValueError, match=r"unknown agent operation 'registry\.delete'"):
        batch.add("registry.delete", path="HKLM:\\SOFTWARE")
    assert batch.ops == []


def test_batch_knows_whether_it_writes() -> None:
    batch = Batch(on_error="continue")
    batch.add("registry.get", path="HKLM:\\SOFTWARE")
    assert not batch.writes
    batch.add("registry.set", path="HKLM:\\SOFTWARE\\x", name="y", type="REG_DWORD", value=1)
    assert batch.writes


def test_batch_refuses_an_unknown_on_error_mode() -> None:
    batch = Batch(on_error="ignore")
    batch.add("system.info")
    with pytest.raises(ValueError, match="on_error"):
        batch.to_json()


# --- parse_output -------------------------------------------------------------------------------------------------


def test_parse_output_reads_a_good_document() -> None:
    stdout = document(ok("system.info", hostname="WEB01", os_build=20348), ok("cert.list", store="My", exists=True))
    result = parse_output(HOST, 0, stdout, b"", expected=2)
    assert result.host == HOST
    assert result.data(0) == {"hostname": "WEB01", "os_build": 20348}
    assert result[1].op == "cert.list" and result[1].ok
    assert result.failures == []
    result.raise_for_errors()


def test_parse_output_skips_a_bom_and_noise_lines() -> None:
    stdout = b"\xef\xbb\xbfWARNING: something\r\n" + document(ok("util.sleep", slept_ms=5)) + b"\r\n"
    assert parse_output(HOST, 0, stdout, b"", expected=1).data(0) == {"slept_ms": 5}


def test_parse_output_takes_a_document_printed_after_a_bom_on_the_same_line() -> None:
    stdout = b"\xef\xbb\xbf" + document(ok("util.sleep", slept_ms=5))
    assert parse_output(HOST, 0, stdout, b"", expected=1).data(0) == {"slept_ms": 5}


def test_parse_output_without_a_document_raises_agent_error_with_stderr() -> None:
    stderr = b"rdpfix agent: unsupported batch: protocol version 1 expected"
    with pytest.raises(AgentError) as raised:
        parse_output(HOST, 1, b"", stderr, expected=1)
    assert HOST in str(raised.value)
    assert "rc=1" in str(raised.value)
    assert "unsupported batch" in str(raised.value)


def test_parse_output_without_a_document_or_stderr_shows_stdout() -> None:
    with pytest.raises(AgentError, match="The term 'foo' is not recognized"):
        parse_output(HOST, 1, b"The term 'foo' is not recognized", b"", expected=1)


def test_parse_output_refuses_another_protocol_version() -> None:
    with pytest.raises(AgentError, match="unexpected document"):
        parse_output(HOST, 0, document(ok("system.info"), version=2), b"", expected=1)


def test_parse_output_refuses_a_document_without_results() -> None:
    with pytest.raises(AgentError, match="unexpected document"):
        parse_output(HOST, 0, b'{"v": 1, "results": {"op": "system.info"}}', b"", expected=1)


def test_parse_output_refuses_a_malformed_result() -> None:
    with pytest.raises(AgentError, match="malformed result"):
        parse_output(HOST, 0, b'{"v": 1, "results": [{"ok": true}]}', b"", expected=1)


@pytest.mark.parametrize("answered", [0, 1, 3])
def test_parse_output_refuses_a_wrong_number_of_results(answered: int) -> None:
    stdout = document(*[ok("system.info") for _answer in range(answered)])
    with pytest.raises(AgentError, match=f"answered {answered} operations of 2"):
        parse_output(HOST, 0, stdout, b"", expected=2)


def test_operation_error_names_the_operation_and_the_host() -> None:
    failed = {"op": "cert.list", "ok": False, "error": {"type": "AccessDenied", "message": "Access is denied."}}
    result = parse_output(HOST, 0, document(ok("system.info"), failed), b"", expected=2)
    assert result[1].error_type == "AccessDenied"
    assert result.failures == [result[1]]
    with pytest.raises(OperationError) as raised:
        result.data(1)
    error = raised.value
    assert (error.host, error.op, error.error_type, error.error_message) == (
        HOST,
        "cert.list",
        "AccessDenied",
        "Access is denied.",
    )
    assert "cert.list" in str(error) and HOST in str(error)
    # The operations before it are still usable.
    assert result.data(0) == {}


def test_an_error_without_a_type_is_failed() -> None:
    result = parse_output(HOST, 0, document({"op": "service.start", "ok": False}), b"", expected=1)
    with pytest.raises(OperationError) as raised:
        result.raise_for_errors()
    assert raised.value.error_type == "Failed"


def test_skipped_operations_are_not_failures_but_have_no_data() -> None:
    stdout = document(
        ok("file.copy", size=3, sha256="ab"),
        {"op": "registry.set", "ok": False, "error": {"type": "DiskFull", "message": "There is not enough space"}},
        {"op": "service.restart", "ok": False, "skipped": True},
    )
    result = parse_output(HOST, 0, stdout, b"", expected=3)
    assert result[2].skipped and not result[2].ok
    assert [failure.op for failure in result.failures] == ["registry.set"]
    with pytest.raises(OperationError) as raised:
        result.data(2)
    assert raised.value.error_type == "Skipped"
    assert "service.restart" in str(raised.value)
    with pytest.raises(OperationError) as first_error:
        result.raise_for_errors()
    assert first_error.value.op == "registry.set"


# --- run_batch ----------------------------------------------------------------------------------------------------


def test_run_batch_is_one_sudoable_exec_command_of_what_the_builder_made() -> None:
    batch = Batch(on_error="continue")
    batch.add("system.info")
    batch.add("service.get", names=["TermService"])
    stdout = document(ok("system.info", hostname="WEB01"), ok("service.get", services={}))
    connection = RecordingConnection(reply=(0, stdout, b""))
    build = fixed_builder("PowerShell -EncodedCommand QQA=", b"manifest")
    result = run_batch(connection, HOST, batch, build)
    # sudoable=True: become (runas) is part of the payload, as for every Windows module.
    assert connection.calls == [("PowerShell -EncodedCommand QQA=", b"manifest", True)]
    assert build.built == [batch]
    assert result.data(0) == {"hostname": "WEB01"}


def test_run_batch_of_nothing_sends_nothing() -> None:
    connection = RecordingConnection()
    build = fixed_builder()
    assert run_batch(connection, HOST, Batch(), build).results == []
    assert connection.calls == []
    assert build.built == []


def test_a_builder_failure_sends_nothing() -> None:
    batch = Batch()
    batch.add("system.info")
    connection = RecordingConnection()

    def refuse(_batch: Batch) -> WireCommand:
        raise AgentError("Become plugin sudo is not supported by the Windows exec wrapper")

    with pytest.raises(AgentError, match="sudo"):
        run_batch(connection, HOST, batch, refuse)
    assert connection.calls == []


@pytest.mark.parametrize("raw", [ConnectionResetError("reset by peer"), OSError("No route to host"), KeyError("x")])
def test_run_batch_maps_transport_exceptions_to_connection_failures(raw: Exception) -> None:
    batch = Batch()
    batch.add("system.info")
    connection = RecordingConnection(raises=raw)
    with pytest.raises(AnsibleConnectionFailure) as raised:
        run_batch(connection, HOST, batch, fixed_builder())
    assert HOST in str(raised.value)
    assert raised.value.__cause__ is raw
    assert len(connection.calls) == 1


@pytest.mark.parametrize("error", [AnsibleConnectionFailure("winrm: 401"), AnsibleError("winrm: bad shell")])
def test_run_batch_lets_ansible_errors_through_unchanged(error: AnsibleError) -> None:
    batch = Batch()
    batch.add("system.info")
    with pytest.raises(type(error)) as raised:
        run_batch(RecordingConnection(raises=error), HOST, batch, fixed_builder())
    assert raised.value is error


def test_run_batch_reports_an_agent_that_printed_nothing() -> None:
    batch = Batch()
    batch.add("system.info")
    connection = RecordingConnection(reply=(1, b"", b"#< CLIXML\r\n<Objs>At line:1 char:1</Objs>"))
    with pytest.raises(AgentError, match="CLIXML"):
        run_batch(connection, HOST, batch, fixed_builder())


# --- failed module results ----------------------------------------------------------------------------------------


def test_a_failed_module_result_is_an_agent_error_with_its_message() -> None:
    # What Ansible's exec wrapper prints when runas refuses the logon (docs/lab.md, "become").
    stdout = (
        b'{"failed": true, "msg": "failure during exec_wrapper: Exception calling \\"CreateProcessAsUser\\" with '
        b'\\"9\\" argument(s): \\"Failed to logon .\\\\\\\\admin (The user name or password is incorrect, '
        b'Win32ErrorCode 1326 - 0x0000052E)\\""}\r\n'
    )
    with pytest.raises(AgentError) as raised:
        parse_output(HOST, 1, stdout, b"", expected=1)
    assert HOST in str(raised.value)
    assert "Failed to logon" in str(raised.value)
    assert "rc=1" in str(raised.value)


def test_the_agents_own_failure_document_is_an_agent_error() -> None:
    stdout = b'{"failed":true,"msg":"rdpfix agent: unsupported batch: protocol version 1 expected"}\n'
    with pytest.raises(AgentError, match="unsupported batch"):
        parse_output(HOST, 1, stdout, b"", expected=1)
