"""The QMP command registry.

Each command family lives in its own module and registers its commands with ``@command``. A command
is a thin function ``handler(ctx, args)``: ``args`` is the validated pydantic model (or ``None`` for a
command without arguments), ``ctx`` a :class:`CommandContext`. It returns something JSON-able (a dict,
a list, a pydantic model) or raises :class:`QMPError`. Handlers may be ``async``; a plain function
runs on the event loop and must be quick.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from migd.daemon import Daemon


class QMPError(Exception):
    """An error reply: QEMU's error class and description."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


@dataclass
class CommandContext:
    daemon: Daemon
    session: Any  # migd.qmp.server.Session: per-connection state (named fds from getfd, ...)


Handler = Callable[[CommandContext, Any], Any]


@dataclass(frozen=True)
class Command:
    name: str
    handler: Handler
    args_model: type[BaseModel] | None
    allow_oob: bool = False


REGISTRY: dict[str, Command] = {}

# Modules that register commands; imported once by load_all().
FAMILIES = ("misc", "machine", "migration", "incoming", "hmp", "introspect")


def command(name: str, args: type[BaseModel] | None = None, *, allow_oob: bool = False):
    """Register ``fn`` as the handler of QMP command ``name``."""

    def register(fn: Handler) -> Handler:
        if name in REGISTRY:
            raise ValueError(f"QMP command {name} registered twice")
        REGISTRY[name] = Command(name, fn, args, allow_oob)
        return fn

    return register


async def under_bql(ctx: CommandContext, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` holding the big lock, on a worker thread.

    The migration thread holds the lock through its switch-over: waiting for it on the event loop
    would freeze every QMP client for the whole downtime (QEMU's monitor does exactly that).
    """

    def call() -> Any:
        from migd.bql import BQL

        with BQL:
            return fn(*args)

    return await ctx.daemon.run_blocking(call)


def load_all() -> dict[str, Command]:
    for family in FAMILIES:
        try:
            importlib.import_module(f"{__name__}.{family}")
        except ModuleNotFoundError as exc:  # a family not written yet
            if exc.name != f"{__name__}.{family}":
                raise
    return REGISTRY
