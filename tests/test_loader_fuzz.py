"""Fuzzing the loader: any mutation or truncation of a valid stream ends in StreamError or success,
never another exception, a hang or an unbounded allocation."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from streams import migration_bytes

from migd.machine.ram import RAMList
from migd.machine.vmstate import VMStateDevice, buffer, u32, u64
from migd.migration.savevm import load_stream
from migd.migration.stream import InStream, StreamError
from migd.transports.channel import FdChannel
from migd.units import PAGE_SIZE

RAM = 64 * PAGE_SIZE
PER_EXAMPLE = 10.0  # seconds: far above what a load of this size takes even on a loaded machine


class Regs(VMStateDevice):
    idstr = "fuzz-regs"
    vmsd_name = "fuzz-regs"
    version_id = 2
    fields = (u32("a"), u64("b"), buffer("name", 12))

    def __init__(self) -> None:
        super().__init__(0)
        self.vals: dict[str, int | bytes] = {"a": 1, "b": 2, "name": b"regs"}

    def values(self) -> dict[str, int | bytes]:
        return self.vals

    def apply(self, values: dict[str, int | bytes]) -> None:
        if int(values["a"]) > 1000:
            raise ValueError("a out of range")
        self.vals = dict(values)


class Box:
    def __init__(self) -> None:
        self.ram = RAMList()
        self.ram.add("ram0", RAM)
        self.ram.add("vga", 4 * PAGE_SIZE)
        self.dev = Regs()

    def devices(self) -> list[VMStateDevice]:
        return [self.dev]


def _valid_stream() -> bytes:
    src = Box()
    ram0 = src.ram.get("ram0")
    rng = np.random.default_rng(11)
    for i in (1, 2, 3, 40):  # a few data pages; the rest zero (short records: structure dominates)
        ram0.pages[i] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
    ram0.pages[50, 8:16] = 1  # data inside, zero first and last word: the full zero check decides
    src.ram.get("vga").pages[2] = 0xCC
    return migration_bytes(src, return_path=True)


VALID = _valid_stream()
N = len(VALID)


def _load(data: bytes) -> None:
    with tempfile.TemporaryFile() as tmp:
        tmp.write(data)
        tmp.flush()
        tmp.seek(0)
        ch = FdChannel(os.dup(tmp.fileno()))
        try:
            load_stream(InStream(ch), Box(), on_command=lambda cmd, payload: None)
        finally:
            ch.close()


def test_valid_stream_loads():
    _load(VALID)


positions = st.one_of(st.integers(0, N - 1), st.integers(0, min(N - 1, 160)), st.integers(max(0, N - 400), N - 1))
overwrite = st.tuples(st.just("set"), positions, st.integers(0, 255))
flip = st.tuples(st.just("flip"), positions, st.integers(0, 7))
insert = st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=16))
delete = st.tuples(st.just("delete"), positions, st.integers(1, 64))
truncate = st.tuples(st.just("truncate"), positions, st.just(0))
mutation = st.one_of(overwrite, flip, insert, delete, truncate)


def _apply(data: bytes, muts: list[tuple[str, int, object]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in muts:
        pos = min(pos, max(len(buf) - 1, 0))
        if kind == "set" and buf:
            buf[pos] = int(arg)  # type: ignore[arg-type]
        elif kind == "flip" and buf:
            buf[pos] ^= 1 << int(arg)  # type: ignore[arg-type]
        elif kind == "insert":
            buf[pos:pos] = arg  # type: ignore[assignment]
        elif kind == "delete":
            del buf[pos : pos + int(arg)]  # type: ignore[arg-type]
        elif kind == "truncate":
            del buf[pos:]
    return bytes(buf)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(st.lists(mutation, min_size=1, max_size=6))
def test_mutated_stream_only_raises_stream_error(muts):
    data = _apply(VALID, muts)
    start = time.monotonic()
    try:
        _load(data)
    except StreamError as exc:
        assert str(exc)  # a description for error-desc
    assert time.monotonic() - start < PER_EXAMPLE


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.binary(min_size=0, max_size=512))
def test_garbage_after_a_valid_header_only_raises_stream_error(tail):
    head = VALID[:17]  # magic, version, configuration
    try:
        _load(head + tail)
    except StreamError:
        pass
