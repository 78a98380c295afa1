"""The ``ram`` section (QEMU's version 4): every guest page, sent in bulk and loaded in bulk.

Source (``RAMSaver``): a migration bitmap per block, all ones at setup, OR-ed with the guest's dirty
log at every sync. Pages leave in batches: the batch's pages first, then its ZERO records (one packed
array of 9-byte records). Between migd peers (FEATURE_PAGE_RUNS) the pages go as page runs, straight
from guest RAM: a vectored write of each run's 12-byte header (from a small side array) and a view of
the run, no copy. A page the guest writes during its send is dirty and goes again; but while a
checksum digest is kept the bytes hashed must be the bytes sent, so then runs leave from RAM only while
the vCPUs are held paused (``VCPUSet.hold_paused``, once per pass: final pass, paused guest), in batches
of ``RUN_BATCH_PAGES``, over a unix socket as page references (``OutStream.splice_from``; the hold
ends once the peer read them), and through a staging copy while the guest runs. QEMU's PAGE records (other streams) are staged: header and page side by
side in one array, one copy, one system call. Zero detection looks at the first and last word of each page and
fully checks only the candidates. Pages that were never touched on the source (``untouched_pages``)
are zero without being read and go out as ZERO records: the destination cannot be assumed fresh, so
they are never simply skipped (see docs/FORMAT.md).

Destination (``RAMLoader``): runs of consecutive same-kind CONTINUE records are one strided numpy view
(stride 4104 for PAGE, 9 for ZERO) scattered into RAM with one assignment; anything else (names,
QEMU's interleaved order) takes a per-record path. ZERO records for pages known to be zero already
(never touched before ``prefault``) cost nothing. Every page the loader writes is marked in its block's
dirty bitmap (a no-op unless logging): a relay sending the machine on while it arrives resends it.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from migd.bql import BQL
from migd.machine import dirty
from migd.migration.format import (
    MAX_RUN,
    PAGE_RECORD,
    PAGE_SIZE,
    RAM_CONTINUE,
    RAM_EOS,
    RAM_FLAG_MASK,
    RAM_MEM_SIZE,
    RAM_MULTIFD_FLUSH,
    RAM_PAGE,
    RAM_X_MIGD_RUN,
    RAM_XBZRLE,
    RAM_ZERO,
    RUN_HEADER,
    ZERO_RECORD,
    Section,
    idstr_bytes,
    read_idstr,
)
from migd.migration.stats import MigrationStats
from migd.migration.stream import InStream, OutStream, StreamError

BATCH_PAGES = 512  # PAGE records per batch: 2 MiB per system call
SCATTERED = 4  # a batch with more runs than a quarter of its pages is gathered in one numpy call
MIN_DIRECT_RUN = 4  # pages: shorter runs go as staged PAGE records (bench_final_pass.py: 4.8 µs per page, 8.9 from RAM)
RUN_BATCH_PAGES = 4096  # pages per batch of page runs straight from RAM (no staging array to fill)
MULTIFD_BATCH_PAGES = 1024  # pages per batch handed to a multifd channel (two packets of 512)
SCAN_WINDOW = 1 << 16  # bitmap entries examined per search step (and ZERO records per batch, at most)
MAX_WAIT = 0.05  # QEMU's MAX_WAIT: one save_iterate runs at most 50 ms
PERIOD = 1.0  # seconds of a dirty-rate period (QEMU: > 1000 ms)
MAX_NEW_BLOCK = 64 << 30  # largest block a stream may create on the destination (hot-plug)

_ZREC = np.dtype([("h", ">u8"), ("z", "u1")])  # packed: 9 bytes
_RUN = np.dtype([("h", ">u8"), ("n", ">u4")])  # [migd] packed: 12 bytes
_EOS = RAM_EOS.to_bytes(8, "big")
_MULTIFD_FLUSH = RAM_MULTIFD_FLUSH.to_bytes(8, "big")
_ADDR_MASK = np.uint64(~RAM_FLAG_MASK & 0xFFFFFFFFFFFFFFFF)
_FLAG_MASK = np.uint64(RAM_FLAG_MASK)
_STEPS = np.arange(1 << 16, dtype=np.uint64) * np.uint64(PAGE_SIZE)  # headers of consecutive pages


def _never() -> bool:
    return False


class RAMError(RuntimeError):
    """The guest's RAM layout changed in a way a running migration cannot follow."""


def _contiguous(idx: np.ndarray) -> bool:
    """Whether sorted distinct page indices fill one range (batches are sorted and distinct)."""
    return bool(idx.size) and int(idx[-1]) - int(idx[0]) + 1 == idx.size


