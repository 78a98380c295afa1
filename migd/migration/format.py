"""QEMU's migration stream, version 3: the constants and the framing of sections and commands.

Everything here is a fact of the wire format (see docs/FORMAT.md); the logic that produces and consumes
sections lives in savevm.py (whole stream) and ram.py (the ``ram`` section).
"""

from __future__ import annotations

import struct
from enum import IntEnum

from migd.migration.stream import InStream, OutStream, StreamError
from migd.units import PAGE_SIZE as PAGE_SIZE  # re-exported: a fact of the wire format too

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3
VERSION_COMPAT = 2  # obsolete, rejected with its own message

MACHINE_TYPE = "migd"
PAGE_BITS = 12
MAX_IDSTR = 255  # u8 length on the wire (QEMU's analysis script copes with <= 127)
MAX_MACHINE_NAME = 256
MAX_VMDESC = 10 << 20  # the analysis script only looks at the last 10 MiB


class Section(IntEnum):
    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class Cmd(IntEnum):
    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


# [migd] commands of migd's own, far above QEMU's numbers; sent only to a destination that accepted
# the feature (docs/FORMAT.md §1.1)
CMD_X_MIGD_HEARTBEAT = 0x4D00  # the source is alive (it sent nothing else for about a second)
CMD_X_MIGD_COMMIT = 0x4D01  # the source committed: the destination may run the guest

# commands migd understands, with their fixed payload length
CMD_LENGTHS: dict[int, int] = {Cmd.OPEN_RETURN_PATH: 0, Cmd.PING: 4, Cmd.SWITCHOVER_START: 0,
                               CMD_X_MIGD_HEARTBEAT: 0, CMD_X_MIGD_COMMIT: 0}
CMD_NAMES: dict[int, str] = {c.value: c.name for c in Cmd}
CMD_NAMES.update({CMD_X_MIGD_HEARTBEAT: "X_MIGD_HEARTBEAT", CMD_X_MIGD_COMMIT: "X_MIGD_COMMIT"})
MIGD_COMMANDS = frozenset({CMD_X_MIGD_HEARTBEAT, CMD_X_MIGD_COMMIT})

# [migd] features a migd source announces in its configuration subsection ``configuration/x-migd``
# and a migd destination accepts on the return path (MSG_X_MIGD_FEATURES)
FEATURE_COMMIT = 0x1  # LOADED, then COMMIT: the destination runs only after the source committed
FEATURE_HEARTBEAT = 0x2  # heartbeats both ways; each side gives up on a silent peer
FEATURE_CHECKSUM = 0x4  # an xxh3-64 checksum record after every section (file: saves too)
FEATURE_PAGE_RUNS = 0x8  # RAM_X_MIGD_RUN records: consecutive pages after one header (zero-copy receive)
FEATURE_LOAD_PACE = 0x10  # the destination reports its load pace on the return path (X_MIGD_LOAD_PACE)
FEATURES_SUPPORTED = (FEATURE_COMMIT | FEATURE_HEARTBEAT | FEATURE_CHECKSUM | FEATURE_PAGE_RUNS
                      | FEATURE_LOAD_PACE)
CONFIG_SUBSECTION = "configuration/x-migd"
CONFIG_SUBSECTION_VERSION = 1
_CONFIG_FIELDS = struct.Struct(">II")  # features, peer timeout in ms


# RAM record flags: the low bits (below the page size) of each record's be64 header
RAM_FULL = 0x01  # obsolete
RAM_ZERO = 0x02
RAM_MEM_SIZE = 0x04
RAM_PAGE = 0x08
RAM_EOS = 0x10
RAM_CONTINUE = 0x20
RAM_XBZRLE = 0x40
RAM_HOOK = 0x80
RAM_MULTIFD_FLUSH = 0x200
RAM_X_MIGD_RUN = 0x400  # [migd] with CONTINUE: be32 count n, then n consecutive pages (FEATURE_PAGE_RUNS)
RAM_FLAG_MASK = PAGE_SIZE - 1

RAM_IDSTR = "ram"
RAM_INSTANCE = 0
RAM_VERSION = 4

PAGE_RECORD = 8 + PAGE_SIZE  # header + data, with CONTINUE
ZERO_RECORD = 8 + 1  # header + the zero byte, with CONTINUE
RUN_HEADER = 8 + 4  # [migd] a page run's header and count, with CONTINUE
MAX_RUN = 1 << 16  # [migd] pages in one run record, at most (256 MiB)

_SECTION_FULL = struct.Struct(">BI")
_BE32 = struct.Struct(">I")


def idstr_bytes(name: str) -> bytes:
    """``u8 len, idstr``: the way block names and section ids are written."""
    raw = name.encode()
    if not raw or len(raw) > MAX_IDSTR:
        raise ValueError(f"idstr '{name}' must be 1..{MAX_IDSTR} bytes")
    return bytes((len(raw),)) + raw


