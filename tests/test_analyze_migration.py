"""A file-saved stream must be readable by QEMU's scripts/analyze-migration.py.

The script is not installed here, so the property is checked twice: by running the real script when it
can be found (``$MIGD_ANALYZE_MIGRATION`` or a usual path), and always by an independent reader in this
file that follows the script's rules (reference §3.5): it finds the JSON the way the script does,
checks magic and version, walks the sections with their footers, parses the ram section with the
script's flag handling, reads device sections by their description, and extracts the RAM.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from streams import write_migration

from migd.machine.ram import RAMList
from migd.machine.vmstate import VMStateDevice, buffer, u32, u64
from migd.units import PAGE_SIZE

MiB = 1 << 20


class Clock(VMStateDevice):
    idstr = "test-clock"
    vmsd_name = "test-clock"
    version_id = 3
    fields = (u64("ticks"), u32("hz"), buffer("label", 16))

    def __init__(self, instance_id: int = 0) -> None:
        super().__init__(instance_id)

    def values(self) -> dict[str, int | bytes]:
        return {"ticks": 123456789 + self.instance_id, "hz": 1000, "label": b"clock"}

    def apply(self, values: dict[str, int | bytes]) -> None:  # pragma: no cover - save side only
        pass


class Box:
    def __init__(self) -> None:
        self.ram = RAMList()
        self.ram.add("ram0", 4 * MiB)
        self.ram.add("pc.rom", 256 * 1024)
        self._devices: list[VMStateDevice] = [Clock(0), Clock(1)]

    def devices(self) -> list[VMStateDevice]:
        return self._devices


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Box]:
    """A migration saved the way the file: transport does it (no return path)."""
    box = Box()
    rng = np.random.default_rng(5)
    ram0 = box.ram.get("ram0")
    ram0.pages[: ram0.npages // 2] = rng.integers(0, 256, (ram0.npages // 2, PAGE_SIZE), dtype=np.uint8)
    ram0.pages[10:20] = 0
    box.ram.get("pc.rom").pages[::2] = 0x90
    path = tmp_path_factory.mktemp("analyze") / "stream.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    write_migration(box, fd)
    return path, box


# -- the independent reader ------------------------------------------------------------------------


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        assert n >= 0 and self.pos + n <= len(self.data), "read past the end"
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def s8(self) -> int:
        return struct.unpack(">b", self.take(1))[0]

    def u8(self) -> int:
        return self.take(1)[0]

    def be32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def be64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def name(self) -> str:
        n = self.s8()  # the script reads lengths as signed bytes
        assert n >= 0, "read length must be non-negative"
        return self.take(n).decode()


def find_vmdesc(data: bytes) -> dict:
    """As the script: the last 10 MiB, its last NUL, the first '{' after it, 0x06 five bytes before."""
    tail = data[-(10 << 20) :]
    last_nul = tail.rindex(b"\x00")
    brace = tail.index(b"{", last_nul)
    assert tail[brace - 5] == 0x06, "No Debug Migration device found"
    (length,) = struct.unpack(">I", tail[brace - 4 : brace])
    return json.loads(tail[brace : brace + length])


def read_fields(r: Reader, fields: list[dict]) -> dict[str, bytes]:
    return {f["name"]: r.take(f["size"]) for f in fields}


def parse(data: bytes) -> tuple[dict, dict[str, bytearray], dict[tuple[str, int], dict[str, bytes]]]:
    desc = find_vmdesc(data)
    page_size = desc["page_size"]
    devices = {(d["name"], d["instance_id"]): d for d in desc["devices"]}
    r = Reader(data)
    assert r.be32() == 0x5145564D, "Invalid file magic"
    assert r.be32() == 3, "Invalid version number"
    ram: dict[str, bytearray] = {}
    state: dict[tuple[str, int], dict[str, bytes]] = {}
    sections: dict[int, tuple[str, int]] = {}
    last_id = None
    while True:
        kind = r.s8()
        if kind == 0x07:  # configuration, by its description
            assert r.be32() == desc["configuration"]["fields"][1]["size"]
            r.take(desc["configuration"]["fields"][1]["size"])
        elif kind in (0x01, 0x04):
            sid = r.be32()
            name = r.name()
            instance = r.be32()
            version = r.be32()
            sections[sid] = (name, instance)
            last_id = sid
            if (name, instance) == ("ram", 0):
                assert version == 4
                read_ram(r, ram, page_size)
            else:
                state[(name, instance)] = read_fields(r, devices[(name, instance)]["fields"])
        elif kind in (0x02, 0x03):
            sid = r.be32()
            last_id = sid
            assert sections[sid] == ("ram", 0)
            read_ram(r, ram, page_size)
        elif kind == 0x08:
            cmd, length = struct.unpack(">HH", r.take(4))
            assert (cmd, length) == (0x0B, 0), "Unknown QEMU_VM_COMMAND"
        elif kind == 0x7E:
            assert r.be32() == last_id, "footer does not match the section"
        elif kind == 0x00:
            break
        else:
            raise AssertionError(f"unknown section type {kind}")
    return desc, ram, state


def read_ram(r: Reader, ram: dict[str, bytearray], page_size: int) -> None:
    current = None
    while True:
        addr = r.be64()
        flags = addr & (page_size - 1)
        addr &= ~(page_size - 1)
        if flags & 0x04:  # MEM_SIZE
            total = addr
            while total > 0:
                name = r.name()
                length = r.be64()
                ram.setdefault(name, bytearray(length))
                total -= length
            flags &= ~0x04
        if flags & (0x02 | 0x08):
            if not flags & 0x20:
                current = r.name()
            assert current is not None
            if flags & 0x02:  # "COMPRESS": the fill byte
                fill = r.u8()
                ram[current][addr : addr + page_size] = bytes([fill]) * page_size
            else:
                ram[current][addr : addr + page_size] = r.take(page_size)
            flags &= ~(0x02 | 0x08 | 0x20)
        if flags & 0x200:
            flags &= ~0x200
        if flags & 0x10:
            return
        assert flags == 0, f"Unknown RAM flags: {flags:x}"


def test_independent_reader_parses_the_stream(saved):
    path, box = saved
    desc, ram, state = parse(path.read_bytes())
    assert desc["page_size"] == 4096
    assert {(d["name"], d["instance_id"]) for d in desc["devices"]} == {("test-clock", 0), ("test-clock", 1)}
    for block in box.ram.blocks():
        assert bytes(ram[block.name]) == block.buf.tobytes(), block.name
    assert struct.unpack(">Q", state[("test-clock", 1)]["ticks"])[0] == 123456790
    assert state[("test-clock", 0)]["label"].rstrip(b"\0") == b"clock"


# -- QEMU's own script, where available -------------------------------------------------------------


def _find_script() -> str | None:
    env = os.environ.get("MIGD_ANALYZE_MIGRATION")
    candidates = [env] if env else []
    candidates += [
        "/usr/share/qemu/scripts/analyze-migration.py",
        "/usr/lib/qemu/scripts/analyze-migration.py",
        "/usr/libexec/qemu/analyze-migration.py",
        "/usr/local/share/qemu/scripts/analyze-migration.py",
        os.path.expanduser("~/qemu/scripts/analyze-migration.py"),
        "/opt/qemu/scripts/analyze-migration.py",
    ]
    found = shutil.which("analyze-migration.py")
    if found:
        candidates.append(found)
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    return None


SCRIPT = _find_script()
needs_script = pytest.mark.skipif(SCRIPT is None, reason="QEMU's analyze-migration.py not found "
                                  "(set MIGD_ANALYZE_MIGRATION)")


@needs_script
def test_qemu_script_dumps_state(saved):
    path, _ = saved
    out = subprocess.run([sys.executable, SCRIPT, "-f", str(path), "-d", "state"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert any(k.startswith("ram") for k in doc)
    assert sum(k.startswith("test-clock") for k in doc) == 2


@needs_script
def test_qemu_script_extracts_ram(saved, tmp_path):
    path, box = saved
    out = subprocess.run([sys.executable, SCRIPT, "-f", str(path), "-x"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for block in box.ram.blocks():
        extracted = (tmp_path / block.name).read_bytes()
        assert extracted == block.buf.tobytes(), block.name
