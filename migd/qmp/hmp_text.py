"""QEMU's HMP text layouts, built from the QMP answers they summarise.

Scripts parse ``info migrate`` and friends, so the layouts (labels, tabs, units, the way sizes are
rounded) follow QEMU 10's monitor. Every function here is pure: QMP data in, text out, ``\\n`` line
ends (the monitor turns them into ``\\r\\n``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from migd.transports.uri import socket_address_text

_SIZE_SUFFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def size_to_str(value: int) -> str:
    """A byte count as QEMU's monitor prints it: three significant digits, binary units ("16.5 MiB")."""
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    unit = max(0, min((exp - 1) // 10, len(_SIZE_SUFFIXES) - 1))
    return f"{_g3(value / (1 << (unit * 10)))} {_SIZE_SUFFIXES[unit]}B"


def _g3(x: float) -> str:
    """C's ``%0.3g``."""
    return f"{x:.3g}"


def _onoff(flag: Any) -> str:
    return "on" if flag else "off"


def info_migrate(info: Mapping[str, Any], show_all: bool = False) -> str:
    """``info migrate`` (QEMU 10's layout) from a query-migrate answer; empty when nothing happened."""
    out: list[str] = []
    status = info.get("status")
    if status is not None:
        line = f"Status: \t\t{status}"
        if status in ("failed", "postcopy-paused") and info.get("error-desc"):
            line += f" ({info['error-desc']})"
        out.append(line)
        if info.get("total-time"):
            line = f"Time (ms): \t\ttotal={info['total-time']}"
            for key, label in (("setup-time", "setup"), ("expected-downtime", "exp_down"), ("downtime", "down")):
                if key in info:
                    line += f", {label}={info[key]}"
            out.append(line)
    ram = info.get("ram")
    if ram is not None:
        out.append("RAM info:")
        out.append(f"  Throughput (Mbps): \t{ram.get('mbps', 0):0.2f}")
        out.append(f"  Sizes: \t\tpagesize={size_to_str(ram.get('page-size', 0))}, "
                   f"total={size_to_str(ram.get('total', 0))}")
        out.append(f"  Transfers: \t\ttransferred={size_to_str(ram.get('transferred', 0))}, "
                   f"remain={size_to_str(ram.get('remaining', 0))}")
        out.append(f"    Channels: \t\tprecopy={size_to_str(ram.get('precopy-bytes', 0))}, "
                   f"multifd={size_to_str(ram.get('multifd-bytes', 0))}, "
                   f"postcopy={size_to_str(ram.get('postcopy-bytes', 0))}")
        out.append(f"    Page Types: \tnormal={ram.get('normal', 0)}, zero={ram.get('duplicate', 0)}")
        line = f"  Page Rates (pps): \ttransfer={ram.get('pages-per-second', 0)}"
        if ram.get("dirty-pages-rate"):
            line += f", dirty={ram['dirty-pages-rate']}"
        out.append(line)
        line = f"  Others: \t\tdirty_syncs={ram.get('dirty-sync-count', 0)}"
        for key, label in (("postcopy-requests", "postcopy_req"), ("downtime-bytes", "downtime_ram"),
                           ("dirty-sync-missed-zero-copy", "zerocopy_fallbacks")):
            if ram.get(key):
                line += f", {label}={ram[key]}"
        out.append(line)
    if "cpu-throttle-percentage" in info:
        out.append(f"CPU Throttle (%): {info['cpu-throttle-percentage']}")
    sockets: Sequence[Mapping[str, Any]] = info.get("socket-address") or ()
    if show_all and sockets:
        out.append("Sockets: [")
        out.extend(f"\t{socket_address_text(a)}" for a in sockets)
        out.append("]")
    return "".join(line + "\n" for line in out)


def info_status(status: Mapping[str, Any]) -> str:
    """``info status`` from query-status: ``VM status: paused (postmigrate)``."""
    running = bool(status.get("running"))
    text = f"VM status: {'running' if running else 'paused'}"
    state = status.get("status")
    if not running and state != "paused":
        text += f" ({state})"
    return text + "\n"


# (name, unit) in the order QEMU's monitor prints the migration parameters; a unit of "'" quotes.
_PARAM_LAYOUT: tuple[tuple[str, str], ...] = (
    ("announce-initial", " ms"),
    ("announce-max", " ms"),
    ("announce-rounds", ""),
    ("announce-step", " ms"),
    ("throttle-trigger-threshold", ""),
    ("cpu-throttle-initial", ""),
    ("cpu-throttle-increment", ""),
    ("cpu-throttle-tailslow", ""),
    ("max-cpu-throttle", ""),
    ("tls-creds", "'"),
    ("tls-hostname", "'"),
    ("max-bandwidth", " bytes/second"),
    ("avail-switchover-bandwidth", " bytes/second"),
    ("downtime-limit", " ms"),
    ("x-checkpoint-delay", " ms"),
    ("multifd-channels", ""),
    ("multifd-compression", ""),
    ("zero-page-detection", ""),
    ("xbzrle-cache-size", " bytes"),
    ("max-postcopy-bandwidth", ""),
    ("tls-authz", "'"),
    ("x-vcpu-dirty-limit-period", " ms"),
    ("vcpu-dirty-limit", " MB/s"),
    ("mode", ""),
    ("direct-io", ""),
)


def info_migrate_parameters(params: Mapping[str, Any]) -> str:
    """``info migrate_parameters`` from query-migrate-parameters."""
    out: list[str] = []
    for name, unit in _PARAM_LAYOUT:
        if name not in params:
            continue
        value = params[name]
        if isinstance(value, bool):
            text = _onoff(value)
        elif unit == "'":
            text = f"'{value}'"
        else:
            text = f"{value}{unit}"
        out.append(f"{name}: {text}")
    return "".join(line + "\n" for line in out)


def info_migrate_capabilities(caps: Sequence[Mapping[str, Any]]) -> str:
    """``info migrate_capabilities`` from query-migrate-capabilities: ``events: on``."""
    return "".join(f"{c['capability']}: {_onoff(c['state'])}\n" for c in caps)
