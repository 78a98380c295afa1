"""[migd] The expected downtime a migration publishes at its switch-over is the decision's own.

A real migd <-> migd migration in one process over a unix socket, a guest dirtying a small hot set at
random: the sync before the switch-over finds a scattered rest, and the thread tells the policy how it
lies (``on_layout``: runs of pages, which cost more than their bytes) and what the socket still holds
(``on_backlog``) before it decides. ``query-migrate``'s ``expected-downtime`` and the log's switch-over
line must carry the estimate made with that, the one the recorded trace replays to — not the one
published a moment earlier, right after the sync, without it (this session's bench: 9 of 26 cases
published a figure the decision no longer held, 200M on a 64 MiB hot set over 32 MiB/s 38 against
the decision's 72).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from migration_harness import Harness
from test_commit import DestHarness
from test_drain import migrate_traced

from migd.migration import policytrace
from migd.migration.incoming import IncomingMigration
from migd.migration.policy import Step

MEM = 32 << 20


@pytest.fixture
async def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Harness, DestHarness, Path]]:
    traces = tmp_path / "traces"
    traces.mkdir()
    monkeypatch.setenv(policytrace.ENV, str(traces))
    loop = asyncio.get_running_loop()
    src = Harness(loop, memory=MEM, workload="random,rate=64M,wss=4M")
    src.migration.config.set_parameters({"max-bandwidth": 0, "x-migd-peer-timeout": 10})
    src.machine.start()
    dst = DestHarness(loop, memory=MEM)
    dst.incoming = IncomingMigration(dst, f"unix:{tmp_path / 'mig.sock'}", dst.migration.config)
    yield src, dst, traces
    await loop.run_in_executor(None, dst.close)
    src.close()


async def test_the_switchover_publishes_the_decisions_estimate(pair: tuple[Harness, DestHarness, Path]) -> None:
    src, dst, traces = pair
    doc = await migrate_traced(src, dst, traces)
    ms = src.migration
    # one channel, page runs, a plain unix socket: the thread told the policy that long runs of a
    # final pass leave as page references (what a layout no sync has shown yet is planned with)
    assert ["on_references", True] in doc["calls"]
    calls = [c[0] for c in doc["calls"]]
    last_sync = len(calls) - 1 - calls[::-1].index("on_sync")
    # the decision came after the sync had told the policy the rest's layout and the backlog ...
    assert "on_layout" in calls[last_sync:] and "on_backlog" in calls[last_sync:], calls[last_sync:]
    _, decisions = policytrace.replay(doc)
    assert decisions[-1][2].step is Step.SWITCHOVER
    # ... and what query-migrate kept (and the outcome recorded) is that decision's estimate
    assert ms.expected_downtime == doc["outcome"]["expected_downtime"] == decisions[-1][1], (
        ms.expected_downtime, decisions[-4:])
