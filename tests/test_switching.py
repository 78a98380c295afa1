"""The switch interval is short while any migration thread runs and restored by the last one: a relay
whose incoming side ends first must not give its still running outgoing side the 5 ms back."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from migd.switching import INTERVAL, fast_switching


@pytest.fixture()
def default_interval() -> Iterator[float]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    yield 0.005
    sys.setswitchinterval(old)


def test_nested_users_restore_only_at_the_last(default_interval: float) -> None:
    outgoing = fast_switching()
    incoming = fast_switching()
    outgoing.__enter__()
    assert sys.getswitchinterval() == pytest.approx(INTERVAL, abs=1e-5)
    incoming.__enter__()
    outgoing.__exit__(None, None, None)  # the first one ends while the other still runs
    assert sys.getswitchinterval() == pytest.approx(INTERVAL, abs=1e-5)
    incoming.__exit__(None, None, None)
    assert sys.getswitchinterval() == pytest.approx(default_interval, abs=1e-5)


def test_never_raises_a_shorter_interval_and_restores_on_error(default_interval: float) -> None:
    sys.setswitchinterval(0.0002)
    with pytest.raises(RuntimeError), fast_switching():
        assert sys.getswitchinterval() == pytest.approx(0.0002, abs=1e-5)
        raise RuntimeError("migration failed")
    assert sys.getswitchinterval() == pytest.approx(0.0002, abs=1e-5)


def test_from_two_threads(default_interval: float) -> None:
    inside = threading.Barrier(3)
    leave = threading.Event()

    def user() -> None:
        with fast_switching():
            inside.wait(10)
            leave.wait(10)

    threads = [threading.Thread(target=user) for _ in range(2)]
    for t in threads:
        t.start()
    inside.wait(10)
    assert sys.getswitchinterval() == pytest.approx(INTERVAL, abs=1e-5)
    leave.set()
    for t in threads:
        t.join(10)
    assert sys.getswitchinterval() == pytest.approx(default_interval, abs=1e-5)
