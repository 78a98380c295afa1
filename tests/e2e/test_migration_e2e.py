"""End to end: two real migd processes migrate a running machine over each transport.

The destination runs with ``-S`` where its RAM must be compared: it stays paused after the load, so
its ``x-migd-ram-digest`` can be compared with the source's (frozen in ``postmigrate``) before either
changes; ``cont`` then shows it really runs the source's guest.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from e2e_util import TRANSPORTS, digests, migrate, poll, query, ram_add, run_status, wait_status
from helpers import HELD, hold_active, release_hold, settled

pytestmark = pytest.mark.e2e

MB = 1 << 20


def counters(m) -> list[int]:
    """Each vCPU's counter-guest value, from x-migd-query-workload."""
    info = m.cmd("x-migd-query-workload")
    return [int(v["counter"]) for v in info["vcpus"]]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_random_workload_migrates_with_equal_ram(migd_factory, make_plan, transport: str) -> None:
    src = migd_factory("src", "-m", "256M", "--workload", "random,rate=16M")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    plan = make_plan(transport)
    dst = migrate(migd_factory, plan, src, ["-m", "256M", "-S"])
    assert run_status(src) == "postmigrate"
    assert run_status(dst) == "paused"  # -S: loaded, not started
    info = query(src)
    assert info["ram"]["remaining"] == 0 and info["ram"]["transferred"] >= 0
    assert digests(dst) == digests(src)
    dst.cmd("cont")
    assert run_status(dst) == "running"
    assert query(dst) == {"status": "completed"}


def test_paused_source_stays_paused_on_the_destination(migd_factory, make_plan) -> None:
    """QEMU's global state: the run state travels, so a guest stopped before migrating is not started."""
    src = migd_factory("src", "-m", "32M", "--workload", "random,rate=8M")
    src.cmd("stop")
    dst = migrate(migd_factory, make_plan("unix"), src, ["-m", "32M"])  # no -S: it would autostart
    assert run_status(dst) == "paused"
    assert digests(dst) == digests(src)
    dst.cmd("cont")
    assert run_status(dst) == "running"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_counter_guest_continues_exactly(migd_factory, make_plan, transport: str) -> None:
    src = migd_factory("src", "-m", "64M", "--smp", "2", "--workload", "counter")
    poll(lambda: min(counters(src)) > 0, 30, "the counter guest to start counting")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    plan = make_plan(transport)
    dst = migrate(migd_factory, plan, src, ["-m", "64M", "--smp", "2", "-S"])
    at_stop = counters(src)
    assert counters(dst) == at_stop  # exactly where the source stopped
    for vcpu in dst.cmd("x-migd-query-workload")["vcpus"]:  # RAM agrees with the device state
        assert vcpu["consistent"] is True and vcpu["ram-counter"] == vcpu["counter"], vcpu
    assert digests(dst) == digests(src)
    dst.cmd("cont")
    poll(lambda: all(now > then for now, then in zip(counters(dst), at_stop, strict=True)), 30,
         "the migrated counter guest to continue")
    # the guest checks its own RAM every step: a lost or stale page would have stopped it
    assert run_status(dst) == "running"


def test_ram_block_hot_added_during_migration(migd_factory, make_plan) -> None:
    src = migd_factory("src", "-m", "256M", "--workload", "random,rate=16M")
    hold_active(src)  # until the blocks are added
    plan = make_plan("unix")
    dst = migd_factory("dst", "-m", "256M", "-S", *plan.destination_args())
    wait_status(dst, "setup", 30)
    # the management layer adds the block on the destination while it waits, like for QEMU
    ram_add(dst, "hot0", 16 * MB)
    plan.start(src, dst)
    poll(lambda: query(src).get("ram", {}).get("transferred", 0) > 4 * MB, 60, "the first pass to be under way")
    ram_add(src, "hot0", 16 * MB)
    # a block the destination was not told about: the source's announcement must create it there
    ram_add(src, "hot1", 8 * MB)
    assert query(src)["status"] in HELD  # both really arrived during the migration
    release_hold(src)
    wait_status(src, "completed", 90)
    wait_status(dst, "completed", 90)
    got, want = digests(dst), digests(src)
    assert set(want) == {"ram0", "hot0", "hot1"}
    assert got == want
    sizes = {b["name"]: b["size"] for b in dst.cmd("x-migd-query-machine")["ram"]["blocks"]}
    assert sizes == {"ram0": 256 * MB, "hot0": 16 * MB, "hot1": 8 * MB}


