# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run rdpfix agent batches on the local Windows machine, without Ansible (Ansible does not run on Windows).

The batch goes through the collection's own runner (``_agent.run_batch``) and its own agent script; only the wrapper
differs from what the action plugins send: Ansible's module exec wrapper cannot be built where Ansible does not run, so
a small bootstrap (``LOCAL_BOOTSTRAP``) reads the batch line and the agent script from stdin and calls the agent with
``-BatchJson`` - the agent's entry point for a direct run - in a local ``powershell.exe`` process. The
scenarios below settle, on a real Windows machine, what the lab can only model; ``.github/workflows/windows.yml`` runs
them (docs/windows-ci.md). On Linux the tests run the same code against the lab, with a stand-in for powershell.exe.

    python tests/windows/rdpfix_local.py [--powershell EXE] [--out FILE] SCENARIO [options]

Scenarios: ``selftest``, ``key-file``, ``events``, ``firewall``, ``restore-rule``, ``batch`` (a batch from a file).
Each prints, and writes to ``--out``, a JSON document with the checks made and what was observed; the exit code is 1
when a check failed.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import re
import secrets
import subprocess
import sys
import types
import typing as t
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COLLECTION = "ansible_collections.rdpfix.rdp"
UTILS = f"{COLLECTION}.plugins.plugin_utils"
DEFAULT_TIMEOUT_S = 600


# ---------------------------------------------------------------------------------------------------- imports


def _install_ansible_stand_ins() -> None:
    """Minimal ``ansible.errors`` and ``ansible.plugins.action`` where Ansible cannot be imported (Windows).

    The collection's runner and planners use only the exception classes and, through ``_action``, the ActionBase name.
    """

    class AnsibleError(Exception):
        def __init__(self, message: str = "", *args: object, **kwargs: object) -> None:
            super().__init__(message)
            self.message = message

    class AnsibleConnectionFailure(AnsibleError):
        pass

    class AnsibleActionFail(AnsibleError):
        pass

    class ActionBase:
        pass

    package = types.ModuleType("ansible")
    package.__path__ = []
    errors = types.ModuleType("ansible.errors")
    errors.AnsibleError = AnsibleError  # type: ignore[attr-defined]
    errors.AnsibleConnectionFailure = AnsibleConnectionFailure  # type: ignore[attr-defined]
    errors.AnsibleActionFail = AnsibleActionFail  # type: ignore[attr-defined]
    plugins = types.ModuleType("ansible.plugins")
    plugins.__path__ = []
    action = types.ModuleType("ansible.plugins.action")
    action.ActionBase = ActionBase  # type: ignore[attr-defined]
    sys.modules.update(
        {"ansible": package, "ansible.errors": errors, "ansible.plugins": plugins, "ansible.plugins.action": action}
    )


def _register_collection() -> None:
    """Make this checkout importable as ``ansible_collections.rdpfix.rdp`` (namespace packages, no install)."""
    for name, path in (
        ("ansible_collections", []),
        ("ansible_collections.rdpfix", []),
        (COLLECTION, [str(ROOT)]),
    ):
        module = types.ModuleType(name)
        module.__path__ = path
        sys.modules[name] = module


def load_collection() -> dict[str, types.ModuleType]:
    """The collection modules the scenarios use: with Ansible and the installed collection where present."""
    try:
        importlib.import_module("ansible.errors")
        importlib.import_module("ansible.plugins.action")
    except ImportError:
        _install_ansible_stand_ins()
    try:
        importlib.import_module(f"{UTILS}._agent")
    except ImportError:
        _register_collection()
    names = ("_agent", "_selftest", "_events", "_restore", "_guards", "_lock")
    return {name: importlib.import_module(f"{UTILS}.{name}") for name in names}


MODULES = load_collection()
agent: t.Any = MODULES["_agent"]
selftest: t.Any = MODULES["_selftest"]
events: t.Any = MODULES["_events"]
restore: t.Any = MODULES["_restore"]
guards: t.Any = MODULES["_guards"]
lock: t.Any = MODULES["_lock"]


