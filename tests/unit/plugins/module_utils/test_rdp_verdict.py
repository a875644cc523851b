"""The verdict: findings from probe reports, in the shared finding shape the fleet report reads."""

from __future__ import annotations

import typing as t
from dataclasses import dataclass

import pytest

from ansible_collections.rdpfix.rdp.plugins.module_utils._rdp_verdict import CAUSES, assess
from ansible_collections.rdpfix.rdp.plugins.plugin_utils._report import parse_finding


@dataclass
class Options:
    expected_thumbprint: str | None = None
    cert_warn_days: int = 30
    max_clock_skew: float = 300.0


def trial(status: str, **extra: t.Any) -> dict[str, t.Any]:
    return {"status": status, **extra}


def report(**sections: t.Any) -> dict[str, t.Any]:
    base: dict[str, t.Any] = {
        "target": {"host": "web01", "port": 3389},
        "tcp": {"status": "open", "address": "10.0.0.5"},
        "negotiation": None,
        "tls": None,
        "credssp": None,
        "names": None,
        "udp": None,
        "internal_error": None,
    }
    base.update(sections)
    return base


def negotiation(accepted: list[str], **trials: dict[str, t.Any]) -> dict[str, t.Any]:
    return {
        "trials": trials,
        "accepted": accepted,
        "failure_codes": {name: item["failure_name"] for name, item in trials.items() if "failure_name" in item},
        "nla_required": trials.get("tls", {}).get("failure_code") == 5,
        "legacy_server": False,
    }


HEALTHY_NEGOTIATION = negotiation(
    ["credssp", "credssp_early_user_auth"],
    rdp=trial("negotiation_failure", failure_code=5, failure_name="HYBRID_REQUIRED_BY_SERVER"),
    tls=trial("negotiation_failure", failure_code=5, failure_name="HYBRID_REQUIRED_BY_SERVER"),
    credssp=trial("accepted"),
    credssp_early_user_auth=trial("accepted"),
)


def certificate(**overrides: t.Any) -> dict[str, t.Any]:
    base = {
        "thumbprint": "AB" * 20,
        "subject": "CN=web01",
        "issuer": "CN=CA",
        "common_name": "web01",
        "sans": ["web01"],
        "not_before": "2026-01-01T00:00:00Z",
        "not_after": "2027-01-01T00:00:00Z",
        "days_left": 200,
        "expired": False,
        "not_yet_valid": False,
        "self_signed": False,
        "server_auth": True,
        "key_type": "RSA",
        "key_size": 2048,
    }
    base.update(overrides)
    return base


def tls_section(versions: dict[str, str], cert: dict[str, t.Any] | None = None) -> dict[str, t.Any]:
    return {
        "status": "probed",
        "versions": {name: {"status": status} for name, status in versions.items()},
        "accepted_versions": [name for name, status in versions.items() if status == "accepted"],
        "certificate": cert,
    }


def ids(result: dict[str, t.Any]) -> list[str]:
    return [item["id"] for item in result["findings"]]


def test_healthy_nla_server_connects() -> None:
    result = assess(
        report(
            negotiation=HEALTHY_NEGOTIATION,
            tls=tls_section({"TLSv1.2": "accepted", "TLSv1.3": "accepted"}, certificate()),
            credssp={"status": "challenge", "ntlm": {"clock_skew_seconds": 1.0}},
        ),
        Options(),
    )
    assert result["verdict"] == "connects"
    assert result["connectable"] is True
    assert ids(result) == ["handshake.nla_required"]


def test_every_finding_has_the_shared_shape_and_a_cause_family() -> None:
    """Feed a report that raises many findings; each must pass the fleet report's own validation."""
    result = assess(
        report(
            negotiation=negotiation(
                ["rdp", "tls"],
                rdp=trial("accepted"),
                tls=trial("accepted"),
                credssp=trial("selected_other", selected_protocol="tls"),
            ),
            tls=tls_section(
                {"TLSv1.0": "accepted", "TLSv1.2": "tls_alert"},
                certificate(expired=True, self_signed=True, key_size=1024, server_auth=False),
            ),
            names={
                "connect_name": "alias",
                "certificate_matches_connect_name": False,
                "connect_name_reaches_probed_address": False,
                "connect_name_resolves_to": ["10.9.9.9"],
                "probed_address": "10.0.0.5",
                "matches_server_name": False,
                "server_dns_name_reaches_probed_address": False,
                "server_dns_name": "web01.corp",
            },
            udp={"status": "no_answer", "port": 3389},
        ),
        Options(expected_thumbprint="00" * 20),
    )
    assert len(result["findings"]) >= 10
    for raw in result["findings"]:
        parsed = parse_finding(raw, "test")
        assert parsed.id.startswith("handshake.")
        assert raw["id"].removeprefix("handshake.") in CAUSES
        assert raw["cause"] in {
            "certificate",
            "machinekeys",
            "firewall",
            "transport",
            "tls",
            "name_resolution",
            "service",
            "security_downgrade",
            "client",
        }
    severities = [item["severity"] for item in result["findings"]]
    assert severities == sorted(severities, key=["critical", "warning", "security", "info"].index)
    assert result["verdict"] == "connects_with_prompt"


