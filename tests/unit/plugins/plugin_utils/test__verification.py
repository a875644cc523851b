"""The final verification's judgement (plugin_utils/_verification.py): the same rules as the role's verify.yml."""

from __future__ import annotations

import typing as t

import pytest

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_probe import ProbeOptions
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _verification

OPTIONS = {"host": "rdp.example.test", "fallback_port": 3389}


def answering(report: dict[str, t.Any]) -> t.Callable[[ProbeOptions], dict[str, t.Any]]:
    def probe(options: ProbeOptions) -> dict[str, t.Any]:
        return {"summary": "probed", "findings": [], "target": {"host": options.host, "port": options.port}, **report}

    return probe


def certificate(**fields: t.Any) -> dict[str, t.Any]:
    return {"tls": {"certificate": {"thumbprint": "AB12", "subject": "CN=rdp", **fields}}}


@pytest.mark.parametrize(
    ("report", "failure"),
    [
        ({"connectable": True, "verdict": "ok"}, None),
        ({"connectable": True, **certificate(expired=False, server_auth=True)}, None),
        ({"connectable": False, "verdict": "unreachable"}, "RDP still does not connect after the repair (unreachable)"),
        ({"connectable": True, **certificate(expired=True)}, "presents certificate AB12 (CN=rdp), which is expired"),
        (
            {"connectable": True, **certificate(server_auth=False)},
            "which is not made for server authentication",
        ),
    ],
)
def test_rdp_that_does_not_connect_or_presents_an_unusable_certificate_fails(
    report: dict[str, t.Any], failure: str | None
) -> None:
    result = _verification.verify(OPTIONS, {"tls": {"changed": True}}, answering(report))
    assert result["target"] == {"host": "rdp.example.test", "port": 3389}
    if failure is None:
        assert "failed" not in result
    else:
        assert result["failed"] is True and failure in result["msg"]


@pytest.mark.parametrize(
    ("concerns", "pending"),
    [
        ({"tls": {"reboot_required": True}}, ["tls: a reboot is required"]),
        ({"certificate": {"restart_pending": True}}, ["certificate: a service restart is pending"]),
        ({"firewall": {"unresolved": ["firewall.public_any"]}}, ["firewall: firewall.public_any is unresolved"]),
    ],
)
def test_what_the_run_left_pending_excuses_it(concerns: dict[str, t.Any], pending: list[str]) -> None:
    result = _verification.verify(OPTIONS, concerns, answering({"connectable": False, "verdict": "refused"}))
    assert result["pending"] == pending and "failed" not in result
    assert result["msg"].endswith(f"Not failed: {pending[0]}.")


@pytest.mark.parametrize(
    ("firewall", "port"),
    [
        ({"firewall": {"server": {"port": 3390}}}, 3390),
        ({"firewall": {"server": {"port": True}}}, 4000),
        ({"firewall": {"server": {"port": 70000}}}, 4000),
        ({"failed": True}, 4000),
    ],
)
def test_the_listeners_own_port_wins_over_the_fallback(firewall: dict[str, t.Any], port: int) -> None:
    assert _verification.probe_port({"firewall": firewall}, 4000) == port


def test_options_the_probe_refuses_fail_without_a_packet() -> None:
    def no_probe(_options: ProbeOptions) -> t.NoReturn:
        raise AssertionError("probed despite invalid options")

    result = _verification.verify({"host": "", "fallback_port": 3389}, {}, no_probe)
    assert result["failed"] is True and result["msg"].startswith("The final verification could not probe RDP")
