"""Stream format: the bytes migd writes, and every kind of bad stream with its error text."""

from __future__ import annotations

import os
import struct
import tempfile

import numpy as np
import pytest
from streams import migration_bytes

from migd.machine.ram import RAMList
from migd.machine.vmstate import VMStateDevice, u64
from migd.migration import format as fmt
from migd.migration.savevm import load_stream
from migd.migration.stream import InStream, StreamError
from migd.transports.channel import FdChannel
from migd.units import PAGE_SIZE

MiB = 1 << 20
EOS = (fmt.RAM_EOS).to_bytes(8, "big")


class Clock(VMStateDevice):
    idstr = "test-clock"
    vmsd_name = "test-clock"
    version_id = 1
    fields = (u64("ticks"),)

    def __init__(self, ticks: int = 0) -> None:
        super().__init__(0)
        self.ticks = ticks

    def values(self) -> dict[str, int | bytes]:
        return {"ticks": self.ticks}

    def apply(self, values: dict[str, int | bytes]) -> None:
        self.ticks = int(values["ticks"])


class Box:
    def __init__(self, ram: RAMList, devices: list[VMStateDevice] | None = None) -> None:
        self.ram = ram
        self._devices = devices or []

    def devices(self) -> list[VMStateDevice]:
        return self._devices


def machine(size: int = MiB, **extra: int) -> Box:
    r = RAMList()
    r.add("ram0", size)
    for name, sz in extra.items():
        r.add(name, sz)
    return Box(r, [Clock()])


def save_bytes(src: Box, *, return_path: bool = False) -> bytes:
    """A whole migration written through a real FdChannel into a file, as the file: transport does."""
    return migration_bytes(src, return_path=return_path)


def load_bytes(data: bytes, dst: Box) -> None:
    with tempfile.TemporaryFile() as tmp:
        tmp.write(data)
        tmp.flush()
        tmp.seek(0)
        ch = FdChannel(os.dup(tmp.fileno()))
        try:
            load_stream(InStream(ch), dst)
        finally:
            ch.close()


def header(machine_type: bytes = b"migd") -> bytes:
    return struct.pack(">II", fmt.MAGIC, fmt.VERSION) + b"\x07" + struct.pack(">I", len(machine_type)) + machine_type


def ram_start(blocks: list[tuple[str, int]], sid: int = 0) -> bytes:
    total = sum(s for _, s in blocks)
    body = (total | fmt.RAM_MEM_SIZE).to_bytes(8, "big")
    for name, size in blocks:
        body += fmt.idstr_bytes(name) + size.to_bytes(8, "big")
    return fmt.section_start(fmt.Section.START, sid, "ram", 0, 4) + body + EOS + fmt.section_footer(sid)


def ram_part(records: bytes, sid: int = 0) -> bytes:
    return fmt.section_part(fmt.Section.PART, sid) + records + EOS + fmt.section_footer(sid)


def page(offset: int, data: bytes, name: str | None = "ram0") -> bytes:
    if name is None:
        return (offset | fmt.RAM_PAGE | fmt.RAM_CONTINUE).to_bytes(8, "big") + data
    return (offset | fmt.RAM_PAGE).to_bytes(8, "big") + fmt.idstr_bytes(name) + data


GOOD_START = ram_start([("ram0", MiB)])


def test_written_stream_layout_byte_by_byte():
    src = machine()
    src.ram.get("ram0").pages[1] = 0xAB
    src.devices()[0].ticks = 99
    data = save_bytes(src)
    assert data[:8] == bytes.fromhex("5145564d00000003")
    assert data[8:17] == b"\x07\x00\x00\x00\x04migd"
    # START ram: type, id 0, "ram", instance 0, version 4
    assert data[17:34] == b"\x01\x00\x00\x00\x00\x03ram\x00\x00\x00\x00\x00\x00\x00\x04"
    assert int.from_bytes(data[34:42], "big") == MiB | fmt.RAM_MEM_SIZE
    assert data[42:55] == b"\x04ram0" + MiB.to_bytes(8, "big")
    assert data[55:63] == EOS and data[63:68] == b"\x7e\x00\x00\x00\x00"
    # first PART: the first record names the block, the rest CONTINUE
    assert data[68:73] == b"\x02\x00\x00\x00\x00"
    first = int.from_bytes(data[73:81], "big")
    assert first & fmt.RAM_FLAG_MASK in (fmt.RAM_PAGE, fmt.RAM_ZERO) and data[81:86] == b"\x04ram0"
    # the end: FULL device section with footer, EOF, then the JSON description
    assert b"\x08\x00\x0b\x00\x00" in data  # SWITCHOVER_START
    full = fmt.section_start(fmt.Section.FULL, 1, "test-clock", 0, 1) + (99).to_bytes(8, "big") + fmt.section_footer(1)
    at = data.rindex(full)
    rest = data[at + len(full) :]
    assert rest[0] == fmt.Section.EOF and rest[1] == fmt.Section.VMDESCRIPTION
    (n,) = struct.unpack(">I", rest[2:6])
    assert len(rest) == 6 + n
    import json

    desc = json.loads(rest[6:])
    assert desc["page_size"] == 4096
    assert desc["devices"] == [{"name": "test-clock", "instance_id": 0, "vmsd_name": "test-clock",
                                "version": 1, "fields": [{"name": "ticks", "type": "uint64", "size": 8}]}]


