"""A whole migration stream written by the real SaveVM, for the format, fuzz and analysis tests."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from migd.migration.savevm import SaveVM
from migd.migration.stats import MigrationStats
from migd.migration.stream import OutStream
from migd.transports.channel import FdChannel


def write_migration(machine: Any, fd: int, *, return_path: bool = False) -> None:
    """Header, setup, iterations until done, completion, into ``fd`` (closed afterwards), as the
    ``file:`` transport does."""
    f = OutStream(FdChannel(fd))
    sv = SaveVM(machine, MigrationStats(), return_path)
    sv.save_header(f)
    sv.save_setup(f)
    while not sv.save_iterate(f):
        pass
    sv.save_complete_precopy(f)
    sv.cleanup()
    f.close()


def migration_bytes(machine: Any, *, return_path: bool = False) -> bytes:
    with tempfile.TemporaryFile() as tmp:
        write_migration(machine, os.dup(tmp.fileno()), return_path=return_path)
        tmp.seek(0)
        return tmp.read()
