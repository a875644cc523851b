"""The Run Command scripts and their answers (plugins/plugin_utils/_run_command.py): rendered, recognised, parsed.

No PowerShell runs here: the scripts are checked for syntax and the agent's Windows PowerShell 5.1 pitfalls with the
same tree-sitter grammar as the agent; what they print is checked through the lab's emulation (tests/lab/tests/
test_arm.py). These tests pin the format both sides agree on.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import random
import sys
from pathlib import Path

import pytest

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _run_command as rc

pytestmark = pytest.mark.azure

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "scripts"))
import ps_pitfalls  # noqa: E402

RUN_ID = "0123456789abcdef"
COMMAND = "PowerShell -NoProfile -NonInteractive -ExecutionPolicy Unrestricted -EncodedCommand SQBFAFgA"
STDIN = b'{"batch": 1}\n\x00\x00\x00\x00\nline \xc3\xa9\n'
# Output gzip cannot shrink: 10,000 bytes give a result of several chunks.
NOISE = random.Random(7).randbytes(10_000)


@pytest.mark.parametrize(
    "script",
    [
        rc.exec_script(RUN_ID, COMMAND, STDIN),
        rc.chunk_script(RUN_ID, 2),
        rc.put_file_script("C:\\ProgramData\\x é.txt"),
        rc.fetch_file_script("C:\\ProgramData\\x é.txt"),
    ],
)
def test_the_scripts_parse_and_have_no_powershell_pitfalls(script: str) -> None:
    root = ps_pitfalls.parse(script.encode("utf-8"))
    assert not [node for node in ps_pitfalls._walk(root) if node.type == "ERROR" or node.is_missing]
    assert ps_pitfalls.check(script.encode("utf-8")) == []


def test_an_exec_script_carries_the_command_line_and_stdin_exactly() -> None:
    lines = rc.script_lines(rc.exec_script(RUN_ID, COMMAND, STDIN))
    assert rc.parse_script(lines) == rc.ExecRequest(RUN_ID, COMMAND, STDIN, rc.CHUNK)
    # Nothing else of the script varies: the same input renders the same script (gzip without a timestamp).
    assert rc.exec_script(RUN_ID, COMMAND, STDIN) == "\n".join(lines)


def test_a_chunk_script_is_recognised() -> None:
    assert rc.parse_script(rc.script_lines(rc.chunk_script(RUN_ID, 5))) == rc.ChunkRequest(RUN_ID, 5, rc.CHUNK)


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.replace("Optimal", "Fastest"),
        lambda s: s + "Remove-Item C:\\\n",
        lambda s: "Write-Output hello\n" + s.replace("$ErrorActionPreference = 'Stop'\n", ""),
        lambda s: "Write-Output hello",
    ],
)
def test_any_other_script_is_not_recognised(change: object) -> None:
    script = rc.exec_script(RUN_ID, COMMAND, STDIN)
    assert rc.parse_script(rc.script_lines(change(script))) is None  # type: ignore[operator]


def test_run_ids_are_checked() -> None:
    with pytest.raises(ValueError, match="16 lowercase hex digits"):
        rc.exec_script("'; Remove-Item C:\\ #", COMMAND, STDIN)


def blob_of(rc_: int, stdout: bytes, stderr: bytes) -> str:
    return rc.encode_result(rc_, stdout, stderr)


def test_results_round_trip_through_chunks() -> None:
    stdout = NOISE
    blob = blob_of(3, stdout, b"err\r\n")
    count = rc.chunk_count(blob)
    assert count > 2
    chunks = []
    for index in range(count):
        chunk = rc.parse_chunk("noise\r\n" + rc.render_chunk(RUN_ID, blob, index), RUN_ID, index)
        assert chunk is not None
        chunks.append(chunk)
    assert rc.decode_result(chunks) == rc.CommandResult(3, stdout, b"err\r\n")


def test_the_blob_format() -> None:
    blob = blob_of(0, b"out", b"")
    assert gzip.decompress(base64.b64decode(blob)) == b"0 3 0\nout"


def test_a_truncated_or_missing_chunk_is_none_and_a_foreign_one_an_error() -> None:
    blob = blob_of(0, NOISE, b"")
    printed = rc.render_chunk(RUN_ID, blob, 1)
    assert rc.parse_chunk(printed[:-200], RUN_ID, 1) is None  # cut: its length does not match the header
    assert rc.parse_chunk(printed, RUN_ID, 2) is None
    assert rc.parse_chunk("", RUN_ID, 0) is None
    with pytest.raises(rc.RunCommandProtocolError, match="belongs to run"):
        rc.parse_chunk(printed, "fedcba9876543210", 1)


def test_a_reassembled_result_is_checked() -> None:
    blob = blob_of(0, NOISE, b"")
    chunks = [rc.parse_chunk(rc.render_chunk(RUN_ID, blob, i), RUN_ID, i) for i in range(rc.chunk_count(blob))]
    assert all(chunks)
    good = [c for c in chunks if c is not None]
    with pytest.raises(rc.RunCommandProtocolError, match="announced"):
        rc.decode_result(good[:-1])
    swapped = [good[1], good[0], *good[2:]]
    with pytest.raises(rc.RunCommandProtocolError):
        rc.decode_result(swapped)
    digest = hashlib.sha256(b"x").hexdigest()
    forged = [rc.Chunk(RUN_ID, 0, 1, 4, digest, "AAAA")]
    with pytest.raises(rc.RunCommandProtocolError, match="SHA-256"):
        rc.decode_result(forged)


def test_the_output_tail_is_the_last_4096_bytes() -> None:
    text = "é" * 3000  # 6,000 bytes of UTF-8
    assert len(rc.tail(text).encode("utf-8")) <= rc.OUTPUT_LIMIT
    assert text.endswith(rc.tail(text))


def test_file_transfer_scripts_are_recognised_exactly() -> None:
    path = "C:\\Users\\Public\\d'é 中.bin"
    put, fetch = rc.put_file_script(path), rc.fetch_file_script(path)
    assert rc.parse_file_script(put) == rc.FileRequest("put", path)
    assert rc.parse_file_script(fetch) == rc.FileRequest("fetch", path)
    # What the PowerShell shell plugin sends is the script as rendered: no blank line, indentation or final newline.
    assert all(line == line.strip() and line for line in put.split("\n")) and not put.endswith("\n")
    assert rc.parse_file_script(put + "\nRemove-Item C:\\") is None
    assert rc.parse_file_script(put.replace("WriteAllBytes", "AppendAllText")) is None
    assert rc.parse_file_script(rc.exec_script(RUN_ID, COMMAND, STDIN)) is None


def test_put_file_stdin_lines_decode_one_by_one() -> None:
    data = NOISE
    lines = rc.put_file_stdin(data).decode("ascii").splitlines()
    assert len(lines) == -(-len(base64.b64encode(data)) // rc.FILE_LINE) and rc.FILE_LINE % 4 == 0
    assert b"".join(base64.b64decode(line) for line in lines) == data
    assert rc.put_file_stdin(b"") == b""


def test_a_fetched_file_is_checked_against_its_sha256() -> None:
    digest = hashlib.sha256(NOISE).hexdigest()
    printed = f"{digest}\r\n{base64.b64encode(NOISE).decode()}\r\n".encode()
    assert rc.parse_fetched(printed) == NOISE
    assert rc.parse_fetched(f"{hashlib.sha256(b'').hexdigest()}\r\n".encode()) == b""
    with pytest.raises(rc.RunCommandProtocolError, match="does not match"):
        rc.parse_fetched(printed.replace(digest.encode(), hashlib.sha256(b"x").hexdigest().encode()))
    with pytest.raises(rc.RunCommandProtocolError, match="not a fetched file"):
        rc.parse_fetched(b"warning: something\r\n" + printed)
