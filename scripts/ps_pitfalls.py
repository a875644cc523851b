# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Static checks for the Windows PowerShell 5.1 pitfalls that bit the agent (plugins/plugin_utils/_agent.ps1).

No PowerShell runs here, so these rules read the script's syntax tree (tree-sitter-pwsh, the grammar the syntax check
uses) and flag constructs that behave differently on Windows than they read:

list-unrolled
    An ``if``/``switch`` whose branches yield ``@(...)``, a ``foreach``/``for``/``while`` loop, or a pipeline through
    ForEach-Object/Where-Object/Sort-Object/Select-Object, used as a value without ``@(...)`` around it. PowerShell
    unrolls statement and pipeline output: one element arrives as a scalar, none as ``$null``, so a list in a result
    record becomes a string (``"3389"``, which Python then splits into characters).
silent-read-error
    ``-ErrorAction SilentlyContinue``/``Ignore`` (or ``$ErrorActionPreference``, or a splatted ``ErrorAction``) on a
    read: a provider failure then looks like an empty, successful answer. ``Get-Command`` is exempt (its empty answer
    is the answer: the command does not exist).
winevent-too-many-ids
    ``Get-WinEvent -FilterHashtable`` with more than 21 literal event IDs, or with an ID list computed from input
    (unbounded). An event-log query is limited (Microsoft: 32 expressions; 24 IDs are reported to return nothing
    while 21 work), and the hashtable path answers "no events found" instead of failing.
file-io-without-backup-semantics
    ``[System.IO.File]`` reads and copies, or a ``FileStream`` opened on an existing file, outside a function that
    opens files with backup semantics (FILE_FLAG_BACKUP_SEMANTICS). .NET never passes that flag, so an
    Administrator's SeBackupPrivilege does not apply and a key file whose ACL has no Administrators entry (the RDP key
    on build 17763+) cannot be read.
newer-than-net452
    .NET members newer than .NET Framework 4.5.2, the least Windows PowerShell 5.1 requires (an un-updated Server
    2012 R2): ``ServiceController.StartType`` (4.6.1), ``RSACertificateExtensions`` and ``GetRSAPrivateKey`` (4.6),
    ... (``NEWER_THAN_452`` below), also in the C# that the script compiles with Add-Type.

A finding that is a real false positive is suppressed on its own line, or on the comment line right above it, by
``# pitfall-ok: <rule> <reason>``. The reason is required, the rule must be one of the above, and a suppression that
suppresses nothing is itself reported, so suppressions stay narrow and explained.

Usage: ``python scripts/ps_pitfalls.py [FILE.ps1 ...]`` (default: the agent); exit code 1 when anything is found.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import tree_sitter_pwsh
from tree_sitter import Language, Node, Parser

ROOT = Path(__file__).resolve().parent.parent
AGENT_PS1 = ROOT / "plugins" / "plugin_utils" / "_agent.ps1"

PWSH = Language(tree_sitter_pwsh.language())

RULES: dict[str, str] = {
    "list-unrolled": "a statement or pipeline used as a list without @(...): one element arrives as a scalar",
    "silent-read-error": "-ErrorAction SilentlyContinue/Ignore on a read hides a failure behind an empty answer",
    "winevent-too-many-ids": "Get-WinEvent -FilterHashtable with more event IDs than one event-log query takes",
    "file-io-without-backup-semantics": "System.IO.File/FileStream read outside the backup-semantics helper",
    "newer-than-net452": ".NET member newer than .NET Framework 4.5.2",
}
# Findings about the suppressions themselves; they cannot be suppressed.
SUPPRESSION_RULES = ("bad-suppression", "unused-suppression")

# Event IDs one FilterHashtable may carry (windows-rdp-facts: PowerShell/PowerShell#12303, 21 IDs work, 24 do not).
MAX_WINEVENT_IDS = 21

