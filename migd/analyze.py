"""Read a saved migration stream (QEMU's or migd's) and say what is in it, without loading it anywhere.

Written from the stream's format facts (docs/FORMAT.md, the shared reference §3), not from any tool's
code. The file is mapped and walked once: header, configuration (with its subsections), every
section with its header and footer, COMMANDs, EOF, the VMDESCRIPTION. The ``ram`` section's records
are decoded into per-block statistics; with an extraction target each block is rebuilt as a file
(the *last* record of a page wins: a page sent as data and later as ZERO ends up zero).

Device sections (FULL) carry no length on the wire. Their end is found from the VMDESCRIPTION: the
description's field sizes (and the subsections that follow them, ``0x05 name version``) give the
size, and the footer ``0x7e be32(section id)`` must sit exactly there. Where no description fits
(no VMDESCRIPTION, or a section it does not describe), the first footer for that section id that is
followed by a valid section type ends it, and the section is marked as not validated.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from migd.migration.format import (
    CHECKSUM_IDSTR,
    CHECKSUM_SECTION_ID,
    CMD_NAMES,
    CONFIG_SUBSECTION,
    MAGIC,
    MAX_VMDESC,
    RAM_CONTINUE,
    RAM_EOS,
    RAM_HOOK,
    RAM_IDSTR,
    RAM_MEM_SIZE,
    RAM_MULTIFD_FLUSH,
    RAM_PAGE,
    RAM_X_MIGD_RUN,
    RAM_XBZRLE,
    RAM_ZERO,
    VERSION,
    Cmd,
    Section,
)

__all__ = ["AnalyzeError", "Analysis", "BlockStats", "SectionInfo", "analyze", "extract"]

SECTION_NAMES: dict[int, str] = {Section.START: "START", Section.PART: "PART", Section.END: "END",
                                 Section.FULL: "FULL"}
# a section's footer is followed by one of these (the next section, a command, or EOF)
_AFTER_FOOTER = {int(Section.EOF), int(Section.START), int(Section.PART), int(Section.END), int(Section.FULL),
                 int(Section.COMMAND)}
_CMD_LENGTHS: dict[int, int] = {Cmd.OPEN_RETURN_PATH: 0, Cmd.PING: 4, Cmd.POSTCOPY_LISTEN: 0, Cmd.POSTCOPY_RUN: 0,
                Cmd.POSTCOPY_RESUME: 0, Cmd.SWITCHOVER_START: 0}
_INT_TYPES = {"uint8": (1, False), "uint16": (2, False), "uint32": (4, False), "uint64": (8, False),
              "int8": (1, True), "int16": (2, True), "int32": (4, True), "int64": (8, True),
              "bool": (1, False), "int32 equal": (4, True), "uint32 equal": (4, False),
              "uint8 equal": (1, False), "uint16 equal": (2, False), "uint64 equal": (8, False)}
PAGE = 4096  # used until the description says otherwise
MAX_BLOCK = 1 << 38  # 256 GiB: the per-page state of a larger block would not be a small allocation


class AnalyzeError(Exception):
    """The file is not a readable migration stream; the text says where and why."""


@dataclass
class SectionInfo:
    """One section as it appears in the stream (PART/END repeat the START's idstr)."""

    type: str
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    offset: int  # of the section type byte
    size: int  # payload bytes: after the header, before the footer
    validated: bool = True  # FULL sections: size confirmed by the description

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": self.type, "section_id": self.section_id, "idstr": self.idstr,
                             "instance_id": self.instance_id, "version_id": self.version_id,
                             "offset": self.offset, "size": self.size}
        if not self.validated:
            d["validated"] = False
        return d


@dataclass
class BlockStats:
    """One RAM block: its records and the pages' final state."""

    name: str
    size: int
    page_records: int = 0
    zero_records: int = 0
    state: bytearray = field(default_factory=bytearray, repr=False)  # per page: 0 unsent, 1 data, 2 zero

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "pages": self.size // PAGE,
                "page_records": self.page_records, "zero_records": self.zero_records,
                "data_pages": self.state.count(1), "zero_pages": self.state.count(2),
                "unsent_pages": self.state.count(0)}


