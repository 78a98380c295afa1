"""The invariant dirty logging rests on, under stress: a page written after a sync started is never
missing from the next sync. Writers hammer random pages (data first, mark after) while a syncer takes
the dirty pages and copies them into a shadow; after a final stop-and-sync the shadow equals RAM."""

from __future__ import annotations

import threading
import time

import numpy as np

from migd.machine import dirty
from migd.machine.ram import RAMList

ROUNDS = 3000  # sync rounds at least ...
WRITES = 3000  # ... and until the writers made at least this many writes between them
DEADLINE = 120.0  # seconds for both (a few on an idle machine)
NPAGES = 512


def _writer(rl: RAMList, seed: int, stop: threading.Event, counts: list[int], slot: int) -> None:
    rng = np.random.default_rng(seed)
    block = rl.get("ram0")
    hot = rl.get("hot")
    stamp = np.uint64(seed << 48)
    n = 0
    while not stop.is_set():
        target = block if n % 4 else hot
        k = int(rng.integers(1, 9))
        idx = rng.integers(0, target.npages, size=k)
        stamp += np.uint64(1)
        if n % 3 == 0:  # a word in the middle of each page
            target.words[idx, int(rng.integers(0, 512))] = stamp
        else:  # whole pages
            target.words[idx] = stamp
        target.mark_dirty(idx)
        n += 1
        counts[slot] = n
        if n % 64 == 0:
            time.sleep(0)  # let the syncer and the other writers interleave


def test_shadow_equals_ram_after_thousands_of_sync_rounds():
    rl = RAMList()
    rl.add("ram0", NPAGES * 4096)
    rl.add("hot", 64 * 4096)
    dirty.log_start(rl)
    shadow = {b.name: b.pages.copy() for b in rl.blocks()}  # after log_start: later writes are marked
    stop = threading.Event()
    counts = [0, 0, 0]
    writers = [threading.Thread(target=_writer, args=(rl, s, stop, counts, i)) for i, s in enumerate((1, 2, 3))]
    for w in writers:
        w.start()
    copied = 0
    rounds = 0
    # the race runs as long as both sides need, not for a number of syncs only: on a loaded machine
    # 3000 syncs went by while the writers made 768 writes between them
    deadline = time.monotonic() + DEADLINE
    try:
        while rounds < ROUNDS or sum(counts) < WRITES:
            assert time.monotonic() < deadline, f"{rounds} syncs and {sum(counts)} writes in {DEADLINE} s"
            for name, bitmap in dirty.sync(rl).items():
                idx = np.flatnonzero(bitmap)
                shadow[name][idx] = rl.get(name).pages[idx]
                copied += len(idx)
            rounds += 1
    finally:
        stop.set()
        for w in writers:
            w.join(10)
    # stop-and-sync: the writers are stopped; one final pass catches what the last round missed
    for name, bitmap in dirty.sync(rl).items():
        idx = np.flatnonzero(bitmap)
        shadow[name][idx] = rl.get(name).pages[idx]
    for block in rl.blocks():
        mismatched = np.flatnonzero((shadow[block.name] != block.pages).any(axis=1))
        assert mismatched.size == 0, f"{block.name}: pages {mismatched[:10].tolist()} missed by sync"
    assert rounds >= ROUNDS and sum(counts) >= WRITES and copied > 0  # the race really ran
    dirty.log_stop(rl)
    rl.close()


def test_a_write_not_marked_is_caught_by_the_comparison():
    """The check above can fail: an unmarked write leaves the shadow stale."""
    rl = RAMList()
    rl.add("ram0", 16 * 4096)
    dirty.log_start(rl)
    shadow = rl.get("ram0").pages.copy()
    rl.get("ram0").pages[5] = 9  # written but never marked
    for name, bitmap in dirty.sync(rl).items():
        shadow[np.flatnonzero(bitmap)] = rl.get(name).pages[np.flatnonzero(bitmap)]
    assert (shadow != rl.get("ram0").pages).any(axis=1).tolist().count(True) == 1
    rl.close()


def test_real_workloads_against_a_shadow_with_the_untouched_hint():
    """The migration's use of the machine, done in-process: log on, take the untouched snapshot, copy
    (skipping pages known zero), sync and copy again while the random and counter guests run, stop,
    final sync. A page dirtied after the snapshot is no longer known zero: the hint must be cleared
    with every sync, or a page written before its first copy would be sent as zero."""
    from migd.config import MachineConfig
    from migd.events import EventSink
    from migd.machine import Machine
    from migd.machine.runstate import RunState, RunStateMachine

    m = Machine(MachineConfig(memory=32 << 20, smp=2, workload="random,rate=64M,wss=16M"),
                RunStateMachine(), EventSink())
    m.start()
    ram0 = m.ram.get("ram0")
    deadline = time.monotonic() + 60
    while m.vcpus[0].stats.bytes_written < (1 << 20):
        assert time.monotonic() < deadline, "the guest did not write 1 MiB in 60 s"
        time.sleep(0.01)
    dirty.log_start(m.ram)
    hint = ram0.untouched_pages()
    assert hint is not None and hint.any() and not hint.all()
    shadow = np.zeros_like(ram0.pages)
    todo = np.ones(ram0.npages, dtype=bool)
    rounds = 0
    switched = False
    while todo.any() or rounds < 200:
        assert rounds < 20_000, "the copy never caught up with the counter guest"  # a few hundred here
        taken = dirty.sync(m.ram)["ram0"]
        hint &= ~taken
        todo |= taken
        idx = np.flatnonzero(todo)[:2048]  # a slow first pass: the guest keeps writing ahead of it
        todo[idx] = False
        copy = idx[~hint[idx]]
        shadow[copy] = ram0.pages[copy]
        hint[idx] = False
        rounds += 1
        if rounds == 100 and not switched:
            m.set_workload("counter,rate=8M")
            switched = True
    m.vm_stop(RunState.FINISH_MIGRATE)
    last = np.flatnonzero(dirty.sync(m.ram)["ram0"] | todo)
    shadow[last] = ram0.pages[last]
    mismatched = np.flatnonzero((shadow != ram0.pages).any(axis=1))
    assert mismatched.size == 0, f"pages {mismatched[:10].tolist()} missed"
    assert rounds >= 200 and switched
    m.shutdown()
