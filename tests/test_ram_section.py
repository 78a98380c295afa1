"""The ram section end to end: SaveVM -> real socketpair -> load_stream into another RAMList."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from migd.machine import dirty
from migd.machine.ram import RAMList
from migd.machine.vmstate import VMStateDevice, buffer, u64
from migd.migration.format import RAM_CONTINUE, RAM_PAGE, RAM_ZERO
from migd.migration.ram import RAMError, RAMLoader, RAMSaver, prefault
from migd.migration.savevm import SaveVM, load_stream
from migd.migration.stats import MigrationStats
from migd.migration.stream import InStream, OutStream, StreamError
from migd.transports.channel import SocketChannel
from migd.units import PAGE_SIZE

WAIT = 60.0
MiB = 1 << 20


class Counter(VMStateDevice):
    """A small real device section: a value and a tag."""

    idstr = "test-counter"
    vmsd_name = "test-counter"
    version_id = 1
    fields = (u64("value"), buffer("tag", 8))

    def __init__(self, value: int = 0) -> None:
        super().__init__(0)
        self.value = value
        self.tag = b""

    def values(self) -> dict[str, int | bytes]:
        return {"value": self.value, "tag": self.tag}

    def apply(self, values: dict[str, int | bytes]) -> None:
        self.value = int(values["value"])
        self.tag = bytes(values["tag"]).rstrip(b"\0")


class Box:
    """What SaveVM/load_stream need of a machine: its RAM and its devices."""

    def __init__(self, ram: RAMList, devices: list[VMStateDevice] | None = None) -> None:
        self.ram = ram
        self._devices = devices or []

    def devices(self) -> list[VMStateDevice]:
        return self._devices


def ramlist(**blocks: int) -> RAMList:
    r = RAMList()
    for name, size in blocks.items():
        r.add(name, size)
    return r


def fill_mixed(block, rng: np.random.Generator, untouched_from: int) -> None:
    """Random pages, written-zero pages, pages with zero first/last word, and an untouched tail."""
    n = untouched_from
    block.pages[:n] = rng.integers(0, 256, (n, PAGE_SIZE), dtype=np.uint8)
    zero = rng.choice(n, n // 5, replace=False)
    block.pages[zero] = 0
    tricky = rng.choice(n, n // 10, replace=False)  # zero at both ends, data inside
    block.words[tricky, 0] = 0
    block.words[tricky, -1] = 0
    block.pages[tricky, 100] = 7


class Migration:
    """A source SaveVM and a destination load_stream on the two ends of a socketpair."""

    def __init__(self, src: Box, dst: Box, *, return_path: bool = False) -> None:
        a, b = socket.socketpair()
        self.out_ch, self.in_ch = SocketChannel(a), SocketChannel(b)
        self.f = OutStream(self.out_ch)
        self.stats = MigrationStats()
        self.sv = SaveVM(src, self.stats, return_path)
        self.dst = dst
        self.commands: list[tuple[int, bytes]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._load, daemon=True)
        self.thread.start()

    def _load(self) -> None:
        try:
            load_stream(InStream(self.in_ch), self.dst, on_command=lambda c, p: self.commands.append((c, p)))
        except BaseException as exc:  # handed to the test
            self.error = exc

    def start(self) -> None:
        self.sv.save_header(self.f)
        self.sv.save_setup(self.f)
        self.f.flush()

    def finish(self) -> None:
        self.sv.save_complete_precopy(self.f)
        self.sv.cleanup()
        self.out_ch.sock.shutdown(socket.SHUT_WR)
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        self.out_ch.close()
        self.in_ch.close()


def test_round_trip_random_zero_untouched_and_device():
    rng = np.random.default_rng(7)
    src_ram = ramlist(ram0=16 * MiB, extra=2 * MiB)
    dst_ram = ramlist(ram0=16 * MiB, extra=2 * MiB)
    main = src_ram.get("ram0")
    fill_mixed(main, rng, untouched_from=main.npages * 3 // 4)
    src_ram.get("extra").pages[::3] = 0x5A
    dst_ram.get("ram0").pages[-5:] = 0xEE  # stale data where the source is untouched: must be zeroed
    dst_ram.get("extra").pages[1] = 0x11
    prefault(dst_ram)
    src_dev, dst_dev = Counter(0xDEADBEEF), Counter()
    src_dev.tag = b"hello"
    m = Migration(Box(src_ram, [src_dev]), Box(dst_ram, [dst_dev]))
    m.start()
    while not m.sv.save_iterate(m.f):
        pass
    m.finish()
    assert m.error is None
    for name in ("ram0", "extra"):
        assert np.array_equal(src_ram.get(name).buf, dst_ram.get(name).buf), name
    assert (dst_dev.value, dst_dev.tag) == (0xDEADBEEF, b"hello")
    st = m.stats
    total_pages = (16 + 2) * MiB // PAGE_SIZE
    assert st.normal + st.duplicate == total_pages
    assert st.duplicate >= main.npages // 4  # the untouched quarter at least
    assert st.dirty_pages == 0 and st.remaining == 0
    assert st.dirty_sync_count == 2  # setup and the final sync
    assert st.total == 18 * MiB
    # everything went while the "guest" ran, except the END section's EOS
    assert st.precopy_bytes >= st.normal * (PAGE_SIZE + 8) + st.duplicate * 9
    assert st.downtime_bytes == 8


def test_pages_dirtied_during_migration_are_resent():
    rng = np.random.default_rng(3)
    src_ram = ramlist(ram0=8 * MiB)
    dst_ram = ramlist(ram0=8 * MiB)
    block = src_ram.get("ram0")
    block.buf[:] = rng.integers(0, 256, block.size, dtype=np.uint8)
    m = Migration(Box(src_ram), Box(dst_ram))
    m.start()
    syncs: list[int] = []
    m.stats.on_sync.append(lambda st: syncs.append(st.dirty_sync_count))
    m.sv.save_iterate(m.f)
    # a "vCPU" writes pages (data first, then the dirty mark), some already sent, some to zero
    for i in (0, 1, 5, block.npages - 1):
        block.pages[i] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
        block.mark_dirty(i)
    block.pages[2] = 0
    block.mark_dirty(2)
    assert m.sv.pending_exact() > 0
    while not m.sv.save_iterate(m.f):
        pass
    block.pages[3] = 9
    block.mark_dirty(3)
    m.finish()
    assert m.error is None
    assert np.array_equal(block.buf, dst_ram.get("ram0").buf)
    assert syncs == [2, 3]


def test_return_path_commands_and_rate_limit_stops_iterate():
    src_ram = ramlist(ram0=4 * MiB)
    dst_ram = ramlist(ram0=4 * MiB)
    src_ram.get("ram0").pages[:] = 3
    m = Migration(Box(src_ram), Box(dst_ram), return_path=True)
    m.f.set_rate_limit(10 * MiB)  # 1 MiB per window
    m.start()
    assert m.sv.save_iterate(m.f) is False  # stopped by the budget, pages left
    assert m.f.rate_limit_exceeded()
    assert m.sv.save_iterate(m.f) is False  # nothing sent while over budget
    sent = m.f.transferred
    assert MiB <= sent <= MiB + 64 * 1024
    m.f.set_rate_limit(0)
    m.finish()
    assert m.error is None
    assert np.array_equal(src_ram.get("ram0").buf, dst_ram.get("ram0").buf)
    assert m.commands[:2] == [(1, b""), (2, b"\0\0\0\1")]  # OPEN_RETURN_PATH, PING(1)
    assert m.commands[-1] == (11, b"")  # SWITCHOVER_START


def test_hotplugged_block_is_announced_and_created_on_destination():
    src_ram = ramlist(ram0=4 * MiB)
    dst_ram = ramlist(ram0=4 * MiB)
    src_ram.get("ram0").pages[:] = 1
    m = Migration(Box(src_ram), Box(dst_ram))
    dirty.log_start(src_ram)  # save_setup does this too; logging must be on before the add below
    m.start()
    m.sv.save_iterate(m.f)
    new = src_ram.add("dimm1", 1 * MiB)
    new.pages[::2] = 0x42
    new.mark_dirty(slice(None))
    while not m.sv.save_iterate(m.f):
        pass
    m.finish()
    assert m.error is None
    got = dst_ram.get("dimm1")
    assert got is not None and got.size == MiB
    assert np.array_equal(new.buf, got.buf)
    assert np.array_equal(src_ram.get("ram0").buf, dst_ram.get("ram0").buf)
    assert m.stats.total == 5 * MiB


def test_removed_block_fails_the_migration():
    src_ram = ramlist(ram0=2 * MiB, dimm1=MiB)
    stats = MigrationStats()
    saver = RAMSaver(src_ram, stats)
    a, b = socket.socketpair()
    reader = threading.Thread(target=lambda: _drain(b), daemon=True)
    reader.start()
    f = OutStream(SocketChannel(a))
    saver.save_setup(f)
    src_ram.remove("dimm1")
    with pytest.raises(RAMError, match="RAM block 'dimm1' removed during migration"):
        saver.save_iterate(f)
    saver.cleanup()
    assert not src_ram.logging
    a.close()
    reader.join(WAIT)
    b.close()


def _drain(sock: socket.socket) -> None:
    buf = bytearray(1 << 20)
    while sock.recv_into(buf):
        pass


def _records(kind: int, pages: list[int], data: bytes = b"") -> bytes:
    out = bytearray()
    for p in pages:
        out += ((p * PAGE_SIZE) | kind | RAM_CONTINUE).to_bytes(8, "big")
        out += data if kind == RAM_PAGE else b"\0"
    return bytes(out)


def _load(dst: RAMList, stream: bytes | bytearray) -> RAMLoader:
    """Load one ram section's records through a socketpair; the loader, for its counts."""
    a, b = socket.socketpair()
    SocketChannel(a).write_all([stream])
    a.close()
    loader = RAMLoader(dst)
    try:
        loader.load(InStream(SocketChannel(b)), 2)
    finally:
        b.close()
    return loader


