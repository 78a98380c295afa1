"""migd as a live relay between two real QEMUs, and what such a daemon shows of the machine it holds.

The relay's ``migrate`` is issued while its incoming migration of the QEMU guest is still active
(``migd/migration/foreign_save.py``): it forwards pages as they arrive and completes right after the
incoming side delivered the device state. The destination QEMU's RAM (``pmemsave`` outside
0xa0000-0xfffff) must equal the stopped source's and its guest must count on. The QEMU tests skip
when QEMU or binutils are not installed; the refusal tests need no QEMU.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import xxhash
from helpers import Migd
from qemu_guest import MEMORY, Qemu, ended, missing_tools, outside_firmware

from migd.migration.format import MAGIC, Section

needs_qemu = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")


def holding(relay: Migd) -> dict[str, Any]:
    """The held machine's description once the relay receives one, else {} (for polling)."""
    reply = relay.cmd_raw("x-migd-query-foreign")
    got: dict[str, Any] = reply.get("return", {})
    return got


@needs_qemu
@pytest.mark.parametrize("return_path", [False, True], ids=["plain", "return-path"])
def test_live_relay_qemu_to_migd_to_qemu(source: Qemu, migd_factory: Callable[..., Migd], tmp_path: Path,
                                         return_path: bool) -> None:
    """``migrate`` on the relay while its incoming is active: RAM identical, the guest counts on."""
    relay = migd_factory("relay", "--incoming", f"unix:{tmp_path / 'in.sock'}")
    dst = Qemu(tmp_path, "qdst", tmp_path / "guest.img", "-S", "-incoming", f"unix:{tmp_path / 'out.sock'}",
               accel=source.accel)
    try:
        if return_path:
            for side in (source, relay):
                side.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
        # slow enough that the source is still iterating when the relay starts sending on
        source.cmd("migrate-set-parameters", **{"max-bandwidth": 256 << 10})  # ~4 s for this guest
        source.cmd("migrate", uri=f"unix:{tmp_path / 'in.sock'}")
        relay.wait_for(lambda: holding(relay), 30, "the relay to receive the QEMU machine")
        assert relay.cmd("query-migrate")["status"] == "active"  # the incoming side, still loading
        assert relay.status() == "inmigrate"
        relay.cmd("migrate", uri=f"unix:{tmp_path / 'out.sock'}")  # at once: maybe before the block list
        assert source.cmd("query-migrate")["status"] == "active"  # the relay sends on while receiving
        arriving: dict[str, Any] = relay.wait_for(  # the machine as received so far
            lambda: (m := relay.cmd("x-migd-query-machine"))["ram"]["blocks"] and m, 30, "the block list")
        assert arriving["foreign"] is True and arriving["loaded"] is False and arriving["status"] == "inmigrate"
        assert "pc.ram" in [b["name"] for b in arriving["ram"]["blocks"]]
        # the relay forwards before the source finished: the destination has pages already
        relay.wait_for(lambda: relay.cmd("query-migrate").get("ram", {}).get("transferred", 0) > 256 << 10, 60,
                       "the relay to forward pages")
        assert source.cmd("query-migrate")["status"] == "active"
        source.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30})  # now let it converge
        src_info = source.wait_migration()
        assert src_info["status"] == "completed", src_info
        info: dict[str, Any] = relay.wait_for(lambda: ended(relay.cmd("query-migrate")), 60, "the relay's send")
        assert info["status"] == "completed", info
        got = dst.wait_migration()
        assert got["status"] == "completed", got
        stopped_at = source.counter()
        assert outside_firmware(dst.ram()) == outside_firmware(source.ram())
        assert dst.counter() == stopped_at
        print(f"live relay: source downtime {src_info.get('downtime')} ms, relay downtime {info.get('downtime')} "
              f"ms, relay passes {info['ram']['dirty-sync-count']}, forwarded {info['ram']['transferred']} bytes")
        dst.cmd("cont")
        assert dst.wait_for_counter(stopped_at + 3) >= stopped_at + 3
        assert relay.status() == "postmigrate"
    finally:
        dst.kill()


@needs_qemu
def test_relay_fails_when_its_incoming_side_fails(source: Qemu, migd_factory: Callable[..., Migd],
                                                  tmp_path: Path) -> None:
    """The source QEMU dies mid-stream: the relay's outgoing migration fails with the reason, the
    relay (exit-on-error) exits 1, and the destination QEMU's load fails (it exits 1, the guest never ran)."""
    relay = migd_factory("relay", "--incoming", f"unix:{tmp_path / 'in.sock'}")
    dst = Qemu(tmp_path, "qdst", tmp_path / "guest.img", "-incoming", f"unix:{tmp_path / 'out.sock'}",
               accel=source.accel)
    try:
        source.cmd("migrate-set-parameters", **{"max-bandwidth": 256 << 10})
        source.cmd("migrate", uri=f"unix:{tmp_path / 'in.sock'}")
        relay.wait_for(lambda: holding(relay), 30, "the relay to receive the QEMU machine")
        relay.cmd("migrate", uri=f"unix:{tmp_path / 'out.sock'}")
        relay.wait_for(lambda: relay.cmd("query-migrate").get("status") == "active", 30, "the relay to send")
        source.kill()
        assert relay.wait(30) == 1
        assert "load of migration failed" in relay.log()
        assert dst.proc.wait(30) == 1  # QEMU's failed load: exit 1, the guest never ran
        assert "load of migration failed" in dst.log()
    finally:
        dst.kill()


