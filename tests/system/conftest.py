"""Fixtures for the system tests; the harness itself is in harness.py (importable by the tests)."""

from __future__ import annotations

import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import HOSTS_DIR, Lab, start_lab


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
