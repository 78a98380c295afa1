"""A real QEMU migrating into migd: the guest's machine is held as data, RAM identical to QEMU's.

migd is started with ``--incoming`` and no machine options, so the stream's configuration decides what
the machine is (``migd/migration/foreign.py``). The source is a QEMU guest built by
``tests/qemu_guest.py``; the held RAM is compared with the stopped source's ``pmemsave`` outside
0xa0000-0xfffff. Skipped when QEMU or binutils are not installed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import Migd
from qemu_guest import MEMORY, Qemu, ended, missing_tools, outside_firmware, qemu_version

from migd.analyze import analyze

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")


def held_ram(dst: Migd, block: str, tmp_path: Path) -> bytes:
    path = tmp_path / f"held.{block.strip('/').replace('/', '_')}"
    dst.cmd("x-migd-ram-save", block=block, filename=str(path))
    return path.read_bytes()


@pytest.mark.parametrize("return_path", [False, True], ids=["plain", "return-path"])
def test_qemu_to_migd_store(source: Qemu, migd_factory: Callable[..., Migd], tmp_path: Path,
                            return_path: bool) -> None:
    dst = migd_factory("dst", "--incoming", f"unix:{tmp_path / 'mig.sock'}")
    dst.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    if return_path:
        source.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
    t0 = time.monotonic()
    source.cmd("migrate", uri=f"unix:{tmp_path / 'mig.sock'}")
    info = source.wait_migration()
    elapsed = time.monotonic() - t0
    assert info["status"] == "completed", info
    print(f"QEMU {qemu_version()} -> migd ({source.accel}, {'return path' if return_path else 'no return path'}): "
          f"{elapsed:.2f} s, total-time {info.get('total-time')} ms, downtime {info.get('downtime')} ms")
    dst.wait_for(lambda: dst.cmd("query-migrate").get("status") == "completed", 30, "migd's load to complete")
    assert dst.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed")
    assert dst.status() == "paused"  # held, not run
    held: dict[str, Any] = dst.cmd("x-migd-query-foreign")
    pc = next(m["name"] for m in source.cmd("query-machines") if m.get("alias") == "pc")
    assert held["machine-type"] == pc
    blocks = {b["name"]: b["size"] for b in held["ram-blocks"]}
    assert blocks["pc.ram"] == MEMORY and "pc.bios" in blocks and "/rom@etc/acpi/tables" in blocks
    names = [d["name"] for d in held["devices"]]
    assert "cpu" in names and "globalstate" in names and all(d["size"] > 0 for d in held["devices"])
    # RAM identical to the stopped source's, outside the firmware area
    assert source.status() == "postmigrate"
    assert outside_firmware(held_ram(dst, "pc.ram", tmp_path)) == outside_firmware(source.ram())
    assert dst.quit() == 0


def test_migd_with_machine_options_refuses_a_qemu_stream(source: Qemu, migd_factory: Callable[..., Migd],
                                                        tmp_path: Path) -> None:
    """Given ``-m``, migd is its own machine: QEMU's words, exit 1, and the source guest runs on."""
    dst = migd_factory("dst", "-m", "32M", "--incoming", f"unix:{tmp_path / 'mig.sock'}", connect=False)
    dst.wait_for(lambda: (tmp_path / "mig.sock").exists(), 30, "migd's migration socket")  # no client: not yet up
    source.cmd("migrate", uri=f"unix:{tmp_path / 'mig.sock'}")
    info = source.wait_migration()
    assert info["status"] == "failed", info
    assert dst.wait(30) == 1, info
    assert "Machine type received is 'pc-i440fx-" in dst.log() and "and local is 'migd'" in dst.log()
    assert source.status() == "running"
    before = source.counter()
    assert source.wait_for_counter(before + 2) >= before + 2


