"""The QMP command families; importing this package registers every command (see ``registry``)."""

from __future__ import annotations

from migd.qmp.commands import dirtyrate, foreign, hmp, incoming, introspect, machine, migration, misc, objects
from migd.qmp.registry import REGISTRY, Command

FAMILIES = (misc, machine, migration, incoming, foreign, dirtyrate, hmp, objects, introspect)


def load_all() -> dict[str, Command]:
    """Every registered command (the families registered themselves when imported)."""
    return REGISTRY
