"""Migrations over TCP through a real (namespaced) network with faults in it: delay, loss, rate, cut, silence.

The source runs in namespace ``a``, the destination in ``b`` (tests/netfault.py builds them and tears
them down); every migration is checked the way the e2e tests check one: the destination starts with
``-S`` and its ``x-migd-ram-digest`` must equal the source's. The cases issue 10 and issue 11 found
broken (delay, a silent destination, a black-holed address) were strict xfails until their fixes landed;
now they are plain tests. Every wait is bounded; the file takes about two minutes.

Skipped as a whole, with the reason, where network namespaces cannot be made (not root, no ``ip``);
the fast lane skips it with ``-m 'not netns'``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.e2e_util import digests, poll, query, run_status, wait_status
from helpers import Migd, RawQMP, random_ram_file
from netfault import ADDR_B, NetFaultError, NetPair, missing_tools, namespaces, stopped, unavailable
from qemu.qmp import ExecuteError

pytestmark = [pytest.mark.netns, pytest.mark.e2e]  # real daemons in namespaces: not in the fast lane

MiB = 1 << 20
GUEST = "64M"
PEER_TIMEOUT = 3  # s, x-migd-peer-timeout for the stall cases
STALL_SLACK = 7  # s the source may take past the peer timeout to fail the migration
QMP_PORT = 4445  # fixed ports are safe: they only exist inside our own namespaces
BLACKHOLE_PORT = 4444

Daemons = Callable[..., Migd]


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bed_unavailable() -> str | None:
    """Why namespaces cannot be made here (checked once per module), or None."""
    return unavailable()


@pytest.fixture
def net(bed_unavailable: str | None) -> Iterator[NetPair]:
    """A fresh pair of namespaces joined by a veth pair; deleted (processes and all) after the test."""
    if bed_unavailable:
        pytest.skip(f"no network fault bed: {bed_unavailable}")
    pair = NetPair()
    try:
        pair.create()
    except NetFaultError as exc:
        pair.destroy()
        pytest.skip(f"no network fault bed: {exc}")
    yield pair
    pair.destroy()


@pytest.fixture
def daemons(net: NetPair, tmp_path: Path) -> Iterator[Daemons]:
    """``daemons(side, name, *args) -> Migd`` runs migd in namespace ``side``; all killed at teardown."""
    started: list[Migd] = []

    def start(side: str, name: str, *args: str) -> Migd:
        vm = Migd(tmp_path, name, *args, prefix=net.prefix(side))
        started.append(vm)
        return vm

    yield start
    for vm in started:
        vm.kill()
        log = vm.log()
        if log:
            print(f"----- migd {vm.name} log -----\n{log}")


@pytest.fixture
def random_ram(tmp_path: Path) -> Path:
    """A guest RAM file of random bytes (``--mem-path``), so every page costs its full size on the wire."""
    return random_ram_file(tmp_path / "ram.bin", int(GUEST.rstrip("M")))


def need(*tools: str) -> None:
    """Skip the test when a tool it needs is missing."""
    reason = missing_tools(*tools)
    if reason:
        pytest.skip(reason)


# -- steps ------------------------------------------------------------------------------------------

def counters(m: Migd) -> list[int]:
    """Each vCPU's counter-guest value."""
    return [int(v["counter"]) for v in m.cmd("x-migd-query-workload")["vcpus"]]


def counting_source(daemons: Daemons, *args: str) -> Migd:
    """A source in ``a`` running the counter guest, once it counts."""
    src = daemons("a", "src", "-m", GUEST, *args)
    poll(lambda: min(counters(src)) > 0, 30, "the counter guest to start counting")
    return src


def destination(daemons: Daemons, name: str, *args: str, host: str = ADDR_B) -> tuple[Migd, int]:
    """A destination in ``b`` listening on ``host`` (port chosen by the kernel); it and its port."""
    dst = daemons("b", name, "-m", GUEST, *args, "--incoming", f"tcp:{host}:0")
    wait_status(dst, "setup", 30)
    return dst, int(query(dst)["socket-address"][0]["port"])


