"""The QMP server of a real daemon over raw sockets: every malformed input of reference §5.3 with
QEMU's class and text, the connection staying usable after each; negotiation; ids; fd passing; limits;
a client that does not read."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path

import pytest
from helpers import Migd, RawQMP

from migd.qmp.server import Listener
from migd.transports import TransportError

pytestmark = pytest.mark.e2e


@pytest.fixture
def vm(migd_factory) -> Migd:
    return migd_factory("vm", "-m", "32M")


@pytest.fixture(scope="module")
def shared_vm(tmp_path_factory):
    """One daemon for the many stateless protocol cases (each on its own connection)."""
    vm = Migd(tmp_path_factory.mktemp("qmp"), "vm", "-m", "32M")
    yield vm
    vm.kill()


@pytest.fixture
def raw(shared_vm: Migd):
    assert shared_vm.returncode is None, shared_vm.log()
    with RawQMP(shared_vm.qmp_path) as client:
        client.negotiate()
        yield client


def _still_works(raw: RawQMP) -> None:
    """A valid command is answered (after any id-less errors for the tail of a bad message)."""
    raw.send({"execute": "query-status", "id": "probe"})
    while True:
        reply = raw.reply()
        if "id" in reply:
            break
        assert reply["error"]["class"] == "GenericError"
    assert reply["id"] == "probe" and reply["return"]["status"] in ("running", "paused")


def _generic(desc: str) -> dict:
    return {"error": {"class": "GenericError", "desc": desc}}


MALFORMED_NO_ID = [
    (b"[1, 2]", "QMP input must be a JSON object"),
    (b'"just a string"', "QMP input must be a JSON object"),
    (b"42 ", "QMP input must be a JSON object"),
    (b"null ", "QMP input must be a JSON object"),
    (b'{"execute" "query-status"}', "JSON parse error, missing : in object pair"),
    (b'{"execute": "query-status", "execute": "stop"}', "JSON parse error, duplicate key"),
    (b'{"execute": tru}', "JSON parse error, invalid keyword 'tru'"),
    (b'{"execute": "query-status",}', "JSON parse error, expecting value"),
    (b'{"execute": "query-status" "id": 1}', "JSON parse error, expected separator in dict"),
    (b"[1 2]", "JSON parse error, expected separator in list"),
    (b"{1: 2}", "JSON parse error, key is not a string in object"),
    (b"]", "JSON parse error, expecting value"),
    (b"@", "JSON parse error, stray '@'"),
    (b'{"execute": "\\q"}', "JSON parse error, stray '\"\\q'"),
    (b'{"execute": "a\\ud800"}', "JSON parse error, missing second half of surrogate pair"),
    (b'{"execute": "\xff"}', "JSON parse error, invalid UTF-8 sequence in string"),
]


@pytest.mark.parametrize(("data", "desc"), MALFORMED_NO_ID)
def test_malformed_json(raw: RawQMP, data: bytes, desc: str) -> None:
    raw.send(data)
    assert raw.reply() == _generic(desc)  # no id: it could not be read
    _still_works(raw)


MALFORMED_WITH_ID = [
    ({"execute": 1, "id": 5}, "QMP input member 'execute' must be a string"),
    ({"execute": "query-status", "arguments": [], "id": 5}, "QMP input member 'arguments' must be an object"),
    ({"execute": "query-status", "foo": 1, "id": 5}, "QMP input member 'foo' is unexpected"),
    ({"arguments": {}, "id": 5}, "QMP input lacks member 'execute'"),
    ({"exec-oob": "query-status", "id": 5}, "QMP input member 'exec-oob' is unexpected"),
    ({"execute": "query-status", "arguments": {"x": 1}, "id": 5}, "Parameter 'x' is unexpected"),
    ({"execute": "getfd", "arguments": {}, "id": 5}, "Parameter 'fdname' is missing"),
    ({"execute": "getfd", "arguments": {"fdname": 1}, "id": 5}, "Invalid parameter type for 'fdname', expected: string"),
    ({"execute": "getfd", "arguments": {"fdname": "x", "y": 2}, "id": 5}, "Parameter 'y' is unexpected"),
    ({"execute": "getfd", "arguments": {"fdname": "x"}, "id": 5}, "No file descriptor supplied via SCM_RIGHTS"),
    ({"execute": "closefd", "arguments": {"fdname": "nope"}, "id": 5}, "File descriptor named 'nope' not found"),
]


@pytest.mark.parametrize(("msg", "desc"), MALFORMED_WITH_ID)
def test_malformed_request(raw: RawQMP, msg: dict, desc: str) -> None:
    raw.send(msg)
    assert raw.reply() == {**_generic(desc), "id": 5}
    _still_works(raw)


def test_unknown_command(raw: RawQMP) -> None:
    reply = raw.execute("no-such-command", id=[1, "two"])
    assert reply == {
        "error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"},
        "id": [1, "two"],
    }
    _still_works(raw)


@pytest.mark.parametrize("id_", [0, -7, 1.5, "x", "", None, True, [1, {"a": None}], {"nested": {"k": [1, 2]}}])
def test_id_echoed_verbatim(raw: RawQMP, id_) -> None:
    assert raw.execute("query-name", id=id_) == {"return": {"name": "vm"}, "id": id_}
    assert raw.execute("nope", id=id_)["id"] == id_


def test_negotiation(vm: Migd) -> None:
    with RawQMP(vm.qmp_path) as raw:
        greeting = raw.greeting["QMP"]
        assert greeting["capabilities"] == []
        assert greeting["version"]["package"].startswith("migd ")
        expecting = {
            "class": "CommandNotFound",
            "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
        }
        assert raw.execute("query-status", id=1) == {"error": expecting, "id": 1}
        assert raw.execute("no-such-command", id=2) == {"error": expecting, "id": 2}
        vm.cmd("stop")  # an event now must not reach a client still negotiating
        reply = raw.execute("qmp_capabilities", {"enable": ["oob"]}, id=3)
        assert reply == {**_generic("Capability oob not available"), "id": 3}
        reply = raw.execute("qmp_capabilities", {"enable": ["bogus"]}, id=4)
        assert reply == {**_generic("Parameter 'null' does not accept value 'bogus'"), "id": 4}
        assert raw.execute("qmp_capabilities", {}, id=5) == {"return": {}, "id": 5}
        again = raw.execute("qmp_capabilities", id=6)
        assert again == {
            "error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"},
            "id": 6,
        }
        assert raw.execute("query-status", id=7)["id"] == 7
        vm.cmd("cont")
        assert raw.recv()["event"] == "RESUME"  # the first event this client sees: STOP came before negotiation


def test_stream_without_separators_in_order(raw: RawQMP) -> None:
    raw.send(b'{"execute":"query-name","id":1}{"execute":"stop","id":2}{"execute":"query-status","id":3}')
    replies = [raw.reply() for _ in range(3)]
    assert [r["id"] for r in replies] == [1, 2, 3]
    assert replies[2]["return"]["status"] == "paused"


def test_command_split_byte_by_byte(raw: RawQMP) -> None:
    for byte in b'  {"execute": "query-name", "id": "slow"}':
        raw.send(bytes([byte]))
    assert raw.reply() == {"return": {"name": "vm"}, "id": "slow"}


def test_single_quotes_and_escapes(raw: RawQMP) -> None:
    raw.send(b"{'execute': 'query-name', 'id': 'it\\'s \\u00e9'}")
    assert raw.reply() == {"return": {"name": "vm"}, "id": "it's \u00e9"}


def test_resync_with_control_character(raw: RawQMP) -> None:
    raw.send(b'{"execute": "query-status", "id": "unfinished')
    raw.send(b"\x1b")
    reply = raw.reply()
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith("JSON parse error, stray '")
    assert "id" not in reply
    _still_works(raw)


def test_resync_with_0xff(raw: RawQMP) -> None:
    raw.send(b'{"execute": [1, 2, ')
    raw.send(b"\xff")
    assert raw.reply() == _generic("JSON parse error, stray '\u00ff'")
    _still_works(raw)


def test_premature_eoi(raw: RawQMP) -> None:
    raw.send(b'{"execute": "query-status"')
    raw.sock.shutdown(socket.SHUT_WR)
    assert raw.reply() == _generic("JSON parse error, premature EOI")


def test_nesting_limit(raw: RawQMP) -> None:
    raw.send(b"[" * 1024 + b"]" * 1024)  # exactly at the limit: a value (not an object)
    assert raw.reply() == _generic("QMP input must be a JSON object")
    raw.send(b"[" * 1025)
    assert raw.reply() == _generic("JSON nesting depth limit exceeded")
    _still_works(raw)


def test_token_size_limit(raw: RawQMP) -> None:
    """A 64 MiB string gets an error, the server does not keep buffering, and the session goes on."""
    raw.send(b'{"execute": "query-status", "id": "')
    chunk = b"a" * (1 << 20)
    for _ in range(65):
        raw.send(chunk)
    assert raw.reply() == _generic("JSON token size limit exceeded")
    raw.send(b'"}')  # the tail of the oversized message: one stray '}'
    assert raw.reply() == _generic("JSON parse error, expecting value")
    _still_works(raw)


def test_getfd_and_closefd(vm: Migd) -> None:
    """An fd passed with SCM_RIGHTS is held under its name until closefd (seen through a pipe's EOF)."""
    qmp = vm.client()
    r, w = os.pipe()
    try:
        qmp.send_fd_scm(w)
        assert qmp.cmd("getfd", fdname="pipe") == {}
        os.close(w)
        w = -1
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)  # the daemon's copy keeps the pipe open: no EOF
        # a digit-led name is refused (and the passed fd closed)
        w2 = os.dup(r)
        qmp.send_fd_scm(w2)
        os.close(w2)
        err = qmp.cmd_raw("getfd", {"fdname": "1x"})
        assert err["error"]["desc"] == "Parameter 'fdname' expects a name not starting with a digit"
        assert qmp.cmd("closefd", fdname="pipe") == {}
        os.set_blocking(r, True)
        assert os.read(r, 1) == b""  # EOF: the daemon closed its copy of the write end
        err = qmp.cmd_raw("closefd", {"fdname": "pipe"})
        assert err["error"] == {"class": "GenericError", "desc": "File descriptor named 'pipe' not found"}
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_fds_are_per_session(vm: Migd) -> None:
    a, b = vm.client(), vm.client()
    r, w = os.pipe()
    try:
        a.send_fd_scm(w)
        assert a.cmd("getfd", fdname="mine") == {}
        err = b.cmd_raw("closefd", {"fdname": "mine"})
        assert err["error"]["desc"] == "File descriptor named 'mine' not found"
        a.close()  # closing the session closes its fds
        os.close(w)
        w = -1
        assert os.read(r, 1) == b""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_event_lines(shared_vm: Migd, raw: RawQMP) -> None:
    shared_vm.cmd("cont")
    shared_vm.cmd("stop")
    while (event := raw.recv())["event"] != "STOP":
        pass
    assert isinstance(event["timestamp"]["seconds"], int)
    assert 0 <= event["timestamp"]["microseconds"] < 1_000_000


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_slow_client_is_dropped_not_waited_for(loop_kind: str) -> None:
    """A client that stops reading is cut off once its queue is full; the others are not delayed.

    Run on both loops: the daemon uses uvloop, whose add_reader/add_writer the session relies on.
    """
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_slow_client_scenario())
    finally:
        loop.close()


