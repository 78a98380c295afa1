"""multifd: guest pages over N extra channels, one sender and one receiver thread per channel.

QEMU's design, followed here (facts from its documentation and stream, no code): with the ``multifd``
capability the source opens ``multifd-channels`` more connections to the same address after the main
one; each starts with an initial packet (magic 0x11223344, version 1, uuid, channel id); pages then
travel in packets whose header names the block and lists the offsets of its normal and zero pages,
followed by the normal pages (raw, or one zlib/zstd frame). Zero pages are detected on the channel
threads. The main channel keeps the section structure and, at every sync point, a RAM record with the
MULTIFD_FLUSH flag while every channel sends a packet with the SYNC flag; the destination's main thread
waits at the FLUSH until every channel has applied all its pages up to its SYNC, and the channels wait
there until the main thread lets them go. So a page sent again in a later round can never be
overtaken by its older copy on another channel, and everything is in guest RAM before device state
is loaded (the END section ends with a sync point too). The exact layout is in docs/FORMAT.md §6.

Threads: the migration thread (``mig/src/main``) queues work and syncs; ``mig/src/mfdN`` write;
on the destination ``mig/dst/mfd-accept`` accepts the channels and ``mig/dst/mfdN`` read. A failing
channel fails the whole migration: on the source it aborts the main stream (the migration thread
winds down as for any channel error), on the destination it shuts the main channel down.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from migd.migration.compress import FLAG_MASK, METHOD_FLAGS, CompressError, Compressor, Decompressor
from migd.migration.format import PAGE_SIZE
from migd.migration.ram import _contiguous, _runs, _zero_pages, known_zero_map
from migd.migration.stream import InStream, OutStream, StreamError
from migd.priority import lower_this_thread
from migd.threads import any_thread, on_thread
from migd.transports import Listener, TransportError, connect
from migd.transports.channel import IOV_MAX, Channel, SocketChannel
from migd.transports.sendqueue import queued_bytes
from migd.transports.uri import MigrationURI, TcpURI, UnixURI
from migd.transports.zerocopy import NOT_DETECTED, ZeroCopySocket

log = logging.getLogger("migd.migration")

MAGIC = 0x11223344  # QEMU's MULTIFD_MAGIC
VERSION = 1  # QEMU's MULTIFD_VERSION
# initial packet: magic, version, uuid[16], channel id, 7 + 32 reserved bytes (64 bytes, as QEMU's);
# [migd] the first reserved byte carries the source's channel count (0 = not said, as from QEMU)
INIT = struct.Struct(">II16sBB38x")
# packet header: magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num,
# zero_pages, 28 reserved bytes, ramblock[256]; then (normal + zero) be64 offsets, then the payload
HDR = struct.Struct(">IIIIIIQI28x256s")
FLAG_SYNC = 0x1  # QEMU's MULTIFD_FLAG_SYNC
KNOWN_FLAGS = FLAG_SYNC | FLAG_MASK
MAX_NORMAL = 512  # normal pages per packet (2 MiB of payload)
MAX_PAGES = 1 << 16  # offsets per packet, normal and zero together
QUEUE_DEPTH = 1  # batches waiting per sender channel (besides the one it writes): the bytes in flight
# at a switch-over are the downtime's, so (1 + QUEUE_DEPTH) x MULTIFD_BATCH_PAGES x channels stays small
JOIN_TIMEOUT = 10.0  # seconds close() gives a channel thread
POLL = 0.05  # seconds between checks of a wait that a failure elsewhere may have to end
ZERO_CHUNK = 4096  # zero pages a receiver checks at once (16 MiB)
# the main channel has just connected to the same address, so the others come at once or not at all;
# bounded well below the transports' 60 s so a cancel during setup is never held up for long
CONNECT_TIMEOUT = 10.0
BLOCK_WAIT = 10.0  # seconds a receiver waits for a hot-plugged block the main channel announces

NEEDS_SOCKETS = "Migration requires multi-channel URIs (e.g. tcp)"  # QEMU's text
# wraps a freshly connected (source) or accepted (destination) channel in TLS, or raises TransportError
Secure = Callable[[Channel], Channel]

_STOP = "stop"
_SYNC = "sync"


def supports(address: MigrationURI) -> bool:
    """Whether multifd can run over this address (QEMU: socket transports only; migd: tcp, unix)."""
    return isinstance(address, TcpURI | UnixURI)


_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME = 15


def name_os_thread() -> None:
    """Give the calling thread's OS name its Python name (``top -H``, /proc/PID/task/*/comm). (any thread)"""
    try:
        _LIBC.prctl(PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)
    except (AttributeError, OSError):  # not Linux: the name is only cosmetic
        pass