# ---------------------------------------------------------------------------------------------------- the runner


def default_powershell() -> list[str]:
    """Windows PowerShell 5.1, by full path where it is (a PATH lookup could find PowerShell 7's pwsh first)."""
    system_root = os.environ.get("SYSTEMROOT")  # os.environ is case-insensitive on Windows
    if system_root:
        candidate = Path(system_root) / "System32" / "WindowsPowerShell" / "v1.0" / "powershell.exe"
        if candidate.exists():
            return [str(candidate)]
    return ["powershell.exe"]


# Reads stdin to its end: line 1 is the batch JSON, the rest is the agent script, called with -BatchJson.
LOCAL_BOOTSTRAP = (
    "$ErrorActionPreference = 'Stop'\n"
    "$rdpfixInput = [Console]::In.ReadToEnd()\n"
    "$rdpfixSplit = $rdpfixInput.IndexOf([char]10)\n"
    "$rdpfixBatch = $rdpfixInput.Substring(0, $rdpfixSplit).Trim()\n"
    "$rdpfixAgent = [ScriptBlock]::Create($rdpfixInput.Substring($rdpfixSplit + 1))\n"
    "& $rdpfixAgent -BatchJson $rdpfixBatch\n"
)
LOCAL_PREFIX = "PowerShell -NoProfile -NonInteractive -ExecutionPolicy Unrestricted -EncodedCommand "
LOCAL_COMMAND = LOCAL_PREFIX + base64.b64encode(LOCAL_BOOTSTRAP.encode("utf-16-le")).decode("ascii")


def local_command(batch: t.Any, script: str | None = None) -> t.Any:
    """The runner's builder: the local bootstrap, then the batch line and the agent script on stdin."""
    body = batch.to_json() + "\n" + (agent.agent_script() if script is None else script)
    return agent.WireCommand(command=LOCAL_COMMAND, stdin=body.encode("utf-8"))


