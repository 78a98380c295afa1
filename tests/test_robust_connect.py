"""A connect that never completes must not hold a thread: cancel frees it at once, a deadline bounds it.

The black hole is a real one: a listener with backlog 0 that never accepts, its queue filled by the
test, so the kernel drops further SYNs and a connect(2) would retry for about two minutes.
"""

from __future__ import annotations

import gc
import socket
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))

from e2e_util import digests, wait_status  # noqa: E402

from migd.transports import ConnectCancel, TransportError, connect  # noqa: E402


def _fill(family: int, address: object) -> list[socket.socket]:
    """Connect until the listener's queue is full (a further connect no longer completes)."""
    held: list[socket.socket] = []
    for _ in range(16):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(address)  # type: ignore[arg-type]
        held.append(sock)
        if err != 0:  # EINPROGRESS (tcp: SYN dropped) or EAGAIN (unix: backlog full)
            break
    return held


@pytest.fixture
def tcp_black_hole() -> Iterator[str]:
    """``tcp:127.0.0.1:PORT`` whose SYNs go unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    held = _fill(socket.AF_INET, ("127.0.0.1", port))
    # wait until the kernel has really stopped answering (the queued handshakes completed)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        with pytest.raises(OSError):
            probe.connect(("127.0.0.1", port))
    finally:
        probe.close()
    yield f"tcp:127.0.0.1:{port}"
    for sock in held:
        sock.close()
    listener.close()


@pytest.fixture
def unix_black_hole(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "full.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    held = _fill(socket.AF_UNIX, path)
    yield f"unix:{path}"
    for sock in held:
        sock.close()
    listener.close()


def _connect_in_thread(uri: str, cancel: ConnectCancel, timeout: float = 60) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            connect(uri, None, cancel, timeout).close()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.parametrize("hole", ["tcp_black_hole", "unix_black_hole"])
def test_cancel_frees_a_hanging_connect_at_once(hole: str, request: pytest.FixtureRequest) -> None:
    uri = request.getfixturevalue(hole)
    cancel = ConnectCancel()
    thread, errors = _connect_in_thread(uri, cancel)
    thread.join(0.5)
    assert thread.is_alive(), "the connect should still be waiting on the black hole"
    started = time.monotonic()
    cancel.cancel()
    thread.join(2)
    assert not thread.is_alive()
    assert time.monotonic() - started < 0.5
    assert len(errors) == 1 and isinstance(errors[0], TransportError)
    assert "Connection cancelled" in str(errors[0])
    cancel.cancel()  # a late cancel is harmless


def test_a_cancel_reaches_a_connect_its_owner_stopped_waiting_for(tcp_black_hole: str) -> None:
    """The owner may stop waiting (its task cancelled): a later cancel must still reach the thread,
    and its wake-up pipe is closed only once nobody holds it any more."""
    cancel = ConnectCancel()
    thread, errors = _connect_in_thread(tcp_black_hole, cancel)
    thread.join(0.3)
    assert thread.is_alive()
    waker = weakref.ref(cancel.waker)
    cancel.cancel()
    thread.join(2)
    assert not thread.is_alive() and "cancelled" in str(errors[0])
    del cancel, thread, errors  # (a kept exception holds its frames, and so the handle)
    gc.collect()
    assert waker() is None  # its pipe went with it


def test_cancel_before_connect_never_connects(tcp_black_hole: str) -> None:
    cancel = ConnectCancel()
    cancel.cancel()
    with pytest.raises(TransportError, match="cancelled"):
        connect(tcp_black_hole, None, cancel)


@pytest.mark.parametrize("hole", ["tcp_black_hole", "unix_black_hole"])
def test_connect_deadline_gives_up_with_timed_out(hole: str, request: pytest.FixtureRequest) -> None:
    uri = request.getfixturevalue(hole)
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        connect(uri, None, None, 0.5)
    took = time.monotonic() - started
    assert 0.4 < took < 3
    assert str(info.value) == f"Failed to connect to '{uri.partition(':')[2]}': Connection timed out"


def test_connect_still_connects(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    channel = connect(f"tcp:127.0.0.1:{port}", None, ConnectCancel())
    peer, _ = listener.accept()
    channel.write_all([b"hello"])
    assert peer.recv(5) == b"hello"
    peer.close()
    channel.close()
    listener.close()


@pytest.mark.e2e
def test_cancelled_migrations_do_not_starve_the_daemon(migd_factory, tcp_black_hole: str) -> None:
    """Eight migrations cancelled while connecting to a black hole; then commands and a real migration."""
    src = migd_factory("src", "-m", "32M")
    for _ in range(8):
        src.cmd("migrate", uri=tcp_black_hole)
        assert src.cmd("query-migrate")["status"] == "setup"
        src.cmd("migrate_cancel")
        wait_status(src, "cancelled", 5)
    started = time.monotonic()
    src.cmd("stop")
    src.cmd("x-migd-ram-digest")
    src.cmd("cont")
    assert time.monotonic() - started < 2
    dst = migd_factory("dst", "-m", "32M", "--incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_status(src, "completed", 30)
    wait_status(dst, "completed", 30)
    assert digests(dst) == digests(src)


@pytest.mark.e2e
def test_quit_while_connecting_to_a_black_hole_exits_at_once(migd_factory, tcp_black_hole: str) -> None:
    src = migd_factory("src", "-m", "16M")
    src.cmd("migrate", uri=tcp_black_hole)
    assert src.cmd("query-migrate")["status"] == "setup"
    started = time.monotonic()
    assert src.quit(timeout=10) == 0
    assert time.monotonic() - started < 5
