"""Which thread runs what, written where the code can check it.

migd has an event loop thread (QMP, HTTP, state changes), a migration thread per outgoing migration,
an incoming thread on a destination, vCPU threads and short-lived worker threads for blocking calls.
A method that crosses these lines says on which side it runs with a marker, in the spirit of
qemu.qmp's ``@upper_half`` / ``@bottom_half``:

- ``@loop_only``: only on the event loop's thread (it touches asyncio objects or loop-owned state);
- ``@off_loop``: never on the event loop's thread (it blocks: channel I/O, the big lock, joins);
- ``@on_thread("mig/src/main")``: only on threads whose name starts with that prefix;
- ``@any_thread``: safe from every thread (documentation; nothing to check).

With ``MIGD_CHECK_THREADS=1`` in the environment (the test suite sets it) each marked call checks
where it runs and raises :class:`ThreadViolation`; otherwise the markers cost nothing.

``LoopHandle.call_soon`` is the one way a thread hands work to the loop (QEMU's bottom half).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

P = ParamSpec("P")
R = TypeVar("R")

CHECK = os.environ.get("MIGD_CHECK_THREADS") == "1"
MARK = "__migd_thread__"


class ThreadViolation(AssertionError):
    """A marked method was called on a thread it must not run on."""


def on_loop_thread() -> bool:
    """True when called from a thread that is running an asyncio event loop."""
    return asyncio._get_running_loop() is not None


def _marked(where: str, ok: Callable[[], bool]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        setattr(fn, MARK, where)
        if not CHECK:
            return fn

        def check() -> None:
            if not ok():
                raise ThreadViolation(f"{fn.__qualname__} must run {where}, "
                                      f"not on thread {threading.current_thread().name!r}")

        if inspect.iscoroutinefunction(fn):  # checked where the coroutine runs, not where it is made
            @functools.wraps(fn)
            async def checked_async(*args: Any, **kwargs: Any) -> Any:
                check()
                return await fn(*args, **kwargs)

            setattr(checked_async, MARK, where)
            return cast(Callable[P, R], checked_async)

        @functools.wraps(fn)
        def checked(*args: P.args, **kwargs: P.kwargs) -> R:
            check()
            return fn(*args, **kwargs)

        setattr(checked, MARK, where)
        return checked

    return decorate


loop_only = _marked("on the event loop", on_loop_thread)
off_loop = _marked("off the event loop", lambda: not on_loop_thread())


def on_thread(prefix: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Only on threads whose name starts with ``prefix`` (e.g. ``mig/src/main``)."""
    return _marked(f"on a {prefix!r} thread", lambda: threading.current_thread().name.startswith(prefix))


def any_thread(fn: Callable[P, R]) -> Callable[P, R]:
    """Safe from every thread: a statement for the reader, nothing to check."""
    setattr(fn, MARK, "on any thread")
    return fn


class LoopHandle:
    """Hands work to one event loop from any thread, in the order it was handed over.

    Made on the loop's own thread (the thread that runs, or will run, the loop)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread = threading.get_ident()

    @any_thread
    def call_soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the loop soon (FIFO); False when the loop is already closed."""
        if self.loop.is_closed():
            return False
        try:
            if self.on_loop():
                self.loop.call_soon(fn, *args)
            else:
                self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # closed between the check and the call: the daemon is exiting
            return False
        return True

    @any_thread
    def on_loop(self) -> bool:
        """True when the caller runs on this handle's loop thread."""
        return threading.get_ident() == self._thread