def section_start(kind: int, section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    """START/FULL header: type, section id, idstr, instance, version."""
    return (_SECTION_FULL.pack(kind, section_id) + idstr_bytes(idstr)
            + _BE32.pack(instance_id) + _BE32.pack(version_id))


def section_part(kind: int, section_id: int) -> bytes:
    """PART/END header: type, section id."""
    return _SECTION_FULL.pack(kind, section_id)


def section_footer(section_id: int) -> bytes:
    return _SECTION_FULL.pack(Section.FOOTER, section_id)


def command(cmd: int, payload: bytes = b"") -> bytes:
    return bytes((Section.COMMAND,)) + struct.pack(">HH", cmd, len(payload)) + payload


def config_subsection(features: int, peer_timeout_ms: int) -> bytes:
    """[migd] ``0x05, str8 name, be32 version, be32 features, be32 peer-timeout-ms`` (QEMU's layout)."""
    return (bytes((Section.SUBSECTION,)) + idstr_bytes(CONFIG_SUBSECTION)
            + _BE32.pack(CONFIG_SUBSECTION_VERSION) + _CONFIG_FIELDS.pack(features, peer_timeout_ms))


def config_subsection_desc() -> dict[str, object]:
    """The subsection's VMDESCRIPTION entry, so QEMU's analysis script can walk over it."""
    return {"vmsd_name": CONFIG_SUBSECTION, "version": CONFIG_SUBSECTION_VERSION,
            "fields": [{"name": "features", "type": "uint32", "size": 4},
                       {"name": "peer-timeout-ms", "type": "uint32", "size": 4}]}


def read_config_subsection(f: InStream) -> tuple[int, int]:
    """After the machine type: an optional ``configuration/x-migd`` subsection -> (features, timeout ms).

    (0, 0) when there is none (a QEMU source, an older migd, a file: save without features).
    """
    if f.at_eof() or f.peek(1)[0] != Section.SUBSECTION:
        return 0, 0
    f.get_u8()
    name = read_idstr(f)
    if name != CONFIG_SUBSECTION:
        raise StreamError(f"Unknown configuration subsection '{name}'")
    version = f.get_be32()
    if version > CONFIG_SUBSECTION_VERSION:
        raise StreamError(f"savevm: unsupported version {version} for '{name}' v{CONFIG_SUBSECTION_VERSION}")
    features = f.get_be32()
    timeout_ms = f.get_be32()
    return features, timeout_ms


# [migd] checksum records: a FULL section of a pseudo-device, described in the VMDESCRIPTION so QEMU's
# analysis script reads them as device state (docs/FORMAT.md §1.2)
CHECKSUM_IDSTR = "x-migd/checksum"
CHECKSUM_SECTION_ID = 0x7FFFFFFF
CHECKSUM_VERSION = 1
_CHECKSUM = struct.Struct(">QQ")  # xxh3-64 of the segment, its length in bytes


def checksum_record(digest: int, length: int) -> bytes:
    """FULL x-migd/checksum: ``be64 xxh3-64, be64 length`` of the bytes since the previous record."""
    return (section_start(Section.FULL, CHECKSUM_SECTION_ID, CHECKSUM_IDSTR, 0, CHECKSUM_VERSION)
            + _CHECKSUM.pack(digest, length) + section_footer(CHECKSUM_SECTION_ID))


def checksum_desc() -> dict[str, object]:
    return {"name": CHECKSUM_IDSTR, "instance_id": 0, "vmsd_name": CHECKSUM_IDSTR,
            "version": CHECKSUM_VERSION,
            "fields": [{"name": "xxh3-64", "type": "uint64", "size": 8},
                       {"name": "length", "type": "uint64", "size": 8}]}


def read_checksum(f: InStream) -> tuple[int, int]:
    """The record's payload and footer (after its section header)."""
    digest, length = _CHECKSUM.unpack(f.read(_CHECKSUM.size))
    read_footer(f, CHECKSUM_SECTION_ID, CHECKSUM_IDSTR)
    return digest, length


def put_header(f: OutStream) -> None:
    f.put_be32(MAGIC)
    f.put_be32(VERSION)


def read_idstr(f: InStream) -> str:
    """``u8 len, bytes`` as text; invalid UTF-8 is a stream error, not a crash."""
    n = f.get_u8()
    raw = f.read(n)
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise StreamError(f"Invalid name in migration stream: {raw!r}") from None


def read_footer(f: InStream, section_id: int, idstr: str) -> None:
    """The footer that follows every section must name the section it closes."""
    if f.get_u8() != Section.FOOTER:
        raise StreamError(f"Missing section footer for {idstr}")
    read_id = f.get_be32()
    if read_id != section_id:
        raise StreamError(f"Mismatched section id in footer for {idstr} -- read 0x{read_id:x} "
                          f"expected 0x{section_id:x}")


def vmdesc_bytes(doc: bytes) -> bytes:
    """VMDESCRIPTION section for a JSON document, padded so no byte of its length is ``{`` (0x7b).

    QEMU's analysis script finds the JSON as the first ``{`` after the last NUL of the file's tail; a
    0x7b inside the be32 length would be taken for it.
    """
    if b"\0" in doc:
        raise ValueError("the vmdesc JSON must not contain NUL bytes")
    n = len(doc)
    while 0x7B in (raw := _BE32.pack(n)):
        shift = 8 * (3 - raw.index(0x7B))  # bump the highest 0x7b byte, clear the ones below it
        n = ((n >> shift) + 1) << shift
    doc += b" " * (n - len(doc))
    return bytes((Section.VMDESCRIPTION,)) + _BE32.pack(len(doc)) + doc