# Cmdlets whose output is a collection of the input's items.
COLLECTION_CMDLETS = frozenset(
    {"foreach-object", "%", "where-object", "?", "where", "sort-object", "sort", "select-object", "select"}
)
# Verbs of commands that only read; Get-Command answers "absent" by returning nothing, which is its answer.
READ_VERBS = frozenset({"get", "test", "read", "find", "resolve", "search", "measure", "select"})
SILENT_EXEMPT = frozenset({"get-command"})
SILENT_VALUES = frozenset({"silentlycontinue", "ignore", "0", "4"})

FILE_TYPES = frozenset({"system.io.file", "io.file"})
FILE_READ_MEMBERS = frozenset(
    {"open", "openread", "opentext", "readallbytes", "readalltext", "readalllines", "readlines", "copy"}
)
FILESTREAM_TYPES = frozenset({"system.io.filestream", "io.filestream"})
# A function that opens with backup semantics names the flag (or its value) somewhere in its text.
BACKUP_SEMANTICS_MARKERS = ("FILE_FLAG_BACKUP_SEMANTICS", "0x02000000", "BackupSemantics")

# Types and members missing from .NET Framework 4.5.2, with the version that added them. Type names match their last
# dotted parts; members match by name wherever they are accessed (the names are distinctive enough).
NEWER_THAN_452: dict[str, str] = {
    "StartType": "ServiceController.StartType: .NET Framework 4.6.1 (use Win32_Service.StartMode)",
    "RSACertificateExtensions": "RSACertificateExtensions: .NET Framework 4.6",
    "ECDsaCertificateExtensions": "ECDsaCertificateExtensions: .NET Framework 4.6.1",
    "DSACertificateExtensions": "DSACertificateExtensions: .NET Framework 4.7.2",
    "GetRSAPrivateKey": "X509Certificate2.GetRSAPrivateKey: .NET Framework 4.6",
    "GetRSAPublicKey": "X509Certificate2.GetRSAPublicKey: .NET Framework 4.6",
    "GetECDsaPrivateKey": "X509Certificate2.GetECDsaPrivateKey: .NET Framework 4.6.1",
    "CopyWithPrivateKey": "X509Certificate2.CopyWithPrivateKey: .NET Framework 4.7.2",
    "FileSystemAclExtensions": "FileSystemAclExtensions: .NET Core only, never in .NET Framework",
    "RuntimeInformation": "RuntimeInformation: .NET Framework 4.7.1",
    "Tls13": "SslProtocols/SecurityProtocolType.Tls13: .NET Framework 4.8",
    "CreateFromPem": "X509Certificate2.CreateFromPem: .NET 5, never in .NET Framework",
    "CompletedTask": "Task.CompletedTask: .NET Framework 4.6",
}

_SUPPRESSION = re.compile(r"#\s*pitfall-ok\s*:\s*(?P<rule>[\w-]*)\s*(?P<reason>.*)$")


@dataclass(frozen=True)
class Finding:
    rule: str
    line: int  # 1-based
    column: int  # 1-based
    message: str

    def __str__(self) -> str:
        return f"line {self.line}, column {self.column}: {self.rule}: {self.message}"


def parse(source: bytes) -> Node:
    return Parser(PWSH).parse(source).root_node


def _walk(node: Node) -> Iterator[Node]:
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        stack.extend(reversed(current.children))


def _text(node: Node | None) -> str:
    return "" if node is None else (node.text or b"").decode("utf-8", errors="replace")


def _finding(rule: str, node: Node, message: str) -> Finding:
    return Finding(rule, node.start_point[0] + 1, node.start_point[1] + 1, message)


def _unwrap(node: Node) -> Node:
    """Descend single-child expression wrappers (pipeline, pipeline_chain, unary_expression, ...)."""
    wrappers = {"pipeline", "pipeline_chain", "unary_expression", "assignment_value", "statement_list"}
    while node.type in wrappers and len(node.named_children) == 1:
        node = node.named_children[0]
    return node


def _value_after(node: Node, separator: str) -> Node | None:
    """The value of an assignment or hash entry: the first named child after the separator."""
    seen = False
    for child in node.children:
        if seen and child.is_named and child.type != "comment":
            return child
        if child.type == separator:
            seen = True
    return None