def test_loader_interleaved_and_scattered_records():
    """QEMU's order (PAGE and ZERO interleaved page by page) and non-contiguous runs."""
    dst = ramlist(ram0=MiB)
    block = dst.get("ram0")
    block.pages[:] = 0xFF
    stream = bytearray((0 | RAM_PAGE).to_bytes(8, "big") + bytes((4,)) + b"ram0" + bytes([1]) * PAGE_SIZE)
    for i in range(1, 100):  # interleaved: page, zero, page, zero...
        stream += _records(RAM_PAGE if i % 2 else RAM_ZERO, [i], bytes([i]) * PAGE_SIZE)
    stream += _records(RAM_PAGE, [200, 150, 170, 171, 172], bytes([9]) * PAGE_SIZE)  # scattered run
    stream += _records(RAM_ZERO, [201, 203, 250])
    stream += (0x10).to_bytes(8, "big")
    loader = _load(dst, stream)
    assert (block.pages[0] == 1).all()
    for i in range(1, 100):
        assert (block.pages[i] == (i if i % 2 else 0)).all(), i
    for i in (200, 150, 170, 171, 172):
        assert (block.pages[i] == 9).all()
    for i in (201, 203, 250):
        assert not block.pages[i].any()
    assert (block.pages[202] == 0xFF).all()
    assert loader.pages + loader.zero_pages == 100 + 5 + 3


