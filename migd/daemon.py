"""One migd process: the event loop and everything hung on it.

The daemon wires the parts together and owns their life cycle: the machine (vCPU threads), the
source-side migration state, the destination side when ``--incoming`` is given, the QMP listeners and
the optional HTTP endpoint. It starts them in dependency order, tells systemd when every listener is
up, and on ``quit`` or SIGTERM/SIGINT shuts them down in reverse so the process exits 0 with no socket
file left behind.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from migd import sdnotify, startup
from migd.config import DaemonConfig
from migd.events import EventSink
from migd.machine.runstate import RunState, RunStateMachine
from migd.startup import StartupError

log = logging.getLogger(__name__)

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (faster sockets and timers), asyncio's loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


STOP_STEP_TIMEOUT = 15.0


async def _bounded(step: Callable[[], Awaitable[Any]], what: str) -> None:
    """Run one shutdown step, logging (not raising) if it fails or takes too long."""
    try:
        await asyncio.wait_for(step(), STOP_STEP_TIMEOUT)
    except TimeoutError:
        log.error("shutdown: %s did not finish within %.0f s; going on", what, STOP_STEP_TIMEOUT)
    except Exception:
        log.exception("shutdown: %s failed", what)


async def _in_daemon_thread(fn: Callable[[], Any]) -> None:
    """Like run_in_executor, but a thread that never returns cannot hold up interpreter exit."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not done.done():
            done.set_result(None) if error is None else done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            fn()
        except BaseException as exc:  # handed to the awaiting task
            error = exc
        try:
            loop.call_soon_threadsafe(settle, error)
        except RuntimeError:  # gave up on it and the loop is closed: nobody is waiting any more
            pass

    threading.Thread(target=run, name="shutdown", daemon=True).start()
    await done


