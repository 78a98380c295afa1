"""The migration stream over a channel: buffered, rate limited, with a sticky error (QEMUFile's role).

``OutStream`` gathers small puts in a staging buffer and large ones (pages, staging arrays) as
references, and writes them with few vectored system calls. The rate limit is QEMU's: at most
``max-bandwidth / 10`` bytes per 100 ms window, counted when they really left (``transferred``); the
migration thread resets windows. Any write failure, or ``shutdown()`` from another thread, sets
``error`` and every later write fails at once.

``InStream`` reads through one buffer; bulk parsers look at the buffered bytes with ``peek`` and
consume them with ``skip``, so records are decoded straight out of the buffer without per-record copies.
The buffer is an anonymous mapping (a ``bytearray`` would be zero-filled with the GIL held: 4 MiB took
up to 15 ms on a loaded host when a migration arrived), and copies out of it of ``COPY_NOGIL`` bytes
or more go through numpy, which releases the GIL (a memoryview slice assignment does not).

[migd] Both can keep a running xxh3-64 of every byte put (source) or consumed (destination) since
``start_digest``/``reset_digest``: the checksum records of docs/FORMAT.md §1.2 compare the two. The
source hashes lazily, in stream order, just before it writes: ``flush`` takes the queue in pieces of
``HASH_CHUNK`` bytes, hashes a piece and sends it at once, so the kernel's copy of a page run reads
what the hash has just pulled into the cache (measured: half the system time of hashing 2 MiB first,
and a cheaper receiver); ``digest`` hashes whatever is still queued first. Hashing late is exact
because everything put stays unchanged until it is written: pages are copied into staging arrays
first, or sent straight from guest RAM (``put_iov``) only while the guest cannot write them (ram.py).

[migd] Over a plain unix socket, views of memory registered with ``splice_from`` (guest RAM) leave as
page references (``zerocopy.SpliceSender``): no copy on this side, the receiver reads them from RAM.
The caller that keeps that memory unchanged calls ``settle`` before it lets it change again.
"""

from __future__ import annotations

import mmap
import socket
import struct
import threading
import time
from typing import Any

import numpy as np
import xxhash

from migd.threads import any_thread
from migd.transports.channel import IOV_MAX, Channel, SocketChannel
from migd.transports.zerocopy import SpliceSender

