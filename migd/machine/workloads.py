"""What the vCPUs run: ``idle``, ``random``, ``counter``, optionally with ``disk-rate``.

Spec grammar (``--workload`` and ``x-migd-workload-set``): comma-separated, an optional kind first,
then ``key=value`` options with sizes and rates in migd's size grammar (``migd.units``: a bare
number is bytes, binary K/M/G/T/P/E suffixes, ``1.5M`` and ``64MiB`` too):

    idle                                  writes nothing (the default)
    random[,rate=64M][,wss=SIZE][,seed=N] whole pages of non-zero random bytes at ``rate`` bytes/s
                                          (the machine's total, shared by its vCPUs) to pages drawn
                                          uniformly from the first ``wss`` bytes of ram0
           [,compress=R]                  the last R (0 <= R < 1) of each page one repeated byte, so
                                          a compressor shrinks pages by about that fraction
    counter[,rate=4M]                     a deterministic guest keeping a counter and checksum in RAM
    disk-rate=R                           combinable with any of them: R bytes/s to the drives

Pages are written in batches (one numpy assignment per batch, few batches per slice) and marked dirty
after the data, so the migration thread is not starved of the GIL. Rates are paced against the vCPU's
*run* time, so throttling really lowers the dirty rate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from migd.machine.vcpu import SLICE
from migd.units import PAGE_SIZE, SizeError, format_size, parse_size

if TYPE_CHECKING:
    from migd.machine.block import Drive
    from migd.machine.ram import RAMBlock
    from migd.machine.vcpu import VCPU

KINDS = ("idle", "random", "counter")
SPEC_MAX = 128  # bytes; the spec travels in a fixed-size vmstate buffer
POOL_PAGES = 1024  # random source pages shared by the vCPUs (4 MiB)
MAX_BATCH = 1024  # pages per numpy assignment
CATCH_UP = 0.1  # seconds of backlog a lagging vCPU may catch up; older debt is forgiven
COUNTER_AREA = 64  # pages per vCPU for the counter guest: one header page + a trail
COUNTER_MAGIC = 0x4D49474443544552  # "MIGDCTER"
_U64 = (1 << 64) - 1
_PATTERN = (np.arange(512, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))


class WorkloadError(ValueError):
    """A spec that cannot be parsed or cannot run on this machine."""


def _size(text: str, what: str) -> int:
    """Option ``what`` of a spec in bytes (a bare number is bytes); WorkloadError names the option."""
    try:
        return parse_size(text)
    except SizeError as exc:
        raise WorkloadError(f"workload: invalid {what} '{text}' ({exc.reason})") from None


@dataclass(frozen=True)
class WorkloadSpec:
    kind: str = "idle"
    rate: int = 0  # bytes/s for the whole machine
    wss: int | None = None  # bytes; None = all of ram0
    seed: int = 0
    disk_rate: int = 0
    compress: float = 0.0  # random: fraction of each page that compresses away

    def __str__(self) -> str:
        parts = [self.kind]
        if self.kind == "random":
            parts.append(f"rate={format_size(self.rate)}")
            if self.wss is not None:
                parts.append(f"wss={format_size(self.wss)}")
            parts.append(f"seed={self.seed}")
            if self.compress:
                parts.append(f"compress={self.compress:g}")
        elif self.kind == "counter":
            parts.append(f"rate={format_size(self.rate)}")
        if self.disk_rate:
            parts.append(f"disk-rate={format_size(self.disk_rate)}")
        return ",".join(parts)


_DEFAULT_RATE = {"idle": 0, "random": 64 << 20, "counter": 4 << 20}
_OPTIONS = {"random": {"rate", "wss", "seed", "compress"}, "counter": {"rate"}, "idle": set()}


def parse_workload(text: str) -> WorkloadSpec:
    """Parse a spec string; WorkloadError names what is wrong."""
    if len(text.encode()) > SPEC_MAX:
        raise WorkloadError(f"workload: spec longer than {SPEC_MAX} bytes")
    items = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in items):
        raise WorkloadError(f"workload: empty item in '{text}'")
    kind = "idle"
    if "=" not in items[0]:
        kind = items.pop(0)
        if kind not in KINDS:
            raise WorkloadError(f"workload: unknown kind '{kind}' (expected idle, random or counter)")
    opts: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise WorkloadError(f"workload: '{item}' must be key=value (the kind goes first)")
        if key in opts:
            raise WorkloadError(f"workload: '{key}' given twice")
        if key != "disk-rate" and key not in _OPTIONS[kind]:
            allowed = sorted(_OPTIONS[kind] | {"disk-rate"})
            raise WorkloadError(f"workload: unknown option '{key}' for '{kind}' (allowed: {', '.join(allowed)})")
        opts[key] = value.strip()
    spec = WorkloadSpec(kind=kind, rate=_DEFAULT_RATE[kind])
    if "rate" in opts:
        spec = replace(spec, rate=_size(opts["rate"], "rate"))
        if spec.rate <= 0:
            raise WorkloadError("workload: rate must be positive")
    if "wss" in opts:
        wss = _size(opts["wss"], "wss")
        if wss <= 0 or wss % PAGE_SIZE:
            raise WorkloadError(f"workload: wss {wss} must be a positive multiple of {PAGE_SIZE}")
        spec = replace(spec, wss=wss)
    if "seed" in opts:
        if not opts["seed"].isdigit() or int(opts["seed"]) > _U64:
            raise WorkloadError(f"workload: invalid seed '{opts['seed']}' (expected an unsigned 64-bit integer)")
        spec = replace(spec, seed=int(opts["seed"]))
    if "compress" in opts:
        try:
            ratio = float(opts["compress"])
        except ValueError:
            ratio = -1.0
        if not 0 <= ratio < 1:
            raise WorkloadError(f"workload: invalid compress '{opts['compress']}' (expected a fraction, 0 <= R < 1)")
        spec = replace(spec, compress=ratio)
    if "disk-rate" in opts:
        spec = replace(spec, disk_rate=_size(opts["disk-rate"], "disk-rate"))
    return spec


@dataclass
class VCPUWork:
    """Per-vCPU workload state: the part that is device state and survives a migration."""

    seq: int = 0  # random batches done (the rng position)
    counter: int = 0  # counter guest: last value this vCPU wrote to RAM
    ram_done: int = 0  # bytes paced since the workload started on this vCPU
    disk_done: int = 0
    run_start: float = 0.0  # vCPU run time when the workload started
    disk_offset: int = 0
    owner: object = None  # the Workload this state belongs to (not saved)


def counter_checksum(c: int) -> int:
    """The checksum the counter guest keeps next to counter ``c``: 1 + 2 + ... + c mod 2**64."""
    return (c * (c + 1) // 2) & _U64


class Workload:
    """A parsed spec bound to a machine's RAM and drives; ``run`` does one vCPU slice of it."""

    def __init__(self, spec: WorkloadSpec, ram0: RAMBlock, drives: list[Drive], smp: int) -> None:
        self.spec = spec
        self.ram0 = ram0
        self.drives = drives
        self.smp = smp
        if spec.kind == "random":
            wss = spec.wss if spec.wss is not None else ram0.size
            if wss > ram0.size:
                raise WorkloadError(f"workload: wss {wss} is larger than ram0 ({ram0.size} bytes)")
            self.wss_pages = wss // ram0.page_size
        if spec.kind == "counter" and COUNTER_AREA * smp > ram0.npages:
            raise WorkloadError(
                f"workload: counter needs {COUNTER_AREA * smp * ram0.page_size} bytes of ram0 for {smp} vCPUs")
        if spec.disk_rate and not drives:
            raise WorkloadError("workload: disk-rate needs at least one drive")
        self._pool_seed = spec.seed if spec.kind == "random" or spec.disk_rate else None
        self._pool_compress = spec.compress if spec.kind == "random" else 0.0
        self.rate_per_vcpu = spec.rate / smp
        self.disk_rate_per_vcpu = spec.disk_rate / smp

    @property
    def pool(self) -> np.ndarray | None:
        """The random source pages, built by the first slice that needs them: a destination adopting
        the source's workload does so inside the downtime, where building them would cost 10-100 ms."""
        return None if self._pool_seed is None else _make_pool(self._pool_seed, self._pool_compress)

    def attach(self, vcpu: VCPU, work: VCPUWork | None = None) -> None:
        """Start this workload on ``vcpu``, keeping ``work`` (incoming migration) or fresh state."""
        w = work or VCPUWork()
        if work is None and self.spec.kind == "counter":
            w.counter = self._adopt_counter_area(vcpu.index)
        w.run_start = vcpu.stats.run_time
        w.ram_done = w.disk_done = 0
        w.owner = self
        vcpu.wstate = w

    def _adopt_counter_area(self, index: int) -> int:
        """A counter guest starting fresh continues a valid counter found in RAM (e.g. a kept
        --mem-path file) and otherwise clears its area (e.g. after the random workload)."""
        try:
            return check_counter(self.ram0, index)
        except CounterCorrupt:
            base = index * COUNTER_AREA
            self.ram0.pages[base:base + COUNTER_AREA] = 0
            self.ram0.mark_dirty(slice(base, base + COUNTER_AREA))
            return 0

    # -- one slice ---------------------------------------------------------------------------------

    def run(self, vcpu: VCPU) -> None:
        w = vcpu.wstate
        if not isinstance(w, VCPUWork) or w.owner is not self:
            self.attach(vcpu)
            w = vcpu.wstate
            assert isinstance(w, VCPUWork)
        elapsed = vcpu.stats.run_time - w.run_start + SLICE
        if self.rate_per_vcpu:
            n = self._due_pages(w, elapsed)
            if n:
                if self.spec.kind == "random":
                    self._random_pages(vcpu, w, n)
                else:
                    self._counter_steps(vcpu, w, n)
        if self.disk_rate_per_vcpu:
            self._disk(vcpu, w, elapsed)

    def _due_pages(self, w: VCPUWork, elapsed: float) -> int:
        page = self.ram0.page_size
        due = self.rate_per_vcpu * elapsed - w.ram_done
        cap = self.rate_per_vcpu * CATCH_UP
        if due > cap:  # fell far behind (loaded host): forgive, do not burst
            w.ram_done += int(due - cap)
            due = cap
        n = int(due // page)
        w.ram_done += n * page
        return n

    def _random_pages(self, vcpu: VCPU, w: VCPUWork, n: int) -> None:
        block = self.ram0
        pool = self.pool
        assert pool is not None
        stamp_base = (vcpu.index + 1) << 56
        while n > 0:
            k = min(n, MAX_BATCH)
            rng = np.random.Generator(np.random.PCG64([self.spec.seed, vcpu.index, w.seq]))
            idx = rng.integers(0, self.wss_pages, size=k)
            start = int(rng.integers(0, POOL_PAGES))
            block.pages[idx] = pool[start:start + k]
            # a unique first word per write: a page re-sent stale would differ from RAM
            block.words[idx, 0] = np.uint64(stamp_base | (w.seq << 16)) + np.arange(k, dtype=np.uint64)
            block.mark_dirty(idx)
            w.seq += 1
            n -= k
            vcpu.stats.bytes_written += k * block.page_size

    def _counter_steps(self, vcpu: VCPU, w: VCPUWork, n: int) -> None:
        block = self.ram0
        base = vcpu.index * COUNTER_AREA
        words = block.words
        c = check_counter(block, vcpu.index, expect=w.counter)
        trail = COUNTER_AREA - 1
        last = c + n
        vals = np.arange(max(c + 1, last - trail + 1), last + 1, dtype=np.uint64)
        pages = base + 1 + (vals % np.uint64(trail)).astype(np.int64)
        words[pages] = vals[:, None] ^ _PATTERN[None, :]
        block.mark_dirty(pages)
        words[base, 0] = np.uint64(COUNTER_MAGIC)
        words[base, 1] = np.uint64(last)
        words[base, 2] = np.uint64(counter_checksum(last))
        words[base, 3] = np.uint64(vcpu.index)
        block.mark_dirty(base)
        w.counter = last
        vcpu.stats.bytes_written += len(vals) * block.page_size  # the header page is not paced

    def _disk(self, vcpu: VCPU, w: VCPUWork, elapsed: float) -> None:
        due = self.disk_rate_per_vcpu * elapsed - w.disk_done
        cap = self.disk_rate_per_vcpu * CATCH_UP
        if due > cap:
            w.disk_done += int(due - cap)
            due = cap
        n = int(due // 4096) * 4096
        if n <= 0:
            return
        pool = self.pool
        assert pool is not None
        drive = self.drives[vcpu.index % len(self.drives)]
        written = 0
        while written < n:
            chunk = min(n - written, 64 * 4096, drive.size)
            if drive.size < 4096:
                break
            off = (w.disk_offset % max(1, drive.size - chunk + 1)) & ~4095
            src = (w.seq + w.disk_offset // 4096) % POOL_PAGES
            drive.write(off, pool.reshape(-1)[src * 4096: src * 4096 + chunk].data)
            w.disk_offset = (off + chunk) % drive.size
            written += chunk
        w.disk_done += n
        vcpu.stats.disk_bytes_written += written


class CounterCorrupt(RuntimeError):
    """The counter guest found its own RAM inconsistent: a lost or stale page."""


def read_counter(block: RAMBlock, index: int) -> tuple[int, int, int]:
    """(magic, counter, checksum) of vCPU ``index``'s counter header (racy while it runs)."""
    h = block.words[index * COUNTER_AREA, :3]
    return int(h[0]), int(h[1]), int(h[2])


def check_counter(block: RAMBlock, index: int, expect: int | None = None) -> int:
    """Verify vCPU ``index``'s counter area (header and trail) and return the counter.

    A never-written area reads as counter 0. ``expect`` is the value the guest last wrote (kept as
    device state, so after a migration the destination checks that RAM and device state agree).
    """
    magic, c, csum = read_counter(block, index)
    base = index * COUNTER_AREA
    if magic == 0 and c == 0 and csum == 0:
        c = 0
    elif magic != COUNTER_MAGIC:
        raise CounterCorrupt(f"counter guest {index}: header magic {magic:#x} is wrong")
    elif csum != counter_checksum(c):
        raise CounterCorrupt(f"counter guest {index}: checksum {csum} does not match counter {c}")
    if expect is not None and c != expect:
        raise CounterCorrupt(f"counter guest {index}: RAM holds counter {c}, the vCPU last wrote {expect}")
    trail = COUNTER_AREA - 1
    if c:
        vals = np.arange(max(1, c - trail + 1), c + 1, dtype=np.uint64)
        pages = base + 1 + (vals % np.uint64(trail)).astype(np.int64)
        if not np.array_equal(block.words[pages], vals[:, None] ^ _PATTERN[None, :]):
            raise CounterCorrupt(f"counter guest {index}: trail pages do not match counter {c}")
    return c


@lru_cache(maxsize=4)
def _make_pool(seed: int, compress: float = 0.0) -> np.ndarray:
    """Non-zero random bytes, twice over so any POOL_PAGES-long window is one contiguous slice; with
    ``compress`` the tail of each page is one repeated non-zero byte (compressible, never a zero page)."""
    rng = np.random.Generator(np.random.PCG64([seed, 0xB00F]))
    pool = rng.integers(1, 256, size=(POOL_PAGES, PAGE_SIZE), dtype=np.uint8)
    tail = int(PAGE_SIZE * compress)
    if tail:
        pool[:, PAGE_SIZE - tail :] = 0x5A
    pool = np.concatenate([pool, pool])
    pool.flags.writeable = False  # shared by every workload of that seed
    return pool
