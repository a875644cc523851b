# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Static checks of the PowerShell agent, which no test here can run (there is no PowerShell on the controller).

The syntax check uses tree-sitter-pwsh: an error-tolerant grammar that catches unbalanced braces, broken param
blocks and unterminated strings, not misspelled cmdlets. The helpers are also used by the operation contract test
(tests/unit/test_operation_contract.py).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import tree_sitter_pwsh
from tree_sitter import Language, Node, Parser

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _wrapper

ROOT = Path(__file__).resolve().parents[4]
AGENT_PS1 = ROOT / "plugins" / "plugin_utils" / "_agent.ps1"
PROTOCOL_DOC = ROOT / "docs" / "agent-protocol.md"

PWSH = Language(tree_sitter_pwsh.language())


@dataclass(frozen=True)
class SyntaxProblem:
    line: int  # 1-based, as an editor shows it
    column: int
    kind: str  # "error" (unparsable text) or "missing" (a token the parser had to invent, e.g. a closing brace)
    text: str

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.kind} {self.text!r}"


@dataclass(frozen=True)
class TableEntry:
    key: str
    line: int
    body: str  # the text of the entry's value, e.g. "{ param($Args_) ... }"


def parse(source: bytes) -> Node:
    return Parser(PWSH).parse(source).root_node


def _walk(node: Node) -> list[Node]:
    nodes = [node]
    for child in node.children:
        nodes.extend(_walk(child))
    return nodes


def syntax_problems(source: bytes) -> list[SyntaxProblem]:
    root = parse(source)
    problems = [
        SyntaxProblem(
            line=node.start_point[0] + 1,
            column=node.start_point[1] + 1,
            kind="missing" if node.is_missing else "error",
            text=(node.text or b"").decode("utf-8", errors="replace")[:60] or node.type,
        )
        for node in _walk(root)
        if node.is_error or node.is_missing
    ]
    if root.has_error and not problems:
        # has_error without a located node should not happen; never let it pass silently.
        problems.append(SyntaxProblem(line=0, column=0, kind="error", text="unlocated parse error"))
    return problems


def non_ascii_lines(source: bytes) -> list[int]:
    return [number for number, line in enumerate(source.splitlines(), start=1) if any(byte > 0x7F for byte in line)]


def _text(node: Node) -> str:
    return (node.text or b"").decode("utf-8")


def _unquote(key: str) -> str:
    if len(key) >= 2 and key[0] == key[-1] and key[0] in "'\"":
        return key[1:-1]
    return key


def operation_table(source: bytes) -> list[TableEntry]:
    """The entries of the hashtable literal assigned to $Operations, in source order (duplicates kept)."""
    tables: list[Node] = []
    for node in _walk(parse(source)):
        if node.type != "assignment_expression":
            continue
        left = node.child_by_field_name("left") or node.children[0]
        if _text(left).strip().lower() != "$operations":
            continue
        tables.extend(item for item in _walk(node) if item.type == "hash_literal_expression")
        break
    if not tables:
        raise AssertionError("no `$Operations = [ordered]@{ ... }` table in the agent")
    table = tables[0]  # the outermost literal; nested ones belong to the operations' bodies
    entries: list[TableEntry] = []
    for body in (child for child in table.children if child.type == "hash_literal_body"):
        for entry in (child for child in body.children if child.type == "hash_entry"):
            key = next(child for child in entry.children if child.type == "key_expression")
            value_nodes = entry.children[entry.children.index(key) + 2 :]  # after the key and "="
            entries.append(
                TableEntry(
                    key=_unquote(_text(key).strip()),
                    line=entry.start_point[0] + 1,
                    body="".join(_text(node) for node in value_nodes).strip(),
                )
            )
    return entries


def operation_keys(source: bytes) -> list[str]:
    return [entry.key for entry in operation_table(source)]


_TABLE_ROW = re.compile(r"^\|\s*`(?P<op>[a-z_]+(?:\.[a-z_]+)*)`\s*\|")


def documented_operations(doc_text: str) -> dict[str, bool]:
    """Operation name -> writes, from the two tables under "Read operations" and "Write operations"."""
    operations: dict[str, bool] = {}
    writes: bool | None = None
    for line in doc_text.splitlines():
        if line.startswith("Read operations"):
            writes = False
        elif line.startswith("Write operations"):
            writes = True
        elif line.startswith("#"):
            writes = None
        match = _TABLE_ROW.match(line)
        if match and writes is not None:
            name = match.group("op")
            if name in operations:
                raise AssertionError(f"operation {name} is listed twice in the protocol document")
            operations[name] = writes
    return operations