def _is_array(node: Node) -> bool:
    """An expression that is an array literal: ``@(...)`` or ``a, b`` (not ``, @(...)``, which survives output)."""
    node = _unwrap(node)
    return node.type in ("array_expression", "array_literal_expression")


def _branch_blocks(statement: Node) -> list[Node]:
    if statement.type == "if_statement":
        blocks = [child for child in statement.children if child.type == "statement_block"]
        for clause in statement.children:
            if clause.type in ("elseif_clauses", "elseif_clause", "else_clause"):
                blocks += [node for node in _walk(clause) if node.type == "statement_block" and node.parent == clause]
                for inner in clause.children:
                    if inner.type == "elseif_clause":
                        blocks += [node for node in inner.children if node.type == "statement_block"]
        return blocks
    if statement.type == "switch_statement":
        return [
            node
            for node in _walk(statement)
            if node.type == "statement_block" and node.parent is not None and node.parent.type == "switch_clause"
        ]
    return []


def _block_yields_array(block: Node) -> bool:
    statements = [child for child in block.children if child.type == "statement_list"]
    if not statements:
        return False
    pipelines = [child for child in statements[0].named_children if child.type != "comment"]
    return bool(pipelines) and _is_array(pipelines[-1])


def _collection_pipeline(node: Node) -> str | None:
    """The collection cmdlet ending a multi-stage pipeline used as a value, else None."""
    node = node.named_children[0] if node.type == "pipeline" and len(node.named_children) == 1 else node
    if node.type != "pipeline_chain" or not any(child.type == "|" for child in node.children):
        return None
    commands = [child for child in node.named_children if child.type == "command"]
    if not commands:
        return None
    name = _text(commands[-1].child_by_field_name("command_name") or commands[-1].named_children[0]).strip()
    return name if name.lower() in COLLECTION_CMDLETS else None


def _unrolled_value(value: Node) -> str | None:
    """Why a value loses its list shape, or None."""
    if value.type in ("if_statement", "switch_statement"):
        if any(_block_yields_array(block) for block in _branch_blocks(value)):
            keyword = value.type.split("_")[0]
            return (
                f"the {keyword} statement yields @(...) but its output is unrolled; wrap the whole {keyword} in @(...)"
            )
        return None
    if value.type in ("foreach_statement", "for_statement", "while_statement", "do_statement"):
        return f"a {value.type.split('_')[0]} loop's output is unrolled (one item: a scalar); wrap it in @(...)"
    inner = value
    if inner.type == "assignment_value" and len(inner.named_children) == 1:
        inner = inner.named_children[0]
    cmdlet = _collection_pipeline(inner)
    if cmdlet:
        return f"the output of a pipeline through {cmdlet} is unrolled (one item: a scalar); wrap it in @(...)"
    return None


def _rule_list_unrolled(root: Node) -> Iterator[Finding]:
    for node in _walk(root):
        if node.type == "assignment_expression":
            value = _value_after(node, "assignment_operator")
        elif node.type == "hash_entry":
            value = _value_after(node, "=")
        else:
            continue
        if value is None:
            continue
        reason = _unrolled_value(value)
        if reason:
            yield _finding("list-unrolled", value, reason)


def _command_name(command: Node) -> str:
    name = command.child_by_field_name("command_name")
    if name is None:
        name = next((child for child in command.children if child.type == "command_name"), None)
    return _text(name).strip()


def _command_parameters(command: Node) -> list[tuple[str, str, Node]]:
    """(parameter name lower-case without '-', argument text, parameter node) for each named parameter."""
    elements = next((child for child in command.children if child.type == "command_elements"), None)
    if elements is None:
        return []
    items = [child for child in elements.named_children if child.type not in ("command_argument_sep", "comment")]
    found: list[tuple[str, str, Node]] = []
    for position, item in enumerate(items):
        if item.type != "command_parameter":
            continue
        raw = _text(item).strip()
        name, _colon, inline = raw.lstrip("-").partition(":")
        argument = inline
        if not inline and position + 1 < len(items) and items[position + 1].type != "command_parameter":
            argument = _text(items[position + 1])
        found.append((name.lower(), argument.strip().strip("'\"").lower(), item))
    return found


