"""Guest RAM: blocks of host memory mapped once and viewed through numpy, never copied.

A block is an ``mmap`` (private anonymous, or a shared mapping of a file like QEMU's
``memory-backend-file,share=on``) plus a dirty bitmap. A file is locked (``flock``) while its block
is active, exclusively unless ``share`` was asked for: two guests in one RAM file corrupt each other. The bitmap follows the one rule that live
migration rests on: a writer writes the data first and marks the page after, and ``take_dirty`` swaps
the bitmap out atomically, so a page written after a take started is always in the next take.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from migd.units import PAGE_SIZE

MAX_NAME_LEN = 127  # QEMU's stream analysis reads the idstr length as a signed byte
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
MADV_HUGEPAGE = 14

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int
POPULATE_CHUNK = 64 << 20  # bytes per madvise call: a long populate stays interruptible between calls


class MemPathError(OSError):
    """Guest RAM cannot be set up (its ``--mem-path`` file is locked or unusable, no memory).

    An OSError (errno and strerror kept when there is one) whose ``str()`` is the one-line refusal.
    """

    def __init__(self, message: str, cause: OSError | None = None) -> None:
        if cause is not None and cause.errno is not None:
            super().__init__(cause.errno, cause.strerror)
        else:
            super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _swap_enabled() -> bool:
    """Whether a non-resident anonymous page could be in swap rather than never touched."""
    try:
        with open("/proc/swaps") as f:
            return len(f.read().strip().splitlines()) > 1
    except OSError:
        return True


class RAMBlock:
    """One named region of guest RAM with its dirty bitmap."""

    def __init__(self, name: str, size: int, *, mem_path: str | os.PathLike[str] | None = None,
                 share: bool = False, page_size: int = PAGE_SIZE) -> None:
        validate_block(name, size, page_size)
        mem_path = os.fspath(mem_path) if mem_path is not None else None
        self.name = name
        self.size = size
        self.page_size = page_size
        self.npages = size // page_size
        self.mem_path = mem_path
        self.share = share
        self.locked = False
        self._file_fd = -1  # the mem-path file, kept open for its lock
        if mem_path:
            try:
                self._file_fd = _open_file(mem_path, size)
            except OSError as exc:
                raise MemPathError(f"--mem-path {mem_path}: {exc.strerror or exc}", exc) from None
            try:
                self.lock_file()
                self.mem = mmap.mmap(self._file_fd, size, flags=mmap.MAP_SHARED,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except MemPathError:
                os.close(self._file_fd)
                raise
            except OSError as exc:
                os.close(self._file_fd)
                raise MemPathError(f"--mem-path {mem_path}: cannot map {size} bytes: {exc.strerror}", exc) from None
        else:
            try:
                self.mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            except OSError as exc:
                raise MemPathError(f"cannot allocate {size} bytes of guest RAM for '{name}': {exc.strerror}",
                                   exc) from None
        self.buf: np.ndarray = np.frombuffer(self.mem, dtype=np.uint8)
        self.pages: np.ndarray = self.buf.reshape(self.npages, page_size)
        self.words: np.ndarray = self.buf.view(np.uint64).reshape(self.npages, page_size // 8)
        self._dirty = np.zeros(self.npages, dtype=bool)
        self._dirty_lock = threading.Lock()
        self._logging = False
        if mem_path:  # map the file's pages in now, off every hot path, not during a migration pass
            threading.Thread(target=self.populate, args=(False,), name=f"populate/{name}",
                             daemon=True).start()

    # -- the mem-path lock -----------------------------------------------------------------------

    def lock_file(self) -> None:
        """Take the mem-path file's lock (exclusive; shared with ``share``) (any thread, BQL held).

        Raises :class:`MemPathError` if another process holds it; no file, nothing to lock.
        """
        if self._file_fd < 0 or self.locked:
            return
        mode = fcntl.LOCK_SH if self.share else fcntl.LOCK_EX
        try:
            fcntl.flock(self._file_fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            hint = "" if self.share else " (--mem-path FILE,share=on shares it on purpose)"
            raise MemPathError(f'--mem-path {self.mem_path}: Failed to get "{"shared" if self.share else "write"}" '
                               f"lock: Is another process using the file?{hint}") from None
        self.locked = True

    def unlock_file(self) -> None:
        """Release the mem-path lock (migrated away: the guest's RAM is the destination's now)."""
        if self._file_fd >= 0 and self.locked:
            fcntl.flock(self._file_fd, fcntl.LOCK_UN)
        self.locked = False

    # -- dirty logging -------------------------------------------------------------------------

    @property
    def logging(self) -> bool:
        return self._logging

    def set_logging(self, on: bool, *, all_dirty: bool = False) -> None:
        """Turn dirty logging on or off; ``all_dirty`` starts with every page marked."""
        with self._dirty_lock:
            self._logging = on
            self._dirty.fill(all_dirty and on)

    def mark_dirty(self, idx: int | slice | npt.NDArray[np.integer[Any]] | Sequence[int]) -> None:
        """Record pages as written. Call *after* writing their data."""
        if not self._logging:
            return
        with self._dirty_lock:
            if self._logging:
                self._dirty[idx] = True

    def take_dirty(self) -> np.ndarray:
        """Pages marked since the last take, clearing them: one copy and one fill under the lock."""
        with self._dirty_lock:
            snap = self._dirty.copy()
            self._dirty.fill(False)
        return snap

    def dirty_count(self) -> int:
        """Pages marked and not yet taken (a cheap estimate; not a take)."""
        return int(np.count_nonzero(self._dirty))

    # -- residency -----------------------------------------------------------------------------

    def untouched_pages(self) -> npt.NDArray[np.bool_] | None:
        """Pages that were never touched and therefore read as zero, or None when unknowable.

        Only a private anonymous mapping guarantees that a non-resident page is zero; with swap
        configured, /proc/self/pagemap tells swapped-out pages apart.
        """
        if self.mem_path is not None or mmap.PAGESIZE != self.page_size:
            return None
        addr = self.buf.ctypes.data
        if _swap_enabled():
            return self._untouched_from_pagemap(addr)
        vec = np.empty(self.npages, dtype=np.uint8)
        if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(self.size),
                         ctypes.c_void_p(vec.ctypes.data)) != 0:
            return None
        untouched: npt.NDArray[np.bool_] = (vec & 1) == 0
        return untouched

    def _untouched_from_pagemap(self, addr: int) -> npt.NDArray[np.bool_] | None:
        entries = np.empty(self.npages, dtype=np.uint64)
        try:
            fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        except OSError:
            return None
        try:
            want = self.npages * 8
            got = os.preadv(fd, [entries.data.cast("B")], (addr // self.page_size) * 8)
            if got != want:
                return None
        finally:
            os.close(fd)
        present_or_swapped = np.uint64(0b11 << 62)
        untouched: npt.NDArray[np.bool_] = (entries & present_or_swapped) == 0
        return untouched

    def populate(self, write: bool = True) -> None:
        """Fault every page in ahead of bulk access: for writing (the destination's -mem-prealloc)
        or, for a file the guest's RAM was prepared in, for reading (its first migration pass).

        Through libc in chunks rather than ``mmap.madvise``, which holds the GIL for the whole
        call (~0.3 s per GiB): every other thread, the event loop included, would stall meanwhile.
        Contents are never changed, so it may run while the pages are being written.

        Writing, an anonymous block is first advised to transparent huge pages, as QEMU advises all
        guest RAM: 2 MiB faults cost the destination 0.2 CPU s per GiB where 4 KiB ones cost
        0.5-1.1 s, CPU the page loader shares with it on a small host, and the loader's copies miss
        the TLB less. Only here: a source's page table keeps ``untouched_pages`` exact per page.
        """
        advice = MADV_POPULATE_WRITE if write else MADV_POPULATE_READ
        addr = self.buf.ctypes.data
        if write and self.mem_path is None and mmap.PAGESIZE == self.page_size:
            self.advise_huge_pages()
        for off in range(0, self.size, POPULATE_CHUNK):
            # closed meanwhile: stop, before the addresses are reused by a new block whose untouched
            # pages this would fault in (no view is held: it would keep close() from unmapping)
            if self.buf.size == 0:
                return
            n = min(POPULATE_CHUNK, self.size - off)
            if _libc.madvise(ctypes.c_void_p(addr + off), ctypes.c_size_t(n), advice) != 0:
                if ctypes.get_errno() != errno.EINVAL:
                    return  # ENOMEM: unmapped meanwhile (shutdown)
                # kernel older than 5.14: touch one byte per page instead
                pages = self.pages[off // self.page_size:(off + n) // self.page_size]
                if write:
                    pages[:, 0] |= 0
                else:
                    int(pages[:, 0].sum())

    def advise_huge_pages(self) -> bool:
        """Ask for transparent huge pages behind this block (any thread); False where the kernel
        refuses (no THP, or THP set to ``never``: then 4 KiB pages, as before). Contents unchanged."""
        if self.buf.size == 0:
            return False
        rc: int = _libc.madvise(ctypes.c_void_p(self.buf.ctypes.data), ctypes.c_size_t(self.size), MADV_HUGEPAGE)
        return rc == 0

    def close(self) -> None:
        """Unmap if no view is still exported; otherwise the mapping goes with its last view."""
        self.buf = self.pages = self.words = np.empty(0, dtype=np.uint8)
        try:
            self.mem.close()
        except BufferError:
            pass
        fd, self._file_fd = self._file_fd, -1
        if fd >= 0:  # closing the descriptor releases the lock
            os.close(fd)
        self.locked = False

    def __repr__(self) -> str:
        return f"RAMBlock({self.name!r}, {self.size})"


def validate_block(name: str, size: int, page_size: int = PAGE_SIZE) -> None:
    """Raise ValueError unless a block of this name and size can exist."""
    if not name:
        raise ValueError("RAM block name must not be empty")
    if len(name.encode()) > MAX_NAME_LEN:
        raise ValueError(f"RAM block name '{name}' is longer than {MAX_NAME_LEN} bytes")
    if size <= 0 or size % page_size:
        raise ValueError(f"RAM block size {size} must be a positive multiple of {page_size}")


def _open_file(path: str, size: int) -> int:
    """The descriptor of a mem-path file: existing contents are the RAM, a missing file is created."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        actual = os.fstat(fd).st_size
        if actual == 0:
            os.ftruncate(fd, size)
        elif actual != size:
            raise ValueError(f"mem-path '{path}' is {actual} bytes, but the machine has {size} bytes of RAM")
    except BaseException:
        os.close(fd)
        raise
    return fd


class RAMList:
    """The machine's RAM blocks, with a version bumped on every add/remove (the ram list mutex)."""

    MAIN = "ram0"

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.version = 0
        self._blocks: dict[str, RAMBlock] = {}
        self._logging = False

    def blocks(self) -> list[RAMBlock]:
        """A snapshot of the blocks in insertion order."""
        with self.lock:
            return list(self._blocks.values())

    def get(self, name: str) -> RAMBlock | None:
        with self.lock:
            return self._blocks.get(name)

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def add(self, name: str, size: int, *, mem_path: str | os.PathLike[str] | None = None,
            share: bool = False) -> RAMBlock:
        """Create and map a block. While dirty logging is on, a new block starts fully dirty."""
        validate_block(name, size)
        with self.lock:
            if name in self._blocks:
                raise ValueError(f"RAM block '{name}' already exists")
            block = RAMBlock(name, size, mem_path=mem_path, share=share)
            if self._logging:
                block.set_logging(True, all_dirty=True)
            self._blocks[name] = block
            self.version += 1
            return block

    def remove(self, name: str) -> None:
        with self.lock:
            if name == self.MAIN:
                raise ValueError(f"RAM block '{name}' is the machine's main RAM and cannot be removed")
            block = self._blocks.pop(name, None)
            if block is None:
                raise KeyError(f"RAM block '{name}' not found")
            self.version += 1
        block.set_logging(False)

    def total_bytes(self) -> int:
        with self.lock:
            return sum(b.size for b in self._blocks.values())

    @property
    def logging(self) -> bool:
        return self._logging

    def set_logging(self, on: bool) -> None:
        """Switch logging on every block, and for blocks added later (see migd.machine.dirty)."""
        with self.lock:
            self._logging = on
            for block in self._blocks.values():
                block.set_logging(on)

    def lock_files(self) -> None:
        """Take every block's mem-path lock (see RAMBlock.lock_file)."""
        for block in self.blocks():
            block.lock_file()

    def unlock_files(self) -> None:
        for block in self.blocks():
            block.unlock_file()

    def close(self) -> None:
        with self.lock:
            blocks = list(self._blocks.values())
            self._blocks.clear()
            self.version += 1
        for block in blocks:
            block.close()
