"""become (runas) and async through Ansible's module path, driven in-process against the lab (DirectConnection): the
lab checks each payload as Windows would and runs it with the become account's token or as a background job."""

from __future__ import annotations

import base64
import json
import typing as t
from pathlib import Path
from types import SimpleNamespace

import pytest
from ansible.plugins.loader import become_loader

rdplab_direct = pytest.importorskip("rdplab.direct")
rdplab_fleet = pytest.importorskip("rdplab.model.fleet")
rdplab_bootstrap = pytest.importorskip("rdplab.bootstrap")
rdplab_client = pytest.importorskip("rdplab.ansible_client")

from ansible_collections.rdpfix.rdp.plugins.action import certificate as certificate_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import facts as facts_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.action import selftest as selftest_action  # noqa: E402
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _agent, _wrapper  # noqa: E402

HOSTS = Path(__file__).resolve().parents[3] / "lab" / "hosts"
SYSTEM = "NT AUTHORITY\\SYSTEM"
POLL = 0.1


def load(name: str) -> t.Any:
    return rdplab_fleet.load_fleet([HOSTS / f"{name}.yml"])[0]


def runas(user: str, password: str | None = None) -> t.Any:
    plugin = become_loader.get("runas")
    plugin.set_options(direct={"become_user": user} | ({"become_pass": password} if password else {}))
    return plugin


def run(
    module: t.Any, host: t.Any, *, become: t.Any = None, async_val: int = 0, poll: float = 0, **args: t.Any
) -> tuple[dict[str, t.Any], t.Any]:
    connection = rdplab_direct.DirectConnection(host, become=become)
    task = SimpleNamespace(
        args=args, check_mode=False, diff=False, async_val=async_val, poll=poll, action=f"rdpfix.rdp.{module.__name__}"
    )
    action = module.ActionModule(task, connection, SimpleNamespace(remote_addr="127.0.0.2"), None, None, None)
    return t.cast(dict[str, t.Any], action.run(task_vars={"inventory_hostname": host.name})), connection


def actions_of(stdin: bytes) -> list[str]:
    manifest = json.loads(stdin.decode("utf-8").split("\n")[2])
    return [item["name"] for item in manifest["actions"]]


# -- become ---------------------------------------------------------------------------------------------------------


def test_become_system_runs_every_batch_with_systems_token() -> None:
    host = load("healthy")
    result, connection = run(selftest_action, host, become=runas("SYSTEM"))
    assert not result.get("failed"), result.get("msg")
    caller = result["report"]["environment"]["caller"]
    assert (caller["user"], caller["system"]) == (SYSTEM, True)
    assert host.batch_identities == [SYSTEM] * result["round_trips"]
    assert len(connection.wire) == result["round_trips"]
    assert all(actions_of(stdin)[0] == "become_wrapper.ps1" for _command, stdin in connection.wire)


def test_without_become_the_login_token_runs() -> None:
    host = load("healthy")
    result, _connection = run(selftest_action, host)
    assert result["report"]["environment"]["caller"]["system"] is False
    assert host.batch_identities == [f"WEB01\\{host.username}"] * result["round_trips"]


def key_open_errors(host: t.Any, become: t.Any = None) -> dict[str, str | None]:
    batch = _agent.Batch(on_error="continue")
    batch.add("cert.list", store="Remote Desktop")
    result = _agent.run_batch(
        rdplab_direct.DirectConnection(host), host.name, batch, _wrapper.ModuleWrapper(become_plugin=become)
    )
    return {cert["thumbprint"]: (cert["key"] or {}).get("open_error") for cert in result.data(0)["certificates"]}


def test_become_changes_what_the_agent_may_read() -> None:
    # From build 17763 the RDP key file's ACL names SYSTEM and not Administrators: the key provider refuses an
    # Administrator (docs/agent-protocol.md, cert.list), LocalSystem opens it. The token, not the transport, decides.
    as_user = key_open_errors(load("healthy"))
    as_system = key_open_errors(load("healthy"), runas("SYSTEM"))
    assert set(as_user) == set(as_system) and as_user
    assert set(as_user.values()) == {"AccessDenied"}
    assert set(as_system.values()) == {None}


def test_a_wrong_password_fails_as_runas_does_and_runs_nothing() -> None:
    host = load("healthy")
    result, connection = run(facts_action, host, become=runas(host.username, "wrong"))
    assert result["failed"] is True
    assert f"Failed to logon .\\{host.username} (The user name or password is incorrect" in result["msg"]
    assert len(connection.wire) == 1 and host.batch_identities == []


