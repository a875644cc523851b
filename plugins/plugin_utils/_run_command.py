# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the azure_run_command connection sends through Azure Run Command, and how it reads the answer back.

Run Command (RunPowerShellScript) takes a script and returns only the last 4,096 bytes of its output, with no exit
code and no standard input. So one ``exec_command(cmd, in_data)`` becomes:

1. an *exec script*: the command line and the gzip-compressed stdin embedded as base64 literals; on the VM it starts
   the command line as a process (powershell.exe directly, anything else through cmd.exe /c), writes stdin to it,
   and frames exit code, stdout and stderr as one gzip-compressed base64 *result blob*. A blob of at most ``CHUNK``
   characters is printed whole; a larger one is saved to a file under %SystemRoot%\\Temp and its first chunk printed;
2. when needed, *chunk scripts*: each prints one further chunk of the saved blob; the last one deletes the file.

Every printed chunk carries the run id, its index, the chunk count, the blob's length and its SHA-256, so a chunk
from another run, a truncated answer or a reassembly error is detected, never parsed as a result.

Pure functions, no Azure import: the lab renders and recognises the same scripts (docs/azure.md, docs/lab.md).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re
import typing as t
from dataclasses import dataclass

# Run Command returns the last 4,096 bytes of the output; a chunk line plus its header stays well below that.
OUTPUT_LIMIT = 4096
CHUNK = 3800
HEADER = "RDPFIX-RC1"
RUN_ID = re.compile(r"^[0-9a-f]{16}$")
# A saved result file older than this is removed by the next exec script (one whose last chunk arrived on stderr).
STALE_MINUTES = 15

# Ansible's PowerShell prefix: such a command line runs powershell.exe itself; others run through cmd.exe /c.
POWERSHELL_PROGRAM = "PowerShell"

# A function both scripts define: print one chunk (header line, then the data) on stdout or on stderr.
_PRINT_CHUNK = """\
function Write-RdpfixChunk([string]$Blob, [int]$Index, [string]$Hex, [bool]$ToError) {{
    $count = [int][Math]::Ceiling($Blob.Length / $rdpfixChunk)
    $start = $Index * $rdpfixChunk
    $data = $Blob.Substring($start, [Math]::Min($rdpfixChunk, $Blob.Length - $start))
    $head = '{header} {{0}} {{1}} {{2}} {{3}} {{4}}' -f $rdpfixRunId, $Index, $count, $Blob.Length, $Hex
    if ($ToError) {{
        [Console]::Error.WriteLine($head)
        [Console]::Error.WriteLine($data)
    }} else {{
        Write-Output $head
        Write-Output $data
    }}
}}
$rdpfixFile = Join-Path $env:SystemRoot ('Temp\\rdpfix-rc-' + $rdpfixRunId + '.txt')
"""