class LocalPowerShell:
    """A connection whose ``exec_command`` starts a local process: ``powershell.exe`` in place of the bootstrap's
    ``PowerShell``, the bootstrap's own arguments after it, the batch and agent on stdin."""

    def __init__(self, executable: Sequence[str] | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.executable = list(executable) if executable else default_powershell()
        self.timeout = timeout
        self.commands = 0

    def argv(self, cmd: str) -> list[str]:
        program, *arguments = cmd.split(" ")
        if program.lower() != "powershell" or not arguments:
            raise ValueError(f"not a PowerShell command line: {cmd[:80]!r}")
        return [*self.executable, *arguments]

    def exec_command(self, cmd: str, in_data: bytes | None = None, sudoable: bool = True) -> tuple[int, bytes, bytes]:
        del sudoable
        self.commands += 1
        done = subprocess.run(
            self.argv(cmd), input=in_data or b"", capture_output=True, timeout=self.timeout, check=False
        )
        return done.returncode, done.stdout, done.stderr


def run(connection: LocalPowerShell, ops: Sequence[tuple[str, dict[str, t.Any]]], on_error: str = "continue") -> t.Any:
    batch = agent.Batch(on_error=on_error)
    for op, args in ops:
        batch.add(op, **args)
    return agent.run_batch(connection, "localhost", batch, local_command)


# ---------------------------------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    scenario: str
    checks: list[dict[str, t.Any]] = field(default_factory=list)
    observed: dict[str, t.Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: t.Any = None) -> bool:
        self.checks.append({"name": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(item["ok"] for item in self.checks)

    def document(self) -> dict[str, t.Any]:
        return {
            "scenario": self.scenario,
            "ok": self.ok,
            "generated_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "checks": self.checks,
            "observed": self.observed,
        }


def _result(item: t.Any) -> dict[str, t.Any]:
    if item.ok:
        return {"ok": True, "data": item.data}
    return {
        "ok": False,
        "error": f"{item.error_type or ('Skipped' if item.skipped else 'Failed')}: {item.error_message}",
        # What a failed operation still reports (a refused claim's text, a guard's actual value).
        **({"data": item.data} if item.data else {}),
    }


def _caller(system: t.Any) -> dict[str, t.Any]:
    if not isinstance(system, dict):
        return {}
    known = {"hostname", "fqdn", "domain", "machine_guid", "boot_time", "connection_broker"}
    return {key: value for key, value in system.items() if key not in known}


# ---------------------------------------------------------------------------------------------------- scenarios


def scenario_selftest(connection: LocalPowerShell, options: argparse.Namespace) -> Outcome:
    """Every read operation once, each answer against its schema: the self-test module's batches."""
    del options
    outcome = Outcome("selftest")
    now = datetime.now(UTC)
    schemas = selftest.load_schemas()
    batch, planned = selftest.first_batch(now, events.QUERIES)
    results = selftest.collect(planned, agent.run_batch(connection, "localhost", batch, local_command))
    system = results["system.info"].get("data") or {}
    key = selftest.rdp_key_record(results["listener.get"].get("data"), results["cert.list"].get("data"))
    key_path = key.get("path") if key else None
    batch, planned = selftest.second_batch(str(system.get("program_data") or "C:\\ProgramData"), key_path)
    results.update(selftest.collect(planned, agent.run_batch(connection, "localhost", batch, local_command)))
    report = selftest.build_report(
        "localhost", results, schemas, generated_at=now.strftime("%Y-%m-%dT%H:%M:%SZ"), round_trips=2
    )
    outcome.observed["report"] = report
    for line in selftest.problems(report) or ["every read operation answered in its schema"]:
        outcome.check("selftest", report["status"] == "ok", line)
    return outcome


def scenario_key_file(connection: LocalPowerShell, options: argparse.Namespace) -> Outcome:
    """Stat, hash and copy a certificate's key file as the account this runs as (Administrator or SYSTEM)."""
    outcome = Outcome("key-file")
    found = run(connection, [("system.info", {}), ("cert.list", {"store": options.store}), ("listener.get", {})])
    system, listed = _result(found[0]), _result(found[1])
    outcome.observed.update(caller=_caller(system.get("data")), cert_list=listed)
    if not outcome.check("cert.list", listed["ok"], listed.get("error")):
        return outcome
    certificates = listed["data"]["certificates"]
    wanted = options.thumbprint
    if not wanted and found[2].ok:
        wanted = found[2].data.get("ssl_certificate_sha1_hash")
    chosen = next(
        (c for c in certificates if c["key"] and (not wanted or c["thumbprint"] == str(wanted).upper())), None
    )
    if not outcome.check("a certificate with a key file", chosen is not None and chosen["key"]["path"], wanted):
        return outcome
    assert chosen is not None
    key = chosen["key"]
    outcome.observed["key"] = key
    outcome.check("the key file's ACL can be read", key["sddl"] is not None, key["sddl"])
    program_data = str(system.get("data", {}).get("program_data") or "C:\\ProgramData")
    folder = "\\".join([program_data, "rdpfix", "ci-" + secrets.token_hex(4)])
    copied = folder + "\\key.bak"
    done = run(
        connection,
        [
            ("file.stat", {"path": key["path"]}),
            ("dir.create", {"path": folder, "sddl": options.backup_sddl, "claim": "claim.txt", "claim_text": "ci"}),
            ("file.copy", {"src": key["path"], "dest": copied}),
        ],
    )
    stat, created, copy = (_result(item) for item in done)
    outcome.observed.update(file_stat=stat, dir_create=created, file_copy=copy, copy_path=copied)
    # The claim is Windows' CreateNew: a second claim of the same folder fails, or is told with must_claim false.
    claims = [
        *run(connection, [("dir.create", {"path": folder, "claim": "claim.txt", "must_claim": False})]),
        *run(connection, [("dir.create", {"path": folder, "claim": "claim.txt"})]),
    ]
    told, refused = (_result(item) for item in claims)
    outcome.observed.update(dir_create_claims=[told, refused])
    outcome.check("a claimed folder is claimed once", created.get("data", {}).get("claimed") is True, created)
    outcome.check("a second claim is told", told["ok"] and told.get("data", {}).get("claimed") is False, told)
    refused_error = str(refused.get("error") or "")
    outcome.check("a second required claim fails", refused_error.startswith("AlreadyClaimed"), refused)
    outcome.check(
        "a refused claim reports the claim it found", refused.get("data", {}).get("claim_text") == "ci", refused
    )
    sha = stat.get("data", {}).get("sha256") if stat["ok"] else None
    outcome.check("file.stat answers", stat["ok"], stat.get("error"))
    outcome.check("the key file's content can be hashed (backup semantics)", sha is not None, stat)
    outcome.check("a backup folder owned by Administrators can be created", created["ok"], created.get("error"))
    outcome.check("the key file can be copied", copy["ok"], copy.get("error"))
    if copy["ok"] and sha is not None:
        outcome.check("the copy has the key's bytes", copy["data"]["sha256"] == sha, copy["data"])
    return outcome


def scenario_events(connection: LocalPowerShell, options: argparse.Namespace) -> Outcome:
    """The facts module's event queries, and a query with more IDs than one event-log query takes."""
    outcome = Outcome("events")
    schemas = selftest.load_schemas()
    since = (datetime.now(UTC) - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
    ops: list[tuple[str, dict[str, t.Any]]] = [
        ("events.query", {"since": since, "queries": [dict(q) for q in events.QUERIES], "max_events": 100})
    ]
    if options.written:
        ids = list(range(options.first_id, options.first_id + options.written))
        query = {"log": options.log, "providers": [options.source], "ids": ids}
        ops.append(("events.query", {"since": options.since or since, "queries": [query], "max_events": 1000}))
    done = run(connection, ops)
    facts = _result(done[0])
    outcome.observed["facts_queries"] = facts
    if outcome.check("events.query with the facts module's queries", facts["ok"], facts.get("error")):
        problems = selftest.validate_operation(schemas, "events.query", facts["data"])
        outcome.check("its answer is in the schema", not problems, problems)
    if options.written:
        many = _result(done[1])
        outcome.observed["many_ids"] = many
        if outcome.check(f"events.query with {options.written} IDs", many["ok"], many.get("error")):
            got = len(many["data"]["events"])
            refused = many["data"].get("invalid_queries") or []
            outcome.check(
                "every written event found, or the query reported as invalid - never a silent 'no events'",
                got == options.written or bool(refused),
                {"found": got, "written": options.written, "invalid_queries": refused},
            )
    return outcome


def scenario_firewall(connection: LocalPowerShell, options: argparse.Namespace) -> Outcome:
    del options
    outcome = Outcome("firewall")
    listed = _result(run(connection, [("firewall.rules.list", {})])[0])
    outcome.observed["summary"] = (
        {"rules": len(listed["data"]["rules"]), "profiles": listed["data"]["profiles"]} if listed["ok"] else listed
    )
    if outcome.check("firewall.rules.list answers", listed["ok"], listed.get("error")):
        problems = selftest.validate_operation(selftest.load_schemas(), "firewall.rules.list", listed["data"])
        outcome.check("every rule record in the schema (lists are lists)", not problems, problems[:20])
    return outcome


RESTORED_FIELDS = (
    "name",
    "display_name",
    "group",
    "direction",
    "action",
    "enabled",
    "profiles",
    "protocol",
    "local_ports",
    "remote_addresses",
    "program",
    "service",
)


def _rule(connection: LocalPowerShell, name: str) -> dict[str, t.Any] | None:
    listed = run(connection, [("firewall.rules.list", {})])[0]
    if not listed.ok:
        raise RuntimeError(f"firewall.rules.list failed: {listed.error_type}: {listed.error_message}")
    return next((rule for rule in listed.data["rules"] if rule["name"] == name), None)


def scenario_restore_rule(connection: LocalPowerShell, options: argparse.Namespace) -> Outcome:
    """Remove a rule and re-create it from its record as rdpfix.rdp.restore does (``_restore._new_rule_args``)."""
    outcome = Outcome("restore-rule")
    name = options.rule_name or "rdpfix-ci-" + secrets.token_hex(4)
    new = {
        "name": name,
        "display_name": "rdpfix CI test rule",
        "group": "rdpfix",
        "direction": "Inbound",
        "action": "Allow",
        "enabled": False,
        "profiles": 3,
        "protocol": "TCP",
        "local_ports": ["3390"],
        "remote_addresses": ["10.0.0.0/8"],
        "program": "Any",
        "description": "rdpfix CI test rule",
    }
    created = _result(run(connection, [("firewall.rule.new", new)])[0])
    if not outcome.check("firewall.rule.new", created["ok"], created.get("error")):
        return outcome
    try:
        original = _rule(connection, name)
        outcome.observed["original"] = original
        if not outcome.check("the new rule is listed", original is not None):
            return outcome
        assert original is not None
        removed = _result(run(connection, [("firewall.rule.remove", {"name": name})])[0])
        outcome.observed["removed"] = removed
        outcome.check("firewall.rule.remove returns the rule record", removed["ok"] and removed["data"]["previous"])
        outcome.check("the rule is gone", _rule(connection, name) is None)
        previous = removed["data"]["previous"] if removed["ok"] else original
        arguments = restore._new_rule_args(previous)
        recreated = _result(run(connection, [("firewall.rule.new", arguments)])[0])
        outcome.observed["recreate_args"] = arguments
        if outcome.check("the restore planner's firewall.rule.new", recreated["ok"], recreated.get("error")):
            again = _rule(connection, name)
            outcome.observed["recreated"] = again
            differences = {
                key: {"before": original.get(key), "after": (again or {}).get(key)}
                for key in RESTORED_FIELDS
                if (again or {}).get(key) != original.get(key)
            }
            outcome.check(
                "the re-created rule equals the removed one", again is not None and not differences, differences
            )
    finally:
        run(connection, [("firewall.rule.remove", {"name": name})])
    return outcome


def scenario_batch(connection: LocalPowerShell, options: argparse.Namespace) -> Outcome:
    """Any batch: ``{"on_error": ..., "ops": [{"op", "args"}]}`` from a file (``-`` for stdin)."""
    outcome = Outcome("batch")
    text = sys.stdin.read() if options.batch == "-" else Path(options.batch).read_text(encoding="utf-8")
    document = json.loads(text)
    ops = [(item["op"], item.get("args") or {}) for item in document["ops"]]
    result = run(connection, ops, on_error=document.get("on_error", "continue"))
    outcome.observed["results"] = [{"op": item.op, **_result(item)} for item in result.results]
    for item in result.results:
        outcome.check(item.op, item.ok, None if item.ok else _result(item)["error"])
    return outcome


def _send(connection: LocalPowerShell, batch: t.Any) -> t.Any:
    return agent.run_batch(connection, "localhost", batch, local_command)


def scenario_guards_lock(connection: LocalPowerShell, options: argparse.Namespace) -> Outcome:
    """The guard's comparison on real data (docs/agent-protocol.md, "Guards"), an operation's required data (NotDone),
    the run lock's primitives and a release marked always, in a folder of their own."""
    del options
    outcome = Outcome("guards-lock")
    system = run(connection, [("system.info", {})])[0]
    if not outcome.check("system.info answers", system.ok, _result(system).get("error")):
        return outcome
    data = system.data
    caller = data["caller"]
    admins = [group for group in caller["groups"] if group["sid"] == "S-1-5-32-544"]
    changed_name = data["hostname"].lower() if data["hostname"] != data["hostname"].lower() else data["hostname"] + "x"
    cases: list[tuple[str, object, str, list[object], bool, str | None]] = [
        # (label, expect, match, pick, holds, the difference's start)
        ("its own data, equal", data, "equal", [], True, None),
        ("a number as 1.0", float(data["os_build"]), "equal", ["os_build"], True, None),
        ("a subset", {"caller": {"sid": caller["sid"]}}, "subset", [], True, None),
        ("where on a list", admins, "equal", ["caller", "groups", {"where": {"sid": "S-1-5-32-544"}}], True, None),
        ("strings are case-sensitive", {"hostname": changed_name}, "subset", [], False, "hostname: expected"),
        ("an extra member under equal", {"hostname": data["hostname"]}, "equal", [], False, "fqdn: expected nothing"),
        (
            "a list is not its element",
            admins[0] if admins else {},
            "equal",
            ["caller", "groups", {"where": {"sid": "S-1-5-32-544"}}],
            False,
            'caller.groups[sid="S-1-5-32-544"]: expected an object, found a list of',
        ),
        ("true is not 1", 1, "equal", ["caller", "administrator"], False, "caller.administrator: expected 1"),
    ]
    for label, expect, match, pick, holds, start in cases:
        batch = agent.Batch(on_error="continue")
        guard = guards.Guard(label=label, op="system.info", args={}, expect=expect, match=match, pick=tuple(pick))
        guards.add_guard(batch, guard)
        [answer] = _send(connection, batch).results
        outcome.observed[label] = _result(answer) if not answer.ok else {"ok": True}
        if holds:
            outcome.check(f"guard holds: {label}", answer.ok, answer.error_message)
        else:
            message = answer.error_message or ""
            outcome.check(
                f"guard fails: {label}",
                answer.error_type == "GuardFailed" and (start is None or message.startswith(f"{label}: {start}")),
                {"type": answer.error_type, "message": message, "data": answer.data},
            )
    # An operation that did less than the batch required stops it: NotDone, with its own data.
    batch = agent.Batch(on_error="stop")
    batch.require(batch.add("cert.remove", store="My", thumbprint="00" * 20), {"removed": True})
    batch.add("util.sleep", milliseconds=0)
    removed, after = _send(connection, batch).results
    outcome.check(
        "cert.remove answering removed: false stops the batch (NotDone)",
        removed.error_type == "NotDone" and removed.data == {"removed": False} and after.skipped,
        {"first": _result(removed), "second": _result(after)},
    )
    # The run lock, in a folder of its own.
    temp = os.environ.get("RUNNER_TEMP") if os.name == "nt" else None
    folder = (temp or "C:\\Windows\\Temp") + "\\rdpfix-ci-lock"
    path = folder + "\\run.lock"
    first = lock.RunLock(token="ci-first", owner={"run": "ci-first"}, wait_ms=0, path=path)
    second = lock.RunLock(token="ci-second", owner={"run": "ci-second"}, wait_ms=1500, poll_ms=500, path=path)
    taken = agent.Batch(on_error="stop")
    taken.add("lock.acquire", **first.acquire_args())
    got = _send(connection, taken)[0]
    outcome.check("lock.acquire creates the lock", got.ok and got.data.get("previous") is None, _result(got))
    created = got.data.get("folder") or {} if got.ok else {}
    outcome.check(
        "lock.acquire creates its folder closed to all but SYSTEM and Administrators",
        created.get("created") is True and created.get("open_to") == [],
        created,
    )
    program_data = (os.environ.get("PROGRAMDATA") if os.name == "nt" else None) or "C:\\ProgramData"
    file_stat, folder_stat, content, inherited = run(
        connection,
        [
            ("file.stat", {"path": path}),
            ("file.stat", {"path": folder}),
            ("file.read", {"path": path}),
            ("file.stat", {"path": program_data}),
        ],
    )
    # What a folder created in ProgramData without an ACL inherits from (docs/lab.md, "The run lock's folder").
    outcome.observed["program_data"] = _result(inherited)
    for what, stat in (("the lock file", file_stat), ("the lock folder", folder_stat)):
        sddl = str(stat.data.get("sddl") or "") if stat.ok else ""
        outcome.check(f"{what} is Administrators' with a protected SYSTEM/Administrators DACL", protected(sddl), sddl)
    record = json.loads(base64.b64decode(content.data["content_b64"])) if content.ok and content.data["exists"] else {}
    outcome.check("the record says its batch held the file open (held)", record.get("held") is True, record)
    # That batch's process has ended: its lock is stale, and the next run takes it over at once.
    inner = agent.Batch(on_error="stop")
    inner.add("file.write", path=folder + "\\no\\such\\dir\\x", content_b64="")
    inner.add("util.sleep", milliseconds=0)
    locked = lock.wrap(inner, second)
    sent = _send(connection, locked.batch)
    acquired, failed, skipped, released = sent.results
    outcome.check(
        "a lock whose process has ended is taken over at once",
        acquired.ok
        and (acquired.data.get("previous") or {}).get("token") == "ci-first"
        and int(acquired.data.get("waited_ms") or 0) < 1000,
        _result(acquired),
    )
    outcome.check(
        "a release marked always runs after a failure stopped the batch",
        not failed.ok and skipped.skipped and released.ok and released.data.get("released") is True,
        [_result(item) for item in sent.results],
    )
    gone = run(connection, [("file.stat", {"path": path})])[0]
    outcome.check("the lock file is gone", gone.ok and gone.data.get("exists") is False, _result(gone))
    return outcome


# SYSTEM and Administrators, as SDDL writes them.
TRUSTED_ACE_SIDS = frozenset({"SY", "BA", "S-1-5-18", "S-1-5-32-544"})


def protected(sddl: str) -> bool:
    """Owned by Administrators, a protected DACL whose every entry is SYSTEM's or Administrators'."""
    dacl = sddl.partition("D:")[2].partition("S:")[0]
    sids = [body.split(";")[-1] for body in re.findall(r"\(([^()]*)\)", dacl)]
    return sddl.startswith("O:BA") and dacl.startswith("P") and bool(sids) and set(sids) <= TRUSTED_ACE_SIDS


# A batch stopped while it holds the lock, in a process that lives on (what PSRP does: the WinRM plugin host runs
# every command of a connection): the agent runs in a runspace of this process, stopped during its sleep (its release
# never runs), and the next batch runs in the same process. Windows PowerShell only: the lab runs one process a batch.
STOPPED_BATCH_WRAPPER = """param([string]$BatchJson)
$rdpfixAgentText = [System.Text.Encoding]::UTF8.GetString([System.Convert]::FromBase64String('{agent}'))
$rdpfixStopped = [System.Text.Encoding]::UTF8.GetString([System.Convert]::FromBase64String('{stopped}'))
$rdpfixInner = [PowerShell]::Create()
$null = $rdpfixInner.AddScript($rdpfixAgentText).AddParameter('BatchJson', $rdpfixStopped)
$null = $rdpfixInner.BeginInvoke()
$rdpfixDeadline = [DateTime]::UtcNow.AddSeconds(30)
while (-not [System.IO.File]::Exists('{path}') -and [DateTime]::UtcNow -lt $rdpfixDeadline) {{
    Start-Sleep -Milliseconds 100
}}
Start-Sleep -Milliseconds 1000
$rdpfixInner.Stop()
$rdpfixInner.Dispose()
& ([ScriptBlock]::Create($rdpfixAgentText)) -BatchJson $BatchJson
"""


def stopped_batch_wrapper(stopped: t.Any, path: str) -> str:
    """The script run in place of the agent: ``stopped`` (a Batch) in an inner runspace, stopped, then the batch."""

    def encode(text: str) -> str:
        return base64.b64encode(text.encode("utf-8")).decode("ascii")

    return STOPPED_BATCH_WRAPPER.format(
        agent=encode(agent.agent_script()), stopped=encode(stopped.to_json()), path=path.replace("'", "''")
    )


def scenario_lock_stopped_batch(connection: LocalPowerShell, options: argparse.Namespace) -> Outcome:
    """A lock whose batch was stopped before its release, in a process that lives on, is taken over at once by the
    next batch in that process (docs/agent-protocol.md, "The run lock": alive is the batch, not a process)."""
    del options
    outcome = Outcome("lock-stopped-batch")
    temp = os.environ.get("RUNNER_TEMP") if os.name == "nt" else None
    path = (temp or "C:\\Windows\\Temp") + "\\rdpfix-ci-stopped\\run.lock"
    stopped_lock = lock.RunLock(token="ci-stopped", owner={"run": "ci-stopped"}, wait_ms=0, path=path)
    stopped = agent.Batch(on_error="stop")
    stopped.add("lock.acquire", **stopped_lock.acquire_args())
    stopped.add("util.sleep", milliseconds=20000)
    stopped.add_always("lock.release", **stopped_lock.release_args())
    rerun = lock.RunLock(token="ci-rerun", owner={"run": "ci-rerun"}, wait_ms=5000, poll_ms=500, path=path)
    inner = agent.Batch(on_error="stop")
    inner.add("util.sleep", milliseconds=0)
    locked = lock.wrap(inner, rerun)
    script = stopped_batch_wrapper(stopped, path)
    sent = agent.run_batch(connection, "localhost", locked.batch, lambda batch: local_command(batch, script))
    acquired, _slept, released = sent.results
    previous = (acquired.data.get("previous") or {}) if acquired.ok else {}
    outcome.observed["acquire"] = _result(acquired)
    outcome.check(
        "the stopped batch's lock is taken over at once",
        acquired.ok and previous.get("token") == "ci-stopped" and int(acquired.data.get("waited_ms") or 0) < 1000,
        _result(acquired),
    )
    outcome.check(
        "its process was still running (the same process ran both batches)",
        acquired.ok and previous.get("process") == acquired.data["lock"]["process"],
        {"previous": previous.get("process"), "now": acquired.data["lock"]["process"] if acquired.ok else None},
    )
    outcome.check("the rerun releases it", released.ok and released.data.get("released") is True, _result(released))
    return outcome


SCENARIOS: dict[str, t.Callable[[LocalPowerShell, argparse.Namespace], Outcome]] = {
    "selftest": scenario_selftest,
    "key-file": scenario_key_file,
    "events": scenario_events,
    "firewall": scenario_firewall,
    "restore-rule": scenario_restore_rule,
    "batch": scenario_batch,
    "guards-lock": scenario_guards_lock,
    "lock-stopped-batch": scenario_lock_stopped_batch,
}


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    main.add_argument(
        "--powershell",
        action="append",
        help="the program (and its first arguments, repeated) run in place of powershell.exe",
    )
    main.add_argument("--out", type=Path, help="also write the outcome document here")
    main.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    sub = main.add_subparsers(dest="scenario", required=True)
    sub.add_parser("selftest")
    key = sub.add_parser("key-file")
    key.add_argument("--store", default="Remote Desktop")
    key.add_argument("--thumbprint")
    key.add_argument("--backup-sddl", default="O:BAG:SYD:PAI(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)")
    evt = sub.add_parser("events")
    evt.add_argument("--written", type=int, default=0, help="events the workflow wrote (0: none)")
    evt.add_argument("--first-id", type=int, default=1)
    evt.add_argument("--log", default="Application")
    evt.add_argument("--source", default="rdpfix-ci")
    evt.add_argument("--since")
    sub.add_parser("firewall")
    rule = sub.add_parser("restore-rule")
    rule.add_argument("--rule-name")
    sub.add_parser("guards-lock")
    sub.add_parser("lock-stopped-batch")
    batch = sub.add_parser("batch")
    batch.add_argument("batch")
    return main


def main(argv: Sequence[str] | None = None) -> int:
    options = parser().parse_args(argv)
    connection = LocalPowerShell(options.powershell, timeout=options.timeout)
    outcome = SCENARIOS[options.scenario](connection, options)
    document = outcome.document()
    document["powershell_commands"] = connection.commands
    text = json.dumps(document, indent=2, sort_keys=True, default=str)
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
