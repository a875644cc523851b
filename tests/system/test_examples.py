"""Every module's EXAMPLES block, run as written through the real ansible-playbook against a lab, so an example cannot
rot: each block becomes a play on a lab host where it means something, with the example's placeholders (addresses,
thumbprints, manifest ids) replaced by the lab's. Each task runs with ignore_errors so one run shows every example; a
task may fail only where failing is the example's point, and then with the message the example builds."""

from __future__ import annotations

import ast
import typing as t
from pathlib import Path

import pytest
import yaml
from harness import ROOT, Lab, run_playbook

pytestmark = pytest.mark.system

MODULES_DIR = ROOT / "plugins" / "modules"

# The lab host each module's examples run on.
HOSTS = {
    "certificate": "ca-cert-available",
    "facts": "healthy",
    "firewall": "firewall-block-rule",
    "fleet_report": "healthy",
    "handshake": "healthy",
    "machinekeys": "machinekeys-rdp-key-no-ns",
    "restore": "combined-firewall-tls-expired",
    "selftest": "healthy",
    "server": "expired-selfsigned",
    "sessions": "active-sessions",
    "tls": "tls-tls12-disabled",
    "transport": "transport-udp-vpn",
}

# Tasks run before a module's examples, for the variables the examples read from earlier work (a certificate result,
# the manifests of earlier changes).
PRE_TASKS: dict[str, list[dict[str, t.Any]]] = {
    "handshake": [
        {"name": "A certificate result", "rdpfix.rdp.certificate": None, "check_mode": True, "register": "cert_result"}
    ],
    "restore": [
        {"name": "Change the certificate", "rdpfix.rdp.certificate": None, "register": "pre_cert"},
        {"name": "Change the firewall", "rdpfix.rdp.firewall": None, "register": "pre_fw"},
        {"name": "Change TLS", "rdpfix.rdp.tls": None, "register": "pre_tls"},
        {"name": "Change the transport", "rdpfix.rdp.transport": {"mode": "tcp_only"}, "register": "pre_tr"},
    ],
}

# A task that fails on purpose: (module, task name) -> text its message must carry.
EXPECTED_FAILURES = {
    # The host's self-signed certificate expired: the assert fails, naming the findings by their titles.
    ("certificate", "Fail the hosts whose listener certificate has an unresolved problem"): "expired",
}


def examples(module: str) -> str:
    tree = ast.parse((MODULES_DIR / f"{module}.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "EXAMPLES" for target in node.targets):
            return t.cast(str, ast.literal_eval(node.value))
    raise AssertionError(f"{module} has no EXAMPLES")


def substitutions(lab: Lab) -> dict[str, dict[str, str]]:
    """module -> {text in the example: the lab's value}."""
    healthy = lab.host("healthy")
    ca_host = lab.host("ca-cert-available")
    ca_thumbprints = [
        cert["thumbprint"]
        for cert in ca_host["snapshot"]["certificates"].get("My", [])
        if cert["issuer"] != cert["subject"] and cert["has_private_key"]
    ]
    assert ca_thumbprints, "the lab host ca-cert-available has no CA-issued certificate"
    return {
        "certificate": {"3F2A9C01B7D4E5F60718293A4B5C6D7E8F901234": ca_thumbprints[0]},
        # Lab hosts' inventory names are not in DNS: the name clients use is the host's address.
        "facts": {'connect_name: "{{ inventory_hostname }}"': 'connect_name: "{{ ansible_host }}"'},
        "handshake": {"rdp01.example.com": healthy["address"], "10.0.0.12": healthy["address"], "3390": "3389"},
        "restore": {
            "manifest_id: 20261125T103000Z-certificate-1a2b": 'manifest_id: "{{ pre_cert.backup.manifest_id }}"',
            "- 20261125T103000Z-machinekeys-77c1": '- "{{ pre_tr.backup.manifest_id }}"',
            "- 20261125T103004Z-certificate-1a2b": '- "{{ pre_tls.backup.manifest_id }}"',
            "- 20261125T103006Z-firewall-9f00": '- "{{ pre_fw.backup.manifest_id }}"',
        },
    }


def example_modules() -> list[str]:
    return sorted(path.stem for path in MODULES_DIR.glob("*.py") if not path.stem.startswith("_"))


def test_every_module_has_a_lab_host_for_its_examples() -> None:
    assert set(example_modules()) == set(HOSTS)


def test_every_example_runs_against_the_lab(lab_factory: t.Callable[..., Lab], tmp_path: Path) -> None:
    lab = lab_factory(*sorted(set(HOSTS.values())))
    replace = substitutions(lab)
    plays: list[dict[str, t.Any]] = []
    expected_tasks: dict[str, list[dict[str, t.Any]]] = {}
    for module in example_modules():
        text = examples(module)
        for old, new in replace.get(module, {}).items():
            assert old in text, f"{module}: the example no longer has {old!r}; update this test's substitutions"
            text = text.replace(old, new)
        tasks = yaml.safe_load(text)
        assert isinstance(tasks, list) and tasks, module
        expected_tasks[module] = tasks
        plays.append(
            {
                "name": f"{module} examples",
                "hosts": HOSTS[module],
                "gather_facts": False,
                "vars": {"rdp_ca_thumbprint": replace["certificate"]["3F2A9C01B7D4E5F60718293A4B5C6D7E8F901234"]},
                "pre_tasks": PRE_TASKS.get(module, []),
                "tasks": [{**task, "ignore_errors": True} for task in tasks],
            }
        )
    playbook = tmp_path / "examples.yml"
    playbook.write_text(yaml.safe_dump(plays, sort_keys=False))
    run = run_playbook(playbook, lab.inventory, timeout=900)
    assert run.document, run.stdout[-3000:] + run.stderr[-3000:]

    problems: list[str] = []
    by_play = {play["play"]["name"]: play for play in run.document["plays"]}
    for module, tasks in expected_tasks.items():
        play = by_play[f"{module} examples"]
        results = {task["task"]["name"]: task["hosts"].get(HOSTS[module]) for task in play["tasks"]}
        for task in tasks:
            result = results.get(task["name"])
            if result is None:
                problems.append(f"{module}: {task['name']!r} did not run")
                continue
            if result.get("skipped"):
                if "when" not in task:
                    problems.append(f"{module}: {task['name']!r} was skipped")
                continue
            expected = EXPECTED_FAILURES.get((module, task["name"]))
            failed = bool(result.get("failed") or result.get("unreachable"))
            message = str(result.get("msg", ""))
            if expected is None and failed:
                problems.append(f"{module}: {task['name']!r} failed: {message[:500]}")
            elif expected is not None and not (failed and expected in message):
                problems.append(f"{module}: {task['name']!r} should fail with {expected!r}: {result!r:.500}")
    assert not problems, "\n".join(problems)
    # The playbook itself ran to the end on every host (ignore_errors keeps the failures as results).
    assert set(run.stats) == set(HOSTS.values()), run.stats
    assert all(stat.get("unreachable", 0) == 0 for stat in run.stats.values()), run.stats