@dataclass
class Analysis:
    path: str
    file_size: int
    machine_type: str | None = None
    configuration: dict[str, Any] = field(default_factory=dict)
    sections: list[SectionInfo] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    blocks: dict[str, BlockStats] = field(default_factory=dict)
    vmdesc: dict[str, Any] | None = None
    eof_offset: int | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)  # decoded device state, in stream order
    # [migd] checksum records: (offset, bytes covered, whether the xxh3-64 matched)
    checksums: list[tuple[int, int, bool]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        desc_devices = [] if self.vmdesc is None else [
            {"name": d.get("name"), "instance_id": d.get("instance_id"), "vmsd_name": d.get("vmsd_name"),
             "version": d.get("version"), "size": description_size(d)} for d in self.vmdesc.get("devices", [])
            if d.get("name") != CHECKSUM_IDSTR]  # described for QEMU's script; checksums, not a device
        return {"file": self.path, "file_size": self.file_size, "machine_type": self.machine_type,
                "configuration": self.configuration, "commands": self.commands,
                "sections": [s.as_dict() for s in self.sections],
                "ram_blocks": [b.as_dict() for b in self.blocks.values()],
                "vmdesc_devices": desc_devices, "has_vmdesc": self.vmdesc is not None,
                "checksums": {"records": len(self.checksums),
                              "bad": [at for at, _, ok in self.checksums if not ok]}}


# -- the description ------------------------------------------------------------------------------


def _field_size(f: dict[str, Any]) -> int:
    return int(f.get("size", 0)) * int(f.get("array_len", 1))


def description_size(desc: dict[str, Any]) -> int:
    """Bytes of a description's fields (subsections not counted: they are optional on the wire)."""
    return sum(_field_size(f) for f in desc.get("fields", []))


def described_size(desc: dict[str, Any], data: bytes | mmap.mmap, at: int, end: int) -> int | None:
    """Bytes a device's state takes at ``data[at:]`` by its description: its fields, then any
    subsections (``0x05 u8 len name be32 version`` + their own fields, recursively) that the
    description lists. None when a subsection on the wire is not described."""
    pos = at + description_size(desc)
    subs = {s.get("vmsd_name"): s for s in desc.get("subsections", [])}
    while pos + 1 < end and data[pos] == Section.SUBSECTION and subs:
        n = data[pos + 1]
        name = bytes(data[pos + 2 : pos + 2 + n]).decode(errors="replace")
        sub = subs.pop(name, None)
        if sub is None:
            return None
        inner = described_size(sub, data, pos + 2 + n + 4, end)
        if inner is None:
            return None
        pos = pos + 2 + n + 4 + inner
    return pos - at if pos <= end else None


def find_vmdesc(data: bytes | mmap.mmap, end: int) -> tuple[int, dict[str, Any]] | None:
    """The VMDESCRIPTION at the file's end: (offset of its 0x06, the JSON), or None.

    JSON text has no raw control characters, so the last 0x06 byte of the file is the section's type
    byte, and its be32 length must reach exactly the end of the file.
    """
    lo = max(0, end - MAX_VMDESC - 5)
    pos = data.rfind(bytes((Section.VMDESCRIPTION,)), lo, end)
    if pos < 0 or pos + 5 > end:
        return None
    (length,) = struct.unpack(">I", data[pos + 1 : pos + 5])
    if pos + 5 + length != end:
        return None
    try:
        doc = json.loads(bytes(data[pos + 5 : end]))
    except (ValueError, UnicodeDecodeError):
        return None
    return (pos, doc) if isinstance(doc, dict) else None


# -- the reader -----------------------------------------------------------------------------------


class _Cursor:
    def __init__(self, data: mmap.mmap | bytes, end: int) -> None:
        self.data = data
        self.end = end
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > self.end:
            raise AnalyzeError(f"stream truncated at offset {self.pos}: {what} needs {n} bytes, "
                               f"{self.end - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return bytes(out)

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def be16(self, what: str) -> int:
        return int(struct.unpack(">H", self.take(2, what))[0])

    def be32(self, what: str) -> int:
        return int(struct.unpack(">I", self.take(4, what))[0])

    def be64(self, what: str) -> int:
        return int(struct.unpack(">Q", self.take(8, what))[0])

    def name(self, what: str) -> str:
        n = self.u8(what)
        raw = self.take(n, what)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise AnalyzeError(f"invalid {what} {raw!r} at offset {self.pos - n}") from None


class _Walker:
    """One pass over the stream, filling an Analysis; optionally writing RAM blocks out."""

    def __init__(self, analysis: Analysis, c: _Cursor, ram_dir: Path | None) -> None:
        self.a = analysis
        self.c = c
        self.ram_dir = ram_dir
        self.page = PAGE
        self.ignore_shared = False
        self.segment = 0  # where the bytes the next checksum record covers begin
        self.live: dict[int, SectionInfo] = {}
        self.block: BlockStats | None = None
        self.fds: dict[str, int] = {}
        desc = analysis.vmdesc or {}
        self.page = int(desc.get("page_size", PAGE))
        self.described = {(d.get("name"), d.get("instance_id")): d for d in desc.get("devices", [])}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def run(self, stop: int) -> None:
        c = self.c
        if c.be32("magic") != MAGIC:
            raise AnalyzeError("Not a migration stream (bad magic)")
        version = c.be32("version")
        if version != VERSION:
            raise AnalyzeError(f"Unsupported migration stream version {version}")
        while True:
            if c.pos >= stop:
                raise AnalyzeError(f"stream ends at offset {c.pos} without an EOF section")
            at = c.pos
            kind = c.u8("section type")
            if kind == Section.CONFIGURATION:
                self._configuration()
            elif kind in (Section.START, Section.FULL):
                sid = c.be32("section id")
                idstr = c.name("section idstr")
                inst = c.be32("instance id")
                ver = c.be32("version id")
                if kind == Section.FULL and idstr == CHECKSUM_IDSTR:
                    self._checksum(at)
                    continue
                info = SectionInfo(SECTION_NAMES[kind], sid, idstr, inst, ver, at, 0)
                if kind == Section.START:
                    self.live[sid] = info
                self._section_body(info)
            elif kind in (Section.PART, Section.END):
                sid = c.be32("section id")
                start = self.live.get(sid)
                if start is None:
                    raise AnalyzeError(f"Unknown savevm section {sid} at offset {at}")
                info = SectionInfo(SECTION_NAMES[kind], sid, start.idstr, start.instance_id, start.version_id, at, 0)
                self._section_body(info)
            elif kind == Section.COMMAND:
                self._command(at)
            elif kind == Section.EOF:
                self.a.eof_offset = at
                return
            else:
                raise AnalyzeError(f"Unknown savevm section type 0x{kind:x} at offset {at}")

    def _configuration(self) -> None:
        c = self.c
        n = c.be32("machine type length")
        if n > 256:
            raise AnalyzeError(f"machine type of {n} bytes")
        self.a.machine_type = c.take(n, "machine type").decode(errors="replace")
        while c.pos < c.end and c.data[c.pos] == Section.SUBSECTION:
            c.pos += 1
            name = c.name("configuration subsection")
            c.be32("subsection version")
            if name == "configuration/target-page-bits":
                self.a.configuration["target-page-bits"] = c.be32("target-page-bits")
            elif name == "configuration/capabilities":
                count = c.be32("capability count")
                caps = [c.name("capability") for _ in range(min(count, 64))]
                self.a.configuration["capabilities"] = caps
                self.ignore_shared = "x-ignore-shared" in caps
            elif name == "configuration/uuid":
                self.a.configuration["uuid"] = c.take(16, "uuid").hex()
            elif name == CONFIG_SUBSECTION:  # migd's features (docs/FORMAT.md §1.1)
                self.a.configuration["x-migd-features"] = c.be32("features")
                self.a.configuration["x-migd-peer-timeout-ms"] = c.be32("peer timeout")
                self.segment = c.pos  # checksums cover what follows the configuration
            else:
                raise AnalyzeError(f"unknown configuration subsection '{name}' at offset {c.pos}")

    def _command(self, at: int) -> None:
        c = self.c
        cmd = c.be16("command")
        length = c.be16("command length")
        name = CMD_NAMES.get(cmd, f"0x{cmd:x}")
        expected = _CMD_LENGTHS.get(cmd)
        if cmd == Cmd.PACKAGED:
            raise AnalyzeError(f"{name} (postcopy) at offset {at} is not supported")
        if expected is not None and length != expected:
            raise AnalyzeError(f"{name} received with bad length - expecting {expected}, received {length}")
        c.take(length, name)
        self.a.commands.append(name)

    def _checksum(self, at: int) -> None:
        """[migd] A checksum record: the xxh3-64 and length of the bytes since the previous one (or the
        end of the configuration), checked here; records are not device sections."""
        c = self.c
        digest, length = c.be64("checksum"), c.be64("checksum length")
        if c.u8("section footer") != Section.FOOTER or c.be32("footer id") != CHECKSUM_SECTION_ID:
            raise AnalyzeError(f"Missing section footer for {CHECKSUM_IDSTR} at offset {at}")
        covered = c.data[self.segment:at]
        ok = len(covered) == length and xxhash.xxh3_64_intdigest(covered) == digest
        self.a.checksums.append((at, at - self.segment, ok))
        self.segment = c.pos

    def _section_body(self, info: SectionInfo) -> None:
        c = self.c
        body = c.pos
        if info.idstr == RAM_IDSTR and info.type != "FULL":
            if info.version_id != 4:
                raise AnalyzeError(f"ram section version {info.version_id} (only 4 is known)")
            self._ram(info.type == "START")
            info.size = c.pos - body
            self._footer(info)
        elif info.type == "FULL":
            size, ok = self._device_size(info, body)
            info.size, info.validated = size, ok
            raw = c.take(size, f"state of {info.idstr}")
            self._footer(info)
            self.a.devices.append(self._device_state(info, raw))
        else:  # another live section (block, dirty bitmaps...): opaque, ended by its footer
            info.size = self._footer_search(info, body)
            c.pos = body + info.size
            info.validated = False
            self._footer(info)
        self.a.sections.append(info)

    def _footer(self, info: SectionInfo) -> None:
        c = self.c
        at = c.pos
        if c.u8("section footer") != Section.FOOTER:
            raise AnalyzeError(f"Missing section footer for {info.idstr} at offset {at}")
        sid = c.be32("footer id")
        if sid != info.section_id:
            raise AnalyzeError(f"Mismatched section id in footer for {info.idstr} -- read 0x{sid:x} "
                               f"expected 0x{info.section_id:x}")

    def _footer_search(self, info: SectionInfo, body: int) -> int:
        c = self.c
        pattern = bytes((Section.FOOTER,)) + struct.pack(">I", info.section_id)
        pos = body
        while True:
            pos = c.data.find(pattern, pos, c.end)
            if pos < 0:
                raise AnalyzeError(f"Missing section footer for {info.idstr} (section {info.section_id} "
                                   f"at offset {info.offset})")
            nxt = pos + len(pattern)
            if nxt < c.end and c.data[nxt] in _AFTER_FOOTER:
                return pos - body
            pos += 1

    def _device_size(self, info: SectionInfo, body: int) -> tuple[int, bool]:
        """The FULL section's size: from its description, confirmed by the footer; else by search."""
        desc = self.described.get((info.idstr, info.instance_id))
        footer = bytes((Section.FOOTER,)) + struct.pack(">I", info.section_id)
        if desc is not None:
            size = self._described_size(desc, body)
            if size is not None and self.c.data[body + size : body + size + 5] == footer:
                return size, True
        return self._footer_search(info, body), False

    def _described_size(self, desc: dict[str, Any], at: int) -> int | None:
        return described_size(desc, self.c.data, at, self.c.end)

    def _device_state(self, info: SectionInfo, raw: bytes) -> dict[str, Any]:
        out: dict[str, Any] = {"name": info.idstr, "instance_id": info.instance_id, "version_id": info.version_id,
                               "section_id": info.section_id, "size": len(raw), "raw": raw.hex()}
        desc = self.described.get((info.idstr, info.instance_id))
        if desc is not None and info.validated:
            fields, _ = decode_fields(desc.get("fields", []), raw, 0)
            out["fields"] = fields
        return out

    # -- ram ------------------------------------------------------------------------------------

    def _ram(self, start: bool) -> None:
        c = self.c
        mask = self.page - 1
        while True:
            at = c.pos
            hdr = c.be64("ram record")
            flags = hdr & mask
            addr = hdr & ~mask
            if flags & RAM_MEM_SIZE:
                self._mem_size(addr)
                flags &= ~RAM_MEM_SIZE
            if flags & (RAM_PAGE | RAM_ZERO):
                if flags & RAM_CONTINUE:
                    if self.block is None:
                        raise AnalyzeError(f"Ack, bad migration stream! (CONTINUE first, offset {at})")
                else:
                    name = c.name("block name")
                    block = self.a.blocks.get(name)
                    if block is None:
                        raise AnalyzeError(f"Can't find block {name} (offset {at})")
                    self.block = block
                block = self.block
                if addr >= block.size:
                    raise AnalyzeError(f"Illegal RAM offset {addr:x} in {block.name} (offset {at})")
                idx = addr // self.page
                if flags & RAM_PAGE:
                    data_at = c.pos
                    if c.pos + self.page > c.end:
                        c.take(self.page, "page data")
                    c.pos += self.page
                    block.page_records += 1
                    block.state[idx] = 1
                    if self.ram_dir is not None:
                        os.pwrite(self._fd(block), c.data[data_at : data_at + self.page], addr)
                else:
                    fill = c.u8("zero page fill byte")
                    block.zero_records += 1
                    was = block.state[idx]
                    block.state[idx] = 2
                    if self.ram_dir is not None and (was == 1 or fill):
                        os.pwrite(self._fd(block), bytes((fill,)) * self.page, addr)
                flags &= ~(RAM_PAGE | RAM_ZERO | RAM_CONTINUE)
            if flags & RAM_X_MIGD_RUN and flags & RAM_CONTINUE:
                self._page_run(addr, at)
                flags &= ~(RAM_X_MIGD_RUN | RAM_CONTINUE)
            if flags & RAM_MULTIFD_FLUSH:
                flags &= ~RAM_MULTIFD_FLUSH
            if flags & RAM_XBZRLE:
                raise AnalyzeError(f"XBZRLE pages are not supported (offset {at})")
            if flags & RAM_HOOK:
                raise AnalyzeError(f"RAM_SAVE_FLAG_HOOK (RDMA) is not supported (offset {at})")
            if flags & RAM_EOS:
                return
            if flags:
                raise AnalyzeError(f"Unknown combination of migration flags: 0x{flags:x} (offset {at})")

    def _page_run(self, addr: int, at: int) -> None:
        """[migd] A page run (FEATURE_PAGE_RUNS): a be32 count, then that many consecutive pages."""
        c, block = self.c, self.block
        if block is None:
            raise AnalyzeError(f"Ack, bad migration stream! (CONTINUE first, offset {at})")
        n = c.be32("page run length")
        if n == 0 or addr + n * self.page > block.size:
            raise AnalyzeError(f"Illegal page run of {n} pages at {addr:x} in {block.name} (offset {at})")
        size = n * self.page
        data_at = c.pos
        if c.pos + size > c.end:
            c.take(size, "page run data")
        c.pos += size
        block.page_records += n
        idx = addr // self.page
        block.state[idx : idx + n] = b"\x01" * n
        if self.ram_dir is not None:
            os.pwrite(self._fd(block), c.data[data_at : data_at + size], addr)

    def _mem_size(self, total: int) -> None:
        c = self.c
        remaining = total
        while remaining > 0:
            name = c.name("block name")
            length = c.be64("block length")
            if self.ignore_shared:
                c.be64("block address")
            if length == 0 or length > remaining or length > MAX_BLOCK:
                raise AnalyzeError(f"Invalid length 0x{length:x} of RAM block \"{name}\"")
            if name not in self.a.blocks:
                self.a.blocks[name] = BlockStats(name, length, state=bytearray(-(-length // self.page)))
                if self.ram_dir is not None:
                    os.ftruncate(self._fd(self.a.blocks[name]), length)
            remaining -= length

    def _fd(self, block: BlockStats) -> int:
        fd = self.fds.get(block.name)
        if fd is None:
            assert self.ram_dir is not None
            path = block_path(self.ram_dir, block.name)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            self.fds[block.name] = fd
        return fd


def block_path(ram_dir: Path, name: str) -> Path:
    """Where a block is extracted: its name under ``ram_dir`` (no leading '/', no '..')."""
    parts = [p for p in name.split("/") if p and p not in (".", "..")]
    if not parts:
        parts = ["_"]
    return ram_dir.joinpath(*parts)


# -- device fields ----------------------------------------------------------------------------------


def decode_fields(fields: list[dict[str, Any]], raw: bytes, pos: int) -> tuple[dict[str, Any], int]:
    """Field values by the description: integers as numbers, everything else as hex. Index entries
    of split arrays get ``name[index]``."""
    out: dict[str, Any] = {}
    for f in fields:
        name = str(f.get("name"))
        if "index" in f:
            name = f"{name}[{f['index']}]"
        count = int(f.get("array_len", 1))
        size = int(f.get("size", 0))
        values = []
        for _ in range(count):
            values.append(_decode_one(f, raw[pos : pos + size]))
            pos += size
        out[name] = values if "array_len" in f else values[0]
    return out, pos


def _decode_one(f: dict[str, Any], chunk: bytes) -> Any:
    ftype = str(f.get("type"))
    known = _INT_TYPES.get(ftype)
    if known is not None and known[0] == len(chunk):
        return int.from_bytes(chunk, "big", signed=known[1])
    if ftype == "int32 le" and len(chunk) == 4:
        return int.from_bytes(chunk, "little", signed=True)
    inner = f.get("struct") if ftype == "struct" else (f if ftype == "tmp" else None)
    if isinstance(inner, dict) and description_size(inner) == len(chunk):
        values, _ = decode_fields(inner.get("fields", []), chunk, 0)
        return values
    return chunk.hex()


# -- entry points -----------------------------------------------------------------------------------


def analyze(path: str | os.PathLike[str], extract_dir: str | os.PathLike[str] | None = None) -> Analysis:
    """Read the stream at ``path``; with ``extract_dir``, also write RAM blocks and device state."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise AnalyzeError(f"cannot open {p}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise AnalyzeError(f"{p}: {size} bytes is too short for a migration stream")
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as data:
            return _analyze(str(p), data, size, None if extract_dir is None else Path(extract_dir))
    finally:
        os.close(fd)


def _analyze(path: str, data: mmap.mmap, size: int, out_dir: Path | None) -> Analysis:
    a = Analysis(path, size)
    found = find_vmdesc(data, size)
    stop = size
    if found is not None:
        stop, a.vmdesc = found
    walker = _Walker(a, _Cursor(data, size), None if out_dir is None else out_dir / "ram")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    try:
        walker.run(stop)
    finally:
        walker.close()
    if out_dir is not None:
        extract(a, out_dir)
    return a


def extract(a: Analysis, out_dir: Path) -> None:
    """Device state and the description as JSON beside the RAM files."""
    (out_dir / "devices.json").write_text(json.dumps(a.devices, indent=1) + "\n")
    if a.vmdesc is not None:
        (out_dir / "vmdesc.json").write_text(json.dumps(a.vmdesc, indent=1) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(a.as_dict(), indent=1) + "\n")
