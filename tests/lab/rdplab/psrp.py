"""PowerShell Remoting (PSRP) on the lab's WS-Management listeners, as pypsrp and Ansible's psrp connection use it.

Windows serves PSRP on the same /wsman listeners as WinRS, told apart by the resource URI
(``http://schemas.microsoft.com/powershell/Microsoft.PowerShell``) [MS-PSRP 3.1.4]: transfer/Create opens a runspace
pool (its first PSRP fragments in ``creationXml``), shell/Command creates a pipeline (the first fragment of
CREATE_PIPELINE as its argument), shell/Send carries further fragments and the pipeline input, shell/Receive returns
the server's fragments (``stdout`` stream), shell/Signal stops a pipeline and transfer/Delete closes the pool. The PSRP
messages themselves are read and written by psrpcore's server objects.

What a pipeline may run is decided by ``rdplab.bootstrap``, with the same (command line, stdin) a WinRS command would
hand it. Ansible's psrp connection takes ``PowerShell ... -EncodedCommand <script>`` apart and runs the decoded script
in the runspace with ``in_data.splitlines()`` as pipeline input, so the lab puts it back together:

- command line: ``PowerShell -NoProfile -NonInteractive -ExecutionPolicy Unrestricted -EncodedCommand`` and the
  script, UTF-16-LE, base64 (the line Ansible decoded);
- stdin: what the script can read. ``$input`` (the pipeline input) yields the input strings, as powershell.exe's
  ``$input`` yields the lines of its redirected stdin, so a payload that reads ``$input`` gets the lines joined by LF
  (with a final LF). ``[Console]::In`` of a runspace in the WinRM host process has no input at all, so a payload that
  reads the console gets empty stdin. A recogniser says which it reads with ``stdin_source`` ("console" when absent,
  or "pipeline").

The outcome goes back as PowerShell would deliver it: each stdout line a string on the output stream, each stderr
line an error record, and a non-zero exit code as the host call SetShouldExit(rc) that ``exit rc`` makes in a
runspace (pypsrp's host keeps it as the rc; Ansible's psrp connection reports it).
"""

from __future__ import annotations

import base64
import binascii
import collections
import logging
import threading
import time
import typing as t
import uuid
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

import psrpcore
from psrpcore.types import (
    ErrorCategory,
    ErrorCategoryInfo,
    HostMethodIdentifier,
    NETException,
    PSInvocationState,
)

from rdplab import bootstrap, transport_faults
from rdplab.model import host as host_model

if t.TYPE_CHECKING:
    from rdplab.model.host import WindowsHost
    from rdplab.winrm import HostSlot, Request

LOG = logging.getLogger("rdplab.psrp")

RESOURCE_PREFIX = "http://schemas.microsoft.com/powershell/"
CONFIGURATION = "Microsoft.PowerShell"
NS_PSRP = "http://schemas.microsoft.com/powershell"
COMMAND_PREFIX = "PowerShell -NoProfile -NonInteractive -ExecutionPolicy Unrestricted -EncodedCommand "
SIGNAL_CTRL_C = "http://schemas.microsoft.com/powershell/signal/crtl_c"


def is_psrp(resource_uri: str) -> bool:
    return resource_uri.lower().startswith(RESOURCE_PREFIX.lower())


def command_line_of_script(script: str) -> str:
    """The powershell.exe command line that runs ``script`` (what Ansible's psrp connection decoded)."""
    return COMMAND_PREFIX + base64.b64encode(script.encode("utf-16-le")).decode("ascii")


def stdin_of_input(lines: t.Sequence[str]) -> bytes:
    """powershell.exe's stdin whose lines ``$input`` would yield as these strings."""
    return "".join(line + "\n" for line in lines).encode("utf-8")


@dataclass
class Pipeline:
    command_id: str
    server: psrpcore.ServerPipeline
    input_lines: list[str] = field(default_factory=list)
    started: bool = False
    finished: bool = False
    stopped: bool = False
    # The transport fault armed for this pipeline and its cancellation (rdplab.transport_faults), and whether the
    # fault has been spent on the answer that would deliver the output.
    context: transport_faults.CommandContext = field(default_factory=transport_faults.CommandContext)
    fault_spent: bool = False
    # The last Receive answered (its MessageID and body): a client whose answer was lost or late sends the same
    # Receive again and gets the same data (pypsrp retries a Receive after a read timeout, relying on it).
    last_reply: tuple[str, str] | None = None