async def _slow_client_scenario() -> None:
    from migd.config import build
    from migd.daemon import Daemon

    sock_path = Path(f"/tmp/migd-slow-{os.getpid()}.sock")
    daemon = Daemon(build({"memory": "16M", "qmp": [f"unix:{sock_path}"]}))
    await daemon.start()
    try:
        daemon.qmp.max_pending = 64 << 10
        slow_r, slow_w = await asyncio.open_unix_connection(str(sock_path))
        await slow_r.readline()
        slow_w.write(b'{"execute":"qmp_capabilities"}')
        assert json.loads(await slow_r.readline()) == {"return": {}}
        fast_r, fast_w = await asyncio.open_unix_connection(str(sock_path), limit=1 << 20)
        await fast_r.readline()
        fast_w.write(b'{"execute":"qmp_capabilities"}')
        assert json.loads(await fast_r.readline()) == {"return": {}}
        assert len(daemon.qmp.sessions) == 2

        pad = "x" * 8192
        received = 0
        for i in range(300):  # ~2.4 MB of events: far more than the socket buffers and the queue
            daemon.events.emit("X_MIGD_TEST", {"n": i, "pad": pad})
            line = await asyncio.wait_for(fast_r.readline(), 30)
            assert json.loads(line)["data"]["n"] == i
            received += 1
        assert received == 300
        async with asyncio.timeout(30):
            while len(daemon.qmp.sessions) != 1:
                await asyncio.sleep(0.01)
        fast_w.write(b'{"execute":"query-status","id":1}')
        reply = json.loads(await asyncio.wait_for(fast_r.readline(), 30))
        assert reply["id"] == 1 and reply["return"]["status"] == "running"
        slow_w.close()
        fast_w.close()
    finally:
        await daemon.stop()
    assert not sock_path.exists()