def documented_error_types(doc_text: str) -> set[str]:
    line = next(line for line in doc_text.splitlines() if line.startswith("Error `type` values:"))
    return set(re.findall(r"`([A-Za-z]+)`", line.split(":", 1)[1]))


@pytest.fixture(scope="module")
def agent_source() -> bytes:
    return AGENT_PS1.read_bytes()


@pytest.fixture(scope="module")
def doc_text() -> str:
    return PROTOCOL_DOC.read_text(encoding="utf-8")


def test_agent_parses_without_syntax_errors(agent_source: bytes) -> None:
    problems = syntax_problems(agent_source)
    assert not problems, "PowerShell syntax errors in _agent.ps1:\n" + "\n".join(map(str, problems))


@pytest.mark.parametrize(
    ("description", "mutate"),
    [
        (
            "closing brace of the first operation removed",
            lambda text: _drop_first_line(text, "    }\n", after="'system.info' = {"),
        ),
        ("unterminated string", lambda text: text.replace("'RDP-tcp'", "'RDP-tcp", 1)),
        ("broken param block", lambda text: text.replace("param([string]$BatchJson)", "param([string]$BatchJson", 1)),
        ("unbalanced here-string", lambda text: text.replace("\n'@\n", "\n'@x\n", 1)),
    ],
)
def test_syntax_check_catches_a_broken_agent(
    agent_source: bytes, description: str, mutate: Callable[[str], str]
) -> None:
    broken = mutate(agent_source.decode("ascii"))
    assert broken != agent_source.decode("ascii"), f"mutation '{description}' changed nothing"
    assert syntax_problems(broken.encode("ascii")), f"the syntax check missed: {description}"


def test_syntax_problem_names_the_line() -> None:
    source = b"param([string]$BatchJson)\n$ok = 1\nif ($ok) {\n    $x = @{ a = 1\n}\n"
    problems = syntax_problems(source)
    assert problems
    assert all(1 <= problem.line <= 5 for problem in problems)


def test_agent_is_ascii(agent_source: bytes) -> None:
    # Windows PowerShell 5.1 reads a script without BOM in the ANSI code page: any other byte may change meaning.
    assert non_ascii_lines(agent_source) == []


def test_ascii_check_catches_a_typographic_quote() -> None:
    assert non_ascii_lines("$a = 1\n$b = \u2018x\u2019\n".encode()) == [2]


def test_agent_takes_the_batch_from_the_module_argument_or_its_parameter(agent_source: bytes) -> None:
    root = parse(agent_source)
    param_blocks = [child for child in root.children if child.type == "param_block"]
    assert len(param_blocks) == 1, "the agent must start with one script-level param block"
    parameters = [node for node in _walk(param_blocks[0]) if node.type == "script_parameter"]
    assert [_text(node).replace(" ", "") for node in parameters] == ["[string]$BatchJson"]
    text = agent_source.decode("ascii")
    # Ansible's module wrapper sets the global $complex_args; the batch is the argument _wrapper.py names.
    assert re.search(r"Get-Variable -Name complex_args -Scope Global", text)
    assert f"$moduleArguments['{_wrapper.BATCH_ARGUMENT}']" in text
    # The #Requires line is what makes Ansible's builder treat the file as a PowerShell module.
    assert re.search(r"(?m)^#Requires -Version 5\.1$", text)


def test_operation_table_keys_are_documented_operations(agent_source: bytes, doc_text: str) -> None:
    keys = operation_keys(agent_source)
    documented = documented_operations(doc_text)
    assert len(keys) == len(set(keys)), "duplicate keys in $Operations (a parse error on Windows)"
    assert set(keys) - set(documented) == set(), "operations in the agent but not in docs/agent-protocol.md"
    assert set(documented) - set(keys) == set(), "documented operations the agent does not implement"


def test_every_operation_takes_its_arguments_as_one_parameter(agent_source: bytes) -> None:
    # The dispatcher calls each entry as `& $Operations[$Name] $argumentTable`.
    malformed = [
        f"{entry.key} (line {entry.line})"
        for entry in operation_table(agent_source)
        if not re.match(r"^\{\s*param\(\s*\$Args_\s*\)", entry.body)
    ]
    assert malformed == []


