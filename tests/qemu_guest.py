"""A real QEMU for interop tests: a tiny guest built from assembly, a QEMU process, its QMP, its RAM.

The guest is a 16-bit boot sector (assembled with binutils' ``as``/``ld`` into a flat 512-byte binary
ending in 0x55AA) on a read-only floppy image. It writes a signature at ``GUEST_BASE``, then loops:
increment the 32-bit counter at ``COUNTER_ADDR``, fill ``DIRTY_START``..``DIRTY_END`` (320 KiB) with the
counter, ``hlt`` until the next timer tick (the BIOS's 18.2 Hz PIT). So it dirties ~6 MB/s of RAM,
its counter shows it is running, and it stays nearly idle on a shared machine.

``Qemu(workdir, name, *extra)`` starts ``qemu-system-x86_64 -M pc -m 32 -nodefaults -display none``
with that floppy and QMP on a unix socket (KVM where the guest boots under it, else TCG); ``cmd``,
``wait_event``, ``pmemsave``, ``counter()``, ``wait_running()``. ``require_qemu()`` skips a test
with the reason when QEMU or binutils are absent.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import MigdError, wait_for
from qemu.qmp.legacy import QEMUMonitorProtocol

QEMU = "qemu-system-x86_64"
GUEST_BASE = 0x8000  # signature (8 bytes), then the counter
SIGNATURE = b"MIGDGST1"
COUNTER_ADDR = GUEST_BASE + 8
DIRTY_START = 0x10000
DIRTY_END = 0x60000  # 5 segments of 64 KiB
FIRMWARE_AREA = (0xA0000, 0x100000)  # rewritten by QEMU itself on a destination: left out of compares
FLOPPY_SIZE = 1474560
MEMORY = 32 << 20

BOOT_ASM = f"""
    .code16
    .text
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7c00, %sp
    cld
    movl $0x{int.from_bytes(SIGNATURE[:4], 'little'):08x}, ({GUEST_BASE:#x})
    movl $0x{int.from_bytes(SIGNATURE[4:], 'little'):08x}, ({GUEST_BASE + 4:#x})
    movl $0, ({COUNTER_ADDR:#x})
    sti
loop:
    incl ({COUNTER_ADDR:#x})
    movl ({COUNTER_ADDR:#x}), %eax
    mov ${DIRTY_START >> 4:#x}, %bx
fill:
    mov %bx, %es
    xor %di, %di
    mov $0x4000, %cx
    rep stosl
    add $0x1000, %bx
    cmp ${DIRTY_END >> 4:#x}, %bx
    jb fill
    hlt
    jmp loop
    .org 510
    .word 0xaa55
"""


def missing_tools() -> str | None:
    """Why the QEMU tests cannot run here, or None."""
    for tool in (QEMU, "as", "ld"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install qemu-system-x86 binutils)"
    return None


def require_qemu() -> None:
    reason = missing_tools()
    if reason:
        pytest.skip(reason)


def kvm_openable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


_accel: str | None = None
KVM_PROBE_SECONDS = 5.0


def choose_accel(workdir: Path, floppy: Path) -> str:
    """``kvm`` where /dev/kvm opens *and* the guest boots under it, else ``tcg`` (cached per process).

    Some hosts expose a /dev/kvm on which SeaBIOS never gets past "Booting from Floppy..." (seen on
    this project's CI machine), so opening the device is not proof enough. ``MIGD_QEMU_ACCEL`` forces
    a choice.
    """
    global _accel
    forced = os.environ.get("MIGD_QEMU_ACCEL")
    if forced:
        return forced
    if _accel is None:
        _accel = "tcg"
        if kvm_openable():
            probe = Qemu(workdir, "kvm-probe", floppy, accel="kvm")
            try:
                wait_for(probe.signature_present, KVM_PROBE_SECONDS, interval=0.1, what="a KVM boot")
                _accel = "kvm"
            except MigdError:
                pass
            finally:
                probe.kill()
    return _accel


def qemu_version() -> str:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.splitlines()[0]


def build_floppy(workdir: Path) -> Path:
    """Assemble and link the boot sector; a 1.44 MB floppy image holding it."""
    workdir.mkdir(parents=True, exist_ok=True)
    src, obj, binary = workdir / "boot.S", workdir / "boot.o", workdir / "boot.bin"
    src.write_text(BOOT_ASM)
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True, capture_output=True, timeout=60)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-e", "_start",
                    "-o", str(binary), str(obj)], check=True, capture_output=True, timeout=60)
    code = binary.read_bytes()
    if len(code) != 512 or code[510:] != b"\x55\xaa":
        raise AssertionError(f"boot sector is {len(code)} bytes, ends {code[510:]!r}")
    image = workdir / "guest.img"
    image.write_bytes(code + bytes(FLOPPY_SIZE - 512))
    image.chmod(0o444)
    return image


class Qemu:
    """One qemu-system-x86_64 with the test guest's floppy and a negotiated QMP client."""

    def __init__(self, workdir: Path, name: str, floppy: Path, *extra: str, accel: str | None = None,
                 timeout: float = 30) -> None:
        self.workdir = Path(workdir)
        self.name = name
        self.qmp_path = self.workdir / f"{name}.qmp"
        self.log_path = self.workdir / f"{name}.qemu.log"
        self.events: list[dict[str, Any]] = []
        self.accel = accel or choose_accel(self.workdir, floppy)
        self.cmdline = [QEMU, "-M", "pc", "-m", str(MEMORY >> 20), "-nodefaults", "-display", "none",
                        "-accel", self.accel, "-drive", f"if=floppy,format=raw,readonly=on,file={floppy}",
                        "-qmp", f"unix:{self.qmp_path},server=on,wait=off", *extra]
        self.qmp_path.unlink(missing_ok=True)  # a stale socket of an earlier QEMU of that name
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmdline, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir)
        try:
            wait_for(self._ready, timeout, what=f"QEMU {name}'s QMP socket")
            qmp = wait_for(self._connect, timeout, interval=0.05, what=f"QEMU {name}'s QMP greeting")
            assert qmp is not None
            qmp.settimeout(60)
            self.qmp: QEMUMonitorProtocol | None = qmp
        except BaseException:
            self.kill()
            raise

    def _connect(self) -> QEMUMonitorProtocol | None:
        """A negotiated client, or None while the socket exists but does not accept yet."""
        qmp = QEMUMonitorProtocol(str(self.qmp_path))
        try:
            qmp.connect(negotiate=True)
        except Exception:  # ConnectError: not listening yet
            if self.proc.poll() is not None:
                raise
            return None
        return qmp

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise MigdError(f"QEMU {self.name} exited with {self.proc.returncode}:\n{self.log()}")
        return self.qmp_path.exists()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- QMP ------------------------------------------------------------------------------------

    def cmd(self, name: str, **arguments: Any) -> Any:
        if self.qmp is None:
            raise MigdError(f"QEMU {self.name}'s QMP client is closed")
        return self.qmp.cmd(name, **arguments)

    def hmp(self, line: str) -> str:
        return str(self.cmd("human-monitor-command", **{"command-line": line}))

    def wait_event(self, name: str, pred: Callable[[dict[str, Any]], bool] | None = None,
                   timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("event") == name and (pred is None or pred(event)):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigdError(f"no {name} event within {timeout}s on QEMU {self.name} "
                                f"(queued: {[e.get('event') for e in self.events]})")
            if self.proc.poll() is not None:
                raise MigdError(f"QEMU {self.name} exited ({self.proc.returncode}) waiting for {name}:\n{self.log()}")
            if self.qmp is None:
                raise MigdError(f"QEMU {self.name}'s QMP client is closed")
            try:
                got = self.qmp.pull_event(wait=min(left, 0.5))
            except TimeoutError:
                continue
            if got is not None:
                self.events.append(got)

    def status(self) -> str:
        return str(self.cmd("query-status")["status"])

    def wait_migration(self, timeout: float = 120) -> dict[str, Any]:
        """Poll query-migrate until completed or failed; the last answer."""
        def done() -> dict[str, Any]:
            info: dict[str, Any] = self.cmd("query-migrate")
            return info if info.get("status") in ("completed", "failed", "cancelled") else {}

        return wait_for(done, timeout, interval=0.05, what=f"QEMU {self.name}'s migration to end")

    # -- guest memory ---------------------------------------------------------------------------

    def pmemsave(self, addr: int, size: int) -> bytes:
        """Guest-physical memory, through QMP ``pmemsave`` into a file in the workdir."""
        path = self.workdir / f"{self.name}.pmem.{addr:x}.{size:x}"
        self.cmd("pmemsave", val=addr, size=size, filename=str(path))
        data = path.read_bytes()
        path.unlink()
        if len(data) != size:
            raise MigdError(f"pmemsave wrote {len(data)} bytes, expected {size}")
        return data

    def ram(self) -> bytes:
        """All guest RAM (``-m`` bytes from address 0)."""
        return self.pmemsave(0, MEMORY)

    def counter(self) -> int:
        """The guest's counter; fails if the guest has not written its signature."""
        raw = self.pmemsave(GUEST_BASE, 12)
        if raw[:8] != SIGNATURE:
            raise MigdError(f"no guest signature at {GUEST_BASE:#x}: {raw[:8]!r}")
        return int(struct.unpack("<I", raw[8:])[0])

    def signature_present(self) -> bool:
        return self.pmemsave(GUEST_BASE, 8) == SIGNATURE

    def wait_counting(self, timeout: float = 30) -> int:
        """Wait until the guest booted and its counter moved; the counter then."""
        wait_for(self.signature_present, timeout, interval=0.05, what=f"the guest on {self.name} to boot")
        first = self.counter()
        return wait_for(lambda: (c := self.counter()) > first and c, timeout, interval=0.05,
                        what=f"the counter on {self.name} to move")

    def wait_for_counter(self, at_least: int, timeout: float = 30) -> int:
        """Wait until the counter reached ``at_least``; its value then."""
        return wait_for(lambda: (c := self.counter()) >= at_least and c, timeout, interval=0.05,
                        what=f"the counter on {self.name} to reach {at_least}")

    # -- ending ---------------------------------------------------------------------------------

    def quit(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            try:
                self.cmd("quit")
            except Exception:  # QEMU may close before the reply
                pass
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise MigdError(f"QEMU {self.name} did not quit within {timeout}s") from None
        self.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.close()

    def close(self) -> None:
        qmp = getattr(self, "qmp", None)
        if qmp is not None:
            try:
                qmp.close()
            except Exception:
                pass
            self.qmp = None
        if not self._log.closed:
            self._log.close()


def outside_firmware(ram: bytes) -> bytes:
    """Guest RAM without 0xa0000-0xfffff (VGA window and BIOS shadow), for comparisons."""
    lo, hi = FIRMWARE_AREA
    return ram[:lo] + ram[hi:]


def ended(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` once the migration it describes completed, failed or was cancelled, else {} (for polling)."""
    return info if info.get("status") in ("completed", "failed", "cancelled") else {}

