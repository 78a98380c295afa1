"""RAM blocks and the RAM list: mappings, views, dirty bitmaps, residency, versioning."""

from __future__ import annotations

import os
import resource

import numpy as np
import pytest

from migd.machine import dirty
from migd.machine.ram import RAMBlock, RAMList
from migd.units import PAGE_SIZE

MiB = 1 << 20


def test_anonymous_block_is_zero_and_views_share_memory():
    b = RAMBlock("ram0", 4 * MiB)
    assert b.npages == 1024 and b.pages.shape == (1024, PAGE_SIZE)
    assert not b.buf.any()
    b.pages[3, 10] = 7
    assert b.buf[3 * PAGE_SIZE + 10] == 7  # a view, not a copy
    assert b.mem[3 * PAGE_SIZE + 10] == 7
    assert b.words.shape == (1024, 512)
    b.close()


@pytest.mark.parametrize("size", [0, 100, PAGE_SIZE + 1, -PAGE_SIZE])
def test_bad_sizes_are_refused(size):
    with pytest.raises(ValueError, match="positive multiple"):
        RAMBlock("x", size)


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="empty"):
        RAMBlock("", PAGE_SIZE)
    with pytest.raises(ValueError, match="longer than 127"):
        RAMBlock("n" * 128, PAGE_SIZE)


def test_mem_path_created_then_reused_with_its_contents(tmp_path):
    path = tmp_path / "guest.ram"
    b = RAMBlock("ram0", MiB, mem_path=path)
    assert path.stat().st_size == MiB
    b.pages[5] = 0xAB
    b.mem.flush()
    b.close()
    with open(path, "rb") as f:
        f.seek(5 * PAGE_SIZE)
        assert f.read(PAGE_SIZE) == b"\xab" * PAGE_SIZE
    again = RAMBlock("ram0", MiB, mem_path=str(path))
    assert (again.pages[5] == 0xAB).all() and not again.pages[4].any()
    assert again.untouched_pages() is None  # a shared file mapping: residency says nothing
    again.close()


def test_mem_path_of_wrong_size_is_a_clear_error(tmp_path):
    path = tmp_path / "small.ram"
    path.write_bytes(b"\1" * PAGE_SIZE)
    with pytest.raises(ValueError, match=r"is 4096 bytes, but the machine has 1048576 bytes"):
        RAMBlock("ram0", MiB, mem_path=path)
    assert path.read_bytes() == b"\1" * PAGE_SIZE  # untouched


def test_untouched_pages_follow_writes():
    b = RAMBlock("ram0", 8 * MiB)
    untouched = b.untouched_pages()
    assert untouched is not None and untouched.all()
    b.pages[[1, 100, 2047]] = 1
    untouched = b.untouched_pages()
    assert not untouched[[1, 100, 2047]].any()
    assert untouched.sum() >= 2048 - 3 * 512  # transparent huge pages may fault in whole 2 MiB
    b.close()


def test_dirty_marks_only_while_logging_and_take_clears():
    b = RAMBlock("ram0", MiB)
    b.mark_dirty(3)
    assert not b.take_dirty().any()  # logging off: nothing recorded
    b.set_logging(True)
    b.mark_dirty(np.array([1, 2, 2]))
    b.mark_dirty(slice(10, 12))
    taken = b.take_dirty()
    assert np.flatnonzero(taken).tolist() == [1, 2, 10, 11]
    assert not b.take_dirty().any()
    b.set_logging(True, all_dirty=True)
    assert b.dirty_count() == b.npages
    b.close()


def test_ramlist_version_blocks_and_remove_rules():
    rl = RAMList()
    rl.add("ram0", MiB)
    v = rl.version
    extra = rl.add("hot1", 2 * MiB)
    assert rl.version == v + 1 and rl.get("hot1") is extra and "hot1" in rl
    assert [b.name for b in rl.blocks()] == ["ram0", "hot1"]
    assert rl.total_bytes() == 3 * MiB
    with pytest.raises(ValueError, match="already exists"):
        rl.add("hot1", MiB)
    with pytest.raises(ValueError, match="cannot be removed"):
        rl.remove("ram0")
    with pytest.raises(KeyError):
        rl.remove("nope")
    assert rl.version == v + 1  # failures change nothing
    rl.remove("hot1")
    assert rl.version == v + 2 and rl.get("hot1") is None and rl.total_bytes() == MiB
    rl.close()


def test_block_added_while_logging_is_fully_dirty_and_sync_reports_it():
    rl = RAMList()
    rl.add("ram0", MiB)
    dirty.log_start(rl)
    rl.get("ram0").pages[7] = 1
    rl.get("ram0").mark_dirty(7)
    rl.add("hot", MiB)
    synced = dirty.sync(rl)
    assert np.flatnonzero(synced["ram0"]).tolist() == [7]
    assert synced["hot"].all()
    assert dirty.dirty_pages(rl) == 0
    dirty.log_stop(rl)
    rl.get("ram0").mark_dirty(8)
    assert not dirty.sync(rl)["ram0"].any()
    rl.close()


def test_populate_faults_pages_in():
    b = RAMBlock("dst", 4 * MiB)
    b.populate()
    assert not b.untouched_pages().any()
    assert not b.buf.any()
    b.close()


def _anon_huge_kib(addr: int) -> int:
    """AnonHugePages of the mapping that holds ``addr``, from /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def test_destination_populate_uses_huge_pages():
    """The destination's prefault asks for THP, so 64 MiB fault in as 2 MiB pages, not 16384 of
    4 KiB; a source block stays on 4 KiB pages (its residency is read per page)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        pytest.skip("no transparent huge pages on this kernel")
    if "[never]" in mode:
        pytest.skip("transparent huge pages are set to never")
    dst = RAMBlock("dst", 64 * MiB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    dst.populate()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert not dst.buf.any()
    huge_kib = _anon_huge_kib(dst.buf.ctypes.data)
    assert huge_kib >= 32 * 1024, huge_kib  # at least half of it (the ends may be unaligned)
    assert faults < 64 * MiB // PAGE_SIZE // 4, faults
    dst.close()
    src = RAMBlock("src", 64 * MiB)
    src.buf[::PAGE_SIZE] = 1  # every page touched, as a source guest's would be
    assert "[always]" in mode or _anon_huge_kib(src.buf.ctypes.data) == 0
    src.close()


def test_idle_gib_costs_no_resident_memory():
    """Mapping 1 GiB of guest RAM must not make it resident (anonymous mmap, never touched)."""

    def rss() -> int:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    before = rss()
    b = RAMBlock("ram0", 1 << 30)
    assert b.untouched_pages().all()
    assert rss() - before < 16 * MiB
    b.close()


def test_untouched_pages_through_pagemap_when_swap_is_on(monkeypatch):
    """With swap a non-resident page may hold data: /proc/self/pagemap tells swapped pages apart."""
    import migd.machine.ram as ram

    b = RAMBlock("ram0", 4 * MiB)
    b.pages[[0, 17, 1023]] = 3
    via_mincore = b.untouched_pages()
    monkeypatch.setattr(ram, "_swap_enabled", lambda: True)
    via_pagemap = b.untouched_pages()
    assert via_pagemap is not None and np.array_equal(via_pagemap, via_mincore)
    assert not via_pagemap[[0, 17, 1023]].any() and via_pagemap.sum() >= 1024 - 3 * 512
    b.close()
