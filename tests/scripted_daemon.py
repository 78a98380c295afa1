"""The parts of a Daemon the HTTP endpoint reads, with a migration whose answers a test scripts.

For the endpoint's own unit tests (rendering, metrics, the live feed at exact values); the real-daemon
tests (test_http_e2e.py, the dashboard's second test) cover the same endpoint against a real migration.
"""

from __future__ import annotations

import asyncio
from typing import Any

from migd.events import EventSink
from migd.machine.runstate import RunState, RunStateMachine
from migd.migration.params import MigrationConfig


class ScriptedMigration:
    """Answers query() with whatever the test sets, like MigrationState answers from its counters."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def query(self) -> dict[str, Any]:
        return dict(self.info)


class DaemonParts:
    def __init__(self) -> None:
        self.events = EventSink(asyncio.get_running_loop())
        self.runstate = RunStateMachine(RunState.RUNNING)
        self.migration = ScriptedMigration()
        self.machine = None
        self.incoming = None
        self.migration_config = MigrationConfig()