def test_return_path_commands_follow_the_configuration():
    data = save_bytes(machine(), return_path=True)
    assert data[17:22] == b"\x08\x00\x01\x00\x00"  # OPEN_RETURN_PATH
    assert data[22:31] == b"\x08\x00\x02\x00\x04\x00\x00\x00\x01"  # PING(1)


@pytest.mark.parametrize("length", [0x17B, 0x7B, 0x7B00, 0x1_7B_00, 0x7B_00_00, 379])
def test_vmdesc_length_never_contains_open_brace(length):
    out = fmt.vmdesc_bytes(b"{" + b" " * (length - 2) + b"}")
    assert 0x7B not in out[1:5]
    assert out[0] == 6 and int.from_bytes(out[1:5], "big") == len(out) - 5


def test_good_stream_loads_and_device_state_arrives():
    src = machine()
    src.ram.get("ram0").pages[:] = np.arange(PAGE_SIZE, dtype=np.uint16).astype(np.uint8)
    src.devices()[0].ticks = 1234
    dst = machine()
    load_bytes(save_bytes(src), dst)
    assert np.array_equal(src.ram.get("ram0").buf, dst.ram.get("ram0").buf)
    assert dst.devices()[0].ticks == 1234


BAD_STREAMS = {
    "wrong magic": (b"QEVX" + header()[4:], "Not a migration stream"),
    "v2": (struct.pack(">II", fmt.MAGIC, 2), "SaveVM v2 format is obsolete"),
    "v4": (struct.pack(">II", fmt.MAGIC, 4), "Unsupported migration stream version"),
    "no configuration": (struct.pack(">II", fmt.MAGIC, 3) + b"\x01", "Configuration section missing"),
    "machine type": (header(b"pc-q35") + b"\x00", "Machine type received is 'pc-q35' and local is 'migd'"),
    "oversized machine name": (header()[:9] + b"\xff\xff\xff\xff", "too long"),
    "unknown section": (header() + fmt.section_start(fmt.Section.FULL, 3, "nosuch", 0, 1),
                        "Unknown savevm section or instance 'nosuch' 0"),
    "unknown instance": (header() + fmt.section_start(fmt.Section.FULL, 3, "test-clock", 2, 1),
                         "Unknown savevm section or instance 'test-clock' 2"),
    "device too new": (header() + fmt.section_start(fmt.Section.FULL, 3, "test-clock", 0, 2),
                       "savevm: unsupported version 2 for 'test-clock' v1"),
    "ram too new": (header() + fmt.section_start(fmt.Section.START, 0, "ram", 0, 5),
                    "savevm: unsupported version 5 for 'ram' v4"),
    "ram old version": (header() + fmt.section_start(fmt.Section.START, 0, "ram", 0, 3),
                        "ram_load: version 3 not supported"),
    "missing footer": (header() + GOOD_START[:-5] + b"\x02", "Missing section footer for ram"),
    "mismatched footer": (header() + GOOD_START[:-5] + fmt.section_footer(9),
                          "Mismatched section id in footer for ram -- read 0x9 expected 0x0"),
    "unknown section type": (header() + b"\x42", "Unknown savevm section type 66"),
    "subsection at top level": (header() + GOOD_START + b"\x05", "Unknown savevm section type 5"),
    "bad configuration subsection": (header() + b"\x05\x03abc", "Unknown configuration subsection 'abc'"),
    "part of unknown section": (header() + GOOD_START + fmt.section_part(fmt.Section.PART, 7),
                                "Unknown savevm section 7"),
    "unknown block": (header() + ram_start([("ram0", MiB), ("nosuch", MiB)]),
                      'Unknown ramblock "nosuch", cannot accept migration'),
    "block size mismatch": (header() + ram_start([("ram0", 2 * MiB)]),
                            "Length mismatch: ram0: 0x200000 in != 0x100000"),
    "block list inconsistent": (header() + fmt.section_start(fmt.Section.START, 0, "ram", 0, 4)
                                + (MiB | fmt.RAM_MEM_SIZE).to_bytes(8, "big") + b"\x04ram0" + (123).to_bytes(8, "big"),
                                "Invalid length 0x7b"),
    "offset outside block": (header() + GOOD_START + ram_part(page(MiB, bytes(PAGE_SIZE))),
                             "Illegal RAM offset 100000"),
    "offset outside block in a run": (
        header() + GOOD_START + ram_part(page(0, bytes(PAGE_SIZE)) + page(PAGE_SIZE, bytes(PAGE_SIZE), None)
                                         + page(64 * MiB, bytes(PAGE_SIZE), None)),
        "Illegal RAM offset 4000000"),
    "run crossing the end of the block": (
        header() + GOOD_START + ram_part(page(MiB - PAGE_SIZE, bytes(PAGE_SIZE)) + page(MiB, bytes(PAGE_SIZE), None)
                                         + page(MiB + PAGE_SIZE, bytes(PAGE_SIZE), None)),
        "Illegal RAM offset 100000"),
    "zero run crossing the end of the block": (
        header() + GOOD_START + ram_part((MiB - PAGE_SIZE | fmt.RAM_ZERO).to_bytes(8, "big") + b"\x04ram0\x00"
                                         + b"".join(((MiB + i * PAGE_SIZE) | 0x22).to_bytes(8, "big") + b"\0"
                                                    for i in range(3))),
        "Illegal RAM offset 100000"),
    "page of unknown block": (header() + GOOD_START + ram_part(page(0, bytes(PAGE_SIZE), "nosuch")),
                              "Can't find block nosuch"),
    "continue without block": (header() + GOOD_START + ram_part(page(0, bytes(PAGE_SIZE), None)),
                               "Ack, bad migration stream!"),
    "unknown flags": (header() + GOOD_START + ram_part((0x100 | fmt.RAM_PAGE).to_bytes(8, "big")),
                      "Unknown combination of migration flags: 0x108"),
    "xbzrle": (header() + GOOD_START + ram_part((fmt.RAM_XBZRLE | fmt.RAM_CONTINUE).to_bytes(8, "big")),
               "XBZRLE pages are not supported"),
    "zero page not zero": (header() + GOOD_START + ram_part((fmt.RAM_ZERO).to_bytes(8, "big") + b"\x04ram0\x07"),
                           "Found a zero page with value 7"),
    "command with bad length": (header() + b"\x08\x00\x02\x00\x05" + bytes(5),
                                "PING received with bad length - expecting 4, received 5"),
    "unsupported command": (header() + b"\x08\x00\x03\x00\x00", "VM_COMMAND POSTCOPY_ADVISE is not supported"),
    "device refuses state": (header() + fmt.section_start(fmt.Section.FULL, 1, "test-clock", 0, 0),
                             "error while loading state for instance 0x0 of device 'test-clock'"),
    "name not utf-8": (header() + GOOD_START + ram_part((fmt.RAM_ZERO).to_bytes(8, "big") + b"\x02\xff\xfe\x00"),
                       "Invalid name in migration stream"),
    "empty": (b"", "truncated"),
    "truncated header": (header()[:6], "truncated"),
    "truncated in a page": (header() + GOOD_START + fmt.section_part(fmt.Section.PART, 0) + page(0, bytes(100)),
                            "truncated"),
    "no EOF": (header() + GOOD_START, "truncated"),
}


