"""MigrationState: the source side's status machine, its published counters and its life cycle.

Status changes are compare-and-swap transitions (QEMU's ``migrate_set_state``): the migration thread,
``migrate_cancel`` and the connect callback race, and only the one whose expected old state still
holds wins — and only a won transition emits the ``MIGRATION`` event. Everything ``query-migrate``
shows is a plain attribute written by one thread and read without a lock, so the answer never waits
on the migration thread or the big lock (QEMU's monitor freezes for the whole switch-over; ours must not).

Life cycle: ``start`` (QMP handler, on the loop) checks, resets, goes ``setup`` and connects on a worker
thread; the connect callback starts the migration thread (``outgoing.MigrationThread``); when the thread
ends it hands cleanup back to the loop, which joins it off the loop, closes the channel and moves
``cancelling`` to ``cancelled``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Collection, Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from migd.machine.runstate import RunState
from migd.migration.params import MigrationConfig, ParamError
from migd.migration.stats import MigrationStats

if TYPE_CHECKING:
    from migd.daemon import Daemon
    from migd.migration.outgoing import MigrationThread
    from migd.migration.stream import OutStream
    from migd.transports.channel import Channel

log = logging.getLogger("migd.migration")


class MigrationStatus(StrEnum):
    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"


M = MigrationStatus
# QEMU's migration_is_running(): most configuration commands are refused in these.
RUNNING_STATES = frozenset({
    M.SETUP, M.ACTIVE, M.POSTCOPY_ACTIVE, M.POSTCOPY_PAUSED, M.POSTCOPY_RECOVER_SETUP,
    M.POSTCOPY_RECOVER, M.PRE_SWITCHOVER, M.DEVICE, M.WAIT_UNPLUG, M.CANCELLING, M.COLO,
})
POSTCOPY_STATES = frozenset({M.POSTCOPY_ACTIVE, M.POSTCOPY_PAUSED, M.POSTCOPY_RECOVER_SETUP,
                             M.POSTCOPY_RECOVER})
# states in which query-migrate shows times, expected-downtime and ram
_PROGRESS_STATES = frozenset({M.ACTIVE, M.CANCELLING, M.PRE_SWITCHOVER, M.DEVICE})

IN_PROGRESS = "There's a migration process in progress"
COMMITTED = ("The migration is committed: the destination owns the guest now, it can no longer be "
             "cancelled")
CANCEL_WAIT = 10.0  # seconds migrate_cancel waits for the thread to wind down before replying anyway


class MigrationError(Exception):
    """A refused or failed ``migrate``; ``str()`` is QEMU's text."""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class MigrationState:
    """The source side of migrations for one daemon (one at a time, like QEMU)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.config = MigrationConfig()
        self._status = M.NONE
        self._cas = threading.Lock()
        self.stats = MigrationStats()
        # published by the thread, read by query()
        self.error_desc: str | None = None
        self.start_time = 0.0  # time.monotonic() at migrate
        self.setup_time = 0  # ms
        self.total_time = 0  # ms, final (set at completion)
        self.downtime = 0  # ms, set at completion
        self.expected_downtime = 0  # ms
        self.downtime_phases: dict[str, float] = {}
        self.throttle_percentage = 0  # auto-converge, 0 = not throttling
        # per migration
        self.uri: str = ""
        self.channel: Channel | None = None
        self.stream: OutStream | None = None
        self.thread: MigrationThread | None = None
        self.continue_event = threading.Event()  # QEMU's pause_sem: migrate-continue / cancel
        self.wake_event = threading.Event()  # breaks the thread's rate-limit sleep
        self._connect_task: asyncio.Task[None] | None = None
        self._generation = 0  # which migrate a late connect callback belongs to
        self._done: asyncio.Future[None] | None = None
        self.committed = False  # [migd] past the point of no return (docs/SWITCHOVER.md §2)
        # learned from the last completed migration, so the next switch-over decision is honest
        self.overhead_ms_hint = 0.0  # non-RAM downtime (stop, drain, devices, EOF, ack)
        self.final_bw_hint = 0.0  # bytes/ms the last sizeable final RAM pass really reached

    # -- status -----------------------------------------------------------------------------------

    @property
    def status(self) -> MigrationStatus:
        return self._status

    def is_running(self) -> bool:
        return self._status in RUNNING_STATES

    def set_state(self, old: MigrationStatus | Collection[MigrationStatus], new: MigrationStatus) -> bool:
        """CAS ``old`` -> ``new``; emits ``MIGRATION`` (with the events capability) only if it won."""
        expected = (old,) if isinstance(old, MigrationStatus) else old
        with self._cas:
            if self._status not in expected or (new is M.CANCELLING and self.committed):
                return False
            self._status = new
        log.info("migration status=%s remaining=%d mbps=%.1f expected_downtime=%d%s", new,
                 self.stats.remaining, self.stats.mbps, self.expected_downtime,
                 f" error={self.error_desc!r}" if new is M.FAILED and self.error_desc else "")
        if self.config.cap("events"):
            self.daemon.events.emit("MIGRATION", {"status": str(new)})
        return True

    def commit(self) -> bool:
        """[migd] The point of no return (migration thread): True if no cancel came first; from here on
        ``migrate_cancel`` is refused and the source never resumes its guest on its own."""
        with self._cas:
            if self._status is not M.DEVICE:
                return False
            self.committed = True
        log.info("migration committed: the destination may run the guest from now on")
        return True

    def fail(self, desc: str, old: MigrationStatus | Collection[MigrationStatus] | None = None) -> bool:
        """Record ``desc`` (first error wins) and move to failed unless the migration was cancelled."""
        if old is None:
            old = RUNNING_STATES - {M.CANCELLING}
        first = self.error_desc is None
        if first:
            self.error_desc = desc  # set before the transition, so the event's readers see it
        won = self.set_state(old, M.FAILED)
        if not won and first:
            self.error_desc = None  # a cancel won: a cancelled migration shows no error
        return won

    # -- parameters and capabilities ----------------------------------------------------------------

    def set_parameters(self, changes: Mapping[str, Any]) -> None:
        """Validate and commit; a running migration picks them up at once (max-bandwidth here)."""
        changed = self.config.set_parameters(changes)
        thread = self.thread
        if thread is not None and "max-bandwidth" in changed:
            thread.apply_rate_limit()

    def set_capabilities(self, changes: list[tuple[str, bool]]) -> None:
        if self.is_running():
            raise ParamError(IN_PROGRESS)
        self.config.set_capabilities(changes)

    # -- events from the RAM section ------------------------------------------------------------

    def _on_sync(self, stats: MigrationStats) -> None:
        """After every bitmap sync (any thread): MIGRATION_PASS, a log line, auto-converge."""
        log.info("migration pass=%d remaining=%d mbps=%.1f expected_downtime=%d dirty_pages_rate=%d",
                 stats.dirty_sync_count, stats.remaining, stats.mbps, self.expected_downtime,
                 stats.dirty_pages_rate)
        if self.config.cap("events"):
            self.daemon.events.emit("MIGRATION_PASS", {"pass": stats.dirty_sync_count})
        thread = self.thread
        if thread is not None:
            thread.on_sync(stats)

    # -- migrate ------------------------------------------------------------------------------------

    def _prepare_checks(self, resume: bool) -> None:
        """QEMU's migrate_prepare refusals, in its order."""
        if resume:
            raise MigrationError("Cannot resume if there is no paused migration")
        if self.is_running():
            raise MigrationError(IN_PROGRESS)
        runstate = self.daemon.runstate.state
        if runstate is RunState.INMIGRATE:
            raise MigrationError("Guest is waiting for an incoming migration")
        if runstate is RunState.POSTMIGRATE:
            raise MigrationError("Can't migrate the vm that was paused due to previous migration")
        if self.config.param("tls-creds"):
            raise MigrationError("TLS is not supported by migd")

    def _reset(self, uri: str) -> None:
        """QEMU's migrate_init: fresh counters, parameters and capabilities kept."""
        self.stats = MigrationStats()
        self.stats.on_sync.append(self._on_sync)
        self.error_desc = None
        self.start_time = time.monotonic()
        self.setup_time = self.total_time = self.downtime = 0
        self.expected_downtime = 0
        self.downtime_phases = {}
        self.throttle_percentage = 0
        self.uri = uri
        self._generation += 1
        self.channel = None
        self.stream = None
        self.thread = None
        self.continue_event.clear()
        self.wake_event.clear()
        self.committed = False

    async def start(self, uri: str | None = None, channels: list[Any] | None = None,
                    fds: Any = None, resume: bool = False) -> None:
        """``migrate``: validate, go to setup (event before the reply), connect off the loop."""
        from migd import transports

        try:
            address = transports.resolve(uri, channels)
        except (transports.URIError, ValueError) as exc:
            raise MigrationError(str(exc)) from exc
        done = self._done
        if done is not None and not done.done() and not self.is_running():
            # the last migration reached its terminal state but is still cleaning up: let it finish
            try:
                await asyncio.wait_for(asyncio.shield(done), CANCEL_WAIT)
            except TimeoutError:
                raise MigrationError(IN_PROGRESS) from None
        self._prepare_checks(resume)
        self._reset(uri if uri is not None else repr(channels))
        old = self._status
        if old in RUNNING_STATES or not self.set_state(old, M.SETUP):
            raise MigrationError(IN_PROGRESS)
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        if isinstance(address, transports.FdURI):
            # no blocking involved; QEMU also returns this error to the migrate command itself
            try:
                channel = transports.connect(address, fds)
            except Exception as exc:
                desc = str(exc) or type(exc).__name__
                self.fail(desc, M.SETUP)
                self._finish_done()
                raise MigrationError(desc) from exc
            self._connected(channel, self._generation)
            return
        self._connect_task = loop.create_task(self._connect(address, fds, self._generation))

    async def _connect(self, address: Any, fds: Any, generation: int) -> None:
        from migd import transports

        try:
            channel = await self.daemon.run_blocking(transports.connect, address, fds)
        except Exception as exc:
            if generation != self._generation:
                return  # cancelled long ago; a newer migration owns the state now
            desc = str(exc) or type(exc).__name__
            log.info("migration connect failed: %s", desc)
            self.fail(desc, M.SETUP)
            self._finish_done()
            return
        finally:
            if generation == self._generation:
                self._connect_task = None
        self._connected(channel, generation)

    def _connected(self, channel: Channel, generation: int) -> None:
        """QEMU's migration_connect (on the loop): stream, rate limit, then the thread."""
        from migd.migration.outgoing import MigrationThread
        from migd.migration.stream import OutStream

        if generation != self._generation or self._status is not M.SETUP:  # cancelled while connecting
            channel.close()
            if generation == self._generation:
                self._finish_done()
            return
        self.channel = channel
        self.stream = OutStream(channel)
        self.expected_downtime = int(self.config.param("downtime-limit"))
        thread = MigrationThread(self, self.daemon.loop)
        self.thread = thread
        thread.apply_rate_limit()
        thread.start()

    # -- end of a migration ---------------------------------------------------------------------

    def thread_exited(self, thread: MigrationThread) -> None:
        """Called by the migration thread as its last act; hands cleanup to the loop (QEMU's BH)."""
        try:
            self.daemon.loop.call_soon_threadsafe(self._schedule_cleanup, thread)
        except RuntimeError:  # loop closed: the daemon is exiting, nothing left to clean up for
            pass

    def _schedule_cleanup(self, thread: MigrationThread) -> None:
        self.daemon.loop.create_task(self._cleanup(thread))

    async def _cleanup(self, thread: MigrationThread) -> None:
        """QEMU's migration_cleanup: join the thread off the loop, close, cancelling -> cancelled."""
        await self.daemon.run_blocking(thread.join)
        try:
            thread.stream.close()
        except OSError:
            pass
        if self.thread is thread:
            self.thread = None
            self.set_state(M.CANCELLING, M.CANCELLED)
            self._finish_done()

    def _finish_done(self) -> None:
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)

    # -- cancel / continue ----------------------------------------------------------------------

    async def cancel(self) -> None:
        """``migrate_cancel``: works in every state; returns once the migration wound down."""
        if self._status in POSTCOPY_STATES:
            raise MigrationError("Postcopy migration in progress, cannot cancel.")
        while True:
            cur = self._status
            if cur not in RUNNING_STATES or cur is M.CANCELLING:
                break
            if self.set_state(cur, M.CANCELLING):
                break
            if self.committed:
                raise MigrationError(COMMITTED)
        if self._status is not M.CANCELLING:
            return
        self.continue_event.set()
        self.wake_event.set()
        stream, channel = self.stream, self.channel
        if stream is not None:
            stream.shutdown()
        elif channel is not None:
            channel.shutdown()
        if self.thread is None and self.channel is None:
            # still connecting: nothing to wind down (the connect callback closes a late channel)
            self.set_state(M.CANCELLING, M.CANCELLED)
            self._finish_done()
            return
        done = self._done
        if done is not None:
            try:
                await asyncio.wait_for(asyncio.shield(done), CANCEL_WAIT)
            except TimeoutError:
                log.warning("migrate_cancel: the migration thread is still winding down")

    def continue_(self, state: str) -> None:
        """``migrate-continue``: leave pre-switchover (or whatever state the caller names)."""
        if self._status != state:
            raise MigrationError(f"Migration not in expected state: {self._status}")
        self.continue_event.set()

    async def wait_done(self, timeout: float | None = None) -> None:
        """Await the end (terminal state and cleanup) of the current migration, if any."""
        done = self._done
        if done is not None:
            await asyncio.wait_for(asyncio.shield(done), timeout)

    # -- query-migrate ------------------------------------------------------------------------------

    def _ram_info(self, status: MigrationStatus) -> dict[str, Any]:
        s = self.stats
        stream = self.stream
        transferred = stream.transferred if stream is not None else s.transferred
        completed = status is M.COMPLETED
        return {
            "transferred": transferred,
            "remaining": 0 if completed else s.remaining,
            "total": s.total,
            "duplicate": s.duplicate,
            "normal": s.normal,
            "normal-bytes": s.normal_bytes,
            "dirty-pages-rate": 0 if completed else s.dirty_pages_rate,
            "mbps": s.mbps,
            "dirty-sync-count": s.dirty_sync_count,
            "postcopy-requests": 0,
            "page-size": s.page_size,
            "multifd-bytes": 0,
            "pages-per-second": s.pages_per_second,
            "precopy-bytes": s.precopy_bytes,
            "downtime-bytes": s.downtime_bytes,
            "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0,
        }

    def query(self) -> dict[str, Any]:
        """MigrationInfo with exactly QEMU's members for the state; reads published values only."""
        status = self._status
        if status is M.NONE:
            incoming = getattr(self.daemon, "incoming", None)
            return dict(incoming.query()) if incoming is not None else {}
        info: dict[str, Any] = {"status": str(status)}
        if status in _PROGRESS_STATES:
            info["ram"] = self._ram_info(status)
            info["total-time"] = _ms(time.monotonic() - self.start_time)
            info["expected-downtime"] = self.expected_downtime
            info["setup-time"] = self.setup_time
            if self.throttle_percentage:
                info["cpu-throttle-percentage"] = self.throttle_percentage
        elif status is M.COMPLETED:
            info["ram"] = self._ram_info(status)
            info["total-time"] = self.total_time
            info["downtime"] = self.downtime
            info["setup-time"] = self.setup_time
        if self.error_desc is not None and status is not M.COMPLETED:
            info["error-desc"] = self.error_desc
        thread = self.thread
        silent = thread.peer_silent_ms() if thread is not None and status in RUNNING_STATES else None
        if silent is not None:
            info["x-migd-peer-silent-ms"] = silent
        if status is M.COMPLETED:
            # the estimate as it stood at the switch-over, to hold against the measured downtime
            info["x-migd-expected-downtime"] = self.expected_downtime
            if self.downtime_phases:
                info["x-migd-downtime-phases"] = dict(self.downtime_phases)
        return info
