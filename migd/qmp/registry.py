"""The QMP command registry, and what a command may use of the daemon and of its session.

Each command family (``migd/qmp/commands/*.py``) registers its commands with ``@command``. A command
is a thin function ``handler(ctx, args)``: ``args`` is the validated pydantic model (or ``None`` for a
command without arguments), ``ctx`` a :class:`CommandContext`. It returns something JSON-able (a dict,
a list, a pydantic model) or raises :class:`QMPError`. Handlers may be ``async``; a plain function runs
on the event loop and must be quick. ``ctx.daemon`` is a :class:`CommandHost`: the few parts of the
daemon a command may touch, so commands never import the daemon (nor the daemon them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from migd.bql import BQL
from migd.config import DaemonConfig
from migd.events import EventSink
from migd.machine.machine import Machine
from migd.machine.runstate import RunStateMachine
from migd.migration.dirtyrate import DirtyRateMeter
from migd.migration.incoming import IncomingMigration
from migd.migration.state import MigrationState

T = TypeVar("T")


class QMPError(Exception):
    """An error reply: QEMU's error class and description."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class CommandHost(Protocol):
    """What a QMP command may use of the daemon."""

    config: DaemonConfig
    autostart: bool
    incoming: IncomingMigration | None
    dirty_rate: DirtyRateMeter  # calc-dirty-rate / query-dirty-rate: the last measurement

    @property
    def machine(self) -> Machine: ...

    @property
    def runstate(self) -> RunStateMachine: ...

    @property
    def events(self) -> EventSink: ...

    @property
    def migration(self) -> MigrationState: ...

    def run_blocking(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]: ...

    def request_shutdown(self, reason: str = ...) -> None: ...


class SessionHandle(Protocol):
    """What a command may use of its QMP connection: the fds passed with ``getfd``."""

    fds: dict[str, int]

    def take_received_fd(self) -> int | None: ...


@dataclass
class CommandContext:
    daemon: CommandHost
    session: SessionHandle


Handler = Callable[[CommandContext, Any], Any]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    args_model: type[BaseModel] | None
    allow_oob: bool = False


REGISTRY: dict[str, Command] = {}


def command(name: str, args: type[BaseModel] | None = None, *,
            allow_oob: bool = False) -> Callable[[H], H]:
    """Register the decorated function as the handler of QMP command ``name``."""

    def register(fn: H) -> H:
        if name in REGISTRY:
            raise ValueError(f"QMP command {name} registered twice")
        REGISTRY[name] = Command(name, fn, args, allow_oob)
        return fn

    return register


async def under_bql(ctx: CommandContext, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` holding the big lock, on a worker thread.

    The migration thread holds the lock through its switch-over: waiting for it on the event loop
    would freeze every QMP client for the whole downtime (QEMU's monitor does exactly that).
    """

    def call() -> T:
        with BQL:
            return fn(*args)

    return await ctx.daemon.run_blocking(call)
