"""What the HTTP endpoint reads from the daemon, as a protocol: http/ never needs the Daemon class itself.

The daemon satisfies it, and so does the tests' scripted stand-in (tests/scripted_daemon.py). Everything
here is read on the event loop, at scrape or sample time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from migd.events import Event
from migd.machine.machine import Machine
from migd.machine.runstate import RunStateMachine
from migd.migration.info import MigrationSide
from migd.migration.params import MigrationConfig


class EventSource(Protocol):
    """Where QMP events are fanned out (delivered on the event loop)."""

    def subscribe(self, listener: Callable[[Event], None]) -> None: ...

    def unsubscribe(self, listener: Callable[[Event], None]) -> None: ...


class IncomingSide(MigrationSide, Protocol):
    """The destination side: query-migrate's answer and its [migd] progress counters."""

    def progress(self) -> dict[str, int]: ...


class HttpHost(Protocol):
    """The parts of a daemon the endpoint reads; ``machine`` is None until the machine is built."""

    @property
    def runstate(self) -> RunStateMachine: ...

    @property
    def events(self) -> EventSource: ...

    @property
    def migration(self) -> MigrationSide: ...

    @property
    def incoming(self) -> IncomingSide | None: ...

    @property
    def migration_config(self) -> MigrationConfig: ...

    @property
    def machine(self) -> Machine | None: ...
