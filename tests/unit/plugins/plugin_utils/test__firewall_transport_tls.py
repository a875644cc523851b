"""The firewall, transport and TLS planners: pure functions over the values the read batches return."""

from __future__ import annotations

import typing as t

import pytest

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _firewall, _tls, _transport


def dword(value: int) -> dict[str, t.Any]:
    return {"type": "REG_DWORD", "value": value}


def rule(**fields: t.Any) -> dict[str, t.Any]:
    base: dict[str, t.Any] = {
        "name": "RemoteDesktop-UserMode-In-TCP",
        "group": _firewall.RDP_GROUP,
        "direction": "Inbound",
        "action": "Allow",
        "enabled": True,
        "profiles": 0,
        "protocol": "TCP",
        "local_ports": ["3389"],
        "remote_ports": ["Any"],
        "remote_addresses": ["Any"],
        "program": r"%SystemRoot%\system32\svchost.exe",
        "service": "termservice",
        "policy_store_source_type": "Local",
    }
    base.update(fields)
    return base


UDP = {"name": "RemoteDesktop-UserMode-In-UDP", "protocol": "UDP"}


# -- transport ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "current", "wanted"), [("tcp_only", None, 1), ("udp_and_tcp", 1, 0), ("default", 1, None)]
)
def test_transport_plans_one_change_and_then_none(mode: str, current: int | None, wanted: int | None):
    values = {} if current is None else {"SelectTransport": dword(current)}
    plan = _transport.plan_transport(_transport.TransportState(server_policy=values), mode, ["server"])
    assert [(c.name, c.value) for c in plan.changes] == [("SelectTransport", wanted)]
    assert plan.restart_required == ["TermService"]
    after = {} if wanted is None else {"SelectTransport": dword(wanted)}
    assert not _transport.plan_transport(_transport.TransportState(server_policy=after), mode, ["server"]).changes


def test_transport_rejects_unknown_options():
    assert _transport.validate("udp_only", ["server"])
    assert _transport.validate("tcp_only", ["laptop"])
    assert not _transport.validate("tcp_only", ["server", "client"])


# -- TLS ---------------------------------------------------------------------------------------------------------


def tls_state(**overrides: t.Any) -> _tls.TlsState:
    fields: dict[str, t.Any] = {
        "os_build": 20348,
        "protocols": {},
        "cipher_suites": ["TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"],
        "cipher_policy": {},
        "key_type": "RSA",
        "fips": {},
        "listener": {"SecurityLayer": dword(2), "UserAuthentication": dword(1)},
        "policy": {},
    }
    fields.update(overrides)
    return _tls.TlsState(**fields)


def test_healthy_tls_plans_nothing():
    plan = _tls.plan_tls(tls_state(), _tls.TlsOptions())
    assert not plan.changes and not plan.reboot_required


def test_disabled_tls12_is_enabled_and_needs_a_reboot():
    state = tls_state(protocols={"TLS 1.2": {"Enabled": dword(0)}}, os_build=17763)
    plan = _tls.plan_tls(state, _tls.TlsOptions())
    assert [(c.path.rsplit("\\", 2)[-2], c.name, c.value) for c in plan.changes] == [("TLS 1.2", "Enabled", 1)]
    assert plan.reboot_required
    assert "tls.tls12_disabled" in {f["id"] for f in plan.findings}


def test_weak_protocols_are_reported_never_enabled_without_being_asked():
    plan = _tls.plan_tls(tls_state(os_build=17763), _tls.TlsOptions())
    assert not any(c.path.endswith(("TLS 1.0\\Server", "TLS 1.1\\Server")) for c in plan.changes)
    assert "tls.weak_protocols_enabled" in {f["id"] for f in plan.findings}
    off = {"TLS 1.0": {"Enabled": dword(0)}}
    asked = _tls.plan_tls(tls_state(protocols=off), _tls.TlsOptions(legacy_protocols=("TLS 1.0",)))
    assert asked.changes and asked.warnings


def test_policy_security_layer_wins_and_both_downgrades_are_restored_when_asked():
    state = tls_state(
        listener={"SecurityLayer": dword(0), "UserAuthentication": dword(1)}, policy={"SecurityLayer": dword(0)}
    )
    plan = _tls.plan_tls(state, _tls.TlsOptions(override_policy=True))
    assert plan.report["security_layer"]["source"] == "policy"
    assert sorted((c.path == _transport.POLICY_KEY, c.value) for c in plan.changes) == [(False, 2), (True, 2)]
    (warning,) = plan.warnings
    assert "Group Policy puts its own value back" in warning
    assert plan.after["security_layer"] == 2