def migrate_and_compare(src: Migd, dst: Migd, uri: str, timeout: float) -> None:
    """Migrate to a ``-S`` destination within ``timeout`` s; the RAM and the counters must be equal."""
    src.cmd("migrate", uri=uri)
    wait_status(src, "completed", timeout)
    wait_status(dst, "completed", timeout)
    assert run_status(src) == "postmigrate"
    assert run_status(dst) == "paused"
    assert digests(dst) == digests(src)
    assert counters(dst) == counters(src)


def unlimited(src: Migd) -> None:
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0, "downtime-limit": 300})


def set_peer_timeout(src: Migd, seconds: int) -> bool:
    """``x-migd-peer-timeout``; False when this migd does not know the parameter yet (issue 11)."""
    try:
        src.cmd("migrate-set-parameters", **{"x-migd-peer-timeout": seconds})
    except ExecuteError as exc:
        print(f"x-migd-peer-timeout refused: {exc}")
        return False
    return True


def active_with_bytes_moving(src: Migd, at_least: int = 2 * MiB) -> dict[str, Any]:
    """Wait until the source is ``active`` and has sent ``at_least`` bytes of RAM."""

    def check() -> dict[str, Any] | None:
        info = query(src)
        ram = info.get("ram", {})
        return info if info["status"] == "active" and ram.get("transferred", 0) >= at_least else None

    info: dict[str, Any] = poll(check, 30, "the migration to be active with bytes moving")
    return info


def gave_up(dst: Migd) -> bool:
    """The destination ended its incoming migration: it exited, or says ``failed``."""
    if dst.returncode is not None:
        return True
    try:
        return bool(query(dst)["status"] == "failed")
    except Exception:  # noqa: BLE001 - it may exit between the two checks
        return dst.returncode is not None


