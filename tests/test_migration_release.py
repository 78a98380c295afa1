"""A finished migration's objects are freed by reference counting at cleanup (issue 11 soak).

The migration thread, its stream (with its buffers), policy, SaveVM and RAM saver (with its bitmaps)
must not wait for a full garbage collection: in a long-lived daemon they sat in the oldest generation
for several migrations, and the soak's RSS rose by their buffers every round until one ran. The
check runs with the cyclic collector disabled, so only reference counting can free them.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from migration_harness import Harness
from test_commit import DestHarness

from migd.migration import outgoing
from migd.migration.incoming import IncomingMigration
from migd.migration.status import MigrationStatus as M

ROUNDS = 3


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_migration_objects_freed_without_the_cyclic_collector(tmp_path: Path, no_cyclic_gc: None,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # the objects are noted by the migration thread as it makes its SaveVM (weak references only): a
    # poll from the loop could miss a migration of this small guest that ends within one poll delay
    noted: list[dict[str, weakref.ref[Any]]] = []
    made = outgoing.savevm_for

    def noting(*args: Any, **kwargs: Any) -> Any:
        savevm = made(*args, **kwargs)
        thread = threading.current_thread()
        assert isinstance(thread, outgoing.MigrationThread)
        noted.append({"thread": weakref.ref(thread), "stream": weakref.ref(thread.stream),
                      "policy": weakref.ref(thread.policy), "savevm": weakref.ref(savevm),
                      "ram": weakref.ref(savevm.ram)})
        return savevm

    monkeypatch.setattr(outgoing, "savevm_for", noting)
    loop = asyncio.get_running_loop()
    src = Harness(loop, workload="counter")
    src.migration.config.set_parameters({"max-bandwidth": 0})
    src.machine.start()
    ms = src.migration
    baseline = {t.name for t in threading.enumerate()}
    try:
        for i in range(ROUNDS):
            dst = DestHarness(loop)
            uri = f"unix:{tmp_path}/mig{i}.sock"
            dst.incoming = IncomingMigration(dst, uri, dst.migration.config)
            await dst.incoming.start()
            await ms.start(uri)
            await src.wait_for(lambda i=i: len(noted) > i, 30)
            refs = noted[i]
            await src.wait_for(lambda: ms.status in (M.COMPLETED, M.FAILED), 60)
            await ms.wait_done(10)
            await src.wait_for(lambda: not ms._cleanups, 10)
            assert ms.status is M.COMPLETED, ms.query()
            await loop.run_in_executor(None, dst.close)
            ms.stream = ms.channel = None  # the last stream stays for query-migrate until the next migrate
            alive = [name for name, ref in refs.items() if ref() is not None]
            assert alive == [], f"round {i}: still alive after cleanup: {alive}"
            src.machine.vm_start()
        migration_threads = {t.name for t in threading.enumerate()} - baseline
        assert not {n for n in migration_threads if n.startswith("mig/")}, migration_threads
    finally:
        src.close()
