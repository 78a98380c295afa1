"""multifd framing and threads over real unix sockets: MultifdSender's channels into a MultifdReceiver
accepting from a real listener, guest RAM on both ends; bad initial packets; a channel the peer closes."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from migd.machine.ram import RAMList
from migd.migration import multifd
from migd.migration.multifd import MultifdReceiver, MultifdSender
from migd.migration.stream import OutStream, StreamError
from migd.transports import connect, listen, parse_uri
from migd.transports.channel import SocketChannel

T = TypeVar("T")
PAGES = 1024


def on_thread(name: str, fn: Callable[[], T], timeout: float = 30) -> T:
    """Run ``fn`` on a thread called ``name`` (the thread markers check it) and return its result."""
    out: list[Any] = []

    def body() -> None:
        try:
            out.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            out.append((False, exc))

    t = threading.Thread(target=body, name=name)
    t.start()
    t.join(timeout)
    assert out, f"{name} did not finish within {timeout}s"
    ok, value = out[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


class Ends:
    """A source RAM, a destination RAM, a listener, a receiver, a sender and a main channel pair."""

    def __init__(self, tmp: Path, channels: int, method: str) -> None:
        self.src, self.dst = RAMList(), RAMList()
        self.sblock = self.src.add("pc.ram", PAGES * 4096)
        self.dblock = self.dst.add("pc.ram", PAGES * 4096)
        rng = np.random.default_rng(7)
        self.sblock.pages[::2] = rng.integers(1, 255, size=(PAGES // 2, 4096), dtype=np.uint8)
        self.sblock.pages[1::4] = 0  # zero pages to be found by the channel threads
        self.dblock.pages[:] = 0xAB  # stale destination contents everywhere
        self.errors: list[str] = []
        self.uri = f"unix:{tmp}/mfd.sock"
        self.listener = listen(self.uri)
        self.receiver = MultifdReceiver(self.dst, channels, method, self.errors.append)
        self.receiver.accept_from(self.listener)
        a, b = socket.socketpair()
        self.main_src, self.main_dst = SocketChannel(a), SocketChannel(b)
        self.stream = OutStream(self.main_src)
        self.sender = MultifdSender([connect(self.uri) for _ in range(channels)], self.stream, method, 3)
        self.sender.start()

    def close(self) -> None:
        self.sender.close()
        self.receiver.close()
        self.main_src.close()
        self.main_dst.close()
        self.src.remove("pc.ram")
        self.dst.remove("pc.ram")


@pytest.fixture
def ends(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Ends]:
    channels, method = getattr(request, "param", (2, "none"))
    e = Ends(tmp_path, channels, method)
    yield e
    e.close()


def _round(e: Ends, batches: list[tuple[np.ndarray, np.ndarray]]) -> None:
    def send() -> None:
        for cand, zero in batches:
            e.sender.queue(e.sblock, cand, zero)
        e.sender.sync(wait=True)
    on_thread("mig/src/main", send)
    on_thread("mig/dst/main", e.receiver.sync_main)


@pytest.mark.parametrize("ends", [(2, "none"), (4, "none"), (2, "zlib"), (3, "zstd")], indirect=True)
def test_pages_land_after_the_sync_point(ends: Ends) -> None:
    e = ends
    every = np.arange(PAGES)
    known_zero = every[3::4]  # never read on the source: known zero (untouched there)
    e.sblock.pages[known_zero] = 0
    rest = np.setdiff1d(every, known_zero)
    _round(e, list(zip(np.array_split(rest, 8), np.array_split(known_zero, 8), strict=True)))
    assert np.array_equal(e.sblock.pages, e.dblock.pages)
    normal, zero, nbytes = on_thread("mig/src/main", e.sender.collect)
    assert normal == PAGES // 2 and zero == PAGES // 2
    assert nbytes == e.sender.bytes > 0
    assert not e.errors and e.receiver.error is None and e.stream.error is None


def test_a_later_round_wins_whichever_channel_carries_it(ends: Ends) -> None:
    e = ends
    page = np.array([5])
    for value in (1, 2, 3):
        e.sblock.pages[5] = value
        _round(e, [(page, page[:0]), (np.array([7]), page[:0])])  # two batches: both channels busy
        assert int(e.dblock.pages[5][0]) == value


def test_bad_initial_packets_fail_the_receiver_with_qemu_words(tmp_path: Path) -> None:
    dst = RAMList()
    dst.add("pc.ram", 16 * 4096)
    uri = f"unix:{tmp_path}/bad.sock"
    for packet, text in (
        (b"\x12" * 64, "multifd: received packet magic 12121212 and expected magic 11223344"),
        (multifd.INIT.pack(multifd.MAGIC, 2, bytes(16), 0, 0), "received packet version 2 and expected version 1"),
        (multifd.init_packet(bytes(16), 9), "received channel id 9 is greater than number of channels 2"),
        (multifd.init_packet(bytes(16), 0, 3), "the source opens 3 channels and this destination expects 2"),
    ):
        errors: list[str] = []
        receiver = MultifdReceiver(dst, 2, "none", errors.append)
        receiver.accept_from(listen(uri))
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(f"{tmp_path}/bad.sock")
            s.sendall(packet)
            for _ in range(600):
                if errors:
                    break
                threading.Event().wait(0.05)
        assert errors and text in errors[0], errors
        with pytest.raises(StreamError, match="multifd"):
            on_thread("mig/dst/main", receiver.sync_main)
        receiver.close()
    dst.remove("pc.ram")


def test_a_channel_closed_by_the_peer_aborts_the_main_stream(ends: Ends) -> None:
    e = ends
    for _ in range(600):
        if len(e.receiver.channels) == 2:
            break
        threading.Event().wait(0.05)
    for t in e.receiver.channels.values():  # the destination drops one channel
        t.channel.shutdown()
        break
    with pytest.raises(StreamError, match="multifd channel"):
        def flood() -> None:
            for _ in range(2000):  # far more than socket buffers hold
                e.sender.queue(e.sblock, np.arange(0, PAGES, 2), np.arange(0))
        on_thread("mig/src/main", flood)
    assert e.stream.error is not None and e.stream.error.startswith("multifd channel")
    e.sender.close()
    assert not any(t.is_alive() for t in e.sender.threads)


def test_supports_only_socket_transports() -> None:
    assert multifd.supports(parse_uri("tcp:127.0.0.1:1")) and multifd.supports(parse_uri("unix:/x"))
    for uri in ("exec:cat", "file:/tmp/x", "fd:3"):
        assert not multifd.supports(parse_uri(uri))


def test_a_compression_other_than_the_destinations_is_refused(tmp_path: Path) -> None:
    dst, src = RAMList(), RAMList()
    dblock = dst.add("pc.ram", 16 * 4096)
    sblock = src.add("pc.ram", 16 * 4096)
    sblock.pages[:] = 7
    uri = f"unix:{tmp_path}/c.sock"
    errors: list[str] = []
    receiver = MultifdReceiver(dst, 1, "none", errors.append)
    receiver.accept_from(listen(uri))
    a, b = socket.socketpair()
    main = SocketChannel(a)
    stream = OutStream(main)
    sender = MultifdSender([connect(uri)], stream, "zstd", 1)
    sender.start()
    on_thread("mig/src/main", lambda: sender.queue(sblock, np.arange(16), np.arange(0)))
    for _ in range(600):
        if errors:
            break
        threading.Event().wait(0.05)
    assert errors and "multifd 0: flags received 4 flags expected 0" in errors[0], errors
    assert not dblock.pages.any()  # nothing of the refused packet was written
    sender.close()
    receiver.close()
    main.close()
    b.close()
    dst.remove("pc.ram")
    src.remove("pc.ram")


def test_known_zero_pages_are_rewritten_once_they_held_data(tmp_path: Path) -> None:
    """A fresh destination skips zero pages it knows are zero, but not once a round wrote data there."""
    e = Ends(tmp_path, 2, "none")
    try:
        fresh = e.dst.add("fresh", 64 * 4096)  # untouched: every page known zero
        src = e.src.add("fresh", 64 * 4096)
        src.pages[3] = 9
        for cand in (np.array([3]), np.array([3])):
            def send(cand: np.ndarray = cand) -> None:
                e.sender.queue(src, cand, np.arange(0))
                e.sender.sync(wait=True)
            on_thread("mig/src/main", send)
            on_thread("mig/dst/main", e.receiver.sync_main)
            assert int(fresh.pages[3][0]) == int(src.pages[3][0])
            src.pages[3] = 0  # the second round finds it zero on the source
        assert not fresh.pages.any() and e.errors == []
        e.dst.remove("fresh")
        e.src.remove("fresh")
    finally:
        e.close()


def _reference_zero(words: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return ~words[idx].any(axis=1)


def test_split_zero_agrees_with_a_full_check_of_every_page() -> None:
    """The sender's zero split decides a batch from first/last words only when every page holds
    data there; pages zero at both ends but not in the middle still go as normal pages."""
    rl = RAMList()
    block = rl.add("pc.ram", 256 * 4096)
    try:
        rng = np.random.default_rng(3)
        block.pages[:] = rng.integers(1, 255, size=(256, 4096), dtype=np.uint8)
        words = block.words
        every = np.arange(256)
        normal, zero = multifd._split_zero(words, every)  # random RAM: nothing zero
        assert np.array_equal(normal, every) and zero.size == 0
        block.pages[10:20] = 0  # zero pages
        block.pages[30, :8] = 0  # data in the middle only: first and last words zero
        block.pages[30, -8:] = 0
        block.pages[40, 8:-8] = 0  # zero in the middle only
        for idx in (every, every[5:45], every[::3], np.array([10, 30, 31, 40, 200])):
            normal, zero = multifd._split_zero(words, idx)
            want = _reference_zero(words, idx)
            assert np.array_equal(zero, idx[want]) and np.array_equal(normal, idx[~want]), idx
        assert 30 in multifd._split_zero(words, every)[0]
    finally:
        rl.remove("pc.ram")


def test_be_offsets_are_the_pages_byte_offsets_big_endian() -> None:
    for idx in (np.arange(7, 19), np.array([0, 2, 3, 9, 70000]), np.arange(0)):
        want = b"".join((int(i) * 4096).to_bytes(8, "big") for i in idx)
        assert multifd._be_offsets(idx).tobytes() == want


@pytest.mark.parametrize("ends", [(2, "none"), (2, "zstd")], indirect=True)
def test_one_big_scattered_batch_lands_in_many_packets(ends: Ends) -> None:
    """A batch of every page with data and zero pages interleaved: several packets' worth of normal
    pages, and more views than one vectored write takes (every other page is its own run)."""
    e = ends
    big = 4096
    src, dst = e.src.add("big", big * 4096), e.dst.add("big", big * 4096)
    try:
        dst.pages[:] = 0xAB  # stale: zero pages must be written as zero
        src.pages[0::2] = np.random.default_rng(9).integers(1, 255, size=(big // 2, 4096), dtype=np.uint8)
        src.pages[1::8, 2048] = 5  # a quarter of the odd pages hold data in the middle only

        def send() -> None:
            e.sender.queue(src, np.arange(big), np.arange(0))
            e.sender.sync(wait=True)
        on_thread("mig/src/main", send)
        on_thread("mig/dst/main", e.receiver.sync_main)
        assert np.array_equal(src.pages, dst.pages)
        normal, zero, _ = on_thread("mig/src/main", e.sender.collect)
        assert (normal, zero) == (big // 2 + big // 8, big // 2 - big // 8)
        src.pages[:] = 0  # a second round of zero pages only: 32 KiB of offsets in one packet
        on_thread("mig/src/main", send)
        on_thread("mig/dst/main", e.receiver.sync_main)
        assert not dst.pages.any()
        assert on_thread("mig/src/main", e.sender.collect)[:2] == (0, big)
        assert not e.errors and e.receiver.error is None
    finally:
        e.src.remove("big")
        e.dst.remove("big")