class Daemon:
    """See INTERNALS.md: ``loop``, ``events``, ``runstate``, ``machine``, ``migration``, ``incoming``,
    ``request_shutdown()``, ``run_blocking()``; plus ``autostart`` (QEMU's: whether an incoming
    migration starts the guest once it lands; cleared by ``-S`` or ``stop`` during inmigrate)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.loop: asyncio.AbstractEventLoop | None = None
        self.events = EventSink()
        if config.incoming is not None:
            initial = RunState.INMIGRATE
        elif config.machine.start_paused:
            initial = RunState.PRELAUNCH
        else:
            initial = RunState.RUNNING
        self.runstate = RunStateMachine(initial)
        self.autostart = not config.machine.start_paused
        self.machine: Any = None
        self.migration: Any = None
        self.incoming: Any = None
        self.qmp: Any = None
        self.http: Any = None
        self.shutdown_reason: str | None = None
        self.exit_code = 0
        self._stop_requested: asyncio.Event | None = None
        self._loop_thread: int | None = None
        self._stopped = False

    # -- running -----------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until quit or a signal; the process exit status."""
        loop = new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self.main())
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    async def main(self) -> int:
        try:
            await self.start()
        except Exception as exc:
            if not isinstance(exc, OSError | ValueError | StartupError):  # a bug, not a setting: keep the trace
                log.exception("cannot start")
            print(f"migd: error: {exc}", file=sys.stderr, flush=True)
            await self.stop()
            return exc.status if isinstance(exc, StartupError) else startup.status_for(exc)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # QEMU: all three are "host-signal"
            loop.add_signal_handler(sig, self.request_shutdown, "host-signal")
        await self.wait_stopped()
        await self.stop()
        return self.exit_code

    async def start(self) -> None:
        """Bring every part up; READY=1 once every listener accepts connections."""
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stop_requested = asyncio.Event()
        self.events.bind(self.loop)
        self.runstate.add_notifier(self._on_runstate)

        from migd.machine import Machine

        with startup.machine_step(self.config.machine):
            self.machine = Machine(self.config.machine, self.runstate, self.events)
            self.machine.start()

        # the whole migration path is imported now: importing it lazily cost the first `migrate`
        # ~50 ms of setup time
        from migd.migration import outgoing  # noqa: F401
        from migd.migration.state import MigrationState

        self.migration = MigrationState(self)

        from migd.qmp.server import QMPServer

        self.qmp = QMPServer(self, self.config.qmp)
        await self.qmp.start()

        if self.config.incoming is not None:
            from migd.migration.incoming import IncomingMigration

            self.incoming = IncomingMigration(self, self.config.incoming)
            with startup.step("--incoming", self.config.incoming):
                await self.incoming.start()

        address = self.config.http_address()
        if address is not None:
            from migd.http.app import start_http

            with startup.step("--http", self.config.http):
                self.http = await start_http(self, *address)

        self.qmp.serve()
        sdnotify.notify("READY=1", f"STATUS={self.runstate.state}")
        log.info("migd ready: %s, QMP on %s", self.runstate.state, ", ".join(self.qmp_addresses()))

    def qmp_addresses(self) -> list[str]:
        return [listener.address for listener in self.qmp.listeners] if self.qmp else []

    async def wait_stopped(self) -> None:
        """Until quit or a signal asked the daemon to stop."""
        assert self._stop_requested is not None
        await self._stop_requested.wait()

    def request_shutdown(self, reason: str = "host-qmp-quit") -> None:
        """Ask for a clean exit (any thread). SHUTDOWN is emitted after the current QMP reply."""
        if self.loop is None:
            return
        if threading.get_ident() != self._loop_thread:
            self.loop.call_soon_threadsafe(self.request_shutdown, reason)
            return
        if self.shutdown_reason is not None:
            return
        self.shutdown_reason = reason
        self.loop.call_soon(self._begin_shutdown)

    def request_exit(self, code: int) -> None:
        """Exit with ``code`` without a SHUTDOWN event (any thread): QEMU's ``exit(1)`` after a
        failed incoming migration is not a shutdown a client is told about."""
        if self.loop is None:
            return
        if threading.get_ident() != self._loop_thread:
            self.loop.call_soon_threadsafe(self.request_exit, code)
            return
        if self.shutdown_reason is not None:
            return
        self.exit_code = code
        self.shutdown_reason = f"exit {code}"
        log.info("exiting with status %d", code)
        if self._stop_requested is not None:
            self._stop_requested.set()

    def _begin_shutdown(self) -> None:
        log.info("shutting down: %s", self.shutdown_reason)
        self.events.emit("SHUTDOWN", {"guest": False, "reason": self.shutdown_reason})
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def stop(self) -> None:
        """Tear down in reverse order; safe to call after a partial start, and twice."""
        if self._stopped:
            return
        self._stopped = True
        sdnotify.notify("STOPPING=1")
        # Each step is bounded: a part that hangs must not keep the process from exiting.
        if self.migration is not None:
            await _bounded(self.migration.cancel, "cancelling the migration")
        if self.incoming is not None:
            incoming = self.incoming
            await _bounded(lambda: self.run_blocking(incoming.close), "closing the incoming migration")
        if self.http is not None:
            await _bounded(self.http.close, "closing HTTP")
        if self.qmp is not None:
            await _bounded(self.qmp.close, "closing QMP")
        if self.machine is not None:
            await _bounded(lambda: _in_daemon_thread(self.machine.shutdown), "machine shutdown")
        try:
            self.runstate.remove_notifier(self._on_runstate)
        except ValueError:
            pass

    # -- helpers for the parts ----------------------------------------------------------------------

    def run_blocking(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` on a worker thread; await the result without blocking the loop."""
        loop = self.loop or asyncio.get_running_loop()
        return loop.run_in_executor(None, functools.partial(fn, *args))

    def _on_runstate(self, old: RunState, new: RunState) -> None:
        log.debug("run state %s -> %s", old, new)
        sdnotify.notify(f"STATUS={new}")
