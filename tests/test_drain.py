"""[migd] The switch-over drains the socket's backlog first (docs/SWITCHOVER.md §1, Step.DRAIN).

A real migd <-> migd migration in one process over a unix socket, with a destination slower than the
source: its reads are held back, so the source's writes fill the socket buffers and, at the end of a
first pass of data pages, the destination still has megabytes to load. The source must let it load
them with the guest still running, and stop the vCPUs only once the socket is (nearly) empty.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from migration_harness import Harness
from test_commit import DestHarness

from migd.migration import policytrace
from migd.migration.incoming import IncomingMigration
from migd.migration.policy import Step
from migd.migration.status import MigrationStatus as M
from migd.transports import Listener
from migd.transports.channel import Channel, ChannelFilter

MEM = 32 << 20  # more than the socket buffers hold: the source's writes block, the backlog is real
READ_DELAY_S = 0.002


class SlowReads(ChannelFilter):
    """The destination's real channel, every read held back READ_DELAY_S: a destination that
    loads at a fraction of the pace the source writes at."""

    def read_into(self, mv: Any) -> int:
        time.sleep(READ_DELAY_S)
        return self.inner.read_into(mv)


@pytest.fixture
async def slow_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                           ) -> AsyncIterator[tuple[Harness, DestHarness, Path]]:
    traces = tmp_path / "traces"
    traces.mkdir()
    monkeypatch.setenv(policytrace.ENV, str(traces))
    accept = IncomingMigration._accept

    def slow_accept(self: IncomingMigration, listener: Listener) -> Channel:
        return SlowReads(accept(self, listener))

    monkeypatch.setattr(IncomingMigration, "_accept", slow_accept)
    loop = asyncio.get_running_loop()
    src = Harness(loop, memory=MEM, workload="idle")
    src.migration.config.set_parameters({"max-bandwidth": 0, "x-migd-peer-timeout": 10})
    block = src.machine.ram.blocks()[0]
    block.buf[:] = np.random.default_rng(7).integers(0, 256, block.size, dtype=np.uint8)  # all data
    src.machine.start()
    dst = DestHarness(loop, memory=MEM)
    dst.migration.config.set_parameters({"x-migd-peer-timeout": 10})
    path = tmp_path / "mig.sock"
    dst.incoming = IncomingMigration(dst, f"unix:{path}", dst.migration.config)
    yield src, dst, traces
    await loop.run_in_executor(None, dst.close)
    src.close()


async def migrate_traced(src: Harness, dst: DestHarness, traces: Path) -> dict[str, Any]:
    """Migrate ``src`` into ``dst``'s incoming migration, both ends completed; the one policy trace
    the source wrote into ``traces``."""
    inc = dst.incoming
    assert inc is not None
    await inc.start()
    assert inc.uri is not None
    await src.migration.start(inc.uri)
    ms = src.migration
    await src.wait_for(lambda: ms.status in (M.COMPLETED, M.FAILED, M.CANCELLED)
                       and inc.status in ("completed", "failed"), 60)
    await ms.wait_done(10)
    assert ms.status is M.COMPLETED and inc.status == "completed", (ms.query(), inc.query())
    files = sorted(traces.glob("policy-*.json"))
    assert len(files) == 1, files
    doc: dict[str, Any] = json.loads(files[0].read_text())
    return doc


async def test_the_backlog_is_loaded_before_the_vcpus_stop(
        slow_destination: tuple[Harness, DestHarness, Path]) -> None:
    src, dst, traces = slow_destination
    doc = await migrate_traced(src, dst, traces)
    ms = src.migration
    assert bytes(dst.machine.ram.blocks()[0].buf) == bytes(src.machine.ram.blocks()[0].buf)
    # the run's decisions (a pure policy: replayed, the same ones), each with the backlog it saw:
    # DRAIN while the socket held more than the destination loads in DRAIN_MS, then the switch-over
    # with the socket nearly empty
    _, decisions = policytrace.replay(doc)
    seen = [(d.step, b) for (_, _, d), b in zip(decisions, policytrace.backlogs_at_decisions(doc), strict=True)]
    steps = [step for step, _ in seen]
    assert Step.DRAIN in steps, steps
    assert steps[-1] is Step.SWITCHOVER and Step.SWITCHOVER not in steps[:-1]
    # query-migrate (and the log) kept the switch-over decision's own estimate, made after the sync
    # taught the policy the layout of what is left and the backlog: the replay's, to the millisecond
    assert doc["outcome"]["expected_downtime"] == decisions[-1][1] == ms.expected_downtime
    drained_from = max(b for step, b in seen if step is Step.DRAIN)
    assert drained_from > 1 << 20, drained_from
    assert seen[-1][1] < drained_from / 4, seen[-1]
