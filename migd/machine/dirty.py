"""Global dirty logging over a RAMList: start, stop, and sync (take-and-clear every block's bitmap).

The migration calls ``log_start`` at setup, ``sync`` whenever it needs the pages dirtied since the
previous sync (under the BQL, as QEMU's migration_bitmap_sync), and ``log_stop`` when it ends. A block
hot-plugged while logging is on starts fully dirty (see RAMList.add), so it is never missed.
"""

from __future__ import annotations

import numpy as np

from migd.machine.ram import RAMList


def log_start(ramlist: RAMList) -> None:
    """Start logging on every block with empty bitmaps: only writes from now on are recorded."""
    ramlist.set_logging(True)


def log_stop(ramlist: RAMList) -> None:
    ramlist.set_logging(False)


def sync(ramlist: RAMList) -> dict[str, np.ndarray]:
    """Pages dirtied since the last sync, per block name; each block's bitmap is cleared atomically."""
    return {block.name: block.take_dirty() for block in ramlist.blocks()}


def dirty_pages(ramlist: RAMList) -> int:
    """Pages marked and not yet synced, across all blocks (an estimate: no take)."""
    return sum(block.dirty_count() for block in ramlist.blocks())
