"""Device state: versioned field descriptions that serialise to QEMU-style bytes and describe themselves.

Every non-iterative device section is a flat list of big-endian fields (``uint32``, ``uint64`` or a
fixed-size ``buffer``), so its bytes and its vmdesc description (reference §3.4) always agree and
QEMU's ``analyze-migration.py`` can parse the stream. ``load`` reads exactly its fields, bounds every
length and raises ValueError for anything that does not fit this machine, before changing anything.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Protocol

from migd.bql import BQL
from migd.machine.block import Drive
from migd.machine.ram import RAMList
from migd.machine.runstate import RunState, RunStateMachine
from migd.machine.vcpu import VCPUSet
from migd.units import PAGE_SIZE

Value = int | bytes


class Reader(Protocol):
    def read(self, n: int) -> bytes: ...


class Machine(Protocol):
    """What the machine's own devices read and set (``machine.Machine`` is the one)."""

    runstate: RunStateMachine
    ram: RAMList
    vcpus: VCPUSet
    drives: list[Drive]
    state_before_migration: RunState | None
    incoming_runstate: RunState | None

    def vcpu_state(self, index: int) -> dict[str, Value]: ...

    def load_vcpu_state(self, index: int, spec: str, values: dict[str, Value]) -> None: ...


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # "uint32" | "uint64" | "buffer"
    size: int

    def pack(self, value: Value) -> bytes:
        if self.type == "uint32":
            return struct.pack(">I", int(value))
        if self.type == "uint64":
            return struct.pack(">Q", int(value))
        data = bytes(value) if not isinstance(value, int) else b""
        if len(data) > self.size:
            raise ValueError(f"field '{self.name}' holds {len(data)} bytes, at most {self.size}")
        return data.ljust(self.size, b"\0")

    def unpack(self, data: bytes) -> Value:
        number: int
        if self.type == "uint32":
            (number,) = struct.unpack(">I", data)
            return number
        if self.type == "uint64":
            (number,) = struct.unpack(">Q", data)
            return number
        return data


def u32(name: str) -> Field:
    return Field(name, "uint32", 4)


def u64(name: str) -> Field:
    return Field(name, "uint64", 8)


def buffer(name: str, size: int) -> Field:
    return Field(name, "buffer", size)


class VMStateDevice:
    """A device section: ``idstr``/``instance_id``/``version_id`` plus its fields."""

    idstr: str = ""
    vmsd_name: str = ""
    version_id: int = 1
    fields: tuple[Field, ...] = ()

    def __init__(self, instance_id: int = 0) -> None:
        self.instance_id = instance_id

    # subclasses: what to save, and how to apply what was loaded (after validation)
    def values(self) -> dict[str, Value]:
        raise NotImplementedError

    def apply(self, values: dict[str, Value]) -> None:
        raise NotImplementedError

    def save(self) -> bytes:
        vals = self.values()
        return b"".join(f.pack(vals[f.name]) for f in self.fields)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.fields)

    def load(self, reader: Reader, version_id: int) -> None:
        """Read exactly this device's fields and apply them; ValueError leaves the machine unchanged."""
        if not 1 <= version_id <= self.version_id:
            raise ValueError(f"{self.idstr}: unsupported version {version_id} (this side supports "
                             f"up to {self.version_id})")
        vals: dict[str, Value] = {}
        for f in self.fields:
            data = reader.read(f.size)
            if len(data) != f.size:
                raise ValueError(f"{self.idstr}: short read of field '{f.name}'")
            vals[f.name] = f.unpack(data)
        with BQL:  # read outside the lock (stream I/O), change the machine under it
            self.apply(vals)

    def describe(self) -> dict[str, Any]:
        return {"name": self.idstr, "instance_id": self.instance_id, "vmsd_name": self.vmsd_name,
                "version": self.version_id,
                "fields": [{"name": f.name, "type": f.type, "size": f.size} for f in self.fields]}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.idstr}/{self.instance_id} v{self.version_id}>"


def _mismatch(what: str, src: Value, dst: Value) -> ValueError:
    return ValueError(f"migd-machine: the source has {what} {src!r}, this machine has {dst!r}")


