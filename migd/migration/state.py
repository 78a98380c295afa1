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
from typing import Any

from migd import transports
from migd.machine.runstate import RunState
from migd.memtrim import release_free_memory
from migd.migration import multifd
from migd.migration.host import MigrationHost
from migd.migration.outgoing import MigrationThread
from migd.migration.params import MigrationConfig, ParamError
from migd.migration.stats import MigrationStats
from migd.migration.status import (
    POSTCOPY_STATES,
    PROGRESS_STATES,
    RUNNING_STATES,
    MigrationStatus,
)
from migd.migration.stream import OutStream
from migd.threads import any_thread, loop_only, off_loop, on_thread
from migd.transports import TransportError, tls
from migd.transports.channel import Channel, SocketChannel
from migd.transports.connecting import ConnectCancel
from migd.transports.uri import FdURI, MigrationURI, TcpURI
from migd.transports.wake import Waker

log = logging.getLogger("migd.migration")

M = MigrationStatus

IN_PROGRESS = "There's a migration process in progress"
COMMITTED = ("The migration is committed: the destination owns the guest now, it can no longer be "
             "cancelled")
TLS_TCP_ONLY = "TLS is only supported on tcp migration channels by migd"
ZERO_COPY_TLS = "Zero copy only available for non-compressed non-TLS multifd migration"  # QEMU's text
CANCEL_WAIT = 10.0  # seconds migrate_cancel waits for the thread to wind down before replying anyway