@pytest.mark.parametrize(
    ("policy", "listener", "policy_findings", "listener_change"),
    [
        # The host: both values 0 under the policy key, the listener fine.
        ({"SecurityLayer": dword(0), "UserAuthentication": dword(0)}, {}, {"security_layer", "nla"}, False),
        # Policy and listener both downgraded: the listener value is repaired, the policy value only reported.
        ({"SecurityLayer": dword(0)}, {"SecurityLayer": dword(0)}, {"security_layer"}, True),
        ({"UserAuthentication": dword(0)}, {"UserAuthentication": dword(0)}, {"nla"}, True),
    ],
)
def test_group_policy_values_are_reported_never_written_by_default(
    policy: dict[str, t.Any], listener: dict[str, t.Any], policy_findings: set[str], listener_change: bool
):
    values = {"SecurityLayer": dword(2), "UserAuthentication": dword(1), **listener}
    plan = _tls.plan_tls(tls_state(listener=values, policy=policy), _tls.TlsOptions())
    assert not [c for c in plan.changes if c.path == _transport.POLICY_KEY]
    assert bool(plan.changes) is listener_change
    assert not plan.warnings
    ids = {"security_layer": "tls.security_layer_rdp_policy", "nla": "tls.nla_disabled_policy"}
    found = {f["id"]: f for f in plan.findings}
    for item in policy_findings:
        reported = found[ids[item]]
        assert reported["severity"] == "security"
        assert "enforced by Group Policy" in reported["title"] and "next Group Policy refresh" in reported["title"]
        assert reported["fix"]["options"]["override_policy"] is True
        assert reported["evidence"]["enforced_by_policy"] is True
    # The diff tells the truth: the effective value stays what the policy says.
    assert plan.after["security_layer"] == plan.before["security_layer"]
    assert plan.after["user_authentication"] == plan.before["user_authentication"]


def test_nla_disabled_does_not_override_a_policy_that_enforces_it():
    state = tls_state(policy={"UserAuthentication": dword(1)})
    plan = _tls.plan_tls(state, _tls.TlsOptions(nla="disabled"))
    assert [(c.path, c.value) for c in plan.changes] == [(_tls.LISTENER_KEY, 0)]
    assert any("Group Policy enforces it" in warning for warning in plan.warnings)
    assert plan.after["user_authentication"] == 1
    forced = _tls.plan_tls(state, _tls.TlsOptions(nla="disabled", override_policy=True))
    assert {c.path for c in forced.changes} == {_tls.LISTENER_KEY, _transport.POLICY_KEY}


def test_nla_is_turned_off_only_when_asked_and_with_a_warning():
    assert not _tls.plan_tls(tls_state(), _tls.TlsOptions(nla="keep")).changes
    plan = _tls.plan_tls(tls_state(), _tls.TlsOptions(nla="disabled"))
    assert [(c.name, c.value) for c in plan.changes] == [("UserAuthentication", 0)]
    assert plan.warnings


@pytest.mark.parametrize(
    ("suites", "key_type", "broken"),
    [
        ([], "RSA", True),
        (["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"], "RSA", True),
        (["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"], "EC", False),
        (["TLS_AES_256_GCM_SHA384"], "RSA", False),
    ],
)
def test_cipher_list_is_restored_only_when_nothing_is_usable(suites: list[str], key_type: str, broken: bool):
    # The cipher-suite order lives under HKLM:\SOFTWARE\Policies: without override_policy it is only reported.
    reported = _tls.plan_tls(tls_state(cipher_suites=suites, key_type=key_type), _tls.TlsOptions())
    assert reported.changes == []
    fixes = [f["fix"] for f in reported.findings if f["id"].startswith("tls.cipher_suites_")]
    assert [fix["options"] for fix in fixes] == (
        [{"restore_cipher_suites": True, "override_policy": True}] if broken else []
    )
    plan = _tls.plan_tls(tls_state(cipher_suites=suites, key_type=key_type), _tls.TlsOptions(override_policy=True))
    assert bool(plan.changes) is broken
    assert bool(plan.warnings) is broken
    if broken:
        written = plan.changes[0].value
        assert _tls.usable_suites(written.split(","), key_type, ["TLS 1.2"])


