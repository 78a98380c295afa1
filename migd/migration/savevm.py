"""The whole stream: which sections go out in which order (source), and the loader (destination).

Source, as QEMU: header and configuration, [OPEN_RETURN_PATH + PING(1)], START of the live sections
(only ``ram``), one PART per iteration, [SWITCHOVER_START], END, the devices as FULL sections, EOF,
then the JSON description. Every section carries a footer.

[migd] Between migd peers the configuration carries a ``configuration/x-migd`` subsection announcing
migd's features (commit, heartbeats); the loader accepts migd's own COMMANDs only when they were
announced, and ``load_commit`` reads what follows the description: heartbeats until COMMIT.

Destination: ``load_stream`` checks everything it reads against this machine and raises
``StreamError`` with QEMU's words for anything wrong. It never allocates from a length it has not
bounded. It may leave RAM half written on failure; the caller only runs the machine on success.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

from migd.migration.format import (
    CHECKSUM_IDSTR,
    CHECKSUM_VERSION,
    CMD_LENGTHS,
    CMD_NAMES,
    CMD_X_MIGD_COMMIT,
    CMD_X_MIGD_HEARTBEAT,
    FEATURE_CHECKSUM,
    FEATURE_COMMIT,
    FEATURE_HEARTBEAT,
    FEATURE_PAGE_RUNS,
    MACHINE_TYPE,
    MAGIC,
    MAX_MACHINE_NAME,
    PAGE_SIZE,
    RAM_IDSTR,
    RAM_INSTANCE,
    RAM_VERSION,
    VERSION,
    VERSION_COMPAT,
    Cmd,
    Section,
    checksum_desc,
    checksum_record,
    command,
    config_subsection,
    config_subsection_desc,
    read_checksum,
    read_config_subsection,
    read_footer,
    read_idstr,
    section_footer,
    section_part,
    section_start,
    vmdesc_bytes,
)
from migd.migration.ram import RAMLoader, RAMSaver
from migd.migration.stats import MigrationStats
from migd.migration.stream import InStream, OutStream, StreamError

__all__ = ["SaveVM", "StreamError", "load_stream", "load_commit", "CommandHandler", "ConfigHandler"]

RAM_SECTION_ID = 0  # devices follow with 1, 2, ...
MAX_VMDESC_SKIP = 64 << 20
RUN_FILL = 64 << 10  # [migd] read-ahead of a stream with page runs: their pages are read into RAM directly

CommandHandler = Callable[[int, bytes], None]
ConfigHandler = Callable[[int, int], None]  # (features, peer timeout ms) the source announced


def _configuration(features: int, peer_timeout_ms: int) -> bytes:
    name = MACHINE_TYPE.encode()
    out = bytes((Section.CONFIGURATION,)) + struct.pack(">I", len(name)) + name
    if features:
        out += config_subsection(features, peer_timeout_ms)
    return out


def _configuration_desc(features: int) -> dict[str, Any]:
    desc: dict[str, Any] = {"vmsd_name": "configuration", "version": 1,
                            "fields": [{"name": "len", "type": "uint32", "size": 4},
                                       {"name": "name", "type": "buffer", "size": len(MACHINE_TYPE.encode())}]}
    if features:
        desc["subsections"] = [config_subsection_desc()]
    return desc


class SaveVM:
    """The source's view of the stream. Methods take the OutStream; the caller flushes between phases."""

    def __init__(self, machine: Any, stats: MigrationStats, return_path: bool, features: int = 0,
                 peer_timeout_ms: int = 0) -> None:
        self.machine = machine
        self.stats = stats
        self.return_path = return_path
        self.features = features  # [migd] announced in the configuration subsection (0: none written)
        self.peer_timeout_ms = peer_timeout_ms
        self.ram = RAMSaver(machine.ram, stats)
        self.ram.vcpus = getattr(machine, "vcpus", None)  # held paused while pages leave RAM (ram.py)

    @property
    def guest_running(self) -> bool:
        return self.ram.guest_running

    @guest_running.setter
    def guest_running(self, value: bool) -> None:
        self.ram.guest_running = value

    def save_header(self, f: OutStream) -> None:
        f.put(MAGIC.to_bytes(4, "big") + VERSION.to_bytes(4, "big")
              + _configuration(self.features, self.peer_timeout_ms))
        if self.features & FEATURE_CHECKSUM:
            f.start_digest()
        if self.return_path:
            f.put(command(Cmd.OPEN_RETURN_PATH))
            f.put(command(Cmd.PING, (1).to_bytes(4, "big")))

    def save_setup(self, f: OutStream) -> None:
        f.put(section_start(Section.START, RAM_SECTION_ID, RAM_IDSTR, RAM_INSTANCE, RAM_VERSION))
        self.ram.save_setup(f)
        f.put(section_footer(RAM_SECTION_ID))
        self._checksum(f)

    def _checksum(self, f: OutStream) -> None:
        """[migd] The checksum record of everything since the previous one (feature CHECKSUM)."""
        if self.features & FEATURE_CHECKSUM:
            f.put(checksum_record(*f.digest()))
            f.reset_digest()

    def pending_estimate(self) -> int:
        return self.ram.pending_estimate()

    def pending_exact(self) -> int:
        """Bitmap sync (takes the BQL) and the exact remaining bytes."""
        return self.ram.pending_exact()

    def unsynced_bytes(self) -> int:
        """Dirtied since the last sync, not yet in the migration bitmap (the policy's dirty-log peek)."""
        return self.ram.unsynced_bytes()

    def switchover_ready(self) -> bool:
        """(migration thread) Whether a switch-over the policy decides may happen now (a relay's
        waits for its incoming side; ``foreign_save.ForeignSaveVM``)."""
        return True

    def switchover_due(self) -> bool:
        """(migration thread) Whether the switch-over must happen now, whatever the policy says."""
        return False

    def save_iterate(self, f: OutStream) -> bool:
        """One PART of every live section (if the window has budget). True when all are done."""
        if f.rate_limit_exceeded():
            return False
        f.put(section_part(Section.PART, RAM_SECTION_ID))
        done = self.ram.save_iterate(f)
        f.put(section_footer(RAM_SECTION_ID))
        self._checksum(f)
        f.flush()
        return done

    def save_complete_ram(self, f: OutStream, switchover_start: bool = True) -> None:
        """[SWITCHOVER_START], then the END of every live section: final sync, all the rest."""
        self.ram.guest_running = False
        if switchover_start:
            f.put(command(Cmd.SWITCHOVER_START))
        f.put(section_part(Section.END, RAM_SECTION_ID))
        self.ram.save_complete(f)
        f.put(section_footer(RAM_SECTION_ID))
        self._checksum(f)

    def save_complete_devices(self, f: OutStream) -> None:
        """Every device as a FULL section. Call with the BQL held and the vCPUs stopped."""
        for i, dev in enumerate(self.machine.devices(), start=1):
            f.put(section_start(Section.FULL, RAM_SECTION_ID + i, dev.idstr, dev.instance_id, dev.version_id))
            f.put(dev.save())
            f.put(section_footer(RAM_SECTION_ID + i))
        self._checksum(f)

    def save_eof(self, f: OutStream) -> None:
        """EOF, then the VMDESCRIPTION (for analysis tools; the destination skips it)."""
        f.put(bytes((Section.EOF,)))
        f.put(vmdesc_bytes(self.vmdesc()))

    def save_complete_precopy(self, f: OutStream) -> None:
        self.save_complete_ram(f)
        self.save_complete_devices(f)
        self.save_eof(f)
        f.flush()

    def vmdesc(self) -> bytes:
        devices = [dev.describe() for dev in self.machine.devices()]
        if self.features & FEATURE_CHECKSUM:
            devices.append(checksum_desc())
        doc = {"configuration": _configuration_desc(self.features), "page_size": PAGE_SIZE,
               "devices": devices}
        return json.dumps(doc, separators=(",", ":")).encode()

    def cleanup(self) -> None:
        self.ram.cleanup()


