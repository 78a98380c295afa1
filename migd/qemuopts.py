"""QEMU's option syntax (``-object``, ``-drive``): ``A,KEY=VALUE,...`` with ``,,`` for a literal comma.

One splitter for every spec migd reads in that syntax; each caller words its own errors (``--object``
speaks QEMU's QOM texts, ``--drive`` the command line's), so a failure names the offending part.
"""

from __future__ import annotations

import re

_SEPARATOR = re.compile(r"(?<!,),(?!,)")  # a single comma; ",," is an escaped one


class OptsError(ValueError):
    """A part that is not KEY=VALUE (``twice`` False) or a key given twice (``twice`` True)."""

    def __init__(self, part: str, key: str, twice: bool) -> None:
        super().__init__(f"'{key}' given twice" if twice else f"'{part}' is not KEY=VALUE")
        self.part, self.key, self.twice = part, key, twice


def split(spec: str) -> list[str]:
    """The comma-separated parts of ``spec``, each with ``,,`` turned back into ``,``."""
    return [part.replace(",,", ",") for part in _SEPARATOR.split(spec)]


def keyvals(parts: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` parts as a dict, in order; raises OptsError on a bare word or a repeated key."""
    fields: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            raise OptsError(part, key, twice=False)
        if key in fields:
            raise OptsError(part, key, twice=True)
        fields[key] = value
    return fields
