"""A machine migd does not emulate, received and held as data (a QEMU guest arriving on a migd).

A migd started with ``--incoming`` and no machine options (``-m``, ``--smp``, ``--workload``,
``--mem-path``, ``--drive``) does not insist on its own machine type: when the configuration names
another one (``pc-i440fx-7.2``...), the stream is loaded into a ``ForeignMachine`` instead of migd's
machine. Its RAM blocks are created with the names and sizes of the ``ram`` section's block list
(``pc.ram``, ``pc.bios``, ``/rom@etc/acpi/tables``...) and filled from the ram v4 records by migd's
own loader; every device section (FULL) is kept byte for byte with its header fields, so the machine
can be shown and sent on unchanged.

Device sections have no length on the wire. While the stream arrives, a section ends at the first
footer ``0x7e be32(section id)`` followed by something that can follow a section (a section header
with a printable idstr, a live section's PART/END, a known COMMAND, EOF then the VMDESCRIPTION or
the end); once the VMDESCRIPTION
(after EOF) is read, every described section's size (fields and subsections) must equal what was cut,
or the load fails. Any other live section than ``ram`` (block migration, dirty bitmaps) and postcopy
are refused: their content could not be held faithfully.

The live relay (docs/INTEROP.md): the ``ForeignMachine`` exists from the header on (``on_machine``),
so a ``migrate`` may send it on while it is still arriving. ``ram_ready`` says the block list was
created, ``loaded`` that the incoming side delivered everything (set by the destination once its
load completed), ``failure`` why it never will. The loader marks the pages it writes in the blocks'
dirty bitmaps while an outgoing migration logs them, so they are resent.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from migd.analyze import described_size
from migd.machine.ram import RAMList
from migd.migration.format import (
    CMD_LENGTHS,
    MACHINE_TYPE,
    MAGIC,
    MAX_MACHINE_NAME,
    MAX_VMDESC,
    PAGE_BITS,
    RAM_IDSTR,
    RAM_INSTANCE,
    RAM_VERSION,
    VERSION,
    Cmd,
    Section,
    read_footer,
    read_idstr,
)
from migd.migration.ram import RAMLoader
from migd.migration.savevm import CommandHandler, load_command
from migd.migration.stream import IN_BUF, InStream, StreamError
from migd.threads import any_thread, off_loop

__all__ = ["DeviceSection", "ForeignMachine", "is_foreign", "load_foreign", "may_hold_foreign", "peek_machine_type"]

MACHINE_OPTIONS = frozenset({"memory", "smp", "workload", "mem_path", "drives"})
_FIRST_LOOK = 256  # bytes examined first for a device section's footer; doubled up to the stream buffer


def may_hold_foreign(machine_config: Any) -> bool:
    """True when the daemon was given no machine options, so the stream decides what the machine is."""
    given = getattr(machine_config, "model_fields_set", None)
    return given is not None and not (set(given) & MACHINE_OPTIONS)


def is_foreign(f: InStream) -> bool:
    """(incoming thread) Whether the stream's configuration names a machine type other than migd's."""
    name = peek_machine_type(f)
    return name is not None and name != MACHINE_TYPE


def peek_machine_type(f: InStream) -> str | None:
    """The machine type the stream's configuration names, without consuming anything; None when the
    header is not a well-formed one (the normal loader then reports what is wrong)."""
    try:
        head = bytes(f.peek(13)[:13])
        magic, version, kind, n = struct.unpack(">IIBI", head)
        if magic != MAGIC or version != VERSION or kind != Section.CONFIGURATION or n > MAX_MACHINE_NAME:
            return None
        return bytes(f.peek(13 + n)[13 : 13 + n]).decode(errors="replace")
    except StreamError:
        return None


@dataclass
class DeviceSection:
    """One FULL section as received: its header fields and its state bytes (footer excluded)."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    data: bytes

    def describe(self) -> dict[str, Any]:
        return {"section-id": self.section_id, "name": self.idstr, "instance-id": self.instance_id,
                "version": self.version_id, "size": len(self.data)}