def init_packet(uuid: bytes, channel_id: int, channels: int = 0) -> bytes:
    return INIT.pack(MAGIC, VERSION, uuid, channel_id, channels)


def _name_field(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > 255:
        raise StreamError(f"RAM block name '{name}' is too long for a multifd packet")
    return raw


# -- source -------------------------------------------------------------------------------------------


class _SendChannel(threading.Thread):
    """One channel's writer: takes batches from its queue, finds the zero pages, writes packets."""

    def __init__(self, owner: MultifdSender, index: int, channel: Channel, comp: Compressor | None,
                 zc: ZeroCopySocket | None = None) -> None:
        super().__init__(name=f"mig/src/mfd{index}", daemon=True)
        self.owner = owner
        self.index = index
        self.channel = channel
        self.comp = comp
        self.zc = zc  # zero-copy-send: page payloads leave with MSG_ZEROCOPY, reaped at each SYNC
        self.missed = 0  # sync points at which the kernel copied every zero-copy send (QEMU's count)
        self.queue: deque[Any] = deque()
        self.normal = 0  # written by this thread only; the migration thread reads them
        self.zero = 0
        self.bytes = 0
        self.syncs = 0
        self.outstanding = 0  # batches given and not yet written (under the owner's cond)

    @on_thread("mig/src/mfd")
    def run(self) -> None:
        owner = self.owner
        name_os_thread()
        lower_this_thread()  # data plane: below the control plane (migd/priority.py)
        try:
            self._write([init_packet(owner.uuid, self.index, len(owner.threads))])
            while True:
                item = owner._take(self)
                if item is _STOP:
                    return
                if item is _SYNC:
                    self._sync_packet()
                    if self.zc is not None and self.zc.flush(self._stopped):
                        self.missed += 1
                    with owner.cond:
                        self.syncs += 1
                        owner.cond.notify_all()
                else:
                    self._pages(*item)
                    with owner.cond:
                        self.outstanding -= 1
                        owner.cond.notify_all()
        except Exception as exc:  # noqa: BLE001 - an I/O error or a bug: the migration fails either way
            owner._channel_failed(self, exc)

    def _write(self, bufs: list[Any]) -> None:
        self.bytes += self.channel.write_all(bufs)

    def _stopped(self) -> bool:
        """Whether a wait for zero-copy completions must end: closing, cancelled or failed."""
        owner = self.owner
        return owner._closing or owner.error is not None or owner.stream.error is not None

    def _write_zero_copy(self, views: list[memoryview]) -> None:
        """Every byte of ``views`` (guest RAM) with MSG_ZEROCOPY sends, over short writes."""
        assert self.zc is not None
        pending = [v for v in views if len(v)]
        while pending:
            n = self.zc.send(pending[:IOV_MAX], self._stopped)
            if n <= 0:
                raise OSError("write returned no progress")
            self.bytes += n
            while n and pending:
                if n >= len(pending[0]):
                    n -= len(pending.pop(0))
                else:
                    pending[0] = pending[0][n:]
                    n = 0

    def _pages(self, block: Any, candidates: np.ndarray, zero: np.ndarray) -> None:
        """One batch: its zero pages found at once, its offsets converted at once, then its packets
        in as few vectored writes as IOV_MAX allows (mfdN thread). Each numpy call covers the whole
        batch and each write many packets, so the Python stretches that keep the GIL between two
        releases stay short and few: the event loop waits for them (issue 13)."""
        normal, found = _split_zero(block.words, candidates)
        zero = np.concatenate((zero, found)) if zero.size and found.size else (found if found.size else zero)
        name = _name_field(block.name)
        flag = self.comp.flag if self.comp is not None else 0
        # every offset of the batch as big-endian bytes, once; each packet sends a slice of them
        n_offs = _be_offsets(normal)
        z_offs = _be_offsets(zero)
        buf = memoryview(block.buf)
        bufs: list[Any] = []
        counts: list[tuple[int, int]] = []
        ni = zi = 0
        while ni < normal.size or zi < zero.size:
            n_part = normal[ni : ni + MAX_NORMAL]
            n = n_part.size
            z = min(zero.size - zi, MAX_PAGES - n)
            offsets = [n_offs[8 * ni : 8 * (ni + n)], z_offs[8 * zi : 8 * (zi + z)]]
            payload: list[Any] = []
            size = 0
            if n and self.comp is None:
                payload = [buf[a * PAGE_SIZE : b * PAGE_SIZE] for a, b, _ in _runs(n_part)]
                size = n * PAGE_SIZE
            elif n:
                assert self.comp is not None
                frame = self.comp.compress(np.ascontiguousarray(block.pages[n_part]).data.cast("B"))
                payload = [frame]
                size = len(frame)
            hdr = HDR.pack(MAGIC, VERSION, flag, n + z, n, size, next(self.owner.packet_num), z, name)
            ni += n
            zi += z
            if self.zc is not None and self.comp is None and payload:
                self._write([hdr, *offsets])  # small and short-lived: copied; the pages are pinned
                self._write_zero_copy(payload)
                self._count(n, z)
                continue
            if bufs and len(bufs) + 3 + len(payload) > IOV_MAX:
                self._flush(bufs, counts)
            bufs += [hdr, *offsets, *payload]
            counts.append((n, z))
        if bufs:
            self._flush(bufs, counts)

    def _flush(self, bufs: list[Any], counts: list[tuple[int, int]]) -> None:
        """Write the packets gathered in ``bufs`` in one go and count their pages; empties both."""
        self._write(bufs)
        for n, z in counts:
            self._count(n, z)
        bufs.clear()
        counts.clear()

    def _count(self, n: int, z: int) -> None:
        self.normal += n
        self.zero += z

    def _sync_packet(self) -> None:
        """A packet without pages that carries the SYNC flag (mfdN thread)."""
        flags = FLAG_SYNC | (self.comp.flag if self.comp is not None else 0)
        self._write([HDR.pack(MAGIC, VERSION, flags, 0, 0, 0, next(self.owner.packet_num), 0, b"")])


def _split_zero(words: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normal, zero) pages of ``idx`` (mfdN thread). A page whose first and last words are not both
    zero holds data; when that is every page (random RAM) two numpy calls decide the whole batch and
    the full check (``ram._zero_pages``) never runs; otherwise it runs on the candidates alone. Few
    calls, few GIL hand-overs per batch."""
    if idx.size == 0:
        return idx, idx
    if _contiguous(idx):
        w = words[int(idx[0]) : int(idx[-1]) + 1]
        edges = w[:, 0] | w[:, -1]
    else:
        edges = words[idx, 0] | words[idx, -1]
    maybe = np.flatnonzero(edges == 0)
    if maybe.size == 0:
        return idx, idx[:0]
    is_zero = np.zeros(idx.size, dtype=bool)  # the full check on the candidates only
    is_zero[maybe] = _zero_pages(words, idx[maybe])
    return idx[~is_zero], idx[is_zero]


def _be_offsets(idx: np.ndarray) -> np.ndarray:
    """Page indices as the packet's be64 byte offsets, viewed as bytes (one numpy call for a range)."""
    if _contiguous(idx):
        first = int(idx[0])
        return np.arange(first * PAGE_SIZE, (first + idx.size) * PAGE_SIZE, PAGE_SIZE, dtype=">u8").view(np.uint8)
    return (idx.astype(np.uint64) << np.uint64(12)).astype(">u8").view(np.uint8)


class MultifdSender:
    """The source's channels. The migration thread calls ``queue``/``sync``/``collect``/``close``."""

    def __init__(self, channels: list[Channel], stream: OutStream, method: str = "none", level: int = 1,
                 zero_copy: list[ZeroCopySocket] | None = None) -> None:
        self.uuid = os.urandom(16)  # migd has no VM uuid: one per migration ties its channels together
        self.stream = stream
        self.cond = threading.Condition()
        self.packet_num = itertools.count()
        self.error: str | None = None
        self._closing = False
        self._next = 0
        self._collected = (0, 0, 0)
        self._syncs = 0
        self.threads = [
            _SendChannel(self, i, ch, None if method == "none" else Compressor(method, level),
                         zero_copy[i] if zero_copy else None)
            for i, ch in enumerate(channels)
        ]

    def queued_bytes(self) -> int:
        """(any thread) Bytes the channels' sockets hold that the destination has not read."""
        return sum(queued_bytes(t.channel) for t in self.threads)

    @classmethod
    @on_thread("mig/src/main")
    def open(cls, address: MigrationURI | None, stream: OutStream, params: Mapping[str, Any],
             secure: Secure | None = None, zero_copy: bool = False) -> MultifdSender:
        """Connect ``multifd-channels`` more channels to the main channel's address and start them;
        with ``secure`` (``tls-creds``) each one does its own TLS handshake first, as in QEMU; with
        ``zero_copy`` (capability zero-copy-send) each must take MSG_ZEROCOPY."""
        if address is None or not supports(address):
            raise StreamError(NEEDS_SOCKETS)
        method = str(params["multifd-compression"])
        level = int(params["multifd-zstd-level"] if method == "zstd" else params["multifd-zlib-level"])
        channels: list[Channel] = []
        try:
            for _ in range(int(params["multifd-channels"])):
                raw = connect(address, None, None, CONNECT_TIMEOUT)
                channels.append(raw if secure is None else secure(raw))  # secure() closes raw on failure
            zc = [_zero_copy(ch) for ch in channels] if zero_copy else None
            sender = cls(channels, stream, method, level, zc)
        except (TransportError, ValueError, StreamError) as exc:
            for ch in channels:
                ch.close()
            log.info("migration: multifd channel %d: %s", len(channels), exc)  # said even when cancelled
            raise exc if isinstance(exc, StreamError) else StreamError(f"multifd: {exc}") from None
        sender.start()
        return sender

    def start(self) -> None:
        for t in self.threads:
            t.start()

    # -- the migration thread's side ------------------------------------------------------------

    def _check(self) -> None:
        if self.error is not None:
            raise StreamError(self.error)
        if self.stream.error is not None:  # a cancel shut the main stream down
            raise StreamError(self.stream.error)

    def _put(self, t: _SendChannel, item: Any) -> None:
        with self.cond:
            if len(t.queue) >= QUEUE_DEPTH:
                t0 = time.monotonic()
                while len(t.queue) >= QUEUE_DEPTH:
                    self._check()
                    self.cond.wait(POLL)
                # waiting for a channel is waiting for the link: the policy counts it as time in writes
                self.stream.write_busy += time.monotonic() - t0
            self._check()
            t.queue.append(item)
            self.cond.notify_all()

    @on_thread("mig/src/main")
    def queue(self, block: Any, candidates: np.ndarray, zero: np.ndarray) -> None:
        """Hand one batch to the least busy channel: pages to read (zero or not) and known-zero pages."""
        threads = self.threads
        with self.cond:
            order = threads[self._next :] + threads[: self._next]
            t = min(order, key=lambda c: len(c.queue))
            self._next = (t.index + 1) % len(threads)
            t.outstanding += 1
        self._put(t, (block, candidates, zero))
        if self.stream.rate_limit:
            # under max-bandwidth, bytes count against the window only once written: wait for them,
            # so the limit is overshot by one batch at most (as with one channel), not by every queue
            with self.cond:
                while any(c.outstanding for c in threads):
                    self._check()
                    self.cond.wait(POLL)

    @on_thread("mig/src/main")
    def sync(self, wait: bool = False) -> None:
        """A sync point: every channel sends SYNC after what it was given; ``wait`` until they did."""
        self._syncs += 1
        for t in self.threads:
            self._put(t, _SYNC)
        if wait:
            with self.cond:
                while any(t.syncs < self._syncs for t in self.threads):
                    self._check()
                    self.cond.wait(POLL)

    @on_thread("mig/src/main")
    def collect(self) -> tuple[int, int, int]:
        """(normal pages, zero pages, bytes) the channels wrote since the last call."""
        now = (sum(t.normal for t in self.threads), sum(t.zero for t in self.threads),
               sum(t.bytes for t in self.threads))
        last, self._collected = self._collected, now
        return now[0] - last[0], now[1] - last[1], now[2] - last[2]

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.threads)

    @property
    def missed_zero_copy(self) -> int:
        """Sync points x channels at which the kernel copied every zero-copy send (QEMU's count)."""
        return sum(t.missed for t in self.threads)

    def _take(self, t: _SendChannel) -> Any:
        """Next item for channel ``t`` (its own thread); _STOP once closing."""
        with self.cond:
            while not t.queue:
                if self._closing:
                    return _STOP
                self.cond.wait(POLL * 10)
            item = t.queue.popleft()
            self.cond.notify_all()
            return item

    def _channel_failed(self, t: _SendChannel, exc: BaseException) -> None:
        if isinstance(exc, OSError) and exc.strerror:
            text = f"Unable to write to channel: {exc.strerror}"
        else:
            text = str(exc) or type(exc).__name__
        with self.cond:
            if self._closing:
                return
            if self.error is None:
                self.error = f"multifd channel {t.index}: {text}"
                log.info("migration: %s", self.error)
            self.cond.notify_all()
        self.stream.abort(self.error)  # wakes the migration thread wherever it writes

    @any_thread
    def close(self, drain: bool = False) -> None:
        """Stop every channel thread (after its queue when ``drain``), join it, close the channel."""
        with self.cond:
            if drain and self.error is None:
                for t in self.threads:
                    t.queue.append(_STOP)
            else:
                self._closing = True
            self.cond.notify_all()
        for t in self.threads:
            if t.is_alive() and drain:
                t.join(JOIN_TIMEOUT)
        with self.cond:
            self._closing = True
            self.cond.notify_all()
        for t in self.threads:
            t.channel.shutdown()
        for t in self.threads:
            if t.is_alive():
                t.join(JOIN_TIMEOUT)
            t.channel.close()