async def test_a_flooding_client_does_not_starve_others(monkeypatch) -> None:
    """5000 commands arrive at once from one client; another client's command is run in between.

    In-process so the order is deterministic: the server must yield to the loop between commands.
    """
    from migd.config import build
    from migd.daemon import Daemon
    from migd.qmp.commands import load_all
    from migd.qmp.registry import REGISTRY, Command

    load_all()
    ran = {"status": 0, "name_at": -1}
    status_cmd, name_cmd = REGISTRY["query-status"], REGISTRY["query-name"]

    def counting_status(ctx, args):
        ran["status"] += 1
        return status_cmd.handler(ctx, args)

    def recording_name(ctx, args):
        ran["name_at"] = ran["status"]
        return name_cmd.handler(ctx, args)

    monkeypatch.setitem(REGISTRY, "query-status", Command("query-status", counting_status, None))
    monkeypatch.setitem(REGISTRY, "query-name", Command("query-name", recording_name, None))

    sock_path = Path(f"/tmp/migd-flood-{os.getpid()}.sock")
    daemon = Daemon(build({"memory": "16M", "qmp": [f"unix:{sock_path}"]}))
    await daemon.start()
    try:
        async def connect():
            r, w = await asyncio.open_unix_connection(str(sock_path), limit=1 << 20)
            await r.readline()
            w.write(b'{"execute":"qmp_capabilities"}')
            assert json.loads(await r.readline()) == {"return": {}}
            return r, w

        (flood_r, flood_w), (other_r, other_w) = await connect(), await connect()
        total = 5000
        flood_w.write(b'{"execute":"query-status"}' * total)
        async with asyncio.timeout(30):
            while ran["status"] == 0:
                await asyncio.sleep(0)
        other_w.write(b'{"execute":"query-name","id":"me"}')
        reply = json.loads(await asyncio.wait_for(other_r.readline(), 30))
        assert reply == {"return": {}, "id": "me"}  # no --name
        assert 0 < ran["name_at"] < total, ran
        for _ in range(total):
            await asyncio.wait_for(flood_r.readline(), 30)
        assert ran["status"] == total
        flood_w.close()
        other_w.close()
    finally:
        await daemon.stop()


