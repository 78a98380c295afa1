"""Drives: write-back cache, flush, drain, cache modes, exclusive image locks across processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from migd.machine.block import Drive, DriveError

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(MiB))
    return str(path)


def file_bytes(path: str, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def test_writeback_keeps_data_in_cache_until_flush(image):
    d = Drive(image)
    d.write(8192, b"\x11" * 4096)
    d.write(100, b"abc")  # partial sector merges with the file contents
    assert d.read(8192, 4096) == b"\x11" * 4096 and d.read(99, 5) == b"\0abc\0"
    assert file_bytes(image, 8192, 4096) == bytes(4096)  # not on disk yet
    assert d.dirty_bytes == 8192
    ms = d.flush()
    assert ms >= 0 and d.flushes == 1 and d.dirty_bytes == 0
    assert file_bytes(image, 8192, 4096) == b"\x11" * 4096 and file_bytes(image, 99, 5) == b"\0abc\0"
    d.close()


def test_write_spanning_sectors_and_bounds(image):
    d = Drive(image)
    d.write(4090, b"\x22" * 20)
    assert d.read(4088, 24) == b"\0\0" + b"\x22" * 20 + b"\0\0"
    with pytest.raises(DriveError, match="beyond the end"):
        d.write(MiB - 2, b"xyz")
    with pytest.raises(DriveError, match="beyond the end"):
        d.read(MiB, 1)
    d.flush()
    assert file_bytes(image, 4088, 24) == b"\0\0" + b"\x22" * 20 + b"\0\0"
    d.close()


@pytest.mark.parametrize("mode", ["none", "writethrough", "directsync"])
def test_uncached_modes_write_through(image, mode):
    d = Drive(image, cache=mode)
    d.write(0, b"\x33" * 4096)
    assert file_bytes(image, 0, 4096) == b"\x33" * 4096 and d.dirty_bytes == 0
    d.close()


def test_bad_cache_mode_and_missing_file(tmp_path, image):
    with pytest.raises(DriveError, match="does not accept value 'fast'"):
        Drive(image, cache="fast")
    with pytest.raises(DriveError, match="Could not open .*No such file"):
        Drive(str(tmp_path / "missing.img"))


def test_flush_racing_writes_loses_nothing(image):
    d = Drive(image)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            off = (i * 37 % 200) * 4096 + (i % 3) * 1000  # some partial sectors
            data = bytes([i % 251 + 1]) * 3000
            d.write(off, data)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    for _ in range(20):
        d.flush_async().result(10)
    stop.set()
    t.join()
    expect = d.read(0, 200 * 4096 + 5000)
    d.flush()
    assert file_bytes(image, 0, len(expect)) == expect
    d.close()


def test_lock_is_exclusive_and_moves_with_inactivate_activate(image):
    src = Drive(image)
    with pytest.raises(DriveError, match=r'Failed to get "write" lock: Is another process using the image'):
        Drive(image)
    dst = Drive(image, active=False)  # a destination opens inactive
    with pytest.raises(DriveError, match="inactive"):
        dst.write(0, b"x")
    with pytest.raises(DriveError, match="write.*lock"):
        dst.activate()
    src.write(0, b"\x44" * 4096)
    src.inactivate()  # flushes, then releases
    assert file_bytes(image, 0, 4096) == b"\x44" * 4096
    with pytest.raises(DriveError, match="inactive"):
        src.write(0, b"y")
    dst.activate()
    assert dst.read(0, 4096) == b"\x44" * 4096
    with pytest.raises(DriveError):
        src.activate()  # the destination owns it now
    dst.close()
    src.activate()  # closing released it
    src.close()


def test_lock_conflicts_with_another_process(image):
    d = Drive(image)
    code = ("import sys; from migd.machine.block import Drive, DriveError\n"
            "try:\n    Drive(sys.argv[1])\nexcept DriveError as e:\n    print(e); sys.exit(3)\n")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-c", code, image], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 3 and "Is another process using the image" in r.stdout
    d.inactivate()
    r = subprocess.run([sys.executable, "-c", code, image], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    d.close()


def test_drain_waits_for_in_flight_writes(image):
    d = Drive(image)
    assert d.drain(timeout=1)
    with d._lock:  # simulate a write in flight
        d._inflight += 1
    assert d.drain(timeout=0.05) is False
    done = threading.Event()
    threading.Thread(target=lambda: (d.drain(), done.set()), daemon=True).start()
    with d._lock:
        d._inflight -= 1
        d._idle.notify_all()
    assert done.wait(5)
    d.close()


def test_cache_is_bounded_by_background_writeback(image, monkeypatch):
    monkeypatch.setattr(Drive, "WRITEBACK_LIMIT", 64 * 4096)
    d = Drive(image)
    for i in range(200):
        d.write(i * 4096, bytes([i % 255 + 1]) * 4096)
    deadline = time.monotonic() + 10
    while d.flushes == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert d.flushes >= 1
    assert file_bytes(image, 0, 4096) == b"\x01" * 4096  # written back without an explicit flush
    d.close()
