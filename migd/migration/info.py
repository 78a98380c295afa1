"""``query-migrate``'s answer for the whole daemon: the side that has something to say."""

from __future__ import annotations

from typing import Any, Protocol


class MigrationSide(Protocol):
    def query(self) -> dict[str, Any]: ...


def query_migrate(source: MigrationSide, incoming: MigrationSide | None) -> dict[str, Any]:
    """(any thread) The source's MigrationInfo, or the destination's while the source side never
    ran: QEMU fills the destination's first and lets a source that is not ``none`` overwrite it."""
    info = source.query()
    if not info and incoming is not None:
        return dict(incoming.query())
    return info
