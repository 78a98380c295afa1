"""What the operator sees move: the percent done of a migration, as a pure function.

``remaining`` jumps back up whenever a bitmap sync finds pages the guest dirtied again, so the raw
ratio runs backwards between passes. An operator reads a bar that shrinks as "something broke"; the bar
therefore only ever moves forward, and it never says 100 before QEMU says ``completed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HOLD_BELOW = 99.9  # the most a not-yet-completed migration may show

TERMINAL = frozenset({"completed", "failed", "cancelled"})


def raw_percent(info: dict[str, Any]) -> float | None:
    """100 − remaining/total × 100 from a query-migrate answer; None when it carries no RAM figures."""
    if info.get("status") == "completed":
        return 100.0
    ram = info.get("ram")
    if not isinstance(ram, dict):
        return None
    total: float = ram.get("total") or 0
    remaining: float | None = ram.get("remaining")
    if total <= 0 or remaining is None:
        return None
    remaining = min(max(remaining, 0), total)
    return float(100.0 - remaining / total * 100.0)


def next_percent(previous: float, info: dict[str, Any]) -> float:
    """The percent to show after ``previous``: never lower, below 100 until the status is completed."""
    if info.get("status") == "completed":
        return 100.0
    raw = raw_percent(info)
    if raw is None:
        return previous
    return max(previous, min(raw, HOLD_BELOW))


@dataclass
class Progress:
    """The percent shown so far, fed one query-migrate answer at a time."""

    percent: float = 0.0

    def update(self, info: dict[str, Any]) -> float:
        self.percent = next_percent(self.percent, info)
        return self.percent