def _zero_copy(channel: Channel) -> ZeroCopySocket:
    """MSG_ZEROCOPY on a channel's socket, or QEMU's refusal (a unix socket, TLS, an old kernel)."""
    try:
        if type(channel) is not SocketChannel:  # a plain socket: not a pipe, not TLS (it encrypts first)
            raise OSError("not a plain socket")
        return ZeroCopySocket(channel.sock)
    except OSError:
        raise StreamError(NOT_DETECTED) from None


# -- destination --------------------------------------------------------------------------------------


class _RecvChannel(threading.Thread):
    """One channel's reader: packets straight into guest RAM; stops at each SYNC until released."""

    def __init__(self, owner: MultifdReceiver, seq: int, channel: Channel) -> None:
        super().__init__(name=f"mig/dst/mfd{seq}", daemon=True)
        self.owner = owner
        self.channel = channel
        self.id = -1
        self.synced = 0
        self.ended = False  # set by the thread as it leaves (a thread not started yet is not ended)
        self.decomp = Decompressor(owner.method)
        # one read takes a packet's header and the offsets of up to MAX_NORMAL pages (the sender writes
        # them together); payloads land in guest RAM, not in this buffer
        self.stream = InStream(channel, 1 << 20)
        self.stream.fill_max = HDR.size + 8 * MAX_NORMAL

    @on_thread("mig/dst/mfd")
    def run(self) -> None:
        name_os_thread()
        lower_this_thread()  # data plane: below the control plane (migd/priority.py)
        try:
            self._init()
            while not self.owner.stopping:
                if self.stream.at_eof():
                    if not self.owner.stopping:
                        raise StreamError(f"multifd channel {self.id}: closed by the source")
                    return
                self._packet()
        except Exception as exc:  # noqa: BLE001 - a broken channel fails the whole incoming migration
            self.owner._failed(self, exc)
        finally:
            with self.owner.cond:
                self.ended = True
                self.owner.cond.notify_all()

    def _init(self) -> None:
        owner = self.owner
        magic, version, uuid, cid, count = INIT.unpack(self.stream.read(INIT.size))
        if magic != MAGIC:
            raise StreamError(f"multifd: received packet magic {magic:x} and expected magic {MAGIC:x}")
        if version != VERSION:
            raise StreamError(f"multifd: received packet version {version} and expected version {VERSION}")
        if count and count != owner.count:  # [migd] otherwise the first sync point would wait forever
            raise StreamError(f"multifd: the source opens {count} channels and this destination expects "
                              f"{owner.count} (set the same multifd-channels on both sides)")
        if cid >= owner.count:
            raise StreamError(f"multifd: received channel id {cid} is greater than number of channels "
                              f"{owner.count}")
        with owner.cond:
            if owner.uuid is None:
                owner.uuid = uuid
            elif uuid != owner.uuid:
                raise StreamError(f"multifd: received uuid '{uuid.hex()}' and expected uuid "
                                  f"'{owner.uuid.hex()}' for channel {cid}")
            if cid in owner.channels:
                raise StreamError(f"multifd: channel {cid} connected twice")
            self.id = cid
            owner.channels[cid] = self
            owner.cond.notify_all()

    def _packet(self) -> None:
        owner, f = self.owner, self.stream
        magic, version, flags, alloc, n, size, _num, z, name = HDR.unpack(f.read(HDR.size))
        if magic != MAGIC:
            raise StreamError(f"multifd: received packet magic {magic:x} and expected magic {MAGIC:x}")
        if version != VERSION:
            raise StreamError(f"multifd: received packet version {version} and expected version {VERSION}")
        if flags & ~KNOWN_FLAGS or flags & FLAG_MASK != self.decomp.flag:
            raise StreamError(f"multifd {self.id}: flags received {flags:x} flags expected "
                              f"{(flags & FLAG_SYNC) | self.decomp.flag:x}")
        if n > MAX_NORMAL or n + z > MAX_PAGES or alloc != n + z:
            raise StreamError(f"multifd: received packet with {n} normal and {z} zero pages "
                              f"({alloc} allocated), expected at most {MAX_PAGES}")
        if n + z:
            block = self._block(name.rstrip(b"\0").decode(errors="replace"))
            offs = np.empty(n + z, dtype=">u8")
            f.read_into(offs.view(np.uint8))  # from the buffer when the header's read took them
            bad = np.flatnonzero((offs % PAGE_SIZE != 0) | (offs >= block.size))
            if bad.size:
                raise StreamError(f"multifd: offset too long {int(offs[bad[0]])} (max {block.size})")
            idx = (offs >> 12).astype(np.intp)
            self._load(block, idx[:n], idx[n:], size)
        elif size:
            raise StreamError(f"multifd {self.id}: payload of {size} bytes without pages")
        if flags & FLAG_SYNC:
            with owner.cond:
                self.synced += 1
                owner.cond.notify_all()
                while owner.released < self.synced and not owner.stopping:
                    owner.cond.wait(POLL * 10)

    def _block(self, name: str) -> Any:
        """The named block; one the main channel is announcing right now (hot-plug) is waited for."""
        owner = self.owner
        block = None
        with owner.cond:
            for _ in range(int(BLOCK_WAIT / POLL)):
                block = owner.ramlist.get(name)
                if block is not None or owner.stopping:
                    break
                owner.cond.wait(POLL)
        if block is None:
            raise StreamError(f"multifd: unknown ram block {name}")
        return block

    def _load(self, block: Any, normal: np.ndarray, zero: np.ndarray, size: int) -> None:
        f, n = self.stream, normal.size
        if self.decomp.method == "none":
            if size != n * PAGE_SIZE:
                raise StreamError(f"multifd {self.id}: payload of {size} bytes for {n} pages")
            buf = memoryview(block.buf)  # straight into guest RAM: one scatter list of the page runs
            f.read_into_iov([buf[a * PAGE_SIZE : b * PAGE_SIZE] for a, b, _ in _runs(normal)])
        elif n:
            if size > n * PAGE_SIZE + (n * PAGE_SIZE >> 6) + 4096:
                raise StreamError(f"multifd {self.id}: compressed payload of {size} bytes for {n} pages")
            frame = np.empty(size, dtype=np.uint8)
            f.read_into(frame)  # straight from the channel: no buffer-sized steps
            try:
                data = self.decomp.decompress(frame.data, n * PAGE_SIZE)
            except CompressError as exc:
                raise StreamError(f"multifd {self.id}: {exc}") from None
            block.pages[normal] = np.frombuffer(data, dtype=np.uint8).reshape(n, PAGE_SIZE)
        kz = self.owner.known_zero(block)
        if kz is not None:
            if n:
                kz[normal] = False
            if zero.size:
                todo = zero[~kz[zero]]
                kz[zero] = True  # after this packet, whatever happens below
                zero = todo
        for i in range(0, zero.size, ZERO_CHUNK):  # in chunks: a packet may list 65536 zero pages
            part = zero[i : i + ZERO_CHUNK]
            first, last = int(part.min()), int(part.max())
            if last - first + 1 == part.size:  # distinct pages filling a range: a view, no copy
                nz = np.flatnonzero(block.words[first : last + 1].any(axis=1)) + first
            else:
                nz = part[block.words[part].any(axis=1)]
            if nz.size:  # reading is cheaper than writing zeros over zeros
                block.pages[nz] = 0