PROBE = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = s.makefile("rb")
f.readline()
t = time.monotonic()
s.sendall(b'{"execute": "qmp_capabilities"}\\n')
f.readline()
print(time.monotonic() - t)
"""


# -- the bed itself ---------------------------------------------------------------------------------

def test_relay_adds_its_delay_each_way(net: NetPair, daemons: Daemons) -> None:
    """A QMP round trip from ``a`` through the relay in ``b`` takes twice the delay (and not much more)."""
    delay = 0.05
    daemons("b", "dst", "-m", "16M", "--qmp", f"tcp:127.0.0.1:{QMP_PORT}")
    relay = net.relay(QMP_PORT, delay)
    rtt = float(net.exec("a", sys.executable, "-c", PROBE, relay.host, str(relay.port)).stdout)
    assert 2 * delay <= rtt < 2 * delay + 0.2, rtt


def test_destroy_leaves_nothing_behind(bed_unavailable: str | None) -> None:
    """destroy() kills what runs inside and deletes both namespaces (the veth pair goes with them)."""
    if bed_unavailable:
        pytest.skip(f"no network fault bed: {bed_unavailable}")
    pair = NetPair().create()
    try:
        relay = pair.relay(9, 0.01)
        assert relay.proc.poll() is None
        assert set(pair.ns.values()) <= set(namespaces())
    finally:
        pair.destroy()
    assert relay.proc.poll() is not None
    assert not set(pair.ns.values()) & set(namespaces())


# -- migrations through faults ----------------------------------------------------------------------

def test_migration_through_loss_and_rate_limit(net: NetPair, daemons: Daemons, random_ram: Path) -> None:
    """1 % loss each way and a 100 Mbit/s token bucket: slower, but the RAM arrives intact."""
    need("iptables", "tc")
    net.loss(0.01)
    net.rate("100mbit")
    src = counting_source(daemons, "--mem-path", str(random_ram), "--workload", "counter")
    unlimited(src)
    dst, port = destination(daemons, "dst", "-S")
    started = time.monotonic()
    migrate_and_compare(src, dst, f"tcp:{ADDR_B}:{port}", 60)
    # 64 MiB of random pages cannot cross 100 Mbit/s in less than ~5.4 s: the shaping really held
    assert time.monotonic() - started > 4.5


def test_migration_through_the_relay_at_1ms(net: NetPair, daemons: Daemons) -> None:
    """The relayed path itself carries a migration (1 ms each way completes today)."""
    src = counting_source(daemons, "--workload", "counter,rate=4M")
    unlimited(src)
    dst, port = destination(daemons, "dst", "-S", host="127.0.0.1")
    relay = net.relay(port, 0.001)
    migrate_and_compare(src, dst, relay.uri, 30)


@pytest.mark.parametrize("delay_ms", [10, 50])
def test_migration_through_delay(net: NetPair, daemons: Daemons, delay_ms: int) -> None:
    """10 and 50 ms each way, a guest dirtying 4 MB/s: the migration must complete with equal RAM."""
    src = counting_source(daemons, "--workload", "counter,rate=4M")
    unlimited(src)
    dst, port = destination(daemons, "dst", "-S", host="127.0.0.1")
    relay = net.relay(port, delay_ms / 1000)
    migrate_and_compare(src, dst, relay.uri, 25)


def test_multifd_over_a_slow_link_drains_its_channels_before_the_switchover(net: NetPair, daemons: Daemons,
                                                                              random_ram: Path) -> None:
    """multifd 2 over a 1 Gbit/s token bucket: the channels' sockets hold megabytes the destination
    has not read, and the final pass waits behind them. The switch-over drains them first and counts
    what is left: an idle 256 MiB guest had 112 ms of downtime for 22 expected when only the main
    channel's queue counted, 2 for 3 since."""
    need("tc")
    net.rate("1gbit", burst="1mb")
    src = daemons("a", "src", "-m", GUEST, "--mem-path", str(random_ram), "-S")
    dst, port = destination(daemons, "dst", "-S")
    for vm in (src, dst):
        vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
        vm.cmd("migrate-set-parameters", **{"multifd-channels": 2})
    unlimited(src)
    src.cmd("migrate", uri=f"tcp:{ADDR_B}:{port}")
    wait_status(src, "completed", 60)
    wait_status(dst, "completed", 60)
    info = query(src)
    assert digests(dst) == digests(src)
    real, expected = info["downtime"], info["x-migd-expected-downtime"]
    assert real <= 20, info
    assert abs(expected - real) <= 5 or max(expected, real) <= 1.25 * min(expected, real), info