class MigrationError(Exception):
    """A refused or failed ``migrate``; ``str()`` is QEMU's text."""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class MigrationState:
    """The source side of migrations for one daemon (one at a time, like QEMU)."""

    def __init__(self, host: MigrationHost, config: MigrationConfig | None = None) -> None:
        self.host = host
        self.config = config if config is not None else MigrationConfig()
        self._status = M.NONE
        self._cas = threading.Lock()
        self.stats = MigrationStats()
        # published by the thread, read by query()
        self.error_desc: str | None = None
        self.start_time = 0.0  # time.monotonic() at migrate
        self._pass_logged_at = -1.0e9  # time.monotonic() of the last INFO pass line
        self.setup_time = 0  # ms
        self.total_time = 0  # ms, final (set at completion)
        self.downtime = 0  # ms, set at completion
        self.expected_downtime = 0  # ms
        self.downtime_phases: dict[str, float] = {}
        self.throttle_percentage = 0  # auto-converge, 0 = not throttling
        self.convergence: dict[str, Any] = {}  # x-migd-convergence, the policy's forecast
        self.policy_actions: list[dict[str, Any]] = []  # x-migd-policy-actions, the built-in policy's acts
        # per migration
        self.uri: str = ""
        self.address: MigrationURI | None = None  # the parsed destination (multifd connects to it again)
        self.channel: Channel | None = None
        self.stream: OutStream | None = None
        self.thread: MigrationThread | None = None
        self.continue_event = threading.Event()  # QEMU's pause_sem: migrate-continue / cancel
        self.wake_event = threading.Event()  # breaks the thread's rate-limit sleep
        self._connect_task: asyncio.Task[None] | None = None
        self._connect_cancel: ConnectCancel | None = None  # of the connect in flight: cancel frees its thread
        self._generation = 0  # which migrate a late connect callback belongs to
        self._done: asyncio.Future[None] | None = None
        self._cleanups: set[asyncio.Task[None]] = set()  # strong references while they run
        self.committed = False  # [migd] past the point of no return (docs/SWITCHOVER.md §2)

    # -- status -----------------------------------------------------------------------------------

    @property
    def status(self) -> MigrationStatus:
        return self._status

    def is_running(self) -> bool:
        return self._status in RUNNING_STATES

    @any_thread
    def set_state(self, old: MigrationStatus | Collection[MigrationStatus], new: MigrationStatus) -> bool:
        """CAS ``old`` -> ``new``; emits ``MIGRATION`` (with the events capability) only if it won."""
        return self._transition(old, new, None)

    @any_thread
    def fail(self, desc: str, old: MigrationStatus | Collection[MigrationStatus] | None = None) -> bool:
        """Record ``desc`` (first error wins) and move to failed unless the migration was cancelled."""
        return self._transition(RUNNING_STATES - {M.CANCELLING} if old is None else old, M.FAILED, desc)

    def _transition(self, old: MigrationStatus | Collection[MigrationStatus], new: MigrationStatus,
                    error: str | None) -> bool:
        """The CAS itself: the check, the error and the event are queued under one lock, so
        concurrent transitions are seen by every client in the order they won."""
        expected = (old,) if isinstance(old, MigrationStatus) else old
        with self._cas:
            if self._status not in expected or (new is M.CANCELLING and self.committed):
                return False
            self._status = new
            if error is not None and self.error_desc is None:
                self.error_desc = error  # before the event, so its readers see it
            if self.config.cap("events"):
                self.host.events.post("MIGRATION", {"status": str(new)})
        log.info("migration status=%s remaining=%d mbps=%.1f expected_downtime=%d%s", new,
                 self.stats.remaining, self.stats.mbps, self.expected_downtime,
                 f" error={self.error_desc!r}" if new is M.FAILED and self.error_desc else "")
        self.host.events.emit_queued()
        return True

    @on_thread("mig/src/main")
    def commit(self) -> bool:
        """[migd] The point of no return: True if no cancel came first; from here on
        ``migrate_cancel`` is refused and the source never resumes its guest on its own."""
        with self._cas:
            if self._status is not M.DEVICE:
                return False
            self.committed = True
        log.info("migration committed: the destination may run the guest from now on")
        return True

    # -- parameters and capabilities ----------------------------------------------------------------

    @loop_only
    def set_parameters(self, changes: Mapping[str, Any]) -> None:
        """Validate and commit; a running migration picks them up at once (max-bandwidth here)."""
        changed = self.config.set_parameters(changes)
        thread = self.thread
        if thread is not None and "max-bandwidth" in changed:
            thread.apply_rate_limit()

    @loop_only
    def set_capabilities(self, changes: list[tuple[str, bool]]) -> None:
        if self.is_running():
            raise ParamError(IN_PROGRESS)
        self.config.set_capabilities(changes)

    # -- events from the RAM section ------------------------------------------------------------

    @on_thread("mig/src/main")
    def _on_sync(self, stats: MigrationStats) -> None:
        """After every bitmap sync: the thread's model first (so the log line prints the estimate
        query-migrate shows), then a log line and MIGRATION_PASS."""
        thread = self.thread
        if thread is not None:
            thread.on_sync(stats)
        now = time.monotonic()
        summary = now - self._pass_logged_at >= 1.0  # every pass at DEBUG, at most one a second at INFO
        if summary:
            self._pass_logged_at = now
        log.log(logging.INFO if summary else logging.DEBUG,
                "migration pass=%d remaining=%d mbps=%.1f expected_downtime=%d dirty_pages_rate=%d",
                stats.dirty_sync_count, stats.remaining, stats.mbps, self.expected_downtime,
                stats.dirty_pages_rate)
        if self.config.cap("events"):
            self.host.events.emit("MIGRATION_PASS", {"pass": stats.dirty_sync_count})

    # -- migrate ------------------------------------------------------------------------------------

    def _prepare_checks(self, resume: bool) -> None:
        """QEMU's migrate_prepare refusals, in its order."""
        if resume:
            raise MigrationError("Cannot resume if there is no paused migration")
        if self.is_running():
            raise MigrationError(IN_PROGRESS)
        runstate = self.host.runstate.state
        if runstate is RunState.INMIGRATE and self.host.held_machine() is None:  # a relay may send on
            raise MigrationError("Guest is waiting for an incoming migration")
        if runstate is RunState.POSTMIGRATE:
            raise MigrationError("Can't migrate the vm that was paused due to previous migration")

    def _reset(self, uri: str) -> None:
        """QEMU's migrate_init: fresh counters, parameters and capabilities kept."""
        self.stats = MigrationStats()
        self.stats.on_sync.append(self._on_sync)
        self.error_desc = None
        self.start_time = time.monotonic()
        self.setup_time = self.total_time = self.downtime = 0
        self._pass_logged_at = -1.0e9  # the first pass is logged at INFO
        self.expected_downtime = 0
        self.downtime_phases = {}
        self.throttle_percentage = 0
        self.convergence = {}
        self.policy_actions = []
        self.uri = uri
        self._generation += 1
        self.channel = None
        self.stream = None
        self.thread = None
        self.continue_event.clear()
        self.wake_event.clear()
        self.committed = False

    @loop_only
    async def start(self, uri: str | None = None, channels: list[Any] | None = None,
                    fds: dict[str, int] | None = None, resume: bool = False) -> None:
        """``migrate``: validate, go to setup (event before the reply), connect off the loop."""
        try:
            address = transports.resolve(uri, channels)
        except (transports.URIError, ValueError) as exc:
            raise MigrationError(str(exc)) from exc
        if self.config.cap("multifd") and not multifd.supports(address):
            raise MigrationError(multifd.NEEDS_SOCKETS)
        if self.config.cap("zero-copy-send") and self.config.param("tls-creds"):
            raise MigrationError(ZERO_COPY_TLS)
        done = self._done
        if done is not None and not done.done() and not self.is_running():
            # the last migration reached its terminal state but is still cleaning up: let it finish
            try:
                await asyncio.wait_for(asyncio.shield(done), CANCEL_WAIT)
            except TimeoutError:
                raise MigrationError(IN_PROGRESS) from None
        self._prepare_checks(resume)
        if self.config.param("tls-creds") and not isinstance(address, TcpURI):
            raise MigrationError(TLS_TCP_ONLY)
        self._reset(uri if uri is not None else repr(channels))
        self.address = address
        old = self._status
        if old in RUNNING_STATES or not self.set_state(old, M.SETUP):
            raise MigrationError(IN_PROGRESS)
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        if isinstance(address, FdURI):
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

    async def _connect(self, address: MigrationURI, fds: dict[str, int] | None,
                       generation: int) -> None:
        cancel = self._connect_cancel = ConnectCancel()  # migrate_cancel frees the thread
        try:
            channel = await self.host.run_blocking(self._open, address, fds, cancel)
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

    @off_loop
    def _open(self, address: MigrationURI, fds: dict[str, int] | None, cancel: ConnectCancel) -> Channel:
        """Connect, then (``tls-creds`` set) the TLS handshake as the client. (connect worker)"""
        creds_id = str(self.config.param("tls-creds"))
        creds = self.config.objects.tls_creds(creds_id, "client") if creds_id else None
        channel = transports.connect(address, fds, cancel)
        if creds is None or not isinstance(address, TcpURI) or not isinstance(channel, SocketChannel):
            return channel
        hostname = str(self.config.param("tls-hostname")) or address.host
        return tls.client(channel, creds, hostname, cancel.waker)

    @on_thread("mig/src/main")
    def multifd_secure(self) -> multifd.Secure | None:
        """With ``tls-creds``: the TLS handshake each multifd channel does as the client, with the main
        channel's credentials and hostname (QEMU's rule); a cancel wakes it. (migration thread)"""
        address, cancel = self.address, self._connect_cancel
        if not self.config.param("tls-creds") or not isinstance(address, TcpURI):
            return None
        waker = cancel.waker if cancel is not None else Waker()
        config = self.config

        def secure(raw: Channel) -> Channel:
            """(migration thread) ``raw`` is closed when this raises."""
            try:
                creds = config.objects.tls_creds(str(config.param("tls-creds")), "client")
                if not isinstance(raw, SocketChannel):
                    raise TransportError(TLS_TCP_ONLY)
            except Exception:
                raw.close()
                raise
            hostname = str(config.param("tls-hostname")) or address.host
            return tls.client(raw, creds, hostname, waker, multifd.CONNECT_TIMEOUT)

        return secure

    @loop_only
    def _connected(self, channel: Channel, generation: int) -> None:
        """QEMU's migration_connect: stream, rate limit, then the thread."""
        if generation != self._generation or self._status is not M.SETUP:  # cancelled while connecting
            channel.close()
            if generation == self._generation:
                self._finish_done()
            return
        self.channel = channel
        self.stream = OutStream(channel)
        self.expected_downtime = int(self.config.param("downtime-limit"))
        thread = MigrationThread(self)
        self.thread = thread
        thread.apply_rate_limit()
        thread.start()

    # -- end of a migration ---------------------------------------------------------------------

    @on_thread("mig/src/main")
    def thread_exited(self, thread: MigrationThread) -> None:
        """The migration thread's last act: hand cleanup to the loop (QEMU's BH). A closed loop
        means the daemon is exiting, with nothing left to clean up for."""
        self.host.call_soon(self._schedule_cleanup, thread)

    @loop_only
    def _schedule_cleanup(self, thread: MigrationThread) -> None:
        task = asyncio.get_running_loop().create_task(self._cleanup(thread))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    @loop_only
    async def _cleanup(self, thread: MigrationThread) -> None:
        """QEMU's migration_cleanup: join the thread off the loop, close, cancelling -> cancelled;
        then the C heap's free pages go back to the kernel (no RSS growth per migration)."""
        await self.host.run_blocking(thread.join)
        thread.release()
        try:
            thread.stream.close()
        except OSError:
            pass
        if self.thread is thread:
            self.thread = None
            self.set_state(M.CANCELLING, M.CANCELLED)
            self._finish_done()
        await self.host.run_blocking(release_free_memory)  # the threads' arenas (migd/memtrim.py)

    def _finish_done(self) -> None:
        done = self._done
        if done is not None and not done.done():
            done.set_result(None)

    # -- cancel / continue ----------------------------------------------------------------------

    @loop_only
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
        self.host.machine.vcpus.wake_pausers()  # a vCPU stop waiting inside the big lock gives up
        stream, channel = self.stream, self.channel
        if stream is not None:
            stream.shutdown()
        elif channel is not None:
            channel.shutdown()
        if self._connect_cancel is not None:  # a connect or a multifd channel's TLS handshake gives up
            self._connect_cancel.cancel()
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

    @loop_only
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
        transferred = stream.transferred if stream is not None else 0
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
            "multifd-bytes": s.multifd_bytes,
            "pages-per-second": s.pages_per_second,
            "precopy-bytes": s.precopy_bytes,
            "downtime-bytes": s.downtime_bytes,
            "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": s.dirty_sync_missed_zero_copy,
        }

    @any_thread
    def query(self) -> dict[str, Any]:
        """MigrationInfo with exactly QEMU's members for the state; reads published values only.
        ``{}`` before any migration (``query-migrate`` then shows the destination side, if any)."""
        status = self._status
        if status is M.NONE:
            return {}
        info: dict[str, Any] = {"status": str(status)}
        if status in PROGRESS_STATES:
            info["ram"] = self._ram_info(status)
            info["total-time"] = _ms(time.monotonic() - self.start_time)
            info["expected-downtime"] = self.expected_downtime
            info["setup-time"] = self.setup_time
            if self.throttle_percentage:
                info["cpu-throttle-percentage"] = self.throttle_percentage
            if self.convergence and status is M.ACTIVE:
                info["x-migd-convergence"] = dict(self.convergence)
        elif status is M.COMPLETED:
            info["ram"] = self._ram_info(status)
            info["total-time"] = self.total_time
            info["downtime"] = self.downtime
            info["setup-time"] = self.setup_time
        if self.policy_actions:
            info["x-migd-policy-actions"] = list(self.policy_actions)
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
