"""Drives: a file-backed disk with a write-back cache, flush/drain, and exclusive image locking.

Two processes must never write one image at once (the source and destination of a migration share
it). Each drive holds an exclusive ``flock`` on its image while active; ``inactivate`` flushes and
releases it at switch-over, ``activate`` takes it back (on the destination, or on the source when a
migration fails). A destination opens its drives inactive and activates them when the migration
completes.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from concurrent.futures import Future

CACHE_MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")
_CACHED = ("writeback", "unsafe")
_SYNC_EACH = ("writethrough", "directsync")


class DriveError(OSError):
    """An I/O or locking failure, worded like QEMU's block layer.

    An OSError because that is what it is: a refusal the daemon reports in one line (a locked image
    at start-up is a bad setting, not a bug to print a traceback for). ``str()`` is the message.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)


class Drive:
    """One image file, with QEMU's cache modes.

    ``writeback`` keeps written sectors in memory until ``flush``; ``unsafe`` too, but its flush skips
    fsync; ``none`` writes straight to the file (page cache, no O_DIRECT); ``writethrough`` and
    ``directsync`` write straight to the file and fdatasync every write.
    """

    SECTOR = 4096
    WRITEBACK_LIMIT = 64 << 20  # dirty cache bytes that start a background flush

    def __init__(self, file: str, cache: str = "writeback", *, active: bool = True) -> None:
        if cache not in CACHE_MODES:
            raise DriveError(f"Parameter 'cache' does not accept value '{cache}'")
        self.file = file
        self.cache = cache
        try:
            self._fd = os.open(file, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise DriveError(f"Could not open '{file}': {exc.strerror}") from exc
        self.size = os.fstat(self._fd).st_size
        self._lock = threading.Lock()  # guards the cache and counters
        self._idle = threading.Condition(self._lock)
        self._flush_lock = threading.Lock()  # one flush at a time
        self._dirty: dict[int, bytes] = {}  # sector index -> contents not yet written
        self._flushing: dict[int, bytes] = {}  # taken by a running flush, not yet on disk
        self._inflight = 0
        self._writeback: Future[float] | None = None
        self.active = False
        self.bytes_written = 0
        self.flushes = 0
        self.last_flush_ms = 0.0
        if active:
            try:
                self.activate()
            except DriveError:
                os.close(self._fd)
                raise

    # -- locking -----------------------------------------------------------------------------

    def activate(self) -> None:
        """Take the exclusive image lock; fails clearly if another process holds it."""
        if self.active:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise DriveError(
                f'Failed to get "write" lock: Is another process using the image [{self.file}]?') from exc
        self.active = True

    def inactivate(self) -> None:
        """Flush everything and release the image lock; writes are refused until ``activate``."""
        if not self.active:
            return
        with self._lock:  # refuse new writes first, so nothing lands after the final flush
            self.active = False
        self.drain()
        try:
            self.flush()
        except DriveError:
            with self._lock:
                self.active = True
            raise
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    # -- I/O -----------------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """A guest write: into the cache (writeback) or straight to the file (none)."""
        mv = memoryview(data).cast("B")
        if offset < 0 or offset + len(mv) > self.size:
            raise DriveError(f"write of {len(mv)} bytes at {offset} is beyond the end of '{self.file}'")
        with self._lock:
            if not self.active:
                raise DriveError(f"Permission denied: '{self.file}' is inactive (migrated away)")
            self._inflight += 1
        try:
            if self.cache in _CACHED:
                self._cache_write(offset, mv)
                self._maybe_writeback()
            else:
                os.pwrite(self._fd, mv, offset)
                if self.cache in _SYNC_EACH:
                    os.fdatasync(self._fd)
        finally:
            with self._lock:
                self._inflight -= 1
                self.bytes_written += len(mv)
                if not self._inflight:
                    self._idle.notify_all()

    def _cache_write(self, offset: int, mv: memoryview) -> None:
        sec = self.SECTOR
        first, last = offset // sec, (offset + len(mv) - 1) // sec
        with self._lock:  # partial sectors merge with current contents: one writer at a time
            for s in range(first, last + 1):
                lo, hi = max(offset, s * sec), min(offset + len(mv), (s + 1) * sec)
                if lo == s * sec and hi == (s + 1) * sec:
                    self._dirty[s] = bytes(mv[lo - offset:hi - offset])
                    continue
                cur = self._cached(s)
                buf = bytearray(cur if cur is not None else self._read_file(s * sec, sec))
                buf[lo - s * sec:hi - s * sec] = mv[lo - offset:hi - offset]
                self._dirty[s] = bytes(buf)

    def _maybe_writeback(self) -> None:
        """Keep the cache bounded: past WRITEBACK_LIMIT, flush in the background (one at a time)."""
        with self._lock:
            if len(self._dirty) * self.SECTOR < self.WRITEBACK_LIMIT:
                return
            if self._writeback is not None and not self._writeback.done():
                return
            self._writeback = Future()  # claimed; replaced by the real one below
        self._writeback = self.flush_async()

    def _cached(self, s: int) -> bytes | None:
        """A sector's newest contents not yet known to be on disk (caller holds the lock)."""
        cur = self._dirty.get(s)
        return cur if cur is not None else self._flushing.get(s)

    def _read_file(self, offset: int, n: int) -> bytes:
        data = os.pread(self._fd, n, offset)
        return data + bytes(n - len(data))

    def read(self, offset: int, n: int) -> bytes:
        """What the guest reads: the cache over the file."""
        if offset < 0 or n < 0 or offset + n > self.size:
            raise DriveError(f"read of {n} bytes at {offset} is beyond the end of '{self.file}'")
        out = bytearray(self._read_file(offset, n))
        sec = self.SECTOR
        with self._lock:
            for s in range(offset // sec, (offset + n - 1) // sec + 1 if n else 0):
                cur = self._cached(s)
                if cur is not None:
                    lo, hi = max(offset, s * sec), min(offset + n, (s + 1) * sec)
                    out[lo - offset:hi - offset] = cur[lo - s * sec:hi - s * sec]
        return bytes(out)

    @property
    def dirty_bytes(self) -> int:
        with self._lock:
            return len(self._dirty) * self.SECTOR

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until no write is in flight; False on timeout."""
        with self._lock:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    def flush(self) -> float:
        """Write every dirty sector (coalesced into runs) and fsync; returns the time taken (ms)."""
        t0 = time.monotonic()
        with self._flush_lock:
            with self._lock:
                dirty, self._dirty = self._dirty, {}
                self._flushing = dirty
            try:
                self._write_runs(dirty)
                if self.cache != "unsafe":
                    os.fsync(self._fd)
            except OSError as exc:
                with self._lock:  # keep what failed dirty, newer writes win
                    for s, data in dirty.items():
                        self._dirty.setdefault(s, data)
                    self._flushing = {}
                raise DriveError(f"Could not flush '{self.file}': {exc.strerror}") from exc
            with self._lock:
                self._flushing = {}
                self.flushes += 1
        self.last_flush_ms = (time.monotonic() - t0) * 1000
        return self.last_flush_ms

    def _write_runs(self, dirty: dict[int, bytes]) -> None:
        sectors = sorted(dirty)
        i = 0
        while i < len(sectors):
            j = i
            while j + 1 < len(sectors) and sectors[j + 1] == sectors[j] + 1 and j - i < 255:
                j += 1
            bufs = [dirty[s] for s in sectors[i:j + 1]]
            os.pwritev(self._fd, bufs, sectors[i] * self.SECTOR)
            i = j + 1

    def flush_async(self) -> Future[float]:
        """Flush on a background thread while the guest keeps running."""
        fut: Future[float] = Future()

        def run() -> None:
            try:
                fut.set_result(self.flush())
            except BaseException as exc:  # handed to whoever waits on the future
                fut.set_exception(exc)

        threading.Thread(target=run, name=f"flush:{os.path.basename(self.file)}", daemon=True).start()
        return fut

    def info(self) -> dict[str, object]:
        return {"file": self.file, "cache": self.cache, "size": self.size, "active": self.active,
                "dirty-bytes": self.dirty_bytes, "bytes-written": self.bytes_written,
                "flushes": self.flushes, "last-flush-ms": round(self.last_flush_ms, 3)}

    def close(self) -> None:
        """Flush if active, release the lock and close the file. Idempotent."""
        if self._fd < 0:
            return
        if self.active:
            try:
                self.drain(timeout=5)
                self.flush()
            except DriveError:
                pass
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = -1
        self.active = False
