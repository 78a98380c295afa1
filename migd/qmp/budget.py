"""One input budget for every QMP session of a daemon.

The lexer bounds a message to 64 MiB per connection, which is what QEMU allows, but nothing bounded
their sum: four clients each holding an unfinished 60 MiB string cost 249 MiB. Each session reports
how many bytes its unfinished message holds after every read; the one that takes the total past the
daemon-wide limit gets QEMU's "JSON token size limit exceeded" and its message is dropped.
"""

from __future__ import annotations

MAX_INPUT_TOTAL = 128 << 20  # two maximal messages at once; more clients wait for their turn


class InputBudget:
    """Bytes held by unfinished QMP messages, per session and in total (event loop)."""

    def __init__(self, limit: int = MAX_INPUT_TOTAL) -> None:
        self.limit = limit
        self.used = 0
        self._held: dict[int, int] = {}

    def update(self, session: int, held: int) -> bool:
        """``session`` now holds ``held`` bytes; False when that puts the daemon over the limit."""
        self.used += held - self._held.get(session, 0)
        self._held[session] = held
        return self.used <= self.limit

    def release(self, session: int) -> None:
        """The session ended: what it held is free again."""
        self.used -= self._held.pop(session, 0)
