"""The MachineKeys planner's pure parts: options, expected ACL per build, key assessment from agent data."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _machinekeys as mk
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _sddl as sd

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def test_expected_entries_follow_the_os_build() -> None:
    sids_2016 = {requirement.sid for requirement in mk.expected_key_requirements(14393)}
    sids_2019 = {requirement.sid for requirement in mk.expected_key_requirements(17763)}
    assert sd.SID_ADMINISTRATORS in sids_2016 and sd.SID_SESSIONENV not in sids_2016
    assert sd.SID_SESSIONENV in sids_2019 and sd.SID_ADMINISTRATORS not in sids_2019
    assert {sd.SID_SYSTEM, sd.SID_NETWORK_SERVICE} <= sids_2016 & sids_2019


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"state": "restored"}, "needs manifest_id"),
        ({"state": "restored", "manifest_id": "..\\..\\Windows"}, "is not a manifest id"),
        ({"state": "restored", "manifest_id": "a/b"}, "is not a manifest id"),
        ({"manifest_id": "20261125T103000Z-machinekeys-1a2b"}, "only used with state=restored"),
    ],
)
def test_bad_options_are_refused(params: dict[str, str], message: str) -> None:
    with pytest.raises(mk.PlanError, match=message):
        mk.Options.from_params(params)


def test_certificate_options_never_do_the_certificate_modules_work() -> None:
    options = mk.Options.from_params({"strategy": "regenerate", "restart_service": "TermService"})
    cert_options = options.certificate_options()
    assert cert_options.expiry_threshold_days == 0
    assert cert_options.remove_missing_pin is False
    assert cert_options.restart_service == "TermService"
    assert cert_options.allow_session_disruption is False


def test_a_poll_waits_on_the_host_before_it_reads() -> None:
    plain, plain_index = mk.build_read_batch(mk.Options(), NOW)
    poll, poll_index = mk.build_read_batch(mk.Options(), NOW, wait_ms=5000)
    assert poll.ops[0] == {"op": "util.sleep", "args": {"milliseconds": 5000}}
    assert poll.ops[1:] == plain.ops and not poll.writes
    # Every position the parser reads from moves by the one leading wait.
    assert poll.ops[poll_index.store] == plain.ops[plain_index.store]
    assert poll.ops[poll_index.cert.listener] == plain.ops[plain_index.cert.listener]
    assert poll_index.cert_count == plain_index.cert_count + 1


def test_read_batch_is_one_batch_of_reads() -> None:
    batch, index = mk.build_read_batch(mk.Options(), NOW)
    assert not batch.writes and batch.on_error == "continue"
    assert batch.ops[index.store] == {
        "op": "dir.stat",
        "args": {"path": "C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys"},
    }
    events = batch.ops[index.events]
    assert events["op"] == "events.query" and events["args"]["since"] == "2026-10-26T10:00:00Z"
    assert {provider for query in events["args"]["queries"] for provider in query["providers"]} == {
        "Schannel",
        "Microsoft-Windows-TerminalServices-RemoteConnectionManager",
    }


def test_folder_listing_keeps_unreadable_acls_as_none() -> None:
    folder = mk._folder(
        "C:\\K",
        {
            "exists": True,
            "owner": "NT AUTHORITY\\SYSTEM",
            "sddl": mk.DEFAULT_FOLDER_SDDL,
            "entries": [{"name": "a_1", "is_dir": False, "size": 0, "owner": None, "sddl": None}],
        },
    )
    entry = folder.find("A_1")
    assert entry is not None and entry.sddl is None and entry.size == 0 and entry.path == "C:\\K\\a_1"
    assert folder.contains("C:\\k\\a_1") and not folder.contains("C:\\K\\sub\\a_1")
