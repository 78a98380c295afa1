"""What MigrationState needs of a Daemon (INTERNALS.md), built from real parts: an event loop, an
EventSink, a RunStateMachine and a Machine. Shared by the migration state and thread tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from migd.config import MachineConfig
from migd.events import EventSink
from migd.machine.machine import Machine
from migd.machine.runstate import RunState, RunStateMachine
from migd.migration.state import MigrationState
from migd.migration.state import MigrationStatus as M


class Harness:
    def __init__(self, loop: asyncio.AbstractEventLoop, memory: int = 8 << 20, workload: str = "idle") -> None:
        self.loop = loop
        self.events = EventSink(loop)
        self.runstate = RunStateMachine(RunState.RUNNING)
        self.machine = Machine(MachineConfig(memory=memory, workload=workload), self.runstate, self.events)
        self.incoming: Any = None
        self.migration = MigrationState(self)
        self.seen: list[dict[str, Any]] = []
        self.events.subscribe(self.seen.append)

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        return await self.loop.run_in_executor(None, fn, *args)

    def statuses(self) -> list[str]:
        """The MIGRATION event statuses, in order."""
        return [e["data"]["status"] for e in self.seen if e["event"] == "MIGRATION"]

    def names(self) -> list[str]:
        """Every event, MIGRATION ones by their status."""
        return [e["event"] if e["event"] != "MIGRATION" else e["data"]["status"] for e in self.seen]

    async def wait_for(self, cond: Callable[[], bool], timeout: float = 60.0) -> None:
        async def poll() -> None:
            while not cond():
                await asyncio.sleep(0.005)
        await asyncio.wait_for(poll(), timeout)

    async def wait_status(self, *wanted: M, timeout: float = 60.0) -> None:
        await self.wait_for(lambda: self.migration.status in wanted, timeout)

    def close(self) -> None:
        self.machine.shutdown()
