"""QMP sessions: listeners, per-connection dispatch in order, event broadcast, bounded output.

Each connection is a raw non-blocking socket driven by the event loop (``add_reader``/``add_writer``)
so that file descriptors passed with SCM_RIGHTS (``getfd``) can be received. A connection reads
one chunk, runs the commands it completes one after the other, then reads again: commands of one
client run in order, and a client that floods us only slows itself. Output goes through a per-session
queue with a byte bound; a client that stops reading while events pile up is disconnected rather than
allowed to grow the daemon's memory or stall anyone else.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import socket
from collections import deque
from pathlib import Path
from typing import Any

from migd import startup
from migd.backoff import TRANSIENT_ERRNOS, Backoff, LogLimiter
from migd.config import split_host_port
from migd.events import Event
from migd.qmp import protocol
from migd.qmp.budget import MAX_INPUT_TOTAL, InputBudget
from migd.qmp.commands import load_all
from migd.qmp.registry import REGISTRY, CommandContext, CommandHost, QMPError
from migd.qmp.schema import dump, validate
from migd.startup import StartupError
from migd.transports.unix import listen_unix

log = logging.getLogger(__name__)

MAX_PENDING_OUTPUT = 8 << 20  # bytes queued for one client before it counts as not reading
READ_SIZE = 1 << 16
MAX_FDS_PER_MESSAGE = 16
OFFERED_CAPABILITIES: list[str] = []  # no OOB


class Session:
    """One QMP connection: negotiation state, named fds (``getfd``), its output queue."""

    _ids = itertools.count(1)

    def __init__(self, server: QMPServer, sock: socket.socket) -> None:
        self.id = next(self._ids)
        self.server = server
        self.sock = sock
        self.unix = sock.family == socket.AF_UNIX
        self.negotiated = False
        self.fds: dict[str, int] = {}  # getfd: name -> fd, owned by the session until popped
        self.received_fds: list[int] = []  # came with the last message, not yet claimed by getfd
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._parser = protocol.JSONStreamParser()
        self._out: deque[bytes] = deque()
        self._out_bytes = 0
        self._out_wake = asyncio.Event()
        self._drained = asyncio.Event()  # set while the queue is short enough to run more commands
        self._drained.set()
        self._sent = asyncio.Event()  # pulses whenever a batch went out (for flush)
        self._writer: asyncio.Task[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self._busy = False

    # -- output ------------------------------------------------------------------------------------

    def send(self, msg: dict[str, Any]) -> None:
        self.send_line(protocol.encode(msg))

    def send_line(self, line: bytes) -> None:
        if self.closed:
            return
        self._out.append(line)
        self._out_bytes += len(line)
        if self._out_bytes > self.server.max_pending:
            self._drained.clear()
        self._out_wake.set()

    def send_event(self, line: bytes) -> None:
        """Queue an event; a client already this far behind is dropped (it is not reading)."""
        if self.closed or not self.negotiated:
            return
        if self._out_bytes + len(line) > self.server.max_pending:
            log.warning("QMP client %d does not read its output; disconnecting it", self.id)
            self.close()
            return
        self.send_line(line)

    async def _write_loop(self) -> None:
        fd = self.sock.fileno()
        try:
            while True:
                while not self._out:
                    self._out_wake.clear()
                    await self._out_wake.wait()
                data = b"".join(self._out)
                count = len(self._out)
                sent = 0
                while sent < len(data):
                    try:
                        sent += self.sock.send(memoryview(data)[sent:])
                    except BlockingIOError:
                        await _wait_fd(self._loop, fd, write=True)
                for _ in range(count):
                    self._out.popleft()
                self._out_bytes -= len(data)
                self._sent.set()
                if self._out_bytes <= self.server.max_pending // 2:
                    self._drained.set()
        except (OSError, asyncio.CancelledError):
            self._out.clear()
            self._out_bytes = 0
            self._drained.set()
            self._sent.set()
            if not self.closed:
                self.close()

    async def flush(self, timeout: float) -> None:
        """Give queued output (the last replies, SHUTDOWN) a chance to reach the client."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._out and not self.closed:
                    self._sent.clear()
                    await self._sent.wait()

    # -- input -------------------------------------------------------------------------------------

    async def run(self) -> None:
        self._writer = asyncio.create_task(self._write_loop())
        self.send(protocol.greeting(OFFERED_CAPABILITIES))
        try:
            while not self.closed:
                data = await self._recv()
                items = self._parse(data)
                if items is None:
                    break
                if not self.server.input_budget.update(self.id, self._parser.pending):
                    log.warning("QMP session %d: over the daemon's input budget of %d bytes; message dropped",
                                self.id, self.server.input_budget.limit)
                    self._parser.discard()
                    self.server.input_budget.update(self.id, 0)
                    items.append(protocol.ParseError("JSON token size limit exceeded"))
                for item in items:
                    if self.closed:
                        break
                    await self._drained.wait()  # do not run more commands for a client not reading
                    self._busy = True  # a command, once started, finishes even if the client goes
                    try:
                        await self._handle(item)
                    finally:
                        self._busy = False
                    await asyncio.sleep(0)  # let other clients in: a flood must not own the loop
                if not data:
                    break
                if not items:
                    await asyncio.sleep(0)  # likewise while a long message streams in
        except (OSError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("QMP session %d failed", self.id)
        finally:
            await self.flush(1.0)
            self.close()

    def _parse(self, data: bytes) -> list[Any] | None:
        """The messages ``data`` completes (b"" = EOF), or None: the lexer failed, close (event loop).

        The lexer turns every bad input into QEMU's error reply; this is the net under a bug in it,
        so one client's odd bytes end its own session with one log line, not a traceback.
        """
        try:
            return self._parser.feed(data) if data else self._parser.feed_eof()
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("QMP session %d: input not understood (%s: %s); closing it", self.id,
                        type(exc).__name__, exc)
            return None

    async def _recv(self) -> bytes:
        fd = self.sock.fileno()
        while True:
            try:
                if self.unix:
                    return self._recv_with_fds()
                return self.sock.recv(READ_SIZE)
            except BlockingIOError:
                await _wait_fd(self._loop, fd, write=False)
            except ConnectionResetError:
                return b""

    def _recv_with_fds(self) -> bytes:
        fds = array.array("i")
        data, ancdata, _flags, _addr = self.sock.recvmsg(
            READ_SIZE, socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * fds.itemsize), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % fds.itemsize
                fds.frombytes(payload[:usable])
        if fds:
            # Like QEMU's socket chardev: newly passed fds replace unclaimed older ones.
            self._close_fds(self.received_fds)
            self.received_fds = list(fds)
        return data

    def take_received_fd(self) -> int | None:
        """The fd that came with the last message (SCM_RIGHTS), if any; the caller owns it."""
        if not self.received_fds:
            return None
        return self.received_fds.pop(0)

    # -- dispatch ----------------------------------------------------------------------------------

    async def _handle(self, item: Any) -> None:
        if isinstance(item, protocol.ParseError):
            self.send(protocol.error(item.desc))
            return
        has_id, id_ = protocol.request_id(item)
        try:
            result = await self._dispatch(item)
        except QMPError as exc:
            self.send(protocol.error(exc.desc, exc.error_class, has_id, id_))
        except protocol.RequestError as exc:
            self.send(protocol.error(exc.desc, "GenericError", has_id, id_))
        except Exception as exc:  # a bug in a handler must not take the daemon down
            log.exception("QMP command failed: %r", item)
            self.send(protocol.error(f"internal error: {exc}", "GenericError", has_id, id_))
        else:
            self.send(protocol.success(result, has_id, id_))

    async def _dispatch(self, msg: Any) -> Any:
        req = protocol.check_request(msg, oob_enabled=False)
        cmd = REGISTRY.get(req.name)
        if not self.negotiated:
            if cmd is None or req.name != "qmp_capabilities":
                raise QMPError("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
            args = validate(cmd.args_model, req.arguments) if cmd.args_model else None
            for cap in getattr(args, "enable", None) or []:
                if cap not in OFFERED_CAPABILITIES:
                    raise QMPError(f"Capability {cap} not available")
            self.negotiated = True
            return {}
        if cmd is None:
            raise QMPError(f"The command {req.name} has not been found", "CommandNotFound")
        if cmd.args_model is not None:
            args = validate(cmd.args_model, req.arguments)
        else:
            for key in req.arguments:
                raise QMPError(f"Parameter '{key}' is unexpected")
            args = None
        result = cmd.handler(CommandContext(self.server.daemon, self), args)
        if inspect.isawaitable(result):
            result = await result
        return dump(result) if result is not None else {}

    # -- life cycle --------------------------------------------------------------------------------

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.negotiated = False
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
            self._loop.remove_writer(self.sock.fileno())
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()
        if self.task is not None and self.task is not asyncio.current_task() and not self._busy:
            self.task.cancel()  # idle in recv; a running command is left to finish (QEMU does too)
        with contextlib.suppress(OSError):
            self.sock.close()
        self._close_fds(self.received_fds)
        self._close_fds(list(self.fds.values()))
        self.received_fds = []
        self.fds.clear()
        self.server.input_budget.release(self.id)
        self.server.sessions.discard(self)

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


async def _wait_fd(loop: asyncio.AbstractEventLoop, fd: int, write: bool) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)




class Listener:
    """One ``--qmp`` socket. A unix socket is created mode 0600 and removed again on close."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.path: Path | None = None
        self._inode: int | None = None
        if uri.startswith("unix:"):
            self.path = Path(uri[5:])
            self.sock = listen_unix(str(self.path), backlog=64, mode=0o600)
            self._inode = self.path.stat().st_ino
        else:
            host, port = split_host_port(uri[4:])
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _type, _proto, _canon, addr = infos[0]
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self.sock.bind(addr)
                self.sock.listen(64)
            except OSError:
                self.sock.close()
                raise
        self.sock.setblocking(False)
        self.backoff = Backoff()
        self.errors = LogLimiter(log)
        self.paused: asyncio.TimerHandle | None = None  # accepting again after an error, at this timer

    @property
    def address(self) -> str:
        """The address clients connect to (with the real port for ``tcp:HOST:0``)."""
        if self.path is not None:
            return f"unix:{self.path}"
        host, port = self.sock.getsockname()[:2]
        return f"tcp:{host}:{port}"

    def close(self) -> None:
        if self.paused is not None:
            self.paused.cancel()
            self.paused = None
        self.sock.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                if self.path.stat().st_ino == self._inode:
                    self.path.unlink()


class QMPServer:
    """Every QMP listener of one daemon, their sessions, and the event broadcast to them."""

    def __init__(self, daemon: CommandHost, uris: list[str], max_pending: int = MAX_PENDING_OUTPUT,
                 max_input: int = MAX_INPUT_TOTAL) -> None:
        load_all()
        self.daemon = daemon
        self.uris = list(uris)
        self.max_pending = max_pending
        self.input_budget = InputBudget(max_input)  # bytes of unfinished messages, all sessions together
        self.listeners: list[Listener] = []
        self.sessions: set[Session] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Bind and listen on every socket (connections wait in the backlog until ``serve``)."""
        self._loop = asyncio.get_running_loop()
        try:
            for uri in self.uris:
                with startup.step("--qmp", uri):
                    self.listeners.append(Listener(uri))
        except StartupError:
            self._close_listeners()
            raise

    def serve(self) -> None:
        """Start accepting: called once the whole daemon is up, so a greeting means "ready"."""
        assert self._loop is not None
        self.daemon.events.subscribe(self._broadcast)
        for listener in self.listeners:
            self._loop.add_reader(listener.sock.fileno(), self._accept, listener)

    def _accept(self, listener: Listener) -> None:
        """Take every waiting connection (event loop); on an error, stop reading the socket a while.

        Out of descriptors, the connection stays queued and the socket readable: retrying at once
        would spin, so the listener pauses (10 ms doubling to 1 s) and logs at most once a second.
        """
        while True:
            try:
                sock, _addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in TRANSIENT_ERRNOS:
                    continue
                self._pause(listener, exc)
                return
            listener.backoff.reset()
            sock.setblocking(False)
            session = Session(self, sock)
            self.sessions.add(session)
            session.task = asyncio.create_task(session.run())

    def _pause(self, listener: Listener, exc: OSError) -> None:
        """Stop accepting on ``listener`` for the next back-off delay (event loop)."""
        assert self._loop is not None
        delay = listener.backoff.next()
        listener.errors.warning("QMP accept on %s failed: %s; retrying in %.2f s", listener.uri, exc, delay)
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(listener.sock.fileno())
        listener.paused = self._loop.call_later(delay, self._resume, listener)

    def _resume(self, listener: Listener) -> None:
        """Accept again after a pause (event loop), unless the listener was closed meanwhile."""
        listener.paused = None
        if listener in self.listeners and self._loop is not None:
            self._loop.add_reader(listener.sock.fileno(), self._accept, listener)
            self._accept(listener)

    def _broadcast(self, event: Event) -> None:
        line = protocol.encode(event)
        for session in list(self.sessions):
            session.send_event(line)

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            if self._loop is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(listener.sock.fileno())
            listener.close()
        self.listeners.clear()

    async def close(self, flush_timeout: float = 1.0) -> None:
        """Stop listening, let pending output out, then close every session."""
        self.daemon.events.unsubscribe(self._broadcast)
        self._close_listeners()
        sessions = list(self.sessions)
        await asyncio.gather(*(s.flush(flush_timeout) for s in sessions))
        for session in sessions:
            session.close()
        tasks = [s.task for s in sessions if s.task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=flush_timeout)
            for task in pending:  # a command still running at exit: the daemon is going away
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=flush_timeout)
