"""rdpfix.rdp.handshake's action plugin: on the controller the probe runs in-process, with the module's options and
result; anywhere else the module runs where the task is delegated."""

from __future__ import annotations

import json
import typing as t
from types import SimpleNamespace

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.rdpfix.rdp.plugins.action import handshake as handshake_action
from ansible_collections.rdpfix.rdp.plugins.modules import handshake as handshake_module


def action(connection: str, **args: t.Any) -> t.Any:
    task = SimpleNamespace(args=args, check_mode=False, diff=False, async_val=0, action="rdpfix.rdp.handshake")
    return handshake_action.ActionModule(
        task, SimpleNamespace(transport=connection, _load_name=connection), SimpleNamespace(), None, None, None
    )


def module_result(capsys: pytest.CaptureFixture[str], **args: t.Any) -> dict[str, t.Any]:
    with patch_module_args(args), pytest.raises(SystemExit):
        handshake_module.main()
    return t.cast(dict[str, t.Any], json.loads(capsys.readouterr().out))


VOLATILE = ("elapsed_ms", "invocation", "tcp", "summary", "msg", "findings")


@pytest.mark.parametrize("fail_on", ["never", "critical"])
def test_on_the_controller_the_probe_runs_in_process_with_the_modules_result(
    capsys: pytest.CaptureFixture[str], fail_on: str, closed_port: int
) -> None:
    args = {"host": "127.0.0.1", "port": closed_port, "connect_timeout": 1, "fail_on": fail_on}
    result = action("ansible.builtin.local", **args).run(task_vars={})
    expected = module_result(capsys, **args)
    assert result.get("failed", False) == expected.get("failed", False) == (fail_on == "critical")
    assert result["verdict"] == expected["verdict"] == "unreachable"
    assert [item["id"] for item in result["findings"]] == [item["id"] for item in expected["findings"]]
    assert {k: v for k, v in result.items() if k not in VOLATILE} == {
        k: v for k, v in expected.items() if k not in VOLATILE
    }


def test_bad_input_is_refused_before_any_packet(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_probe(*_args: t.Any) -> t.NoReturn:
        raise AssertionError("probed despite invalid options")

    monkeypatch.setattr(handshake_action._rdp_probe, "run_probe", no_probe)
    result = action("local", host="127.0.0.1", port=0, read_timeout=0).run(task_vars={})
    assert result["failed"] is True and "port must be between 1 and 65535" in result["msg"]
    refused = action("local", host="127.0.0.1", tls_versions=["SSLv3"]).run(task_vars={})
    assert refused["failed"] is True and "SSLv3" in refused["msg"]


def test_elsewhere_the_module_runs_where_the_task_is_delegated(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, t.Any]] = []

    def execute_module(self: t.Any, **kwargs: t.Any) -> dict[str, t.Any]:
        sent.append(kwargs)
        return {"changed": False, "verdict": "connects"}

    monkeypatch.setattr(handshake_action.ActionModule, "_execute_module", execute_module)
    result = action("ssh", host="rdp.example.test").run(task_vars={})
    assert result == {"changed": False, "verdict": "connects"}
    assert sent and sent[0]["module_name"] == "rdpfix.rdp.handshake"
    assert sent[0]["module_args"] == {"host": "rdp.example.test"}