def _is_read_command(name: str) -> bool:
    lowered = name.lower()
    return lowered not in SILENT_EXEMPT and lowered.split("-", 1)[0] in READ_VERBS and "-" in lowered


def _rule_silent_read_error(root: Node) -> Iterator[Finding]:
    for node in _walk(root):
        if node.type == "command":
            name = _command_name(node)
            if not _is_read_command(name):
                continue
            for parameter, argument, where in _command_parameters(node):
                if parameter in ("erroraction", "ea") and argument in SILENT_VALUES:
                    yield _finding(
                        "silent-read-error",
                        where,
                        f"{name} -ErrorAction {argument}: a failure to read looks like an empty answer; "
                        "use Stop and report the error (or catch only the not-found case)",
                    )
        elif node.type == "hash_entry":
            key = _text(next((c for c in node.children if c.type == "key_expression"), None)).strip().strip("'\"")
            value = _value_after(node, "=")
            if key.lower() == "erroraction" and _text(value).strip().strip("'\"").lower() in SILENT_VALUES:
                yield _finding(
                    "silent-read-error",
                    node,
                    "a splatted ErrorAction = SilentlyContinue/Ignore hides read failures; use Stop",
                )
        elif node.type == "assignment_expression":
            target = _text(node.children[0]).strip().lower()
            value = _value_after(node, "assignment_operator")
            if target == "$erroractionpreference" and _text(value).strip().strip("'\"").lower() in SILENT_VALUES:
                yield _finding("silent-read-error", node, "$ErrorActionPreference = SilentlyContinue hides failures")


def _enclosing_scope(node: Node) -> Node:
    """The script block or function around a node, else the whole script."""
    current = node
    while current.parent is not None:
        current = current.parent
        if current.type in ("script_block", "function_statement"):
            return current
    return current


def _hash_id_values(hash_literal: Node) -> list[Node]:
    values = []
    for entry in _walk(hash_literal):
        if entry.type != "hash_entry" or entry.parent is None or entry.parent.parent != hash_literal:
            continue
        key = _text(next((c for c in entry.children if c.type == "key_expression"), None)).strip().strip("'\"")
        value = _value_after(entry, "=")
        if key.lower() == "id" and value is not None:
            values.append(value)
    return values


def _id_values_for(variable: str, scope: Node) -> list[Node]:
    """Every value given to the Id key of the hashtable held by ``variable`` within ``scope``."""
    values: list[Node] = []
    pattern = re.compile(
        rf"^{re.escape(variable)}\s*(?:\[\s*['\"]id['\"]\s*\]|\.id)$",
        flags=re.IGNORECASE,
    )
    for node in _walk(scope):
        if node.type != "assignment_expression":
            continue
        target = _text(node.children[0]).strip()
        value = _value_after(node, "assignment_operator")
        if value is None:
            continue
        if target.lower() == variable.lower():
            literal = next((item for item in _walk(value) if item.type == "hash_literal_expression"), None)
            if literal is not None:
                values += _hash_id_values(literal)
        elif pattern.match(target):
            values.append(value)
    return values


def _literal_count(value: Node) -> int | None:
    """How many IDs a literal value holds; None when the value is computed."""
    inner = _unwrap(value)
    if inner.type == "array_expression":
        lists = [child for child in inner.named_children if child.type == "statement_list"]
        if not lists:
            return 0
        inner = _unwrap(lists[0])
    if inner.type == "array_literal_expression":
        items = [node for node in _walk(inner) if node.type == "integer_literal"]
        others = [
            node
            for node in _walk(inner)
            if node.type in ("variable", "command", "member_access", "invocation_expression", "element_access")
        ]
        return None if others else len(items)
    if inner.type == "integer_literal":
        return 1
    return None


