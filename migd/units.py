"""Units every part of migd shares: the page size and the one grammar for sizes.

Every option and spec that takes a size (``-m``, workload ``rate=``/``wss=``/``disk-rate=``, the
``file:`` URI's ``offset=``, migctl's ``--bandwidth`` and size parameters, HMP's size arguments) reads it here, so they all
accept the same words. The grammar::

    SIZE   := NUMBER [SUFFIX] [ "B" | "iB" ]     (case-insensitive; blanks allowed around NUMBER)
    NUMBER := DIGITS [ "." DIGITS ]
    SUFFIX := "K" | "M" | "G" | "T" | "P" | "E"  (binary: 2**10 ... 2**60, as QEMU's qemu_strtosz)

``iB`` only follows a suffix; ``B`` alone means bytes. A number without suffix and without ``B`` is in
the caller's ``default_unit`` (MiB for ``-m`` as in QEMU, bytes everywhere else). Fractions are
truncated to whole bytes (``1.5K`` = 1536), except that a number counted in bytes must be whole
(``1.5`` or ``1.5B`` bytes is an error). This module imports nothing from migd.
"""

from __future__ import annotations

import re
from fractions import Fraction

PAGE_SIZE = 4096  # the guest page (QEMU's TARGET_PAGE_SIZE on x86): RAM, dirty bitmap, stream records

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
PiB = 1 << 50
EiB = 1 << 60

SUFFIXES = {"K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": PiB, "E": EiB}
SIZE_LIMIT = 1 << 63  # sizes travel as int64 in QMP and the stream; anything at or above is refused
GRAMMAR = "a number with an optional K, M, G, T, P or E suffix"

_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([KMGTPE])(i?B)?|(B))?\s*", re.IGNORECASE | re.ASCII)


class SizeError(ValueError):
    """A size that does not follow the grammar; ``text`` is what was given, ``reason`` why it failed."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"invalid size '{text}' ({reason})")
        self.text = text
        self.reason = reason


def parse_size(text: str, *, default_unit: int = 1) -> int:
    """``text`` in bytes; a bare number counts in ``default_unit`` bytes (1 = bytes, ``MiB`` for ``-m``).

    Raises SizeError for text outside the grammar, fractional bytes, or sizes of 2**63 and more.
    """
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise SizeError(text, f"expected {GRAMMAR}")
    number, suffix, _, bytes_only = m.groups()
    if suffix:
        unit = SUFFIXES[suffix.upper()]
    elif bytes_only:
        unit = 1
    else:
        unit = default_unit
    exact = Fraction(number) * unit
    if unit == 1 and exact.denominator != 1:
        raise SizeError(text, "a fraction of a byte")
    value = int(exact)
    if value >= SIZE_LIMIT:
        raise SizeError(text, "too large")
    return value


def format_size(n: int) -> str:
    """The shortest exact spelling of ``n`` bytes in the grammar: ``64M``, ``1536K``, ``100``."""
    for suffix in ("T", "G", "M", "K"):
        unit = SUFFIXES[suffix]
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)