def _short_runs(count: int, seed: int) -> list[int]:
    """Sorted pages in runs of 2 or 3 at random places, as a final pass of scattered pages leaves them."""
    rng = np.random.default_rng(seed)
    pages: set[int] = set()
    for start in rng.choice(np.arange(0, 250, 4), count, replace=False):
        pages.update(range(int(start), int(start) + int(rng.integers(2, 4))))
    return sorted(pages)


def test_loader_scattered_short_runs_of_page_records():
    """Runs of 2-3 consecutive PAGE records one after another (a final pass's staged short runs) load
    in bulk, each page its own content."""
    dst = ramlist(ram0=MiB)
    block = dst.get("ram0")
    pages = _short_runs(40, seed=3)
    stream = bytearray((0 | RAM_PAGE).to_bytes(8, "big") + bytes((4,)) + b"ram0" + bytes([1]) * PAGE_SIZE)
    for p in pages:
        stream += _records(RAM_PAGE, [p], bytes([p % 251 + 2]) * PAGE_SIZE)
    stream += (0x10).to_bytes(8, "big")
    loader = _load(dst, stream)
    for p in pages:
        assert (block.pages[p] == p % 251 + 2).all(), p
    assert loader.pages == len(pages) + 1
    untouched = sorted(set(range(1, 256)) - set(pages))
    assert not block.pages[untouched].any()


