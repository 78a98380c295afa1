"""The migration status names and the sets of them QEMU's rules are written in (a leaf module).

Source and destination, the QMP commands, ``/metrics`` and the tests all name states from here, so
there is one list of them: QEMU 10.0's ``MigrationStatus`` enum, in enum order.
"""

from __future__ import annotations

from enum import StrEnum


class MigrationStatus(StrEnum):
    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"


M = MigrationStatus

# QEMU's migration_is_running(): most configuration commands are refused in these.
RUNNING_STATES = frozenset({
    M.SETUP, M.ACTIVE, M.POSTCOPY_ACTIVE, M.POSTCOPY_PAUSED, M.POSTCOPY_RECOVER_SETUP,
    M.POSTCOPY_RECOVER, M.PRE_SWITCHOVER, M.DEVICE, M.WAIT_UNPLUG, M.CANCELLING, M.COLO,
})
POSTCOPY_STATES = frozenset({M.POSTCOPY_ACTIVE, M.POSTCOPY_PAUSED, M.POSTCOPY_RECOVER_SETUP,
                             M.POSTCOPY_RECOVER})
# states in which a source's query-migrate shows times, expected-downtime and ram
PROGRESS_STATES = frozenset({M.ACTIVE, M.CANCELLING, M.PRE_SWITCHOVER, M.DEVICE})
# where a migration ends; a new one may start from any of these (or from none)
TERMINAL_STATES = frozenset({M.COMPLETED, M.FAILED, M.CANCELLED})