def test_cancel_ends_a_relays_wait_for_the_block_list(migd_factory: Callable[..., Migd], tmp_path: Path) -> None:
    """A relay whose incoming side sent its configuration but no RAM block list yet waits for it
    (up to 30 s) before sending; ``migrate_cancel`` ends that wait at once, not 30 s later."""
    relay = migd_factory("relay", "--incoming", f"unix:{tmp_path / 'in.sock'}")
    out = socket.socket(socket.AF_UNIX)
    out.bind(str(tmp_path / "out.sock"))
    out.listen(1)  # a destination that accepts (in the backlog) and never answers
    feeder = socket.socket(socket.AF_UNIX)
    try:
        feeder.connect(str(tmp_path / "in.sock"))
        feeder.sendall(MAGIC.to_bytes(4, "big") + (3).to_bytes(4, "big")
                       + bytes((Section.CONFIGURATION,)) + struct.pack(">I", 13) + b"pc-i440fx-7.2"
                       + bytes((Section.START,)))  # the ram section's first byte, and no more
        relay.wait_for(lambda: holding(relay), 30, "the relay to hold the machine")
        relay.cmd("migrate", uri=f"unix:{tmp_path / 'out.sock'}")
        assert relay.cmd("query-migrate")["status"] == "setup"
        relay.cmd("migrate_cancel")
        started = time.monotonic()
        relay.wait_for(lambda: relay.cmd("query-migrate")["status"] == "cancelled", 10, "the cancel")
        print(f"cancelled after {(time.monotonic() - started) * 1000:.0f} ms")
        assert relay.status() == "inmigrate"  # the incoming side goes on
    finally:
        feeder.close()
        out.close()


def test_migrate_still_refused_while_waiting_for_migds_own_machine(migd_factory: Callable[..., Migd],
                                                                  tmp_path: Path) -> None:
    """No foreign machine held (nothing arrived yet, or machine options given): QEMU's refusal."""
    bare = migd_factory("bare", "--incoming", f"unix:{tmp_path / 'a.sock'}")
    own = migd_factory("own", "-m", "32M", "--incoming", f"unix:{tmp_path / 'b.sock'}")
    for d in (bare, own):
        err = d.cmd_error("migrate", uri=f"unix:{tmp_path / 'nowhere.sock'}")
        assert err["desc"] == "Guest is waiting for an incoming migration", err
        assert d.status() == "inmigrate"
        assert d.cmd("query-migrate")["status"] == "setup"  # the incoming side, untouched


@needs_qemu
def test_query_machine_and_digest_on_a_held_machine(source: Qemu, migd_factory: Callable[..., Migd],
                                                    tmp_path: Path) -> None:
    """``x-migd-query-machine`` shows the held machine (type, blocks, device sections);
    ``x-migd-ram-digest`` hashes its blocks, equal to the bytes ``x-migd-ram-save`` writes."""
    held = migd_factory("held", "--incoming", f"unix:{tmp_path / 'in.sock'}")
    source.cmd("migrate", uri=f"unix:{tmp_path / 'in.sock'}")
    assert source.wait_migration()["status"] == "completed"
    held.wait_for(lambda: held.cmd("query-migrate").get("status") == "completed", 30, "the load")
    info: dict[str, Any] = held.cmd("x-migd-query-machine")
    pc = next(m["name"] for m in source.cmd("query-machines") if m.get("alias") == "pc")
    assert info["machine-type"] == pc and info["foreign"] is True and info["loaded"] is True
    assert info["status"] == "paused"
    blocks = {b["name"]: b for b in info["ram"]["blocks"]}
    assert blocks["pc.ram"]["size"] == MEMORY and blocks["pc.ram"]["page-size"] == 4096
    assert "pc.bios" in blocks and "/rom@etc/acpi/tables" in blocks
    assert info["ram"]["total"] == sum(b["size"] for b in blocks.values())
    devices = info["devices"]
    assert devices == held.cmd("x-migd-query-foreign")["devices"]
    cpu = next(d for d in devices if d["name"] == "cpu")
    assert set(cpu) >= {"name", "instance-id", "version", "size", "section-id"} and cpu["size"] > 0
    assert {d["name"] for d in devices} >= {"cpu", "globalstate", "timer"}
    digests = {b["name"]: b for b in held.cmd("x-migd-ram-digest")["blocks"]}
    assert set(digests) == set(blocks)
    for name in ("pc.ram", "pc.bios"):
        path = tmp_path / f"{name}.bin"
        held.cmd("x-migd-ram-save", block=name, filename=str(path))
        assert digests[name]["digest"] == xxhash.xxh3_128_hexdigest(path.read_bytes())
        assert digests[name]["size"] == blocks[name]["size"]
    # the guest RAM itself, as the stopped source has it (outside the firmware area)
    assert outside_firmware((tmp_path / "pc.ram.bin").read_bytes()) == outside_firmware(source.ram())


def test_query_machine_without_a_held_machine_is_migds_own(migd_factory: Callable[..., Migd],
                                                          tmp_path: Path) -> None:
    d = migd_factory("own", "-m", "32M")
    info = d.cmd("x-migd-query-machine")
    assert info["name"] == "own" and "foreign" not in info and "machine-type" not in info
    assert [b["name"] for b in d.cmd("x-migd-ram-digest")["blocks"]] == [b["name"] for b in info["ram"]["blocks"]]
