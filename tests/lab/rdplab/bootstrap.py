"""Decide what a command received over WinRM, PSRP or SSH may do on a simulated host.

The lab executes nothing but what the collection really sends. A command is run only when a *recogniser* claims it:

- ``AnsibleModuleWrapper``: Ansible's PowerShell module execution path, which is how the collection runs its agent
  (plugins/plugin_utils/_wrapper.py). The command line is the bootstrap every pipelined Windows module runs
  (``bootstrap_wrapper.ps1``, base64 UTF-16LE); stdin, read line by line as the bootstrap's ``$input`` reads it, is the
  exec wrapper's manifest, then the exec manifest: every script in it must be byte for byte the installed ansible-core's
  (exec, module and become wrappers, Ansible.* utilities), and the module script must be the collection's
  ``_agent.ps1`` (SHA-256). The batch is the module argument ``batch``. With ``become`` (Ansible's runas wrapper), the
  account and password are checked as Windows' LogonUser would, and the batch runs with that account's token.
- ``WinReboot`` (rdplab.reboot): the fixed commands ansible.windows.win_reboot sends.

Everything else - another module, a tampered agent, async (not modelled), another wrapper - is refused with exit code
1 and a message on stderr, so that a command the lab does not model can never look like it succeeded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.util
import itertools
import json
import os
import pkgutil
import re
import threading
import time
import typing as t
from dataclasses import dataclass
from pathlib import Path

from rdplab import transport_faults
from rdplab.model.token import SID_SYSTEM, CallerToken
from rdplab.ops.services import CommandHangs
from rdplab.reboot import WinReboot

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost

REFUSAL = (
    "rdplab: this simulated Windows host only runs the rdpfix agent through Ansible's PowerShell module wrapper (the "
    "unmodified plugins/plugin_utils/_agent.ps1 as the module, the batch as its argument); refused: {reason}\r\n"
)

COLLECTION_ROOT_ENV = "RDPLAB_COLLECTION_ROOT"

# The exec manifest's separator line (bootstrap_wrapper.ps1 and exec_wrapper.ps1 stop reading a part at it).
SEPARATOR = "\0\0\0\0"

# What powershell.exe prints for the names Windows cannot map to a SID (NTAccount.Translate).
NOT_MAPPED = "Some or all identity references could not be translated."
# LogonUser's answer to a wrong password [Win32 error 1326], as Ansible.AccessToken's Win32Exception formats it.
BAD_PASSWORD = "The user name or password is incorrect"
ERROR_LOGON_FAILURE = 1326

# Names that resolve to LocalSystem (NTAccount.Translate accepts the account name with or without its domain).
SYSTEM_NAMES = frozenset({"system", "nt authority\\system", "localsystem", SID_SYSTEM.lower()})


@dataclass(frozen=True)
class CommandOutcome:
    """What the simulated process returns: exit code and raw output streams."""

    rc: int
    stdout: bytes
    stderr: bytes


def refusal(reason: str) -> CommandOutcome:
    return CommandOutcome(rc=1, stdout=b"", stderr=REFUSAL.format(reason=reason).encode("utf-8"))


def encoded_command(script: str) -> str:
    """The command line PowerShell gets for a script passed as ``-EncodedCommand`` (what Ansible's shell plugin
    builds; psrp and Azure Run Command endpoints re-encode the script they received this way)."""
    encoded = base64.b64encode(script.encode("utf-16-le")).decode("ascii")
    return f"PowerShell -NoProfile -NonInteractive -ExecutionPolicy Unrestricted -EncodedCommand {encoded}"


def collection_root() -> Path:
    """The collection checkout whose agent the lab accepts (this package lives in <root>/tests/lab/rdplab)."""
    override = os.environ.get(COLLECTION_ROOT_ENV)
    if override:
        return Path(override).resolve()
    return Path(__file__).resolve().parents[3]


class _AgentSource:
    """The collection's ``_agent.ps1``, re-hashed whenever it changes on disk (it is edited while the lab runs, and
    tests point the lab at other checkouts): cached by path, modification time and size."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._script_key: tuple[str, int, int] | None = None
        self._script_digest: bytes | None = None

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int]:
        info = path.stat()
        return (str(path), info.st_mtime_ns, info.st_size)

    def path(self) -> Path:
        return collection_root() / "plugins" / "plugin_utils" / "_agent.ps1"

    def script_digest(self) -> bytes:
        """SHA-256 of the agent file's bytes: Ansible's module builder reads the module in binary and sends it as is."""
        path = self.path()
        with self._lock:
            key = self._key(path)
            if self._script_digest is None or key != self._script_key:
                self._script_digest = hashlib.sha256(path.read_bytes()).digest()
                self._script_key = key
            return self._script_digest