@dataclass
class ForeignMachine:
    """Everything of a foreign machine's stream that is needed to show it or send it on."""

    machine_type: str
    configuration: bytes  # the CONFIGURATION section as received, from its type byte on
    ram: RAMList = field(default_factory=RAMList)
    ram_section_id: int = 0
    devices: list[DeviceSection] = field(default_factory=list)
    vmdesc: bytes | None = None  # the VMDESCRIPTION's JSON as received
    switchover_start: bool = False  # the source sent SWITCHOVER_START (QEMU >= 9.x): send it on too
    ram_ready: threading.Event = field(default_factory=threading.Event)  # the block list was created
    loaded: threading.Event = field(default_factory=threading.Event)  # the incoming load completed
    failure: str | None = None  # why the incoming load failed (then it never completes)

    def describe(self) -> dict[str, Any]:
        return {"machine-type": self.machine_type,
                "ram-blocks": [{"name": b.name, "size": b.size} for b in self.ram.blocks()],
                "devices": [d.describe() for d in self.devices]}

    @any_thread
    def mark_loaded(self) -> None:
        """The incoming side delivered everything: a relay's outgoing migration may complete."""
        self.loaded.set()

    @any_thread
    def mark_failed(self, desc: str) -> None:
        """The incoming load failed: a relay's outgoing migration fails too."""
        self.failure = desc
        self.ram_ready.set()  # wake a waiter; it then finds the failure

    @off_loop
    def wait_ram(self, timeout: float, given_up: Callable[[], bool] = lambda: False) -> None:
        """Wait until the block list was created; StreamError when the load failed or it timed out.
        Returns early (within 0.1 s) once ``given_up()`` says the waiting migration was cancelled."""
        deadline = time.monotonic() + timeout
        while not self.ram_ready.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if given_up():
                return
            if time.monotonic() >= deadline:
                raise StreamError(f"The incoming migration sent no RAM block list within {timeout:g} s")
        self.check()

    @any_thread
    def check(self) -> None:
        """StreamError with the incoming side's reason once its load failed."""
        if self.failure is not None:
            raise StreamError(f"The incoming migration failed: {self.failure}")


class _ForeignRAMLoader(RAMLoader):
    """migd's ram loader, except that the START's block list creates the blocks it names."""

    CREATE_ON_START = True


def load_foreign(f: InStream, on_command: CommandHandler | None = None,
                 on_machine: Callable[[ForeignMachine], None] | None = None) -> ForeignMachine:
    """Load a whole stream of another machine type into a new ForeignMachine (incoming thread);
    ``on_machine`` is handed the machine as soon as the header named its type (the live relay)."""
    machine = _load_header(f)
    if on_machine is not None:
        on_machine(machine)
    ram = _ForeignRAMLoader(machine.ram)
    live: dict[int, str] = {}
    while True:
        kind = f.get_u8()
        if kind in (Section.START, Section.FULL):
            section_id = f.get_be32()
            idstr = read_idstr(f)
            instance_id = f.get_be32()
            version_id = f.get_be32()
            if kind == Section.START:
                if (idstr, instance_id) != (RAM_IDSTR, RAM_INSTANCE):
                    raise StreamError(f"Live section '{idstr}' {instance_id} is not supported by migd "
                                      "(only the ram section can be held)")
                if version_id != RAM_VERSION:
                    raise StreamError(f"savevm: unsupported version {version_id} for '{idstr}' v{RAM_VERSION}")
                ram.load(f, Section.START, version_id)
                live[section_id] = idstr
                machine.ram_section_id = section_id
                machine.ram_ready.set()
            else:
                data = _read_device_state(f, section_id, idstr, live)
                machine.devices.append(DeviceSection(section_id, idstr, instance_id, version_id, data))
            read_footer(f, section_id, idstr)
        elif kind in (Section.PART, Section.END):
            section_id = f.get_be32()
            name = live.get(section_id)
            if name is None:
                raise StreamError(f"Unknown savevm section {section_id}")
            ram.load(f, kind)
            read_footer(f, section_id, name)
        elif kind == Section.COMMAND:
            if load_command(f, on_command) == Cmd.SWITCHOVER_START:
                machine.switchover_start = True
        elif kind == Section.EOF:
            break
        else:
            raise StreamError(f"Unknown savevm section type {kind}")
    if not live:
        raise StreamError("The stream holds no ram section")
    machine.vmdesc = _read_vmdesc(f)
    _check_devices(machine)
    return machine


def _load_header(f: InStream) -> ForeignMachine:
    if f.get_be32() != MAGIC:
        raise StreamError("Not a migration stream")
    if f.get_be32() != VERSION:
        raise StreamError("Unsupported migration stream version")
    if f.get_u8() != Section.CONFIGURATION:
        raise StreamError("Configuration section missing")
    n = f.get_be32()
    if n > MAX_MACHINE_NAME:
        raise StreamError(f"Machine type name of {n} bytes is too long")
    raw_name = f.read(n)
    name = raw_name.decode(errors="replace")
    if name == MACHINE_TYPE:
        raise StreamError(f"Machine type '{name}' is migd's own, not a foreign one")
    parts = [bytes((Section.CONFIGURATION,)), struct.pack(">I", n), raw_name]
    while f.peek(1)[0] == Section.SUBSECTION:
        parts.append(_config_subsection(f))
    return ForeignMachine(name, b"".join(parts))