def test_a_qemu_stream_cut_short_fails_cleanly(source: Qemu, migd_factory: Callable[..., Migd],
                                               tmp_path: Path) -> None:
    saved = tmp_path / "qemu.state"
    source.cmd("migrate", uri=f"exec:cat > {saved}")
    assert source.wait_migration()["status"] == "completed"
    data = saved.read_bytes()
    cpu = next(s for s in analyze(saved).sections if s.idstr == "cpu")
    for cut in (len(data) // 3, cpu.offset + 100):  # inside the RAM, inside a device's state
        part = tmp_path / f"cut.{cut}"
        part.write_bytes(data[:cut])
        dst = migd_factory(f"dst{cut}", "--incoming", f"file:{part}", connect=False)
        assert dst.wait(30) == 1
        assert "load of migration failed" in dst.log() and "truncated" in dst.log(), dst.log()
    # and the whole file loads
    dst = migd_factory("dst", "--incoming", f"file:{saved}")
    dst.wait_for(lambda: dst.cmd("query-migrate").get("status") == "completed", 30, "the load")
    assert dst.cmd("x-migd-query-foreign")["machine-type"].startswith("pc-i440fx-")


@pytest.mark.parametrize("return_path", [False, True], ids=["plain", "return-path"])
def test_qemu_to_migd_to_qemu_store_and_forward(source: Qemu, migd_factory: Callable[..., Migd],
                                                tmp_path: Path, return_path: bool) -> None:
    """The held machine sent on to a QEMU with the same options: RAM identical, the guest counts on."""
    relay = migd_factory("relay", "--incoming", f"unix:{tmp_path / 'in.sock'}")
    if return_path:
        source.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
        relay.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
    source.cmd("migrate", uri=f"unix:{tmp_path / 'in.sock'}")
    assert source.wait_migration()["status"] == "completed"
    relay.wait_for(lambda: relay.cmd("query-migrate").get("status") == "completed", 30, "the relay's load")
    stopped_at = source.counter()
    ram = source.ram()
    # -S: compare the destination's RAM before its guest runs on
    dst = Qemu(tmp_path, "qdst", tmp_path / "guest.img", "-S", "-incoming", f"unix:{tmp_path / 'out.sock'}",
               accel=source.accel)
    try:
        t0 = time.monotonic()
        relay.cmd("migrate", uri=f"unix:{tmp_path / 'out.sock'}")
        info: dict[str, Any] = relay.wait_for(lambda: ended(relay.cmd("query-migrate")), 60, "the relay's send")
        elapsed = time.monotonic() - t0
        assert info["status"] == "completed", info
        print(f"migd -> QEMU: {elapsed:.2f} s, total-time {info.get('total-time')} ms, "
              f"downtime {info.get('downtime')} ms")
        got = dst.wait_migration()
        assert got["status"] == "completed", got
        assert outside_firmware(dst.ram()) == outside_firmware(ram)
        assert dst.counter() == stopped_at
        dst.cmd("cont")
        assert dst.wait_for_counter(stopped_at + 3) >= stopped_at + 3
    finally:
        dst.kill()


def incoming_file_uri(path: Path) -> str:
    """QEMU's URI to load a saved file: ``file:`` since 8.2, ``exec:cat`` before."""
    major, minor = (int(x) for x in qemu_version().split()[3].split(".")[:2])
    return f"file:{path}" if (major, minor) >= (8, 2) else f"exec:cat {path}"


def test_qemu_file_to_migd_to_file_to_qemu(source: Qemu, migd_factory: Callable[..., Migd], tmp_path: Path) -> None:
    """``file:`` both ways: QEMU's saved state loaded into migd, saved again by migd, loaded by QEMU."""
    saved = tmp_path / "qemu.state"
    source.cmd("migrate", uri=f"exec:cat > {saved}")
    assert source.wait_migration()["status"] == "completed"
    stopped_at = source.counter()
    ram = source.ram()
    relay = migd_factory("relay", "--incoming", f"file:{saved}")
    relay.wait_for(lambda: relay.cmd("query-migrate").get("status") == "completed", 30, "the load")
    resaved = tmp_path / "migd.state"
    relay.cmd("migrate", uri=f"file:{resaved}")
    relay.wait_for(lambda: relay.cmd("query-migrate").get("status") == "completed", 30, "the save")
    # the same machine in both files: sections, blocks and device state
    theirs, ours = analyze(saved), analyze(resaved)
    assert ours.machine_type == theirs.machine_type
    assert [(s.type, s.section_id, s.idstr, s.instance_id, s.version_id, s.size) for s in ours.sections
            if s.type == "FULL"] == \
        [(s.type, s.section_id, s.idstr, s.instance_id, s.version_id, s.size) for s in theirs.sections
         if s.type == "FULL"]
    assert [d["raw"] for d in ours.devices] == [d["raw"] for d in theirs.devices]
    assert {n: b.size for n, b in ours.blocks.items()} == {n: b.size for n, b in theirs.blocks.items()}
    assert ours.vmdesc == theirs.vmdesc
    dst = Qemu(tmp_path, "qdst", tmp_path / "guest.img", "-S", "-incoming", incoming_file_uri(resaved),
               accel=source.accel)
    try:
        assert dst.wait_migration()["status"] == "completed"
        assert outside_firmware(dst.ram()) == outside_firmware(ram)
        dst.cmd("cont")
        assert dst.wait_for_counter(stopped_at + 3) >= stopped_at + 3
    finally:
        dst.kill()


def test_live_qemu_to_migd_under_a_bandwidth_limit(source: Qemu, migd_factory: Callable[..., Migd],
                                                   tmp_path: Path) -> None:
    """Several passes while the guest dirties its pages: the held RAM is the last version of each."""
    dst = migd_factory("dst", "--incoming", f"unix:{tmp_path / 'mig.sock'}")
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 2 << 20})
    source.cmd("migrate", uri=f"unix:{tmp_path / 'mig.sock'}")
    info = source.wait_migration()
    assert info["status"] == "completed", info
    assert info["ram"]["dirty-sync-count"] >= 3, info  # it iterated while the guest ran
    dst.wait_for(lambda: dst.cmd("query-migrate").get("status") == "completed", 30, "migd's load")
    assert outside_firmware(held_ram(dst, "pc.ram", tmp_path)) == outside_firmware(source.ram())