@pytest.mark.parametrize(
    ("versions", "expected"),
    [
        ({"TLSv1.2": "reset", "TLSv1.3": "closed"}, "handshake.tls_closed"),
        ({"TLSv1.2": "tls_alert", "TLSv1.3": "closed"}, "handshake.tls_no_common_version"),
        ({"TLSv1.2": "wrong_version", "TLSv1.3": "tls_alert"}, "handshake.tls_no_common_version"),
    ],
)
def test_tls_failures_are_critical_0x904(versions: dict[str, str], expected: str) -> None:
    result = assess(report(negotiation=HEALTHY_NEGOTIATION, tls=tls_section(versions)), Options())
    first = result["findings"][0]
    assert (first["id"], first["severity"], first["effect"]) == (expected, "critical", "0x904/0x7")
    assert result["verdict"] == "fails"
    assert result["connectable"] is False


def test_untested_versions_do_not_count_as_refused() -> None:
    result = assess(
        report(
            negotiation=HEALTHY_NEGOTIATION,
            tls=tls_section({"TLSv1.0": "untested", "TLSv1.2": "accepted"}, certificate()),
        ),
        Options(),
    )
    assert "handshake.tls_versions_untested" in ids(result)
    assert result["verdict"] == "connects"


@pytest.mark.parametrize("closed", ["reset", "closed"])
def test_a_reset_tls13_client_hello_is_a_0x904_warning_not_an_aside(closed: str) -> None:
    tls = tls_section({"TLSv1.2": "accepted", "TLSv1.3": closed}, certificate())
    result = assess(report(negotiation=HEALTHY_NEGOTIATION, tls=tls), Options())
    (reset,) = [item for item in result["findings"] if item["id"] == "handshake.tls13_reset"]
    assert (reset["severity"], reset["effect"], reset["cause"]) == ("warning", "0x904/0x7", "tls")
    assert "rdpfix.rdp.tls" in reset["fix"]["description"]
    # Server 2019 has no TLS 1.3 and answers such a ClientHello with TLS 1.2: it is not the explanation offered.
    assert "2019" not in repr(reset)
    assert "handshake.tls_version_dropped" not in ids(result)
    assert result["verdict"] == "connects_with_warnings"
    # Another version dropped beside it is still the informational aside.
    both = tls_section({"TLSv1.1": "reset", "TLSv1.2": "accepted", "TLSv1.3": closed}, certificate())
    found = ids(assess(report(negotiation=HEALTHY_NEGOTIATION, tls=both), Options()))
    assert "handshake.tls13_reset" in found and "handshake.tls_version_dropped" in found


def test_credssp_failure_is_critical_only_when_nla_is_required() -> None:
    broken = {"status": "closed", "detail": "closed"}
    required = assess(report(negotiation=HEALTHY_NEGOTIATION, credssp=broken), Options())
    assert required["findings"][0]["severity"] == "critical"
    optional_negotiation = negotiation(["tls", "credssp"], tls=trial("accepted"), credssp=trial("accepted"))
    optional = assess(report(negotiation=optional_negotiation, credssp=broken), Options())
    finding = next(item for item in optional["findings"] if item["id"] == "handshake.credssp_no_challenge")
    assert finding["severity"] == "warning"


def test_unreachable_and_tcp_only() -> None:
    refused = assess(report(tcp={"status": "refused", "address": "10.0.0.5"}), Options())
    assert refused["verdict"] == "unreachable" and ids(refused) == ["handshake.tcp_refused"]
    only_tcp = assess(report(), Options())
    assert only_tcp["verdict"] == "unknown" and only_tcp["connectable"] is None


def test_clock_skew_threshold_is_an_option() -> None:
    section = {"status": "challenge", "ntlm": {"clock_skew_seconds": -400.0}}
    assert "handshake.clock_skew" in ids(assess(report(credssp=section), Options()))
    assert "handshake.clock_skew" not in ids(assess(report(credssp=section), Options(max_clock_skew=600)))