def _config_subsection(f: InStream) -> bytes:
    """One configuration subsection, checked (page size, capabilities), returned as received."""
    start = f.get_u8()
    name = read_idstr(f)
    version = f.get_be32()
    head = bytes((start, len(name.encode()))) + name.encode() + struct.pack(">I", version)
    if name == "configuration/target-page-bits":
        bits = f.get_be32()
        if bits != PAGE_BITS:
            raise StreamError(f"Received TARGET_PAGE_BITS is {bits} but local is {PAGE_BITS}")
        return head + struct.pack(">I", bits)
    if name == "configuration/capabilities":
        count = f.get_be32()
        if count > 64:
            raise StreamError(f"Too many capabilities ({count}) in the configuration")
        caps = [read_idstr(f) for _ in range(count)]
        if caps:  # x-ignore-shared changes the block list's layout; nothing else is validated today
            raise StreamError(f"Capabilities {', '.join(caps)} of the source are not supported by migd")
        return head + struct.pack(">I", count)
    if name == "configuration/uuid":
        return head + f.read(16)
    raise StreamError(f"Unknown configuration subsection '{name}'")


def _read_device_state(f: InStream, section_id: int, idstr: str, live: dict[int, str]) -> bytes:
    """A FULL section's state: everything up to the first footer for ``section_id`` that is followed
    by a plausible next section (see ``_plausible_next``). The VMDESCRIPTION checks the cut later."""
    pattern = bytes((Section.FOOTER,)) + struct.pack(">I", section_id)
    want = _FIRST_LOOK
    search_from = 0
    while True:
        try:
            view = f.peek(want)
        except StreamError:  # the stream ends within ``want``: all that is left is buffered
            if not f.available:
                raise
            view = f.peek(f.available)
        chunk = bytes(view[:want])
        at_end = len(chunk) < want
        pos = chunk.find(pattern, search_from)
        while pos >= 0:
            verdict = _plausible_next(chunk, pos + len(pattern), live, at_end)
            if verdict is None:
                break  # the bytes after this footer are not here yet
            if verdict:
                f.skip(pos)
                return chunk[:pos]
            pos = chunk.find(pattern, pos + 1)
        search_from = pos if pos >= 0 else max(0, len(chunk) - len(pattern))
        if at_end:
            raise StreamError(f"Missing section footer for {idstr}: the stream ends at offset "
                              f"{f.consumed + len(chunk)} without one (truncated or corrupt)")
        if want >= IN_BUF:
            raise StreamError(f"Device state of '{idstr}' is larger than {IN_BUF} bytes")
        want = min(IN_BUF, want * 2)


def _plausible_next(chunk: bytes, i: int, live: dict[int, str], at_end: bool) -> bool | None:
    """Whether ``chunk[i:]`` can start what follows a section: another section with a printable idstr
    or a live section's id, a known COMMAND, or EOF followed by the VMDESCRIPTION or the end. None
    when more bytes are needed to tell."""

    more: bool | None = False if at_end else None  # the answer when the bytes run out
    if i >= len(chunk):
        return more
    kind = chunk[i]
    if kind == Section.EOF:
        if i + 1 >= len(chunk):
            return True if at_end else None
        return chunk[i + 1] == Section.VMDESCRIPTION
    if kind in (Section.START, Section.FULL):
        if i + 6 > len(chunk):
            return more
        n = chunk[i + 5]
        if i + 6 + n + 8 > len(chunk):
            return more
        name = chunk[i + 6 : i + 6 + n]
        return n > 0 and all(0x20 <= b < 0x7F for b in name)
    if kind in (Section.PART, Section.END):
        if i + 5 > len(chunk):
            return more
        return int.from_bytes(chunk[i + 1 : i + 5], "big") in live
    if kind == Section.COMMAND:
        if i + 5 > len(chunk):
            return more
        cmd, length = struct.unpack(">HH", chunk[i + 1 : i + 5])
        return bool(CMD_LENGTHS.get(cmd) == length)
    return False


def _read_vmdesc(f: InStream) -> bytes | None:
    """The VMDESCRIPTION's JSON; None when the stream ends at EOF or within the description (QEMU's
    destination discards it and only warns), or when it is something else."""
    try:
        if f.at_eof() or f.peek(1)[0] != Section.VMDESCRIPTION:
            return None
        f.skip(1)
        n = f.get_be32()
        return f.read(n) if n <= MAX_VMDESC else None
    except StreamError:
        return None


def _check_devices(machine: ForeignMachine) -> None:
    """Every device the description knows must have exactly the size it describes. A description
    that is not JSON is dropped (the cuts then stand unproven, as without one)."""
    if machine.vmdesc is None:
        return
    try:
        doc = json.loads(machine.vmdesc)
    except (ValueError, UnicodeDecodeError):  # QEMU's destination ignores it: so does the loader
        machine.vmdesc = None
        return
    described = {(d.get("name"), d.get("instance_id")): d for d in doc.get("devices", [])} \
        if isinstance(doc, dict) else {}
    for dev in machine.devices:
        desc = described.get((dev.idstr, dev.instance_id))
        if desc is None:
            continue
        size = described_size(desc, dev.data, 0, len(dev.data))
        if size != len(dev.data):
            says = "more" if size is None else str(size)
            raise StreamError(f"Device state of '{dev.idstr}' {dev.instance_id}: {len(dev.data)} bytes in the "
                              f"stream, its description says {says}")
