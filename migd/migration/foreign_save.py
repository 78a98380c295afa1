"""Sending a held foreign machine on (to a QEMU started with the same machine options and -incoming).

The stream is the received one, re-framed: header, the configuration section as received, [the
return-path COMMANDs], the ``ram`` section under its received section id with the held blocks (block
list, then the pages by migd's RAM saver: every page once, PAGE or ZERO), [SWITCHOVER_START only if the
source sent it: older QEMUs do not know the command], every device section exactly as received (its
header fields, state bytes and footer), EOF, and the VMDESCRIPTION as received.

The live relay: a machine still arriving is sent on as it arrives. The setup waits for the incoming
block list; the pages the loader writes are dirty pages here (the loader marks them), so the usual
passes resend them; a policy's switch-over waits until the incoming side completed, and once it did
the switch-over comes at once: its final pass is what QEMU's last pass brought, then the devices as
received. The guest is stopped at its QEMU source meanwhile, so nothing here runs it or waits longer.
"""

from __future__ import annotations

import struct

from migd.machine.machine import Machine
from migd.migration.foreign import ForeignMachine
from migd.migration.format import (
    MAGIC,
    RAM_IDSTR,
    RAM_INSTANCE,
    RAM_VERSION,
    VERSION,
    Cmd,
    Section,
    command,
    section_footer,
    section_part,
    section_start,
)
from migd.migration.ram import RAMSaver
from migd.migration.savevm import SaveVM
from migd.migration.stats import MigrationStats
from migd.migration.stream import OutStream
from migd.threads import on_thread

__all__ = ["ForeignSaveVM", "savevm_for"]

RAM_WAIT = 30.0  # seconds a relay waits for the incoming block list (QEMU sends it right after the header)
IDLE_WAIT = 0.05  # seconds a relay with nothing to resend waits for new pages or the end (and syncs no faster)


class ForeignSaveVM(SaveVM):
    """SaveVM's interface over a ForeignMachine (migration thread)."""

    def __init__(self, held: ForeignMachine, stats: MigrationStats, return_path: bool) -> None:
        self.held = held
        self.machine = held
        self.stats = stats
        self.return_path = return_path
        self.features = 0  # the peer is a QEMU: none of migd's extensions (commit, heartbeats, checksums)
        self.peer_timeout_ms = 0
        self.ram = RAMSaver(held.ram, stats)
        self.sid = held.ram_section_id
        self.relaying = not held.loaded.is_set()  # sent on while it arrives: its end decides the switch-over

    def save_header(self, f: OutStream) -> None:
        """(migration thread) Magic, version, the configuration as received, [return path]."""
        f.put(struct.pack(">II", MAGIC, VERSION) + self.held.configuration)
        if self.return_path:
            f.put(command(Cmd.OPEN_RETURN_PATH))
            f.put(command(Cmd.PING, (1).to_bytes(4, "big")))

    def save_setup(self, f: OutStream) -> None:
        f.put(section_start(Section.START, self.sid, RAM_IDSTR, RAM_INSTANCE, RAM_VERSION))
        self.ram.save_setup(f)
        f.put(section_footer(self.sid))

    @on_thread("mig/src/main")
    def switchover_ready(self) -> bool:
        """(migration thread) Only once the incoming side delivered everything (EOF, device state)."""
        self.held.check()
        return self.held.loaded.is_set()

    @on_thread("mig/src/main")
    def switchover_due(self) -> bool:
        """(migration thread) A relay switches over as soon as its incoming side completed."""
        return self.relaying and self.switchover_ready()

    def save_iterate(self, f: OutStream) -> bool:
        if f.rate_limit_exceeded():
            return False
        f.put(section_part(Section.PART, self.sid))
        done = self.ram.save_iterate(f)
        f.put(section_footer(self.sid))
        f.flush()
        if done and self.relaying:  # nothing to resend: wait a little for pages or the end, not spin
            self.held.loaded.wait(IDLE_WAIT)
        return done

    def save_complete_ram(self, f: OutStream, switchover_start: bool = True) -> None:
        """(migration thread) [SWITCHOVER_START if the source sent one], END ram with the rest."""
        self.ram.guest_running = False
        if switchover_start and self.held.switchover_start:
            f.put(command(Cmd.SWITCHOVER_START))
        f.put(section_part(Section.END, self.sid))
        self.ram.save_complete(f)
        f.put(section_footer(self.sid))

    def save_complete_devices(self, f: OutStream) -> None:
        """(migration thread) The device sections exactly as received."""
        for dev in self.held.devices:
            f.put(section_start(Section.FULL, dev.section_id, dev.idstr, dev.instance_id, dev.version_id))
            f.put(dev.data)
            f.put(section_footer(dev.section_id))

    def save_eof(self, f: OutStream) -> None:
        """(migration thread) EOF, then the description as received (if there was one)."""
        f.put(bytes((Section.EOF,)))
        if self.held.vmdesc is not None:
            f.put(bytes((Section.VMDESCRIPTION,)) + struct.pack(">I", len(self.held.vmdesc)) + self.held.vmdesc)

    def vmdesc(self) -> bytes:
        return self.held.vmdesc or b""


def savevm_for(held: ForeignMachine | None, machine: Machine, stats: MigrationStats,
               return_path: bool, features: int = 0, peer_timeout_ms: int = 0) -> SaveVM:
    """(migration thread) The held foreign machine's SaveVM if the daemon holds one (QEMU's format,
    no migd features), else migd's, announcing ``features``."""
    if held is not None:
        held.wait_ram(RAM_WAIT)  # a relay: the incoming block list first (outside the big lock)
        return ForeignSaveVM(held, stats, return_path)
    return SaveVM(machine, stats, return_path, features, peer_timeout_ms)
