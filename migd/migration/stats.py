"""Counters of one migration (QEMU's ``mig_stats`` plus RAMState's period fields).

The migration thread and the RAM section write them; ``query-migrate`` only reads them. Plain ints and
floats assigned from one writer thread are safe to read from the event loop under the GIL, so readers
never take a lock and never wait on the thread. Bytes written to the channel are the stream's own
count (``OutStream.transferred``), not kept twice here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from migd.units import PAGE_SIZE


@dataclass
class MigrationStats:
    page_size: int = PAGE_SIZE
    precopy_bytes: int = 0  # RAM bytes sent while the guest ran
    downtime_bytes: int = 0  # RAM bytes sent while it was stopped
    normal: int = 0  # pages sent as PAGE records
    duplicate: int = 0  # pages sent as ZERO records
    multifd_bytes: int = 0  # bytes the multifd channels wrote (also counted in the stream's transferred)
    dirty_sync_missed_zero_copy: int = 0  # zero-copy-send: channel flushes in which the kernel copied anyway
    total: int = 0  # bytes of guest RAM (sum of block sizes)
    dirty_pages: int = 0  # pages still to send (QEMU's migration_dirty_pages)
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0  # pages/s over the last >= 1 s sync period
    pages_per_second: int = 0
    mbps: float = 0.0
    # period bookkeeping of the bitmap sync (ram.c migration_bitmap_sync)
    period_start: float = 0.0
    period_dirty_pages: int = 0
    # called after every bitmap sync with (stats); the migration thread hooks events and throttling here
    on_sync: list[Callable[[MigrationStats], None]] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return self.dirty_pages * self.page_size

    @property
    def normal_bytes(self) -> int:
        return self.normal * self.page_size

    def count_ram_bytes(self, nbytes: int, guest_running: bool) -> None:
        if guest_running:
            self.precopy_bytes += nbytes
        else:
            self.downtime_bytes += nbytes