def test_table_extraction_reads_keys_in_order() -> None:
    source = (
        b"param([string]$BatchJson)\n"
        b"$Operations = [ordered]@{\n"
        b"    'b.one' = { param($Args_) return @{ nested = @{ 'not.a.key' = 1 } } }\n"
        b'    "a.two" = {\n        param($Args_)\n    }\n'
        b"}\n"
    )
    assert operation_keys(source) == ["b.one", "a.two"]


def test_agent_error_types_are_documented(agent_source: bytes, doc_text: str) -> None:
    text = agent_source.decode("ascii")
    # Error types are raised with New-AgentException and mapped from exceptions by the two mapping functions.
    mapping = "".join(_function_text(text, name) for name in ("Get-WrappedErrorType", "Get-AgentErrorType"))
    used = set(re.findall(r"New-AgentException '(\w+)'", text)) | set(re.findall(r"return '(\w+)'", mapping))
    assert {"AccessDenied", "NotFound", "DiskFull", "InvalidArgument", "Failed"} <= used, "extraction is broken"
    assert used - documented_error_types(doc_text) == set()


def _function_text(text: str, name: str) -> str:
    start = text.index(f"function {name} {{")
    return text[start : text.index("\n}\n", start)]


def test_documented_operations_parse_the_two_tables() -> None:
    doc = (
        "Read operations (x):\n\n| op | args |\n| --- | --- |\n| `a.read` | - |\n\n"
        "Write operations (y):\n\n| op | args |\n| --- | --- |\n| `b.write` | `path` |\n"
        "| `c.three.parts` | |\n\n## Next\n| `d.other` | |\n"
    )
    assert documented_operations(doc) == {"a.read": False, "b.write": True, "c.three.parts": True}


def _drop_first_line(text: str, line: str, after: str) -> str:
    """Remove the first whole line equal to `line` that follows the text `after`."""
    lines = text.splitlines(keepends=True)
    start = next(number for number, content in enumerate(lines) if after in content)
    target = next(number for number in range(start + 1, len(lines)) if lines[number] == line)
    return "".join(lines[:target] + lines[target + 1 :])


def embedded_csharp(source: str) -> list[tuple[int, str]]:
    """(line, text) of every single-quoted here-string that holds C# for Add-Type."""
    blocks = []
    for match in re.finditer(r"@'\r?\n(?P<body>.*?)\r?\n'@", source, flags=re.DOTALL):
        body = match.group("body")
        if re.search(r"^\s*namespace\s", body, flags=re.MULTILINE):
            blocks.append((source.count("\n", 0, match.start()) + 1, body))
    return blocks


def test_embedded_csharp_is_found(agent_source: bytes) -> None:
    blocks = embedded_csharp(agent_source.decode("ascii"))
    assert any("WTSEnumerateSessionsW" in body for _line, body in blocks)


def test_embedded_csharp_compiles_as_csharp_5(agent_source: bytes, tmp_path: Path) -> None:
    # Windows PowerShell 5.1 compiles Add-Type code with the .NET Framework 4 compiler: C# 5 at most.
    assert shutil.which("mcs"), "needs the Mono C# compiler: scripts/install-system-packages.sh installs mono-mcs"
    failures = []
    for line, body in embedded_csharp(agent_source.decode("ascii")):
        source_file = tmp_path / f"block_{line}.cs"
        source_file.write_text(body, encoding="utf-8")
        compiled = subprocess.run(
            ["mcs", "-langversion:5", "-target:library", f"-out:{tmp_path / f'block_{line}.dll'}", str(source_file)],
            capture_output=True,
            text=True,
            check=False,
        )
        if compiled.returncode != 0:
            failures.append(f"here-string at line {line}:\n{compiled.stdout}{compiled.stderr}")
    assert not failures, "\n".join(failures)


def test_capi_key_file_name_rule_reproduces_the_rdp_key_file(agent_source: bytes) -> None:
    # Get-CapiKeyFileName relies on this rule; it must reproduce the documented file name of the RDP self-signed
    # key (container TSSecKeySet1 -> MachineKeys\f686aace6942fb7f7ceb231212eef4a4_<MachineGuid>).
    digest = hashlib.md5(b"tsseckeyset1\x00", usedforsecurity=False).digest()  # Windows naming, not security
    words = struct.unpack("<4I", digest)
    assert "".join(f"{word:08x}" for word in words) == "f686aace6942fb7f7ceb231212eef4a4"
    text = agent_source.decode("ascii")
    function = _function_text(text, "Get-CapiKeyFileName")
    assert "ToLowerInvariant() + [char]0" in function
    assert "ToUInt32($digest, $offset).ToString('x8')" in function
