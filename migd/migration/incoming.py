"""The destination side: accept one migration, load it on its own thread, and run the guest only if it
all arrived intact.

QEMU's rules are kept: the status goes none -> setup -> active -> completed|failed (MIGRATION events only
with the ``events`` capability); the load uses blocking reads on a dedicated thread so the event loop
keeps answering QMP; drives are activated (image locks taken) only after a successful load; the guest
starts unless ``-S``, and ``completed`` is set after that run-state change; the source learns the outcome
through SHUT on the return path. A failed load never runs the half-loaded guest; with ``exit-on-error``
(default true) the process then exits with status 1, otherwise it stays up reporting ``failed``.

[migd] With a migd source that announced it (docs/SWITCHOVER.md §2), the destination answers FEATURES,
sends heartbeats on the return path and watches the source's, and after the load sends LOADED and
runs nothing until the source's COMMIT arrives. Losing the source after LOADED by silence or a reset
leaves the guest loaded and paused, status ``failed`` with the reason, and the process up: the COMMIT
may have been what was lost. A clean EOF instead of COMMIT is an ordinary failure (nothing committed
can precede a FIN the source sent after it). With feature LOAD_PACE (a plain socket, no multifd) the
incoming thread also reports its load pace (``loadpace.py``): at most every 50 ms while it reads,
and after each PONG.
"""

from __future__ import annotations

import logging
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from migd.bql import BQL
from migd.machine.machine import Machine
from migd.machine.runstate import LIVE_STATES, InvalidTransition, RunState
from migd.migration import foreign, returnpath
from migd.migration.format import (
    CMD_X_MIGD_HEARTBEAT,
    FEATURE_COMMIT,
    FEATURE_HEARTBEAT,
    FEATURE_LOAD_PACE,
    FEATURES_SUPPORTED,
    Cmd,
)
from migd.migration.heartbeat import Watchdog, WatchedChannel, beat_interval, writable
from migd.migration.host import MigrationHost
from migd.migration.loadpace import LoadMeter
from migd.migration.multifd import NEEDS_SOCKETS, MultifdReceiver, supports
from migd.migration.params import MigrationConfig
from migd.migration.ram import RAMLoader, prefault
from migd.migration.savevm import load_commit, load_stream
from migd.migration.status import MigrationStatus
from migd.migration.stream import InStream
from migd.objects import ObjectError
from migd.priority import lower_this_thread
from migd.switching import fast_switching
from migd.threads import any_thread, loop_only, off_loop, on_thread
from migd.transports import Listener, TransportError, URIError, listen, parse_uri, tls
from migd.transports.channel import Channel, SocketChannel
from migd.transports.tcp import TcpListener, set_peer_timeout
from migd.transports.uri import MigrationURI

log = logging.getLogger("migd.migration")

M = MigrationStatus

DEFER = "defer"
TLS_TCP_ONLY = "TLS is only supported on tcp migration channels by migd"
CLOSE_JOIN = 5.0  # seconds close() waits for the woken incoming thread


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class IncomingError(Exception):
    """A refused ``migrate-incoming``; ``str()`` is QEMU's text."""