AGENT_SOURCE = _AgentSource()


class RecogniserUnavailable(Exception):
    """A recogniser cannot decide (its reference files are missing)."""


class Recogniser(t.Protocol):
    """One kind of command the lab knows how to emulate."""

    name: str

    def matches(self, command_line: str) -> bool:
        """Whether this recogniser claims the command line (decided when the Command arrives)."""

    def wants_stdin(self) -> bool:
        """True: run once stdin is closed (End="true"); False: run as soon as the command starts."""

    def run(self, host: WindowsHost, command_line: str, stdin: bytes) -> CommandOutcome:
        """Emulate the command on the host."""


# -- Ansible's PowerShell module execution path ---------------------------------------------------------------------


class _AnsibleScripts:
    """The installed ansible-core's Windows executor scripts and module utilities: what the lab accepts as Ansible's."""

    PACKAGE = "ansible.executor.powershell"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bootstrap: str | None = None
        self._cache: dict[str, bytes | None] = {}

    def bootstrap_command(self) -> str:
        """The command line of every pipelined Windows module: the shell plugin's ``build_module_command``."""
        with self._lock:
            if self._bootstrap is None:
                try:
                    from ansible.plugins.shell.powershell import ShellModule
                except ImportError as exc:
                    raise RecogniserUnavailable(f"ansible-core is not installed: {exc}") from exc
                self._bootstrap = str(ShellModule().build_module_command("", "#!powershell", "")).strip()
            return self._bootstrap

    def script(self, name: str) -> bytes | None:
        """The bytes ansible-core sends for a manifest script of this name (None: not one of ansible-core's)."""
        with self._lock:
            if name not in self._cache:
                self._cache[name] = self._load(name)
            return self._cache[name]

    def _load(self, name: str) -> bytes | None:
        if "/" in name or "\\" in name:
            return None
        if name.endswith(".ps1") and not name.startswith("Ansible."):
            try:
                from ansible.executor.powershell.module_manifest import _get_powershell_script
            except ImportError:
                return None
            try:
                return bytes(_get_powershell_script(name))
            except Exception:  # not an executor script
                return None
        package = (
            "ansible.module_utils.csharp"
            if name.endswith(".cs")
            else "ansible.module_utils.powershell"
            if name.endswith(".psm1")
            else None
        )
        if package is None or not name.startswith("Ansible."):
            return None
        try:
            return pkgutil.get_data(package, name)
        except (OSError, ImportError):
            return None


ANSIBLE_SCRIPTS = _AnsibleScripts()


@dataclass(frozen=True)
class Become:
    """Ansible's runas wrapper: who the batch is to run as."""

    user: str
    password: str | None
    logon_type: str
    logon_flags: str


@dataclass(frozen=True)
class AsyncJob:
    """Ansible's async wrapper and watchdog around the module: run it as a background job."""

    async_dir: str
    jid: str
    timeout: int


@dataclass(frozen=True)
class ModuleRun:
    """A payload recognised as a module the lab runs through Ansible's module wrapper: the rdpfix agent (``batch``),
    or ansible.windows.async_status (``arguments``), optionally with become and (the agent only) as an async job."""

    module: str  # "agent" | "async_status"
    batch: dict[str, t.Any]
    arguments: dict[str, t.Any]
    become: Become | None
    environment: dict[str, str]
    job: AsyncJob | None = None


def async_status_source() -> bytes | None:
    """The installed ansible.windows async_status.ps1 (what Ansible polls async tasks with on Windows)."""
    try:
        spec = importlib.util.find_spec("ansible_collections.ansible.windows.plugins.modules")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "async_status.ps1"
        if path.is_file():
            return path.read_bytes()
    return None


