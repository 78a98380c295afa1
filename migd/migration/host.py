"""What the migration code needs of the process it runs in — and nothing more.

``MigrationState`` (source) and ``IncomingMigration`` (destination) are handed a ``MigrationHost``
instead of reaching into the ``Daemon``: the machine and its run state, the event sink, one way to
hand work to the loop, one way to run a blocking call off it, and a way to end the process. The
``Daemon`` is one host; the tests' harness (tests/migration_harness.py) is another, built of the
same real parts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from migd.events import EventSink
from migd.machine.machine import Machine
from migd.machine.runstate import RunStateMachine
from migd.migration.foreign import ForeignMachine

T = TypeVar("T")


class MigrationHost(Protocol):
    @property
    def machine(self) -> Machine: ...

    @property
    def runstate(self) -> RunStateMachine: ...

    @property
    def events(self) -> EventSink: ...

    # QEMU's autostart: whether a landed incoming migration runs the guest (False with -S; ``stop``
    # and ``cont`` during inmigrate change it)
    autostart: bool

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the event loop soon, from any thread (False: the loop is closed)."""
        ...

    def run_blocking(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """(event loop) Run ``fn(*args)`` on a worker thread; await its result."""
        ...

    def held_machine(self) -> ForeignMachine | None:
        """A machine of another type (QEMU's) the destination side received and holds as data; a
        ``migrate`` then sends it on instead of migd's own machine."""
        ...

    def request_exit(self, code: int) -> None:
        """(any thread) End the process with ``code`` and no SHUTDOWN event."""
        ...
