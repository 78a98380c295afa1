"""The network fault test bed: two network namespaces joined by a veth pair, and faults put between them.

Migrations over loopback never see a slow, lossy, cut or silent network. This module builds a small
private one on this machine: namespace ``a`` (the source's side) and namespace ``b`` (the
destination's), joined by one veth pair with the two addresses of a /30 that exists only between them
(:data:`ADDR_A`, :data:`ADDR_B`), so no packet ever leaves the machine. Daemons run inside with the
command prefix :meth:`NetPair.prefix` (``ip netns exec NS``); their QMP sockets are filesystem unix
sockets, which work across network namespaces.

The faults, each one command inside a namespace (the kernel here has no ``sch_netem``):

- delay: a delaying TCP relay of our own (tests/delay_relay.py) inside ``b``, :meth:`NetPair.relay`;
- loss: ``iptables -m statistic --mode random`` dropping arriving packets, :meth:`NetPair.loss`
  (dropped on INPUT, so the sender sees a lossy link, not a local ``EPERM``);
- rate: ``tc qdisc … tbf`` on both ends, :meth:`NetPair.rate`;
- a cut link: both veth ends down, :meth:`NetPair.cut` / :meth:`NetPair.mend`;
- a black-holed address: SYNs to a port dropped in ``b``, :meth:`NetPair.blackhole`;
- a stopped peer: SIGSTOP / SIGCONT, :func:`stopped`.

:meth:`NetPair.destroy` kills whatever still runs in the namespaces (only processes the tests started
there) and deletes them, which takes the veth pair, the rules and the qdiscs with it. :func:`unavailable`
says why a bed cannot be built here (not root, no ``ip``, namespaces refused), for a clean skip.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
RELAY = HERE / "delay_relay.py"

ADDR_A = "10.231.0.1"  # the source's end of the /30; only ever configured inside our own namespaces
ADDR_B = "10.231.0.2"
PREFIXLEN = 30
COMMAND_TIMEOUT = 10.0  # seconds for one ip/iptables/tc command
SIDES = ("a", "b")
PACKAGES = "iproute2 iptables"  # the Debian packages that bring ip, tc and iptables

_serial = itertools.count()


class NetFaultError(RuntimeError):
    """A command of the bed failed (its command line and stderr are in the message)."""


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one short command with a bound; raise NetFaultError on failure when ``check`` (any thread)."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetFaultError(f"{' '.join(cmd)}: {exc}") from exc
    if check and done.returncode != 0:
        raise NetFaultError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()}")
    return done


def missing_tools(*tools: str) -> str | None:
    """Why ``tools`` cannot be used (the first one not on PATH), or None (any thread)."""
    for tool in tools:
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install -y {PACKAGES})"
    return None


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None when they can (any thread)."""
    if os.geteuid() != 0:
        return f"network namespaces need root (running as uid {os.geteuid()})"
    reason = missing_tools("ip")
    if reason:
        return reason
    probe = f"mfprobe{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
    except NetFaultError as exc:
        return f"cannot create a network namespace: {exc}"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def namespaces() -> list[str]:
    """The names of the network namespaces that exist now (any thread)."""
    done = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


