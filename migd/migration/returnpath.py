"""The return path: destination -> source messages on the same (bidirectional) channel.

With it the source calls a migration ``completed`` only once the destination said its load succeeded
(SHUT 0), and resumes its own guest when the destination failed. Framing is QEMU's: ``be16 type,
be16 length, payload``. migd sends SHUT and PONG; the source's reader accepts exactly those and rejects
anything else, so a confused or hostile peer cannot make it allocate or wait on garbage.

[migd] Between migd peers three messages of migd's own are added (docs/FORMAT.md §6): FEATURES (the
answer to the source's configuration subsection), LOADED (everything loaded, waiting for COMMIT) and
HEARTBEAT. The reader accepts LOADED and HEARTBEAT only after FEATURES, and notes when it last heard
anything, so the source can give up on a silent destination. With feature LOAD_PACE a fourth one,
LOAD_PACE, tells the source how fast the destination loads (``loadpace.py`` measures it): the
reader keeps the last reports for the migration thread, which hands them to the policy.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from migd.migration.format import FEATURE_LOAD_PACE

if TYPE_CHECKING:
    from migd.transports.channel import Channel

log = logging.getLogger("migd.migration")

MSG_INVALID = 0
MSG_SHUT = 1
MSG_PONG = 2
MSG_REQ_PAGES_ID = 3
MSG_REQ_PAGES = 4
MSG_RECV_BITMAP = 5
MSG_RESUME_ACK = 6
MSG_SWITCHOVER_ACK = 7
# [migd] far above QEMU's numbers; sent only to a source that announced migd features
MSG_X_MIGD_FEATURES = 0x4D00  # be32 accepted features, be32 the destination's peer timeout (ms)
MSG_X_MIGD_LOADED = 0x4D01  # the whole stream loaded; the guest waits for COMMIT
MSG_X_MIGD_HEARTBEAT = 0x4D02  # the destination is alive
MSG_X_MIGD_LOAD_PACE = 0x4D03  # 5 x be64: bytes, pages, us busy, waiting, on a CPU; be32 PING, be32 us it was held

MAX_LENGTH = 512  # QEMU's bound on any return-path payload
_HEADER = struct.Struct(">HH")
_U32 = struct.Struct(">I")
_FEATURES = struct.Struct(">II")
_LOAD_PACE = struct.Struct(">QQQQQII")
PACE_KEPT = 64  # LOAD_PACE reports the reader keeps for the migration thread

# the messages a migd source understands, with their fixed payload length
_ACCEPTED = {MSG_SHUT: 4, MSG_PONG: 4, MSG_X_MIGD_FEATURES: 8}
_ACCEPTED_AFTER_FEATURES = {**_ACCEPTED, MSG_X_MIGD_LOADED: 0, MSG_X_MIGD_HEARTBEAT: 0}
_ACCEPTED_WITH_PACE = {**_ACCEPTED_AFTER_FEATURES, MSG_X_MIGD_LOAD_PACE: _LOAD_PACE.size}


class LoadPace(NamedTuple):
    """One LOAD_PACE report, as the source's reader received it: when it arrived (monotonic), and
    the destination's totals since it accepted the connection."""

    arrived: float
    bytes_read: int  # stream bytes the incoming thread read off the channel
    pages: int  # RAM pages it loaded (data and zero)
    busy_s: float  # seconds the incoming thread was not waiting for data
    wait_s: float  # seconds it waited for data (the channel empty)
    cpu_s: float  # seconds it ran on a CPU (its thread CPU time)
    ping: int  # the PING this report follows the PONG of (0: a periodic report)
    held_s: float  # seconds that PING waited in the destination after the read that brought it


class ReturnPathError(RuntimeError):
    """The return path broke or carried something a source must not accept."""


def _send(channel: Channel, kind: int, payload: bytes) -> None:
    data = memoryview(_HEADER.pack(kind, len(payload)) + payload)
    while data:
        written = channel.write_vectored([data])
        data = data[written:]


