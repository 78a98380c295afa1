"""Zero copy on both ends (issue 13 item 1): pages leave straight from guest RAM and land straight in it.

Real daemons: one channel and multifd, with and without ``zero-copy-send``, land with equal RAM digests;
the capability is refused with QEMU's texts (without multifd, with compression, with TLS, on a unix
socket); a cancel mid-way with zero-copy-send leaves the guest running. In process: the vCPU hold the
source relies on while hashing pages it sends from RAM, and the vectored/exact reads of the receivers,
truncated streams included.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import signal
import socket
import termios
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from helpers import Migd, random_ram_file, settled, thread_names, wait_for

from migd.analyze import analyze, block_path
from migd.machine.ram import RAMList
from migd.machine.vcpu import VCPU, VCPUSet
from migd.migration.format import (
    FEATURE_CHECKSUM,
    FEATURE_PAGE_RUNS,
    RAM_CONTINUE,
    RAM_EOS,
    RAM_PAGE,
    RAM_X_MIGD_RUN,
    Section,
)
from migd.migration.params import ZERO_COPY_ONLY, MigrationConfig, ParamError
from migd.migration.ram import RAMLoader, _run_count, _short_run_pages
from migd.migration.savevm import SaveVM, load_stream
from migd.migration.stats import MigrationStats
from migd.migration.stream import InStream, OutStream, StreamError
from migd.transports.channel import FdChannel, SocketChannel
from migd.transports.zerocopy import NOT_DETECTED, ZeroCopySocket

MiB = 1 << 20
GUEST = "32M"


@pytest.fixture
def random_ram(tmp_path: Path) -> Path:
    """Guest RAM of random bytes (``--mem-path``): every page is a PAGE record of its full size."""
    return random_ram_file(tmp_path / "ram.bin", int(GUEST.rstrip("M")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _caps(vm: Migd, **caps: bool) -> None:
    vm.cmd("migrate-set-capabilities",
           capabilities=[{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()])


def _multifd(vm: Migd, channels: int = 2, zero_copy: bool = False) -> None:
    _caps(vm, multifd=True)
    vm.cmd("migrate-set-parameters", **{"multifd-channels": channels})
    if zero_copy:
        _caps(vm, zero_copy_send=True)


def _end(vm: Migd) -> dict[str, Any]:
    info: dict[str, Any] = vm.wait_for(
        lambda: (lambda i: i if i["status"] in ("completed", "failed", "cancelled") else None)(
            vm.cmd("query-migrate")), timeout=120, what="migration end")
    return info


def _migrate(src: Migd, dst: Migd, uri: str) -> dict[str, Any]:
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    src.cmd("migrate", uri=uri)
    info = _end(src)
    assert info["status"] == "completed", info
    wait_for(lambda: dst.cmd("query-migrate").get("status") == "completed", timeout=30, what="landed")
    assert src.cmd("x-migd-ram-digest") == dst.cmd("x-migd-ram-digest")
    assert info["ram"]["normal"] >= int(GUEST.rstrip("M")) * MiB // 4096 // 2, info["ram"]
    return info


@pytest.mark.parametrize("paused", [True, False], ids=["paused-source", "running-guest"])
def test_one_channel_from_ram_lands_with_equal_digests(migd_factory: Any, random_ram: Path, paused: bool) -> None:
    # paused: pages leave straight from RAM with the vCPUs held; running: the checksum digest needs the
    # staging copy while the guest writes. Both are checked by the stream's checksum records.
    args = ["-S"] if paused else ["--workload", "random,rate=16M"]
    src = migd_factory("src", "-m", GUEST, "--mem-path", str(random_ram), *args)
    uri = f"unix:{src.sock_path('mig')}"
    dst = migd_factory("dst", "-m", GUEST, "-S", "--incoming", uri)
    _migrate(src, dst, uri)


@pytest.mark.parametrize("zero_copy", [False, True], ids=["plain", "zero-copy-send"])
def test_multifd_lands_with_equal_digests(migd_factory: Any, random_ram: Path, zero_copy: bool) -> None:
    src = migd_factory("src", "-m", GUEST, "--mem-path", str(random_ram), "--workload", "random,rate=16M")
    uri = f"tcp:127.0.0.1:{_free_port()}"
    dst = migd_factory("dst", "-m", GUEST, "-S", "--incoming", uri)
    for vm in (src, dst):
        _multifd(vm, 2, zero_copy)
    info = _migrate(src, dst, uri)
    missed = info["ram"]["dirty-sync-missed-zero-copy"]
    if zero_copy:  # loopback: the kernel copies, and every completion says so (QEMU counts each flush)
        assert missed >= 2, info["ram"]
    else:
        assert missed == 0, info["ram"]


def _caps_error(vm: Migd, **caps: bool) -> str:
    return vm.cmd_error("migrate-set-capabilities", capabilities=[
        {"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()])["desc"]


def test_zero_copy_send_refusals_in_qemus_words(migd_factory: Any) -> None:
    vm = migd_factory("vm", "-m", "16M")
    before = vm.cmd("query-migrate-capabilities")
    assert _caps_error(vm, zero_copy_send=True) == ZERO_COPY_ONLY  # without multifd
    vm.cmd("migrate-set-parameters", **{"multifd-compression": "zstd"})
    assert _caps_error(vm, multifd=True, zero_copy_send=True) == ZERO_COPY_ONLY  # with compression
    assert vm.cmd("query-migrate-capabilities") == before  # a refusal changes nothing
    vm.cmd("migrate-set-parameters", **{"multifd-compression": "none"})
    _caps(vm, multifd=True, zero_copy_send=True)
    for change in ({"multifd-compression": "zlib"}, {"tls-creds": "tls0"}):  # compression, TLS
        err = vm.cmd_error("migrate-set-parameters", **change)
        assert err == {"class": "GenericError", "desc": ZERO_COPY_ONLY}, err
    assert _caps_error(vm, multifd=False) == ZERO_COPY_ONLY  # multifd off under it
    params = vm.cmd("query-migrate-parameters")
    assert params["multifd-compression"] == "none" and params["tls-creds"] == ""


def test_zero_copy_send_on_a_unix_socket_fails_the_migration(migd_factory: Any) -> None:
    src = migd_factory("src", "-m", "16M", "--workload", "random,rate=16M")
    uri = f"unix:{src.sock_path('mig')}"
    dst = migd_factory("dst", "-m", "16M", "-S", "--incoming", uri)
    for vm in (src, dst):
        _multifd(vm, 2, zero_copy=True)
    src.cmd("migrate", uri=uri)
    info = _end(src)
    assert info["status"] == "failed" and info["error-desc"] == NOT_DETECTED, info
    assert src.cmd("query-status")["status"] == "running"


def test_zero_copy_send_cancel_midway_leaves_the_guest_running(migd_factory: Any, random_ram: Path) -> None:
    src = migd_factory("src", "-m", GUEST, "--mem-path", str(random_ram), "--workload", "random,rate=64M")
    uri = f"tcp:127.0.0.1:{_free_port()}"
    dst = migd_factory("dst", "-m", GUEST, "-S", "--incoming", uri)
    for vm in (src, dst):
        _multifd(vm, 2, zero_copy=True)
    # it cannot complete (pause-before-switchover) and mostly iterates (dirtying guest, 1 ms limit); once
    # pages flow the destination is stopped and reads nothing more, so the source is mid-way (sending,
    # or waiting for zero-copy completions) for as long as this takes; its silence watch is far away
    _caps(src, pause_before_switchover=True)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0, "downtime-limit": 1, "x-migd-peer-timeout": 600})
    src.cmd("migrate", uri=uri)
    wait_for(lambda: src.cmd("query-migrate").get("ram", {}).get("transferred", 0) > 4 * MiB, timeout=60,
             what="pages on the way")
    os.kill(dst.proc.pid, signal.SIGSTOP)
    try:
        assert src.cmd("query-migrate")["status"] in ("active", "pre-switchover")
        src.cmd("migrate_cancel")
        assert _end(src)["status"] == "cancelled"
        settled(src, "running")  # it may have been cancelled in pre-switchover
        wait_for(lambda: not thread_names(src, "mig/src/mfd"), timeout=10, what="sender threads gone")
    finally:
        os.kill(dst.proc.pid, signal.SIGCONT)
    assert dst.wait(timeout=30) == 1  # the destination failed its load and exited


# -- in process -------------------------------------------------------------------------------------


def test_config_applies_qemus_rule_to_capabilities_and_parameters() -> None:
    c = MigrationConfig()
    with pytest.raises(ParamError, match=ZERO_COPY_ONLY):
        c.set_capabilities([("zero-copy-send", True)])
    c.set_capabilities([("multifd", True), ("zero-copy-send", True)])
    assert c.cap("zero-copy-send")
    with pytest.raises(ParamError, match=ZERO_COPY_ONLY):
        c.set_parameters({"multifd-compression": "zstd"})
    assert c.param("multifd-compression") == "none"


def test_hold_keeps_paused_vcpus_paused_across_a_resume() -> None:
    ran = threading.Event()

    def runner(_v: VCPU) -> None:
        ran.set()

    vset = VCPUSet(2, runner)
    vset.start()
    try:
        assert vset.hold_paused()  # started paused
        vset.resume_all()
        assert not ran.wait(0.3)  # held: nothing runs (a bounded look, not a synchronisation)
        assert vset.all_paused()
        vset.release_hold()
        assert ran.wait(10)  # the resume asked for meanwhile takes effect
        assert not vset.hold_paused()  # running vCPUs cannot be held
    finally:
        vset.shutdown()


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    return a, b


def test_exact_reads_leave_bulk_data_for_the_scatter_list() -> None:
    a, b = _pair()
    payload = os.urandom(3 * 4096 + 100)
    a.sendall(b"HEAD" + payload)
    a.close()
    f = InStream(SocketChannel(b), 1 << 16, readahead=False)
    f.start_digest()
    assert f.read(4) == b"HEAD"
    assert f.available == 0  # nothing read ahead: the rest is still in the socket
    dst = [memoryview(bytearray(4096)), memoryview(bytearray(8192)), memoryview(bytearray(100))]
    f.read_into_iov(dst)
    assert b"".join(bytes(v) for v in dst) == payload
    assert f.consumed == 4 + len(payload)
    assert f.digest()[1] == len(payload) + 4
    assert f.at_eof()


def test_a_truncated_scatter_read_is_refused() -> None:
    a, b = _pair()
    a.sendall(os.urandom(5000))
    a.close()
    f = InStream(SocketChannel(b), 1 << 16, readahead=False)
    with pytest.raises(StreamError, match="Migration stream truncated"):
        f.read_into_iov([memoryview(bytearray(4096)), memoryview(bytearray(4096))])


def test_put_iov_hashes_what_it_sends() -> None:
    a, b = _pair()
    out = OutStream(SocketChannel(a))
    out.start_digest()
    parts = [os.urandom(8), os.urandom(4096), os.urandom(8), os.urandom(4096)]
    out.put(b"x")
    out.put_iov([memoryview(p) for p in parts])
    out.flush()
    a.close()
    f = InStream(SocketChannel(b))
    f.start_digest()
    f.skip(1 + sum(map(len, parts)))
    assert f.digest() == out.digest()
    assert out.transferred == 1 + sum(map(len, parts))


def test_page_references_over_a_unix_socket_arrive_intact_and_settle_waits_for_the_reader() -> None:
    """Registered memory leaves a unix socket as page references; ``settle`` returns once the peer
    consumed them (empty send queue), so the memory may change afterwards; TCP and read-only memory
    are copied as before."""
    a, b = _pair()
    mem = mmap.mmap(-1, 2 * MiB)
    ram = np.frombuffer(mem, dtype=np.uint8)
    ram[:] = np.frombuffer(os.urandom(2 * MiB), dtype=np.uint8)
    want = b"head" + ram[4096:].tobytes() + b"tail"
    out = OutStream(SocketChannel(a))
    assert out.splice_from(ram)
    assert not out.splice_from(b"read-only bytes")
    out.start_digest()
    got = bytearray(len(want))
    reader = threading.Thread(target=lambda: InStream(SocketChannel(b)).read_into(memoryview(got)))
    reader.start()
    out.put(b"head")
    out.put_iov([ram.data[4096:]])
    out.put(b"tail")
    out.flush()
    out.settle()
    queued = bytearray(4)
    fcntl.ioctl(a.fileno(), termios.TIOCOUTQ, queued)
    assert int.from_bytes(queued, "little") == 0  # the peer has consumed every reference
    reader.join(30)
    ram[:] = 0  # after settle: changes can no longer reach the peer
    assert bytes(got) == want
    assert out.transferred == len(want)
    assert out.digest() == (xxhash.xxh3_64_intdigest(want), len(want))
    out.close()
    with socket.create_server(("127.0.0.1", 0)) as srv:
        c = socket.create_connection(srv.getsockname())
        try:
            assert not OutStream(SocketChannel(c)).splice_from(ram)  # tcp: copied
        finally:
            c.close()


def test_zero_copy_socket_on_loopback_reports_the_kernels_copy() -> None:
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        c = socket.create_connection(lst.getsockname())
        s, _ = lst.accept()
    data = os.urandom(4 * MiB)
    got = bytearray()

    def reader() -> None:
        while len(got) < len(data):
            chunk = s.recv(MiB)
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    try:
        zc = ZeroCopySocket(c)
        view, pos = memoryview(data), 0
        for _ in range(10_000):
            if pos == len(data):
                break
            pos += zc.send([view[pos:]], lambda: False)
        assert zc.flush(lambda: False)  # loopback: copied, a missed zero copy
        assert zc.completed == zc.queued >= 1 and zc.copied == zc.queued
        t.join(30)
        assert bytes(got) == data
    finally:
        c.close()
        s.close()
    u, v = socket.socketpair()
    with u, v, pytest.raises(OSError):
        ZeroCopySocket(u)  # unix sockets: EOPNOTSUPP (the daemon reports QEMU's NOT_DETECTED)


# -- [migd] page runs on the main channel (FEATURE_PAGE_RUNS) ---------------------------------------


def _block_ram(pages: int = 64) -> RAMList:
    r = RAMList()
    r.add("ram0", pages * 4096)
    return r


def _run_stream(first_page: bytes, run_at: int, count: int, payload: bytes) -> bytes:
    """A PART of ram: a PAGE record naming ram0 (page 0), one run record, EOS."""
    out = (RAM_PAGE.to_bytes(8, "big") + bytes((4,)) + b"ram0" + first_page
           + ((run_at * 4096) | RAM_X_MIGD_RUN | RAM_CONTINUE).to_bytes(8, "big") + count.to_bytes(4, "big")
           + payload)
    return out + RAM_EOS.to_bytes(8, "big")


def _load(data: bytes, ram: RAMList, runs: bool = True) -> RAMLoader:
    a, b = socket.socketpair()
    with a:
        a.sendall(data)
    f = InStream(SocketChannel(b))
    loader = RAMLoader(ram)
    loader.page_runs = runs
    try:
        loader.load(f, Section.PART)
    finally:
        b.close()
    return loader


def test_a_page_run_lands_straight_in_ram() -> None:
    ram = _block_ram()
    page0, pages = os.urandom(4096), os.urandom(10 * 4096)
    loader = _load(_run_stream(page0, 5, 10, pages), ram)
    block = ram.get("ram0")
    assert block is not None
    assert block.pages[0].tobytes() == page0 and block.pages[5:15].tobytes() == pages
    assert not block.pages[1:5].any() and not block.pages[15:].any()
    assert loader.pages == 11


@pytest.mark.parametrize("run_at,count,payload,error", [
    (5, 0, b"", "Invalid page run of 0 pages at RAM offset 5000"),
    (60, 10, bytes(10 * 4096), "Illegal RAM offset 40000"),  # past the end of the 64-page block
    (5, (1 << 16) + 1, b"", "Invalid page run of 65537 pages"),
    (5, 10, bytes(3 * 4096 + 7), "Migration stream truncated"),
])
def test_bad_page_runs_are_refused(run_at: int, count: int, payload: bytes, error: str) -> None:
    ram = _block_ram()
    with pytest.raises(StreamError, match=error):
        _load(_run_stream(bytes(4096), run_at, count, payload), ram)
    if "Illegal" in error or "Invalid" in error:  # checked before a byte of the run is read
        block = ram.get("ram0")
        assert block is not None and not block.pages.any()


def test_a_page_run_from_a_source_that_did_not_announce_runs_is_unknown() -> None:
    with pytest.raises(StreamError, match="Unknown combination of migration flags: 0x420"):
        _load(_run_stream(bytes(4096), 5, 1, bytes(4096)), _block_ram(), runs=False)


@pytest.mark.parametrize(("held", "scattered"), [(True, False), (False, False), (True, True)],
                         ids=["from-ram", "staged", "short-runs-staged"])
def test_save_with_runs_and_checksums_loads_equal(held: bool, scattered: bool) -> None:
    """SaveVM with page runs and checksum records -> socketpair -> load_stream: equal RAM, every
    checksum matched, pages from RAM (vCPUs held) or from the staging copy (vCPUs running); with
    ``scattered``, runs of 1, 2 and 3 pages between zero pages, which go as staged PAGE records
    (ram.MIN_DIRECT_RUN) next to the long runs straight from RAM."""
    src, dst = _block_ram(2048), _block_ram(2048)
    block = src.get("ram0")
    assert block is not None
    block.pages[:] = np.frombuffer(os.urandom(2048 * 4096), dtype=np.uint8).reshape(2048, 4096)
    block.pages[100:300] = 0  # zero records between runs
    if scattered:  # more short-run pages in one batch than the staging array holds (batch_pages)
        block.pages[300:1400:2] = 0  # runs of one page
        block.pages[1500:1650:3] = 0  # of two
        block.pages[1700:1900:4] = 0  # of three
    vset = VCPUSet(1)
    vset.start()
    if not held:
        vset.resume_all()
    a, b = socket.socketpair()
    out = OutStream(SocketChannel(a))
    out.set_rate_limit(0)
    sv = SaveVM(_RAMBox(src, vset), MigrationStats(), False, FEATURE_CHECKSUM | FEATURE_PAGE_RUNS)
    sv.ram.page_runs = lambda: True
    result: list[BaseException | int] = []

    def load() -> None:
        try:
            result.append(load_stream(InStream(SocketChannel(b)), _RAMBox(dst, None)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            result.append(exc)

    t = threading.Thread(target=load)
    t.start()
    try:
        sv.save_header(out)
        sv.save_setup(out)
        for _ in range(100):
            if sv.save_iterate(out):
                break
        sv.save_complete_precopy(out)
        out.flush()
        a.shutdown(socket.SHUT_WR)
        t.join(60)
    finally:
        sv.ram.cleanup()
        vset.shutdown()
        a.close()
    assert result and not isinstance(result[0], BaseException), result
    assert result[0] & FEATURE_PAGE_RUNS
    dblock = dst.get("ram0")
    assert dblock is not None and np.array_equal(dblock.pages, block.pages)
    # staging copies that a held guest's pass does not make are counted apart (the policy leaves them out)
    assert (sv.ram.live_copy_s > 0) == (not held)


class _RAMBox:
    """What SaveVM/load_stream need of a machine: RAM, vCPUs, no devices."""

    def __init__(self, ram: RAMList, vcpus: VCPUSet | None) -> None:
        self.ram = ram
        self.vcpus = vcpus

    def devices(self) -> list[Any]:
        return []


def test_short_runs_are_told_apart_from_long_ones() -> None:
    idx = np.array([1, 3, 4, 10, 11, 12, 13, 20, 21, 22], dtype=np.int64)
    assert _short_run_pages(idx, 4).tolist() == [True, True, True, False, False, False, False,
                                                 True, True, True]
    assert not _short_run_pages(np.arange(5, 9), 4).any()
    assert _run_count(idx) == 4 and _run_count(np.arange(5, 9)) == 1 and _run_count(idx[:0]) == 0


def test_analyze_reads_page_runs(tmp_path: Path) -> None:
    """`migctl analyze` walks a stream with page runs: every checksum good, RAM extracted equal."""
    src = _block_ram(512)
    block = src.get("ram0")
    assert block is not None
    block.pages[:] = np.frombuffer(os.urandom(512 * 4096), dtype=np.uint8).reshape(512, 4096)
    block.pages[10:20] = 0
    path = tmp_path / "stream.bin"
    out = OutStream(FdChannel(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)))
    sv = SaveVM(_RAMBox(src, None), MigrationStats(), False, FEATURE_CHECKSUM | FEATURE_PAGE_RUNS)
    sv.ram.page_runs = lambda: True
    sv.save_header(out)
    sv.save_setup(out)
    for _ in range(100):
        if sv.save_iterate(out):
            break
    sv.save_complete_precopy(out)
    sv.ram.cleanup()
    out.close()
    assert path.stat().st_size < 502 * 4104  # runs, not one 8-byte header per page
    a = analyze(path, tmp_path / "x")
    assert a.checksums and all(ok for _, _, ok in a.checksums), a.checksums
    stats = a.blocks["ram0"]
    assert stats.page_records == 502 and stats.zero_records == 10
    assert block_path(tmp_path / "x" / "ram", "ram0").read_bytes() == block.buf.tobytes()


def test_a_socket_subclass_that_reads_through_a_layer_is_not_bypassed() -> None:
    """A SocketChannel subclass with its own read_into (TLS) gets its own reads for scatter lists too."""

    class Doubling(SocketChannel):
        def read_into(self, mv: Any) -> int:
            n = super().read_into(mv[:1])
            mv[0] = mv[0] * 2 % 256
            return n

    a, b = _pair()
    with a:
        a.sendall(bytes([3, 4]))
    ch = Doubling(b)
    with ch:
        f = InStream(ch, 1 << 16, readahead=False)
        dst = [memoryview(bytearray(1)), memoryview(bytearray(1))]
        f.read_into_iov(dst)
        assert bytes(dst[0]) + bytes(dst[1]) == bytes([6, 8])


def test_dirty_layout_counts_runs_and_pages_in_long_runs() -> None:
    """The dirty pages' runs, and the share of pages in runs of at least N consecutive ones: what a
    final pass by page references sends as references."""
    ram = _block_ram(100)
    sv = SaveVM(_RAMBox(ram, None), MigrationStats(), False, 0)
    a, b = socket.socketpair()
    out = OutStream(SocketChannel(a))
    try:
        sv.ram.save_setup(out)
        bmap = sv.ram._tracked[0].bmap
        assert sv.ram.dirty_layout(16) == (1, 1.0)  # all dirty after setup: one run
        bmap[:] = False
        assert sv.ram.dirty_layout(16) == (0, 0.0)
        bmap[0:20] = bmap[30:33] = bmap[50:70] = bmap[99] = True
        runs, share = sv.ram.dirty_layout(16)
        assert runs == 4 and share == pytest.approx(40 / 44)
        assert sv.ram.dirty_layout(1) == (4, 1.0)
    finally:
        sv.ram.cleanup()
        out.close()
        b.close()
