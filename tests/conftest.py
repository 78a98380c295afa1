"""Shared fixtures: ``migd_factory`` starts real daemons (tests/helpers.py) and cleans them all up."""

from __future__ import annotations

import os

# Every marked thread boundary is checked in the tests (and in the daemons they spawn, which inherit
# the environment): a call on the wrong thread raises instead of racing.
os.environ.setdefault("MIGD_CHECK_THREADS", "1")

import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import Migd  # noqa: E402
from qemu_guest import Qemu, build_floppy  # noqa: E402

from migd.transports.channel import SocketChannel  # noqa: E402


@pytest.fixture
def migd_factory(tmp_path: Path) -> Iterator[Callable[..., Migd]]:
    """``migd_factory(name, *args, env=None, connect=True) -> Migd``; every daemon is killed at the end of the test.

    A daemon still running at teardown is killed; its log is printed when the test failed, so it shows
    in pytest's report.
    """
    started: list[Migd] = []

    def factory(
        name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 30, connect: bool = True
    ) -> Migd:
        vm = Migd(tmp_path, name, *args, env=env, timeout=timeout, connect=connect)
        started.append(vm)
        return vm

    yield factory
    for vm in started:
        vm.kill()
        log = vm.log()
        if log:
            print(f"----- migd {vm.name} log -----\n{log}")


@pytest.fixture
def channel_pair() -> Iterator[tuple[SocketChannel, SocketChannel]]:
    """Two connected SocketChannels over a real socketpair, closed after the test."""
    a, b = socket.socketpair()
    ca, cb = SocketChannel(a), SocketChannel(b)
    yield ca, cb
    ca.close()
    cb.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts real daemons (``migd_factory``) is an e2e test, wherever it lives: the fast
    lane (``-m "not e2e"``) leaves it out."""
    for item in items:
        if "migd_factory" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Qemu]:
    """A running, counting QEMU guest (tests/qemu_guest.py; the QEMU interop and relay tests)."""
    vm = Qemu(tmp_path, "qsrc", build_floppy(tmp_path))
    try:
        vm.wait_counting()
        yield vm
    finally:
        vm.kill()