class PayloadRefused(Exception):
    """The payload is not the collection's agent through Ansible's wrapper; the message says what differs."""


def _lines(stdin: bytes) -> list[str]:
    """stdin as the bootstrap's ``$input`` reads it: lines, split at LF or CRLF; a last empty line is no line."""
    try:
        text = stdin.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadRefused(f"stdin is not UTF-8: {exc}") from exc
    lines = re.split(r"\r?\n", text)
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _json_object(text: str, what: str) -> dict[str, t.Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise PayloadRefused(f"{what} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise PayloadRefused(f"{what} is not a JSON object")
    return value


def _script_bytes(entry: object, name: str) -> bytes:
    if not isinstance(entry, dict) or not isinstance(entry.get("script"), str):
        raise PayloadRefused(f"manifest script {name!r} has no base64 'script'")
    try:
        return base64.b64decode(entry["script"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadRefused(f"manifest script {name!r} is not base64: {exc}") from exc


def parse_module_payload(stdin: bytes) -> ModuleRun:
    """Check a module wrapper payload and extract the batch; PayloadRefused says what is not as Ansible sends it."""
    lines = _lines(stdin)
    if SEPARATOR not in lines:
        raise PayloadRefused("stdin has no exec wrapper manifest (no separator line)")
    split = lines.index(SEPARATOR)
    if split != 1 or len(lines) != 3:
        raise PayloadRefused(
            "stdin is not '<exec wrapper line>', the separator, '<exec manifest line>' "
            f"({split} line(s) before the separator, {len(lines)} in all)"
        )
    wrapper = _json_object(lines[0], "the exec wrapper line")
    exec_wrapper = ANSIBLE_SCRIPTS.script("exec_wrapper.ps1")
    if exec_wrapper is None:
        raise RecogniserUnavailable("ansible-core's exec_wrapper.ps1 cannot be read")
    if wrapper.get("name") != "exec_wrapper" or wrapper.get("script") != exec_wrapper.decode("utf-8"):
        raise PayloadRefused("the exec wrapper is not ansible-core's exec_wrapper.ps1")
    params = wrapper.get("params")
    if not isinstance(params, dict) or set(params) - {"MinOSVersion", "MinPSVersion", "TempPath"}:
        raise PayloadRefused(f"unexpected exec wrapper parameters: {params!r:.200}")

    manifest = _json_object(lines[2], "the exec manifest")
    scripts = manifest.get("scripts")
    actions = manifest.get("actions")
    if not isinstance(scripts, dict) or not isinstance(actions, list) or not actions:
        raise PayloadRefused("the exec manifest has no scripts or no actions")
    if manifest.get("signed_hashlist"):
        raise PayloadRefused("signed hash lists (WDAC) are not modelled")
    names = [item.get("name") if isinstance(item, dict) else None for item in actions]
    has_become = names[:1] == ["become_wrapper.ps1"]
    rest = names[1:] if has_become else names
    if rest not in (["module_wrapper.ps1"], ["async_wrapper.ps1", "async_watchdog.ps1", "module_wrapper.ps1"]):
        raise PayloadRefused(f"unexpected wrapper actions {names!r}")
    module = actions[-1].get("params")
    if not isinstance(module, dict):
        raise PayloadRefused("module_wrapper.ps1 has no parameters")
    module_script = module.get("Script")
    if not isinstance(module_script, str) or module_script not in scripts:
        raise PayloadRefused("module_wrapper.ps1's Script is not in the manifest")
    if module.get("ForModule") is not True or module.get("CSharpModules"):
        raise PayloadRefused("the module is not run as a module without C# utilities")
    module_content = _script_bytes(scripts[module_script], module_script)
    try:
        is_agent = hashlib.sha256(module_content).digest() == AGENT_SOURCE.script_digest()
    except OSError as exc:
        raise RecogniserUnavailable(f"the collection's agent script cannot be read: {exc}") from exc
    is_async_status = not is_agent and module_content == async_status_source()
    if not is_agent and not is_async_status:
        raise PayloadRefused(f"the module {module_script!r} is not the collection's _agent.ps1")
    utilities = module.get("PowerShellModules") or []
    if utilities != ([] if is_agent else ["Ansible.ModuleUtils.Legacy.psm1"]):
        raise PayloadRefused(f"unexpected module utilities {utilities!r}")
    if is_async_status and len(rest) > 1:
        raise PayloadRefused("async_status is not run as an async job")
    for name, entry in scripts.items():
        content = _script_bytes(entry, name)
        if name == module_script:
            continue
        reference = ANSIBLE_SCRIPTS.script(name)
        if reference is None:
            raise PayloadRefused(f"manifest script {name!r} is not one of ansible-core's")
        if content != reference:
            raise PayloadRefused(f"manifest script {name!r} differs from the installed ansible-core's")

    variables = module.get("Variables")
    if (
        not isinstance(variables, list)
        or len(variables) != 1
        or not isinstance(variables[0], dict)
        or variables[0].get("Name") != "complex_args"
        or not isinstance(variables[0].get("Value"), dict)
    ):
        raise PayloadRefused("the module arguments are not one complex_args object")
    arguments: dict[str, t.Any] = variables[0]["Value"]
    allowed = {"batch"} if is_agent else {"jid", "mode", "_async_dir"}
    unknown = sorted(key for key in arguments if key not in allowed and not key.startswith("_ansible_"))
    if unknown:
        raise PayloadRefused(f"unexpected module arguments {unknown}")
    batch: dict[str, t.Any] = {}
    if is_agent:
        if not isinstance(arguments.get("batch"), str):
            raise PayloadRefused("the module argument 'batch' (the batch JSON) is missing")
        batch = _json_object(arguments["batch"], "the batch")
    elif not isinstance(arguments.get("jid"), str) or not isinstance(arguments.get("_async_dir"), str):
        raise PayloadRefused("async_status needs jid and _async_dir")
    job: AsyncJob | None = None
    if len(rest) == 3:
        job_params = actions[-3].get("params") or {}
        watchdog = actions[-2].get("params") or {}
        if not isinstance(job_params, dict) or not isinstance(watchdog, dict):
            raise PayloadRefused("async wrapper parameters are not objects")
        if set(job_params) != {"AsyncDir", "AsyncJid", "StartupTimeout"} or set(watchdog) != {"Timeout"}:
            raise PayloadRefused(f"unexpected async parameters {sorted(job_params)} {sorted(watchdog)}")
        job = AsyncJob(str(job_params["AsyncDir"]), str(job_params["AsyncJid"]), int(watchdog["Timeout"]))
    environment = module.get("Environment") or {}
    if not isinstance(environment, dict):
        raise PayloadRefused("the module environment is not an object")

    become: Become | None = None
    if has_become:
        become_params = actions[0].get("params") or {}
        secure = actions[0].get("secure_params") or {}
        if not isinstance(become_params, dict) or not isinstance(secure, dict):
            raise PayloadRefused("become_wrapper.ps1 parameters are not objects")
        if set(become_params) - {"BecomeUser", "LogonType", "LogonFlags"} or set(secure) - {"BecomePassword"}:
            raise PayloadRefused(f"unexpected become parameters {sorted(become_params)} {sorted(secure)}")
        password = secure.get("BecomePassword")
        become = Become(
            user=str(become_params.get("BecomeUser") or ""),
            password=None if password is None else str(password),
            logon_type=str(become_params.get("LogonType") or "Interactive"),
            logon_flags=str(become_params.get("LogonFlags") or "WithProfile"),
        )
    return ModuleRun(
        module="agent" if is_agent else "async_status",
        batch=batch,
        arguments=arguments,
        become=become,
        environment={str(k): str(v) for k, v in environment.items()},
        job=job,
    )


def exec_wrapper_failure(message: str) -> CommandOutcome:
    """What Ansible's exec wrapper prints when an action (the become wrapper) throws: a failed result, rc 1."""
    document = {"failed": True, "msg": f"failure during exec_wrapper: {message}", "exception": message}
    return CommandOutcome(rc=1, stdout=(json.dumps(document) + "\r\n").encode("utf-8"), stderr=b"")


def become_token(host: WindowsHost, become: Become) -> CallerToken | CommandOutcome:
    """The token runas gives, or the failure Ansible's become wrapper reports (docs/lab.md, "become")."""
    call = 'Exception calling "CreateProcessAsUser" with "9" argument(s): '
    user = become.user[2:] if become.user.startswith(".\\") else become.user
    if user.lower() in SYSTEM_NAMES:
        # LocalSystem needs no password: the wrapper duplicates a SYSTEM token.
        return CallerToken.system()
    account = user.split("\\", 1)[1] if "\\" in user else user
    domain = user.split("\\", 1)[0] if "\\" in user else "."
    known_domains = {".", host.system.hostname.lower()}
    if account.lower() != host.username.lower() or domain.lower() not in known_domains:
        return exec_wrapper_failure(f'{call}"{NOT_MAPPED}"')
    if become.password is not None and become.password != host.password:
        shown = account if domain == "." and "\\" not in become.user else f"{domain}\\{account}"
        logon = f".\\{account}" if domain == "." else shown
        return exec_wrapper_failure(
            f'{call}"Failed to logon {logon} ({BAD_PASSWORD}, Win32ErrorCode {ERROR_LOGON_FAILURE} - '
            f'0x{ERROR_LOGON_FAILURE:08X})"'
        )
    # The account's own (elevated) token: by LogonUser with the password, else a duplicate of its logon's token.
    return CallerToken.administrator(host.system.hostname, host.username)


def _run_as(host: WindowsHost, token: CallerToken | None, batch: dict[str, t.Any]) -> dict[str, t.Any]:
    """Run the batch with ``token`` (None: the caller's own) and record who ran it. Call with the host locked."""
    saved = getattr(host, "caller", None)
    if token is not None:
        host.caller = token
    try:
        identities = getattr(host, "batch_identities", None)
        if identities is not None and saved is not None:
            identities.append(host.caller.user)
        return host.run_batch(batch)
    finally:
        if token is not None and saved is not None:
            host.caller = saved


# -- async jobs (Ansible's async_wrapper.ps1 / async_watchdog.ps1, and ansible.windows.async_status) ----------------

# How long the emulated job takes to start running its module after the wrapper returned (it runs in the background).
JOB_START_DELAY = 0.2
# What async_watchdog.ps1 (ansible-core) throws when the module outlives the task's async seconds; its result file then
# has failed, finished and msg "failure during async watchdog: <this>", and no module result.
WATCHDOG_TIMEOUT = "timed out waiting for module completion"
_JOB_PIDS = itertools.count(7100, 4)


def _profile(host: WindowsHost, token: CallerToken | None) -> str:
    """%USERPROFILE% of whoever runs the command: LocalSystem's profile, or the account's under C:\\Users."""
    caller = token or getattr(host, "caller", None)
    if caller is not None and caller.sid == SID_SYSTEM:
        return "C:\\Windows\\system32\\config\\systemprofile"
    return f"C:\\Users\\{host.username}"


def expand(host: WindowsHost, token: CallerToken | None, path: str) -> str:
    """[Environment]::ExpandEnvironmentVariables for the variables the lab models (USERPROFILE)."""
    expanded = re.sub("(?i)%USERPROFILE%", lambda _match: _profile(host, token), path)
    if "%" in expanded:
        raise PayloadRefused(f"environment variables other than %USERPROFILE% are not modelled: {path}")
    return expanded


def _json_line(document: dict[str, t.Any]) -> bytes:
    return (json.dumps(document) + "\r\n").encode("utf-8")


def start_job(host: WindowsHost, token: CallerToken | None, batch: dict[str, t.Any], job: AsyncJob) -> CommandOutcome:
    """async_wrapper.ps1: create the job folder and result file, start the job, answer at once with the job id; the
    job (async_watchdog.ps1 running the module) writes the module's result into the file when it ends."""
    try:
        folder = expand(host, token, job.async_dir)
    except PayloadRefused as exc:
        return refusal(str(exc))
    pid = next(_JOB_PIDS)
    local_jid = f"{job.jid}.{pid}"
    path = folder.rstrip("\\") + "\\" + local_jid
    started = {
        "started": True,
        "finished": False,
        "results_file": path,
        "ansible_job_id": local_jid,
        "_ansible_suppress_tmpdir_delete": True,
        "ansible_async_watchdog_pid": pid,
    }
    with host.lock:
        host.filesystem.make_dirs(folder)
        host.filesystem.write(path, json.dumps(started).encode("utf-8"))

    # The job is a process of its own: it counts as a command for the host's transport faults (a cut_at_op fault
    # stalls its batch), and the watchdog stops it once the task's async seconds have passed (async_watchdog.ps1:
    # BeginStop, then "timed out waiting for module completion" and no module result; what the batch did so far stays
    # done).
    context = transport_faults.arm(host)
    watchdog = threading.Timer(max(job.timeout, 0), transport_faults.terminate, [context])

    def run_job() -> None:
        time.sleep(JOB_START_DELAY)
        watchdog.start()
        with host.lock:
            try:
                with transport_faults.running(context):
                    module: dict[str, t.Any] = _run_as(host, token, batch)
            except (CommandHangs, transport_faults.BatchCancelled):
                module = {
                    "failed": True,
                    "msg": f"failure during async watchdog: {WATCHDOG_TIMEOUT}",
                    "exception": f"{WATCHDOG_TIMEOUT}\r\nAt async_watchdog.ps1",
                    "stdout": None,
                    "stderr": "",
                }
            except ValueError as exc:
                module = {"failed": True, "msg": f"rdpfix agent: invalid batch: {exc}"}
            except Exception as exc:  # a bug in the lab: the job fails with its message, as the watchdog reports one
                module = {"failed": True, "msg": f"failure during async watchdog: {type(exc).__name__}: {exc}"}
            finally:
                watchdog.cancel()
            final = started | module | {"finished": True}
            # Set-Content -Encoding UTF8 on Windows PowerShell 5.1: a BOM, then the text and a line end.
            host.filesystem.write(path, b"\xef\xbb\xbf" + _json_line(final))

    threading.Thread(target=run_job, name=f"rdplab-job-{local_jid}", daemon=True).start()
    return CommandOutcome(rc=0, stdout=_json_line(started), stderr=b"")


def async_status(host: WindowsHost, token: CallerToken | None, arguments: dict[str, t.Any]) -> CommandOutcome:
    """ansible.windows.async_status.ps1: a job's result file, read (status) or removed (cleanup)."""
    jid = str(arguments["jid"])
    try:
        folder = expand(host, token, str(arguments["_async_dir"]))
    except PayloadRefused as exc:
        return refusal(str(exc))
    path = folder.rstrip("\\") + "\\" + jid
    with host.lock:
        entry = host.filesystem.get(path)
        if entry is None or entry.is_dir:
            failed = {"ansible_job_id": jid, "started": 1, "finished": 1, "failed": True}
            return CommandOutcome(1, _json_line(failed | {"msg": f"could not find job at '{folder}'"}), b"")
        if arguments.get("mode") == "cleanup":
            host.filesystem.remove(path)
            return CommandOutcome(0, _json_line({"ansible_job_id": jid, "erased": path, "changed": False}), b"")
        raw = (entry.content or b"").decode("utf-8-sig", errors="replace").strip()
    if not raw:
        running = {"results_file": path, "ansible_job_id": jid, "started": 1, "finished": 0, "changed": False}
        return CommandOutcome(0, _json_line(running), b"")
    try:
        data = json.loads(raw)
    except ValueError:
        failed = {"ansible_job_id": jid, "results_file": path, "started": 1, "finished": 1, "failed": True}
        return CommandOutcome(1, _json_line(failed | {"msg": f"Could not parse job output: {raw[:200]}"}), b"")
    if "started" not in data:
        data |= {"finished": 1, "ansible_job_id": jid}
    elif "finished" not in data:
        data["finished"] = 0
    data.setdefault("changed", False)
    return CommandOutcome(0, _json_line(data), b"")


class AnsibleModuleWrapper:
    """The rdpfix agent run through Ansible's PowerShell module exec wrapper (optionally with runas)."""

    name = "ansible-module-wrapper"
    # The bootstrap reads its input with $input: over PSRP that is the pipeline input (rdplab.psrp).
    stdin_source = "pipeline"

    def matches(self, command_line: str) -> bool:
        return command_line.strip() == ANSIBLE_SCRIPTS.bootstrap_command()

    def wants_stdin(self) -> bool:
        return True

    def run(self, host: WindowsHost, command_line: str, stdin: bytes) -> CommandOutcome:
        try:
            payload = parse_module_payload(stdin)
        except PayloadRefused as exc:
            return refusal(str(exc))
        except RecogniserUnavailable as exc:
            return refusal(str(exc))
        token: CallerToken | None = None
        if payload.become is not None:
            found = become_token(host, payload.become)
            if isinstance(found, CommandOutcome):
                return found
            token = found
        if payload.module == "async_status":
            return async_status(host, token, payload.arguments)
        if payload.job is not None:
            return start_job(host, token, payload.batch, payload.job)
        try:
            with host.lock:
                document = _run_as(host, token, payload.batch)
        except CommandHangs as exc:
            # On Windows the command would never return: the controller's operation times out with no result
            # document. The lab ends it at once (no stdout, rc 1) and says why, rather than hold the shell.
            message = f"rdplab: the agent hangs and this command would never return a result: {exc}\r\n"
            return CommandOutcome(rc=1, stdout=b"", stderr=message.encode("utf-8"))
        except ValueError as exc:
            # BatchError: the real agent prints a failed module result and exits 1.
            failed = {"failed": True, "msg": f"rdpfix agent: invalid batch: {exc}"}
            return CommandOutcome(rc=1, stdout=(json.dumps(failed) + "\r\n").encode("utf-8"), stderr=b"")
        # The agent writes one line; the module wrapper passes it on as the module's output.
        body = json.dumps(document, separators=(",", ":"), ensure_ascii=False) + "\r\n"
        return CommandOutcome(rc=0, stdout=body.encode("utf-8"), stderr=b"")


RECOGNISERS: list[Recogniser] = [AnsibleModuleWrapper(), WinReboot()]


def command_line_of(command: str, arguments: t.Sequence[str]) -> str:
    """Reassemble what the client meant to run: WinRM carries the program and its arguments separately."""
    return " ".join([command, *arguments]) if arguments else command


def recognise(command_line: str) -> Recogniser | CommandOutcome:
    """The recogniser that claims the command line, or the refusal to return at once."""
    problems: list[str] = []
    for recogniser in RECOGNISERS:
        try:
            if recogniser.matches(command_line):
                return recogniser
        except RecogniserUnavailable as exc:
            problems.append(str(exc))
    shown = command_line if len(command_line) <= 120 else command_line[:117] + "..."
    reason = f"command line {shown!r} is not Ansible's module bootstrap"
    if problems:
        reason += " (" + "; ".join(problems) + ")"
    return refusal(reason)


def execute(host: WindowsHost, command_line: str, stdin: bytes) -> CommandOutcome:
    """Recognise and run in one step (used when stdin is already complete)."""
    found = recognise(command_line)
    if isinstance(found, CommandOutcome):
        return found
    return run_safely(found, host, command_line, stdin)


def run_safely(recogniser: Recogniser, host: WindowsHost, command_line: str, stdin: bytes) -> CommandOutcome:
    """Run a recogniser; a bug in the lab becomes a failed command with its message, not a dead connection."""
    try:
        return recogniser.run(host, command_line, stdin)
    except transport_faults.BatchCancelled:
        # Terminated between two operations (rdplab.transport_faults): the process is gone and writes no result
        # document; the client that sent terminate never reads the exit code (which one Windows gives: UNCONFIRMED).
        return CommandOutcome(rc=1, stdout=b"", stderr=b"")
    except Exception as exc:
        message = f"rdplab: internal error while emulating {recogniser.name}: {type(exc).__name__}: {exc}\r\n"
        return CommandOutcome(rc=1, stdout=b"", stderr=message.encode("utf-8"))
