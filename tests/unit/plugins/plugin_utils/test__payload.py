# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The agent's payload built once per run: byte for byte what ansible-core builds for each batch, kept only where it
holds no secret and no randomness."""

from __future__ import annotations

import os
import typing as t
from pathlib import Path

import pytest
from ansible.plugins.loader import become_loader

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _payload, _wrapper
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._agent import Batch


def batches() -> list[Batch]:
    read = Batch(on_error="continue")
    read.add("system.info")
    read.add("registry.get", path='HKLM:\\SOFTWARE\\Ünïcödé "quoted" \\ back', names=["a\tb", "<&>'"])
    write = Batch(on_error="stop")
    write.add("file.write", path="C:\\ProgramData\\rdpfix\\x.json", content_b64="eyJ9\n" * 50)
    write.add_always("lock.release", name="rdpfix")
    return [read, write, Batch(ops=[{"op": "util.sleep", "args": {"seconds": 0}}])]


def test_every_payload_is_byte_for_byte_what_ansible_core_builds(tmp_path: Path) -> None:
    wrapper = _wrapper.ModuleWrapper()
    cached = _payload.CachedBuilder(wrapper, str(tmp_path))
    for batch in batches():
        assert cached(batch) == wrapper(batch)
    # The template is kept in the run's directory, and another worker's builder uses it without building.
    kept = list(tmp_path.glob(_payload.CACHE_PREFIX + "*.json"))
    assert len(kept) == 1

    class NoBuild(_wrapper.ModuleWrapper):
        def build(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
            raise AssertionError("the kept template should have been used")

    other = _payload.CachedBuilder(NoBuild(), str(tmp_path))
    for batch in batches():
        assert other(batch) == wrapper(batch)


def test_a_damaged_template_is_built_again(tmp_path: Path) -> None:
    wrapper = _wrapper.ModuleWrapper()
    _payload.CachedBuilder(wrapper, str(tmp_path))(batches()[0])
    (kept,) = tmp_path.glob(_payload.CACHE_PREFIX + "*.json")
    kept.write_text("{not json", encoding="utf-8")
    for batch in batches():
        assert _payload.CachedBuilder(wrapper, str(tmp_path))(batch) == wrapper(batch)


def runas() -> t.Any:
    plugin = become_loader.get("runas")
    plugin.set_options(direct={"become_user": "Administrator", "become_pass": "s3cret"})
    return plugin


@pytest.mark.parametrize(
    "wrapper",
    [
        _wrapper.ModuleWrapper(become_plugin=runas()),
        _wrapper.ModuleWrapper(environment={"TOKEN": "value"}),
        _wrapper.ModuleWrapper(async_timeout=60),
    ],
    ids=["become", "environment", "async"],
)
def test_payloads_with_a_secret_or_a_job_id_are_built_each_time_and_never_kept(
    wrapper: _wrapper.ModuleWrapper, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_payload, "_local_tmp", lambda: str(tmp_path))
    builder = _payload.builder_for(wrapper)
    assert builder is wrapper
    builder(batches()[0])
    assert os.listdir(tmp_path) == []