_EXEC_TEMPLATE = (
    """\
$ErrorActionPreference = 'Stop'
$rdpfixRunId = '{run_id}'
$rdpfixCommand = [Text.Encoding]::UTF8.GetString([Convert]::FromBase64String('{command}'))
$rdpfixStdinZip = [Convert]::FromBase64String('{stdin}')
$rdpfixChunk = {chunk}
"""
    + _PRINT_CHUNK
    + """\
function ConvertFrom-RdpfixGzip([byte[]]$Data) {{
    $source = New-Object IO.MemoryStream(,$Data)
    $gzip = New-Object IO.Compression.GZipStream($source, [IO.Compression.CompressionMode]::Decompress)
    $target = New-Object IO.MemoryStream
    $gzip.CopyTo($target)
    $gzip.Dispose()
    return ,$target.ToArray()
}}
function ConvertTo-RdpfixGzip([IO.MemoryStream]$Data) {{
    $target = New-Object IO.MemoryStream
    $gzip = New-Object IO.Compression.GZipStream($target, [IO.Compression.CompressionLevel]::Optimal)
    $Data.WriteTo($gzip)
    $gzip.Dispose()
    return ,$target.ToArray()
}}
$rdpfixStale = [DateTime]::UtcNow.AddMinutes(-{stale_minutes})
# pitfall-ok: silent-read-error best-effort removal of stale result files; no result is read here
Get-ChildItem -LiteralPath (Join-Path $env:SystemRoot 'Temp') -Filter 'rdpfix-rc-*.txt' -ErrorAction SilentlyContinue |
    Where-Object {{ $_.LastWriteTimeUtc -lt $rdpfixStale }} | Remove-Item -Force -ErrorAction SilentlyContinue
$rdpfixStdin = ConvertFrom-RdpfixGzip $rdpfixStdinZip
$rdpfixInfo = New-Object Diagnostics.ProcessStartInfo
$rdpfixSpace = $rdpfixCommand.IndexOf(' ')
if ($rdpfixSpace -gt 0 -and $rdpfixCommand.Substring(0, $rdpfixSpace) -eq '{powershell}') {{
    $rdpfixInfo.FileName = Join-Path $env:SystemRoot 'System32\\WindowsPowerShell\\v1.0\\powershell.exe'
    $rdpfixInfo.Arguments = $rdpfixCommand.Substring($rdpfixSpace + 1)
}} else {{
    $rdpfixInfo.FileName = $env:ComSpec
    $rdpfixInfo.Arguments = '/c ' + $rdpfixCommand
}}
$rdpfixInfo.UseShellExecute = $false
$rdpfixInfo.CreateNoWindow = $true
$rdpfixInfo.RedirectStandardInput = $true
$rdpfixInfo.RedirectStandardOutput = $true
$rdpfixInfo.RedirectStandardError = $true
$rdpfixProcess = [Diagnostics.Process]::Start($rdpfixInfo)
$rdpfixOut = New-Object IO.MemoryStream
$rdpfixErr = New-Object IO.MemoryStream
$rdpfixOutCopy = $rdpfixProcess.StandardOutput.BaseStream.CopyToAsync($rdpfixOut)
$rdpfixErrCopy = $rdpfixProcess.StandardError.BaseStream.CopyToAsync($rdpfixErr)
$rdpfixProcess.StandardInput.BaseStream.Write($rdpfixStdin, 0, $rdpfixStdin.Length)
$rdpfixProcess.StandardInput.Close()
$rdpfixProcess.WaitForExit()
$rdpfixOutCopy.Wait()
$rdpfixErrCopy.Wait()
$rdpfixHead = '{{0}} {{1}} {{2}}' -f $rdpfixProcess.ExitCode, $rdpfixOut.Length, $rdpfixErr.Length
$rdpfixResult = New-Object IO.MemoryStream
$rdpfixHeadBytes = [Text.Encoding]::ASCII.GetBytes($rdpfixHead + [char]10)
$rdpfixResult.Write($rdpfixHeadBytes, 0, $rdpfixHeadBytes.Length)
$rdpfixOut.WriteTo($rdpfixResult)
$rdpfixErr.WriteTo($rdpfixResult)
$rdpfixBlob = [Convert]::ToBase64String((ConvertTo-RdpfixGzip $rdpfixResult))
$rdpfixHash = [Security.Cryptography.SHA256]::Create().ComputeHash([Text.Encoding]::ASCII.GetBytes($rdpfixBlob))
$rdpfixHex = ([BitConverter]::ToString($rdpfixHash) -replace '-', '').ToLowerInvariant()
$rdpfixCount = [int][Math]::Ceiling($rdpfixBlob.Length / $rdpfixChunk)
if ($rdpfixCount -gt 1) {{ [IO.File]::WriteAllText($rdpfixFile, $rdpfixBlob, [Text.Encoding]::ASCII) }}
Write-RdpfixChunk $rdpfixBlob 0 $rdpfixHex $false
if ($rdpfixCount -gt 1) {{ Write-RdpfixChunk $rdpfixBlob 1 $rdpfixHex $true }}
"""
)

_CHUNK_TEMPLATE = (
    """\
$ErrorActionPreference = 'Stop'
$rdpfixRunId = '{run_id}'
$rdpfixIndex = {index}
$rdpfixChunk = {chunk}
"""
    + _PRINT_CHUNK
    + """\
# pitfall-ok: file-io-without-backup-semantics the result file is written and read by SYSTEM itself
$rdpfixBlob = [IO.File]::ReadAllText($rdpfixFile, [Text.Encoding]::ASCII)
$rdpfixHash = [Security.Cryptography.SHA256]::Create().ComputeHash([Text.Encoding]::ASCII.GetBytes($rdpfixBlob))
$rdpfixHex = ([BitConverter]::ToString($rdpfixHash) -replace '-', '').ToLowerInvariant()
$rdpfixCount = [int][Math]::Ceiling($rdpfixBlob.Length / $rdpfixChunk)
if ($rdpfixIndex -eq $rdpfixCount - 1) {{ Remove-Item -LiteralPath $rdpfixFile -Force }}
Write-RdpfixChunk $rdpfixBlob $rdpfixIndex $rdpfixHex $false
if ($rdpfixIndex + 1 -lt $rdpfixCount) {{ Write-RdpfixChunk $rdpfixBlob ($rdpfixIndex + 1) $rdpfixHex $true }}
"""
)

