"""Shared steps of the end-to-end migration tests: waiting on states, digests, the five transports.

Everything here drives real ``migd`` processes over QMP (``tests/helpers.py``'s ``Migd``); waits poll a
condition with a timeout, never a bare sleep.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import wait_for

TRANSPORTS = ("tcp", "unix", "exec", "fd", "file")


def poll(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Call ``fn`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    return wait_for(fn, timeout, interval, what)


def query(m: Any) -> dict[str, Any]:
    return m.cmd("query-migrate")


def wait_status(m: Any, statuses: str | tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
    """Wait for query-migrate's status; a terminal status other than the wanted one fails at once."""
    wanted = (statuses,) if isinstance(statuses, str) else statuses

    def check() -> dict[str, Any] | None:
        info = query(m)
        status = info.get("status")
        if status in wanted:
            return info
        if status in ("completed", "failed", "cancelled") and status not in wanted:
            raise AssertionError(f"{getattr(m, 'name', 'migd')}: migration ended {status}, wanted {wanted}: {info}")
        return None

    return poll(check, timeout, f"{getattr(m, 'name', 'migd')} migration status {wanted}")


def ram_add(m: Any, name: str, size: int) -> None:
    """x-migd-ram-add (its ``name`` argument clashes with Migd.cmd's own parameter)."""
    reply = m.cmd_raw("x-migd-ram-add", {"name": name, "size": size})
    assert reply == {"return": {}}, reply


def run_status(m: Any) -> str:
    return m.cmd("query-status")["status"]


def digests(m: Any) -> dict[str, str]:
    return {b["name"]: b["digest"] for b in m.cmd("x-migd-ram-digest")["blocks"]}


class Plan:
    """How one transport connects a source and a destination: destination arguments, then migrate."""

    def __init__(self, transport: str, tmp: Path) -> None:
        self.transport = transport
        # a short directory: sockaddr_un paths are limited to 107 bytes, pytest's tmp_path can be deeper
        self.tmp = Path(tempfile.mkdtemp(prefix="migd-e2e-"))
        self.files = tmp
        self.uri: str | None = None
        self._keep: list[Any] = []  # sockets/clients that must live until the migration is done

    def destination_args(self) -> list[str]:
        """``--incoming`` for the destination (file: only after the source finished writing)."""
        t, tmp = self.transport, self.tmp
        if t == "tcp":
            return ["--incoming", "tcp:127.0.0.1:0"]
        if t == "unix":
            return ["--incoming", f"unix:{tmp}/mig.sock"]
        if t == "exec":
            fifo = tmp / "mig.fifo"
            if not fifo.exists():
                os.mkfifo(fifo)
            return ["--incoming", f"exec:cat {fifo}"]
        if t == "fd":
            return ["--incoming", "defer"]
        if t == "file":
            return ["--incoming", f"file:{self.files}/mig.state"]
        raise ValueError(t)

    def source_uri(self, dst: Any | None) -> str:
        t, tmp = self.transport, self.tmp
        if t == "tcp":
            assert dst is not None
            port = query(dst)["socket-address"][0]["port"]
            return f"tcp:127.0.0.1:{port}"
        if t == "unix":
            return f"unix:{tmp}/mig.sock"
        if t == "exec":
            return f"exec:cat > {tmp}/mig.fifo"
        if t == "file":
            return f"file:{self.files}/mig.state"
        raise ValueError(t)

    def start(self, src: Any, dst: Any | None) -> None:
        """Issue ``migrate`` on the source (fd: hand both ends of a socketpair over with getfd first)."""
        if self.transport == "fd":
            assert dst is not None
            a, b = socket.socketpair()
            dclient = dst.client()
            dclient.send_fd_scm(b.fileno())
            dclient.cmd("getfd", fdname="mig")
            dclient.cmd("migrate-incoming", uri="fd:mig")
            sclient = src.client()
            sclient.send_fd_scm(a.fileno())
            sclient.cmd("getfd", fdname="mig")
            sclient.cmd("migrate", uri="fd:mig")
            a.close()  # the daemons hold their own copies now
            b.close()
            self._keep += [dclient, sclient]
            return
        src.cmd("migrate", uri=self.source_uri(dst))

    def close(self) -> None:
        for client in self._keep:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - best-effort cleanup of test clients
                pass
        self._keep.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


def migrate(factory: Callable[..., Any], plan: Plan, src: Any, dst_args: list[str],
            timeout: float = 90) -> Any:
    """Run a whole migration from ``src`` to a new destination; returns the destination."""
    dst = None
    if plan.transport != "file":
        dst = factory("dst", *dst_args, *plan.destination_args())
        if plan.transport != "fd":
            wait_status(dst, "setup", 30)
    plan.start(src, dst)
    wait_status(src, "completed", timeout)
    if dst is None:  # file: the destination reads what the source saved
        dst = factory("dst", *dst_args, *plan.destination_args())
    wait_status(dst, "completed", timeout)
    plan.close()
    return dst
