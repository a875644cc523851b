"""The handshake module as Ansible runs it: arguments in, one JSON document out, no traceback."""

from __future__ import annotations

import json
import typing as t

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.rdpfix.rdp.plugins.modules import handshake


def run_module(capsys: pytest.CaptureFixture[str], **args: t.Any) -> tuple[int, dict[str, t.Any]]:
    with patch_module_args(args), pytest.raises(SystemExit) as exit_info:
        handshake.main()
    output = capsys.readouterr().out
    return int(exit_info.value.code or 0), json.loads(output)


def test_bad_input_fails_cleanly_before_any_connection(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_connection(*_args: t.Any, **_kwargs: t.Any) -> t.NoReturn:
        raise AssertionError("the module connected despite invalid options")

    monkeypatch.setattr(handshake, "run_probe", no_connection)
    code, result = run_module(capsys, host="127.0.0.1", port=0, expected_thumbprint="xyz", read_timeout=0)
    assert code == 1 and result["failed"] is True
    for fragment in ("port must be between 1 and 65535", "expected_thumbprint", "read_timeout"):
        assert fragment in result["msg"]


def test_unknown_choice_is_refused_by_the_argument_spec(capsys: pytest.CaptureFixture[str]) -> None:
    code, result = run_module(capsys, host="127.0.0.1", tls_versions=["SSLv3"])
    assert code == 1 and "SSLv3" in result["msg"]


def test_report_in_check_mode_changes_nothing(capsys: pytest.CaptureFixture[str], closed_port: int) -> None:
    port = closed_port
    code, result = run_module(capsys, host="127.0.0.1", port=port, _ansible_check_mode=True, connect_timeout=1)
    assert code == 0
    assert result["changed"] is False
    assert result["verdict"] == "unreachable"
    assert result["tcp"]["status"] == "refused"
    assert result["msg"] == result["summary"]
    assert [item["id"] for item in result["findings"]] == ["handshake.tcp_refused"]


def test_fail_on_critical_fails_with_the_report(capsys: pytest.CaptureFixture[str], closed_port: int) -> None:
    code, result = run_module(capsys, host="127.0.0.1", port=closed_port, fail_on="critical", connect_timeout=1)
    assert code == 1
    assert result["failed"] is True
    assert result["verdict"] == "unreachable"
    assert result["findings"][0]["severity"] == "critical"