class Pool:
    """One runspace pool (a WS-Management shell with the PowerShell resource URI)."""

    def __init__(self, shell_id: str) -> None:
        self.shell_id = shell_id
        self.server = psrpcore.ServerRunspacePool()
        self.lock = threading.Condition()
        self.pipelines: dict[str, Pipeline] = {}
        # Fragments ready for the client: per pipeline id (None: the pool itself).
        self.outgoing: dict[uuid.UUID | None, collections.deque[bytes]] = collections.defaultdict(collections.deque)
        # The WinRM plugin host process (wsmprovhost.exe) every pipeline of the pool runs in: it outlives each batch,
        # a stopped one included, until the pool is closed (rdplab.model.host.hosted_by).
        self.process: dict[str, t.Any] | None = None

    def flush(self) -> None:
        """Move what psrpcore prepared into the per-target queues (caller holds the lock)."""
        while (payload := self.server.data_to_send()) is not None:
            self.outgoing[payload.pipeline_id].append(payload.data)
        self.lock.notify_all()


def _text(node: t.Any) -> str:
    return (node.text or "").strip() if node is not None else ""


class PsrpEndpoint:
    """The PSRP shells of one host, reached through the WinRM listener's SOAP dispatch."""

    def __init__(self, slot: HostSlot, url: str, wsman_fault: type[Exception]) -> None:
        self.slot = slot
        self.url = url
        self.fault = wsman_fault

    # -- helpers ------------------------------------------------------------------------------------------------

    def _pools(self) -> dict[str, Pool]:
        pools: dict[str, Pool] = self.slot.psrp_pools
        return pools

    def _pool(self, request: Request) -> Pool:
        with self.slot.lock:
            pool = self._pools().get((request.shell_id or "").upper())
        if pool is None:
            raise self.fault(
                f"the request for the Windows Remote Shell with ShellId {request.shell_id} failed because the shell "
                "was not found on the server",
                "w:InvalidSelectors",
            )
        return pool

    def _feed(self, pool: Pool, data: bytes, pipeline_id: uuid.UUID | None) -> None:
        """Hand fragments to psrpcore and act on the events they complete (caller holds pool.lock)."""
        pool.server.receive_data(psrpcore.PSRPPayload(data, psrpcore.StreamType.default, pipeline_id))
        while True:
            try:
                event = pool.server.next_event()
            except psrpcore.PSRPCoreError as exc:
                raise self.fault(f"the PSRP data could not be processed: {exc}") from exc
            if event is None:
                break
            pipeline = next(
                (p for p in pool.pipelines.values() if p.server.pipeline_id == event.pipeline_id),
                None,
            )
            if isinstance(event, psrpcore.CreatePipelineEvent) and pipeline is not None:
                metadata = event.pipeline
                if metadata.no_input:
                    self._start(pool, pipeline)
            elif isinstance(event, psrpcore.PipelineInputEvent) and pipeline is not None:
                pipeline.input_lines.append(str(event.data))
            elif isinstance(event, psrpcore.EndOfPipelineInputEvent) and pipeline is not None:
                self._start(pool, pipeline)
        pool.flush()

    # -- actions ------------------------------------------------------------------------------------------------

    def handle(self, request: Request, resource_uri: str) -> tuple[str, str]:
        from rdplab import winrm

        configuration = resource_uri[len(RESOURCE_PREFIX) :]
        if configuration.lower() != CONFIGURATION.lower():
            raise self.fault(
                f"The WS-Management service cannot process the request. Cannot find the {configuration} session "
                "configuration in the WSMan: drive on the computer.",
                "w:InvalidResourceURI",
            )
        handlers: dict[str, t.Callable[[Request], tuple[str, str]]] = {
            winrm.ACTION_CREATE: self._create,
            winrm.ACTION_COMMAND: self._command,
            winrm.ACTION_SEND: self._send,
            winrm.ACTION_RECEIVE: self._receive,
            winrm.ACTION_SIGNAL: self._signal,
            winrm.ACTION_DELETE: self._delete,
        }
        handler = handlers.get(request.action)
        if handler is None:
            raise self.fault(
                f"the WS-Management service does not support the action {request.action}", "a:ActionNotSupported"
            )
        return handler(request)

    def _create(self, request: Request) -> tuple[str, str]:
        from rdplab import winrm

        shell_node = request.body.find("rsp:Shell", winrm.Q)
        creation = request.body.find(f"rsp:Shell/{{{NS_PSRP}}}creationXml", winrm.Q)
        if shell_node is None or creation is None:
            raise self.fault("a PowerShell shell needs its creationXml", "w:SchemaValidationError")
        shell_id = (shell_node.get("ShellId") or str(uuid.uuid4())).upper()
        try:
            data = base64.b64decode(_text(creation), validate=True)
        except binascii.Error as exc:
            raise self.fault(f"creationXml is not base64: {exc}") from exc
        pool = Pool(shell_id)
        with pool.lock:
            self._feed(pool, data, None)
        host = self.slot.host
        pool.process = host.open_host_process()
        with self.slot.lock:
            self._pools()[shell_id] = pool
        with host.lock:
            host.counters.winrm_shells += 1
        resource = RESOURCE_PREFIX + CONFIGURATION
        body = (
            "<x:ResourceCreated>"
            f"<a:Address>{escape(self.url)}</a:Address>"
            f"<a:ReferenceParameters><w:ResourceURI>{resource}</w:ResourceURI>"
            f'<w:SelectorSet><w:Selector Name="ShellId">{shell_id}</w:Selector></w:SelectorSet>'
            "</a:ReferenceParameters></x:ResourceCreated>"
            f"<rsp:Shell><rsp:ShellId>{shell_id}</rsp:ShellId><rsp:ResourceUri>{resource}</rsp:ResourceUri>"
            f"<rsp:Owner>{escape(host.username)}</rsp:Owner>"
            "<rsp:InputStreams>stdin pr</rsp:InputStreams><rsp:OutputStreams>stdout</rsp:OutputStreams>"
            "</rsp:Shell>"
        )
        return winrm.NS_TRANSFER + "/CreateResponse", body

    def _command(self, request: Request) -> tuple[str, str]:
        from rdplab import winrm

        pool = self._pool(request)
        line = request.body.find("rsp:CommandLine", winrm.Q)
        arguments = request.body.find("rsp:CommandLine/rsp:Arguments", winrm.Q)
        if line is None or arguments is None:
            raise self.fault("a PowerShell pipeline needs its CREATE_PIPELINE fragment", "w:SchemaValidationError")
        command_id = (line.get("CommandId") or str(uuid.uuid4())).upper()
        try:
            pipeline_id = uuid.UUID(command_id)
            data = base64.b64decode(_text(arguments), validate=True)
        except (ValueError, binascii.Error) as exc:
            raise self.fault(f"the pipeline's CommandId or fragment is malformed: {exc}") from exc
        host = self.slot.host
        with host.lock:
            host.counters.winrm_commands += 1
        with self.slot.lock:
            self.slot.commands_by_channel[f"psrp/{request.channel}"] += 1
        context = transport_faults.arm(host)
        if context.kind() == "drop_before":
            # The request never reached the runspace pool: no pipeline exists, nothing runs.
            raise transport_faults.DropConnection("drop_before")
        with pool.lock:
            pipeline = Pipeline(command_id, psrpcore.ServerPipeline(pool.server, pipeline_id), context=context)
            pool.pipelines[command_id] = pipeline
            self._feed(pool, data, pipeline_id)
        body = f"<rsp:CommandResponse><rsp:CommandId>{command_id}</rsp:CommandId></rsp:CommandResponse>"
        return winrm.NS_SHELL + "/CommandResponse", body

    def _send(self, request: Request) -> tuple[str, str]:
        from rdplab import winrm

        pool = self._pool(request)
        for stream in request.body.findall("rsp:Send/rsp:Stream", winrm.Q):
            command_id = (stream.get("CommandId") or "").upper()
            try:
                data = base64.b64decode(_text(stream), validate=True)
            except binascii.Error as exc:
                raise self.fault(f"the {stream.get('Name')} stream is not base64: {exc}") from exc
            with pool.lock:
                pipeline_id = None
                if command_id:
                    pipeline = pool.pipelines.get(command_id)
                    if pipeline is None:
                        raise self.fault(f"the command {command_id} was not found in shell {pool.shell_id}")
                    pipeline_id = pipeline.server.pipeline_id
                self._feed(pool, data, pipeline_id)
        return winrm.NS_SHELL + "/SendResponse", "<rsp:SendResponse/>"

    def _receive(self, request: Request) -> tuple[str, str]:
        from rdplab import winrm

        pool = self._pool(request)
        desired = request.body.find("rsp:Receive/rsp:DesiredStream", winrm.Q)
        command_id = ((desired.get("CommandId") if desired is not None else None) or "").upper()
        wait = max(0.2, min(request.operation_timeout - 0.5, winrm.MAX_RECEIVE_WAIT))
        budget = max(1024, (request.max_envelope - 4096) * 3 // 4)
        with pool.lock:
            pipeline = pool.pipelines.get(command_id) if command_id else None
            if command_id and pipeline is None:
                raise self.fault(f"the command {command_id} was not found in shell {pool.shell_id}")
            if (
                pipeline is not None
                and pipeline.last_reply is not None
                and pipeline.last_reply[0] == request.message_id
            ):
                return winrm.NS_SHELL + "/ReceiveResponse", pipeline.last_reply[1]
            key = pipeline.server.pipeline_id if pipeline is not None else None
            queue = pool.outgoing[key]
            stall = pipeline.context.fault if pipeline is not None else None
            if stall is not None and stall.kind == "cut_at_op" and not queue:
                # A stalled host behind a stalled network: no answer until the pipeline ends or the fault's time
                # passes, so the client's read timeout fires.
                wait = stall.seconds
            if not pool.lock.wait_for(lambda: bool(queue) or (pipeline is not None and pipeline.finished), wait):
                raise winrm.WSManFault(
                    "The WS-Management service cannot complete the operation within the time specified in "
                    "OperationTimeout.",
                    subcode="w:TimedOut",
                    code=winrm.FAULT_OPERATION_TIMEOUT,
                )
            fault = pipeline.context.fault if pipeline is not None and pipeline.finished else None
            if pipeline is not None and fault is not None and not pipeline.fault_spent:
                pipeline.fault_spent = True
            else:
                fault = None
        if fault is not None:
            # The pipeline has run to its end: the answer that would deliver its output is lost or late.
            if fault.kind == "drop_after":
                raise transport_faults.DropConnection("drop_after")
            if fault.kind == "http500_after":
                raise winrm.WSManFault(
                    "The WS-Management service cannot process the request: an internal error occurred."
                )
            if fault.kind == "delay_after":
                time.sleep(fault.seconds)
        with pool.lock:
            chunks: list[bytes] = []
            size = 0
            while queue and (not chunks or size + len(queue[0]) <= budget):
                chunk = queue.popleft()
                chunks.append(chunk)
                size += len(chunk)
            done = pipeline is not None and pipeline.finished and not queue
        attribute = f' CommandId="{command_id}"' if command_id else ""
        parts = [
            f'<rsp:Stream Name="stdout"{attribute}>{base64.b64encode(chunk).decode()}</rsp:Stream>' for chunk in chunks
        ]
        if command_id:
            state = winrm.STATE_DONE if done else winrm.STATE_RUNNING
            parts.append(f'<rsp:CommandState CommandId="{command_id}" State="{state}"/>')
        body = "<rsp:ReceiveResponse>" + "".join(parts) + "</rsp:ReceiveResponse>"
        if pipeline is not None:
            with pool.lock:
                pipeline.last_reply = (request.message_id, body)
        return winrm.NS_SHELL + "/ReceiveResponse", body

    def _signal(self, request: Request) -> tuple[str, str]:
        from rdplab import winrm

        pool = self._pool(request)
        signal = request.body.find("rsp:Signal", winrm.Q)
        command_id = ((signal.get("CommandId") if signal is not None else None) or "").upper()
        with pool.lock:
            pipeline = pool.pipelines.pop(command_id, None)
            if pipeline is None:
                raise self.fault(f"the command {command_id} was not found in shell {pool.shell_id}")
            # A batch still running stops before its next operation (rdplab.transport_faults).
            transport_faults.terminate(pipeline.context)
            # Ctrl+C stops the pipeline; one that has run to its end is only forgotten (its output is dropped).
            pipeline.stopped = True
            pool.outgoing.pop(pipeline.server.pipeline_id, None)
            if pipeline.server.state == PSInvocationState.Running and not pipeline.finished:
                pipeline.server.stop()
                pool.flush()
                pool.outgoing.pop(pipeline.server.pipeline_id, None)
        return winrm.NS_SHELL + "/SignalResponse", "<rsp:SignalResponse/>"

    def _delete(self, request: Request) -> tuple[str, str]:
        from rdplab import winrm

        pool = self._pool(request)
        with self.slot.lock:
            self._pools().pop(pool.shell_id, None)
        if pool.process is not None:
            self.slot.host.close_host_process(pool.process)
        return winrm.NS_TRANSFER + "/DeleteResponse", ""

    # -- running a pipeline ---------------------------------------------------------------------------------------

    def _start(self, pool: Pool, pipeline: Pipeline) -> None:
        """Run the pipeline's script in a thread (caller holds pool.lock)."""
        if pipeline.started:
            return
        pipeline.started = True
        pipeline.server.start()
        metadata = pipeline.server.metadata
        commands = list(getattr(metadata, "commands", []) or [])
        host = self.slot.host
        lines = list(pipeline.input_lines)

        def work() -> None:
            try:
                if len(commands) != 1 or not commands[0].is_script or commands[0].parameters:
                    names = ", ".join(repr(c.command_text)[:60] for c in commands)
                    outcome = bootstrap.refusal(f"the pipeline is not a single script without arguments: {names}")
                else:
                    with transport_faults.running(pipeline.context), host_model.hosted_by(pool.process):
                        outcome = self._run_script(host, str(commands[0].command_text), lines)
            except Exception as exc:  # a bug in the lab: a failed pipeline with its message, not a hung one
                message = f"rdplab: internal error: {type(exc).__name__}: {exc}\r\n"
                outcome = bootstrap.CommandOutcome(1, b"", message.encode("utf-8"))
            self.slot.changed()
            with pool.lock:
                if not pipeline.stopped:
                    self._deliver(pipeline, outcome)
                pipeline.finished = True
                pool.flush()

        threading.Thread(target=work, name=f"psrp-{pipeline.command_id[:8]}", daemon=True).start()

    def _run_script(self, host: WindowsHost, script: str, lines: list[str]) -> bootstrap.CommandOutcome:
        command_line = command_line_of_script(script)
        found = bootstrap.recognise(command_line)
        if isinstance(found, bootstrap.CommandOutcome):
            LOG.info("%s: refused pipeline %.120r", self.slot.address, command_line)
            return found
        source = getattr(found, "stdin_source", "console")
        stdin = stdin_of_input(lines) if source == "pipeline" else b""
        return bootstrap.run_safely(found, host, command_line, stdin)

    @staticmethod
    def _deliver(pipeline: Pipeline, outcome: bootstrap.CommandOutcome) -> None:
        server = pipeline.server
        for line in outcome.stdout.decode("utf-8", errors="replace").splitlines():
            server.write_output(line)
        for line in outcome.stderr.decode("utf-8", errors="replace").splitlines():
            if line.strip():
                server.write_error(
                    NETException(Message=line),
                    ErrorCategoryInfo(Category=ErrorCategory.NotSpecified, Reason="WriteErrorException"),
                    fully_qualified_error_id="Microsoft.PowerShell.Commands.WriteErrorException",
                )
        if outcome.rc != 0:
            server.host_call(HostMethodIdentifier.SetShouldExit, [outcome.rc])
        server.complete()