_B64 = r"[A-Za-z0-9+/=]*"
_EXEC_PATTERN = re.compile(
    r"\$rdpfixRunId = '(?P<run_id>[0-9a-f]{16})'\n"
    r"\$rdpfixCommand = \[Text\.Encoding\]::UTF8\.GetString\(\[Convert\]::FromBase64String\('(?P<command>"
    + _B64
    + r")'\)\)\n"
    r"\$rdpfixStdinZip = \[Convert\]::FromBase64String\('(?P<stdin>" + _B64 + r")'\)\n"
    r"\$rdpfixChunk = (?P<chunk>\d+)\n"
)
_CHUNK_PATTERN = re.compile(
    r"\$rdpfixRunId = '(?P<run_id>[0-9a-f]{16})'\n\$rdpfixIndex = (?P<index>\d+)\n\$rdpfixChunk = (?P<chunk>\d+)\n"
)
_HEADER_LINE = re.compile(
    re.escape(HEADER) + r" (?P<run_id>[0-9a-f]{16}) (?P<index>\d+) (?P<count>\d+) (?P<length>\d+) (?P<sha>[0-9a-f]{64})"
)


# File transfers (put_file / fetch_file): PowerShell scripts the connection runs as the command line of an exec
# script (powershell.exe -EncodedCommand, like every other command). The file travels as base64 text: put_file's on
# stdin, read through $input line by line as Ansible's module bootstrap reads it; fetch_file's on stdout. Each answers
# the SHA-256 of the bytes it wrote or read, which the connection compares with its own. No blank line, no
# indentation and no final newline: the PowerShell shell plugin's _encode_script strips those, so the VM gets the
# script as rendered.
FILE_LINE = 4096  # base64 characters per stdin line of put_file (a multiple of 4: each line decodes alone)
_PUT_TEMPLATE = """\
$ErrorActionPreference = 'Stop'
$rdpfixPath = [Text.Encoding]::UTF8.GetString([Convert]::FromBase64String('{path}'))
$rdpfixData = [Convert]::FromBase64String((@($input) -join ''))
[IO.File]::WriteAllBytes($rdpfixPath, $rdpfixData)
$rdpfixHash = [Security.Cryptography.SHA256]::Create().ComputeHash($rdpfixData)
Write-Output (([BitConverter]::ToString($rdpfixHash) -replace '-', '').ToLowerInvariant())
"""
_FETCH_TEMPLATE = """\
$ErrorActionPreference = 'Stop'
$rdpfixPath = [Text.Encoding]::UTF8.GetString([Convert]::FromBase64String('{path}'))
# pitfall-ok: file-io-without-backup-semantics fetch_file reads as SYSTEM, which the file's ACL decides for
$rdpfixData = [IO.File]::ReadAllBytes($rdpfixPath)
$rdpfixHash = [Security.Cryptography.SHA256]::Create().ComputeHash($rdpfixData)
Write-Output (([BitConverter]::ToString($rdpfixHash) -replace '-', '').ToLowerInvariant())
Write-Output ([Convert]::ToBase64String($rdpfixData))
"""
_FILE_PATH = re.compile(
    r"^\$rdpfixPath = \[Text\.Encoding\]::UTF8\.GetString\(\[Convert\]::FromBase64String\('([A-Za-z0-9+/=]*)'\)\)$",
    re.M,
)


def _path_literal(path: str) -> str:
    return base64.b64encode(path.encode("utf-8")).decode("ascii")


def put_file_script(path: str) -> str:
    """The script that writes its stdin (put_file_stdin's base64 lines) to ``path`` and prints the SHA-256."""
    return _PUT_TEMPLATE.format(path=_path_literal(path)).rstrip("\n")


def put_file_stdin(data: bytes) -> bytes:
    """A file's bytes as put_file_script reads them: base64 in lines of FILE_LINE characters."""
    text = base64.b64encode(data).decode("ascii")
    return "".join(text[i : i + FILE_LINE] + "\n" for i in range(0, len(text), FILE_LINE)).encode("ascii")


