"""QEMU's dirty-rate measurement (``calc-dirty-rate`` / ``query-dirty-rate``), which KubeVirt scrapes.

One measurement at a time, ``calc-time`` long, in one of QEMU's modes:
- ``page-sampling`` (the default): ``sample-pages`` random pages per GiB of every RAM block of at
  least 128 MiB are fingerprinted at the start and at the end; the share that changed, times the
  sampled blocks' size, over the time, is the rate;
- ``dirty-bitmap``: every page of every block is fingerprinted at both ends (migd compares contents
  instead of borrowing the dirty log, so a measurement can never disturb a migration's bitmap);
- ``dirty-ring`` needs KVM's dirty ring: refused with QEMU's text, as QEMU does without it.

Rates are in MiB/s (QEMU's "MB/s"). The measurement runs as a task on the event loop; fingerprints
are computed off the loop (numpy, in chunks, no lock: a racing write is exactly what is measured).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_CALC_TIME_MS = 50
MAX_CALC_TIME_MS = 60000
DEFAULT_SAMPLE_PAGES = 512  # per GiB
MIN_SAMPLE_PAGES = 128
MAX_SAMPLE_PAGES = 16384
MIN_BLOCK_SIZE = 128 << 20  # smaller blocks are not sampled (QEMU's rule)
MODES = ("page-sampling", "dirty-ring", "dirty-bitmap")
UNITS = ("second", "millisecond")
CHUNK_PAGES = 8192  # pages fingerprinted per numpy step (bounds the temporary to 32 MiB)
MIB = 1 << 20


class DirtyRateError(Exception):
    """A refused calc-dirty-rate; ``str()`` is QEMU's text."""


def fingerprints(pages: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """One uint64 per page (rows of uint64 words): a weighted sum with odd random weights."""
    out = np.empty(len(pages), dtype=np.uint64)
    for start in range(0, len(pages), CHUNK_PAGES):
        chunk = pages[start:start + CHUNK_PAGES]
        out[start:start + len(chunk)] = (chunk * weights).sum(axis=1, dtype=np.uint64)
    return out


@dataclass
class _Sample:
    name: str
    index: np.ndarray | None  # sampled page numbers (None: every page)
    before: np.ndarray
    block_bytes: int


class DirtyRateMeter:
    """State of the last/current measurement for one daemon (event loop only)."""

    def __init__(self, ram_blocks: Callable[[], list[Any]],
                 run_blocking: Callable[..., Awaitable[Any]]) -> None:
        self._blocks = ram_blocks
        self._run_blocking = run_blocking
        self.status = "unstarted"
        self.start_time = 0  # s (monotonic clock, like QEMU's)
        self.calc_time_ms = 0
        self.sample_pages = 0
        self.mode = "page-sampling"
        self.dirty_rate: int | None = None  # MiB/s, once measured
        self._task: asyncio.Task[None] | None = None
        self._rng = np.random.default_rng()

    def start(self, calc_time: int, calc_time_unit: str | None, sample_pages: int | None,
              mode: str | None) -> None:
        """``calc-dirty-rate``: QEMU's checks in QEMU's order, then the measurement task."""
        if self.status == "measuring":
            raise DirtyRateError("the dirty rate is already being measured.")
        unit = calc_time_unit or "second"
        calc_ms = calc_time * 1000 if unit == "second" else calc_time
        if not MIN_CALC_TIME_MS <= calc_ms <= MAX_CALC_TIME_MS:
            raise DirtyRateError(f"Calculation time is out of range [{MIN_CALC_TIME_MS}ms, {MAX_CALC_TIME_MS}ms].")
        chosen = mode or "page-sampling"
        if sample_pages is not None and chosen != "page-sampling":
            raise DirtyRateError("sample-pages is used only in page-sampling mode")
        if sample_pages is not None and not MIN_SAMPLE_PAGES <= sample_pages <= MAX_SAMPLE_PAGES:
            raise DirtyRateError(f"sample-pages is out of range[{MIN_SAMPLE_PAGES}, {MAX_SAMPLE_PAGES}].")
        if chosen == "dirty-ring":
            raise DirtyRateError("mode dirty-ring is not enabled, use other method instead.")
        self.mode = chosen
        self.calc_time_ms = calc_ms
        self.sample_pages = sample_pages if sample_pages is not None else DEFAULT_SAMPLE_PAGES
        self.dirty_rate = None
        self.start_time = int(time.monotonic())
        self.status = "measuring"
        self._task = asyncio.get_running_loop().create_task(self._measure())

    async def _measure(self) -> None:
        weights = self._rng.integers(1, 1 << 63, size=512, dtype=np.uint64) | np.uint64(1)
        try:
            samples = await self._run_blocking(self._take, weights)
            t0 = time.monotonic()
            await asyncio.sleep(self.calc_time_ms / 1000)
            changed, covered = await self._run_blocking(self._compare, samples, weights)
            elapsed = max(time.monotonic() - t0, 1e-3)
            self.calc_time_ms = int(round(elapsed * 1000))
            self.dirty_rate = int(changed * covered / MIB / elapsed)
        finally:
            self.status = "measured"
            if self.dirty_rate is None:
                self.dirty_rate = 0

    def _take(self, weights: np.ndarray) -> list[_Sample]:
        """Fingerprints at the start (worker thread)."""
        out = []
        for block in self._blocks():
            words = block.words
            if self.mode == "page-sampling":
                if block.size < MIN_BLOCK_SIZE:
                    continue
                count = min(block.npages, max(1, self.sample_pages * block.size // (1 << 30)))
                index = np.sort(self._rng.choice(block.npages, size=count, replace=False))
                out.append(_Sample(block.name, index, fingerprints(words[index], weights), block.size))
            else:
                out.append(_Sample(block.name, None, fingerprints(words, weights), block.size))
        return out

    def _compare(self, samples: list[_Sample], weights: np.ndarray) -> tuple[float, int]:
        """(share of the sampled pages that changed, bytes the samples stand for) (worker thread)."""
        blocks = {b.name: b for b in self._blocks()}
        changed = total = covered = 0
        for s in samples:
            block = blocks.get(s.name)
            if block is None:  # removed meanwhile
                continue
            now = fingerprints(block.words if s.index is None else block.words[s.index], weights)
            changed += int(np.count_nonzero(now != s.before))
            total += len(s.before)
            covered += s.block_bytes
        return (changed / total if total else 0.0), covered

    def query(self, calc_time_unit: str | None) -> dict[str, Any]:
        """``query-dirty-rate``: QEMU's DirtyRateInfo members."""
        unit = calc_time_unit or "second"
        calc = self.calc_time_ms // 1000 if unit == "second" else self.calc_time_ms
        info: dict[str, Any] = {"status": self.status}
        if self.status == "measured" and self.dirty_rate is not None:
            info["dirty-rate"] = self.dirty_rate
        info.update({"start-time": self.start_time, "calc-time": calc, "calc-time-unit": unit,
                     "sample-pages": self.sample_pages if self.mode == "page-sampling" or self.status != "measured"
                     else 0, "mode": self.mode})
        return info