@pytest.mark.parametrize("name", sorted(BAD_STREAMS))
def test_bad_stream(name):
    data, text = BAD_STREAMS[name]
    with pytest.raises(StreamError) as info:
        load_bytes(data, machine())
    assert text in str(info.value)


def test_truncated_everywhere_is_a_clear_error():
    """Every prefix of a real stream (short of the description) fails with 'truncated'."""
    src = machine(64 * 1024)
    src.ram.get("ram0").pages[3] = 5
    data = save_bytes(src)
    eof = data.rindex(b"\x00\x06")  # EOF marker followed by VMDESCRIPTION
    for cut in list(range(0, 200)) + list(range(200, eof + 1, 97)) + [eof]:
        with pytest.raises(StreamError, match="truncated"):
            load_bytes(data[:cut], machine(64 * 1024))
    load_bytes(data[: eof + 1], machine(64 * 1024))  # a missing description is only a warning in QEMU


def test_bad_stream_never_changes_the_device():
    dst = machine()
    dst.devices()[0].ticks = 5
    bad = header() + fmt.section_start(fmt.Section.FULL, 1, "test-clock", 0, 1) + b"\x00\x00"
    with pytest.raises(StreamError, match="truncated"):
        load_bytes(bad, dst)
    assert dst.devices()[0].ticks == 5
