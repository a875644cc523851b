"""The harness gives every test process its own lab networks: pytest-xdist workers never share a 127.0.N network."""

from __future__ import annotations

import itertools

import pytest
from harness import _Networks


def networks(monkeypatch: pytest.MonkeyPatch, worker: str | None, start: str = "120", size: str = "10") -> _Networks:
    monkeypatch.setenv("RDPFIX_TEST_NETWORK_START", start)
    monkeypatch.setenv("RDPFIX_TEST_NETWORKS_PER_WORKER", size)
    if worker is None:
        monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    else:
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    return _Networks()


def test_each_worker_has_its_own_block_from_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    serial = list(itertools.islice(networks(monkeypatch, None), 10))
    first = list(itertools.islice(networks(monkeypatch, "gw0"), 10))
    second = list(itertools.islice(networks(monkeypatch, "gw1"), 10))
    assert serial == first == list(range(120, 130))
    assert second == list(range(130, 140))


def test_a_process_goes_round_its_block_skipping_running_labs(monkeypatch: pytest.MonkeyPatch) -> None:
    block = networks(monkeypatch, "gw1", start="200", size="3")
    block.in_use.add(204)
    assert [next(block) for _turn in range(4)] == [203, 205, 203, 205]
    block.in_use.update({203, 205})
    with pytest.raises(RuntimeError, match="taken by labs this process runs"):
        next(block)


def test_a_block_past_127_0_254_is_refused_before_any_lab_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeError, match=r"127\.0\.250-259 are outside"):
        networks(monkeypatch, "gw3", start="220", size="10")