class MultifdReceiver:
    """The destination's channels: accepted from the migration listener after the main channel."""

    def __init__(self, ramlist: Any, count: int, method: str, on_error: Callable[[str], None],
                 secure: Secure | None = None) -> None:
        """``secure`` (``tls-creds``): the TLS handshake each accepted channel must pass."""
        if method not in METHOD_FLAGS:
            raise ValueError(f"multifd-compression '{method}' is not supported by migd")
        self.ramlist = ramlist
        self.count = count
        self.method = method
        self.on_error = on_error
        self.secure = secure
        self.cond = threading.Condition()
        self.channels: dict[int, _RecvChannel] = {}
        self.uuid: bytes | None = None
        self.error: str | None = None
        self.stopping = False
        self.released = 0
        self._flushes = 0
        self._threads: list[_RecvChannel] = []
        self._known_zero: dict[str, np.ndarray | None] = {}
        self._listener: Listener | None = None
        self._acceptor: threading.Thread | None = None

    @on_thread("mig/dst/mfd")
    def known_zero(self, block: Any) -> np.ndarray | None:
        """Pages of ``block`` known to be zero (untouched before ``ram.prefault``, or zeroed since): a
        zero page there needs neither a read nor a write. Channels touch distinct pages in a round."""
        with self.cond:
            return known_zero_map(self._known_zero, block)

    @any_thread
    def accept_from(self, listener: Listener) -> None:
        """Accept ``count`` channels from ``listener`` on a thread of their own, then close it."""
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept, name="mig/dst/mfd-accept", daemon=True)
        self._acceptor.start()

    @on_thread("mig/dst/mfd-accept")
    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        name_os_thread()
        try:
            for seq in range(self.count):
                channel = self._accept_one(listener)
                with self.cond:
                    if self.stopping:
                        channel.close()
                        return
                    t = _RecvChannel(self, seq, channel)
                    self._threads.append(t)
                t.start()
        except (TransportError, OSError) as exc:
            self._fail_desc(f"multifd: {exc}")
        finally:
            listener.close()

    @on_thread("mig/dst/mfd-accept")
    def _accept_one(self, listener: Listener) -> Channel:
        """The next channel; with TLS one whose handshake fails is logged and dropped and the next one
        awaited, as for the main channel (its source fails and closes the main channel, which fails
        this side). Bounded by the listener: close() ends accept and any handshake at once."""
        while True:
            raw = listener.accept()
            if self.secure is None:
                return raw
            try:
                return self.secure(raw)
            except TransportError:  # secure() closed raw and logged why
                with self.cond:
                    if self.stopping:
                        raise

    @on_thread("mig/dst/main")
    def sync_main(self) -> None:
        """At a MULTIFD_FLUSH: wait until every channel applied its pages up to its SYNC, release them."""
        with self.cond:
            self._flushes += 1
            k = self._flushes
            while True:
                if self.error is not None:
                    raise StreamError(self.error)
                if self.stopping:
                    raise StreamError("multifd: incoming migration shut down")
                if len(self.channels) == self.count and all(c.synced >= k for c in self.channels.values()):
                    break
                dead = [c for c in self._threads if c.ended and c.synced < k]
                if dead:
                    raise StreamError(f"multifd channel {dead[0].id}: ended before a sync point")
                self.cond.wait(POLL * 10)
            self.released = k
            self.cond.notify_all()

    def _failed(self, t: _RecvChannel, exc: BaseException) -> None:
        if isinstance(exc, OSError) and exc.strerror:
            text = f"Unable to read from channel: {exc.strerror}"
        else:
            text = str(exc) or type(exc).__name__
        if not text.startswith("multifd"):
            text = f"multifd channel {t.id}: {text}"
        self._fail_desc(text)

    def _fail_desc(self, desc: str) -> None:
        with self.cond:
            if self.stopping or self.error is not None:
                return
            self.error = desc
            self.cond.notify_all()
        log.info("incoming migration: %s", desc)
        self.on_error(desc)

    @any_thread
    def close(self) -> None:
        """Stop accepting, wake and join every channel thread, close the channels."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
            threads = list(self._threads)
        if self._listener is not None:
            self._listener.close()
        for t in threads:
            t.channel.shutdown()
        if self._acceptor is not None and self._acceptor is not threading.current_thread():
            self._acceptor.join(JOIN_TIMEOUT)
        with self.cond:
            threads = list(self._threads)
        for t in threads:
            t.channel.shutdown()
            if t is not threading.current_thread():
                t.join(JOIN_TIMEOUT)
            t.channel.close()
