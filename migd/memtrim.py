"""Keep the C heap from growing per migration (issue 11: a daemon that migrates for weeks must not
gain resident memory per migration).

A migration allocates large short-lived buffers on its own threads: 2 MiB stream buffers, numpy
bitmaps and index arrays of a few hundred KiB per pass. glibc serves a request above its mmap
threshold (128 KiB) with ``mmap`` and gives it back on free, but its *dynamic* threshold rises to the
size of each mmapped chunk freed, up to 32 MiB: after the first migration these buffers came from the
per-thread arenas instead, each migration's threads landed on whichever arena was free, and the
arenas' free space fragmented and stayed resident. Measured with bench/bench_soak.py and in one
process (mallinfo2): in-use heap flat at ~10 MiB, free heap 3 -> 44 MiB over 25 migrations, RSS
+1 MiB per migration; with the threshold fixed at 128 KiB both stay flat.

``fix_mmap_threshold`` (at start-up) sets the threshold explicitly, which also turns the dynamic
adjustment off (mallopt(3)); ``release_free_memory`` (after each migration) returns the arenas'
free pages with ``malloc_trim(0)``. Without glibc (musl, another platform) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

from migd.threads import any_thread, off_loop

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt(3)'s parameter number
MMAP_THRESHOLD = 128 << 10  # glibc's default, kept fixed: larger blocks are mmapped and unmapped on free


def _libc_fn(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    """``name`` from the C library, or None where it has none."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    found: Callable[..., int] = fn
    return found


_MALLOPT = _libc_fn("mallopt", [ctypes.c_int, ctypes.c_int])
_TRIM = _libc_fn("malloc_trim", [ctypes.c_size_t])


@any_thread
def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (no dynamic raise); True if the C library took it. Once, at
    start-up, before the first migration."""
    if _MALLOPT is None:
        return False
    ok = _MALLOPT(M_MMAP_THRESHOLD, threshold) == 1
    if not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) refused: RSS may grow per migration", threshold)
    return ok


@off_loop
def release_free_memory() -> bool:
    """Return the C heap's free pages to the kernel; True if something was released. It walks
    every arena under their locks (a few ms), so not on the event loop. (executor thread)"""
    if _TRIM is None:
        return False
    released = bool(_TRIM(0))
    log.debug("malloc_trim: %s", "memory released" if released else "nothing to release")
    return released
