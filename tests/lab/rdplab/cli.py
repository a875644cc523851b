"""rdplab: start, inspect, perturb and stop a simulated Windows fleet.

rdplab up [--network 127.0.0] [--state-dir .lab] [--inventory inventory/lab.yml] [--azure] HOSTS...
rdplab state [--host NAME] [--reset-counters]
rdplab reset
rdplab fault HOST NAME [key=value ...]
rdplab azure [--vm NAME] [key=value ...]   (a lab started with --azure: its cloud's state, or change it)
rdplab down
rdplab serve ...            (the background process `up` starts; runs in the foreground)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import typing as t
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from rdplab import server
from rdplab.server import LabError

DEFAULT_NETWORK = "127.0.0"
DEFAULT_STATE_DIR = ".lab"
DEFAULT_INVENTORY = "inventory/lab.yml"
START_TIMEOUT = 30.0
# Each host adds listeners (WinRM HTTP/HTTPS, SSH, RDP): a large fleet on a busy machine takes longer to come up.
START_TIMEOUT_PER_HOST = 0.5
STOP_TIMEOUT = 10.0


# --- the state directory ------------------------------------------------------------------------------------------


def _process_alive(pid: int) -> bool:
    """Whether pid is a live rdplab process (not a zombie, not an unrelated process that reused the pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return b"rdplab" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return True  # no /proc: trust kill(0)


def read_state(state_dir: Path) -> dict[str, t.Any] | None:
    path = state_dir / server.STATE_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"{path} is unreadable ({exc}); remove it if no lab is running") from exc
    return document if isinstance(document, dict) else None


def running_state(state_dir: Path) -> dict[str, t.Any]:
    state = read_state(state_dir)
    if state is None:
        raise LabError(f"no lab is running in {state_dir} (start one with `rdplab up`)")
    if not _process_alive(int(state.get("pid", 0))):
        raise LabError(
            f"the lab recorded in {state_dir} (pid {state.get('pid')}) is not running any more; see {state.get('log')} "
            "and clean up with `rdplab down`"
        )
    return state


def control(state: dict[str, t.Any], method: str, path: str, body: dict[str, t.Any] | None = None) -> t.Any:
    url = f"http://{state['control']}{path}"
    data = json.dumps(body).encode("utf-8") if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", str(exc))
        except ValueError:
            message = str(exc)
        raise LabError(message) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise LabError(f"the lab's control API at {state['control']} does not answer: {exc}") from exc


# --- commands -----------------------------------------------------------------------------------------------------


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _check_ports(network: str, hosts: t.Sequence[t.Any]) -> None:
    from rdplab.winrm import port_free

    wanted: list[tuple[str, int, str]] = [(server.control_address(network), server.CONTROL_PORT, "control API")]
    for index, host in enumerate(hosts):
        address = server.host_address(network, index)
        wanted += [
            (address, server.WINRM_HTTP_PORT, f"{host.name} WinRM"),
            (address, server.WINRM_HTTPS_PORT, f"{host.name} WinRM"),
        ]
        with host.lock:
            view = host.rdp_view(connect=False)
        if view.listening:
            wanted.append((address, view.port, f"{host.name} RDP"))
    taken = [f"{address}:{port} ({what})" for address, port, what in wanted if not port_free(address, port)]
    if taken:
        raise LabError(
            "ports already in use: " + ", ".join(taken) + "; stop what holds them or choose another --network"
        )


def _configured_rdp_port(host: t.Any) -> int:
    with host.lock:
        return int(host.rdp_view(connect=False).port)