# -- loading --------------------------------------------------------------------------------------


def load_stream(f: InStream, machine: Any, on_command: CommandHandler | None = None,
                on_config: ConfigHandler | None = None, ram: RAMLoader | None = None) -> int:
    """Load a whole stream into ``machine``; ``on_command(cmd, payload)`` sees the COMMANDs.

    ``on_config(features, peer_timeout_ms)`` hears what a migd source announced, before any section.
    ``ram`` is the caller's loader when it wants to read its page counters while the load runs.
    Returns the announced features (0 for a QEMU source or a stream without them).
    """
    features = _load_header(f)
    if on_config is not None:
        on_config(*features)
    announced = features[0]
    if announced & FEATURE_CHECKSUM:
        f.start_digest()
    if ram is None:
        ram = RAMLoader(machine.ram)
    if announced & FEATURE_PAGE_RUNS:  # [migd] page runs go straight into RAM: read little ahead of them
        ram.page_runs = True
        f.fill_max = RUN_FILL
    devices = {(d.idstr, d.instance_id): d for d in machine.devices()}
    live: dict[int, str] = {}  # section id -> idstr of START-ed live sections
    covered: list[str] = []  # what the current checksum segment holds, for the error text
    while True:
        segment = f.digest() if f.digesting else None
        kind = f.get_u8()
        if kind in (Section.START, Section.FULL):
            section_id = f.get_be32()
            idstr = read_idstr(f)
            instance_id = f.get_be32()
            version_id = f.get_be32()
            if idstr == CHECKSUM_IDSTR and kind == Section.FULL and segment is not None:
                if version_id > CHECKSUM_VERSION:
                    raise StreamError(f"savevm: unsupported version {version_id} for '{idstr}' "
                                      f"v{CHECKSUM_VERSION}")
                _verify(segment, read_checksum(f), f, covered, ram)
                f.reset_digest()
                covered.clear()
                continue
            covered.append(idstr)
            if (idstr, instance_id) == (RAM_IDSTR, RAM_INSTANCE):
                if kind != Section.START:
                    raise StreamError(f"Section '{idstr}' is iterative but arrived as a FULL section")
                if version_id > RAM_VERSION:
                    raise StreamError(f"savevm: unsupported version {version_id} for '{idstr}' v{RAM_VERSION}")
                ram.load(f, Section.START, version_id)
                live[section_id] = idstr
            elif (idstr, instance_id) in devices:
                dev = devices[(idstr, instance_id)]
                if kind != Section.FULL:
                    raise StreamError(f"Section '{idstr}' is not iterative but arrived as a START section")
                if version_id > dev.version_id:
                    raise StreamError(f"savevm: unsupported version {version_id} for '{idstr}' v{dev.version_id}")
                _load_device(f, dev, idstr, instance_id, version_id)
            else:
                raise StreamError(f"Unknown savevm section or instance '{idstr}' {instance_id}")
            read_footer(f, section_id, idstr)
        elif kind in (Section.PART, Section.END):
            section_id = f.get_be32()
            live_idstr = live.get(section_id)
            if live_idstr is None:
                raise StreamError(f"Unknown savevm section {section_id}")
            covered.append(live_idstr)
            ram.load(f, kind)
            read_footer(f, section_id, live_idstr)
        elif kind == Section.COMMAND:
            cmd = load_command(f, on_command, announced)
            if cmd == CMD_X_MIGD_COMMIT:
                raise StreamError("X_MIGD_COMMIT received before the end of the device state")
        elif kind == Section.EOF:
            break
        else:
            raise StreamError(f"Unknown savevm section type {kind}")
    _skip_vmdesc(f)
    return announced


