"""Transports: URI parsing (QEMU's texts) and every transport over real sockets, pipes, processes, files."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
from helpers import wait_for
from hypothesis import given, settings
from hypothesis import strategies as st

from migd.transports import (
    TransportError,
    URIError,
    connect,
    listen,
    parse_channels,
    parse_uri,
    resolve,
)
from migd.transports.channel import FdChannel, SocketChannel
from migd.transports.unix import listen_unix
from migd.transports.uri import ExecURI, FdURI, FileURI, TcpURI, UnixURI, socket_address
from migd.transports.wake import Waker

# -- parsing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:127.0.0.1:4444", TcpURI("127.0.0.1", 4444)),
        ("tcp:localhost:0", TcpURI("localhost", 0)),
        ("tcp:[::1]:4444", TcpURI("::1", 4444)),
        ("tcp::4444", TcpURI("", 4444)),
        ("unix:/run/x.sock", UnixURI("/run/x.sock")),
        ("exec:cat > /tmp/f", ExecURI(("/bin/sh", "-c", "cat > /tmp/f"))),
        ("fd:mig", FdURI("mig")),
        ("file:/tmp/state", FileURI("/tmp/state", 0)),
        ("file:/tmp/state,offset=4096", FileURI("/tmp/state", 4096)),
        ("file:/tmp/state,offset=1M", FileURI("/tmp/state", 1 << 20)),
        ("file:/tmp/state,offset=1MiB", FileURI("/tmp/state", 1 << 20)),
        ("file:/tmp/state,offset=2gb", FileURI("/tmp/state", 2 << 30)),
        ("file:/tmp/state,offset=1.5K", FileURI("/tmp/state", 1536)),
        ("file:/tmp/state,offset=100B", FileURI("/tmp/state", 100)),
    ],
)
def test_parse_uri(text: str, expected: object) -> None:
    assert parse_uri(text) == expected


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("rdma2:host:1", "unknown migration protocol: rdma2:host:1"),
        ("nonsense", "unknown migration protocol: nonsense"),
        ("", "unknown migration protocol: "),
        ("tcp:127.0.0.1", "error parsing address '127.0.0.1'"),
        ("tcp:127.0.0.1:http", "error parsing address '127.0.0.1:http'"),
        ("tcp:127.0.0.1:70000", "error parsing address '127.0.0.1:70000'"),
        ("tcp:[::1:4444", "error parsing IPv6 address '[::1:4444'"),
        ("tcp:::1:4444", "error parsing address '::1:4444'"),
        ("unix:" + "x" * 200, "UNIX socket path '" + "x" * 200 + "' is too long"),
        ("file:/tmp/f,offset=abc", "Invalid file offset abc"),
        ("file:/tmp/f,offset=", "Invalid file offset "),
        ("file:/tmp/f,offset=-1", "Invalid file offset -1"),
        ("file:/tmp/f,offset=1.5", "Invalid file offset 1.5"),
        ("file:/tmp/f,offset=1Q", "Invalid file offset 1Q"),
        ("file:/tmp/f,offset=9223372036854775808", "Invalid file offset 9223372036854775808"),
        ("fd:", "File descriptor name is empty"),
    ],
)
def test_parse_uri_errors(text: str, error: str) -> None:
    with pytest.raises(URIError) as info:
        parse_uri(text)
    assert str(info.value) == error


def test_channels_form() -> None:
    def main(addr: dict) -> list[dict]:
        return [{"channel-type": "main", "addr": addr}]

    assert parse_channels(main({"transport": "socket", "type": "inet", "host": "::1", "port": "5"})) == TcpURI(
        "::1", 5
    )
    assert parse_channels(main({"transport": "socket", "type": "unix", "path": "/s"})) == UnixURI("/s")
    assert parse_channels(main({"transport": "socket", "type": "fd", "str": "n"})) == FdURI("n")
    assert parse_channels(main({"transport": "exec", "args": ["cat"]})) == ExecURI(("cat",))
    assert parse_channels(main({"transport": "file", "filename": "/f", "offset": 8})) == FileURI("/f", 8)
    with pytest.raises(URIError, match="Channel list has no main entry"):
        parse_channels([])
    two = main({"transport": "exec", "args": ["cat"]}) * 2
    with pytest.raises(URIError, match="Channel list has more than one main entry"):
        parse_channels(two)
    with pytest.raises(URIError, match="Channel list has more than one entries"):
        parse_channels(two, incoming=True)
    with pytest.raises(URIError, match="'transport' does not accept value 'carrier-pigeon'"):
        parse_channels(main({"transport": "carrier-pigeon"}))


def test_resolve_needs_exactly_one() -> None:
    for kwargs in ({}, {"uri": "unix:/x", "channels": []}):
        with pytest.raises(URIError, match="need either 'uri' or 'channels' argument"):
            resolve(**kwargs)
    assert resolve("unix:/x") == UnixURI("/x")


def test_socket_address_shape() -> None:
    assert socket_address(TcpURI("1.2.3.4", 80)) == {"type": "inet", "host": "1.2.3.4", "port": "80"}
    assert socket_address(UnixURI("/p")) == {"type": "unix", "path": "/p"}
    assert socket_address(FileURI("/p")) is None


# -- real transports -------------------------------------------------------------------------------


def _roundtrip(listener, connect_uri: str) -> None:
    """Accept on a thread, connect, send both ways (the return path), check the bytes."""
    accepted: list = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()))
    thread.start()
    src = connect(connect_uri)
    thread.join(10)
    assert accepted, "accept did not return"
    dst = accepted[0]
    try:
        payload = os.urandom(1 << 20)
        sender = threading.Thread(target=src.write_all, args=([payload],))
        sender.start()
        got = _read_exact(dst, len(payload))
        sender.join(10)
        assert got == payload
        assert src.has_return_path and dst.has_return_path
        dst.write_all([b"ack!"])
        assert _read_exact(src, 4) == b"ack!"
    finally:
        src.close()
        dst.close()


def _read_exact(channel, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        count = channel.read_into(view[got:])
        assert count, "unexpected EOF"
        got += count
    return bytes(buf)


def _read_all(channel) -> bytes:
    out = bytearray()
    buf = bytearray(65536)
    while count := channel.read_into(memoryview(buf)):
        out += buf[:count]
    return bytes(out)


def test_tcp_port_zero_reports_the_chosen_port() -> None:
    listener = listen("tcp:127.0.0.1:0")
    try:
        (addr,) = listener.socket_address
        assert addr["type"] == "inet" and addr["host"] == "127.0.0.1"
        assert isinstance(addr["port"], str) and int(addr["port"]) > 0
        _roundtrip(listener, f"tcp:127.0.0.1:{addr['port']}")
    finally:
        listener.close()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_listener_holds_a_main_and_multifd_channels_before_accepting(kind: str, tmp_path: Path) -> None:
    """multifd connects 1 + N channels at once: every connect completes while none is accepted yet
    (with a backlog of 1 a tcp SYN found the queue full and, unanswered, the connect timed out)."""
    listener = listen("tcp:127.0.0.1:0" if kind == "tcp" else f"unix:{tmp_path / 'm.sock'}")
    clients: list[socket.socket] = []
    try:
        for _ in range(9):  # main + 8 channels
            if kind == "tcp":
                port = int(listener.socket_address[0]["port"])
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            else:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.settimeout(5)
                clients.append(c)
                c.connect(str(tmp_path / "m.sock"))
        for _ in clients:
            listener.accept().close()
    finally:
        for c in clients:
            c.close()
        listener.close()


def test_tcp_ipv6() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = listen("tcp:[::1]:0")
    except TransportError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")
    try:
        port = listener.socket_address[0]["port"]
        assert listener.socket_address[0]["host"] == "::1"
        _roundtrip(listener, f"tcp:[::1]:{port}")
    finally:
        listener.close()


def test_tcp_connect_refused_text() -> None:
    with socket.socket() as s:  # a port that was free a moment ago and has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransportError) as info:
        connect(f"tcp:127.0.0.1:{port}")
    assert str(info.value) == f"Failed to connect to '127.0.0.1:{port}': Connection refused"


def test_tcp_port_in_use() -> None:
    listener = listen("tcp:127.0.0.1:0")
    try:
        port = listener.socket_address[0]["port"]
        with pytest.raises(TransportError, match="Address already in use"):
            listen(f"tcp:127.0.0.1:{port}")
    finally:
        listener.close()


def test_unix_roundtrip_and_socket_file_removed(tmp_path: Path) -> None:
    path = tmp_path / "mig.sock"
    listener = listen(f"unix:{path}")
    assert listener.socket_address == [{"type": "unix", "path": str(path)}]
    assert path.exists()
    _roundtrip(listener, f"unix:{path}")
    listener.close()
    assert not path.exists()


def test_unix_stale_socket_replaced_and_missing_text(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # leaves the file behind, like a crashed daemon
    listener = listen(f"unix:{path}")
    listener.close()
    with pytest.raises(TransportError) as info:
        connect(f"unix:{tmp_path}/nope.sock")
    assert str(info.value) == f"Failed to connect to '{tmp_path}/nope.sock': No such file or directory"


@pytest.mark.parametrize(("mode", "expected"), [(0o600, 0o600), (0o640, 0o640)])
def test_listen_unix_mode_backlog_and_stale_file(tmp_path: Path, mode: int, expected: int) -> None:
    path = tmp_path / "l.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        sock = listen_unix(str(path), backlog=4, mode=mode)
    finally:
        os.umask(old_umask)
    try:
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == expected
        assert not sock.getblocking()
        clients = [socket.socket(socket.AF_UNIX) for _ in range(2)]
        for c in clients:
            c.connect(str(path))  # listening already: the backlog holds them
            c.close()
    finally:
        sock.close()


def test_listen_unix_leaves_other_files_alone(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("data")
    path.chmod(0o644)
    with pytest.raises(TransportError) as info:
        listen_unix(str(path), mode=0o600)
    assert str(info.value) == f"Failed to bind socket to {path}: Address already in use"
    assert path.read_text() == "data" and stat.S_IMODE(path.stat().st_mode) == 0o644
    with pytest.raises(TransportError) as info:
        listen_unix(f"{tmp_path}/no/such/dir.sock")
    assert str(info.value) == f"Failed to bind socket to {tmp_path}/no/such/dir.sock: No such file or directory"


def test_accept_is_interrupted_by_close(tmp_path: Path) -> None:
    listener = listen(f"unix:{tmp_path}/wait.sock")
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            listener.accept()
        except TransportError as exc:
            errors.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    thread.join(0.2)
    assert thread.is_alive()  # really blocked
    listener.close()
    thread.join(10)
    assert not thread.is_alive()
    assert errors and "closed" in str(errors[0])


def test_exec_source_writes_to_command_stdin(tmp_path: Path) -> None:
    out = tmp_path / "stream.bin"
    channel = connect(f"exec:cat > {out}")
    assert isinstance(channel, FdChannel) and not channel.has_return_path
    payload = os.urandom(3 << 20)
    channel.write_all([payload])
    channel.close()  # waits for the command: the file is complete afterwards
    assert out.read_bytes() == payload
    assert channel.proc.returncode == 0


def test_exec_broken_pipe_text() -> None:
    channel = connect("exec:false")
    channel.proc.wait(10)
    with pytest.raises(TransportError) as info:
        channel.write_all([b"x" * (1 << 20)])
    assert str(info.value) == "Unable to write to command: Broken pipe"
    channel.close()


def test_exec_destination_reads_command_stdout(tmp_path: Path) -> None:
    src = tmp_path / "in.bin"
    payload = os.urandom(2 << 20)
    src.write_bytes(payload)
    listener = listen(f"exec:cat {src}")
    assert listener.socket_address == []
    channel = listener.accept()
    listener.close()
    assert _read_all(channel) == payload
    channel.close()
    assert channel.proc.returncode == 0


def _accept_in_thread(listener) -> tuple[threading.Thread, list]:
    out: list = []

    def run() -> None:
        try:
            out.append(listener.accept())
        except TransportError as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_exec_accept_waits_for_data_like_qemu(tmp_path: Path) -> None:
    """QEMU starts the incoming side only when the command's output is readable (status stays setup)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    listener = listen(f"exec:cat {fifo}")
    thread, out = _accept_in_thread(listener)
    thread.join(0.3)
    assert thread.is_alive() and not out  # nothing written yet
    with open(fifo, "wb") as w:
        w.write(b"data")
    thread.join(10)
    (channel,) = out
    listener.close()
    assert _read_all(channel) == b"data"
    channel.close()


