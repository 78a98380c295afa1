"""Start-up failures as an operator reads them: one line naming the option and the cause, and an exit
status that tells a supervisor whether starting again can help.

Exit statuses (README, systemd/migd@.service):

* 0 stopped cleanly; 1 the incoming migration failed (QEMU's exit-on-error);
* 2 bad configuration: a path that does not exist, a value the host rejects (no restart fixes it);
* 3 a runtime failure at start-up: address in use, permission denied, not enough memory (a restart,
  later, may succeed).

Each start-up step runs inside :func:`step` (or :func:`machine_step`), which turns what it raises
into a :class:`StartupError` for that option.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from migd.machine.block import DriveError
from migd.transports.base import TransportError

EXIT_OK = 0
EXIT_INCOMING_FAILED = 1
EXIT_CONFIG = 2
EXIT_RUNTIME = 3

# errnos that say the configuration names something that cannot exist or work on this host
_CONFIG_ERRNOS = frozenset({
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENAMETOOLONG,
    errno.ELOOP, errno.EAFNOSUPPORT, errno.ENODEV, errno.ENXIO, errno.EEXIST,
})
# the C library's texts, to recover an errno from a message that only carries the text
_BY_TEXT = {os.strerror(code): code for code in sorted(errno.errorcode, reverse=True)}


class StartupError(Exception):
    """A start-up step failed: ``--option value: cause``, and the exit status for it."""

    def __init__(self, option: str, value: object, cause: str, status: int) -> None:
        named = f"{option} {value}: " if value not in (None, "") else f"{option}: "
        # a part that already names its option (the RAM file's lock) is not named twice
        super().__init__(cause if cause.startswith((named, f"{option}: ")) else named + cause)
        self.option = option
        self.status = status


def error_number(exc: BaseException) -> int | None:
    """The errno behind ``exc``: its own, a cause's, or the one whose text ends its message."""
    seen: BaseException | None = exc
    for _ in range(8):  # bounded walk down the cause chain
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    for message, code in _BY_TEXT.items():
        if message and text.endswith(message):
            return code
    return None


def status_for(exc: BaseException) -> int:
    """2 for what a restart cannot fix, 3 for what it might."""
    if isinstance(exc, MemoryError):
        return EXIT_RUNTIME
    code = error_number(exc)
    if code is None:
        return EXIT_CONFIG if isinstance(exc, ValueError) else EXIT_RUNTIME
    return EXIT_CONFIG if code in _CONFIG_ERRNOS else EXIT_RUNTIME


def cause_text(exc: BaseException) -> str:
    """The cause in words: the C library's text for a plain OSError, else the exception's own."""
    if isinstance(exc, MemoryError):
        return os.strerror(errno.ENOMEM)
    if isinstance(exc, TransportError) and isinstance(exc.__cause__, OSError):
        return cause_text(exc.__cause__)  # the option names the address: the system's words suffice
    if isinstance(exc, OSError) and exc.errno is not None and "attempting to bind" in str(exc):
        return os.strerror(exc.errno)  # aiohttp's "error while attempting to bind on address (...): ..."
    if type(exc) is OSError or (isinstance(exc, OSError) and str(exc).startswith("[Errno")):
        return exc.strerror or os.strerror(exc.errno or 0)
    return str(exc) or type(exc).__name__


@contextmanager
def step(option: str, value: object = None) -> Iterator[None]:
    """Run one start-up step; an OSError, ValueError or MemoryError becomes ``option``'s StartupError."""
    try:
        yield
    except StartupError:
        raise
    except (OSError, ValueError, MemoryError) as exc:
        raise StartupError(option, value, cause_text(exc), status_for(exc)) from exc


@contextmanager
def machine_step(machine: Any) -> Iterator[None]:
    """Creating the machine: a drive's failure names ``--drive``, the RAM's ``--mem-path`` or ``-m``."""
    try:
        yield
    except StartupError:
        raise
    except Exception as exc:
        if isinstance(exc, DriveError):
            raise StartupError("--drive", None, str(exc), status_for(exc)) from exc
        if not isinstance(exc, OSError | ValueError | MemoryError):
            raise
        mem_path = getattr(machine, "mem_path", None)
        if mem_path:
            raise StartupError("--mem-path", mem_path, cause_text(exc), status_for(exc)) from exc
        raise StartupError("-m", _size_text(getattr(machine, "memory", None)), cause_text(exc),
                           status_for(exc)) from exc


def _size_text(size: object) -> str:
    if isinstance(size, int):
        for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
            if size and size % (1 << shift) == 0:
                return f"{size >> shift}{unit}"
    return str(size)