def _run_breaks(idx: np.ndarray) -> np.ndarray:
    """Positions in sorted page indices where a new run of consecutive pages starts (the first excepted)."""
    return np.flatnonzero(np.diff(idx) != 1) + 1


def _run_count(idx: np.ndarray) -> int:
    """How many runs of consecutive pages these sorted page indices form (no list built)."""
    return _run_breaks(idx).size + 1 if idx.size else 0


def _runs(idx: np.ndarray) -> list[tuple[int, int, int]]:
    """Split sorted page indices into contiguous runs: (first page, end page, position in idx)."""
    if idx.size == 0:
        return []
    if _contiguous(idx):
        return [(int(idx[0]), int(idx[-1]) + 1, 0)]
    breaks = _run_breaks(idx)
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [idx.size]))
    return [(int(idx[s]), int(idx[e - 1]) + 1, int(s)) for s, e in zip(starts, ends, strict=True)]


# -- source -----------------------------------------------------------------------------------------


@dataclass
class _Tracked:
    """One block as the migration sees it: what is left to send, and what is known zero unread."""

    block: Any  # migd.machine.ram.RAMBlock
    bmap: np.ndarray  # bool per page: still to send
    hint: np.ndarray | None  # bool per page: untouched at setup and not sent yet


class PageSink(Protocol):
    """Where pages go instead of the main stream with multifd (``multifd.MultifdSender``)."""

    def queue(self, block: Any, candidates: np.ndarray, zero: np.ndarray) -> None: ...

    def sync(self, wait: bool = False) -> None: ...

    def collect(self) -> tuple[int, int, int]: ...

    @property
    def missed_zero_copy(self) -> int: ...