def test_exec_and_fd_accept_interrupted_by_close(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r, w = os.pipe()
    for listener in (listen(f"exec:cat {fifo}"), listen("fd:p", {"p": r})):
        thread, out = _accept_in_thread(listener)
        thread.join(0.2)
        assert thread.is_alive()
        listener.close()
        thread.join(10)
        assert not thread.is_alive() and isinstance(out[0], TransportError)
    os.close(w)


def test_exec_listener_closed_before_accept_kills_command() -> None:
    listener = listen("exec:sleep 30")
    proc = listener._proc
    listener.close()
    assert proc.returncode is not None


def test_fd_socket_by_name_is_taken_once() -> None:
    a, b = socket.socketpair()
    fds = {"mig": a.detach()}
    channel = connect("fd:mig", fds)
    assert isinstance(channel, SocketChannel) and channel.has_return_path
    assert "mig" not in fds  # consumed, like QEMU's monitor_get_fd
    channel.write_all([b"hello"])
    assert b.recv(5) == b"hello"
    channel.close()
    b.close()
    with pytest.raises(TransportError) as info:
        connect("fd:mig", fds)
    assert str(info.value) == "File descriptor named 'mig' has not been found"


def test_fd_pipe_listen() -> None:
    r, w = os.pipe()
    listener = listen("fd:in", {"in": r})
    os.write(w, b"stream")
    os.close(w)
    channel = listener.accept()
    assert isinstance(channel, FdChannel) and not channel.has_return_path
    assert _read_all(channel) == b"stream"
    channel.close()
    with pytest.raises(TransportError, match="File descriptor named 'nosuchfd' has not been found"):
        listen("fd:nosuchfd", {})


def test_file_with_offset_keeps_prefix(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(b"H" * 100 + b"old tail that must go")
    channel = connect(f"file:{path},offset=100")
    channel.write_all([b"stream bytes"])
    channel.close()
    assert path.read_bytes() == b"H" * 100 + b"stream bytes"
    listener = listen(f"file:{path},offset=100")
    reader = listener.accept()
    listener.close()
    assert _read_all(reader) == b"stream bytes"
    reader.close()


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(TransportError) as info:
        listen(f"file:{tmp_path}/missing")
    assert str(info.value) == f"Unable to open {tmp_path}/missing: No such file or directory"
    with pytest.raises(TransportError, match="Unable to open"):
        connect(f"file:{tmp_path}/no/such/dir/f")


def test_exec_cancelled_or_failed_command_is_killed_at_once() -> None:
    """A cancel (shutdown) or a reader giving up before EOF must not wait for the command."""
    writer = connect("exec:sleep 30")
    writer.shutdown()
    start = time.monotonic()
    writer.close()
    assert time.monotonic() - start < 5 and writer.proc.returncode is not None
    listener = listen("exec:cat /dev/zero")
    reader = listener.accept()
    listener.close()
    buf = bytearray(4096)
    assert reader.read_into(memoryview(buf)) > 0  # mid-stream, no EOF
    start = time.monotonic()
    reader.close()
    assert time.monotonic() - start < 5 and reader.proc.returncode is not None


# -- fuzz: bad addresses are a URIError, never another exception ------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
_addr = st.fixed_dictionaries(
    {"transport": st.sampled_from(["socket", "exec", "file", "rdma", "x"])},
    optional={"type": st.sampled_from(["inet", "unix", "fd", "vsock"]), "host": _json, "port": _json,
              "path": _json, "str": _json, "args": _json, "filename": _json, "offset": _json},
)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.sampled_from(["tcp:", "unix:", "exec:", "fd:", "file:"]).flatmap(
    lambda p: st.text(max_size=30).map(lambda t: p + t)))
def test_parse_uri_fuzz(text: str) -> None:
    try:
        parse_uri(text)
    except URIError as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries({"channel-type": st.sampled_from(["main", "cpr", "x"]), "addr": _addr}),
                max_size=3) | _json, st.booleans())
