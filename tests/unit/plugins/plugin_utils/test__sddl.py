"""The SDDL helper: parsing, access evaluation, minimal repair, comparison."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _sddl as sddl

DEFAULT_FOLDER = "O:SYG:SYD:PAI(A;;0x12019f;;;WD)(A;;FA;;;BA)"
SESSIONENV = "S-1-5-80-4022436659-1090538466-1613889075-870485073-3428993833"
RDP_KEY_2019 = "O:SYG:SYD:P(A;;FA;;;SY)(A;;FR;;;NS)(A;;FA;;;" + SESSIONENV + ")"


def test_parse_default_machinekeys_folder() -> None:
    descriptor = sddl.parse(DEFAULT_FOLDER)
    assert descriptor.owner == sddl.SID_SYSTEM
    assert descriptor.group == sddl.SID_SYSTEM
    assert descriptor.protected
    assert descriptor.dacl == (
        sddl.Ace("A", sddl.SID_EVERYONE, 0x12019F),
        sddl.Ace("A", sddl.SID_ADMINISTRATORS, sddl.FILE_ALL_ACCESS),
    )


def test_round_trip_keeps_meaning_and_spelling() -> None:
    for text in (DEFAULT_FOLDER, RDP_KEY_2019, "O:BAG:SYD:AI(A;OICIID;FA;;;SY)(A;OICIID;FA;;;BA)"):
        assert sddl.parse(text).to_sddl() == text


def test_sacl_and_object_aces_survive_unchanged() -> None:
    text = "O:SYG:SYD:(A;;FA;;;SY)(OA;;CR;ab721a53-1e2f-11d0-9819-00aa0040529b;;WD)S:AI(AU;SA;FA;;;WD)"
    descriptor = sddl.parse(text)
    assert descriptor.sacl == "AI(AU;SA;FA;;;WD)"
    assert descriptor.opaque_aces == ("(OA;;CR;ab721a53-1e2f-11d0-9819-00aa0040529b;;WD)",)
    assert sddl.parse(descriptor.to_sddl()) == descriptor


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "O:SYD:(A;;FA;;SY)",
        "O:SYD:(A;;ZZ;;;SY)",
        "O:SYD:(A;;FA;;;SY",
        "O:SYO:BA",
        "O:S-x",
        "D:PXY(A;;FA;;;SY)",
    ],
)
def test_bad_sddl_raises_sddl_error(text: str) -> None:
    with pytest.raises(sddl.SddlError):
        sddl.parse(text)
    assert not sddl.is_valid(text)


def test_network_service_read_on_rdp_key() -> None:
    good = sddl.parse(RDP_KEY_2019)
    assert sddl.can_read(good, sddl.NETWORK_SERVICE_IDENTITIES)
    without = sddl.parse("O:SYG:SYD:P(A;;FA;;;SY)(A;;FA;;;BA)")
    assert not sddl.can_read(without, sddl.NETWORK_SERVICE_IDENTITIES)
    # Generic read maps to FILE_GENERIC_READ, which includes reading the data.
    generic = sddl.parse("O:SYG:SYD:P(A;;GR;;;NS)")
    assert sddl.can_read(generic, sddl.NETWORK_SERVICE_IDENTITIES)
    # Everyone counts for NETWORK SERVICE too.
    assert sddl.can_read(sddl.parse("O:SYD:(A;;FR;;;WD)"), sddl.NETWORK_SERVICE_IDENTITIES)


def test_builtin_users_counts_for_network_service() -> None:
    # Authenticated Users is a member of BUILTIN\Users, and NETWORK SERVICE's token holds Authenticated Users.
    assert sddl.can_read(sddl.parse("O:SYG:SYD:P(A;;FA;;;SY)(A;;FR;;;BU)"), sddl.NETWORK_SERVICE_IDENTITIES)
    # A deny for Users takes the read away as well.
    denied = sddl.parse("O:SYG:SYD:P(D;;FR;;;BU)(A;;FA;;;SY)(A;;FR;;;NS)")
    assert not sddl.can_read(denied, sddl.NETWORK_SERVICE_IDENTITIES)


def test_deny_wins_and_inherit_only_does_not_apply() -> None:
    denied = sddl.parse("O:SYG:SYD:P(D;;FR;;;NS)(A;;FA;;;SY)(A;;FR;;;NS)")
    assert not sddl.can_read(denied, sddl.NETWORK_SERVICE_IDENTITIES)
    inherit_only = sddl.parse("O:SYG:SYD:P(A;OICIIO;FR;;;NS)")
    assert not sddl.can_read(inherit_only, sddl.NETWORK_SERVICE_IDENTITIES)
    assert (
        sddl.granted_rights(sddl.parse("O:SYD:NO_ACCESS_CONTROL"), {sddl.SID_NETWORK_SERVICE}) == sddl.FILE_ALL_ACCESS
    )


def test_missing_entries_names_only_what_lacks() -> None:
    required = [
        sddl.Requirement(sddl.SID_SYSTEM, sddl.FILE_ALL_ACCESS),
        sddl.Requirement(sddl.SID_NETWORK_SERVICE, sddl.FILE_GENERIC_READ),
        sddl.Requirement(sddl.SID_SESSIONENV, sddl.FILE_ALL_ACCESS),
    ]
    assert sddl.missing_entries(sddl.parse(RDP_KEY_2019), required) == []
    broken = sddl.parse("O:SYG:SYD:P(A;;FA;;;SY)(A;;FA;;;" + SESSIONENV + ")")
    assert sddl.missing_entries(broken, required) == [required[1]]
    # Read-only is not full control.
    weak = sddl.parse("O:SYG:SYD:P(A;;FR;;;SY)(A;;FR;;;NS)(A;;FA;;;" + SESSIONENV + ")")
    assert sddl.missing_entries(weak, required) == [required[0]]


def test_with_entries_only_adds_and_keeps_everything_else() -> None:
    broken = sddl.parse("O:BAG:SYD:P(D;;FR;;;NS)(A;;FA;;;SY)(A;;FR;;;S-1-5-21-1-2-3-1001)(A;ID;FA;;;BA)")
    required = [sddl.Requirement(sddl.SID_NETWORK_SERVICE, sddl.FILE_GENERIC_READ)]
    repaired = sddl.with_entries(broken, required, owner=sddl.SID_SYSTEM)
    assert repaired.owner == sddl.SID_SYSTEM
    assert sddl.can_read(repaired, sddl.NETWORK_SERVICE_IDENTITIES)
    assert sddl.missing_entries(repaired, required) == []
    # The unrelated user keeps its entry, the inherited ACE stays last, the blocking deny is gone.
    assert repaired.to_sddl() == "O:SYG:SYD:P(A;;FA;;;SY)(A;;FR;;;S-1-5-21-1-2-3-1001)(A;;FR;;;NS)(A;ID;FA;;;BA)"
    # Nothing to add: unchanged.
    assert sddl.with_entries(repaired, required) == repaired


def test_equivalent_ignores_order_and_spelling_but_not_content() -> None:
    assert sddl.equivalent(
        sddl.parse(DEFAULT_FOLDER), sddl.parse("O:SYG:BAD:PAI(A;;0x1f01ff;;;BA)(A;;0x12019F;;;S-1-1-0)")
    )
    assert not sddl.equivalent(sddl.parse(DEFAULT_FOLDER), sddl.parse("O:SYG:SYD:AI(A;;0x12019f;;;WD)(A;;FA;;;BA)"))
    assert not sddl.equivalent(sddl.parse(DEFAULT_FOLDER), sddl.parse("O:BAG:SYD:PAI(A;;0x12019f;;;WD)(A;;FA;;;BA)"))
    assert not sddl.equivalent(
        sddl.parse(DEFAULT_FOLDER), sddl.parse("O:SYG:SYD:PAI(A;;0x12019f;;;WD)(A;;FA;;;BA)(A;;FR;;;NS)")
    )


def test_differences_reports_what_to_fix() -> None:
    wrong = sddl.parse("O:BAG:SYD:AI(A;OICI;FA;;;BU)(A;;FA;;;BA)")
    found = sddl.differences(wrong, sddl.parse(DEFAULT_FOLDER))
    assert found["owner"] == {"actual": "BUILTIN\\Administrators", "expected": "NT AUTHORITY\\SYSTEM"}
    assert found["inheritance_blocked"] == {"actual": False, "expected": True}
    assert [entry["account"] for entry in found["unexpected_entries"]] == ["BUILTIN\\Users"]  # type: ignore[index]
    assert [entry["account"] for entry in found["missing_entries"]] == ["Everyone"]  # type: ignore[index]
    assert sddl.differences(sddl.parse(DEFAULT_FOLDER), sddl.parse(DEFAULT_FOLDER)) == {}


_SIDS = st.sampled_from(["SY", "NS", "BA", "WD", "BU", "S-1-5-21-1-2-3-500", sddl.SID_SESSIONENV])
_RIGHTS = st.sampled_from(["FA", "FR", "FW", "GR", "GA", "0x12019f", "0x1", "RCSD"])
_FLAGS = st.sampled_from(["", "OI", "CI", "OICI", "ID", "OICIID", "OICIIO"])
_ACES = st.lists(st.tuples(st.sampled_from("AD"), _FLAGS, _RIGHTS, _SIDS), max_size=6)


@given(owner=_SIDS, aces=_ACES, protected=st.booleans())
def test_parse_format_is_stable(owner: str, aces: list[tuple[str, str, str, str]], protected: bool) -> None:
    text = f"O:{owner}G:SYD:{'P' if protected else ''}" + "".join(f"({k};{f};{r};;;{s})" for k, f, r, s in aces)
    descriptor = sddl.parse(text)
    assert sddl.parse(descriptor.to_sddl()) == descriptor
    assert sddl.equivalent(descriptor, sddl.parse(descriptor.to_sddl()))


@given(aces=_ACES)
def test_with_entries_always_satisfies_requirements(aces: list[tuple[str, str, str, str]]) -> None:
    descriptor = sddl.parse("O:SYG:SYD:P" + "".join(f"({k};{f};{r};;;{s})" for k, f, r, s in aces))
    required = [
        sddl.Requirement(sddl.SID_SYSTEM, sddl.FILE_ALL_ACCESS),
        sddl.Requirement(sddl.SID_NETWORK_SERVICE, sddl.FILE_GENERIC_READ),
    ]
    repaired = sddl.with_entries(descriptor, required)
    assert sddl.missing_entries(repaired, required) == []
    # Only deny ACEs of the required accounts may disappear; every other entry is still there.
    kept = [ace for ace in descriptor.dacl or () if not (ace.kind == "D" and ace.sid in {r.sid for r in required})]
    for ace in kept:
        assert ace in (repaired.dacl or ())