def _verify(segment: tuple[int, int], record: tuple[int, int], f: InStream, covered: list[str],
            ram: RAMLoader) -> None:
    """[migd] A checksum record against what was really read: a mismatch names what it covered."""
    (digest, length), (want, want_length) = segment, record
    if (digest, length) == (want, want_length):
        return
    start = f.digest_start
    what = ", ".join(dict.fromkeys(covered)) or "no section"
    block = getattr(getattr(ram, "_block", None), "name", None)
    where = f"; RAM block '{block}'" if block and RAM_IDSTR in covered else ""
    raise StreamError(f"Checksum mismatch in the migration stream at offset {start}..{start + length} "
                      f"({what}{where}): xxh3 0x{digest:016x} over {length} bytes, the source sent "
                      f"0x{want:016x} over {want_length} bytes")


def load_commit(f: InStream, features: int, on_command: CommandHandler | None = None) -> None:
    """[migd] After the description: heartbeats (and nothing else) until the source's COMMIT.

    Raises ``StreamError`` on anything else, or when the stream ends first.
    """
    while True:
        kind = f.get_u8()
        if kind != Section.COMMAND:
            raise StreamError(f"Unexpected section type {kind} while waiting for X_MIGD_COMMIT")
        if load_command(f, on_command, features) == CMD_X_MIGD_COMMIT:
            return