class RAMSaver:
    """The source side of the ``ram`` section. Used by one thread (the migration thread)."""

    def __init__(self, ramlist: Any, stats: MigrationStats, *, batch_pages: int = BATCH_PAGES) -> None:
        self.ramlist = ramlist
        self.stats = stats
        self.batch_pages = batch_pages
        self.guest_running = True  # the caller says whether RAM bytes count as precopy or downtime
        self._tracked: list[_Tracked] = []
        self._last_version = -1
        self._pos_block = 0
        self._pos_page = 0
        self._last_sent: str | None = None  # block of the last record (CONTINUE after it)
        self._stage = np.empty((batch_pages, PAGE_RECORD), dtype=np.uint8)
        # [migd] page-run headers of a batch
        self._run_headers = np.empty(max(batch_pages, RUN_BATCH_PAGES), dtype=_RUN)
        # [migd] whether the destination accepted FEATURE_PAGE_RUNS (the migration thread sets it)
        self.page_runs: Callable[[], bool] = _never
        self.vcpus: Any = None  # the guest's VCPUSet: held paused while pages leave straight from RAM
        self._logging = False
        self.pages_out: PageSink | None = None  # multifd: pages go to the channels
        # s spent staging page runs that a final pass sends straight from RAM (the guest running with
        # a digest kept): work of live rounds only, which the policy leaves out of the final pass's cost
        self.live_copy_s = 0.0
        self.runs_sent = 0  # runs of consecutive data pages sent: a page's cost depends on its neighbours

    # -- setup ------------------------------------------------------------------------------

    def save_setup(self, f: OutStream) -> None:
        """Dirty logging on, every page to send, block list, first sync, EOS."""
        dirty.log_start(self.ramlist)
        self._logging = True
        with self.ramlist.lock:
            self._last_version = self.ramlist.version
            blocks = self.ramlist.blocks()
        self._tracked = [self._track(b) for b in blocks]
        self.stats.page_size = PAGE_SIZE
        self.stats.total = sum(b.size for b in blocks)
        self.stats.dirty_pages = sum(b.npages for b in blocks)
        self._put_mem_size(f, blocks)
        self.sync()
        self._put_ram(f, _EOS)

    def _track(self, block: Any) -> _Tracked:
        # after log_start: a page written after this mincore snapshot is in the dirty log, so sending
        # it as zero now is corrected by a later pass
        hint = block.untouched_pages()
        if hint is not None and not hint.any():
            hint = None
        return _Tracked(block, np.ones(block.npages, dtype=bool), hint)

    def _put_mem_size(self, f: OutStream, blocks: list[Any]) -> None:
        total = sum(b.size for b in blocks)
        parts = [(total | RAM_MEM_SIZE).to_bytes(8, "big")]
        for b in blocks:
            parts.append(idstr_bytes(b.name) + b.size.to_bytes(8, "big"))
        self._put_ram(f, b"".join(parts))

    def _put_ram(self, f: OutStream, data: bytes) -> None:
        f.put(data)
        self.stats.count_ram_bytes(len(data), self.guest_running)

    # -- dirty bitmap sync --------------------------------------------------------------------

    def sync(self) -> None:
        """QEMU's migration_bitmap_sync: pull the dirty log into the migration bitmap."""
        st = self.stats
        st.dirty_sync_count += 1
        now = time.monotonic()
        if not st.period_start:
            st.period_start = now
        with BQL:
            taken = dirty.sync(self.ramlist)
        added = 0
        for t in self._tracked:
            d = taken.get(t.block.name)
            if d is None or d.shape != t.bmap.shape:
                continue
            added += int(np.count_nonzero(d & ~t.bmap))
            np.logical_or(t.bmap, d, out=t.bmap)
            if t.hint is not None:  # written since the untouched snapshot: no longer known zero
                np.logical_and(t.hint, ~d, out=t.hint)
        st.dirty_pages += added
        st.period_dirty_pages += added
        elapsed = now - st.period_start
        if elapsed > PERIOD:
            st.dirty_pages_rate = int(st.period_dirty_pages / elapsed)
            st.period_start = now
            st.period_dirty_pages = 0
        for hook in list(st.on_sync):
            hook(st)

    def pending_estimate(self) -> int:
        return self.stats.dirty_pages * PAGE_SIZE

    def dirty_layout(self, min_pages: int) -> tuple[int, float]:
        """(migration thread) How the dirty pages lie: the number of runs of consecutive dirty pages
        (what a pass costs beyond its bytes), and the share of the pages in runs of at least
        ``min_pages`` (of a final pass by page references, what leaves as references; the rest is
        copied). One numpy pass over the bitmaps (0.3-1.2 ms for 512 MiB)."""
        total = long = runs = 0
        for t in self._tracked:
            edges = np.flatnonzero(np.diff(t.bmap, prepend=False, append=False))
            lengths = edges[1::2] - edges[::2]  # each run starts at an even edge and ends at the next
            runs += lengths.size
            total += int(lengths.sum())
            long += int(lengths[lengths >= min_pages].sum())
        return runs, long / total if total else 0.0

    def pending_exact(self) -> int:
        self.sync()
        return self.pending_estimate()

    def unsynced_bytes(self) -> int:
        """Bytes the guest dirtied since the last sync, as the dirty log shows them (a peek, no take)."""
        return dirty.dirty_pages(self.ramlist) * PAGE_SIZE if self._logging else 0

    # -- iterate / complete ---------------------------------------------------------------------

    def save_iterate(self, f: OutStream) -> bool:
        """Send dirty pages until the rate limit or 50 ms; EOS. True when nothing is left to send."""
        self._follow_ramlist(f)
        done = self._send(f, deadline=time.monotonic() + MAX_WAIT, limited=True)
        self._multifd_sync(f, wait=False)
        self._put_ram(f, _EOS)
        f.flush()
        return done

    def save_complete(self, f: OutStream) -> None:
        """Final sync and everything that is left, ignoring the rate limit; EOS."""
        self._follow_ramlist(f)
        self.sync()
        self._send(f, deadline=None, limited=False)
        self._multifd_sync(f, wait=True)
        self._put_ram(f, _EOS)
        f.flush()

    def cleanup(self) -> None:
        if self._logging:
            dirty.log_stop(self.ramlist)
            self._logging = False
        self._tracked = []

    # -- RAM hot-plug -----------------------------------------------------------------------------

    def _follow_ramlist(self, f: OutStream) -> None:
        """On a new RAMList version: fail on removal/resize, announce new blocks, restart the scan."""
        if self.ramlist.version == self._last_version:
            return
        with self.ramlist.lock:
            version = self.ramlist.version
            blocks = {b.name: b for b in self.ramlist.blocks()}
        for t in self._tracked:
            now = blocks.get(t.block.name)
            if now is None:
                raise RAMError(f"RAM block '{t.block.name}' removed during migration")
            if now is not t.block:
                raise RAMError(f"RAM block '{t.block.name}' resized during precopy.")
        known = {t.block.name for t in self._tracked}
        new = [b for name, b in blocks.items() if name not in known]
        if new:
            self._put_mem_size(f, new)
            for b in new:
                t = self._track(b)
                self._tracked.append(t)
                self.stats.dirty_pages += b.npages
                self.stats.total += b.size
        self._last_version = version
        self._pos_block = self._pos_page = 0
        self._last_sent = None

    # -- the page loop ----------------------------------------------------------------------------

    def _send(self, f: OutStream, deadline: float | None, limited: bool) -> bool:
        """Send batches; True when no dirty page is left, False when stopped by budget or time.

        (migration thread) Page runs straight from RAM with a digest kept need the vCPUs held paused:
        one hold for the whole call (at most ``MAX_WAIT`` when rate limited, the final pass otherwise),
        not one per batch, whose release woke every paused vCPU thread each time."""
        held = self._hold(f)
        try:
            direct = self.pages_out is None and self.page_runs() and (held or not f.hashing)
            while True:
                if limited and f.rate_limit_exceeded():
                    return self.stats.dirty_pages == 0
                limit = RUN_BATCH_PAGES if direct else self.batch_pages
                if self.pages_out is not None:  # multifd: fewer, larger hand-overs to the channels
                    limit = MULTIFD_BATCH_PAGES
                max_bytes = None
                if limited:
                    budget = f.rate_budget()
                    if budget is not None:
                        limit = max(1, min(limit, budget // PAGE_RECORD + 1))
                        max_bytes = budget + 1  # one record over the budget ends the window
                found = self._next_batch(limit, max_bytes)
                if found is None:
                    return True
                self._emit(f, *found, held=held)
                if deadline is not None and time.monotonic() >= deadline:
                    return self.stats.dirty_pages == 0
        finally:
            if held:
                assert self.vcpus is not None
                try:
                    f.settle()  # pages that left as references are read before the guest may run
                finally:
                    self.vcpus.release_hold()

    def _hold(self, f: OutStream) -> bool:
        """Hold the vCPUs paused if page runs may leave straight from RAM with a digest kept; False
        (nothing held) when they need no hold or some vCPU runs (runs are staged then)."""
        if self.pages_out is not None or not f.hashing or self.vcpus is None or not self.page_runs():
            return False
        return bool(self.vcpus.hold_paused())

    def _next_batch(self, limit: int, max_bytes: int | None = None) -> tuple[_Tracked, np.ndarray] | None:
        """The next dirty pages from where the scan stopped (at most ``limit`` to read), cleared."""
        if self.stats.dirty_pages <= 0 or not self._tracked:
            return None
        n = len(self._tracked)
        for _ in range(n + 1):
            if self._pos_block >= n:
                self._pos_block, self._pos_page = 0, 0
            t = self._tracked[self._pos_block]
            p = self._pos_page
            npages = t.bmap.size
            # bitmap entries examined for this batch, with the untouched-page hint too: a few times
            # what it may take, not SCAN_WINDOW each time (a window costs its length in every numpy
            # call below, ~1 ms for 65536 entries: three budget-sized batches per window under a
            # 32 MiB/s cap spent ~0.9 ns/B there)
            window = min(SCAN_WINDOW, max(4 * limit, 4096))
            while p < npages:
                end = min(npages, p + window)
                found = np.flatnonzero(t.bmap[p:end])
                if found.size:
                    idx = found + p
                    if t.hint is not None:
                        known = t.hint[idx]
                        cut = int(np.searchsorted(np.cumsum(~known), limit, side="right"))
                        if max_bytes is not None:  # untouched pages cost a 9-byte record each
                            cost = np.cumsum(np.where(known, ZERO_RECORD, PAGE_RECORD))
                            cut = min(cut, int(np.searchsorted(cost, max_bytes, side="right")))
                        cut = max(1, cut)
                    else:
                        cut = limit
                    idx = idx[:cut]
                    t.bmap[idx[0] : idx[-1] + 1] = False  # exactly the set bits in that range
                    self._pos_page = int(idx[-1]) + 1
                    return t, idx
                p = end
            self._pos_block += 1
            self._pos_page = 0
        self.stats.dirty_pages = 0  # a full circle found nothing: the count agrees with the bitmaps
        return None

    def _multifd_sync(self, f: OutStream, wait: bool) -> None:
        """A sync point: SYNC on every channel, MULTIFD_FLUSH on the main one; counters folded in."""
        if self.pages_out is not None:
            self.pages_out.sync(wait)
            self._put_ram(f, _MULTIFD_FLUSH)
            self._fold_multifd(f)

    def _fold_multifd(self, f: OutStream) -> None:
        """What the channel threads wrote, into the counters this thread owns (one writer each)."""
        assert self.pages_out is not None
        normal, zero, nbytes = self.pages_out.collect()
        self.stats.normal += normal
        self.stats.duplicate += zero
        self.stats.count_ram_bytes(nbytes, self.guest_running)
        self.stats.multifd_bytes += nbytes
        self.stats.dirty_sync_missed_zero_copy = self.pages_out.missed_zero_copy
        f.transferred += nbytes  # QEMU's transferred includes the multifd bytes

    def _emit(self, f: OutStream, t: _Tracked, idx: np.ndarray, *, held: bool = False) -> None:
        """One batch of one block: its PAGE records, then its ZERO records; ``held``: the vCPUs are
        held paused, so page runs may leave straight from RAM with a digest kept."""
        block = t.block
        if self.pages_out is not None:  # multifd: zero detection happens on the channel threads
            known = t.hint[idx] if t.hint is not None else None
            if t.hint is not None and known is not None and known.any():
                t.hint[idx[known]] = False
                self.pages_out.queue(block, idx[~known], idx[known])
            else:
                self.pages_out.queue(block, idx, idx[:0])
            self.stats.dirty_pages -= idx.size
            self._fold_multifd(f)
            return
        if t.hint is not None:
            known = t.hint[idx]
            zero_known = idx[known]
            rest = idx[~known]
            if zero_known.size:
                t.hint[zero_known] = False
        else:
            zero_known = idx[:0]
            rest = idx
        is_zero = _zero_pages(block.words, rest)
        page_idx = rest[~is_zero]
        zero_idx = np.concatenate((zero_known, rest[is_zero])) if zero_known.size else rest[is_zero]

        nbytes = 0
        if self._last_sent != block.name:  # the first record names the block
            if page_idx.size:
                first, page_idx = int(page_idx[0]), page_idx[1:]
                f.put(((first * PAGE_SIZE) | RAM_PAGE).to_bytes(8, "big") + idstr_bytes(block.name))
                f.put(block.pages[first].tobytes())
                self.stats.normal += 1
                nbytes += PAGE_SIZE
            else:
                first, zero_idx = int(zero_idx[0]), zero_idx[1:]
                f.put(((first * PAGE_SIZE) | RAM_ZERO).to_bytes(8, "big") + idstr_bytes(block.name) + b"\0")
                self.stats.duplicate += 1
                nbytes += 1
            nbytes += 8 + 1 + len(block.name.encode())
            self._last_sent = block.name
            self.stats.dirty_pages -= 1

        n = page_idx.size
        if n:
            self.runs_sent += _run_count(page_idx)
        if n and self.page_runs():
            # straight from guest RAM: a page the guest writes meanwhile is dirty and goes again (no
            # digest kept), or the guest is held paused (digest kept, ``_send``); else a copy. Pages
            # of short runs go as PAGE records through the staging array: two views per page cost
            # more than copying it (a final pass of scattered pages)
            direct = held or not f.hashing
            short = _short_run_pages(page_idx, MIN_DIRECT_RUN) if direct and MIN_DIRECT_RUN > 1 else None
            if short is not None and short.any():
                staged = page_idx[short]
                for lo in range(0, staged.size, self.batch_pages):
                    nbytes += self._put_pages(f, block, staged[lo : lo + self.batch_pages])
                    f.flush()  # the staging array is written by reference: sent before it is reused
                page_idx = page_idx[~short]
            if page_idx.size:
                nbytes += self._put_runs(f, block, page_idx, direct)
        elif n:
            nbytes += self._put_pages(f, block, page_idx)
        self.stats.normal += n
        self._emit_zero(f, zero_idx)
        self.stats.dirty_pages -= n + zero_idx.size
        self.stats.count_ram_bytes(nbytes + zero_idx.size * ZERO_RECORD, self.guest_running)
        f.flush()  # the staging/header arrays are reused by the next batch

    def _put_pages(self, f: OutStream, block: Any, page_idx: np.ndarray) -> int:
        """QEMU's PAGE records (header, page) for these pages, through the staging array: two views
        per page straight from RAM cost more in Python than this one copy (bench_pageloop --modes)."""
        n = page_idx.size
        stage = self._stage[:n]
        stage[:, :8].view(">u8")[:, 0] = (page_idx.astype(np.uint64) << np.uint64(12)) | np.uint64(
            RAM_PAGE | RAM_CONTINUE)
        if _run_count(page_idx) * SCATTERED > n:  # scattered pages: one gather, not a slice per run
            stage[:, 8:] = block.pages[page_idx]
        else:
            for a, b, pos in _runs(page_idx):
                stage[pos : pos + (b - a), 8:] = block.pages[a:b]
        f.put_nocopy(stage.reshape(-1))
        return n * PAGE_RECORD

    def _put_runs(self, f: OutStream, block: Any, page_idx: np.ndarray, direct: bool) -> int:
        """[migd] One RAM_X_MIGD_RUN record per run of consecutive pages (FEATURE_PAGE_RUNS): its
        12-byte header from a side array, then the run itself, from RAM when ``direct``, else staged."""
        runs = _runs(page_idx)
        hdr = self._run_headers[: len(runs)]
        hdr["h"] = [(a * PAGE_SIZE) | RAM_X_MIGD_RUN | RAM_CONTINUE for a, _, _ in runs]
        hdr["n"] = [b - a for a, b, _ in runs]
        hv = hdr.view(np.uint8).data
        if direct:
            f.splice_from(block.buf)  # unix socket: page references, no copy (settled in _send)
            ram = block.buf.data
        else:
            t0 = time.monotonic()
            staged = self._stage.reshape(-1)[: page_idx.size * PAGE_SIZE].reshape(-1, PAGE_SIZE)
            for a, b, pos in runs:
                staged[pos : pos + (b - a)] = block.pages[a:b]
            ram = staged.reshape(-1).data
            # a final pass stages the pages of short runs too (``_emit``): only the rest is live work
            long_pages = sum(b - a for a, b, _ in runs if b - a >= MIN_DIRECT_RUN)
            self.live_copy_s += (time.monotonic() - t0) * long_pages / page_idx.size
        views: list[memoryview] = []
        for i, (a, b, pos) in enumerate(runs):
            src = (a if direct else pos) * PAGE_SIZE
            views += (hv[i * RUN_HEADER : (i + 1) * RUN_HEADER], ram[src : src + (b - a) * PAGE_SIZE])
        f.put_iov(views)
        return len(runs) * RUN_HEADER + page_idx.size * PAGE_SIZE

    def _emit_zero(self, f: OutStream, zero_idx: np.ndarray) -> None:
        """The batch's ZERO records, one packed array."""
        m = zero_idx.size
        if m:
            z = np.zeros(m, dtype=_ZREC)
            z["h"] = (zero_idx.astype(np.uint64) << np.uint64(12)) | np.uint64(RAM_ZERO | RAM_CONTINUE)
            f.put_nocopy(z.view(np.uint8))
            self.stats.duplicate += m


def _short_run_pages(idx: np.ndarray, min_run: int) -> np.ndarray:
    """Which of these sorted page indices lie in runs of consecutive pages shorter than ``min_run``."""
    bounds = np.concatenate(([0], _run_breaks(idx), [idx.size]))
    lengths = np.diff(bounds)
    return np.repeat(lengths < min_run, lengths)


def _zero_pages(words: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Which of these pages are all zero: first/last word as a filter, a full check on candidates."""
    if idx.size == 0:
        return np.zeros(0, dtype=bool)
    if _contiguous(idx):  # one run: slices, no gather
        w = words[int(idx[0]) : int(idx[-1]) + 1]
        cand = (w[:, 0] == 0) & (w[:, -1] == 0)
    else:
        cand = (words[idx, 0] == 0) & (words[idx, -1] == 0)
    out = np.zeros(idx.size, dtype=bool)
    pos = np.flatnonzero(cand)
    if pos.size:
        ci = idx[pos]
        for a, b, p in _runs(ci):
            out[pos[p : p + (b - a)]] = ~words[a:b].any(axis=1)
    return out


# -- destination -----------------------------------------------------------------------------------

_zero_hints: weakref.WeakKeyDictionary[Any, np.ndarray] = weakref.WeakKeyDictionary()


def prefault(ramlist: Any) -> threading.Thread:
    """Fault the destination's RAM in (QEMU's -mem-prealloc) on a background thread, having first
    noted which pages were untouched (hence zero), so that ZERO records for them need no write.

    The noting is done here, before any stream byte is loaded; the faulting runs alongside the
    accept and the load (it never changes contents), so a migration arriving at once does not wait.
    """
    blocks = ramlist.blocks()
    for block in blocks:
        hint = block.untouched_pages()
        if hint is not None:
            _zero_hints[block] = hint

    def populate_all() -> None:
        for block in blocks:
            try:
                block.populate()
            except (OSError, ValueError):  # unmapped meanwhile (shutdown): nothing left to do
                return

    thread = threading.Thread(target=populate_all, name="mig/dst/prefault", daemon=True)
    thread.start()
    return thread


def known_zero_map(cache: dict[str, np.ndarray | None], block: Any) -> np.ndarray | None:
    """Pages of ``block`` known to be zero on this destination (untouched before ``prefault``, or
    zeroed since), kept in ``cache`` per block name; None when that cannot be known. A ZERO record for
    such a page costs neither a read nor a write."""
    if block.name not in cache:
        hint = _zero_hints.pop(block, None)
        if hint is None:
            hint = block.untouched_pages()
        cache[block.name] = None if hint is None else hint.copy()
    return cache[block.name]


class RAMLoader:
    """The destination side of the ``ram`` section; one instance per incoming stream."""

    BULK_MAX = {RAM_PAGE: 1024, RAM_ZERO: 1 << 16}  # records examined per run search, at most
    CREATE_ON_START = False  # a START's block list must name our blocks (a foreign machine's creates them)

    def __init__(self, ramlist: Any) -> None:
        self.ramlist = ramlist
        self._block: Any = None  # block of the previous page record (target of CONTINUE)
        self._known_zero: dict[str, np.ndarray | None] = {}
        self._look = {RAM_PAGE: 64, RAM_ZERO: 512}
        self._slow = 0  # records to take the per-record path before trying bulk again
        self.pages = 0
        self.zero_pages = 0
        self.on_flush: Callable[[], None] | None = None  # multifd: wait for the channels at a sync point
        self.page_runs = False  # [migd] the source announced FEATURE_PAGE_RUNS: run records are valid

    def _zero_map(self, block: Any) -> np.ndarray | None:
        return known_zero_map(self._known_zero, block)

    def load(self, f: InStream, section_type: int, version_id: int = 4) -> None:
        """Read records of one START/PART/END section up to and including its EOS."""
        if version_id != 4:
            raise StreamError(f"ram_load: version {version_id} not supported")
        while True:
            mv = f.peek(8)
            hdr = int.from_bytes(mv[:8], "big")
            flags = hdr & RAM_FLAG_MASK
            addr = hdr & ~RAM_FLAG_MASK
            kind = flags & ~RAM_CONTINUE
            if kind == RAM_PAGE or kind == RAM_ZERO:
                if flags & RAM_CONTINUE:
                    block = self._block
                    if block is None:
                        raise StreamError("Ack, bad migration stream!")
                    rec = PAGE_RECORD if kind == RAM_PAGE else ZERO_RECORD
                    if self._slow:
                        self._slow -= 1
                    elif len(mv) >= 2 * rec:
                        self._bulk(f, mv, block, kind)
                        continue
                    f.skip(8)
                else:
                    f.skip(8)
                    block = self._read_block(f)
                self._one(f, block, kind, addr)
            elif kind == RAM_X_MIGD_RUN and self.page_runs and flags & RAM_CONTINUE:
                f.skip(8)
                self._run(f, addr)
            elif kind == RAM_EOS:
                f.skip(8)
                return
            elif kind == RAM_MEM_SIZE:
                f.skip(8)
                self._mem_size(f, addr, section_type)
            elif kind == RAM_MULTIFD_FLUSH:
                f.skip(8)  # a sync point: every multifd channel's pages of this round are applied first
                if self.on_flush is not None:
                    self.on_flush()
            elif kind & RAM_XBZRLE:
                raise StreamError(f"XBZRLE pages are not supported by migd (flags 0x{flags:x})")
            else:
                raise StreamError(f"Unknown combination of migration flags: 0x{flags:x}")

    def _read_block(self, f: InStream) -> Any:
        name = read_idstr(f)
        block = self.ramlist.get(name)
        if block is None:
            raise StreamError(f"Can't find block {name}")
        self._block = block
        return block

    def _one(self, f: InStream, block: Any, kind: int, addr: int) -> None:
        if addr >= block.size:
            raise StreamError(f"Illegal RAM offset {addr:x}")
        i = addr // PAGE_SIZE
        kz = self._zero_map(block)
        if kind == RAM_PAGE:
            f.read_into(block.pages[i])
            block.mark_dirty(i)  # a relay's outgoing migration resends it (no-op unless logging)
            if kz is not None:
                kz[i] = False
            self.pages += 1
        else:
            value = f.get_u8()
            if value:
                raise StreamError(f"Found a zero page with value {value}")
            if kz is None or not kz[i]:
                block.pages[i] = 0
                block.mark_dirty(i)
                if kz is not None:
                    kz[i] = True
            self.zero_pages += 1

    def _run(self, f: InStream, addr: int) -> None:
        """[migd] A RAM_X_MIGD_RUN record: the count, then its pages read straight into guest RAM (the
        range is checked first, so a bad record writes nothing)."""
        block = self._block
        if block is None:
            raise StreamError("Ack, bad migration stream!")
        n = f.get_be32()
        if not 1 <= n <= MAX_RUN:
            raise StreamError(f"Invalid page run of {n} pages at RAM offset {addr:x}")
        if addr + n * PAGE_SIZE > block.size:
            raise StreamError(f"Illegal RAM offset {max(addr, block.size):x}")
        start = addr // PAGE_SIZE
        f.read_into(block.buf[addr : addr + n * PAGE_SIZE].data)
        block.mark_dirty(slice(start, start + n))  # a relay's outgoing migration resends them
        kz = self._zero_map(block)
        if kz is not None:
            kz[start : start + n] = False
        self.pages += n

    def _bulk(self, f: InStream, mv: memoryview, block: Any, kind: int) -> None:
        """A run of same-kind CONTINUE records in the buffer: validate and scatter it at once.

        The common case, consecutive pages, is found with one comparison against the headers such a
        run must have; otherwise the run of same-kind records is scattered with fancy indexing.
        """
        rec = PAGE_RECORD if kind == RAM_PAGE else ZERO_RECORD
        avail = len(mv) // rec
        look = min(avail, self._look[kind])
        arr = np.frombuffer(mv, dtype=np.uint8, count=look * rec).reshape(look, rec)
        hdr = arr[:, :8].view(">u8")[:, 0]
        first = int(hdr[0])
        mismatch = np.flatnonzero(hdr != _STEPS[:look] + np.uint64(first))
        n = int(mismatch[0]) if mismatch.size else look
        same_kind = n
        if n < look:  # a short run of consecutive pages may be the first of many scattered records
            same = np.flatnonzero((hdr & _FLAG_MASK) != np.uint64(kind | RAM_CONTINUE))
            same_kind = int(same[0]) if same.size else look
        if n >= 2 and 2 * n >= same_kind:
            start = (first & ~RAM_FLAG_MASK) // PAGE_SIZE
            if (start + n) * PAGE_SIZE > block.size:
                bad = max(start, block.size // PAGE_SIZE)
                raise StreamError(f"Illegal RAM offset {bad * PAGE_SIZE:x}")
            idx: np.ndarray | slice = slice(start, start + n)
        else:
            n = same_kind
            addrs = hdr[:n] & _ADDR_MASK
            over = np.flatnonzero(addrs >= np.uint64(block.size))
            if over.size:
                raise StreamError(f"Illegal RAM offset {int(addrs[over[0]]):x}")
            idx = (addrs >> np.uint64(12)).astype(np.intp)
        # adapt how far to look: grow while runs fill the window, shrink when they are short
        if n == look and look < avail:
            self._look[kind] = min(self.BULK_MAX[kind], look * 2)
        elif n < look // 4:
            self._look[kind] = max(4, look // 2)
        if n < 4:
            self._slow = 32  # short runs (QEMU's interleaved order): walk records one by one a while
        kz = self._zero_map(block)
        if kind == RAM_PAGE:
            block.pages[idx] = arr[:n, 8:]
            block.mark_dirty(idx)
            if kz is not None:
                kz[idx] = False
            self.pages += n
        else:
            zb = arr[:n, 8]
            nz = np.flatnonzero(zb)
            if nz.size:
                raise StreamError(f"Found a zero page with value {int(zb[nz[0]])}")
            if kz is None:
                block.pages[idx] = 0
                block.mark_dirty(idx)
            else:
                if isinstance(idx, slice):
                    need = np.flatnonzero(~kz[idx]) + idx.start
                else:
                    need = idx[~kz[idx]]
                if need.size:
                    block.pages[need] = 0
                    block.mark_dirty(need)
                    kz[need] = True
            self.zero_pages += n
        del arr, hdr
        f.skip(n * rec)

    def _mem_size(self, f: InStream, total: int, section_type: int) -> None:
        """The block list: check it against ours (START), or create hot-plugged blocks (PART/END)."""
        remaining = total
        while remaining > 0:
            name = read_idstr(f)
            length = f.get_be64()
            if length == 0 or length % PAGE_SIZE or length > remaining:
                raise StreamError(f"Invalid length 0x{length:x} of RAM block \"{name}\" in the block list")
            block = self.ramlist.get(name)
            if block is None:
                if section_type == Section.START and not self.CREATE_ON_START:
                    raise StreamError(f'Unknown ramblock "{name}", cannot accept migration')
                self._create(name, length)
            elif block.size != length:
                raise StreamError(f"Length mismatch: {name}: 0x{length:x} in != 0x{block.size:x}")
            remaining -= length

    def _create(self, name: str, length: int) -> None:
        """migd extension: a block hot-plugged on the source during the migration appears here too."""
        if length > MAX_NEW_BLOCK:
            raise StreamError(f"RAM block \"{name}\" of 0x{length:x} bytes is too large to create")
        try:
            block = self.ramlist.add(name, length)
        except (ValueError, OSError) as exc:
            raise StreamError(f'Cannot create RAM block "{name}": {exc}') from None
        self._known_zero[name] = block.untouched_pages()
