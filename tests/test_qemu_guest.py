"""The real-QEMU test guest works: it boots, counts, and survives a QEMU -> QEMU migration intact.

This is the baseline the interop tests build on (and the reference for their timings). Skipped with
the reason when QEMU or binutils are not installed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qemu_guest import DIRTY_END, DIRTY_START, Qemu, build_floppy, missing_tools, outside_firmware

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")


@pytest.fixture
def qemus(tmp_path: Path) -> Iterator[tuple[Path, list[Qemu]]]:
    started: list[Qemu] = []
    yield tmp_path, started
    for vm in started:
        vm.kill()


def test_guest_boots_counts_and_dirties(qemus: tuple[Path, list[Qemu]]) -> None:
    workdir, started = qemus
    floppy = build_floppy(workdir)
    assert floppy.stat().st_size == 1474560
    vm = Qemu(workdir, "src", floppy)
    started.append(vm)
    first = vm.wait_counting()
    later = vm.wait_for_counter(first + 3)
    assert later >= first + 3
    dirty = vm.pmemsave(DIRTY_START, DIRTY_END - DIRTY_START)
    words = {int.from_bytes(dirty[i : i + 4], "little") for i in range(0, len(dirty), 4096)}
    assert min(words) >= first, "the dirty area holds the counter of a recent pass"
    assert vm.quit() == 0


def test_qemu_to_qemu_migration_keeps_ram_and_counter(qemus: tuple[Path, list[Qemu]]) -> None:
    workdir, started = qemus
    floppy = build_floppy(workdir)
    src = Qemu(workdir, "src", floppy)
    started.append(src)
    # -S: the destination stays paused after the load, so its RAM can be compared before it runs on
    dst = Qemu(workdir, "dst", floppy, "-S", "-incoming", f"unix:{workdir / 'mig.sock'}", accel=src.accel)
    started.append(dst)
    src.wait_counting()
    t0 = time.monotonic()
    src.cmd("migrate", uri=f"unix:{workdir / 'mig.sock'}")
    info = src.wait_migration()
    elapsed = time.monotonic() - t0
    assert info["status"] == "completed", info
    print(f"QEMU -> QEMU migration ({src.accel}): {elapsed:.2f} s, total-time {info.get('total-time')} ms, "
          f"downtime {info.get('downtime')} ms")
    dst.wait_migration()
    stopped_at = src.counter()
    assert outside_firmware(dst.ram()) == outside_firmware(src.ram())
    dst.cmd("cont")
    assert dst.wait_for_counter(stopped_at + 2) >= stopped_at + 2
