"""Return path: QEMU's framing over a real socketpair, and a reader that refuses anything else."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migd.migration.returnpath import (
    MSG_PONG,
    MSG_REQ_PAGES,
    MSG_SHUT,
    ReturnPathError,
    ReturnPathReader,
    send_pong,
    send_shut,
    sibling_error,
)
from migd.transports.channel import SocketChannel


def test_wire_bytes(channel_pair) -> None:
    src, dst = channel_pair
    send_shut(dst, 0)
    send_shut(dst, 1)
    send_pong(dst, 0xDEADBEEF)
    raw = src.sock.recv(64)
    assert raw == bytes.fromhex("0001 0004 00000000  0001 0004 00000001  0002 0004 deadbeef".replace(" ", ""))


@pytest.mark.parametrize("flag", [0, 1])
def test_shut_reaches_reader(channel_pair, flag: int) -> None:
    src, dst = channel_pair
    reader = ReturnPathReader(src)
    reader.start()
    send_pong(dst, 7)
    assert reader.wait_for_pong(7, timeout=10)
    send_shut(dst, flag)
    assert reader.wait_for_shut(timeout=10) == flag
    reader.close()


def test_closed_without_shut_is_an_error(channel_pair) -> None:
    src, dst = channel_pair
    reader = ReturnPathReader(src)
    reader.start()
    dst.shutdown()
    with pytest.raises(ReturnPathError, match="closed before the destination acknowledged"):
        reader.wait_for_shut(timeout=10)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (struct.pack(">HH", 99, 0), "Received invalid message 0x0063 length 0x0000"),
        (struct.pack(">HHI", MSG_SHUT, 8, 0) + b"\0" * 4, "Received invalid message 0x0001 length 0x0008"),
        (struct.pack(">HH", MSG_PONG, 600), "Received invalid message 0x0002 length 0x0258"),
        (struct.pack(">HHQI", MSG_REQ_PAGES, 12, 0, 1), "Received invalid message 0x0004 length 0x000c"),
    ],
)
def test_reader_rejects_unknown_and_bad_lengths(channel_pair, message: bytes, error: str) -> None:
    src, dst = channel_pair
    reader = ReturnPathReader(src)
    reader.start()
    dst.write_all([message])
    with pytest.raises(ReturnPathError) as info:
        reader.wait_for_shut(timeout=10)
    assert str(info.value) == error


def test_truncated_message(channel_pair) -> None:
    src, dst = channel_pair
    reader = ReturnPathReader(src)
    reader.start()
    dst.write_all([struct.pack(">HH", MSG_SHUT, 4) + b"\0\0"])
    dst.shutdown()
    with pytest.raises(ReturnPathError, match="truncated"):
        reader.wait_for_shut(timeout=10)


def test_timeout_then_close_wakes_the_reader(channel_pair) -> None:
    src, _dst = channel_pair
    reader = ReturnPathReader(src)
    reader.start()
    with pytest.raises(ReturnPathError, match="Timed out"):
        reader.wait_for_shut(timeout=0.05)
    reader.close()
    assert reader._thread is not None and not reader._thread.is_alive()


def test_sibling_error_text() -> None:
    assert sibling_error(1) == "Sibling indicated error 1"


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_reader_fuzz_never_hangs_or_crashes(data: bytes) -> None:
    """Any bytes followed by EOF: a SHUT value or a ReturnPathError, within the timeout."""
    a, b = socket.socketpair()
    src, dst = SocketChannel(a), SocketChannel(b)
    try:
        reader = ReturnPathReader(src)
        reader.start()
        dst.write_all([data])
        dst.shutdown()
        try:
            flag = reader.wait_for_shut(timeout=10)
        except ReturnPathError as exc:
            assert "Timed out" not in str(exc)
        else:
            assert data[:4] == b"\x00\x01\x00\x04" or b"\x00\x01\x00\x04" in data
            assert 0 <= flag <= 0xFFFFFFFF
        reader.close()
    finally:
        src.close()
        dst.close()