WINDOWS_PER_SECOND = 10  # QEMU's BUFFER_DELAY of 100 ms
SMALL_BUF = 64 << 10  # small puts are copied into this; larger ones are queued by reference
FLUSH_THRESHOLD = 4 << 20  # queued bytes that trigger an implicit flush
IN_BUF = 4 << 20  # InStream's read buffer
MAX_READ = 64 << 20  # largest single read(); callers bound lengths from the stream well below this
COPY_NOGIL = 64 << 10  # copies this large go through numpy, with the GIL released
HASH_CHUNK = 256 << 10  # bytes hashed then written at once while a digest is kept (well inside L2)
SPLICE = True  # [migd] registered memory leaves a unix socket as page references (benches turn it off)
SPLICE_MIN = 64 << 10  # smaller views are copied: three system calls cost more than the copy

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class StreamError(Exception):
    """The stream is broken: a write/read failed, it was shut down, or its content is invalid."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class OutStream:
    """Write side. One writer thread; ``shutdown``/``set_rate_limit`` may come from any thread."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.transferred = 0  # bytes really written to the channel
        self.write_busy = 0.0  # seconds spent inside channel writes (the link's side of the time)
        self.error: str | None = None
        self._small = bytearray()
        self._iov: list[memoryview] = []
        self._queued = 0  # bytes in _iov (not counting _small)
        self._limit = 0  # bytes per window; 0 = unlimited
        self._window_start = 0
        self._error_lock = threading.Lock()  # error is set by the writer and by shutdown()
        self._hash: Any = None  # xxh3_64 of the bytes put since the last reset, when on
        self._hashed = 0
        self._hash_from = 0  # _iov[:_hash_from] is hashed already (or put before the digest began)
        self._splicer: SpliceSender | None = None
        self._splice_src: dict[int, Any] = {}  # id -> exporter whose views may leave as references

    # -- checksum -------------------------------------------------------------------------------

    def start_digest(self) -> None:
        """From now on, hash every byte put."""
        self._seal_small()
        self._hash = xxhash.xxh3_64()
        self._hashed = 0
        self._hash_from = len(self._iov)

    def digest(self) -> tuple[int, int]:
        """(xxh3-64, byte count) of what was put since the start or the last reset."""
        assert self._hash is not None
        self._seal_small()
        self._hash_views(self._iov, self._hash_from, len(self._iov))
        self._hash_from = len(self._iov)
        return self._hash.intdigest(), self._hashed

    def reset_digest(self) -> None:
        """Restart the hash: what was put before this belongs to the previous digest only."""
        assert self._hash is not None
        self._seal_small()
        self._hash.reset()
        self._hashed = 0
        self._hash_from = len(self._iov)

    def _hash_views(self, views: list[memoryview], start: int, end: int) -> None:
        update = self._hash.update
        for i in range(start, end):
            view = views[i]
            update(view)
            self._hashed += len(view)

    # -- putting data ---------------------------------------------------------------------------

    def put(self, data: bytes | bytearray | memoryview) -> None:
        """Queue bytes by copy (small data: headers, names, device state)."""
        self._check()
        if len(data) >= SMALL_BUF:
            self.put_nocopy(bytes(data))
            return
        self._small += data
        if len(self._small) >= SMALL_BUF:
            self._seal_small()

    def put_u8(self, v: int) -> None:
        self.put(bytes((v & 0xFF,)))

    def put_be16(self, v: int) -> None:
        self.put(_BE16.pack(v))

    def put_be32(self, v: int) -> None:
        self.put(_BE32.pack(v))

    def put_be64(self, v: int) -> None:
        self.put(_BE64.pack(v))

    def put_nocopy(self, mv: Any) -> None:
        """Queue a buffer by reference; it must stay unchanged until the next ``flush``."""
        self._check()
        view = memoryview(mv).cast("B") if not isinstance(mv, memoryview) or mv.format != "B" else mv
        if not len(view):
            return
        self._seal_small()
        self._iov.append(view)
        self._queued += len(view)
        if self._queued >= FLUSH_THRESHOLD:
            self.flush()

    def put_iov(self, views: list[memoryview]) -> None:
        """Queue byte views by reference, in order (page runs straight from guest RAM with their
        headers); they are read when written, so they must not change before the next ``flush``
        while a digest is kept."""
        self._check()
        self._seal_small()
        self._iov.extend(views)
        self._queued += sum(map(len, views))
        if self._queued >= FLUSH_THRESHOLD:
            self.flush()

    @property
    def hashing(self) -> bool:
        """Whether a digest of what is put is kept (checksum records)."""
        return self._hash is not None

    def pending(self) -> int:
        """Bytes queued and not yet written."""
        return self._queued + len(self._small)

    def _seal_small(self) -> None:
        if self._small:
            block = memoryview(bytes(self._small))
            self._small.clear()
            self._iov.append(block)
            self._queued += len(block)

    # -- page references ------------------------------------------------------------------------

    def splice_from(self, obj: Any) -> bool:
        """Let views of ``obj`` (writable memory that stays mapped: guest RAM) leave as page
        references when the channel is a plain unix socket; False when they are copied. The peer
        reads them when it receives them: keep them unchanged until ``settle``, or resend changes."""
        if id(obj) in self._splice_src:
            return True
        if not SPLICE or memoryview(obj).readonly or not self._can_splice():
            return False
        if self._splicer is None:
            assert isinstance(self.channel, SocketChannel)
            try:
                self._splicer = SpliceSender(self.channel.sock)
            except OSError:
                self._splice_src[0] = None  # no pipe: never try again
                return False
        self._splice_src[id(obj)] = obj
        return True

    def can_reference(self) -> bool:
        """Whether views of registered memory would leave as page references (``splice_from``)."""
        return SPLICE and self._can_splice()

    def _can_splice(self) -> bool:
        ch = self.channel
        return (0 not in self._splice_src and isinstance(ch, SocketChannel)
                and type(ch).write_vectored is SocketChannel.write_vectored and ch.sock.family == socket.AF_UNIX)

    def settle(self) -> None:
        """Wait until the peer has read every page reference sent (nothing to do if none was)."""
        if self._splicer is not None and self.error is None:
            self._splicer.drain(lambda: self.error is not None)

    # -- writing --------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write everything queued (blocking). Raises StreamError on failure or shutdown."""
        self._check()
        self._seal_small()
        iov = self._iov
        hash_from = self._hash_from if self._hash is not None else len(iov)
        self._iov = []
        self._queued = 0
        self._hash_from = 0
        try:
            if hash_from < len(iov):
                self._write(iov[:hash_from])
                for piece in _pieces(iov, hash_from, HASH_CHUNK):
                    self._hash_views(piece, 0, len(piece))
                    self._write(piece)
            else:
                self._write(iov)
        except StreamError:
            raise
        except Exception as exc:  # OSError from the channel, or a transport's own error type
            self._fail(_describe(exc))

    def _write(self, iov: list[memoryview]) -> None:
        """Write every byte of ``iov``: registered memory as page references, the rest copied."""
        if self._splicer is None:
            self._writev(iov)
            return
        src = self._splice_src
        start = 0
        for i, view in enumerate(iov):
            if len(view) >= SPLICE_MIN and id(view.obj) in src:
                if start < i:
                    self._writev(iov[start:i])
                t0 = time.monotonic()
                try:
                    self.transferred += self._splicer.send(view)
                finally:
                    self.write_busy += time.monotonic() - t0
                start = i + 1
        if start < len(iov):
            self._writev(iov[start:] if start else iov)

    def _writev(self, iov: list[memoryview]) -> None:
        """Write every byte of ``iov`` with as few vectored calls as the kernel allows."""
        pos = 0
        while pos < len(iov):
            batch = iov[pos : pos + IOV_MAX]
            t0 = time.monotonic()
            try:
                n = self.channel.write_vectored(batch)
            finally:
                self.write_busy += time.monotonic() - t0
            if n <= 0:
                raise OSError("write returned no progress")
            self.transferred += n
            for view in batch:  # advance over fully written buffers, trim a partial one
                if n >= len(view):
                    n -= len(view)
                    pos += 1
                else:
                    iov[pos] = view[n:]
                    break

    def _check(self) -> None:
        if self.error is not None:
            raise StreamError(self.error)

    def _set_error(self, desc: str) -> str:
        """Record the first error (any thread): a write failing because of a concurrent
        ``shutdown`` must not overwrite why the stream was shut down, nor the other way round."""
        with self._error_lock:
            if self.error is None:
                self.error = desc
            return self.error

    def _fail(self, desc: str) -> None:
        raise StreamError(self._set_error(desc))

    @any_thread
    def shutdown(self) -> None:
        """Fail every blocked and later write (migrate_cancel)."""
        self._set_error("Channel was shut down")
        self.channel.shutdown()

    @any_thread
    def abort(self, desc: str) -> None:
        """Fail the stream with ``desc`` (unless it already failed) and wake a blocked write: a
        multifd channel that broke ends the migration like a broken main channel."""
        self._set_error(desc)
        self.channel.shutdown()

    def close(self) -> None:
        self.channel.close()
        if self._splicer is not None:
            self._splicer.close()
            self._splicer = None

    # -- rate limit -----------------------------------------------------------------------------

    def set_rate_limit(self, bytes_per_second: int) -> None:
        """``max-bandwidth`` in bytes/s; 0 (or anything under 10 B/s) means unlimited, as in QEMU."""
        self._limit = max(0, int(bytes_per_second)) // WINDOWS_PER_SECOND

    @property
    def rate_limit(self) -> int:
        """Bytes allowed per 100 ms window (0 = unlimited)."""
        return self._limit

    def rate_limit_exceeded(self) -> bool:
        if self.error is not None:
            return True
        limit = self._limit
        if limit == 0:
            return False
        return self.transferred - self._window_start > limit

    def rate_budget(self) -> int | None:
        """Bytes still allowed in this window (None = unlimited); lets producers size batches."""
        limit = self._limit
        if limit == 0:
            return None
        return max(0, limit - (self.transferred + self.pending() - self._window_start))

    def reset_window(self) -> None:
        """Start a new 100 ms window (the migration thread calls this every >= 100 ms)."""
        self._window_start = self.transferred


