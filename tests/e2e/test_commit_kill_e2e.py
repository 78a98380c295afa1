"""End to end: SIGKILL either daemon at each message of the commit protocol (docs/SWITCHOVER.md §2).

The two real daemons talk through a relay of the test's own (real unix sockets, two threads). The
relay holds back the first LOADED (destination -> source), COMMIT (source -> destination) or SHUT
(destination -> source) it sees, so the test can SIGKILL one daemon at exactly that point — the held
message was never delivered — and then close the connection as a dying process would. The survivor
must then run the guest exactly when the protocol allows it, and otherwise stay paused and say why.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2e_util import poll, query, run_status, wait_status
from helpers import settled

pytestmark = pytest.mark.e2e

LOADED, SHUT = 0x4D01, 0x0001
COMMIT = b"\x08\x4d\x01\x00\x00"


class Relay:
    """Source -> relay -> destination, holding back the first message named ``hold``."""

    def __init__(self, listen_path: Path, target_path: Path, hold: str) -> None:
        self.hold = hold
        self.held = threading.Event()
        self._after_loaded = False
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(listen_path))
        self._listener.listen(1)
        self._listener.settimeout(60)
        self._target = target_path
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        try:
            src, _ = self._listener.accept()
        except OSError:
            return
        dst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dst.connect(str(self._target))
        self._socks += [src, dst]
        for fn, a, b in ((self._forward, src, dst), (self._backward, dst, src)):
            t = threading.Thread(target=fn, args=(a, b), daemon=True)
            t.start()
            self._threads.append(t)

    def _forward(self, a: socket.socket, b: socket.socket) -> None:
        """The stream; after LOADED it carries only 5-byte COMMANDs, where COMMIT may be held."""
        pending = b""
        while not self.held.is_set():
            try:
                data = a.recv(1 << 20)
            except OSError:
                return
            if not data:
                break
            if self.hold != "COMMIT" or not self._after_loaded:
                b.sendall(data)
                continue
            pending += data
            while len(pending) >= 5:
                cmd, pending = pending[:5], pending[5:]
                if cmd == COMMIT:
                    self.held.set()
                    return
                b.sendall(cmd)
        self.close()

    def _backward(self, a: socket.socket, b: socket.socket) -> None:
        """The return path, message by message; LOADED or SHUT may be held."""
        buf = b""
        while not self.held.is_set():
            try:
                data = a.recv(65536)
            except OSError:
                return
            if not data:
                break
            buf += data
            while len(buf) >= 4:
                kind, length = struct.unpack(">HH", buf[:4])
                if len(buf) < 4 + length:
                    break
                msg, buf = buf[: 4 + length], buf[4 + length:]
                if (kind, self.hold) in ((LOADED, "LOADED"), (SHUT, "SHUT")):
                    self.held.set()
                    return
                if kind == LOADED:
                    self._after_loaded = True  # set before the source can answer it
                b.sendall(msg)
        self.close()

    def close(self) -> None:
        """Both connections end with a FIN, as when a process dies."""
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self._listener.close()
        except OSError:
            pass

    def join(self) -> None:
        for t in self._threads:
            t.join(10)
        for s in self._socks:
            s.close()


# (held message, which daemon dies) -> what the survivor does
CASES = [
    ("LOADED", "dst", "src runs"),  # nothing committed: the source resumes
    ("LOADED", "src", "dst fails"),  # the destination never saw COMMIT: it fails, does not run
    ("COMMIT", "src", "dst fails"),  # the COMMIT never arrived: the stream ended cleanly without it
    ("COMMIT", "dst", "src paused"),  # committed, the destination died: only an operator knows
    ("SHUT", "dst", "src paused"),  # the destination ran and died: the source must not resume
    ("SHUT", "src", "dst runs"),  # the destination has the guest
]


@pytest.mark.parametrize(("hold", "victim", "expect"), CASES, ids=[f"kill-{c[1]}-before-{c[0]}" for c in CASES])
def test_sigkill_at_each_commit_message(migd_factory: Callable[..., Any], hold: str, victim: str, expect: str) -> None:
    src = migd_factory("src", "-m", "64M", "--workload", "random,rate=4M")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0, "x-migd-peer-timeout": 3})
    dst = migd_factory("dst", "-m", "64M", "--incoming", "defer")
    dst.cmd("migrate-set-parameters", **{"x-migd-peer-timeout": 3})
    dst_sock, relay_sock = dst.sock_path("mig"), dst.sock_path("relay")
    dst.cmd("migrate-incoming", uri=f"unix:{dst_sock}", **{"exit-on-error": False})
    relay = Relay(relay_sock, dst_sock, hold)
    try:
        src.cmd("migrate", uri=f"unix:{relay_sock}")
        assert relay.held.wait(60), f"{hold} never came: {query(src)} {query(dst)}"
        (src if victim == "src" else dst).kill()
        relay.close()
        survivor = dst if victim == "src" else src
        if expect == "src runs":
            info = wait_status(src, "failed", 30)
            # `failed` is published just before the migration thread resumes the guest (as in QEMU)
            poll(lambda: run_status(src) == "running", 10, f"the source's guest to run again: {info}")
        elif expect == "src paused":
            info = wait_status(src, "failed", 30)
            assert settled(src, "postmigrate") == "postmigrate", info
            assert "the migration was committed, so the guest stays paused here" in info["error-desc"], info
            # the operator, who knows the destination is gone, takes the guest back
            src.cmd("cont")
            assert run_status(src) == "running"
        elif expect == "dst fails":
            info = wait_status(dst, "failed", 30)
            assert info["error-desc"] == ("The source closed the migration stream after the load without "
                                          "committing it"), info
            assert dst.cmd("query-status")["running"] is False
        else:
            info = wait_status(dst, "completed", 30)
            assert run_status(dst) == "running", info
        assert survivor.returncode is None
    finally:
        relay.close()
        relay.join()
