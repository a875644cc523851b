# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The agent's operation set is the same in all four places that name it (docs/agent-protocol.md, "Operations"):

- the protocol document's two tables (read and write operations),
- the Python runner's ``OPERATIONS`` (what the planners may send),
- the ``$Operations`` table of ``_agent.ps1`` (what runs on a real host),
- the lab's ``rdplab.ops.OPS`` (what the simulated hosts execute),

and an operation is a read or a write alike in the document, the runner and the lab (the lab counts writes).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _agent

ROOT = Path(__file__).resolve().parents[2]
AGENT_PS1 = ROOT / "plugins" / "plugin_utils" / "_agent.ps1"
PROTOCOL_DOC = ROOT / "docs" / "agent-protocol.md"
PS1_CHECKS = ROOT / "tests" / "unit" / "plugins" / "plugin_utils" / "test__agent_ps1.py"


def _load_ps1_checks() -> types.ModuleType:
    # The tree-sitter helpers live with the agent's static checks; loaded by path so that no package layout of the
    # tests directory is assumed.
    spec = importlib.util.spec_from_file_location("rdpfix_agent_ps1_checks", PS1_CHECKS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered first: dataclasses look their module up in sys.modules while the class is being built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


PS1_HELPERS = _load_ps1_checks()


def _difference(left: set[str], right: set[str], left_name: str, right_name: str) -> str:
    lines = []
    if left - right:
        lines.append(f"only in {left_name}: {sorted(left - right)}")
    if right - left:
        lines.append(f"only in {right_name}: {sorted(right - left)}")
    return "; ".join(lines)


@pytest.fixture(scope="module")
def documented() -> dict[str, bool]:
    operations: dict[str, bool] = PS1_HELPERS.documented_operations(PROTOCOL_DOC.read_text(encoding="utf-8"))
    assert len(operations) >= 10, "the protocol tables were not found: the document's layout changed"
    return operations


@pytest.fixture(scope="module")
def agent_keys() -> list[str]:
    keys: list[str] = PS1_HELPERS.operation_keys(AGENT_PS1.read_bytes())
    return keys


def test_python_operations_are_the_documented_ones(documented: dict[str, bool]) -> None:
    python = set(_agent.OPERATIONS)
    assert python == set(documented), _difference(python, set(documented), "_agent.OPERATIONS", "the document")


def test_python_read_write_split_is_the_documented_one(documented: dict[str, bool]) -> None:
    assert not _agent.READ_OPERATIONS & _agent.WRITE_OPERATIONS
    documented_writes = {name for name, writes in documented.items() if writes}
    documented_reads = {name for name, writes in documented.items() if not writes}
    assert set(_agent.WRITE_OPERATIONS) == documented_writes, _difference(
        set(_agent.WRITE_OPERATIONS), documented_writes, "_agent.WRITE_OPERATIONS", "the document's write table"
    )
    assert set(_agent.READ_OPERATIONS) == documented_reads, _difference(
        set(_agent.READ_OPERATIONS), documented_reads, "_agent.READ_OPERATIONS", "the document's read table"
    )


def test_agent_ps1_implements_exactly_the_python_operations(agent_keys: list[str]) -> None:
    duplicates = sorted({key for key in agent_keys if agent_keys.count(key) > 1})
    assert not duplicates, f"$Operations lists these twice: {duplicates}"
    ps1 = set(agent_keys)
    assert ps1 == set(_agent.OPERATIONS), _difference(ps1, set(_agent.OPERATIONS), "_agent.ps1", "_agent.OPERATIONS")


def test_lab_implements_exactly_the_python_operations() -> None:
    from rdplab.ops import OPS as ops

    lab = set(ops)
    assert lab == set(_agent.OPERATIONS), _difference(
        lab, set(_agent.OPERATIONS), "rdplab.ops.OPS", "_agent.OPERATIONS"
    )


def test_lab_counts_writes_for_exactly_the_write_operations() -> None:
    from rdplab.ops import OPS as ops

    lab_writes = {name for name, spec in ops.items() if spec.writes}
    lab_reads = {name for name, spec in ops.items() if not spec.writes}
    assert lab_writes == set(_agent.WRITE_OPERATIONS), _difference(
        lab_writes, set(_agent.WRITE_OPERATIONS), "the lab's writes", "_agent.WRITE_OPERATIONS"
    )
    assert lab_reads == set(_agent.READ_OPERATIONS), _difference(
        lab_reads, set(_agent.READ_OPERATIONS), "the lab's reads", "_agent.READ_OPERATIONS"
    )