class GlobalStateDevice(VMStateDevice):
    """QEMU's ``globalstate``: the run state the source guest was in when the migration stopped it.

    The destination starts the guest after loading only if it was live there (a paused source stays
    paused on the destination); QEMU's layout: a uint32 length and a 100-byte NUL-padded name.
    """

    idstr = vmsd_name = "globalstate"
    NAME = 100
    fields = (u32("size"), buffer("runstate", NAME))

    def __init__(self, machine: Machine) -> None:
        super().__init__(0)
        self.machine = machine

    def values(self) -> dict[str, Value]:
        state = self.machine.state_before_migration or self.machine.runstate.state
        name = str(state).encode()
        return {"size": len(name) + 1, "runstate": name}

    def apply(self, values: dict[str, Value]) -> None:
        size = int(values["size"])
        if not 1 <= size <= self.NAME:
            raise ValueError(f"globalstate: run state name of {size} bytes")
        raw = bytes(values["runstate"])[:size].rstrip(b"\0")
        try:
            self.machine.incoming_runstate = RunState(raw.decode())
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"globalstate: unknown run state {raw!r}") from exc


class MachineDevice(VMStateDevice):
    """The machine's shape; a destination of a different shape refuses the stream."""

    idstr = vmsd_name = "migd-machine"
    fields = (u64("memory"), u32("smp"), u32("page_size"), u32("drives"))

    def __init__(self, machine: Machine) -> None:
        super().__init__(0)
        self.machine = machine

    def values(self) -> dict[str, Value]:
        m = self.machine
        ram0 = m.ram.get("ram0")
        return {"memory": ram0.size if ram0 else 0, "smp": len(m.vcpus),
                "page_size": ram0.page_size if ram0 else PAGE_SIZE, "drives": len(m.drives)}

    def apply(self, values: dict[str, Value]) -> None:
        mine = self.values()
        for name, label in (("memory", "memory"), ("smp", "smp"), ("page_size", "page size"),
                            ("drives", "drive count")):
            if values[name] != mine[name]:
                raise _mismatch(label, values[name], mine[name])


class VCPUDevice(VMStateDevice):
    """One vCPU's guest-visible state: its workload (spec, rng position, counter) and stall probe."""

    idstr = vmsd_name = "vcpu"
    SPEC = 128
    fields = (u32("index"), u32("spec_len"), buffer("spec", SPEC), u64("seq"), u64("counter"),
              u64("bytes_written"), u64("disk_bytes_written"), u64("largest_stall_us"),
              u64("last_slice_wall_ns"))

    def __init__(self, machine: Machine, index: int) -> None:
        super().__init__(index)
        self.machine = machine

    def values(self) -> dict[str, Value]:
        return self.machine.vcpu_state(self.instance_id)

    def apply(self, values: dict[str, Value]) -> None:
        if values["index"] != self.instance_id:
            raise ValueError(f"vcpu {self.instance_id}: stream holds state of vcpu {values['index']!r}")
        n = int(values["spec_len"])
        if n > self.SPEC:
            raise ValueError(f"vcpu {self.instance_id}: workload spec length {n} exceeds {self.SPEC}")
        spec_bytes = bytes(values["spec"])[:n]
        try:
            spec = spec_bytes.decode()
        except UnicodeDecodeError as exc:
            raise ValueError(f"vcpu {self.instance_id}: workload spec is not UTF-8") from exc
        self.machine.load_vcpu_state(self.instance_id, spec, values)


class DriveDevice(VMStateDevice):
    """A drive's state; its data is in the shared image, flushed before switch-over."""

    idstr = vmsd_name = "migd-drive"
    fields = (u64("size"), u64("bytes_written"), u64("flushes"))

    def __init__(self, machine: Machine, index: int) -> None:
        super().__init__(index)
        self.machine = machine

    def values(self) -> dict[str, Value]:
        d = self.machine.drives[self.instance_id]
        return {"size": d.size, "bytes_written": d.bytes_written, "flushes": d.flushes}

    def apply(self, values: dict[str, Value]) -> None:
        d = self.machine.drives[self.instance_id]
        if values["size"] != d.size:
            raise ValueError(f"migd-drive {self.instance_id}: the source image has {values['size']!r} bytes, "
                             f"'{d.file}' has {d.size}")
        d.bytes_written = int(values["bytes_written"])
        d.flushes = int(values["flushes"])
