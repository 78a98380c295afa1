"""Run states with QEMU's names, the legal transitions between them, and notifiers.

Later parts hang off the notifiers: the vCPUs, the migration (which records the state it found the
guest in), systemd STATUS= lines and the QMP STOP/RESUME events.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import StrEnum


class RunState(StrEnum):
    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"


S = RunState

# The subset of QEMU's runstate_transitions_def that a migd machine can take.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    S.PRELAUNCH: frozenset({S.RUNNING, S.INMIGRATE, S.PAUSED, S.FINISH_MIGRATE, S.SHUTDOWN}),
    S.INMIGRATE: frozenset({S.RUNNING, S.PAUSED, S.POSTMIGRATE, S.PRELAUNCH, S.SHUTDOWN,
                            S.INTERNAL_ERROR, S.FINISH_MIGRATE}),
    S.RUNNING: frozenset({S.PAUSED, S.FINISH_MIGRATE, S.SHUTDOWN, S.SAVE_VM, S.IO_ERROR,
                          S.INTERNAL_ERROR, S.SUSPENDED}),
    S.PAUSED: frozenset({S.RUNNING, S.FINISH_MIGRATE, S.POSTMIGRATE, S.SHUTDOWN, S.SAVE_VM,
                         S.PRELAUNCH}),
    S.FINISH_MIGRATE: frozenset({S.RUNNING, S.PAUSED, S.POSTMIGRATE, S.SHUTDOWN, S.PRELAUNCH,
                                 S.IO_ERROR, S.INTERNAL_ERROR}),
    S.POSTMIGRATE: frozenset({S.RUNNING, S.PAUSED, S.FINISH_MIGRATE, S.SHUTDOWN, S.PRELAUNCH}),
    S.SAVE_VM: frozenset({S.RUNNING, S.PAUSED, S.SHUTDOWN}),
    S.IO_ERROR: frozenset({S.RUNNING, S.PAUSED, S.FINISH_MIGRATE, S.SHUTDOWN}),
    S.INTERNAL_ERROR: frozenset({S.RUNNING, S.PAUSED, S.FINISH_MIGRATE, S.SHUTDOWN}),
    S.SUSPENDED: frozenset({S.RUNNING, S.PAUSED, S.FINISH_MIGRATE, S.SHUTDOWN}),
    S.SHUTDOWN: frozenset({S.RUNNING, S.PAUSED, S.FINISH_MIGRATE, S.PRELAUNCH}),
}

LIVE_STATES = frozenset({S.RUNNING, S.SUSPENDED})

Notifier = Callable[[RunState, RunState], None]


class InvalidTransition(RuntimeError):
    pass


class RunStateMachine:
    """The machine's run state. Thread-safe; notifiers run in the thread that changed the state."""

    def __init__(self, initial: RunState = RunState.RUNNING) -> None:
        self._state = initial
        self._lock = threading.Lock()
        self._notifiers: list[Notifier] = []

    @property
    def state(self) -> RunState:
        return self._state

    def is_running(self) -> bool:
        return self._state is RunState.RUNNING

    def is_live(self) -> bool:
        return self._state in LIVE_STATES

    def add_notifier(self, notifier: Notifier) -> None:
        self._notifiers.append(notifier)

    def remove_notifier(self, notifier: Notifier) -> None:
        self._notifiers.remove(notifier)

    def set(self, new: RunState) -> RunState:
        """Move to ``new``; returns the old state. Setting the current state again is a no-op."""
        with self._lock:
            old = self._state
            if new == old:
                return old
            if new not in TRANSITIONS.get(old, frozenset()):
                raise InvalidTransition(f"invalid runstate transition: '{old}' -> '{new}'")
            self._state = new
        for notifier in list(self._notifiers):
            notifier(old, new)
        return old
