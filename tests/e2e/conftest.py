"""Fixtures of the end-to-end migration tests (``migd_factory`` comes from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e_util import Plan


@pytest.fixture
def make_plan(tmp_path: Path) -> Iterator[Callable[[str], Plan]]:
    """``make_plan(transport) -> Plan``; its sockets, fifos and clients are cleaned up afterwards."""
    plans: list[Plan] = []

    def factory(transport: str) -> Plan:
        plan = Plan(transport, tmp_path)
        plans.append(plan)
        return plan

    yield factory
    for plan in plans:
        plan.close()
