"""The certificate action plugin end to end against a small scripted host: round trips, writes, results, failures."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import typing as t
from types import SimpleNamespace

import pytest
from ansible.errors import AnsibleConnectionFailure
from ansible.plugins.shell.powershell import ShellModule as PowerShellShell

from ansible_collections.rdpfix.rdp.plugins.action.certificate import ActionModule
from ansible_collections.rdpfix.rdp.plugins.plugin_utils import _agent

KEY_SDDL = "O:SYG:SYD:P(A;;FA;;;SY)(A;;FR;;;NS)(A;;FR;;;BA)"
KEY_PATH = "C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys\\f686aace6942fb7f7ceb231212eef4a4_guid"
PREREQUISITES = ("CertPropSvc", "KeyIso", "CryptSvc", "SessionEnv", "TermService", "UmRdpService")


class GuardDifference(t.NamedTuple):
    message: str
    actual: t.Any


class ScriptedHost:
    """Executes the agent's batches against a few dictionaries, enough for the certificate module.

    Restarting SessionEnv/TermService makes a new self-signed certificate appear after ``regeneration_delay``
    util.sleep calls (0: at once), as Windows does within seconds.
    """

    def __init__(
        self,
        factory: t.Any,
        *,
        rd_days: float | None = 150,
        pin: str | None = None,
        broker: bool = False,
        sessions: t.Sequence[dict[str, t.Any]] = (),
        regeneration_delay: int = 1,
        fail_op: str | None = None,
    ) -> None:
        self.factory = factory
        self.rd: list[dict[str, t.Any]] = [self.cert_entry(factory.make("WEB01", days_left=rd_days))] if rd_days else []
        self.my: list[dict[str, t.Any]] = []
        self.pin = pin
        self.broker = broker
        self.sessions = list(sessions)
        self.regeneration_delay = regeneration_delay
        self.countdown: int | None = None
        self.fail_op = fail_op
        self.files: dict[str, bytes] = {KEY_PATH: b"key material"}
        self.commands = 0
        self.writes = 0
        self.batches: list[dict[str, t.Any]] = []
        self.lock: dict[str, t.Any] | None = None

    @staticmethod
    def cert_entry(der: bytes) -> dict[str, t.Any]:
        return {
            "thumbprint": hashlib.sha1(der).hexdigest().upper(),
            "der_b64": base64.b64encode(der).decode(),
            "has_private_key": True,
            "key": {"provider_kind": "capi", "path": KEY_PATH, "exists": True, "size": 12, "sddl": KEY_SDDL},
        }

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        # Ansible's module bootstrap, the batch inside its manifest as the agent module's argument.
        assert cmd == PowerShellShell().build_module_command("", "#!powershell", "").strip()
        self.commands += 1
        manifest = json.loads((in_data or b"").decode().split("\n")[2])
        batch = json.loads(manifest["actions"][-1]["params"]["Variables"][0]["Value"]["batch"])
        self.batches.append(batch)
        results: list[dict[str, t.Any]] = []
        stopped = False
        for item in batch["ops"]:
            if stopped and not item.get("always"):
                results.append({"op": item["op"], "ok": False, "skipped": True})
                continue
            if item["op"] == self.fail_op:
                results.append({"op": item["op"], "ok": False, "error": {"type": "DiskFull", "message": "disk full"}})
                stopped = batch["on_error"] == "stop"
                continue
            data = getattr(self, "op_" + item["op"].replace(".", "_"))(**item["args"])
            if isinstance(data, GuardDifference):
                results.append(
                    {
                        "op": "guard",
                        "ok": False,
                        "error": {"type": "GuardFailed", "message": data.message},
                        "data": {"actual": data.actual},
                    }
                )
                stopped = batch["on_error"] == "stop"
                continue
            if item["op"] in _agent.WRITE_OPERATIONS:
                self.writes += 1
            results.append({"op": item["op"], "ok": True, "data": data})
        return 0, json.dumps({"v": 1, "results": results}).encode(), b""

    # read operations
    def op_events_query(self, **_args: t.Any) -> dict[str, t.Any]:
        # No Remote Connection Manager event: a regeneration that never shows has no reason Windows gave.
        return {"events": [], "truncated": False}

    def op_system_info(self) -> dict[str, t.Any]:
        return {
            "hostname": "WEB01",
            "fqdn": "web01.corp.example",
            "connection_broker": self.broker,
            "program_data": "C:\\ProgramData",
        }

    def op_listener_get(self, terminal_name: str) -> dict[str, t.Any]:
        if self.pin and any(cert["thumbprint"] == self.pin for cert in self.my):
            return {"ssl_certificate_sha1_hash": self.pin, "ssl_certificate_sha1_hash_type": 3}
        if self.rd:
            return {"ssl_certificate_sha1_hash": self.rd[0]["thumbprint"], "ssl_certificate_sha1_hash_type": 1}
        return {"ssl_certificate_sha1_hash": None, "ssl_certificate_sha1_hash_type": 0}

    def op_registry_get(self, path: str, names: list[str]) -> dict[str, t.Any]:
        values = {"SSLCertificateSHA1Hash": {"type": "REG_BINARY", "value": self.pin.lower()}} if self.pin else {}
        return {"exists": True, "values": values, "subkeys": []}

    def op_cert_list(self, store: str) -> dict[str, t.Any]:
        return {"store": store, "exists": True, "certificates": list(self.rd if store == "Remote Desktop" else self.my)}

    def op_service_get(self, names: list[str]) -> dict[str, t.Any]:
        return {"services": {name: {"exists": True, "status": "Running", "start_type": "Automatic"} for name in names}}

    def op_session_list(self) -> dict[str, t.Any]:
        return {"sessions": self.sessions}

    def op_util_sleep(self, milliseconds: int) -> dict[str, t.Any]:
        if self.countdown is not None:
            self.countdown -= 1
            self.regenerate_when_due()
        return {"slept_ms": milliseconds}

    # write operations
    def op_dir_create(self, path: str, sddl: str, claim: str = "", claim_text: str = "") -> dict[str, t.Any]:
        if not claim:
            return {"created": True}
        self.files[f"{path}\\{claim}"] = claim_text.encode("utf-8")
        return {"created": True, "claimed": True}

    def op_file_write(self, path: str, content_b64: str) -> dict[str, t.Any]:
        self.files[path] = base64.b64decode(content_b64)
        return {"size": len(self.files[path])}

    def op_file_copy(self, src: str, dest: str) -> dict[str, t.Any]:
        self.files[dest] = self.files[src]
        return {"size": len(self.files[dest])}

    def op_cert_remove(self, store: str, thumbprint: str) -> dict[str, t.Any]:
        before = len(self.rd)
        self.rd = [cert for cert in self.rd if cert["thumbprint"] != thumbprint]
        return {"removed": len(self.rd) < before}

    def op_registry_remove(self, path: str, name: str) -> dict[str, t.Any]:
        previous, self.pin = self.pin, None
        return {"previous": previous}

    def op_service_restart(self, name: str, force: bool) -> dict[str, t.Any]:
        if name == "TermService":
            self.sessions = [session for session in self.sessions if session["state"] == "Listen"]
        if not self.rd:
            self.countdown = self.regeneration_delay
            self.regenerate_when_due()
        return {"status": "Running"}

    def op_lock_acquire(self, token: str, owner: dict[str, t.Any], **policy: t.Any) -> dict[str, t.Any]:
        self.lock = {"token": token, "owner": owner}
        return {"acquired": True, "path": "C:\\ProgramData\\rdpfix\\run.lock", "lock": self.lock, "previous": None}

    def op_lock_release(self, token: str) -> dict[str, t.Any]:
        released, self.lock = self.lock is not None and self.lock["token"] == token, None
        return {"released": released, "holder": None}

    def op_guard(self, label: str, read: dict[str, t.Any], expect: t.Any, match: str, pick: t.Any = ()) -> t.Any:
        # The agent's comparison for what these tests guard: equal values, or a subset of an object's members.
        actual: t.Any = getattr(self, "op_" + read["op"].replace(".", "_"))(**read.get("args", {}))
        for step in pick:
            if isinstance(step, str):
                actual = actual.get(step) if isinstance(actual, dict) else None
            else:
                where = step["where"]
                actual = [item for item in actual or [] if all(item.get(k) == v for k, v in where.items())]

        def holds(expected: t.Any, found: t.Any) -> bool:
            if isinstance(expected, dict) and isinstance(found, dict) and match == "subset":
                return all(key in found and holds(value, found[key]) for key, value in expected.items())
            if isinstance(expected, list) and isinstance(found, list) and len(expected) == len(found):
                return all(holds(left, right) for left, right in zip(expected, found, strict=True))
            return bool(expected == found)

        if not holds(expect, actual):
            return GuardDifference(f"{label}: {actual!r}", actual)
        return {"actual": actual}

    def regenerate_when_due(self) -> None:
        if self.countdown is not None and self.countdown <= 0 and not self.rd:
            self.rd = [self.cert_entry(self.factory.make("WEB01", days_left=182, days_old=0))]
            self.countdown = None


def run_action(host: ScriptedHost, check_mode: bool = False, diff: bool = True, **args: t.Any) -> dict[str, t.Any]:
    task = SimpleNamespace(args=args, check_mode=check_mode, diff=diff, async_val=0, action="rdpfix.rdp.certificate")
    action = ActionModule(task, host, SimpleNamespace(remote_addr="127.0.0.2"), None, None, None)
    return action.run(task_vars={"inventory_hostname": "web01"})


def test_compliant_host_costs_exactly_one_round_trip(cert_factory: t.Any) -> None:
    host = ScriptedHost(cert_factory)
    result = run_action(host, diff=False)
    assert (host.commands, host.writes) == (1, 0)
    assert result["changed"] is False and result["compliant"] is True
    assert result["round_trips"] == 1
    assert result["certificate"]["source"] == "self_signed"
    assert result["certificate"]["thumbprint"] == host.rd[0]["thumbprint"]
    assert "diff" not in result and "failed" not in result


def test_check_mode_reports_and_writes_nothing(cert_factory: t.Any) -> None:
    host = ScriptedHost(cert_factory, rd_days=-5)
    old = host.rd[0]["thumbprint"]
    result = run_action(host, check_mode=True)
    assert (host.commands, host.writes) == (1, 0)
    assert host.rd[0]["thumbprint"] == old
    assert result["changed"] is True and result["compliant"] is False
    assert [(a["action"], a["status"]) for a in result["actions"]] == [
        ("remove_certificate", "planned"),
        ("restart_service", "planned"),
    ]
    assert result["diff"]["before"]["thumbprint"] == old
    assert result["diff"]["after"]["thumbprint"] == "(new self-signed certificate)"
    assert result["backup"] is None


def test_expired_self_signed_regenerated_in_two_round_trips(cert_factory: t.Any) -> None:
    host = ScriptedHost(cert_factory, rd_days=-5)
    old = host.rd[0]["thumbprint"]
    result = run_action(host)
    assert "failed" not in result, result.get("msg")
    assert host.commands == 2 and result["round_trips"] == 2
    assert result["changed"] is True and result["compliant"] is True
    new = result["certificate"]["thumbprint"]
    assert new == host.rd[0]["thumbprint"] != old
    assert result["certificate"]["days_left"] > 30
    assert result["diff"] == {"before": result["before"], "after": result["after"]}
    assert result["before"]["thumbprint"] == old and result["after"]["thumbprint"] == new
    manifest_id = result["backup"]["manifest_id"]
    assert re.fullmatch(r"\d{8}T\d{6}Z-certificate-[0-9a-f]{5}", manifest_id)
    folder = f"C:\\ProgramData\\rdpfix\\backups\\{manifest_id}"
    assert result["backup"]["path"] == folder
    manifest = json.loads(host.files[f"{folder}\\manifest.json"])
    assert [item["kind"] for item in manifest["items"]] == ["certificate", "private_key_file"]
    assert hashlib.sha1(host.files[f"{folder}\\{old}.cer"]).hexdigest().upper() == old
    assert host.files[f"{folder}\\{old}.key"] == b"key material"
    assert [a["status"] for a in result["actions"]] == ["done", "done"]


def test_slow_regeneration_is_polled(cert_factory: t.Any) -> None:
    host = ScriptedHost(cert_factory, rd_days=-5, regeneration_delay=2)
    result = run_action(host)
    assert "failed" not in result, result.get("msg")
    assert host.commands == 3
    assert host.batches[-1]["on_error"] == "continue"
    assert not any(op["op"] in _agent.WRITE_OPERATIONS for op in host.batches[-1]["ops"])


def test_regeneration_that_never_shows_fails_with_the_manifest(cert_factory: t.Any) -> None:
    host = ScriptedHost(cert_factory, rd_days=-5, regeneration_delay=99)
    result = run_action(host)
    assert host.commands == 5  # read, apply, two polls, then the events Windows logged about it (none here)
    assert result["failed"] is True and result["changed"] is True
    assert result["backup"]["manifest_id"] in result["msg"]
    assert "no new self-signed certificate" in result["msg"]


def test_backup_failure_changes_nothing(cert_factory: t.Any) -> None:
    host = ScriptedHost(cert_factory, rd_days=-5, fail_op="file.copy")
    old = host.rd[0]["thumbprint"]
    result = run_action(host)
    assert result["failed"] is True
    assert "nothing was changed" in result["msg"] and "web01" in result["msg"]
    assert host.rd[0]["thumbprint"] == old
    assert host.commands == 2


def test_failure_after_a_change_says_what_was_done(cert_factory: t.Any) -> None:
    host = ScriptedHost(cert_factory, rd_days=-5, fail_op="service.restart")
    result = run_action(host)
    assert result["failed"] is True
    assert "remove the self-signed certificate" in result["msg"]
    assert result["backup"]["manifest_id"] in result["msg"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"no_such_option": 1}, "no_such_option"),
        ({"replacement_thumbprint": "1234"}, "not a certificate thumbprint"),
        ({"restart_service": "W32Time"}, "restart_service"),
        ({"expiry_threshold_days": "soon"}, "expiry_threshold_days"),
        ({"replace_when": "always"}, "replacement_thumbprint"),
    ],
)
def test_bad_arguments_fail_before_the_host_is_touched(cert_factory: t.Any, args: t.Any, message: t.Any) -> None:
    host = ScriptedHost(cert_factory)
    result = run_action(host, **args)
    assert result["failed"] is True
    assert result["msg"].startswith("Invalid arguments") and message in result["msg"]
    assert host.commands == 0 and result["round_trips"] == 0


def test_termservice_restart_with_sessions_stays_pending(cert_factory: t.Any) -> None:
    sessions = [{"id": 2, "user": "alice", "state": "Active", "station": "RDP-Tcp#1"}]
    host = ScriptedHost(cert_factory, rd_days=-5, sessions=sessions)
    result = run_action(host, restart_service="TermService")
    assert (host.commands, host.writes) == (1, 0)
    assert result["changed"] is False and result["restart_pending"] is True
    assert "failed" not in result
    assert any("alice" in warning for warning in result["warnings"])
    assert [a["status"] for a in result["actions"]] == ["pending", "pending"]
    assert host.sessions == sessions


def test_missing_pin_on_a_broker_is_reported_not_removed(cert_factory: t.Any) -> None:
    host = ScriptedHost(cert_factory, pin="AB" * 20, broker=True)
    result = run_action(host)
    assert (host.commands, host.writes) == (1, 0)
    assert host.pin == "AB" * 20
    assert result["compliant"] is False and result["changed"] is False
    assert any("Connection Broker" in warning for warning in result["warnings"])


def test_missing_pin_removed_elsewhere(cert_factory: t.Any) -> None:
    host = ScriptedHost(cert_factory, pin="AB" * 20)
    result = run_action(host)
    assert "failed" not in result, result.get("msg")
    assert host.pin is None and host.commands == 2
    assert result["backup"]["items"] == [
        {
            "kind": "registry_value",
            "name": "SSLCertificateSHA1Hash",
            "path": "HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations\\RDP-Tcp",
            "previous": {"type": "REG_BINARY", "value": "ab" * 20},
            "status": "done",  # the value's removal carried it out, and the batch said so
        }
    ]


class _Unreachable:
    def exec_command(self, *args: t.Any, **kwargs: t.Any) -> t.NoReturn:
        raise AnsibleConnectionFailure("connection refused")


class _Garbage:
    def exec_command(self, *args: t.Any, **kwargs: t.Any) -> tuple[int, bytes, bytes]:
        return 1, b"", b"The term 'x' is not recognized"


def test_connection_failure_is_unreachable() -> None:
    result = run_action(_Unreachable())  # type: ignore[arg-type]
    assert result["unreachable"] is True and "web01" in result["msg"]


def test_agent_garbage_fails_naming_the_host() -> None:
    result = run_action(_Garbage())  # type: ignore[arg-type]
    assert result["failed"] is True
    assert "web01" in result["msg"] and "not recognized" in result["msg"]


def test_documented_options_match_the_argument_spec() -> None:
    import importlib

    import yaml

    from ansible_collections.rdpfix.rdp.plugins.modules import certificate as docs

    doc = yaml.safe_load(docs.DOCUMENTATION)
    documented = dict(doc["options"])
    for name in doc.get("extends_documentation_fragment", []):
        # rdpfix.rdp.<file> or rdpfix.rdp.<file>.<variable> (a named part of the file, such as attributes.windows).
        file_name, _dot, variable = name.removeprefix("rdpfix.rdp.").partition(".")
        fragment = importlib.import_module(f"ansible_collections.rdpfix.rdp.plugins.doc_fragments.{file_name}")
        text = getattr(fragment.ModuleDocFragment, (variable or "documentation").upper())
        documented |= yaml.safe_load(text).get("options") or {}
    assert set(documented) == set(ActionModule.ARGUMENT_SPEC)
    for name, spec in ActionModule.ARGUMENT_SPEC.items():
        doc = documented[name]
        assert (doc.get("type"), doc.get("default"), doc.get("choices")) == (
            spec.get("type"),
            spec.get("default"),
            spec.get("choices"),
        ), name