def _bounded(value: Node) -> bool:
    """A plain variable or a slice (``$ids[$a..$b]``): its bound is set where it is built."""
    inner = _unwrap(value)
    if inner.type == "variable":
        return True
    return inner.type == "element_access" and any(node.type == "range_expression" for node in _walk(inner))


def _rule_winevent(root: Node) -> Iterator[Finding]:
    for node in _walk(root):
        if node.type != "command" or _command_name(node).lower() != "get-winevent":
            continue
        for parameter, _argument, where in _command_parameters(node):
            if parameter != "filterhashtable":
                continue
            argument_node = where.next_named_sibling
            while argument_node is not None and argument_node.type == "command_argument_sep":
                argument_node = argument_node.next_named_sibling
            if argument_node is None:
                continue
            hashes = [item for item in _walk(argument_node) if item.type == "hash_literal_expression"]
            if hashes:
                values = _hash_id_values(hashes[0])
            else:
                variable = _text(_unwrap(argument_node)).strip()
                values = _id_values_for(variable, _enclosing_scope(node)) if variable.startswith("$") else []
            for value in values:
                count = _literal_count(value)
                if count is not None and count > MAX_WINEVENT_IDS:
                    yield _finding(
                        "winevent-too-many-ids",
                        value,
                        f"{count} event IDs in one FilterHashtable; at most {MAX_WINEVENT_IDS} work (split the query)",
                    )
                elif count is None and not _bounded(value):
                    yield _finding(
                        "winevent-too-many-ids",
                        value,
                        f"an event ID list computed from input has no bound; split it into queries of at most "
                        f"{MAX_WINEVENT_IDS} IDs (Get-WinEvent answers 'no events' to a query that is too long)",
                    )


def _in_backup_helper(node: Node) -> bool:
    current = node.parent
    while current is not None:
        if current.type == "function_statement":
            text = _text(current)
            return any(marker in text for marker in BACKUP_SEMANTICS_MARKERS)
        current = current.parent
    return False


def _type_name(type_literal: Node) -> str:
    return _text(type_literal).strip().strip("[]").strip().lower()


def _rule_file_io(root: Node) -> Iterator[Finding]:
    for node in _walk(root):
        if node.type == "invocation_expression":
            type_literal = next((child for child in node.children if child.type == "type_literal"), None)
            member = next((child for child in node.children if child.type == "member_name"), None)
            if type_literal is None or member is None:
                continue
            type_name, member_name = _type_name(type_literal), _text(member).strip().lower()
            if type_name in FILE_TYPES and member_name in FILE_READ_MEMBERS:
                if not _in_backup_helper(node):
                    yield _finding(
                        "file-io-without-backup-semantics",
                        node,
                        f"[System.IO.File]::{_text(member).strip()} reads without backup semantics: an Administrator "
                        "cannot read a key file whose ACL omits Administrators; use the backup-semantics helper",
                    )
            elif (
                type_name in FILESTREAM_TYPES
                and member_name == "new"
                and _opens_existing(node)
                and not _in_backup_helper(node)
            ):
                yield _finding("file-io-without-backup-semantics", node, _FILESTREAM_MESSAGE)
        elif node.type == "command" and _command_name(node).lower() == "new-object":
            text = _text(node)
            filestream = re.search(r"(?<![\w.])(?:System\.)?IO\.FileStream\b", text, flags=re.IGNORECASE)
            if filestream and _opens_existing(node) and not _in_backup_helper(node):
                yield _finding("file-io-without-backup-semantics", node, _FILESTREAM_MESSAGE)


_FILESTREAM_MESSAGE = (
    "a FileStream on an existing file opens it without backup semantics; use the backup-semantics helper "
    "(a FileStream that creates its own new file is fine)"
)


def _opens_existing(node: Node) -> bool:
    """False only for a FileStream that creates a new file (FileMode CreateNew/Create) to write to."""
    text = _text(node)
    creates = re.search(r"FileMode\]::(?:CreateNew|Create)\b", text) or re.search(
        r"['\"](?:CreateNew|Create)['\"]", text
    )
    return not creates


