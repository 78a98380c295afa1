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

import uvloop

from migd import sdnotify, startup
from migd.config import DaemonConfig
from migd.events import EventSink
from migd.http.app import HttpEndpoint, start_http
from migd.machine.machine import Machine
from migd.machine.runstate import RunState, RunStateMachine
from migd.migration.dirtyrate import DirtyRateMeter
from migd.migration.foreign import ForeignMachine, may_hold_foreign
from migd.migration.incoming import IncomingMigration
from migd.migration.params import MigrationConfig
from migd.migration.state import MigrationState
from migd.qmp.server import QMPServer
from migd.startup import StartupError
from migd.threads import LoopHandle, any_thread, loop_only

log = logging.getLogger(__name__)

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop: faster sockets and timers than asyncio's own loop."""
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
    """One process: builds the parts in ``start()``, tears them down in ``stop()``.

    It is the ``MigrationHost`` of the migration code (machine, run state, events, ``call_soon``,
    ``run_blocking``, ``request_exit``, ``autostart``) and the host of the QMP commands (plus
    ``config``, ``migration``, ``incoming``, ``request_shutdown``); neither reaches further in.
    """

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.events = EventSink()
        if config.incoming is not None:
            initial = RunState.INMIGRATE
        elif config.machine.start_paused:
            initial = RunState.PRELAUNCH
        else:
            initial = RunState.RUNNING
        self.runstate = RunStateMachine(initial)
        self.autostart = not config.machine.start_paused
        # one configuration for both sides: the events capability governs the destination's events too
        self.migration_config = MigrationConfig()
        self.incoming: IncomingMigration | None = None
        self.qmp: QMPServer | None = None
        self.http: HttpEndpoint | None = None
        self.shutdown_reason: str | None = None
        self.exit_code = 0
        self._loop: LoopHandle | None = None
        self._machine: Machine | None = None
        self._migration: MigrationState | None = None
        self.dirty_rate = DirtyRateMeter(lambda: self.machine.ram.blocks(), self.run_blocking)
        self._stop_requested: asyncio.Event | None = None
        self._stopped = False

    @property
    def machine(self) -> Machine:
        if self._machine is None:
            raise RuntimeError("the daemon has no machine yet")
        return self._machine

    @property
    def migration(self) -> MigrationState:
        if self._migration is None:
            raise RuntimeError("the daemon has not started")
        return self._migration

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

    @loop_only
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

    @loop_only
    async def start(self) -> None:
        """Bring every part up; READY=1 once every listener accepts connections."""
        loop = asyncio.get_running_loop()
        self._loop = LoopHandle(loop)
        self._stop_requested = asyncio.Event()
        self.events.bind(loop)
        self.runstate.add_notifier(self._on_runstate)

        with startup.machine_step(self.config.machine):
            self._machine = Machine(self.config.machine, self.runstate, self.events)
            self._machine.start()
        for spec in self.config.objects:
            with startup.step("--object", spec):
                self.migration_config.objects.add_spec(spec)
        self._migration = MigrationState(self, self.migration_config)

        self.qmp = QMPServer(self, self.config.qmp)
        await self.qmp.start()

        if self.config.incoming is not None:
            self.incoming = IncomingMigration(self, self.config.incoming, self.migration_config,
                                              may_hold_foreign(self.config.machine))
            with startup.step("--incoming", self.config.incoming):
                await self.incoming.start()

        address = self.config.http_address()
        if address is not None:
            with startup.step("--http", self.config.http):
                self.http = await start_http(self, *address)

        self.qmp.serve()
        sdnotify.notify("READY=1", f"STATUS={self.runstate.state}")
        log.info("migd ready: %s, QMP on %s", self.runstate.state, ", ".join(self.qmp_addresses()))

    def qmp_addresses(self) -> list[str]:
        return [listener.address for listener in self.qmp.listeners] if self.qmp else []

    @loop_only
    async def wait_stopped(self) -> None:
        """Until quit or a signal asked the daemon to stop."""
        assert self._stop_requested is not None
        await self._stop_requested.wait()

    @any_thread
    def request_shutdown(self, reason: str = "host-qmp-quit") -> None:
        """Ask for a clean exit. SHUTDOWN is emitted after the current QMP reply."""
        self.call_soon(self._begin_shutdown, reason)

    @any_thread
    def request_exit(self, code: int) -> None:
        """Exit with ``code`` without a SHUTDOWN event: QEMU's ``exit(1)`` after a failed incoming
        migration is not a shutdown a client is told about."""
        self.call_soon(self._begin_exit, code)

    @any_thread
    def call_soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Hand ``fn(*args)`` to the event loop (the one hand-off helper); False once it is closed."""
        return self._loop.call_soon(fn, *args) if self._loop is not None else False

    @loop_only
    def _begin_shutdown(self, reason: str) -> None:
        if self.shutdown_reason is not None:
            return
        self.shutdown_reason = reason
        log.info("shutting down: %s", reason)
        self.events.emit("SHUTDOWN", {"guest": False, "reason": reason})
        if self._stop_requested is not None:
            self._stop_requested.set()

    @loop_only
    def _begin_exit(self, code: int) -> None:
        if self.shutdown_reason is not None:
            return
        self.exit_code = code
        self.shutdown_reason = f"exit {code}"
        log.info("exiting with status %d", code)
        if self._stop_requested is not None:
            self._stop_requested.set()

    @loop_only
    async def stop(self) -> None:
        """Tear down in reverse order; safe to call after a partial start, and twice."""
        if self._stopped:
            return
        self._stopped = True
        sdnotify.notify("STOPPING=1")
        # Each step is bounded: a part that hangs must not keep the process from exiting.
        if self._migration is not None:
            await _bounded(self._migration.cancel, "cancelling the migration")
        if self.incoming is not None:
            incoming = self.incoming
            await _bounded(lambda: self.run_blocking(incoming.close), "closing the incoming migration")
        if self.http is not None:
            await _bounded(self.http.close, "closing HTTP")
        if self.qmp is not None:
            await _bounded(self.qmp.close, "closing QMP")
        machine = self._machine
        if machine is not None:
            await _bounded(lambda: _in_daemon_thread(machine.shutdown), "machine shutdown")
        try:
            self.runstate.remove_notifier(self._on_runstate)
        except ValueError:
            pass

    # -- helpers for the parts ----------------------------------------------------------------------

    @any_thread
    def held_machine(self) -> ForeignMachine | None:
        return self.incoming.foreign if self.incoming is not None else None

    @loop_only
    def run_blocking(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run ``fn(*args)`` on a worker thread; await the result without blocking the loop."""
        return asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))

    def _on_runstate(self, old: RunState, new: RunState) -> None:
        log.debug("run state %s -> %s", old, new)
        sdnotify.notify(f"STATUS={new}")