def test_the_right_password_runs_as_that_account() -> None:
    host = load("healthy")
    result, _connection = run(selftest_action, host, become=runas(host.username, host.password))
    assert not result.get("failed"), result.get("msg")
    assert result["report"]["environment"]["caller"]["user"] == f"WEB01\\{host.username}"


def test_an_unknown_account_is_not_mapped() -> None:
    result, _connection = run(facts_action, load("healthy"), become=runas("nobody", "x"))
    assert result["failed"] is True and "could not be translated" in result["msg"]


# -- async ------------------------------------------------------------------------------------------------------------


def test_an_async_write_module_runs_each_batch_as_a_job_and_hands_its_result_over() -> None:
    synchronous, _connection = run(certificate_action, load("expired-selfsigned"), allow_session_disruption=True)
    host = load("expired-selfsigned")
    result, connection = run(certificate_action, host, async_val=60, poll=POLL, allow_session_disruption=True)
    assert not synchronous.get("failed"), synchronous.get("msg")
    # What the task returns is a job for Ansible to poll; the module's result is in its result file.
    assert set(result) == {"ansible_job_id", "results_file", "started", "finished", "changed"}
    assert result["finished"] == 0 and result["changed"] is True
    entry = host.filesystem.get(result["results_file"])
    handed = json.loads(entry.content.decode("utf-8-sig"))
    assert handed["finished"] == 1 and handed["ansible_job_id"] == result["ansible_job_id"]
    assert handed["changed"] is True and handed["findings"] == synchronous["findings"]
    assert handed["actions"] == synchronous["actions"]
    # Every batch went out as a job (async wrapper + watchdog), polled with async_status and cleaned up; the last
    # command writes the result file.
    kinds = [actions_of(stdin) for _command, stdin in connection.wire]
    jobs = [kind for kind in kinds if "async_wrapper.ps1" in kind]
    assert len(jobs) == synchronous["round_trips"]
    assert handed["round_trips"] == len(connection.wire)
    # Only the result file is left in the job folder; Ansible's own polling reads and removes it.
    folder = result["results_file"].rsplit("\\", 1)[0]
    listing = [entry.path for entry in host.filesystem.entries.values() if entry.path.startswith(folder + "\\")]
    assert listing == [result["results_file"]]
    status = rdplab_bootstrap.execute(host, *rdplab_client.async_status_command(result["ansible_job_id"]))
    assert json.loads(status.stdout)["findings"] == synchronous["findings"]


def test_fire_and_forget_is_refused_before_anything_is_sent() -> None:
    host = load("healthy")
    result, connection = run(facts_action, host, async_val=60, poll=0)
    assert result["failed"] is True and "poll: 0" in result["msg"]
    assert connection.wire == [] and result["round_trips"] == 0


def test_a_job_that_outlives_async_fails_the_read_batch() -> None:
    host = load("healthy")
    rdplab_bootstrap.JOB_START_DELAY, saved = 2.0, rdplab_bootstrap.JOB_START_DELAY
    try:
        result, _connection = run(facts_action, host, async_val=1, poll=0.5)
    finally:
        rdplab_bootstrap.JOB_START_DELAY = saved
    assert result["failed"] is True
    assert "did not finish within 1 seconds" in result["msg"]


def test_the_lab_refuses_a_module_that_is_not_the_agent(tmp_path: Path) -> None:
    other = tmp_path / "win_ping.ps1"
    other.write_bytes(b"#Requires -Version 5.1\r\n@{ ping = 'pong' } | ConvertTo-Json\r\n")
    command, stdin = rdplab_client.module_command({"v": 1, "ops": []}, agent=other)
    outcome = rdplab_bootstrap.execute(load("healthy"), command, stdin)
    assert outcome.rc == 1 and b"is not the collection's _agent.ps1" in outcome.stderr


def test_the_lab_refuses_a_tampered_wrapper_script() -> None:
    command, stdin = rdplab_client.module_command({"v": 1, "on_error": "continue", "ops": []})
    wrapper, separator, manifest = stdin.decode("utf-8").split("\n")
    document = json.loads(manifest)
    script = base64.b64decode(document["scripts"]["module_wrapper.ps1"]["script"]) + b"\r\nRemove-Item C:\\ -Recurse"
    document["scripts"]["module_wrapper.ps1"]["script"] = base64.b64encode(script).decode("ascii")
    tampered = "\n".join([wrapper, separator, json.dumps(document)]).encode("utf-8")
    outcome = rdplab_bootstrap.execute(load("healthy"), command, tampered)
    assert outcome.rc == 1 and b"differs from the installed ansible-core's" in outcome.stderr
