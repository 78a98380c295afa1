"""A long migration's per-pass log lines: every pass at DEBUG, at most one INFO summary a second (a
migration that passes dozens of times a second must not flood the journal)."""

from __future__ import annotations

import re
from datetime import datetime

PASS_LINE = re.compile(r"^(\S+ \S+) (INFO|DEBUG)\s+migd\.migration: migration pass=(\d+) ", re.M)


def _when(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_pass_lines_at_debug_and_one_info_summary_a_second(migd_factory) -> None:
    dst = migd_factory("dst", "-m", "32M", "--incoming", "defer")
    sock = dst.sock_path("mig")
    dst.cmd("migrate-incoming", uri=f"unix:{sock}")
    # a 4 MiB working set re-dirtied at up to 64 MiB/s, sent at 24 MiB/s with a 1 ms limit: each pass
    # (~170 ms) finds the whole set dirty again, so it never converges, and passes come several a second
    src = migd_factory("src", "-m", "32M", "--workload", "random,rate=64M,wss=4M", "--log-level", "debug")
    src.wait_for(lambda: sum(v["bytes-written"] for v in src.cmd("x-migd-query-workload")["vcpus"]) > 8 << 20,
                 what="the guest to dirty its working set")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 24 << 20, "downtime-limit": 1})
    src.cmd("migrate", uri=f"unix:{sock}")
    info = src.wait_for(lambda: (lambda i: i if i.get("status") == "active" and i.get("total-time", 0) > 4500
                                 and i["ram"]["dirty-sync-count"] > 15 else None)(src.cmd("query-migrate")),
                        timeout=60, what="a long migration of many passes")
    src.cmd("migrate_cancel")
    src.wait_for(lambda: src.cmd("query-migrate").get("status") == "cancelled", what="the cancel")
    lines = PASS_LINE.findall(src.log())
    info_lines = [(_when(t), int(n)) for t, level, n in lines if level == "INFO"]
    debug_lines = [int(n) for _, level, n in lines if level == "DEBUG"]
    assert info_lines and info_lines[0][1] == 1  # the first pass is always told
    # every pass is logged once, at one level or the other
    assert sorted(n for _, n in info_lines) == [n for _, n in info_lines]
    assert sorted([n for _, n in info_lines] + debug_lines) == list(range(1, len(lines) + 1))
    assert len(lines) >= info["ram"]["dirty-sync-count"] > 15
    gaps = [b - a for (a, _), (b, _) in zip(info_lines, info_lines[1:], strict=False)]
    assert min(gaps) >= 0.999, gaps  # log stamps have millisecond resolution
    seconds = info["total-time"] / 1000 + 1.0  # the cancel came a little after that answer
    assert len(info_lines) <= seconds + 1, (len(info_lines), seconds)
    assert len(debug_lines) > len(info_lines)