@contextlib.contextmanager
def stall(net: NetPair, dst: Migd, kind: str) -> Iterator[None]:
    """The destination goes silent for the block: stopped, cut off, or every packet lost."""
    if kind == "sigstop":
        with stopped(dst.proc.pid):
            yield
    elif kind == "cut":
        net.cut()
        try:
            yield
        finally:
            net.mend()
    elif kind == "loss":
        net.loss(1.0)
        try:
            yield
        finally:
            net.clear_loss()
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind", ["sigstop", "cut", "loss"])
def test_stalled_destination_fails_the_migration(net: NetPair, daemons: Daemons, random_ram: Path,
                                                  kind: str) -> None:
    """A destination that goes silent during ``active``: the source fails within the peer timeout, its
    guest keeps running, the destination never runs, and a new migration then works."""
    if kind == "loss":
        need("iptables")
    src = counting_source(daemons, "--mem-path", str(random_ram), "--workload", "counter")
    set_peer_timeout(src, PEER_TIMEOUT)  # absent before issue 11's fix: the wait below then fails
    # ~16 s of active for 64 MiB; a 1 ms downtime limit keeps it there (the policy would switch a
    # capped guest over at once: its final pass runs uncapped)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * MiB, "downtime-limit": 1})
    dst, port = destination(daemons, "dst")  # no -S: it would run the guest if it ever loaded it
    src.cmd("migrate", uri=f"tcp:{ADDR_B}:{port}")
    active_with_bytes_moving(src)
    with stall(net, dst, kind):
        silent = time.monotonic()
        wait_status(src, "failed", PEER_TIMEOUT + STALL_SLACK)
        noticed = time.monotonic() - silent
    assert noticed <= PEER_TIMEOUT + STALL_SLACK
    # `failed` is published just before the migration thread resumes the guest (as in QEMU)
    poll(lambda: run_status(src) == "running", 10, "the source's guest to run again")
    before = counters(src)
    poll(lambda: all(n > b for n, b in zip(counters(src), before, strict=True)), 10,
         "the source's guest to keep counting")
    # the destination gives up too and never runs what it received
    poll(lambda: gave_up(dst), 15, "the silenced destination to give up")
    try:
        state = run_status(dst)
    except Exception:  # noqa: BLE001 - it exits (exit-on-error) while we ask
        state = None
    if state is not None:
        assert state != "running"
    else:
        assert dst.proc.wait(30) != 0
    unlimited(src)
    dst2, port2 = destination(daemons, "dst2", "-S")
    migrate_and_compare(src, dst2, f"tcp:{ADDR_B}:{port2}", 30)


def test_cancelled_connects_to_a_black_hole_leave_the_daemon_responsive(net: NetPair,
                                                                          daemons: Daemons) -> None:
    """Six migrations to an address that never answers a SYN, each cancelled: ``stop`` and
    ``x-migd-ram-digest`` still answer within 2 s, and a healthy migration then works."""
    need("iptables")
    src = counting_source(daemons, "--workload", "counter")
    uri = net.blackhole(BLACKHOLE_PORT)
    for _ in range(6):
        src.cmd("migrate", uri=uri)
        wait_status(src, "setup", 2)
        src.cmd("migrate_cancel")
        wait_status(src, "cancelled", 2)
    with RawQMP(src.qmp_path, timeout=2) as raw:
        raw.negotiate()
        for command in ("stop", "x-migd-ram-digest"):
            began = time.monotonic()
            reply = raw.execute(command)  # a socket timeout (2 s) fails the test here
            assert "return" in reply, reply
            assert time.monotonic() - began < 2
    src.cmd("cont")
    unlimited(src)
    dst, port = destination(daemons, "dst", "-S")
    migrate_and_compare(src, dst, f"tcp:{ADDR_B}:{port}", 20)


def test_cancelled_lookups_the_name_server_never_answers_leave_the_daemon_responsive(
        net: NetPair, daemons: Daemons) -> None:
    """``migrate tcp:NAME:PORT`` while the name server is silent (the resolver would wait 30 s), eight
    times, each cancelled: no worker thread stays behind in getaddrinfo, so ``x-migd-ram-digest`` (a
    worker-thread command) still answers within 2 s, and a migration to an address then works."""
    need("iptables")
    net.silent_dns("a")
    src = counting_source(daemons, "--workload", "counter")
    for _ in range(8):
        src.cmd("migrate", uri="tcp:migd-silent-dns-test.example:4444")
        wait_status(src, "setup", 2)
        src.cmd("migrate_cancel")
        wait_status(src, "cancelled", 2)
    with RawQMP(src.qmp_path, timeout=2) as raw:
        raw.negotiate()
        began = time.monotonic()
        reply = raw.execute("x-migd-ram-digest")  # a socket timeout (2 s) fails the test here
        assert "return" in reply, reply
        assert time.monotonic() - began < 2
    assert src.status() == "running"
    unlimited(src)
    dst, port = destination(daemons, "dst", "-S")
    migrate_and_compare(src, dst, f"tcp:{ADDR_B}:{port}", 20)