def _load_header(f: InStream) -> tuple[int, int]:
    if f.get_be32() != MAGIC:
        raise StreamError("Not a migration stream")
    version = f.get_be32()
    if version == VERSION_COMPAT:
        raise StreamError("SaveVM v2 format is obsolete and don't work anymore")
    if version != VERSION:
        raise StreamError("Unsupported migration stream version")
    if f.get_u8() != Section.CONFIGURATION:
        raise StreamError("Configuration section missing")
    n = f.get_be32()
    if n > MAX_MACHINE_NAME:
        raise StreamError(f"Machine type name of {n} bytes is too long")
    name = f.read(n).decode(errors="replace")
    if name != MACHINE_TYPE:
        raise StreamError(f"Machine type received is '{name}' and local is '{MACHINE_TYPE}'")
    return read_config_subsection(f)


def _load_device(f: InStream, dev: Any, idstr: str, instance_id: int, version_id: int) -> None:
    try:
        dev.load(f, version_id)
    except StreamError:
        raise
    except Exception as exc:  # a device refusing the state it was given
        raise StreamError(f"error while loading state for instance 0x{instance_id:x} of device "
                          f"'{idstr}': {exc}") from None


def load_command(f: InStream, on_command: CommandHandler | None, features: int = 0) -> int:
    """One COMMAND section (after its type byte): checked, handed to ``on_command``; its number.
    migd's own commands are accepted only when ``features`` announced them (never from a QEMU)."""
    cmd = f.get_be16()
    length = f.get_be16()
    expected = CMD_LENGTHS.get(cmd)
    name = CMD_NAMES.get(cmd, f"0x{cmd:x}")
    if cmd == CMD_X_MIGD_HEARTBEAT and not features & FEATURE_HEARTBEAT:
        expected = None
    if cmd == CMD_X_MIGD_COMMIT and not features & FEATURE_COMMIT:
        expected = None
    if expected is None:
        raise StreamError(f"VM_COMMAND {name} is not supported by migd")
    if length != expected:
        raise StreamError(f"{name} received with bad length - expecting {expected}, received {length}")
    payload = f.read(length)
    if on_command is not None:
        on_command(cmd, payload)
    return cmd


def _skip_vmdesc(f: InStream) -> None:
    """QEMU reads and discards the description; its absence is only worth a warning."""
    try:
        if f.at_eof() or f.get_u8() != Section.VMDESCRIPTION:
            return
        n = f.get_be32()
        if n <= MAX_VMDESC_SKIP:
            f.skip(n)
    except StreamError:
        return  # a truncated description changes nothing that was loaded