def _pieces(iov: list[memoryview], start: int, size: int) -> list[list[memoryview]]:
    """``iov[start:]`` in order, cut into lists of about ``size`` bytes (large views are sliced)."""
    out: list[list[memoryview]] = []
    cur: list[memoryview] = []
    room = size
    for i in range(start, len(iov)):
        view = iov[i]
        while len(view) > room:
            cur.append(view[:room])
            out.append(cur)
            view = view[room:]
            cur, room = [], size
        if len(view):
            cur.append(view)
            room -= len(view)
            if room == 0 or len(cur) >= IOV_MAX:
                out.append(cur)
                cur, room = [], size
    if cur:
        out.append(cur)
    return out


def copy_bytes(dst: memoryview, src: memoryview) -> None:
    """``dst[:] = src`` (same length, byte views; they may overlap): a large copy releases the GIL."""
    if len(src) >= COPY_NOGIL:
        np.copyto(np.frombuffer(dst, dtype=np.uint8), np.frombuffer(src, dtype=np.uint8))
    else:
        dst[:] = src


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"Unable to write to channel: {exc.strerror}"
    return str(exc) or type(exc).__name__


def _read_error(exc: Exception) -> StreamError:
    """A channel read's failure in QEMU's words (the errno's text), or its own message."""
    if isinstance(exc, OSError) and exc.strerror:
        return StreamError(f"Unable to read from channel: {exc.strerror}")
    return StreamError(str(exc) or type(exc).__name__)


