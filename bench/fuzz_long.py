"""A long fuzz run of the stream loader (minutes, not in CI): the mutations of tests/test_loader_fuzz.py,
far more of them, randomized (not the CI run's fixed examples). Every example must load or fail with a
StreamError that says why; anything else is a bug and stops the run with the failing input.

    python3 bench/fuzz_long.py --minutes 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import test_loader_fuzz as fuzz  # noqa: E402

from migd.migration.stream import StreamError  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0)
    args = p.parse_args()
    deadline = time.monotonic() + args.minutes * 60
    counts = {"examples": 0, "loaded": 0, "refused": 0}
    slowest = 0.0

    @settings(max_examples=2000, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(fuzz.mutation, min_size=1, max_size=8))
    def one(muts: list[tuple[str, int, object]]) -> None:
        nonlocal slowest
        if time.monotonic() > deadline:
            return
        data = fuzz._apply(fuzz.VALID, muts)
        t0 = time.monotonic()
        try:
            fuzz._load(data)
            counts["loaded"] += 1
        except StreamError as exc:
            assert str(exc), "a StreamError without a description"
            counts["refused"] += 1
        slowest = max(slowest, time.monotonic() - t0)
        counts["examples"] += 1

    start = time.monotonic()
    while time.monotonic() < deadline:
        one()
    took = time.monotonic() - start
    print(f"stream loader fuzz: {counts['examples']} mutated streams in {took:.0f} s "
          f"({counts['loaded']} loaded, {counts['refused']} refused with a StreamError, no other error), "
          f"slowest example {slowest * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
