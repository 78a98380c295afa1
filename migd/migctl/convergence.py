"""Is the migration getting anywhere? Elapsed time, an ETA and a stall warning, as a pure tracker.

A migration converges when ``remaining`` keeps reaching new lows: each pass leaves less dirty RAM than
the last. One that sits at "99.9 %" for minutes is not about to finish, it is stuck with the guest
dirtying as fast as the link drains. The tracker says so once ``remaining`` has made no new low for
``stall_after`` seconds (see :class:`Convergence` for what a low is after the first pass). The ETA comes from the daemon's own forecast (``x-migd-convergence``) when it
offers one, else from ``remaining / (bandwidth - dirty rate)``; no ETA when the link cannot keep up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from migd.migctl.display import bandwidth_bytes, dirty_rate_bytes

STALL_AFTER = 10.0  # seconds without a new low of remaining before the warning
_MOVING = frozenset({"active", "device"})  # pre-switchover waits for the operator


def forecast_eta(info: dict[str, Any]) -> float | None:
    """Seconds until the migration may complete, None when unknown or never."""
    forecast = info.get("x-migd-convergence")
    if isinstance(forecast, dict):
        eta_ms = forecast.get("eta-ms")
        if isinstance(eta_ms, int | float) and eta_ms >= 0:
            return eta_ms / 1000.0
        if forecast.get("state") in ("stalled", "diverging"):
            return None
    ram = info.get("ram") or {}
    remaining = ram.get("remaining")
    bandwidth = bandwidth_bytes(info)
    dirty = dirty_rate_bytes(info) or 0
    if not isinstance(remaining, int) or not bandwidth:
        return None
    drain = bandwidth - dirty
    return remaining / drain if drain > 0 else None


@dataclass
class Convergence:
    """Fed one query-migrate answer at a time with its monotonic time; reports stalls.

    Progress is a new low of ``remaining``. During the first pass every fall is one (RAM is being
    sent for the first time). From the second pass on, ``remaining`` drains towards zero in every
    pass whatever happens, so what counts is the dirty set a pass starts with: a pass that starts
    at least ``MARGIN`` below every earlier one is progress. The daemon's forecast, when it gives a
    state, overrides both.
    """

    stall_after: float = STALL_AFTER
    started: float | None = None
    best: int | None = None  # the lowest remaining (first pass) or pass start (later) seen
    best_at: float = 0.0
    warned: bool = False
    _pass: int | None = None
    _later_passes: bool = False

    MARGIN = 0.97

    def update(self, info: dict[str, Any], now: float) -> None:
        if self.started is None:
            self.started = now
            self.best_at = now
        ram = info.get("ram") or {}
        remaining = ram.get("remaining")
        if info.get("status") not in _MOVING or not isinstance(remaining, int):
            self.best_at = now  # setup, a pause before switch-over: not the guest's fault
            return
        forecast = info.get("x-migd-convergence")
        state = forecast.get("state") if isinstance(forecast, dict) else None
        sync = ram.get("dirty-sync-count")
        new_pass = sync != self._pass
        self._pass = sync
        if state == "converging":
            self._progress(remaining, now)
        elif state in ("stalled", "diverging"):
            self.best = remaining if self.best is None else min(self.best, remaining)  # the clock runs on
        elif not isinstance(sync, int) or sync <= 1:
            if self.best is None or remaining < self.best:
                self._progress(remaining, now)
        elif new_pass and not self._later_passes:
            self._later_passes = True  # the first pass's lows do not compare with pass starts
            self.best = remaining
            self.best_at = now
        elif new_pass and (self.best is None or remaining < self.best * self.MARGIN):
            self._progress(remaining, now)

    def _progress(self, remaining: int, now: float) -> None:
        self.best = remaining if self.best is None else min(self.best, remaining)
        self.best_at = now

    def elapsed(self, now: float) -> float:
        return 0.0 if self.started is None else now - self.started

    def stalled_for(self, now: float) -> float:
        """Seconds since remaining last reached a new low (0 while it keeps falling)."""
        return now - self.best_at

    def stalled(self, now: float) -> bool:
        return self.best is not None and self.stalled_for(now) >= self.stall_after

    def warning(self, info: dict[str, Any], now: float) -> str | None:
        """The not-converging text while stalled, else None."""
        if not self.stalled(now):
            return None
        assert self.best is not None
        text = (f"not converging: remaining has made no new low (below {_mib(self.best)}) for "
                f"{self.stalled_for(now):.0f} s")
        bandwidth = bandwidth_bytes(info)
        dirty = dirty_rate_bytes(info)
        if bandwidth is not None and dirty is not None:
            text += f" (guest dirties {_mib(dirty)}/s, link sends {_mib(bandwidth)}/s)"
        return text + "; raise --bandwidth or --downtime, enable --auto-converge, or cancel"


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def format_duration(seconds: float | None) -> str:
    """``42 s``, ``3 min 05 s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