class InStream:
    """Read side: buffered reads from a channel; truncation is a StreamError, never a short read."""

    def __init__(self, channel: Channel, bufsize: int = IN_BUF, *, readahead: bool = True) -> None:
        self.channel = channel
        # False: never read past what the parser asked for, so bulk data (a multifd packet's pages)
        # is still in the socket when ``read_into``/``read_into_iov`` asks for it: received straight
        # into its destination, no copy through this buffer
        self.readahead = readahead
        self.fill_max = bufsize  # bytes one buffer fill asks for beyond what is needed, at most
        self._buf = mmap.mmap(-1, bufsize)  # zero pages on first touch, no fill under the GIL
        self._mv = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self.consumed = 0  # bytes handed to the parser so far (offset in the stream)
        self._eof = False
        self._hash: Any = None  # xxh3_64 of the bytes consumed since the last reset, when on
        self.digest_start = 0  # stream offset where the current digest began

    # -- checksum -------------------------------------------------------------------------------

    def start_digest(self) -> None:
        """From now on, hash every byte consumed."""
        self._hash = xxhash.xxh3_64()
        self.digest_start = self.consumed

    @property
    def digesting(self) -> bool:
        return self._hash is not None

    def digest(self) -> tuple[int, int]:
        """(xxh3-64, byte count) of what was consumed since the start or the last reset."""
        assert self._hash is not None
        return self._hash.intdigest(), self.consumed - self.digest_start

    def reset_digest(self) -> None:
        assert self._hash is not None
        self._hash.reset()
        self.digest_start = self.consumed

    def _hash_buf(self, start: int, end: int) -> None:
        if self._hash is not None and end > start:
            self._hash.update(self._mv[start:end])

    @property
    def available(self) -> int:
        return self._end - self._start

    def _fill(self, need: int) -> None:
        """Read until at least ``need`` (<= buffer size) bytes are buffered. Never waits for more."""
        while self._end - self._start < need:
            if self._eof:
                raise StreamError(
                    f"Migration stream truncated: needed {need} bytes at offset {self.consumed}, "
                    f"got {self._end - self._start}"
                )
            if len(self._buf) - self._end < max(need - self.available, 1 << 16) or self._start == self._end:
                self._compact()
            if self.readahead:
                n = self._read(self._mv[self._end : self._end + max(need - self.available, self.fill_max)])
            else:
                n = self._read(self._mv[self._end : self._end + need - self.available])
            if n == 0:
                self._eof = True
            self._end += n

    def _compact(self) -> None:
        n = self._end - self._start
        if self._start:
            copy_bytes(self._mv[:n], self._mv[self._start : self._end])
        self._start, self._end = 0, n

    def _read(self, mv: memoryview) -> int:
        try:
            return self.channel.read_into(mv)
        except StreamError:
            raise
        except Exception as exc:
            raise _read_error(exc) from exc

    def peek(self, need: int) -> memoryview:
        """At least ``need`` buffered bytes (and whatever else is already buffered), not consumed."""
        if need > len(self._buf):
            raise StreamError(f"Read of {need} bytes exceeds the stream buffer")
        self._fill(need)
        return self._mv[self._start : self._end]

    def skip(self, n: int) -> None:
        """Consume ``n`` bytes (buffered or not) without keeping them."""
        while n > 0:
            if self._start == self._end:
                self._fill(1)
            step = min(n, self._end - self._start)
            self._hash_buf(self._start, self._start + step)
            self._start += step
            self.consumed += step
            n -= step

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes. Memory grows with the data that arrives, never from ``n`` alone."""
        if n < 0 or n > MAX_READ:
            raise StreamError(f"Invalid read length {n} in migration stream")
        if n <= self.available:
            out = bytes(self._mv[self._start : self._start + n])
            self._hash_buf(self._start, self._start + n)
            self._start += n
            self.consumed += n
            return out
        parts = bytearray()
        while len(parts) < n:
            self._fill(1 if self.readahead else min(n - len(parts), len(self._buf)))
            step = min(n - len(parts), self._end - self._start)
            parts += self._mv[self._start : self._start + step]
            self._hash_buf(self._start, self._start + step)
            self._start += step
            self.consumed += step
        return bytes(parts)

    def read_into(self, mv: Any) -> None:
        """Fill ``mv`` completely: buffered bytes first, then straight from the channel."""
        dst = memoryview(mv).cast("B") if not (isinstance(mv, memoryview) and mv.format == "B") else mv
        n = len(dst)
        have = min(n, self.available)
        if have:
            copy_bytes(dst[:have], self._mv[self._start : self._start + have])
            self._hash_buf(self._start, self._start + have)
            self._start += have
            self.consumed += have
        pos = have
        while pos < n:
            if n - pos < (64 << 10) and self.readahead:  # small remainder: go through the buffer
                self._fill(1)
                step = min(n - pos, self.available)
                copy_bytes(dst[pos : pos + step], self._mv[self._start : self._start + step])
                self._hash_buf(self._start, self._start + step)
                self._start += step
            else:
                if self._eof:
                    self._fill(n - pos)  # raises the truncation error
                step = self._read(dst[pos:])
                if step == 0:
                    self._eof = True
                    continue
                if self._hash is not None:
                    self._hash.update(dst[pos : pos + step])
            pos += step
            self.consumed += step

    def read_into_iov(self, views: list[memoryview]) -> None:
        """Fill every view completely, in order: buffered bytes first, then straight from the
        channel with vectored reads (``recvmsg_into`` on a socket). Views must be format 'B'."""
        pending = [v for v in views if len(v)]
        i = 0
        while i < len(pending) and self.available:  # what the buffer already holds
            dst = pending[i]
            have = min(len(dst), self.available)
            copy_bytes(dst[:have], self._mv[self._start : self._start + have])
            self._hash_buf(self._start, self._start + have)
            self._start += have
            self.consumed += have
            if have == len(dst):
                i += 1
            else:
                pending[i] = dst[have:]
        while i < len(pending):
            if self._eof:
                self._fill(sum(map(len, pending[i:])))  # raises the truncation error
            batch = pending[i : i + IOV_MAX]
            got = self._read_iov(batch)
            if got == 0:
                self._eof = True
                continue
            self.consumed += got
            for view in batch:  # advance over filled views, trim a partial one
                step = min(got, len(view))
                if self._hash is not None and step:
                    self._hash.update(view[:step])
                got -= step
                if step == len(view):
                    i += 1
                else:
                    pending[i] = view[step:]
                    break

    def _read_iov(self, views: list[memoryview]) -> int:
        try:
            return self.channel.read_vectored(views)
        except StreamError:
            raise
        except Exception as exc:
            raise _read_error(exc) from exc

    def get_u8(self) -> int:
        self._fill(1)
        v = self._buf[self._start]
        self._hash_buf(self._start, self._start + 1)
        self._start += 1
        self.consumed += 1
        return v

    def _unpack(self, s: struct.Struct) -> int:
        self._fill(s.size)
        (v,) = s.unpack_from(self._buf, self._start)
        self._hash_buf(self._start, self._start + s.size)
        self._start += s.size
        self.consumed += s.size
        return int(v)

    def get_be16(self) -> int:
        return self._unpack(_BE16)

    def get_be32(self) -> int:
        return self._unpack(_BE32)

    def get_be64(self) -> int:
        return self._unpack(_BE64)

    def at_eof(self) -> bool:
        """True when the stream ended cleanly here (blocks until a byte or EOF is known)."""
        if self.available:
            return False
        try:
            self._fill(1)
        except StreamError:
            return True
        return False

    def shutdown(self) -> None:
        self.channel.shutdown()

    def close(self) -> None:
        self.channel.close()
