"""Channels and the buffered, rate-limited stream over real sockets and pipes."""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np
import pytest

from migd.migration.stream import InStream, OutStream, StreamError
from migd.transports.channel import FdChannel

WAIT = 10.0  # generous bound for anything that must happen "at once" on a loaded machine


def _drain(channel, sink: bytearray | None = None) -> threading.Thread:
    """Read everything until EOF (or an error) in a thread; keeps the bytes when ``sink`` is given."""

    def run() -> None:
        buf = bytearray(1 << 20)
        mv = memoryview(buf)
        while True:
            try:
                n = channel.read_into(mv)
            except OSError:
                return
            if n == 0:
                return
            if sink is not None:
                sink.extend(mv[:n])

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_round_trip_mixed_puts(channel_pair):
    src, dst = channel_pair
    out = OutStream(src)
    big = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8)
    got = bytearray()
    reader = _drain(dst, got)
    out.put_u8(0xAB)
    out.put_be16(0x1234)
    out.put_be32(0xDEADBEEF)
    out.put_be64(0x0102030405060708)
    out.put(b"hello")
    out.put_nocopy(memoryview(big))
    out.put(b"tail")
    out.flush()
    assert out.transferred == 1 + 2 + 4 + 8 + 5 + len(big) + 4
    src.sock.shutdown(socket.SHUT_WR)
    reader.join(WAIT)
    expect = (bytes.fromhex("ab1234deadbeef0102030405060708") + b"hello" + big.tobytes() + b"tail")
    assert bytes(got) == expect


def test_instream_reads_and_truncation(channel_pair):
    src, dst = channel_pair
    payload = bytes(range(256)) * 40000  # ~10 MiB, larger than the read buffer
    header = bytes.fromhex("07") + (0x11223344).to_bytes(4, "big") + (5).to_bytes(8, "big")

    def send() -> None:
        src.write_all([header, payload])
        src.sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    f = InStream(dst)
    assert f.get_u8() == 7
    assert f.get_be32() == 0x11223344
    assert f.get_be64() == 5
    view = f.peek(16)
    assert bytes(view[:16]) == payload[:16]
    f.skip(16)
    assert f.read(100) == payload[16:116]
    rest = bytearray(len(payload) - 116 - 10)
    f.read_into(rest)
    assert bytes(rest) == payload[116:-10]
    with pytest.raises(StreamError, match="truncated"):
        f.read(11)
    t.join(WAIT)


def test_read_refuses_absurd_length(channel_pair):
    _, dst = channel_pair
    f = InStream(dst)
    with pytest.raises(StreamError, match="Invalid read length"):
        f.read(1 << 40)


def test_socket_shutdown_wakes_blocked_read(channel_pair):
    _, dst = channel_pair
    err: list[BaseException] = []
    started = threading.Event()

    def block() -> None:
        started.set()
        try:
            n = dst.read_into(bytearray(10))
            err.append(EOFError(n))
        except OSError as exc:
            err.append(exc)

    t = threading.Thread(target=block, daemon=True)
    t.start()
    started.wait(WAIT)
    dst.shutdown()
    t.join(WAIT)
    assert not t.is_alive() and err
    with pytest.raises(OSError):
        dst.read_into(bytearray(1))


def test_outstream_shutdown_fails_blocked_and_later_writes(channel_pair):
    src, _ = channel_pair  # nobody reads: the writer fills the socket buffers and blocks
    out = OutStream(src)
    result: list[BaseException] = []
    chunk = bytes(1 << 20)

    def write_forever() -> None:
        try:
            while True:
                out.put_nocopy(chunk)
                out.flush()
        except StreamError as exc:
            result.append(exc)

    t = threading.Thread(target=write_forever, daemon=True)
    t.start()
    deadline = time.monotonic() + WAIT
    while out.transferred == 0 and time.monotonic() < deadline:  # until the buffers are full
        threading.Event().wait(0.01)
    out.shutdown()
    t.join(WAIT)
    assert not t.is_alive() and result
    assert out.error is not None and out.rate_limit_exceeded()
    with pytest.raises(StreamError):
        out.put(b"x")
    with pytest.raises(StreamError):
        out.flush()