def _connectable(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


def cmd_up(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    network = server.validate_network(args.network)
    existing = read_state(state_dir)
    if existing is not None:
        if _process_alive(int(existing.get("pid", 0))):
            raise LabError(f"a lab is already running in {state_dir} (pid {existing['pid']}); `rdplab down` first")
        (state_dir / server.STATE_FILE).unlink(missing_ok=True)  # left by a lab that died
    host_files = [Path(p).resolve() for p in args.hosts]
    missing = [str(p) for p in host_files if not p.exists()]
    if missing:
        raise LabError(f"no such host file or directory: {', '.join(missing)}")
    # Load in this process first: a bad host file is reported here, before anything starts.
    hosts = server.load_hosts(host_files)
    _check_ports(network, hosts)

    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / server.LOG_FILE
    command = [sys.executable, "-m", "rdplab.cli", "serve", "--network", network, "--state-dir", str(state_dir)]
    if args.azure:
        command += ["--azure-latency", str(args.azure_latency)]
    command += [str(p) for p in host_files]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    timeout = START_TIMEOUT + START_TIMEOUT_PER_HOST * len(hosts)
    deadline = time.monotonic() + timeout
    state: dict[str, t.Any] | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LabError(f"the lab process exited with code {process.returncode}:\n{_tail(log_path)}")
        state = read_state(state_dir)
        if state is not None and state.get("pid") == process.pid and _ready(state):
            break
        time.sleep(0.1)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise LabError(f"the lab did not become ready within {timeout:.0f} s:\n{_tail(log_path)}")
    assert state is not None

    from rdplab.inventory import write_inventory

    inventory_path = Path(args.inventory).resolve()
    # The listener's PortNumber, also for a host whose RDP port is closed at start (firewall, TermService stopped): a
    # probe of that host must test the port the listener will open once repaired, not 3389.
    entries = [(host, state["hosts"][host.name]["address"], _configured_rdp_port(host)) for host in hosts]
    write_inventory(inventory_path, entries)
    print(f"lab up: pid {state['pid']}, control {state['control']}, log {log_path}, inventory {inventory_path}")
    if args.azure:
        from rdplab.arm import write_azure_inventory

        azure_path = Path(args.azure_inventory or inventory_path.with_name("lab.azure_vms.yml")).resolve()
        write_azure_inventory(azure_path, state["azure"])
        cloud = state["azure"]
        print(f"azure: Resource Manager {cloud['endpoint']}, CA {cloud['ca_file']}, inventory {azure_path}")
    print(f"{'host':<20} {'address':<16} {'winrm':<11} rdp")
    for name, info in state["hosts"].items():
        rdp = info["rdp_port"] if info["rdp_port"] is not None else "not listening"
        print(f"{name:<20} {info['address']:<16} {info['winrm_http']}/{info['winrm_https']:<6} {rdp}")
    return 0


def _ready(state: dict[str, t.Any]) -> bool:
    """The control API answers and every WinRM listener accepts connections (RDP is bound before state.json exists;
    connecting to it would count as an RDP connection on the host)."""
    try:
        control(state, "GET", "/health")
    except LabError:
        return False
    return all(
        _connectable(info["address"], port)
        for info in state["hosts"].values()
        for port in (info["winrm_http"], info["winrm_https"])
    )


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return server.serve_forever(
            [Path(p) for p in args.hosts],
            server.validate_network(args.network),
            Path(args.state_dir),
            azure_latency=args.azure_latency,
        )
    except OSError as exc:
        # Cannot bind: die loudly so `up` reports it, instead of serving half a fleet.
        logging.getLogger("rdplab").error("%s", exc)
        print(f"rdplab serve: {exc}", file=sys.stderr)
        return 2


def cmd_state(args: argparse.Namespace) -> int:
    state = running_state(Path(args.state_dir))
    query = []
    if args.host:
        query.append(f"host={urllib.parse.quote(args.host)}")
    if args.reset_counters:
        query.append("reset_counters=1")
    document = control(state, "GET", "/state" + ("?" + "&".join(query) if query else ""))
    print(json.dumps(document, indent=2))
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    state = running_state(Path(args.state_dir))
    document = control(state, "POST", "/reset", {})
    print(f"reset {len(document['reset'])} host(s) from their YAML: {', '.join(document['reset'])}")
    return 0


def _parse_params(pairs: t.Sequence[str]) -> dict[str, t.Any]:
    params: dict[str, t.Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise LabError(f"fault parameters are key=value, not {pair!r}")
        # YAML scalars: port=3390 is an int, enabled=false a bool, anything else a string.
        try:
            params[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            params[key] = raw
    return params


def cmd_fault(args: argparse.Namespace) -> int:
    state = running_state(Path(args.state_dir))
    control(state, "POST", "/fault", {"host": args.host, "name": args.name, "params": _parse_params(args.params)})
    print(f"fault {args.name} injected on {args.host}")
    return 0


def cmd_azure(args: argparse.Namespace) -> int:
    """The lab's Azure cloud: print its state, or change a VM (power state, agent, busy) or the cloud."""
    import ssl

    state = running_state(Path(args.state_dir))
    azure = state.get("azure")
    if not azure:
        raise LabError("this lab was started without --azure")
    body = _parse_params(args.settings)
    if args.vm:
        body["vm"] = args.vm
    method, path = ("POST", "/rdplab/configure") if body else ("GET", "/rdplab/state")
    request = urllib.request.Request(
        azure["endpoint"] + path,
        data=json.dumps(body).encode("utf-8") if method == "POST" else None,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    context = ssl.create_default_context(cafile=azure["ca_file"])
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            document = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise LabError(exc.read().decode("utf-8", errors="replace")) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise LabError(f"the lab's Azure endpoint {azure['endpoint']} does not answer: {exc}") from exc
    print(json.dumps(document, indent=2))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    state = read_state(state_dir)
    if state is None:
        print(f"no lab running in {state_dir}")
        return 0
    pid = int(state.get("pid", 0))
    if _process_alive(pid):
        with contextlib.suppress(LabError):
            control(state, "POST", "/shutdown", {})
        if not _wait_gone(pid, STOP_TIMEOUT):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                if _wait_gone(pid, 3.0):
                    break
        print(f"lab stopped (pid {pid})")
    else:
        print(f"the lab (pid {pid}) had already stopped; cleaned up {state_dir}")
    (state_dir / server.STATE_FILE).unlink(missing_ok=True)
    (state_dir / (server.STATE_FILE + ".tmp")).unlink(missing_ok=True)
    return 0


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _process_alive(pid):
            return True
        time.sleep(0.1)
    return not _process_alive(pid)


# --- argument parsing ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rdplab", description="Simulated Windows hosts for testing rdpfix.rdp.")
    commands = parser.add_subparsers(dest="command", required=True)

    def with_state_dir(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="where the running lab is recorded (.lab)")
        return sub

    up = with_state_dir(commands.add_parser("up", help="start the lab in the background"))
    up.add_argument("--network", default=DEFAULT_NETWORK, help="first three octets of the hosts' loopback addresses")
    up.add_argument("--inventory", default=DEFAULT_INVENTORY, help="where to write the Ansible inventory")
    up.add_argument("--azure", action="store_true", help="also serve the fleet as Azure VMs (ARM + Run Command)")
    up.add_argument("--azure-latency", type=float, default=0.0, help="seconds each Run Command takes (Azure: ~20)")
    up.add_argument("--azure-inventory", help="where to write the Azure inventory (default: beside --inventory)")
    up.add_argument("hosts", nargs="+", help="host YAML files, directories of them, or fleet files")
    up.set_defaults(func=cmd_up)

    serve = with_state_dir(commands.add_parser("serve", help="run the lab in the foreground (what `up` starts)"))
    serve.add_argument("--network", default=DEFAULT_NETWORK)
    serve.add_argument("--verbose", action="store_true", help="log every HTTP request")
    serve.add_argument("--azure-latency", type=float, help="serve the fleet as Azure VMs, with this latency")
    serve.add_argument("hosts", nargs="+")
    serve.set_defaults(func=cmd_serve)

    state = with_state_dir(commands.add_parser("state", help="print the hosts' state and counters as JSON"))
    state.add_argument("--host", help="only this host")
    state.add_argument("--reset-counters", action="store_true", help="zero the counters after reading them")
    state.set_defaults(func=cmd_state)

    reset = with_state_dir(commands.add_parser("reset", help="reload every host from its YAML"))
    reset.set_defaults(func=cmd_reset)

    fault = with_state_dir(commands.add_parser("fault", help="inject a fault into a running host"))
    fault.add_argument("host")
    fault.add_argument("name")
    fault.add_argument("params", nargs="*", metavar="key=value")
    fault.set_defaults(func=cmd_fault)

    azure = with_state_dir(commands.add_parser("azure", help="the lab's Azure cloud: state, or change it"))
    azure.add_argument("--vm", help="the VM to change (power_state=, agent=, busy_seconds=)")
    azure.add_argument("settings", nargs="*", metavar="key=value", help="latency=, expire_tokens=true, ...")
    azure.set_defaults(func=cmd_azure)

    down = with_state_dir(commands.add_parser("down", help="stop the lab and clean its state directory"))
    down.set_defaults(func=cmd_down)
    return parser


def main(argv: t.Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LabError as exc:
        print(f"rdplab {args.command}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # Model errors (a malformed host file...) carry their own message; no traceback for the user.
        print(f"rdplab {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