async def test_a_command_finishes_when_its_client_goes_away(monkeypatch) -> None:
    """A client sends a slow command and hangs up: the command is not cancelled half-way."""
    from migd.config import build
    from migd.daemon import Daemon
    from migd.qmp.commands import load_all
    from migd.qmp.registry import REGISTRY, Command

    load_all()
    proceed = asyncio.Event()
    outcome: list[str] = []

    async def slow(ctx, args):
        try:
            await proceed.wait()
            outcome.append("finished")
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        return {}

    monkeypatch.setitem(REGISTRY, "x-migd-test-slow", Command("x-migd-test-slow", slow, None))
    sock_path = Path(f"/tmp/migd-gone-{os.getpid()}.sock")
    daemon = Daemon(build({"memory": "16M", "qmp": [f"unix:{sock_path}"]}))
    await daemon.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(sock_path))
        await reader.readline()
        writer.write(b'{"execute":"qmp_capabilities"}{"execute":"x-migd-test-slow"}')
        assert json.loads(await reader.readline()) == {"return": {}}
        async with asyncio.timeout(30):
            while not any(s._busy for s in daemon.qmp.sessions):
                await asyncio.sleep(0.01)
        writer.close()
        for _ in range(50):  # events to a closed peer: the write fails and the session closes
            daemon.events.emit("X_MIGD_TEST")
            await asyncio.sleep(0.01)
        assert outcome == []
        proceed.set()
        async with asyncio.timeout(30):
            while not outcome or daemon.qmp.sessions:
                await asyncio.sleep(0.01)
        assert outcome == ["finished"]
    finally:
        await daemon.stop()


def test_unix_listener_private_replaces_a_stale_socket_and_spares_other_files(tmp_path: Path) -> None:
    """The --qmp unix socket is bound by transports.unix.listen_unix: mode 0600, QEMU's texts."""
    path = tmp_path / "qmp.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a crashed daemon's socket file
    old_umask = os.umask(0)
    try:
        listener = Listener(f"unix:{path}")
    finally:
        os.umask(old_umask)
    assert listener.address == f"unix:{path}" and not listener.sock.getblocking()
    assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o600
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(path))
    client.close()
    listener.close()
    assert not path.exists()

    other = tmp_path / "notes.txt"
    other.write_text("keep")
    with pytest.raises(TransportError) as info:
        Listener(f"unix:{other}")
    assert isinstance(info.value, OSError)  # the daemon reports it as a bad setting, exit 1
    assert str(info.value) == f"Failed to bind socket to {other}: Address already in use"
    assert other.read_text() == "keep"
