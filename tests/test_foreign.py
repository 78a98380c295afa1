"""The foreign-machine loader on hand-made streams: block list, device cuts, the description's check.

Streams are written to a real file and read through migd's InStream; they use the layout QEMU writes
(configuration with a machine type of its own, ram START/PART/END, FULL device sections whose state
may contain bytes that look like a footer, EOF, VMDESCRIPTION).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from migd.config import MachineConfig
from migd.migration.foreign import ForeignMachine, is_foreign, load_foreign, may_hold_foreign
from migd.migration.format import (
    MAGIC,
    RAM_CONTINUE,
    RAM_EOS,
    RAM_MEM_SIZE,
    RAM_PAGE,
    RAM_ZERO,
    Section,
    command,
    idstr_bytes,
    section_footer,
    section_part,
    section_start,
    vmdesc_bytes,
)
from migd.migration.stream import InStream, StreamError
from migd.transports.channel import FdChannel

RAM_SID = 2
# the state of "dev" holds a false footer for its own section id, followed by a byte that is no
# section type (0x99), before the real end
DEV_STATE = b"\x01\x02" + section_footer(7) + b"\x99" + b"\x03" * 9
DEV_DESC = {"name": "dev", "instance_id": 0, "vmsd_name": "dev", "version": 1,
            "fields": [{"name": "a", "type": "buffer", "size": len(DEV_STATE)}]}
SUB_STATE = b"\xaa\xbb" + b"\x05" + idstr_bytes("sub/x")[0:1] + b"sub/x" + struct.pack(">I", 1) + b"\xcc" * 4
SUB_DESC = {"name": "withsub", "instance_id": 0, "vmsd_name": "withsub", "version": 1,
            "fields": [{"name": "b", "type": "uint16", "size": 2}],
            "subsections": [{"vmsd_name": "sub/x", "version": 1,
                             "fields": [{"name": "c", "type": "uint32", "size": 4}]}]}


def stream(devices: list[dict[str, Any]] | None = None, dev_state: bytes = DEV_STATE, vmdesc: bool = True,
           commands: bytes = b"") -> bytes:
    out = MAGIC.to_bytes(4, "big") + (3).to_bytes(4, "big")
    out += bytes((Section.CONFIGURATION,)) + struct.pack(">I", 13) + b"pc-i440fx-7.2"
    out += commands
    out += section_start(Section.START, RAM_SID, "ram", 0, 4)
    blocks = [("pc.ram", 4 * 4096), ("/rom@etc/acpi/tables", 4096)]
    out += (sum(s for _, s in blocks) | RAM_MEM_SIZE).to_bytes(8, "big")
    for name, size in blocks:
        out += idstr_bytes(name) + size.to_bytes(8, "big")
    out += RAM_EOS.to_bytes(8, "big") + section_footer(RAM_SID)
    out += section_part(Section.PART, RAM_SID)
    out += (4096 | RAM_PAGE).to_bytes(8, "big") + idstr_bytes("pc.ram") + b"\x11" * 4096
    out += (2 * 4096 | RAM_ZERO | RAM_CONTINUE).to_bytes(8, "big") + b"\0"
    out += RAM_PAGE.to_bytes(8, "big") + idstr_bytes("/rom@etc/acpi/tables") + b"\x22" * 4096
    out += RAM_EOS.to_bytes(8, "big") + section_footer(RAM_SID)
    out += section_part(Section.END, RAM_SID) + RAM_EOS.to_bytes(8, "big") + section_footer(RAM_SID)
    out += section_start(Section.FULL, 7, "dev", 0, 1) + dev_state + section_footer(7)
    out += section_start(Section.FULL, 9, "withsub", 0, 1) + SUB_STATE + section_footer(9)
    out += bytes((Section.EOF,))
    if vmdesc:
        doc = {"page_size": 4096, "devices": devices if devices is not None else [DEV_DESC, SUB_DESC]}
        out += vmdesc_bytes(json.dumps(doc).encode())
    return out


def load(tmp_path: Path, data: bytes) -> ForeignMachine:
    path = tmp_path / "s"
    path.write_bytes(data)
    f = InStream(FdChannel(os.open(path, os.O_RDONLY)))
    try:
        assert is_foreign(f)
        return load_foreign(f)
    finally:
        f.close()


def test_blocks_pages_and_devices_as_received(tmp_path: Path) -> None:
    m = load(tmp_path, stream())
    assert m.machine_type == "pc-i440fx-7.2"
    assert m.ram_section_id == RAM_SID
    assert [(b.name, b.size) for b in m.ram.blocks()] == [("pc.ram", 4 * 4096), ("/rom@etc/acpi/tables", 4096)]
    ram = m.ram.get("pc.ram")
    assert ram is not None and ram.buf.tobytes() == bytes(4096) + b"\x11" * 4096 + bytes(2 * 4096)
    rom = m.ram.get("/rom@etc/acpi/tables")
    assert rom is not None and rom.buf.tobytes() == b"\x22" * 4096
    assert [(d.section_id, d.idstr, d.data) for d in m.devices] == [(7, "dev", DEV_STATE), (9, "withsub", SUB_STATE)]
    assert m.configuration == bytes((Section.CONFIGURATION,)) + struct.pack(">I", 13) + b"pc-i440fx-7.2"
    assert m.vmdesc is not None and json.loads(m.vmdesc)["devices"][0]["name"] == "dev"


def test_without_a_description_the_footer_cut_stands(tmp_path: Path) -> None:
    m = load(tmp_path, stream(vmdesc=False))
    assert [d.data for d in m.devices] == [DEV_STATE, SUB_STATE] and m.vmdesc is None


def test_a_cut_the_description_contradicts_fails(tmp_path: Path) -> None:
    longer = dict(DEV_DESC, fields=[{"name": "a", "type": "buffer", "size": len(DEV_STATE) + 3}])
    with pytest.raises(StreamError, match="Device state of 'dev' 0: 17 bytes in the stream, its description says more"):
        load(tmp_path, stream(devices=[longer, SUB_DESC]))
    shorter = dict(DEV_DESC, fields=[{"name": "a", "type": "buffer", "size": len(DEV_STATE) - 3}])
    with pytest.raises(StreamError, match="17 bytes in the stream, its description says 14"):
        load(tmp_path, stream(devices=[shorter, SUB_DESC]))


def test_a_false_footer_followed_by_a_section_type_byte_is_not_taken_for_the_end(tmp_path: Path) -> None:
    for tricky in (b"\x01" + section_footer(7) + bytes((Section.FULL,)) + b"\x03" * 4,  # no idstr follows
                   b"\x01" + section_footer(7) + bytes((Section.EOF,)) + b"\x00" * 3,  # EOF, no VMDESCRIPTION
                   b"\x01" + section_footer(7) + bytes((Section.PART,)) + b"\x00" * 4):  # not a live id
        desc = dict(DEV_DESC, fields=[{"name": "a", "type": "buffer", "size": len(tricky)}])
        m = load(tmp_path, stream(devices=[desc, SUB_DESC], dev_state=tricky))
        assert m.devices[0].data == tricky


def test_return_path_commands_reach_the_handler(tmp_path: Path) -> None:
    data = stream(commands=command(1) + command(2, struct.pack(">I", 1)))
    path = tmp_path / "s"
    path.write_bytes(data)
    seen: list[tuple[int, bytes]] = []
    f = InStream(FdChannel(os.open(path, os.O_RDONLY)))
    load_foreign(f, on_command=lambda cmd, payload: seen.append((cmd, payload)))
    f.close()
    assert seen == [(1, b""), (2, struct.pack(">I", 1))]


def test_a_truncated_description_is_no_description(tmp_path: Path) -> None:
    m = load(tmp_path, stream()[:-200])
    assert m.vmdesc is None and len(m.devices) == 2


@pytest.mark.parametrize("cut", [5, 20, 60, 4200, -40])
def test_truncated_anywhere_is_a_stream_error(tmp_path: Path, cut: int) -> None:
    data = stream(vmdesc=False) if cut == -40 else stream()
    with pytest.raises(StreamError):
        load_or_header(tmp_path, data[:cut])


def load_or_header(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "s"
    path.write_bytes(data)
    f = InStream(FdChannel(os.open(path, os.O_RDONLY)))
    try:
        load_foreign(f)
    finally:
        f.close()


def test_machine_options_keep_migd_its_own_machine() -> None:
    assert may_hold_foreign(MachineConfig())
    assert may_hold_foreign(MachineConfig(name="relay", start_paused=True))
    assert not may_hold_foreign(MachineConfig(memory=64 << 20))
    assert not may_hold_foreign(MachineConfig(workload="idle"))
    assert not may_hold_foreign(None)


def test_mutated_streams_fail_with_stream_errors_only(tmp_path: Path) -> None:
    """Bad input is a clear StreamError (or loads), never another exception: 400 seeded mutations."""
    base = stream(commands=command(2, struct.pack(">I", 1)))
    rng = np.random.default_rng(12)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(400):
        data = bytearray(base)
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(0, len(data)))] = int(rng.integers(0, 256))
        if rng.random() < 0.2:
            data = data[: int(rng.integers(0, len(data)))]
        try:
            load_or_header(tmp_path, bytes(data))
            outcomes["loaded"] += 1
        except StreamError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0, outcomes
