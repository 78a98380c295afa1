"""The destination side: accept one migration, load it on its own thread, and run the guest only if it
all arrived intact.

QEMU's rules are kept: the status goes none -> setup -> active -> completed|failed (MIGRATION events only
with the ``events`` capability); the load uses blocking reads on a dedicated thread so the event loop
keeps answering QMP; drives are activated (image locks taken) only after a successful load; the guest
starts unless ``-S``, and ``completed`` is set after that run-state change; the source learns the outcome
through SHUT on the return path. A failed load never runs the half-loaded guest; with ``exit-on-error``
(default true) the process then exits with status 1, otherwise it stays up reporting ``failed``.
"""

from __future__ import annotations

import logging
import struct
import sys
import threading
from typing import Any

from migd.bql import BQL
from migd.machine.machine import Machine
from migd.machine.runstate import LIVE_STATES, InvalidTransition, RunState
from migd.migration import returnpath
from migd.migration.format import Cmd
from migd.migration.host import MigrationHost
from migd.migration.multifd import NEEDS_SOCKETS, MultifdReceiver, supports
from migd.migration.params import MigrationConfig
from migd.migration.ram import prefault
from migd.migration.savevm import load_stream
from migd.migration.status import MigrationStatus
from migd.migration.stream import InStream
from migd.threads import any_thread, loop_only, off_loop, on_thread
from migd.transports import Listener, TransportError, URIError, listen, parse_uri
from migd.transports.channel import Channel
from migd.transports.uri import MigrationURI

log = logging.getLogger("migd.migration")

M = MigrationStatus

DEFER = "defer"
CLOSE_JOIN = 5.0  # seconds close() waits for the woken incoming thread


class IncomingError(Exception):
    """A refused ``migrate-incoming``; ``str()`` is QEMU's text."""


class IncomingMigration:
    """One process's destination state (QEMU's MigrationIncomingState). ``config`` is the same
    MigrationConfig the source side uses (the ``events`` capability, parameters)."""

    def __init__(self, host: MigrationHost, uri: str | None, config: MigrationConfig) -> None:
        self.host = host
        self.config = config
        self.uri = uri  # the --incoming value: a URI or "defer"
        self.status = M.NONE
        self.error_desc: str | None = None
        self.socket_address: list[dict[str, str]] | None = None
        self.exit_on_error = True
        self.return_path_open = False
        self._started = False
        self._closing = False
        self._listener: Listener | None = None
        self._channel: Channel | None = None
        self._thread: threading.Thread | None = None
        self._multifd: MultifdReceiver | None = None
        self.finished = threading.Event()  # set once the status is completed or failed

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
        return info

    # -- the incoming thread -------------------------------------------------------------------

    @on_thread("mig/dst/main")
    def _run(self) -> None:
        try:
            self._accept_and_load()
        except Exception as exc:  # noqa: BLE001 - last resort: report, never crash the daemon
            log.exception("incoming migration: unexpected error")
            self._fail(f"Incoming migration failed: {exc}")

    def _accept_and_load(self) -> None:
        machine = self.host.machine
        self._prefault(machine)
        listener = self._listener
        assert listener is not None
        mfd = None
        try:
            channel = listener.accept()
            if self.config.cap("multifd"):  # the listener goes on accepting the multifd channels
                p = self.config.params
                mfd = MultifdReceiver(machine.ram, int(p["multifd-channels"]), str(p["multifd-compression"]),
                                      lambda desc: channel.shutdown())
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
        self._channel = channel
        if self._closing:
            self._fail("Incoming migration was shut down")
            return
        self._set_status(M.ACTIVE)
        try:
            load_stream(InStream(channel), machine, on_command=self._on_command,
                        on_flush=mfd.sync_main if mfd is not None else None)
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

    def _describe(self, exc: BaseException) -> str:
        if self._closing:
            return "Incoming migration was shut down"
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

    def _on_command(self, cmd: int, payload: bytes = b"") -> None:
        """Stream COMMANDs the loader hands up: the return path opens, PINGs get their PONG."""
        channel = self._channel
        if cmd == Cmd.OPEN_RETURN_PATH:
            if channel is not None and channel.has_return_path:
                self.return_path_open = True
        elif cmd == Cmd.PING and len(payload) == 4 and channel is not None and self.return_path_open:
            (value,) = struct.unpack(">I", payload)
            returnpath.send_pong(channel, value)

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
            self._set_status(M.COMPLETED)
        self._send_shut(0)
        self._close_channel()
        self.finished.set()

    def _fail(self, desc: str) -> None:
        """The guest stays stopped (inmigrate); the source hears SHUT(1); maybe exit(1)."""
        self.error_desc = desc
        self.socket_address = None
        self._set_status(M.FAILED)
        self._send_shut(1)
        self._close_channel()
        self.finished.set()
        if self.exit_on_error and not self._closing:
            self._exit_failure(desc)

    def _send_shut(self, error: int) -> None:
        channel = self._channel
        if channel is None or not self.return_path_open:
            return
        try:
            returnpath.send_shut(channel, error)
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
