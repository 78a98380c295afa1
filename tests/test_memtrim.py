"""The source's C heap does not grow per migration (issue 11; migd/memtrim.py).

Each check runs in a fresh Python process (the mmap threshold is process-wide and moves once per
process), reading glibc's own accounting with ``mallinfo2``. Skipped without glibc.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

try:
    ctypes.CDLL("libc.so.6").mallinfo2  # noqa: B018 - probing for glibc >= 2.33
    HAVE_GLIBC = True
except (OSError, AttributeError):
    HAVE_GLIBC = False

pytestmark = pytest.mark.skipif(not HAVE_GLIBC, reason="glibc's mallinfo2 needed")

PRELUDE = textwrap.dedent("""
    import ctypes, json, sys
    class MI(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = MI
    def mallinfo():
        m = _libc.mallinfo2()
        return {"mmapped": m.hblkhd, "in_use": m.uordblks, "free": m.fordblks}
    from migd.memtrim import fix_mmap_threshold
    if sys.argv[1] == "fixed":
        assert fix_mmap_threshold()
""")

# A 2 MiB buffer (an InStream's) freed, then another: mmapped both times, or from the heap the second.
BIG_BLOCKS = PRELUDE + textwrap.dedent("""
    first = bytearray(2 << 20)
    a = mallinfo()["mmapped"]
    del first
    second = bytearray(2 << 20)
    b = mallinfo()["mmapped"]
    print(json.dumps({"first_mmapped": a >= 2 << 20, "second_mmapped": b >= 2 << 20}))
""")

# Real migrations in one process: a source Harness to fresh in-process destinations over unix sockets.
MIGRATIONS = PRELUDE + textwrap.dedent("""
    import asyncio, gc, os
    sys.path.insert(0, "tests")
    from migration_harness import Harness
    from test_commit import DestHarness
    from migd.config import MachineConfig
    from migd.machine.machine import Machine
    from migd.migration.incoming import IncomingMigration
    from migd.migration.status import MigrationStatus as M
    MEM, ROUNDS, DIR = 32 << 20, int(sys.argv[2]), sys.argv[3]

    async def main():
        loop = asyncio.get_running_loop()
        src = Harness(loop, memory=MEM, workload="counter")
        src.migration.config.set_parameters({"max-bandwidth": 0})
        src.machine.start()
        free = []
        for i in range(ROUNDS):
            path = f"{DIR}/m{i}.sock"
            dst = DestHarness(loop, memory=MEM)
            dst.incoming = IncomingMigration(dst, f"unix:{path}", dst.migration.config)
            await dst.incoming.start()
            ms = src.migration
            await ms.start(f"unix:{path}")
            await src.wait_for(lambda: ms.status in (M.COMPLETED, M.FAILED) and
                               dst.incoming.status in ("completed", "failed"), 60)
            await ms.wait_done(10)
            await src.wait_for(lambda: not ms._cleanups, 10)
            assert ms.status is M.COMPLETED, ms.query()
            await loop.run_in_executor(None, dst.close)
            del dst
            src.machine.vm_start()
            src.seen.clear()
            gc.collect()
            free.append(mallinfo()["free"])
        src.close()
        print(json.dumps({"free": free}))

    asyncio.run(main())
""")


def run(script: str, *args: str) -> Any:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    env.pop("MALLOC_ARENA_MAX", None)
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_a_freed_big_block_does_not_move_the_next_into_the_heap() -> None:
    """The mechanism: glibc's dynamic threshold puts the second 2 MiB block in the heap; fixed, not."""
    assert run(BIG_BLOCKS, "default") == {"first_mmapped": True, "second_mmapped": False}
    assert run(BIG_BLOCKS, "fixed") == {"first_mmapped": True, "second_mmapped": True}


def test_free_heap_stays_flat_over_migrations(tmp_path: Path) -> None:
    """12 migrations out of one source: its free heap after the last is within 4 MiB of the most
    after the first 3 (before the fix it grew by several MiB every few migrations)."""
    free = run(MIGRATIONS, "fixed", "12", str(tmp_path))["free"]
    assert len(free) == 12
    assert free[-1] <= max(free[:3]) + (4 << 20), [f >> 10 for f in free]
