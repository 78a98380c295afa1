"""A MigrationHost (migd/migration/host.py) built from real parts: an event loop, an EventSink, a
RunStateMachine and a Machine. Shared by the migration state and thread tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from migd.config import MachineConfig
from migd.events import EventSink
from migd.machine.machine import Machine
from migd.machine.runstate import RunState, RunStateMachine
from migd.migration.host import MigrationHost
from migd.migration.params import MigrationConfig
from migd.migration.state import MigrationState
from migd.migration.status import MigrationStatus as M
from migd.threads import LoopHandle


class Harness:
    def __init__(self, loop: asyncio.AbstractEventLoop, memory: int = 8 << 20, workload: str = "idle") -> None:
        self.loop = loop
        self._handle = LoopHandle(loop)
        self.events = EventSink(loop)
        self.runstate = RunStateMachine(RunState.RUNNING)
        self.machine = Machine(MachineConfig(memory=memory, workload=workload), self.runstate, self.events)
        self.autostart = True
        self.exit_codes: list[int] = []
        self.config = MigrationConfig()
        host: MigrationHost = self  # checked by mypy: the harness is a complete host
        self.migration = MigrationState(host, self.config)
        self.seen: list[dict[str, Any]] = []
        self.events.subscribe(self.seen.append)

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        return await self.loop.run_in_executor(None, fn, *args)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        return self._handle.call_soon(fn, *args)

    def held_machine(self) -> None:
        return None

    def request_exit(self, code: int) -> None:
        self.exit_codes.append(code)

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