def test_destination_killed_leaves_source_failed_and_running(migd_factory, make_plan) -> None:
    src = migd_factory("src", "-m", "256M", "--workload", "random,rate=16M")
    hold_active(src)  # the destination is killed mid-way
    plan = make_plan("unix")
    dst = migd_factory("dst", "-m", "256M", *plan.destination_args())
    wait_status(dst, "setup", 30)
    plan.start(src, dst)
    wait_status(dst, "active", 30)
    poll(lambda: query(src).get("ram", {}).get("transferred", 0) > 4 * MB, 60, "data to flow")
    dst.kill()
    info = wait_status(src, "failed", 60)
    assert info.get("error-desc")
    settled(src, "running")  # held, it may have failed in pre-switchover, vCPUs stopped
    # the guest really runs again: the workload keeps writing
    before = digests(src)
    poll(lambda: digests(src) != before, 30, "the source guest to keep running")


def test_source_killed_leaves_destination_failed_not_running(migd_factory, tmp_path: Path) -> None:
    src = migd_factory("src", "-m", "256M", "--workload", "random,rate=16M")
    hold_active(src)  # the source is killed mid-way
    dst = migd_factory("dst", "-m", "256M", "--incoming", "defer")
    dst.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    sock = dst.sock_path("mig")
    dst.cmd("migrate-incoming", uri=f"unix:{sock}", **{"exit-on-error": False})
    assert query(dst)["status"] == "setup"
    src.cmd("migrate", uri=f"unix:{sock}")
    wait_status(dst, "active", 30)
    poll(lambda: query(src).get("ram", {}).get("transferred", 0) > 4 * MB, 60, "data to flow")
    src.kill()
    info = wait_status(dst, "failed", 60)
    # the stream ends mid-way: with a FIN, or with a reset when the killed source had not read all the
    # destination sent it (PONGs, heartbeats: Linux resets a unix socket closed with unread data)
    assert info["error-desc"].startswith(("load of migration failed: Migration stream truncated",
                                          "load of migration failed: Unable to read from channel: "
                                          "Connection reset by peer")), info
    assert "socket-address" not in info
    status = dst.cmd("query-status")
    assert status["status"] == "inmigrate" and status["running"] is False
    # exit-on-error false: the daemon stays up; a second migrate-incoming is refused like QEMU
    with pytest.raises(Exception, match="The incoming migration has already been started"):
        dst.cmd("migrate-incoming", uri=f"unix:{dst.sock_path('mig2')}")