def test_parse_channels_fuzz(channels: object, incoming: bool) -> None:
    try:
        parse_channels(channels, incoming=incoming)  # type: ignore[arg-type]
    except URIError as exc:
        assert str(exc)


# -- the one wake-up (transports/wake.py) ----------------------------------------------------------


def _blocked_in_poll(tid: int) -> bool:
    """The thread ``tid`` of this process sleeps in poll(2) (so a wake-up must go through the pipe)."""
    return "poll" in Path(f"/proc/self/task/{tid}/wchan").read_text()


def _wait_in_thread(waker: Waker, fd: int) -> tuple[threading.Thread, list[bool], list[int]]:
    result: list[bool] = []
    tid: list[int] = []

    def run() -> None:
        tid.append(threading.get_native_id())
        result.append(waker.wait(fd))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: tid, timeout=10, what="the waiting thread to start")
    return thread, result, tid


def test_waker_wakes_a_thread_blocked_in_poll() -> None:
    r, w = os.pipe()
    try:
        waker = Waker()
        thread, result, tid = _wait_in_thread(waker, r)
        wait_for(lambda: _blocked_in_poll(tid[0]), timeout=10, what="the thread to block in poll")
        assert waker.wake() is True
        thread.join(10)
        assert not thread.is_alive() and result == [False]
        assert waker.wake() is False  # once only
        assert waker.wait(r) is False  # and every later wait ends at once
    finally:
        os.close(r)
        os.close(w)


