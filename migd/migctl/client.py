"""The QMP connection migctl uses: ``qemu.qmp``'s QMPClient with migctl's error wording.

QEMU's maintained client does the protocol; this wrapper only turns its exceptions into one clear
line for the operator and keeps the library's own warnings out of a terminal UI.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient

from migd.migctl.address import QMPAddress, parse_address


class MigctlError(Exception):
    """A failure worth one line on stderr and a non-zero exit."""


class CommandFailed(MigctlError):
    """The daemon answered with an error: keeps QEMU's class and text."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.command = command
        self.error_class = error_class
        self.desc = desc


def quiet_library_logs(verbose: bool = False) -> None:
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


class Client:
    """One negotiated QMP session to a migd (or QEMU) monitor."""

    def __init__(self, address: str | QMPAddress, name: str = "migctl") -> None:
        self.address: QMPAddress = parse_address(address) if isinstance(address, str) else address
        self.qmp = QMPClient(name)

    async def connect(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.qmp.connect(self.address), timeout)
        except (TimeoutError, ConnectError, OSError) as exc:
            await self.close()
            raise MigctlError(f"cannot connect to QMP socket {self.describe()}: {_reason(exc)}") from None

    def describe(self) -> str:
        if isinstance(self.address, tuple):
            return f"tcp:{self.address[0]}:{self.address[1]}"
        return self.address

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        try:
            return await self.qmp.execute(command, arguments)
        except ExecuteError as exc:
            raise CommandFailed(command, exc.error_class, exc.error.error.desc) from None
        except (ExecInterruptedError, ConnectionError, EOFError) as exc:
            raise MigctlError(f"connection to {self.describe()} lost during '{command}': {_reason(exc)}") from None

    async def close(self) -> None:
        try:
            await self.qmp.disconnect()
        except Exception:  # noqa: BLE001 - the session is going away either way; nothing to report
            pass

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _reason(exc: BaseException) -> str:
    """The innermost useful text of a qemu.qmp exception chain."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    inner = getattr(exc, "exc", None)
    if isinstance(inner, BaseException):
        return _reason(inner)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
