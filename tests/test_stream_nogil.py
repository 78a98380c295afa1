"""InStream's mapped buffer and its GIL-releasing copies return exactly the bytes that were sent.

The buffer is an anonymous mapping and copies of COPY_NOGIL bytes or more go through numpy
(migd/migration/stream.py); these tests read a stream through a real socket pair with random
mixes of peek/skip/read/read_into (hypothesis), so compaction (an overlapping copy inside the
buffer) and both copy paths of read_into are crossed many times.
"""

from __future__ import annotations

import random
import socket
import threading

import numpy as np
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from migd.migration.stream import COPY_NOGIL, InStream, copy_bytes
from migd.transports.channel import SocketChannel


def _feed(sock: socket.socket, data: bytes) -> threading.Thread:
    def send() -> None:
        with sock:
            try:
                sock.sendall(data)
            except OSError:  # the reader took what it wanted and closed its end
                pass

    t = threading.Thread(target=send, daemon=True)
    t.start()
    return t


def test_copy_bytes_large_and_small_and_overlapping() -> None:
    rng = np.random.default_rng(1)
    for n in (1, 4095, COPY_NOGIL - 1, COPY_NOGIL, 3 * COPY_NOGIL + 7):
        src = rng.integers(0, 256, n, dtype=np.uint8)
        dst = np.zeros(n, dtype=np.uint8)
        copy_bytes(memoryview(dst), memoryview(src))
        assert np.array_equal(dst, src)
    # overlapping, moving data down (what compaction does)
    buf = bytearray(rng.integers(0, 256, 4 * COPY_NOGIL, dtype=np.uint8).tobytes())
    want = bytes(buf[COPY_NOGIL // 2 : COPY_NOGIL // 2 + 3 * COPY_NOGIL])
    mv = memoryview(buf)
    copy_bytes(mv[: 3 * COPY_NOGIL], mv[COPY_NOGIL // 2 : COPY_NOGIL // 2 + 3 * COPY_NOGIL])
    assert bytes(buf[: 3 * COPY_NOGIL]) == want


ops = st.lists(st.tuples(st.sampled_from(["peek", "skip", "read", "read_into", "u8", "be64"]),
                         st.integers(1, 5 * COPY_NOGIL)), min_size=1, max_size=40)


@settings(max_examples=30, deadline=None)
@given(ops=ops, bufsize=st.sampled_from([1 << 16, 1 << 17, 1 << 20]), seed=st.integers(0, 1 << 30))
def test_instream_reads_back_what_was_sent(ops: list[tuple[str, int]], bufsize: int, seed: int) -> None:
    total = sum(n for _, n in ops) + 16
    data = random.Random(seed).randbytes(total)
    a, b = socket.socketpair()
    feeder = _feed(a, data)
    f = InStream(SocketChannel(b), bufsize)
    f.start_digest()
    pos = 0
    got = bytearray()
    try:
        for op, n in ops:
            if op == "peek":
                n = min(n, bufsize)
                assert bytes(f.peek(n)[:n]) == data[pos : pos + n]
                continue
            if op == "skip":
                f.skip(n)
                got += data[pos : pos + n]
            elif op == "read":
                got += f.read(n)
            elif op == "read_into":
                dst = np.zeros(n, dtype=np.uint8)
                f.read_into(memoryview(dst))
                got += dst.tobytes()
            elif op == "u8":
                n = 1
                got += bytes((f.get_u8(),))
            else:
                n = 8
                got += f.get_be64().to_bytes(8, "big")
            pos += n
            assert f.consumed == pos
        assert bytes(got) == data[:pos]
        digest, length = f.digest()
        assert length == pos
    finally:
        f.close()
        feeder.join(10)
    assert digest == xxhash.xxh3_64_intdigest(data[:pos])