class IncomingMigration:
    """One process's destination state (QEMU's MigrationIncomingState). ``config`` is the same
    MigrationConfig the source side uses (the ``events`` capability, parameters); ``may_be_foreign``
    says the daemon was started without machine options, so it may hold a QEMU machine as data."""

    def __init__(self, host: MigrationHost, uri: str | None, config: MigrationConfig,
                 may_be_foreign: bool = False) -> None:
        self.host = host
        self.config = config
        # started without machine options: the stream may bring a machine of another type (QEMU's)
        self.may_be_foreign = may_be_foreign
        self.uri = uri  # the --incoming value: a URI or "defer"
        self.status = M.NONE
        self.error_desc: str | None = None
        self.socket_address: list[dict[str, str]] | None = None
        self.exit_on_error = True
        self.return_path_open = False
        self._started = False
        self._closing = False
        self._listener: Listener | None = None
        self._channel: WatchedChannel | None = None
        self._rp: returnpath.ReturnPathWriter | None = None
        self._src_features = 0  # [migd] what the source announced in its configuration subsection
        self._src_timeout_ms = 0
        self.features = 0  # [migd] what this destination accepted (and told the source)
        self.supported = FEATURES_SUPPORTED  # [migd] what it may accept (a test plays an older migd)
        self._meter: LoadMeter | None = None  # [migd] the main channel's reads, for LOAD_PACE
        self._watchdog: Watchdog | None = None
        self._silence: str | None = None  # why the watchdog gave up on the source
        self._loaded_sent = False
        self._shut_sent = False
        self._thread: threading.Thread | None = None
        self._multifd: MultifdReceiver | None = None
        self.finished = threading.Event()  # set once the status is completed or failed
        self.foreign: foreign.ForeignMachine | None = None  # a machine of another type, held as data
        # [migd] progress the loop reads without locks: plain ints and floats the incoming thread
        # publishes (set once, or only ever grown), read as one attribute each
        self._instream: InStream | None = None
        self._loader: RAMLoader | None = None
        self._listen_at: float | None = None  # monotonic: listening (setup)
        self._accept_at: float | None = None  # the source connected (active)
        self._end_at: float | None = None  # completed or failed

    # -- starting ------------------------------------------------------------------------------

    @loop_only
    async def start(self) -> None:
        """``--incoming URI`` at daemon start (``defer`` waits for migrate-incoming)."""
        if self.uri is None or self.uri == DEFER:
            return
        await self._begin(parse_uri(self.uri), None, True)

    @loop_only
    async def start_deferred(
        self, uri: str | MigrationURI, exit_on_error: bool = True, fds: dict[str, int] | None = None
    ) -> None:
        """``migrate-incoming``: only once, and only on a daemon started with ``--incoming``."""
        self.check_can_start()
        parsed = parse_uri(uri) if isinstance(uri, str) else uri
        await self._begin(parsed, fds, exit_on_error)

    def check_can_start(self) -> None:
        """QEMU's refusals, checked before the address is even parsed."""
        if self._started:
            raise IncomingError("The incoming migration has already been started")
        if self.host.runstate.state is not RunState.INMIGRATE:
            raise IncomingError("'-incoming' was not specified on the command line")

    async def _begin(self, uri: MigrationURI, fds: dict[str, int] | None, exit_on_error: bool) -> None:
        if self._started:
            raise IncomingError("The incoming migration has already been started")
        self._started = True  # claimed before the await: a concurrent call is refused
        if self.config.cap("multifd") and not supports(uri):
            self._started = False
            raise IncomingError(NEEDS_SOCKETS)
        try:
            # listening may spawn a command or resolve a name: keep it off the loop
            listener = await self.host.run_blocking(listen, uri, fds)
        except (TransportError, URIError):
            self._started = False  # nothing changed: a corrected migrate-incoming may follow
            raise
        self._listener = listener
        self.exit_on_error = exit_on_error
        self.socket_address = list(listener.socket_address) or None
        self._listen_at = time.monotonic()
        self._set_status(M.SETUP)
        log.info("incoming migration: listening on %s", uri.display())
        self._thread = threading.Thread(target=self._run, name="mig/dst/main", daemon=True)
        self._thread.start()

    # -- status --------------------------------------------------------------------------------

    @any_thread
    def _set_status(self, status: MigrationStatus) -> None:
        self.status = status
        log.info("incoming migration status=%s%s", status,
                 f" error={self.error_desc!r}" if status is M.FAILED and self.error_desc else "")
        if self.config.cap("events"):
            self.host.events.emit("MIGRATION", {"status": str(status)})

    @any_thread
    def query(self) -> dict[str, Any]:
        """The destination's MigrationInfo; ``{}`` before anything happened."""
        if self.status is M.NONE:
            return {}
        info: dict[str, Any] = {"status": str(self.status)}
        if self.socket_address and self.status in (M.SETUP, M.ACTIVE):
            info["socket-address"] = [dict(a) for a in self.socket_address]
        if self.status is M.FAILED and self.error_desc:
            info["error-desc"] = self.error_desc
        channel = self._channel
        if self._watchdog is not None and channel is not None and self.status is M.ACTIVE:
            info["x-migd-peer-silent-ms"] = int(channel.silent_for() * 1000)
        if self._loaded_sent and self.status is M.ACTIVE:
            info["x-migd-commit"] = "waiting"  # everything loaded, the source's COMMIT not yet here
        return info

    @any_thread
    def progress(self) -> dict[str, int]:
        """[migd] What arrived so far (the HTTP endpoint's ``x-migd-incoming``; query-migrate keeps
        QEMU's members only): stream bytes consumed, RAM pages loaded (data and zero records),
        and milliseconds listening (``setup-time``), loading (``load-time``) and in all (``total-time``)."""
        now = time.monotonic()
        instream, loader = self._instream, self._loader
        listen_at, accept_at, end_at = self._listen_at, self._accept_at, self._end_at
        out: dict[str, int] = {"received": instream.consumed if instream is not None else 0}
        if loader is not None:
            out["pages"] = loader.pages
            out["zero-pages"] = loader.zero_pages
        stop = end_at if end_at is not None else now
        if listen_at is not None:
            out["setup-time"] = _ms((accept_at if accept_at is not None else stop) - listen_at)
            out["total-time"] = _ms(stop - listen_at)
        if accept_at is not None:
            out["load-time"] = _ms(stop - accept_at)
        return out

    # -- the incoming thread -------------------------------------------------------------------

    @on_thread("mig/dst/main")
    def _run(self) -> None:
        lower_this_thread()  # data plane, and so are prefault/multifd threads it starts (migd/priority.py)
        try:
            with fast_switching():  # the loading thread must not keep the loop waiting 5 ms per answer
                self._accept_and_load()
        except Exception as exc:  # noqa: BLE001 - last resort: report, never crash the daemon
            log.exception("incoming migration: unexpected error")
            self._fail(f"Incoming migration failed: {exc}")

    def _accept_and_load(self) -> None:
        """(incoming thread) Accept, load, then (commit protocol) LOADED and wait for COMMIT."""
        machine = self.host.machine
        # without machine options the stream may bring a machine of its own: migd's placeholder RAM is
        # then faulted in only once the stream says it is migd's (faulting 256 MiB for nothing cost a
        # QEMU source ~50 ms of downtime on a busy host)
        may_be_foreign = self.may_be_foreign
        if not may_be_foreign:
            self._prefault(machine)
        listener = self._listener
        assert listener is not None
        mfd = None
        try:
            raw = self._accept(listener)
            if self.config.cap("multifd"):  # the listener goes on accepting the multifd channels
                p = self.config.params
                secure = self._tls_server if self.config.param("tls-creds") else None  # each channel its own
                mfd = MultifdReceiver(machine.ram, int(p["multifd-channels"]), str(p["multifd-compression"]),
                                      lambda desc: raw.shutdown(), secure)
                self._multifd = mfd
                mfd.accept_from(listener)
        except (TransportError, OSError) as exc:
            if self._closing:
                return
            self._fail(str(exc))
            return
        finally:
            if mfd is None:
                listener.close()
        meter = self._meter = LoadMeter(raw)
        channel = self._channel = WatchedChannel(meter)
        self._accept_at = time.monotonic()
        self._rp = returnpath.ReturnPathWriter(channel)
        if self._closing:
            self._fail("Incoming migration was shut down")
            return
        self._set_status(M.ACTIVE)
        instream = self._instream = InStream(channel)
        try:
            if may_be_foreign and foreign.is_foreign(instream):
                self.foreign = foreign.load_foreign(instream, on_command=self._on_command,
                                                    on_machine=self._receiving)
                machine.incoming_runstate = RunState.PAUSED  # held, not run: it ends paused
            else:
                if may_be_foreign:
                    self._prefault(machine)
                loader = self._loader = RAMLoader(machine.ram)
                meter.pages = lambda: loader.pages + loader.zero_pages
                if mfd is not None:
                    loader.on_flush = mfd.sync_main
                load_stream(instream, machine, on_command=self._on_command, on_config=self._on_config,
                            ram=loader)
            if self.features & FEATURE_COMMIT:
                self._rp.loaded()
                self._loaded_sent = True
                log.info("incoming migration: loaded, waiting for the source's COMMIT")
                load_commit(instream, self.features, on_command=self._on_command)
        except Exception as exc:  # noqa: BLE001 - StreamError or anything a bad stream provokes
            mfd_error = mfd.error if mfd is not None else None
            if mfd is not None:
                mfd.close()
            self._fail(f"load of migration failed: {mfd_error}" if mfd_error and not self._closing
                       else self._describe(exc))
            return
        if mfd is not None:
            mfd.close()
        self._finish()

    def _accept(self, listener: Listener) -> Channel:
        """(incoming thread) The source's connection; with ``tls-creds``, each connection must pass
        the TLS handshake (and ``tls-authz``): one that fails is logged and dropped and the listener
        keeps waiting, as QEMU's does (a refused client must not end the incoming migration)."""
        creds_id = str(self.config.param("tls-creds"))
        if creds_id and not isinstance(listener, TcpListener):
            raise TransportError(TLS_TCP_ONLY)
        while True:  # bounded by the listener: close() ends accept and any handshake at once
            raw = listener.accept()
            if not creds_id:
                return raw
            try:
                return self._tls_server(raw)
            except TransportError:
                if self._closing:
                    raise
                # logged by _tls_server

    @on_thread("mig/dst/")
    def _tls_server(self, raw: Channel) -> Channel:
        """The TLS handshake as the server over the accepted ``raw`` (closed on failure), then the
        ``tls-authz`` check; the main channel and every multifd channel pass it alike (QEMU's rule).
        A refusal is logged and raised as TransportError. (incoming thread, multifd acceptor)"""
        listener = self._listener
        try:
            creds = self.config.objects.tls_creds(str(self.config.param("tls-creds")), "server")
            authz_id = str(self.config.param("tls-authz"))
            authz = self.config.objects.authz(authz_id).is_allowed if authz_id else None
            if not isinstance(raw, SocketChannel) or not isinstance(listener, TcpListener):
                raise TransportError(TLS_TCP_ONLY)
            return tls.server(raw, creds, authz, listener.waker)
        except (TransportError, ObjectError) as exc:
            raw.close()
            if not self._closing:
                log.warning("incoming migration: TLS connection refused: %s", exc)
            raise TransportError(str(exc)) from exc

    def _describe(self, exc: BaseException) -> str:
        if self._closing:
            return "Incoming migration was shut down"
        if self._silence is not None:
            return self._silence
        text = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and not str(exc).strip():
            text = exc.strerror or type(exc).__name__
        return f"load of migration failed: {text}"

    def _prefault(self, machine: Machine) -> None:
        """Fault the destination RAM in while waiting: faulting during the stream halves throughput."""
        try:
            prefault(machine.ram)
        except Exception:  # noqa: BLE001 - an optimisation only
            log.warning("incoming migration: prefaulting RAM failed", exc_info=True)

    def _receiving(self, machine: foreign.ForeignMachine) -> None:
        """(incoming thread) A foreign machine's header arrived: held from now on, so a ``migrate``
        may send it on while it loads (the live relay)."""
        self.foreign = machine

    def _on_config(self, features: int, peer_timeout_ms: int) -> None:
        """(incoming thread) What a migd source announced in its configuration subsection."""
        self._src_features = features
        self._src_timeout_ms = peer_timeout_ms

    def _on_command(self, cmd: int, payload: bytes = b"") -> None:
        """Stream COMMANDs the loader hands up: the return path opens, PINGs get their PONG."""
        channel, rp = self._channel, self._rp
        if cmd == Cmd.OPEN_RETURN_PATH:
            if channel is not None and rp is not None and channel.has_return_path:
                self.return_path_open = True
                if self._src_features:
                    self._accept_features(channel, rp)
        elif cmd == Cmd.PING and len(payload) == 4 and rp is not None and self.return_path_open:
            (value,) = struct.unpack(">I", payload)
            meter = self._meter
            held = meter.held() if meter is not None else 0.0  # what of the round trip was this side's load
            self._reply(f"PONG {value}", lambda: rp.pong(value))
            if meter is not None and meter.report is not None:
                # after the PONG (a message ahead of it would delay its arrival stamp at the source):
                # the pace up to this PING, and how long the PING waited here behind what came before it
                meter.send_report(ping=value, held_s=held)
        elif cmd == CMD_X_MIGD_HEARTBEAT:
            pass  # the channel already noted that the source is alive

    def _reply(self, what: str, send: Callable[[], None]) -> bool:
        """(incoming thread) Send a return-path answer; one that cannot be sent fails nothing by itself
        (as in QEMU): a source gone away is told by its stream's end, not by the errno of a write that
        raced its exit (a killed source stops reading first: EPIPE)."""
        try:
            send()
        except OSError as exc:
            log.info("incoming migration: %s not sent: %s", what, exc.strerror or exc)
            return False
        return True

    def _accept_features(self, channel: WatchedChannel, rp: returnpath.ReturnPathWriter) -> None:
        """[migd] Answer the source's announcement; start heartbeats and the silence watch."""
        self.features = self._src_features & self.supported
        meter = self._meter
        if meter is None or not meter.exact or self._multifd is not None:
            self.features &= ~FEATURE_LOAD_PACE  # waits not told from work, or no pages on this channel
        timeout = int(self.config.param("x-migd-peer-timeout"))  # this side's own
        if not self._reply("FEATURES", lambda: rp.features(self.features, timeout * 1000)):
            return
        log.info("incoming migration: migd source, features 0x%x, peer timeout %d s", self.features, timeout)
        if self.features & FEATURE_LOAD_PACE and meter is not None:
            meter.report = self._pace_reporter(rp)
        if not self.features & FEATURE_HEARTBEAT:
            return
        set_peer_timeout(channel.inner, timeout)
        interval = beat_interval(self._src_timeout_ms)

        def beat() -> None:
            if writable(channel):
                rp.heartbeat()

        self._watchdog = Watchdog("mig/dst/beat", timeout, beat, lambda: interval,
                                  channel.silent_for, self._on_silence)
        self._watchdog.start()

    def _pace_reporter(self, rp: returnpath.ReturnPathWriter) -> Callable[[int, int, int, int, int, int, int], None]:
        """[migd] The meter's report: a LOAD_PACE message; one that cannot be sent ends the reports
        (the stream's end tells the rest, as for any answer). (incoming thread)"""
        def report(*totals: int) -> None:
            if not self._reply("LOAD_PACE", lambda: rp.load_pace(*totals)):
                meter = self._meter
                if meter is not None:
                    meter.report = None
        return report

    def _on_silence(self, seconds: float) -> None:
        """(watchdog thread) The source said nothing for too long: end the load."""
        timeout = self._watchdog.timeout if self._watchdog is not None else 0
        self._silence = (f"The source has been silent for {seconds:.1f} s "
                         f"(x-migd-peer-timeout is {timeout:g} s)")
        log.warning("incoming migration: %s", self._silence)
        self._send_shut(1)  # before the FIN: a source still listening learns this side will not run
        channel = self._channel
        if channel is not None:
            channel.shutdown()

    def _stop_watchdog(self) -> None:
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.stop()

    def _finish(self) -> None:
        """Success: late drive activation, run (or stay paused with -S), completed, SHUT(0)."""
        machine = self.host.machine
        with BQL:
            autostart = self.host.autostart
            try:
                machine.activate_drives()
            except Exception as exc:  # noqa: BLE001 - QEMU: report, and do not start the guest
                log.error("incoming migration: could not activate drives: %s", exc)
                autostart = False
            source_state = machine.incoming_runstate
            if source_state is None or source_state in LIVE_STATES:
                if autostart:
                    machine.vm_start()
                else:
                    self.host.runstate.set(RunState.PAUSED)
            else:  # QEMU: a source that was paused (say) stays so on the destination
                try:
                    self.host.runstate.set(source_state)
                except InvalidTransition:
                    self.host.runstate.set(RunState.PAUSED)
            self.socket_address = None
            if self.foreign is not None:
                self.foreign.mark_loaded()  # a relay's outgoing migration switches over now
            self._end_at = time.monotonic()
            self._set_status(M.COMPLETED)
        self._stop_watchdog()
        self._send_shut(0)
        self._close_channel()
        self.finished.set()

    def _fail(self, desc: str) -> None:
        """The guest stays stopped (inmigrate); the source hears SHUT(1); maybe exit(1).

        After LOADED, a source lost by silence or a reset may have sent a COMMIT that never arrived:
        the loaded guest is kept (paused) and the process stays up whatever ``exit-on-error`` says.
        """
        self._stop_watchdog()
        channel = self._channel
        held = self._loaded_sent and not self._closing and not (channel is not None and channel.eof
                                                               and self._silence is None)
        if held:
            desc = (f"{desc}; the whole state was loaded but the source's COMMIT did not arrive, and "
                    "the source may have committed: the guest stays paused here (check the source "
                    "before running either side)")
        elif self._loaded_sent and channel is not None and channel.eof:
            desc = "The source closed the migration stream after the load without committing it"
        self.error_desc = desc
        self.socket_address = None
        half, self.foreign = self.foreign, None  # half a machine is not held
        if half is not None:
            half.mark_failed(desc)
        self._end_at = time.monotonic()
        self._set_status(M.FAILED)
        self._send_shut(1)
        self._close_channel()
        self.finished.set()
        if self.exit_on_error and not self._closing and not held:
            self._exit_failure(desc)

    def _send_shut(self, error: int) -> None:
        """SHUT once (the watchdog and the incoming thread may both want to say it)."""
        rp = self._rp
        if rp is None or not self.return_path_open or self._shut_sent:
            return
        self._shut_sent = True
        try:
            rp.shut(error)
        except OSError as exc:  # the source is gone: nothing to tell it
            log.info("incoming migration: could not send SHUT(%d): %s", error, exc)

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            try:
                channel.close()
            except OSError:
                pass

    def _exit_failure(self, desc: str) -> None:
        """QEMU prints the error and exits with EXIT_FAILURE (no SHUTDOWN event); the daemon cleans up."""
        print(f"migd: {desc}", file=sys.stderr, flush=True)
        self.host.request_exit(1)  # callable from any thread

    # -- shutting down -------------------------------------------------------------------------

    @off_loop
    def close(self) -> None:
        """Daemon shutdown: stop listening and wake a blocked load (it ends failed, no exit)."""
        self._closing = True
        listener = self._listener
        if listener is not None:
            listener.close()
        channel = self._channel
        if channel is not None:
            channel.shutdown()
        if self._multifd is not None:
            self._multifd.close()
        # the loader writes into guest RAM: let it stop before the daemon unmaps that RAM
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_JOIN)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