def test_a_restored_cipher_policy_waits_for_the_reboot_instead_of_being_written_again():
    # The first run wrote the policy; Schannel still uses the old (ECDSA-only) list until the next boot.
    first = _tls.plan_tls(
        tls_state(cipher_suites=["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"], key_type="RSA"),
        _tls.TlsOptions(override_policy=True),
    )
    (change,) = first.changes
    written = {_tls.CIPHER_POLICY_VALUE: {"type": change.value_type, "value": change.value}}
    again = _tls.plan_tls(
        tls_state(cipher_suites=["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"], key_type="RSA", cipher_policy=written),
        _tls.TlsOptions(),
    )
    assert again.changes == []
    assert again.reboot_required
    (incompatible,) = [f for f in again.findings if f["id"] == "tls.cipher_suites_incompatible"]
    assert incompatible["fix"] is None
    assert "next boot" in incompatible["title"]


def test_tls13_key_on_server_2019_has_no_effect_and_is_left_alone():
    forced = {"TLS 1.3": {"Enabled": dword(1), "DisabledByDefault": dword(0)}}
    plan = _tls.plan_tls(tls_state(os_build=17763, protocols=forced), _tls.TlsOptions())
    assert plan.changes == [] and not plan.reboot_required
    [note] = [f for f in plan.findings if f["id"].startswith("tls.tls13")]
    assert (note["id"], note["severity"], note["fix"]) == ("tls.tls13_no_effect", "info", None)
    assert plan.before["protocols"]["TLS 1.3"] is False  # no TLS 1.3 on 17763, whatever the key says
    untouched = _tls.plan_tls(tls_state(os_build=17763), _tls.TlsOptions()).findings
    assert not [f for f in untouched if f["id"].startswith("tls.tls13")]


def test_experimental_tls13_on_windows_10_is_switched_back_off():
    forced = {"TLS 1.3": {"Enabled": dword(1)}}
    plan = _tls.plan_tls(tls_state(os_build=19045, protocols=forced), _tls.TlsOptions())
    assert [(c.name, c.value) for c in plan.changes] == [("Enabled", None)]
    [found] = [f for f in plan.findings if f["id"].startswith("tls.tls13")]
    assert (found["id"], found["severity"]) == ("tls.tls13_forced_unsupported", "warning")
    assert plan.reboot_required


