"""migd: a live-migration daemon driven over QMP, speaking QEMU's migration stream."""

__version__ = "0.1.0"

# The QEMU version whose QMP and stream behaviour migd reproduces (reported in the QMP greeting).
QEMU_COMPAT_VERSION = (10, 0, 0)