def test_source_qemu_resumes_when_migd_dies_mid_stream(source: Qemu, migd_factory: Callable[..., Migd],
                                                        tmp_path: Path) -> None:
    dst = migd_factory("dst", "--incoming", f"unix:{tmp_path / 'mig.sock'}")
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 256 << 10})  # ~4 s for this guest
    source.cmd("migrate", uri=f"unix:{tmp_path / 'mig.sock'}")
    dst.wait_for(lambda: dst.cmd("query-migrate").get("status") == "active", 30, "the stream to begin")
    dst.kill()
    info = source.wait_migration()
    assert info["status"] == "failed", info
    assert source.status() == "running"
    before = source.counter()
    assert source.wait_for_counter(before + 2) >= before + 2


def test_a_corrupted_qemu_stream_fails_cleanly(source: Qemu, migd_factory: Callable[..., Migd],
                                               tmp_path: Path) -> None:
    saved = tmp_path / "qemu.state"
    source.cmd("migrate", uri=f"exec:cat > {saved}")
    assert source.wait_migration()["status"] == "completed"
    data = bytearray(saved.read_bytes())
    a = analyze(saved)
    part = next(s for s in a.sections if s.type == "PART")
    cpu = next(s for s in a.sections if s.idstr == "cpu")
    cases = {  # where, the byte written there, what migd must say
        "ram-flags": (part.offset + 5 + 7, 0x41, "XBZRLE pages are not supported by migd (flags 0x41)"),
        "footer": (cpu.offset + 1 + 4 + 1 + 3 + 4 + 4 + cpu.size + 4, 0x55, "Missing section footer for cpu"),
        "magic": (0, 0x00, "Not a migration stream"),
    }
    for name, (offset, value, text) in cases.items():
        bad = bytearray(data)
        bad[offset] = value
        path = tmp_path / f"bad.{name}"
        path.write_bytes(bad)
        dst = migd_factory(f"dst-{name}", "--incoming", f"file:{path}", connect=False)
        assert dst.wait(30) == 1, (name, dst.log())
        assert f"load of migration failed: {text}" in dst.log(), (name, dst.log())
    # a broken description is no part of the load (QEMU's destination ignores it): the machine loads
    bad = bytearray(data)
    bad[len(data) - 50] = 0x00
    path = tmp_path / "bad.description"
    path.write_bytes(bad)
    dst = migd_factory("dst-description", "--incoming", f"file:{path}")
    dst.wait_for(lambda: dst.cmd("query-migrate").get("status") == "completed", 30, "the load")
    assert len(dst.cmd("x-migd-query-foreign")["devices"]) == len([s for s in a.sections if s.type == "FULL"])