class Relay:
    """One delaying relay process running in a namespace; ``port`` is where it listens."""

    def __init__(self, proc: subprocess.Popen[str], host: str, port: int) -> None:
        self.proc = proc
        self.host = host
        self.port = port

    @property
    def uri(self) -> str:
        """The migration URI that reaches the relay."""
        return f"tcp:{self.host}:{self.port}"

    def stop(self) -> None:
        """Kill the relay (idempotent) (any thread)."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(COMMAND_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class NetPair:
    """Namespaces ``a`` and ``b`` joined by a veth pair (``a`` has ADDR_A, ``b`` has ADDR_B).

    Create with :meth:`create`, always end with :meth:`destroy` (a fixture's teardown).
    """

    def __init__(self) -> None:
        tag = f"{os.getpid()}x{next(_serial)}"
        self.ns = {"a": f"mfa{tag}", "b": f"mfb{tag}"}
        self.dev = {"a": "mfva", "b": "mfvb"}  # inside their own namespaces, so the names cannot clash
        self.addr = {"a": ADDR_A, "b": ADDR_B}
        self.relays: list[Relay] = []
        self._created: list[str] = []
        self._etc: list[Path] = []  # /etc/netns/NS directories made for silent_dns

    # -- life cycle ---------------------------------------------------------------------------------

    def create(self) -> NetPair:
        """Make both namespaces, the veth pair and its addresses, loopback up in each; self (any thread)."""
        for side in SIDES:
            _run(["ip", "netns", "add", self.ns[side]])
            self._created.append(self.ns[side])
        _run(["ip", "link", "add", self.dev["a"], "netns", self.ns["a"], "type", "veth",
              "peer", "name", self.dev["b"], "netns", self.ns["b"]])
        for side in SIDES:
            self.ip(side, "addr", "add", f"{self.addr[side]}/{PREFIXLEN}", "dev", self.dev[side])
            self.ip(side, "link", "set", "lo", "up")
            self.ip(side, "link", "set", self.dev[side], "up")
        return self

    def destroy(self) -> None:
        """Kill every process left in the namespaces, then delete them; never raises (any thread)."""
        for relay in self.relays:
            relay.stop()
        for ns in self._created:
            for pid in self.pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for ns in self._created:
            self._wait_empty(ns)
            _run(["ip", "netns", "del", ns], check=False)
        self._created.clear()
        for etc in self._etc:
            shutil.rmtree(etc, ignore_errors=True)
        self._etc.clear()

    def pids(self, ns: str) -> list[int]:
        """Processes running in namespace ``ns`` (any thread)."""
        done = _run(["ip", "netns", "pids", ns], check=False)
        return [int(word) for word in done.stdout.split() if word.isdigit()]

    def _wait_empty(self, ns: str, timeout: float = COMMAND_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while self.pids(ns) and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- commands -----------------------------------------------------------------------------------

    def prefix(self, side: str) -> list[str]:
        """The command prefix that runs a program in ``side``'s namespace."""
        return ["ip", "netns", "exec", self.ns[side]]

    def ip(self, side: str, *args: str) -> subprocess.CompletedProcess[str]:
        """``ip ARGS`` inside ``side``'s namespace (any thread)."""
        return _run(["ip", "-n", self.ns[side], *args])

    def exec(self, side: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a short command inside ``side``'s namespace (any thread)."""
        return _run([*self.prefix(side), *cmd], check=check)

    def _iptables(self, side: str, *rule: str) -> None:
        reason = missing_tools("iptables")
        if reason:
            raise NetFaultError(reason)
        self.exec(side, "iptables", "-w", "5", *rule)

    # -- faults -------------------------------------------------------------------------------------

    def loss(self, probability: float, sides: Sequence[str] = SIDES) -> None:
        """Drop each packet arriving at ``sides`` with ``probability`` (1.0: every one) (any thread)."""
        for side in sides:
            self._iptables(side, "-A", "INPUT", "-i", self.dev[side], "-m", "statistic", "--mode", "random",
                           "--probability", f"{probability:.4f}", "-j", "DROP")

    def clear_loss(self, sides: Sequence[str] = SIDES) -> None:
        """Remove every filter rule of ``sides`` (loss and black holes) (any thread)."""
        for side in sides:
            self._iptables(side, "-F", "INPUT")

    def rate(self, rate: str = "100mbit", burst: str = "64kb", latency: str = "50ms") -> None:
        """Shape both ends of the link with a token bucket (``tc qdisc add … tbf``) (any thread)."""
        reason = missing_tools("tc")
        if reason:
            raise NetFaultError(reason)
        for side in SIDES:
            self.exec(side, "tc", "qdisc", "add", "dev", self.dev[side], "root", "tbf", "rate", rate,
                      "burst", burst, "latency", latency)

    def cut(self) -> None:
        """Take both ends of the link down: a pulled cable, no error on either side (any thread)."""
        for side in SIDES:
            self.ip(side, "link", "set", self.dev[side], "down")

    def mend(self) -> None:
        """Bring both ends back up and wait until the link carries packets again (any thread)."""
        for side in SIDES:
            self.ip(side, "link", "set", self.dev[side], "up")
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while time.monotonic() < deadline:
            state = self.ip("a", "-o", "link", "show", self.dev["a"]).stdout
            if "LOWER_UP" in state and "NO-CARRIER" not in state:
                return
            time.sleep(0.02)
        raise NetFaultError(f"{self.dev['a']} did not come back up: {state.strip()}")

    def blackhole(self, port: int) -> str:
        """Drop every SYN to ``port`` of ADDR_B (a connect() there never hears back); the URI (any thread)."""
        self._iptables("b", "-A", "INPUT", "-i", self.dev["b"], "-p", "tcp", "--dport", str(port), "--syn",
                       "-j", "DROP")
        return f"tcp:{ADDR_B}:{port}"

    def silent_dns(self, side: str) -> None:
        """Make ``side``'s resolver ask a name server that never answers: ``ip netns exec`` mounts
        ``/etc/netns/NS/resolv.conf`` over the namespace's view, naming the other side's address, whose
        DNS queries are dropped. Call before starting the program there (any thread)."""
        other = "b" if side == "a" else "a"
        self._iptables(other, "-A", "INPUT", "-i", self.dev[other], "-p", "udp", "--dport", "53", "-j", "DROP")
        self._iptables(other, "-A", "INPUT", "-i", self.dev[other], "-p", "tcp", "--dport", "53", "-j", "DROP")
        etc = Path("/etc/netns") / self.ns[side]
        etc.mkdir(parents=True, exist_ok=True)
        self._etc.append(etc)
        (etc / "resolv.conf").write_text(f"nameserver {self.addr[other]}\noptions timeout:10 attempts:3\n")

    def relay(self, target_port: int, delay: float, side: str = "b", target_host: str = "127.0.0.1",
              timeout: float = COMMAND_TIMEOUT) -> Relay:
        """Start a relay in ``side`` listening on its veth address, forwarding to ``target_host:target_port``
        after ``delay`` s each way; returns once it listens (any thread)."""
        cmd = [*self.prefix(side), sys.executable, str(RELAY), "--listen", f"{self.addr[side]}:0",
               "--connect", f"{target_host}:{target_port}", "--delay", str(delay)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
        relay = Relay(proc, self.addr[side], 0)
        self.relays.append(relay)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("listening "):
            relay.stop()
            raise NetFaultError(f"relay did not start within {timeout}s (exit {proc.poll()}, said {line!r})")
        relay.port = int(line.split()[1])
        return relay


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the duration of the block; SIGCONT afterwards, whatever happened (any thread)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