def test_write_error_when_peer_gone(channel_pair):
    src, dst = channel_pair
    dst.close()
    out = OutStream(src)
    with pytest.raises(StreamError, match="Unable to write"):
        for _ in range(64):
            out.put_nocopy(bytes(1 << 20))
            out.flush()
    assert out.error


def test_fd_channel_pipe_round_trip_and_shutdown():
    r, w = os.pipe()
    reader, writer = FdChannel(r), FdChannel(w)
    assert not reader.has_return_path
    got = bytearray()
    t = _drain(reader, got)
    data = os.urandom(3 << 20)
    out = OutStream(writer)
    out.put_nocopy(data)
    out.flush()
    writer.close()
    t.join(WAIT)
    assert bytes(got) == data

    # a reader blocked on an empty pipe wakes up on shutdown
    r2, w2 = os.pipe()
    blocked = FdChannel(r2)
    outcome: list[BaseException] = []

    def block() -> None:
        try:
            blocked.read_into(bytearray(8))
        except OSError as exc:
            outcome.append(exc)

    t2 = threading.Thread(target=block, daemon=True)
    t2.start()
    blocked.shutdown()
    t2.join(WAIT)
    assert outcome and not t2.is_alive()
    blocked.close()
    reader.close()
    os.close(w2)


def test_fd_channel_shutdown_wakes_blocked_write():
    r, w = os.pipe()
    writer = FdChannel(w)
    out = OutStream(writer)
    failed = threading.Event()

    def fill() -> None:
        try:
            while True:
                out.put_nocopy(bytes(1 << 20))
                out.flush()
        except StreamError:
            failed.set()

    t = threading.Thread(target=fill, daemon=True)
    t.start()
    deadline = time.monotonic() + WAIT
    while out.transferred == 0 and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    out.shutdown()
    assert failed.wait(WAIT)
    writer.close()
    os.close(r)


def test_rate_limit_bytes_per_window(channel_pair):
    """The migration thread's loop: write while the window has budget, sleep to its end, reset."""
    src, dst = channel_pair
    reader = _drain(dst)
    out = OutStream(src)
    bps = 40_000_000
    out.set_rate_limit(bps)
    assert out.rate_limit == bps // 10
    chunk = memoryview(bytes(256 << 10))
    per_window: list[int] = []
    start = time.monotonic()
    window_end = start + 0.1
    window_bytes_start = 0
    pause = threading.Event()
    while len(per_window) < 20:  # ~2 s
        if out.rate_limit_exceeded():
            pause.wait(max(0.0, window_end - time.monotonic()))
        if time.monotonic() >= window_end:
            per_window.append(out.transferred - window_bytes_start)
            window_bytes_start = out.transferred
            out.reset_window()
            window_end = time.monotonic() + 0.1
            continue
        if out.rate_limit_exceeded():
            continue
        budget = out.rate_budget()
        assert budget is not None
        n = min(len(chunk), budget + 1)  # a producer sizes its batch to the budget (+1 to cross it)
        out.put_nocopy(chunk[:n])
        out.flush()
    elapsed = time.monotonic() - start
    src.shutdown()
    reader.join(WAIT)
    limit = bps // 10
    mean = sum(per_window) / len(per_window)
    assert abs(mean - limit) / limit < 0.05, per_window
    assert max(per_window) <= limit * 1.05
    # never faster than the limit over the whole run
    assert out.transferred / elapsed <= bps * 1.05


def test_rate_limit_zero_is_unlimited_and_changes_apply_at_once(channel_pair):
    src, _ = channel_pair
    out = OutStream(src)
    out.set_rate_limit(0)
    assert out.rate_budget() is None and not out.rate_limit_exceeded()
    out.set_rate_limit(9)  # under 10 B/s rounds to an unlimited budget, as in QEMU
    assert not out.rate_limit_exceeded()
    out.set_rate_limit(1000)
    out.put(b"x" * 200)
    out.flush()
    assert out.rate_limit_exceeded()
    out.set_rate_limit(0)
    assert not out.rate_limit_exceeded()
    out.set_rate_limit(1000)
    out.reset_window()
    assert not out.rate_limit_exceeded()
