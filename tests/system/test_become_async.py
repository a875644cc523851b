"""become (runas) and async through Ansible's own Windows module path, against one lab host, in one playbook run.

The lab checks the become payload as Windows would (the account, its password) and runs each batch with that account's
token; an async task runs each of its batches as a background job on the host (Ansible's async wrapper and watchdog),
which the module polls with ansible.windows.async_status, and Ansible's own polling after the task reads the module's
result from the job file. fix_rdp.yml as SYSTEM over psrp is in test_transports_playbook.py.
"""

from __future__ import annotations

import typing as t

import pytest
import yaml
from harness import HOSTS_DIR, Lab, PlaybookRun, run_playbook, start_lab

pytestmark = [pytest.mark.system, pytest.mark.become, pytest.mark.async_task]

HOST = "healthy"
SYSTEM = "NT AUTHORITY\\SYSTEM"

PLAYBOOK = [
    {
        "name": "become and async against the lab",
        "hosts": HOST,
        "gather_facts": False,
        "tasks": [
            {"name": "as the login user", "rdpfix.rdp.selftest": {}, "register": "plain"},
            {
                "name": "as SYSTEM",
                "rdpfix.rdp.selftest": {},
                "become": True,
                "become_method": "runas",
                "become_user": "SYSTEM",
            },
            {
                "name": "as the login user with a wrong password",
                "rdpfix.rdp.selftest": {},
                "become": True,
                "become_method": "runas",
                "become_user": "{{ ansible_user }}",
                "vars": {"ansible_become_password": "not-the-password"},
                "ignore_errors": True,
            },
            {"name": "facts", "rdpfix.rdp.facts": {}, "register": "snap"},
            {
                "name": "facts as an async task, as SYSTEM",
                "rdpfix.rdp.facts": {},
                "async": 60,
                "poll": 1,
                "become": True,
                "become_method": "runas",
                "become_user": "SYSTEM",
            },
            {"name": "fire and forget", "rdpfix.rdp.facts": {}, "async": 60, "poll": 0, "ignore_errors": True},
            {
                # Planned from the snapshot, nothing sent by the plan itself: the result still reaches Ansible's
                # polling through a job (an empty batch run as one).
                "name": "firewall audit from the snapshot as an async task",
                "rdpfix.rdp.firewall": {"snapshot": "{{ snap }}"},
                "async": 60,
                "poll": 1,
                "check_mode": True,
            },
        ],
    }
]


@pytest.fixture(scope="module")
def played(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[tuple[Lab, PlaybookRun]]:
    directory = tmp_path_factory.mktemp("become-async")
    lab = start_lab(directory, [HOSTS_DIR / f"{HOST}.yml"])
    try:
        playbook = directory / "play.yml"
        playbook.write_text(yaml.safe_dump(PLAYBOOK, sort_keys=False), encoding="utf-8")
        lab.reset_counters()
        yield lab, run_playbook(playbook, lab.inventory)
    finally:
        lab.down()


def one(run: PlaybookRun, task: str) -> dict[str, t.Any]:
    return run.results(task)[HOST]


def caller(result: dict[str, t.Any]) -> dict[str, t.Any]:
    return t.cast(dict[str, t.Any], result["report"]["environment"]["caller"])


def test_become_system_runs_the_agent_with_systems_token(played: tuple[Lab, PlaybookRun]) -> None:
    _lab, run = played
    assert run.stats[HOST]["failures"] == 0, run.stdout[-3000:]
    plain, system = one(run, "as the login user"), one(run, "as SYSTEM")
    assert not plain.get("failed") and not system.get("failed"), system.get("msg")
    assert caller(plain)["system"] is False and caller(plain)["user"].endswith("\\rdpadmin")
    assert (caller(system)["system"], caller(system)["user"]) == (True, SYSTEM)
    # The same commands whoever runs them: become rides inside each payload.
    assert plain["round_trips"] == system["round_trips"] > 0


def test_a_wrong_become_password_fails_as_runas_does(played: tuple[Lab, PlaybookRun]) -> None:
    _lab, run = played
    refused = one(run, "as the login user with a wrong password")
    assert refused["failed"] is True
    assert "Failed to logon" in refused["msg"] and "Win32ErrorCode 1326" in refused["msg"]


def test_an_async_task_returns_the_modules_own_result(played: tuple[Lab, PlaybookRun]) -> None:
    _lab, run = played
    synchronous, background = one(run, "facts"), one(run, "facts as an async task, as SYSTEM")
    assert not background.get("failed"), background.get("msg")
    assert background["finished"] is True and background["ansible_job_id"]
    assert background["findings"] == synchronous["findings"]
    assert background["changed"] is False
    # One batch: started as a job, polled until it ended, its job file removed, then the result handed over.
    assert synchronous["round_trips"] == 1
    assert background["round_trips"] >= 4


def test_an_async_task_that_sends_no_batch_returns_the_modules_own_result(played: tuple[Lab, PlaybookRun]) -> None:
    _lab, run = played
    audit = one(run, "firewall audit from the snapshot as an async task")
    assert not audit.get("failed"), audit.get("msg")
    assert audit["finished"] is True and audit["ansible_job_id"] and audit["changed"] is False
    assert isinstance(audit["findings"], list) and audit["replanned"] is None
    # The empty batch's start and its polls, then the result written; nothing the plan needed was read from the host.
    assert audit["round_trips"] >= 3


def test_fire_and_forget_is_refused_before_anything_is_sent(played: tuple[Lab, PlaybookRun]) -> None:
    _lab, run = played
    refused = one(run, "fire and forget")
    assert refused["failed"] is True and "poll: 0" in refused["msg"]
    assert refused["round_trips"] == 0


def test_the_lab_saw_who_ran_each_batch_and_no_job_file_is_left(played: tuple[Lab, PlaybookRun]) -> None:
    lab, _run = played
    host = lab.state()[HOST]
    identities = host["batch_identities"]
    # selftest: its batches as the user, then as SYSTEM; facts as the user; the async facts job and its result as
    # SYSTEM. The refused logon ran nothing.
    assert SYSTEM in identities and any(name.endswith("\\rdpadmin") for name in identities)
    files = host["snapshot"]["files"]
    assert not [path for path in files if ".ansible_async\\j" in path]
