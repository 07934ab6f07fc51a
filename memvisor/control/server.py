"""The QMP server: QEMU's monitor protocol on a UNIX socket, in a thread of its own with its own event loop.

    server = QmpServer("/run/vm.qmp", machine)
    server.start()        # returns once the socket accepts connections
    ...
    server.stop()

Protocol (QEMU docs/interop/qmp-spec.txt, QEMU 7.2 behaviour and texts):
- on connect the server sends the greeting {"QMP": {"version": {...}, "capabilities": ["oob"]}};
- the client must send `qmp_capabilities` first; anything else gets CommandNotFound "Expecting capabilities
  negotiation with 'qmp_capabilities'";
- then each {"execute": NAME, "arguments": {...}, "id": ANY} gets {"return": ...} or {"error": {"class",
  "desc"}}, with the `id` echoed; replies to one client come in the order of its commands;
- events go to every client that has negotiated: {"event", "data"?, "timestamp": {"seconds", "microseconds"}}.

Robustness: each client has its own task; commands run in a worker thread pool so that a slow machine call
(guest exec, stop) never blocks the event loop or the other clients; a value over `max_message` bytes gets an
error and the connection is closed; a client that stops reading while events pile up beyond `max_backlog`
bytes is dropped; a client that hangs up mid-command is forgotten once the command finishes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from memvisor.control import commands
from memvisor.control.aio import asyncio  # asyncio without ssl: see aio.py
from memvisor.control.errors import COMMAND_NOT_FOUND, QmpError
from memvisor.control.events import event_message
from memvisor.control.machine_api import EventData, MachineControl
from memvisor.control.stream import JsonSplitter, StreamLimitError
from memvisor.errors import MemvisorError

log = logging.getLogger(__name__)

CAPABILITIES = ("oob",)
READ_CHUNK = 65536
ALLOWED_MEMBERS = {"execute", "exec-oob", "arguments", "id", "control"}


def greeting() -> dict[str, Any]:
    """The first message of every connection, shaped as QEMU 7.2's."""
    return {
        "QMP": {
            "version": {"qemu": dict(commands.QEMU_VERSION), "package": commands.PACKAGE},
            "capabilities": list(CAPABILITIES),
        }
    }


def _parse_error(err: ValueError) -> str:
    if isinstance(err, json.JSONDecodeError):
        return "JSON parse error, " + err.msg[:1].lower() + err.msg[1:]
    return "JSON parse error, invalid UTF-8 sequence"