def send_shut(channel: Channel, error: int | bool) -> None:
    """Destination: the load is over; ``error`` non-zero tells the source it failed."""
    _send(channel, MSG_SHUT, _U32.pack(1 if error is True else int(error) & 0xFFFFFFFF))


def send_pong(channel: Channel, value: int) -> None:
    """Destination: answer a PING command from the stream with its value."""
    _send(channel, MSG_PONG, _U32.pack(value & 0xFFFFFFFF))


class ReturnPathWriter:
    """Destination side: every message through one lock, so the heartbeat thread and the incoming thread
    never interleave their bytes (any thread)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._lock = threading.Lock()

    def _send(self, kind: int, payload: bytes = b"") -> None:
        with self._lock:
            _send(self.channel, kind, payload)

    def shut(self, error: int | bool) -> None:
        self._send(MSG_SHUT, _U32.pack(1 if error is True else int(error) & 0xFFFFFFFF))

    def pong(self, value: int) -> None:
        self._send(MSG_PONG, _U32.pack(value & 0xFFFFFFFF))

    def features(self, features: int, peer_timeout_ms: int) -> None:
        self._send(MSG_X_MIGD_FEATURES, _FEATURES.pack(features & 0xFFFFFFFF, peer_timeout_ms & 0xFFFFFFFF))

    def loaded(self) -> None:
        self._send(MSG_X_MIGD_LOADED)

    def heartbeat(self) -> None:
        self._send(MSG_X_MIGD_HEARTBEAT)

    def load_pace(self, bytes_read: int, pages: int, busy_us: int, wait_us: int, cpu_us: int,
                  ping: int = 0, held_us: int = 0) -> None:
        """[migd] Feature LOAD_PACE: the incoming thread's totals since it accepted the connection; after
        a PONG, that PING's value and how long it waited here after the read that brought it."""
        mask, mask32 = (1 << 64) - 1, (1 << 32) - 1
        totals = (max(0, v) & mask for v in (bytes_read, pages, busy_us, wait_us, cpu_us))
        self._send(MSG_X_MIGD_LOAD_PACE, _LOAD_PACE.pack(*totals, ping & mask32, min(max(0, held_us), mask32)))


def sibling_error(flag: int) -> str:
    """The source's error-desc for a non-zero SHUT (QEMU's words)."""
    return f"Sibling indicated error {flag}"