@pytest.mark.parametrize(
    ("suites", "protocols", "usable"),
    [
        # TLS 1.2 off: only the *_CBC_SHA suites still serve TLS 1.0/1.1.
        (["TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"], ["TLS 1.0", "TLS 1.1"], 1),
        (["TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "TLS_RSA_WITH_AES_256_CBC_SHA256"], ["TLS 1.0", "TLS 1.1"], 0),
        (["TLS_RSA_WITH_AES_256_CBC_SHA256", "TLS_RSA_WITH_3DES_EDE_CBC_SHA"], ["TLS 1.2"], 2),
        # NULL suites are only used when an application asks for them explicitly.
        (["TLS_RSA_WITH_NULL_SHA256", "TLS_RSA_WITH_NULL_SHA"], ["TLS 1.0", "TLS 1.1", "TLS 1.2"], 0),
        (["TLS_AES_256_GCM_SHA384"], ["TLS 1.2"], 0),
    ],
)
def test_suites_pair_with_the_tls_versions_they_serve(suites: list[str], protocols: list[str], usable: int):
    assert len(_tls.usable_suites(suites, "RSA", protocols)) == usable


def test_gcm_only_suites_with_tls12_off_are_incompatible():
    off = {"TLS 1.2": {"Enabled": dword(0)}}
    gcm = ["TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", "TLS_RSA_WITH_AES_128_GCM_SHA256"]
    reported = _tls.plan_tls(
        tls_state(os_build=17763, protocols=off, cipher_suites=gcm), _tls.TlsOptions(enable_tls12=False)
    )
    assert "tls.cipher_suites_incompatible" in [f["id"] for f in reported.findings]
    # Turning TLS 1.2 back on is what makes the same list usable: no cipher finding then.
    fixed = _tls.plan_tls(tls_state(os_build=17763, protocols=off, cipher_suites=gcm), _tls.TlsOptions())
    assert not [f for f in fixed.findings if f["id"].startswith("tls.cipher_suites_")]


# -- firewall ----------------------------------------------------------------------------------------------------


def plan(rules: list[dict[str, t.Any]], port: int = 3389, **options: t.Any) -> _firewall.FirewallPlan:
    return _firewall.plan_firewall(rules, port, _firewall.FirewallOptions(**options))


def test_enabled_builtin_rules_need_nothing():
    assert not plan([rule(), rule(**UDP)]).changes


def test_equivalent_spellings_compare_equal():
    same = rule(local_ports=["3380-3390"], protocol="6", program=r"C:\Windows\System32\svchost.exe", profiles=7)
    assert not plan([same, rule(**UDP)]).changes


def test_disabled_rule_is_enabled_for_the_chosen_profiles_with_its_scope_kept():
    scoped = rule(enabled=False, remote_addresses=["10.0.0.0/8"])
    changes = plan([scoped, rule(**UDP)]).changes
    assert [(c.kind, c.args) for c in changes] == [
        ("firewall.rule.set", {"name": "RemoteDesktop-UserMode-In-TCP", "enabled": True, "profiles": 3})
    ]


def test_moved_port_gets_own_rules_with_the_builtin_scope():
    changes = plan([rule(remote_addresses=["10.0.0.0/8"]), rule(**UDP)], port=3390).changes
    assert {c.name for c in changes} == set(_firewall.OWN_RULES.values())
    tcp = next(c for c in changes if c.name.endswith("TCP"))
    assert tcp.args["local_ports"] == ["3390"] and tcp.args["remote_addresses"] == ["10.0.0.0/8"]


def test_block_rule_is_found_and_disabled_only_when_asked():
    rules = [rule(), rule(**UDP), rule(name="Block-3389", action="Block", program="Any", service="Any")]
    reported = plan(rules)
    assert not reported.changes and reported.findings[0]["id"] == "firewall.block_rule_tcp"
    asked = plan(rules, disable_blocking_rules=True)
    assert [(c.name, c.args.get("enabled")) for c in asked.changes] == [("Block-3389", False)]


def test_block_rule_for_another_program_does_not_shadow_rdp():
    other = rule(name="Block-App", action="Block", local_ports=["Any"], program=r"C:\app\app.exe", service="Any")
    assert not plan([rule(), rule(**UDP), other]).findings


def test_group_policy_rules_are_never_changed():
    gpo = rule(name="GPO-Block", action="Block", policy_store_source_type="GroupPolicy")
    result = plan([rule(), rule(**UDP), gpo], disable_blocking_rules=True)
    assert not result.changes and result.findings[0]["fix"] is None


def test_public_any_needs_consent():
    with pytest.raises(_firewall.FirewallPlanError):
        plan([rule(enabled=False), rule(**UDP)], profiles=("Public",))
    allowed = plan([rule(enabled=False), rule(**UDP)], profiles=("Public",), allow_public_any=True)
    assert allowed.changes and allowed.warnings


def profiles_read(public_inbound: str = "Block", public_enabled: bool = True) -> list[dict[str, t.Any]]:
    return [
        {"name": "Domain", "enabled": True, "default_inbound_action": "Block"},
        {"name": "Private", "enabled": True, "default_inbound_action": "Block"},
        {"name": "Public", "enabled": public_enabled, "default_inbound_action": public_inbound},
    ]


def state(rules: list[dict[str, t.Any]], categories: list[str], **profiles: t.Any) -> _firewall.FirewallState:
    return _firewall.FirewallState(rules, 3389, None, profiles_read(**profiles), categories)


DOMAIN_PRIVATE = 3


@pytest.mark.parametrize(
    ("rules", "scope_any"),
    [
        # The host: the Remote Desktop rules limited to Domain/Private, open to any address.
        ([rule(profiles=DOMAIN_PRIVATE), rule(profiles=DOMAIN_PRIVATE, **UDP)], True),
        # Scoped rules: the fix needs no consent for Any.
        (
            [
                rule(profiles=DOMAIN_PRIVATE, remote_addresses=["10.0.0.0/8"]),
                rule(profiles=DOMAIN_PRIVATE, remote_addresses=["10.0.0.0/8"], **UDP),
            ],
            False,
        ),
    ],
)
def test_rules_are_judged_against_the_active_profile(rules: list[dict[str, t.Any]], scope_any: bool):
    result = _firewall.plan_state(state(rules, ["Public"]), _firewall.FirewallOptions())
    # Nothing changes without the options: Public is not among the profiles rdpfix was asked to open.
    assert result.changes == []
    found = {item["id"]: item for item in result.findings}
    tcp = found["firewall.rdp_tcp_blocked_active_profile"]
    assert tcp["severity"] == "critical" and found["firewall.rdp_udp_blocked_active_profile"]["severity"] == "warning"
    assert "active Public profile" in tcp["title"] and "default inbound action is Block" in tcp["title"]
    assert "Domain, Private only" in tcp["title"]
    wanted = {"profiles": ["Domain", "Private", "Public"]}
    if scope_any:
        wanted["allow_public_any"] = True
    assert tcp["fix"]["options"] == wanted
    assert result.report["server"]["active_profiles"] == ["Public"]
    # With the fix's options the plan opens Public, and then nothing is left closed.
    options = _firewall.FirewallOptions(profiles=("Domain", "Private", "Public"), allow_public_any=scope_any)
    fixed = _firewall.plan_state(state(rules, ["Public"]), options)
    assert {c.name for c in fixed.changes} == set(_firewall.BUILTIN_RULES.values())
    # The cause stays named, now with this run's rule change as its fix.
    (cause,) = [f for f in fixed.findings if f["id"] == "firewall.rdp_tcp_blocked_active_profile"]
    assert cause["fix"]["options"] == {} and "RemoteDesktop-UserMode-In-TCP" in cause["fix"]["description"]


@pytest.mark.parametrize(
    ("categories", "profiles"),
    [
        (["DomainAuthenticated"], {}),  # the active profile is among the chosen ones
        (["Public"], {"public_inbound": "Allow"}),  # the Public profile lets everything in
        (["Public"], {"public_enabled": False}),  # the firewall is off on Public
        ([], {}),  # the host did not say which networks are connected: nothing is guessed
    ],
)
def test_an_active_profile_that_lets_rdp_in_gives_no_finding(categories: list[str], profiles: dict[str, t.Any]):
    rules = [rule(profiles=DOMAIN_PRIVATE), rule(profiles=DOMAIN_PRIVATE, **UDP)]
    result = _firewall.plan_state(state(rules, categories, **profiles), _firewall.FirewallOptions())
    assert result.findings == [] and result.changes == []


def test_a_block_rule_on_the_active_profile_is_reported_even_outside_the_chosen_profiles():
    rules = [rule(), rule(**UDP), rule(name="Block-Public", action="Block", profiles=4, program="Any", service="Any")]
    assert not _firewall.plan_state(state(rules, ["Private"]), _firewall.FirewallOptions()).findings
    result = _firewall.plan_state(state(rules, ["Public", "Private"]), _firewall.FirewallOptions())
    assert [f["id"] for f in result.findings] == ["firewall.block_rule_tcp"]


def test_options_are_validated():
    with pytest.raises(_firewall.FirewallOptionError):
        _firewall.validate(_firewall.FirewallOptions(remote_addresses=("nope",)))
    with pytest.raises(_firewall.FirewallOptionError):
        _firewall.validate(_firewall.FirewallOptions(client_programs=("mstsc.exe",)))
    _firewall.validate(_firewall.FirewallOptions(remote_addresses=("10.0.0.0/8", "LocalSubnet", "10.1.1.1-10.1.1.9")))


def test_client_outbound_rule_and_third_party_firewall():
    products = {
        "available": True,
        "firewall": [
            {"name": "Contoso Firewall", "state": 0x061100},
            {"name": "Windows Defender Firewall", "state": 0x061100},
        ],
    }
    result = _firewall.plan_firewall(
        [], 3389, _firewall.FirewallOptions(sides=("client",), client_programs=("mstsc",)), products
    )
    assert [c.name for c in result.changes] == ["rdpfix-RemoteDesktop-Client-Out-mstsc"]
    assert [f["evidence"]["product"] for f in result.findings] == ["Contoso Firewall"]
    # As firewall.rules.list reports the new rule: its port filters are lists, Any without a port.
    created = dict(
        result.changes[0].args,
        profiles=7,
        enabled=True,
        local_ports=["Any"],
        remote_ports=["Any"],
        policy_store_source_type="Local",
    )
    again = _firewall.plan_firewall(
        [created], 3389, _firewall.FirewallOptions(sides=("client",), client_programs=("mstsc",)), products
    )
    assert not again.changes


def test_no_aead_list_is_written_where_neither_tls12_nor_tls13_is_on():
    # TLS 1.0/1.1 only (TLS 1.2 kept off by enable_tls12=false) and an empty list: AEAD suites could serve nothing.
    off = {"TLS 1.2": {"Enabled": dword(0)}}
    options = _tls.TlsOptions(enable_tls12=False, override_policy=True)
    plan = _tls.plan_tls(tls_state(os_build=17763, protocols=off, cipher_suites=[]), options)
    [empty] = [f for f in plan.findings if f["id"] == "tls.cipher_suites_empty"]
    assert empty["fix"] is None and "enable_tls12" in empty["title"]
    assert not [c for c in plan.changes if c.path == _tls.CIPHER_POLICY_KEY]
    # With TLS 1.2 turned back on, the same plan writes it.
    fixed = _tls.plan_tls(
        tls_state(os_build=17763, protocols=off, cipher_suites=[]), _tls.TlsOptions(override_policy=True)
    )
    assert [c for c in fixed.changes if c.path == _tls.CIPHER_POLICY_KEY]
