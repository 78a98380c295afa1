"""The wire of the commit protocol (docs/FORMAT.md §1.1, §6): the configuration subsection, migd's own
COMMANDs and return-path messages, read by migd's loader and by QEMU's analyze-migration.py."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from migd import transports
from migd.config import MachineConfig
from migd.events import EventSink
from migd.machine.machine import Machine
from migd.machine.runstate import RunState, RunStateMachine
from migd.migration.format import (
    CMD_X_MIGD_COMMIT,
    CMD_X_MIGD_HEARTBEAT,
    FEATURE_CHECKSUM,
    FEATURE_COMMIT,
    FEATURE_HEARTBEAT,
    checksum_record,
    command,
)
from migd.migration.params import MigrationConfig, ParamError
from migd.migration.returnpath import ReturnPathError, ReturnPathReader, ReturnPathWriter
from migd.migration.savevm import SaveVM, load_commit, load_stream
from migd.migration.stats import MigrationStats
from migd.migration.stream import InStream, OutStream, StreamError
from migd.qmp.commands.migration import MigrateSetParametersArgs
from migd.qmp.schema import validate
from migd.transports.channel import FdChannel, SocketChannel
from migd.transports.tcp import KEEPALIVE_IDLE, set_peer_timeout

REPO = Path(__file__).resolve().parent.parent
SCRIPT = os.environ.get("MIGD_ANALYZE_MIGRATION") or str(REPO.parent / "shared" / "tools" / "analyze-migration.py")
FEATURES = FEATURE_COMMIT | FEATURE_HEARTBEAT


@pytest.fixture
def machine() -> Any:
    m = Machine(MachineConfig(memory=1 << 20), RunStateMachine(RunState.RUNNING), EventSink())
    yield m
    m.shutdown()


def stream_bytes(machine: Any, features: int, extra: bytes = b"", before_eof: bytes = b"") -> bytes:
    """A whole stream with the configuration subsection (no OPEN_RETURN_PATH: as a file would hold it)."""
    r, w = os.pipe()
    out = bytearray()
    f = OutStream(FdChannel(w))
    sv = SaveVM(machine, MigrationStats(), False, features, 7000)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(r, 1 << 20)
            except BlockingIOError:
                return
            if not data:
                return
            chunks.append(data)

    os.set_blocking(r, False)
    sv.save_header(f)
    sv.save_setup(f)
    while not sv.save_iterate(f):
        drain()
    sv.save_complete_ram(f)
    sv.save_complete_devices(f)
    if before_eof:
        f.put(before_eof)
    sv.save_eof(f)
    f.put(extra)
    f.flush()
    drain()
    sv.cleanup()
    f.close()
    os.close(r)
    for c in chunks:
        out += c
    return bytes(out)


def load(data: bytes, machine: Any) -> tuple[int, tuple[int, int] | None, list[int], InStream]:
    a, b = socket.socketpair()
    ca, cb = SocketChannel(a), SocketChannel(b)
    cb.write_all([data])
    cb.shutdown()
    seen: list[int] = []
    config: list[tuple[int, int]] = []
    f = InStream(ca)
    features = load_stream(f, machine, on_command=lambda c, p: seen.append(c),
                           on_config=lambda feat, t: config.append((feat, t)))
    return features, (config[0] if config else None), seen, f


def test_subsection_announces_features_and_loads(machine: Any) -> None:
    data = stream_bytes(machine, FEATURES)
    assert b"configuration/x-migd" in data[:64]
    features, config, _, _ = load(data, machine)
    assert features == FEATURES and config == (FEATURES, 7000)


def test_no_features_no_subsection(machine: Any) -> None:
    data = stream_bytes(machine, 0)
    assert b"x-migd" not in data
    features, config, _, _ = load(data, machine)
    assert features == 0 and config == (0, 0)


def test_heartbeats_anywhere_commit_after_the_description(machine: Any) -> None:
    beat, commit = command(CMD_X_MIGD_HEARTBEAT), command(CMD_X_MIGD_COMMIT)
    data = stream_bytes(machine, FEATURES, extra=beat + beat + commit, before_eof=beat)
    _, _, seen, f = load(data, machine)
    assert seen.count(CMD_X_MIGD_HEARTBEAT) == 1
    load_commit(f, FEATURES, on_command=lambda c, p: seen.append(c))
    assert seen[-3:] == [CMD_X_MIGD_HEARTBEAT, CMD_X_MIGD_HEARTBEAT, CMD_X_MIGD_COMMIT]


def test_migd_commands_refused_unless_announced(machine: Any) -> None:
    data = stream_bytes(machine, 0, before_eof=command(CMD_X_MIGD_HEARTBEAT))
    with pytest.raises(StreamError, match="VM_COMMAND X_MIGD_HEARTBEAT is not supported by migd"):
        load(data, machine)


def test_commit_before_the_end_is_refused(machine: Any) -> None:
    data = stream_bytes(machine, FEATURES, before_eof=command(CMD_X_MIGD_COMMIT))
    with pytest.raises(StreamError, match="X_MIGD_COMMIT received before the end of the device state"):
        load(data, machine)


def test_stream_ending_before_commit_is_an_error(machine: Any) -> None:
    data = stream_bytes(machine, FEATURES, extra=command(CMD_X_MIGD_HEARTBEAT))
    _, _, _, f = load(data, machine)
    with pytest.raises(StreamError, match="truncated"):
        load_commit(f, FEATURES)


def test_unknown_configuration_subsection_is_refused(machine: Any) -> None:
    data = stream_bytes(machine, FEATURES).replace(b"configuration/x-migd", b"configuration/x-migq")
    with pytest.raises(StreamError, match="Unknown configuration subsection 'configuration/x-migq'"):
        load(data, machine)


def test_qemu_analyze_migration_reads_a_stream_with_the_subsection(machine: Any, tmp_path: Path) -> None:
    """QEMU's own script walks over the subsection (it is described in the VMDESCRIPTION)."""
    if not os.path.isfile(SCRIPT):
        pytest.skip(f"QEMU's analyze-migration.py not found at {SCRIPT} (set MIGD_ANALYZE_MIGRATION)")
    path = tmp_path / "with-subsection.state"
    path.write_bytes(stream_bytes(machine, FEATURES))
    out = subprocess.run([sys.executable, SCRIPT, "-f", str(path), "-d", "state"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert any(k.startswith("ram") for k in json.loads(out.stdout))
    desc = subprocess.run([sys.executable, SCRIPT, "-f", str(path), "-d", "desc"], capture_output=True,
                          text=True, timeout=120)
    assert desc.returncode == 0, desc.stderr
    subs = json.loads(desc.stdout)["configuration"]["subsections"]
    assert subs[0]["vmsd_name"] == "configuration/x-migd"


def test_return_path_messages_round_trip(channel_pair: Any) -> None:
    src, dst = channel_pair
    reader = ReturnPathReader(src)
    reader.start()
    w = ReturnPathWriter(dst)
    w.features(FEATURES, 4000)
    w.heartbeat()
    w.loaded()
    w.shut(0)
    assert reader.wait_for_shut(timeout=10) == 0
    assert reader.features == FEATURES and reader.peer_timeout_ms == 4000 and reader.loaded
    reader.close()


def test_loaded_before_features_is_refused(channel_pair: Any) -> None:
    src, dst = channel_pair
    reader = ReturnPathReader(src)
    reader.start()
    ReturnPathWriter(dst).loaded()
    with pytest.raises(ReturnPathError, match="Received invalid message 0x4d01 length 0x0000"):
        reader.wait_for_shut(timeout=10)
    reader.close()


def test_second_features_is_refused(channel_pair: Any) -> None:
    src, dst = channel_pair
    reader = ReturnPathReader(src)
    reader.start()
    dst.write_all([struct.pack(">HHII", 0x4D00, 8, 3, 1000) * 2])
    with pytest.raises(ReturnPathError, match="second X_MIGD_FEATURES"):
        reader.wait_for_shut(timeout=10)
    reader.close()


def test_peer_timeout_parameter() -> None:
    config = MigrationConfig()
    assert config.param("x-migd-peer-timeout") == 10
    config.set_parameters({"x-migd-peer-timeout": 3})
    assert config.query_parameters()["x-migd-peer-timeout"] == 3
    with pytest.raises(ParamError, match="^Parameter 'x-migd-peer-timeout' expects a value between 1 and 86400 seconds$"):
        config.set_parameters({"x-migd-peer-timeout": 0})
    assert config.param("x-migd-peer-timeout") == 3  # a refusal changes nothing
    args = validate(MigrateSetParametersArgs, {"x-migd-peer-timeout": 30})
    assert args.x_migd_peer_timeout == 30


def test_tcp_channels_keepalive_and_user_timeout() -> None:
    listener = transports.listen("tcp:127.0.0.1:0")
    port = listener.socket_address[0]["port"]
    accepted: list[Any] = []
    t = threading.Thread(target=lambda: accepted.append(listener.accept()))
    t.start()
    client = transports.connect(f"tcp:127.0.0.1:{port}")
    t.join(10)
    listener.close()
    try:
        for ch in (client, accepted[0]):
            assert isinstance(ch, SocketChannel)
            sock = ch.sock
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0  # QEMU peers: untouched
            set_peer_timeout(ch, 3)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 3000
    finally:
        client.close()
        accepted[0].close()


# -- item 3: checksum records ------------------------------------------------------------------------

def _patterned(machine: Any) -> None:
    block = machine.ram.blocks()[0]
    for i in range(0, block.npages, 3):
        block.pages[i] = (i % 251) + 1  # non-zero pages go out as PAGE records


def _flip_in_page(data: bytes, machine: Any) -> bytes:
    """Flip one bit in the middle of page 30's data as it sits in the stream."""
    needle = bytes([(30 % 251) + 1]) * 4096
    pos = data.index(needle) + 2000
    return data[:pos] + bytes([data[pos] ^ 0x10]) + data[pos + 1:]


def test_checksummed_stream_loads_and_a_flipped_bit_is_named(machine: Any) -> None:
    _patterned(machine)
    data = stream_bytes(machine, FEATURE_CHECKSUM)
    assert data.count(b"x-migd/checksum") >= 4  # START, each PART, END, devices (and the description)
    features, _, _, _ = load(data, machine)
    assert features == FEATURE_CHECKSUM
    with pytest.raises(StreamError) as info:
        load(_flip_in_page(data, machine), machine)
    text = str(info.value)
    assert text.startswith("Checksum mismatch in the migration stream at offset "), text
    assert "(ram; RAM block 'ram0')" in text and "the source sent 0x" in text, text


def test_checksum_records_refused_when_not_announced(machine: Any) -> None:
    data = stream_bytes(machine, 0, before_eof=checksum_record(1, 2))
    with pytest.raises(StreamError, match="Unknown savevm section or instance 'x-migd/checksum' 0"):
        load(data, machine)


def test_qemu_analyze_migration_reads_a_checksummed_stream(machine: Any, tmp_path: Path) -> None:
    if not os.path.isfile(SCRIPT):
        pytest.skip(f"QEMU's analyze-migration.py not found at {SCRIPT} (set MIGD_ANALYZE_MIGRATION)")
    _patterned(machine)
    path = tmp_path / "checksummed.state"
    path.write_bytes(stream_bytes(machine, FEATURE_CHECKSUM))
    out = subprocess.run([sys.executable, SCRIPT, "-f", str(path), "-d", "state"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert any(k.startswith("x-migd/checksum") for k in json.loads(out.stdout))
    ext = subprocess.run([sys.executable, SCRIPT, "-f", str(path), "-x"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert ext.returncode == 0, ext.stderr
    block = machine.ram.blocks()[0]
    assert (tmp_path / block.name).read_bytes() == block.buf.tobytes()
