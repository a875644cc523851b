"""Fixtures for the system tests; the harness itself is in harness.py (importable by the tests)."""

from __future__ import annotations

import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import HOSTS_DIR, Lab, start_lab

# The longest modules first. `make test` runs the system tests in two pytest-xdist workers with --dist loadfile and
# --no-loadscope-reorder: each module stays in one worker (its module-scoped lab and playbook runs happen once), and the
# modules are handed out in this order, so the long ones start at once and the short ones fill in after them.
LONGEST_FIRST = (
    "test_server_role.py",
    "test_fault_matrix.py",
    "test_restore_every_host.py",
    "test_transports_playbook.py",
    "test_promises.py",
    "test_examples.py",
    "test_selftest_playbook.py",
    "test_fix_rdp_playbook.py",
)
SYSTEM_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order the system tests' modules longest first (a stable sort: the order inside a module stays as written)."""

    def rank(item: pytest.Item) -> int:
        path = item.path
        if path.parent != SYSTEM_DIR or path.name not in LONGEST_FIRST:
            return len(LONGEST_FIRST)
        return LONGEST_FIRST.index(path.name)

    system = [index for index, item in enumerate(items) if SYSTEM_DIR in item.path.parents]
    ordered = sorted((items[index] for index in system), key=rank)
    for index, item in zip(system, ordered, strict=True):
        items[index] = item


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[t.Callable[..., Lab]]:
    """Start labs from host file names (as in tests/lab/hosts, without .yml) or paths; all are stopped afterwards."""
    labs: list[Lab] = []

    def factory(*hosts: str | Path) -> Lab:
        files = [h if isinstance(h, Path) else HOSTS_DIR / f"{h}.yml" for h in hosts]
        lab = start_lab(tmp_path / f"lab{len(labs)}", files)
        labs.append(lab)
        return lab

    yield factory
    for lab in labs:
        lab.down()
