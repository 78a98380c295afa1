"""The one size grammar (migd.units): every spelling it accepts, every one it refuses, and the formatter."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migd.units import PAGE_SIZE, GiB, KiB, MiB, SizeError, TiB, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "default_unit", "size"),
    [
        ("0", 1, 0),
        ("4096", 1, 4096),
        ("512", MiB, 512 * MiB),  # a bare number counts in the caller's unit
        ("512", KiB, 512 * KiB),
        ("1.5", MiB, 3 * MiB // 2),
        ("64K", 1, 64 * KiB),
        ("64k", MiB, 64 * KiB),  # a suffix overrides the default unit
        ("64M", 1, 64 * MiB),
        ("1G", 1, GiB),
        ("2t", 1, 2 * TiB),
        ("1GB", 1, GiB),
        ("1gb", MiB, GiB),
        ("64MiB", 1, 64 * MiB),
        ("64mib", 1, 64 * MiB),
        ("64MIB", 1, 64 * MiB),
        ("1.5M", 1, 3 * MiB // 2),
        ("1.5K", 1, 1536),
        ("0.5KiB", 1, 512),
        ("1.0001K", 1, 1024),  # truncated to whole bytes
        ("5000B", MiB, 5000),  # B alone: bytes, whatever the default
        ("5000b", 1, 5000),
        ("1.0", 1, 1),  # a whole number of bytes written with a fraction
        (" 64M ", 1, 64 * MiB),
        ("64 M", 1, 64 * MiB),
        ("007", 1, 7),
        (str((1 << 63) - 1), 1, (1 << 63) - 1),
    ],
)
def test_accepted(text: str, default_unit: int, size: int) -> None:
    assert parse_size(text, default_unit=default_unit) == size


@pytest.mark.parametrize(
    ("text", "default_unit", "reason"),
    [
        ("", 1, "expected a number"),
        ("lots", 1, "expected a number"),
        ("-1", 1, "expected a number"),
        ("+1", 1, "expected a number"),
        ("1e6", 1, "expected a number"),
        ("0x10", 1, "expected a number"),
        ("1.", 1, "expected a number"),
        (".5M", 1, "expected a number"),
        ("1.5.5M", 1, "expected a number"),
        ("12Q", 1, "expected a number"),
        ("1Q", 1, "expected a number"),
        ("1iB", 1, "expected a number"),  # iB only after a suffix
        ("1MiBB", 1, "expected a number"),
        ("1M B", 1, "expected a number"),
        ("1 000", 1, "expected a number"),
        ("1M2", 1, "expected a number"),
        ("\u0661\u0662", 1, "expected a number"),  # Arabic-Indic digits are not ASCII digits
        ("1.5", 1, "a fraction of a byte"),
        ("1.5B", MiB, "a fraction of a byte"),
        (str(1 << 63), 1, "too large"),
        ("8388608T", 1, "too large"),  # 2**63
        ("9999999999999G", 1, "too large"),
    ],
)
def test_refused(text: str, default_unit: int, reason: str) -> None:
    with pytest.raises(SizeError) as info:
        parse_size(text, default_unit=default_unit)
    assert reason in info.value.reason
    assert str(info.value).startswith(f"invalid size '{text}' (")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0"), (100, "100"), (1536, "1536"), (KiB, "1K"), (1536 * KiB, "1536K"), (64 * MiB, "64M"),
     (GiB, "1G"), (3 * TiB, "3T"), (GiB + 1, str(GiB + 1))],
)
def test_format(size: int, text: str) -> None:
    assert format_size(size) == text


@given(st.integers(min_value=0, max_value=(1 << 63) - 1))
def test_format_parses_back(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_page_size_is_defined_once() -> None:
    """Every module imports PAGE_SIZE from migd.units; none spells the number again under that name."""
    root = Path(__file__).resolve().parent.parent / "migd"
    homes = [str(path.relative_to(root)) for path in sorted(root.rglob("*.py"))
             if re.search(r"^\s*(TARGET_)?PAGE_SIZE\s*(:[^=]*)?=", path.read_text(), re.MULTILINE)]
    assert homes == ["units.py"]
    assert PAGE_SIZE == 4096