class ReturnPathReader:
    """Source side: a thread that reads the destination's messages until SHUT, EOF or an error."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.pongs: list[int] = []
        self.pong_at: dict[int, float] = {}  # PONG value -> time.monotonic() it arrived (last 16)
        self.shut: int | None = None
        self.error: str | None = None  # why the reader stopped without a SHUT
        self.features: int | None = None  # [migd] what the destination accepted (None: not heard)
        self.peer_timeout_ms = 0  # [migd] the destination's own peer timeout
        self.loaded = False  # [migd] LOADED arrived
        self.answered = False  # the destination sent anything at all (it reads the stream)
        self.paces: deque[LoadPace] = deque(maxlen=PACE_KEPT)  # [migd] LOAD_PACE reports, oldest first
        self.pace_count = 0  # LOAD_PACE reports received in all
        self.last_heard = time.monotonic()  # any message, or the start
        self._done = threading.Event()
        self._pong = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self) -> None:
        self.last_heard = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="mig/src/rp", daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> bool:
        """The reader ended (SHUT, EOF, an error or close)."""
        return self._done.is_set()

    def silent_for(self) -> float:
        """Seconds since the destination last sent anything (any thread)."""
        return max(0.0, time.monotonic() - self.last_heard)

    def _read_exact(self, n: int) -> bytes | None:
        """n bytes, or None at a clean EOF before the first byte; raises on EOF inside a message."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            count = self.channel.read_into(view[got:])
            if count == 0:
                if got == 0:
                    return None
                raise ReturnPathError("Return path truncated inside a message")
            got += count
        return bytes(buf)

    def _run(self) -> None:
        """(return-path thread)"""
        try:
            while True:
                header = self._read_exact(_HEADER.size)
                if header is None:
                    self.error = "Return path closed before the destination acknowledged the load"
                    return
                kind, length = _HEADER.unpack(header)
                if self.features is None:
                    accepted = _ACCEPTED
                else:
                    accepted = (_ACCEPTED_WITH_PACE if self.features & FEATURE_LOAD_PACE
                                else _ACCEPTED_AFTER_FEATURES)
                expected = accepted.get(kind)
                if expected is None or length != expected or length > MAX_LENGTH:
                    self.error = f"Received invalid message 0x{kind:04x} length 0x{length:04x}"
                    return
                payload = self._read_exact(length) if length else b""
                if payload is None:
                    raise ReturnPathError("Return path truncated inside a message")
                self.last_heard = time.monotonic()
                self.answered = True
                if kind == MSG_X_MIGD_HEARTBEAT:
                    continue
                with self._pong:
                    if kind == MSG_SHUT:
                        (self.shut,) = _U32.unpack(payload)
                        return
                    if kind == MSG_X_MIGD_FEATURES:
                        if self.features is not None:
                            self.error = "Received a second X_MIGD_FEATURES message"
                            return
                        self.features, self.peer_timeout_ms = _FEATURES.unpack(payload)
                    elif kind == MSG_X_MIGD_LOADED:
                        self.loaded = True
                    elif kind == MSG_X_MIGD_LOAD_PACE:
                        read, pages, busy_us, wait_us, cpu_us, ping, held_us = _LOAD_PACE.unpack(payload)
                        self.paces.append(LoadPace(self.last_heard, read, pages, busy_us / 1e6, wait_us / 1e6,
                                                   cpu_us / 1e6, ping, held_us / 1e6))
                        self.pace_count += 1
                    else:
                        (value,) = _U32.unpack(payload)
                        self.pongs.append(value)
                        del self.pongs[:-16]
                        self.pong_at[value] = time.monotonic()
                        for old in list(self.pong_at)[:-16]:
                            del self.pong_at[old]
                    self._pong.notify_all()
        except ReturnPathError as exc:
            self.error = str(exc)
        except OSError as exc:
            self.error = f"Return path read failed: {exc.strerror or exc}"
        finally:
            if self.error and not self._closing:
                log.info("return path stopped: %s", self.error)
            self._done.set()
            with self._pong:
                self._pong.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds or the reader stopped; returns ``predicate()`` (any thread)."""
        with self._pong:
            self._pong.wait_for(lambda: predicate() or self._done.is_set(), timeout)
            return predicate()

    def paces_after(self, count: int) -> tuple[list[LoadPace], int]:
        """The LOAD_PACE reports received after the first ``count`` (those still kept), and how many
        came in all, read together (any thread)."""
        with self._pong:
            new = min(self.pace_count - count, len(self.paces))
            return (list(self.paces)[len(self.paces) - new:] if new > 0 else []), self.pace_count

    def wake(self) -> None:
        """Wake every waiter so it re-checks its condition (any thread)."""
        with self._pong:
            self._pong.notify_all()

    def wait_for_pong(self, value: int, timeout: float) -> bool:
        """True once PONG ``value`` arrived (False on timeout or when the reader stopped)."""
        return self.wait_for(lambda: value in self.pongs, timeout)

    def wait_for_shut(self, timeout: float | None = None) -> int:
        """The destination's SHUT flag (0 = load succeeded); raises if it never comes."""
        if self._thread is None:
            raise ReturnPathError("Return path reader was not started")
        if not self._done.wait(timeout):
            raise ReturnPathError("Timed out waiting for the destination to acknowledge the load")
        if self.shut is None:
            raise ReturnPathError(self.error or "Return path closed without a SHUT message")
        return self.shut

    def close(self) -> None:
        """Stop the reader. If it is still waiting (no SHUT came) the channel is shut down to wake it."""
        self._closing = True
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self.channel.shutdown()
        thread.join(timeout=5)