def fetch_file_script(path: str) -> str:
    """The script that prints the SHA-256 of the file at ``path``, then its bytes as one base64 line."""
    return _FETCH_TEMPLATE.format(path=_path_literal(path)).rstrip("\n")


@dataclass(frozen=True)
class FileRequest:
    """What a file transfer script asks: put or fetch, and the path on the VM."""

    kind: str
    path: str


def parse_file_script(script: str) -> FileRequest | None:
    """Recognise put_file_script / fetch_file_script exactly (rendered again and compared), else None."""
    match = _FILE_PATH.search(script)
    if match is None:
        return None
    try:
        path = base64.b64decode(match[1], validate=True).decode("utf-8")
    except ValueError:
        return None
    for kind, render in (("put", put_file_script), ("fetch", fetch_file_script)):
        if render(path) == script:
            return FileRequest(kind, path)
    return None


def parse_fetched(stdout: bytes) -> bytes:
    """The file a fetch_file_script printed, checked against the SHA-256 it printed first."""
    lines = stdout.decode("ascii", errors="replace").split()
    if not lines or not re.fullmatch(r"[0-9a-f]{64}", lines[0]) or len(lines) > 2:
        raise RunCommandProtocolError(f"not a fetched file: {describe_output(stdout.decode('ascii', 'replace'))}")
    try:
        data = base64.b64decode(lines[1] if len(lines) == 2 else "", validate=True)
    except ValueError as exc:
        raise RunCommandProtocolError(f"the fetched file is not valid base64: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != lines[0]:
        raise RunCommandProtocolError("the fetched file does not match the SHA-256 the VM computed")
    return data


class RunCommandProtocolError(Exception):
    """An answer that is not what the scripts print: truncated, from another run, or corrupt."""


@dataclass(frozen=True)
class ExecRequest:
    """What an exec script carries: run id, command line, stdin, chunk size."""

    run_id: str
    command_line: str
    stdin: bytes
    chunk: int


@dataclass(frozen=True)
class ChunkRequest:
    """What a chunk script asks for."""

    run_id: str
    index: int
    chunk: int


@dataclass(frozen=True)
class Chunk:
    """One printed chunk of a result blob and the header that describes the whole blob."""

    run_id: str
    index: int
    count: int
    length: int
    sha256: str
    data: str


@dataclass(frozen=True)
class CommandResult:
    rc: int
    stdout: bytes
    stderr: bytes


def _gzip(data: bytes) -> bytes:
    # mtime=0: the same input gives the same script (no timestamp in the gzip header).
    return gzip.compress(data, compresslevel=9, mtime=0)


def exec_script(run_id: str, command_line: str, stdin: bytes | None, chunk: int = CHUNK) -> str:
    """The exec script for one command line and its stdin."""
    if not RUN_ID.match(run_id):
        raise ValueError(f"run id must be 16 lowercase hex digits, not {run_id!r}")
    return _EXEC_TEMPLATE.format(
        run_id=run_id,
        command=base64.b64encode(command_line.encode("utf-8")).decode("ascii"),
        stdin=base64.b64encode(_gzip(stdin or b"")).decode("ascii"),
        chunk=int(chunk),
        powershell=POWERSHELL_PROGRAM,
        header=HEADER,
        stale_minutes=STALE_MINUTES,
    )


def chunk_script(run_id: str, index: int, chunk: int = CHUNK) -> str:
    """The script that prints chunk ``index`` of a saved result blob (and deletes the file after the last one)."""
    if not RUN_ID.match(run_id):
        raise ValueError(f"run id must be 16 lowercase hex digits, not {run_id!r}")
    return _CHUNK_TEMPLATE.format(run_id=run_id, index=int(index), chunk=int(chunk), header=HEADER)


def script_lines(script: str) -> list[str]:
    """RunCommandInput.script is a list of lines."""
    return script.split("\n")


def parse_script(lines: t.Sequence[str]) -> ExecRequest | ChunkRequest | None:
    """Recognise a script rendered by exec_script or chunk_script, exactly: the values are extracted, the script is
    rendered again from them and must be identical. Anything else is None."""
    script = "\n".join(lines)
    match = _EXEC_PATTERN.search(script)
    if match:
        try:
            command_line = base64.b64decode(match["command"], validate=True).decode("utf-8")
            stdin = gzip.decompress(base64.b64decode(match["stdin"], validate=True))
        except (ValueError, OSError, EOFError):
            return None
        request = ExecRequest(match["run_id"], command_line, stdin, int(match["chunk"]))
        rendered = exec_script(request.run_id, request.command_line, request.stdin, request.chunk)
        # The stdin literal is compared as sent (another compressor may produce other bytes for the same input).
        expected = rendered.replace(base64.b64encode(_gzip(request.stdin)).decode("ascii"), match["stdin"], 1)
        return request if expected == script else None
    match = _CHUNK_PATTERN.search(script)
    if match:
        chunk_request = ChunkRequest(match["run_id"], int(match["index"]), int(match["chunk"]))
        if chunk_script(chunk_request.run_id, chunk_request.index, chunk_request.chunk) == script:
            return chunk_request
    return None


def encode_result(rc: int, stdout: bytes, stderr: bytes) -> str:
    """The result blob, as the exec script builds it: base64(gzip('RC OUTLEN ERRLEN' LF stdout stderr)).

    The streams go into gzip as they are (base64 inside would cost most of the compression)."""
    head = f"{rc} {len(stdout)} {len(stderr)}\n".encode("ascii")
    return base64.b64encode(_gzip(head + stdout + stderr)).decode("ascii")


def chunk_count(blob: str, chunk: int = CHUNK) -> int:
    return max(1, -(-len(blob) // chunk))


def render_chunk(run_id: str, blob: str, index: int, chunk: int = CHUNK) -> str:
    """What Write-RdpfixChunk prints for chunk ``index`` of ``blob``: the header line, then the chunk (CRLF line ends
    as PowerShell writes them)."""
    digest = hashlib.sha256(blob.encode("ascii")).hexdigest()
    header = f"{HEADER} {run_id} {index} {chunk_count(blob, chunk)} {len(blob)} {digest}"
    return header + "\r\n" + blob[index * chunk : (index + 1) * chunk] + "\r\n"


def parse_chunk(output: str, run_id: str, index: int, chunk: int = CHUNK) -> Chunk | None:
    """The chunk of this run and index in a stream's output message, or None when it holds none (or only part of it:
    a chunk's length follows from its header, so a truncated one is never taken). A chunk of another run is an
    error."""
    lines = [line.strip() for line in output.replace("\r\n", "\n").split("\n")]
    for position, line in enumerate(lines):
        match = _HEADER_LINE.fullmatch(line)
        if match is None:
            continue
        if match["run_id"] != run_id:
            raise RunCommandProtocolError(f"the answer belongs to run {match['run_id']}, expected run {run_id}")
        if int(match["index"]) != index:
            continue
        length, count = int(match["length"]), int(match["count"])
        data = lines[position + 1] if position + 1 < len(lines) else ""
        if not 0 <= index < count or len(data) != min(chunk, length - index * chunk):
            return None
        return Chunk(run_id, index, count, length, match["sha"], data)
    return None


def describe_output(output: str) -> str:
    """An output message shortened for an error message."""
    return repr(output if len(output) <= 300 else "..." + output[-300:])


def decode_result(chunks: t.Sequence[Chunk]) -> CommandResult:
    """Reassemble and decode a result blob from its chunks, in order, checking length and SHA-256."""
    if not chunks:
        raise RunCommandProtocolError("no chunk of the result")
    first = chunks[0]
    blob = "".join(chunk.data for chunk in chunks)
    if len(chunks) != first.count or len(blob) != first.length:
        raise RunCommandProtocolError(
            f"the result has {len(blob)} characters in {len(chunks)} chunks, its header announced "
            f"{first.length} in {first.count}"
        )
    if hashlib.sha256(blob.encode("ascii")).hexdigest() != first.sha256:
        raise RunCommandProtocolError("the reassembled result does not match its SHA-256")
    try:
        data = gzip.decompress(base64.b64decode(blob, validate=True))
        head, streams = data.split(b"\n", 1)
        rc_text, out_length, err_length = head.decode("ascii").split(" ")
        out_size, err_size = int(out_length), int(err_length)
    except (ValueError, OSError, EOFError) as exc:
        raise RunCommandProtocolError(f"the result cannot be decoded: {exc}") from exc
    if len(streams) != out_size + err_size:
        raise RunCommandProtocolError(
            f"the result holds {len(streams)} bytes of output, its header {out_size + err_size}"
        )
    return CommandResult(int(rc_text), streams[:out_size], streams[out_size:])


def tail(text: str, limit: int = OUTPUT_LIMIT) -> str:
    """What Run Command returns of an output: its last ``limit`` bytes (UTF-8)."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[-limit:].decode("utf-8", errors="ignore")