def _rule_newer_than_452(root: Node, source: str) -> Iterator[Finding]:
    for node in _walk(root):
        if node.type in ("member_name", "type_identifier"):
            name = _text(node).strip()
            if name in NEWER_THAN_452:
                yield _finding("newer-than-net452", node, NEWER_THAN_452[name])
    # C# compiled by Add-Type at run time: the same names inside here-strings that hold a namespace.
    names = "|".join(re.escape(name) for name in NEWER_THAN_452)
    for match in re.finditer(r"@'\r?\n(?P<body>.*?)\r?\n'@", source, flags=re.DOTALL):
        body = match.group("body")
        if not re.search(r"^\s*namespace\s", body, flags=re.MULTILINE):
            continue
        for used in re.finditer(rf"\b(?:{names})\b", body):
            offset = match.start("body") + used.start()
            line = source.count("\n", 0, offset) + 1
            column = offset - (source.rfind("\n", 0, offset) + 1) + 1
            yield Finding("newer-than-net452", line, column, "in C#: " + NEWER_THAN_452[used.group(0)])


@dataclass(frozen=True)
class Suppression:
    rule: str
    line: int  # the line it applies to
    comment_line: int
    reason: str


def _suppressions(root: Node) -> tuple[list[Suppression], list[Finding]]:
    found: list[Suppression] = []
    problems: list[Finding] = []
    for node in _walk(root):
        if node.type != "comment":
            continue
        match = _SUPPRESSION.search(_text(node))
        if not match:
            continue
        rule, reason = match.group("rule"), match.group("reason").strip()
        if rule not in RULES:
            problems.append(_finding("bad-suppression", node, f"unknown rule {rule!r} (one of {', '.join(RULES)})"))
            continue
        if len(reason) < 10:
            problems.append(_finding("bad-suppression", node, f"suppressing {rule} needs a reason after the rule"))
            continue
        line = node.start_point[0] + 1
        # A comment alone on its line applies to the next line; a trailing comment to its own line.
        previous = node.prev_sibling
        alone = previous is None or previous.end_point[0] < node.start_point[0]
        found.append(Suppression(rule, line + 1 if alone else line, line, reason))
    return found, problems


def check(source: bytes) -> list[Finding]:
    """Every pitfall in a PowerShell script, suppressions applied, sorted by position."""
    root = parse(source)
    text = source.decode("utf-8", errors="replace")
    findings = [
        *_rule_list_unrolled(root),
        *_rule_silent_read_error(root),
        *_rule_winevent(root),
        *_rule_file_io(root),
        *_rule_newer_than_452(root, text),
    ]
    suppressions, problems = _suppressions(root)
    used: set[Suppression] = set()
    kept: list[Finding] = []
    for finding in dict.fromkeys(findings):
        matching = [s for s in suppressions if s.rule == finding.rule and s.line == finding.line]
        if matching:
            used.update(matching)
        else:
            kept.append(finding)
    for suppression in suppressions:
        if suppression not in used:
            problems.append(
                Finding(
                    "unused-suppression",
                    suppression.comment_line,
                    1,
                    f"'pitfall-ok: {suppression.rule}' suppresses nothing on line {suppression.line}; remove it",
                )
            )
    return sorted([*kept, *problems], key=lambda item: (item.line, item.column, item.rule))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check PowerShell scripts for Windows PowerShell 5.1 pitfalls.")
    parser.add_argument("files", nargs="*", type=Path, default=[AGENT_PS1], help="scripts (default: the agent)")
    parser.add_argument("--list-rules", action="store_true", help="print the rules and exit")
    options = parser.parse_args(argv)
    if options.list_rules:
        for rule, summary in RULES.items():
            print(f"{rule}: {summary}")
        return 0
    total = 0
    for path in options.files:
        for finding in check(path.read_bytes()):
            total += 1
            print(f"{path}:{finding.line}:{finding.column}: {finding.rule}: {finding.message}")
    if total:
        print(f"{total} PowerShell pitfall(s) found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