def test_waker_wait_returns_when_the_descriptor_is_ready() -> None:
    r, w = os.pipe()
    try:
        waker = Waker()
        thread, result, tid = _wait_in_thread(waker, r)
        wait_for(lambda: _blocked_in_poll(tid[0]), timeout=10, what="the thread to block in poll")
        os.write(w, b"x")
        thread.join(10)
        assert result == [True] and not waker.woken
        os.close(w)  # a hang-up counts as ready too: the reader sees EOF
        assert waker.wait(r) is True
    finally:
        os.close(r)


def test_waker_released_counts_as_woken_and_wake_after_is_harmless() -> None:
    r, w = os.pipe()
    waker = Waker()
    pipe_fds = (waker._r, waker._w)
    waker.release()
    for fd in pipe_fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # the pipe is closed at once
    assert waker.woken and waker.wait(r) is False
    assert waker.wake() is False  # writes nothing into a closed (maybe reused) descriptor
    waker.release()  # idempotent
    os.close(r)
    os.close(w)


def test_fd_channel_closed_then_shut_down_fails_io_without_touching_other_descriptors() -> None:
    r, w = os.pipe()
    channel = FdChannel(r)
    channel.close()
    channel.shutdown()  # after close: nothing to wake, and no write into a reused descriptor
    with pytest.raises(OSError, match="shut down"):
        channel.read_into(memoryview(bytearray(1)))
    os.close(w)


def test_socket_listener_close_twice_and_from_two_threads(tmp_path: Path) -> None:
    listener = listen(f"unix:{tmp_path}/twice.sock")
    closers = [threading.Thread(target=listener.close) for _ in range(2)]
    for t in closers:
        t.start()
    for t in closers:
        t.join(10)
    assert not any(t.is_alive() for t in closers)
    assert not (tmp_path / "twice.sock").exists()
    listener.close()
    with pytest.raises(TransportError, match="Listener closed before a connection arrived"):
        listener.accept()