class _Client:
    """One connection: its stream writer and whether it has negotiated capabilities."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False
        self.oob = False
        self.closed = False

    def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            self.writer.write(json.dumps(message).encode() + b"\r\n")
        except (OSError, RuntimeError):
            self.closed = True


class QmpServer:
    """A QMP server for one machine; see the module docstring."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        machine: MachineControl,
        *,
        max_message: int = 1 << 20,
        max_backlog: int = 16 << 20,
        workers: int = 8,
    ) -> None:
        self.path = os.fspath(path)
        self.machine = machine
        self.max_message = max_message
        self.max_backlog = max_backlog
        self._workers = workers
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._clients: set[_Client] = set()
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._ctx = commands.Context(machine, self.emit)

    # --- life cycle (any thread) -------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the socket and serve in a new thread; return once connections are accepted."""
        if self._thread is not None:
            raise MemvisorError("the QMP server is already running: call stop() before start()")
        self._prepare_path()
        self._ready.clear()
        self._start_error = None
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="qmp-worker")
        self._thread = threading.Thread(target=self._run, name="qmp-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise MemvisorError(
                f"cannot listen on QMP socket {self.path}: {self._start_error}; choose another --qmp path"
            ) from self._start_error
        self.machine.set_event_sink(self.emit)

    def stop(self) -> None:
        """Close every connection and the socket; safe to call twice and from any thread, even a worker."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None or loop is None or stopping is None:
            return
        self.machine.set_event_sink(None)
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(stopping.set)
        if threading.current_thread() is not thread:
            thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> QmpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def emit(self, name: str, data: EventData) -> None:
        """Send an event to every negotiated client; callable from any thread (this is the machine's sink)."""
        message = event_message(name, data)
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: nobody to tell
            loop.call_soon_threadsafe(self._broadcast, message)

    # --- the loop thread ---------------------------------------------------------------------------------------

    def _prepare_path(self) -> None:
        """Remove a stale socket left by a dead memvisor; refuse to clobber a live one or a plain file."""
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise MemvisorError(
                f"QMP socket path {self.path} exists and is not a socket: remove it or pick another"
            )
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)
                return
        raise MemvisorError(
            f"QMP socket {self.path} is in use by another process: stop it or pick another path"
        )

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        finally:
            loop.close()
            self._loop = None
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._ready.set()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        try:
            server = await asyncio.start_unix_server(self._session, path=self.path, limit=READ_CHUNK)
        except OSError as err:
            self._start_error = err
            self._ready.set()
            return
        self._ready.set()
        tasks: set[asyncio.Task[None]] = set()
        async with server:
            await self._stopping.wait()
            server.close()
            for client in list(self._clients):
                client.closed = True
                client.writer.close()
            tasks = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _broadcast(self, message: dict[str, Any]) -> None:
        for client in list(self._clients):
            if not client.negotiated:
                continue
            client.send(message)
            transport = client.writer.transport
            if transport.get_write_buffer_size() > self.max_backlog:
                log.warning("QMP client does not read its events; dropping it")
                client.closed = True
                transport.abort()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = _Client(writer)
        self._clients.add(client)
        splitter = JsonSplitter(self.max_message)
        try:
            client.send(greeting())
            await writer.drain()
            while not client.closed:
                chunk = await reader.read(READ_CHUNK)
                if not chunk:
                    break
                try:
                    values = splitter.feed(chunk)
                except StreamLimitError as err:
                    client.send({"error": {"class": "GenericError", "desc": f"JSON parse error, {err}"}})
                    await writer.drain()
                    break
                for raw in values:
                    if client.closed:
                        break
                    await self._handle(client, raw)
                    await writer.drain()
                    await asyncio.sleep(0)  # let other clients in between the commands of a flood
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # the server is stopping; ending quietly keeps asyncio from logging the cancelled callback
        finally:
            self._clients.discard(client)
            client.closed = True
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, client: _Client, raw: bytes) -> None:
        """Parse one value, run it, send the reply."""
        try:
            request = json.loads(raw)
        except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
            client.send({"error": {"class": "GenericError", "desc": _parse_error(err)}})
            return
        except RecursionError:
            client.send({"error": {"class": "GenericError", "desc": "JSON parse error, nesting too deep"}})
            return
        if not isinstance(request, dict):
            client.send({"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}})
            return
        reply: dict[str, Any] = {}
        after_reply = None
        try:
            name, arguments = self._check_request(client, request)
            if name == "qmp_capabilities":
                reply["return"] = self._negotiate(client, arguments)
            else:
                if not client.negotiated:
                    raise QmpError(
                        "Expecting capabilities negotiation with 'qmp_capabilities'", COMMAND_NOT_FOUND
                    )
                cmd = commands.REGISTRY.get(name)
                after_reply = cmd.after_reply if cmd is not None else None
                reply["return"] = await self._call(commands.execute, self._ctx, name, arguments)
        except (QmpError, MemvisorError) as err:  # the one place memvisor's errors become QMP errors
            reply = {"error": {"class": getattr(err, "error_class", "GenericError"), "desc": str(err)}}
            after_reply = None
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a bug in a handler or the machine must not take the server down
            log.exception("QMP command failed")
            reply = {
                "error": {"class": "GenericError", "desc": f"internal error: {type(err).__name__}: {err}"}
            }
            after_reply = None
        if "id" in request:
            reply["id"] = request["id"]
        client.send(reply)
        if after_reply is not None:
            await client.writer.drain()
            await self._call(after_reply, self._ctx)

    def _check_request(self, client: _Client, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """QEMU's checks of the request object itself (qmp-dispatch.c), in QEMU's order."""
        for member in request:
            if member not in ALLOWED_MEMBERS:
                raise QmpError(f"QMP input member '{member}' is unexpected")
        if "exec-oob" in request:
            if not client.oob:
                raise QmpError("QMP input member 'exec-oob' is unexpected")
            raise QmpError(f"The command {request['exec-oob']} does not support OOB")
        if "execute" not in request:
            raise QmpError("QMP input lacks member 'execute'")
        name = request["execute"]
        if not isinstance(name, str):
            raise QmpError("QMP input member 'execute' must be a string")
        arguments = request.get("arguments", {})
        if not isinstance(arguments, dict):
            raise QmpError("QMP input member 'arguments' must be an object")
        return name, arguments

    def _negotiate(self, client: _Client, arguments: dict[str, Any]) -> dict[str, Any]:
        if client.negotiated:
            raise QmpError("Capabilities negotiation is already complete, command ignored", COMMAND_NOT_FOUND)
        enable = arguments.get("enable", [])
        for name in arguments:
            if name != "enable":
                raise QmpError(f"Parameter '{name}' is unexpected")
        if not isinstance(enable, list) or not all(isinstance(cap, str) for cap in enable):
            raise QmpError("Invalid parameter type for 'enable', expected: array")
        for cap in enable:
            if cap not in CAPABILITIES:
                raise QmpError(f"Capability '{cap}' not available")
        client.oob = "oob" in enable
        client.negotiated = True
        return {}

    async def _call(self, func: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, func, *args)