def test_loader_rejects_a_bad_offset_among_scattered_short_runs():
    dst = ramlist(ram0=MiB)
    pages = _short_runs(20, seed=4) + [(MiB // PAGE_SIZE) + 7]
    stream = (0 | RAM_ZERO).to_bytes(8, "big") + b"\x04ram0\x00" + _records(RAM_PAGE, pages, bytes(PAGE_SIZE))
    with pytest.raises(StreamError, match="Illegal RAM offset"):
        _load(dst, stream)


def test_zero_records_write_zeros_unless_page_is_known_zero():
    dst = ramlist(ram0=MiB)
    block = dst.get("ram0")
    block.pages[3] = 0x77  # touched: a ZERO record must clear it
    prefault(dst)  # the rest was untouched: known zero, no write needed
    stream = ((3 * PAGE_SIZE) | RAM_ZERO).to_bytes(8, "big") + b"\x04ram0\x00"
    stream += _records(RAM_ZERO, list(range(4, 200))) + (0x10).to_bytes(8, "big")
    _load(dst, stream)
    assert not block.buf.any()


def test_loader_rejects_bad_zero_byte_in_bulk_run():
    dst = ramlist(ram0=MiB)
    stream = (0 | RAM_ZERO).to_bytes(8, "big") + b"\x04ram0\x00" + _records(RAM_ZERO, list(range(1, 50)))
    bad = bytearray(stream)
    bad[-1] = 5
    with pytest.raises(StreamError, match="Found a zero page with value 5"):
        _load(dst, bad)


class Writer:
    """A vCPU-like writer: random pages anywhere (untouched ones included), data first, then the mark."""

    def __init__(self, block, seed: int) -> None:
        self.block = block
        self.rng = np.random.default_rng(seed)
        self.stop = threading.Event()
        self.writes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            start = int(self.rng.integers(0, self.block.npages - 8))
            n = int(self.rng.integers(1, 8))
            self.block.pages[start : start + n] = self.rng.integers(1, 256, (n, PAGE_SIZE), dtype=np.uint8)
            self.block.mark_dirty(slice(start, start + n))
            self.writes += 1
            if self.writes % 64 == 0:
                self.stop.wait(0.001)  # let the migration run, like a rate-limited workload


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_concurrent_writer_into_untouched_memory(seed):
    """Pages written after the untouched snapshot, whether before or after they were sent, arrive."""
    src_ram = ramlist(ram0=16 * MiB)
    dst_ram = ramlist(ram0=16 * MiB)
    block = src_ram.get("ram0")
    block.pages[:64] = 1  # mostly untouched
    prefault(dst_ram)
    m = Migration(Box(src_ram), Box(dst_ram))
    m.sv.ram.batch_pages = 32  # many small batches: many chances for a write to race with the scan
    m.sv.ram._stage = np.empty((32, PAGE_SIZE + 8), dtype=np.uint8)
    writer = Writer(block, seed)
    m.sv.save_header(m.f)
    writer.thread.start()
    pause = threading.Event()
    m.sv.save_setup(m.f)
    i = 0
    until = time.monotonic() + WAIT
    while (writer.writes < 300 or i < 20) and time.monotonic() < until:  # writes race with passes
        m.sv.save_iterate(m.f)
        if i % 5 == 0:
            m.sv.pending_exact()
        pause.wait(0.001)
        i += 1
    writer.stop.set()
    writer.thread.join(WAIT)
    assert writer.writes >= 300
    m.finish()
    assert m.error is None
    assert np.array_equal(block.buf, dst_ram.get("ram0").buf)


def test_rate_limit_also_bounds_untouched_zero_records():
    src_ram = ramlist(ram0=64 * MiB)  # untouched: 16384 ZERO records, 147 KB
    dst_ram = ramlist(ram0=64 * MiB)
    m = Migration(Box(src_ram), Box(dst_ram))
    m.start()
    m.f.set_rate_limit(200_000)  # 20 kB per window
    m.f.reset_window()
    before = m.f.transferred
    assert m.sv.save_iterate(m.f) is False
    assert m.f.transferred - before <= 20_000 + 4104 + 64
    m.f.set_rate_limit(0)
    m.finish()
    assert m.error is None
    assert not dst_ram.get("ram0").buf.any()


def test_rate_limited_iterations_spend_the_window_budget():
    """The migration thread's loop over real RAM: iterate while the window has budget, sleep, reset."""
    src_ram = ramlist(ram0=48 * MiB)
    dst_ram = ramlist(ram0=48 * MiB)
    block = src_ram.get("ram0")
    block.buf[:] = np.random.default_rng(9).integers(1, 256, block.size, dtype=np.uint8)
    m = Migration(Box(src_ram), Box(dst_ram))
    m.start()
    bps = 30_000_000
    m.f.set_rate_limit(bps)
    limit = bps // 10
    pause = threading.Event()
    per_window: list[int] = []
    m.f.reset_window()
    window_start, window_bytes = time.monotonic(), m.f.transferred
    while len(per_window) < 12:  # ~1.2 s, 36 MB of the 48 MiB
        if not m.f.rate_limit_exceeded():
            m.sv.save_iterate(m.f)
            continue
        pause.wait(max(0.0, window_start + 0.1 - time.monotonic()))
        per_window.append(m.f.transferred - window_bytes)
        m.f.reset_window()
        window_start, window_bytes = time.monotonic(), m.f.transferred
    m.f.set_rate_limit(0)
    m.finish()
    assert m.error is None
    assert np.array_equal(block.buf, dst_ram.get("ram0").buf)
    for sent in per_window:
        assert abs(sent - limit) / limit < 0.05, per_window


@pytest.mark.parametrize("logging", [True, False], ids=["logging", "not-logging"])
def test_loader_marks_the_pages_it_writes_dirty_while_logging(logging: bool) -> None:
    """A relay sends a machine on while it loads: every page the loader writes (per-record and bulk
    paths, PAGE and ZERO) is in the dirty log, and only those; nothing is marked without logging."""
    dst = ramlist(ram0=MiB * 2)
    block = dst.get("ram0")
    block.pages[:] = 0xFF  # touched: ZERO records write
    if logging:
        dirty.log_start(dst)
    stream = bytearray((0 | RAM_PAGE).to_bytes(8, "big") + bytes((4,)) + b"ram0" + bytes([1]) * PAGE_SIZE)
    for i in range(1, 100):  # interleaved, one by one
        stream += _records(RAM_PAGE if i % 2 else RAM_ZERO, [i], bytes([i]) * PAGE_SIZE)
    stream += _records(RAM_PAGE, [200, 150, 170, 171, 172], bytes([9]) * PAGE_SIZE)  # scattered
    stream += _records(RAM_PAGE, list(range(300, 400)), bytes([5]) * PAGE_SIZE)  # a bulk run
    stream += _records(RAM_ZERO, list(range(400, 480)))
    stream += (0x10).to_bytes(8, "big")
    a, b = socket.socketpair()
    writer = threading.Thread(target=SocketChannel(a).write_all, args=([bytes(stream)],))
    writer.start()
    RAMLoader(dst).load(InStream(SocketChannel(b)), 2)
    writer.join(WAIT)
    a.close()
    b.close()
    marked = set(np.flatnonzero(dirty.sync(dst)["ram0"]).tolist())
    if logging:
        assert marked == set(range(100)) | {150, 170, 171, 172, 200} | set(range(300, 480))
    else:
        assert marked == set()
    assert (block.pages[350] == 5).all() and not block.pages[450].any()