def test_truncated_file_stream_fails_clearly(migd_factory, tmp_path: Path) -> None:
    src = migd_factory("src", "-m", "64M", "--workload", "random,rate=16M")
    poll(lambda: sum(v["bytes-written"] for v in src.cmd("x-migd-query-workload")["vcpus"]) > 2 * MB, 30,
         "the guest to write 2 MB")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    state = tmp_path / "state"
    src.cmd("migrate", uri=f"file:{state}")
    wait_status(src, "completed", 60)
    size = state.stat().st_size
    assert size > 1 * MB  # the pages the workload wrote (untouched ones are 9-byte ZERO records)
    os.truncate(state, size // 2)
    # exit-on-error false: stays up and reports
    dst = migd_factory("dst", "-m", "64M", "--incoming", "defer")
    dst.cmd("migrate-incoming", uri=f"file:{state}", **{"exit-on-error": False})
    info = wait_status(dst, "failed", 60)
    assert "truncated" in info["error-desc"]
    assert run_status(dst) == "inmigrate"
    # default exit-on-error (true): the process exits with status 1, like QEMU
    dst2 = migd_factory("dst2", "-m", "64M", "--incoming", f"file:{state}", connect=False)
    assert dst2.proc.wait(timeout=60) == 1


def test_one_gib_unix_unlimited_downtime_within_limit(migd_factory, make_plan) -> None:
    """Issue 4: 1 GiB under random,rate=32M, max-bandwidth 0, over unix."""
    src = migd_factory("src", "-m", "1G", "--workload", "random,rate=32M")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    limit = src.cmd("query-migrate-parameters")["downtime-limit"]
    plan = make_plan("unix")
    dst = migrate(migd_factory, plan, src, ["-m", "1G", "-S"], timeout=180)
    info = query(src)
    assert digests(dst) == digests(src)
    downtime = info["downtime"]
    assert 0 < downtime <= limit
    phases = info["x-migd-downtime-phases"]
    assert phases and abs(sum(phases.values()) - downtime) <= 5, (phases, downtime)


def drive_active(m) -> bool:
    (drive,) = m.cmd("x-migd-query-machine")["drives"]
    return bool(drive["active"])


def test_drive_image_lock_moves_at_switchover(migd_factory, make_plan, tmp_path: Path) -> None:
    """Late activation: the destination takes the image lock only after the load succeeded."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (8 * MB))
    src = migd_factory("src", "-m", "64M", "--drive", f"file={image}", "--workload", "random,rate=4M,disk-rate=1M")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    plan = make_plan("unix")
    dst = migd_factory("dst", "-m", "64M", "--drive", f"file={image}", *plan.destination_args())
    wait_status(dst, "setup", 30)
    assert drive_active(src) and not drive_active(dst)  # the source holds the lock while it runs
    plan.start(src, dst)
    wait_status(src, "completed", 60)
    wait_status(dst, "completed", 60)
    assert run_status(dst) == "running"
    assert drive_active(dst) and not drive_active(src)


def test_load_failing_at_the_end_gives_the_source_back_its_guest_and_drive(
        migd_factory, make_plan, tmp_path: Path) -> None:
    """The destination rejects the device state (other vCPU count) after all RAM arrived: it sends
    SHUT(1); the source, already switched over, fails, re-takes the image lock and runs again."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (8 * MB))
    src = migd_factory("src", "-m", "64M", "--smp", "1", "--drive", f"file={image}",
                       "--workload", "random,rate=4M")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    plan = make_plan("unix")
    dst = migd_factory("dst", "-m", "64M", "--smp", "2", "--drive", f"file={image}", "--incoming", "defer")
    sock = plan.source_uri(None)
    dst.cmd("migrate-incoming", uri=sock, exit_on_error=False)
    src.cmd("migrate", uri=sock)
    dinfo = wait_status(dst, "failed", 60)
    assert dinfo["error-desc"].startswith("load of migration failed: error while loading state"), dinfo
    sinfo = wait_status(src, "failed", 60)
    assert sinfo["error-desc"] == "Sibling indicated error 1"
    settled(src, "running")  # switched over when the SHUT came: the resume follows the status
    assert drive_active(src)
    assert run_status(dst) == "inmigrate" and not drive_active(dst)


def test_channels_form_both_sides_over_ipv6_or_ipv4(migd_factory) -> None:
    """QEMU's ``channels`` argument on migrate-incoming and migrate, over IPv6 where available."""
    host = "::1"
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind((host, 0))
    except OSError:
        host = "127.0.0.1"
    src = migd_factory("src", "-m", "64M", "--workload", "random,rate=4M")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    dst = migd_factory("dst", "-m", "64M", "-S", "--incoming", "defer")
    addr = {"transport": "socket", "type": "inet", "host": host, "port": "0"}
    dst.cmd("migrate-incoming", channels=[{"channel-type": "main", "addr": addr}])
    (listening,) = query(dst)["socket-address"]
    assert listening["host"] == host and listening["port"] != "0"
    src.cmd("migrate", channels=[{"channel-type": "main", "addr": {**addr, "port": listening["port"]}}])
    wait_status(src, "completed", 60)
    wait_status(dst, "completed", 60)
    assert digests(dst) == digests(src)


@pytest.mark.parametrize(
    ("uri", "desc"),
    [  # the texts of reference/qemu-7.2-transcripts/migrate-unreachable.txt
        ("exec:false", "Unable to write to command: Broken pipe"),
        ("unix:/nonexistent/x.sock", "Failed to connect to '/nonexistent/x.sock': No such file or directory"),
        ("tcp:127.0.0.1:1", "Failed to connect to '127.0.0.1:1': Connection refused"),
        ("file:/nonexistent/f", "Unable to open /nonexistent/f: No such file or directory"),
    ],
)
def test_unreachable_destination_texts(migd_factory, uri: str, desc: str) -> None:
    src = migd_factory("src", "-m", "16M")
    src.cmd("migrate", uri=uri)
    info = wait_status(src, "failed", 30)
    assert info["error-desc"] == desc
    assert run_status(src) == "running"
