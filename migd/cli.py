"""The ``migd`` command line: options (QEMU's spirit) -> DaemonConfig -> a running Daemon.

A bad value exits with status 2 and one line naming the option, before anything is started.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, NoReturn

from migd import __version__
from migd.config import ConfigError, DaemonConfig, build, load_toml
from migd.daemon import Daemon
from migd.gcfreeze import freeze_startup_objects
from migd.gilprobe import start_from_env as start_gil_probe
from migd.logsetup import setup_logging
from migd.memtrim import fix_mmap_threshold


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"migd: error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="migd", description="Host one machine and migrate it live, driven over QMP.")
    # Defaults are None so that a value from --config is only overridden when given here.
    p.add_argument("--name", help="machine name (query-name)")
    p.add_argument("-m", "--memory", metavar="SIZE", help="guest RAM; a bare number is MiB, K/M/G/T/P/E[B|iB] suffixes (default 256M)")
    p.add_argument("--smp", metavar="N", help="number of vCPUs (default 1)")
    p.add_argument("--workload", metavar="SPEC", help="what the vCPUs run (default idle)")
    p.add_argument("--drive", metavar="file=PATH[,cache=MODE]", action="append", help="a drive (repeatable)")
    p.add_argument("--mem-path", metavar="FILE[,share=on]",
                   help="back guest RAM with this file (locked; share=on lets others map it too)")
    p.add_argument("--qmp", metavar="unix:PATH|tcp:HOST:PORT", action="append", help="QMP listener (repeatable)")
    p.add_argument("--incoming", metavar="URI|defer", help="wait for an incoming migration")
    p.add_argument("-S", dest="S", action="store_true", default=None, help="start paused (prelaunch)")
    p.add_argument("--http", metavar="HOST:PORT", help="HTTP status/metrics endpoint")
    p.add_argument("--object", metavar="TYPE,id=ID[,PROP=VALUE...]", action="append",
                   help="tls-creds-x509 or authz-simple object, as QEMU's -object (repeatable)")
    p.add_argument("--config", metavar="FILE", type=Path, help="TOML file with the same keys")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    p.add_argument("--version", action="version", version=f"migd {__version__}")
    return p


def _smp(value: str) -> int:
    if not value.strip().isdigit():
        raise ConfigError("--smp", f"'{value}' is not a positive integer")
    return int(value)


def parse_config(argv: list[str] | None = None) -> DaemonConfig:
    """Parse options (and the --config file under them); raise ConfigError on a bad value."""
    ns = make_parser().parse_args(argv)
    values: dict[str, Any] = load_toml(ns.config) if ns.config else {}
    if "S" in values:
        values["start-paused"] = values.pop("S")
    cli = {k.replace("_", "-"): v for k, v in vars(ns).items() if v is not None and k != "config"}
    if "S" in cli:
        cli["start-paused"] = cli.pop("S")
    if "smp" in cli:
        cli["smp"] = _smp(cli["smp"])
    values = {k.replace("_", "-"): v for k, v in values.items()}
    values.update(cli)
    return build(values)


def main(argv: list[str] | None = None) -> int:
    try:
        config = parse_config(argv)
    except ConfigError as exc:
        print(f"migd: error: {exc}", file=sys.stderr)
        return 2
    if not config.qmp:  # a daemon nobody can reach
        print("migd: error: --qmp: no QMP endpoint given (unix:PATH or tcp:HOST:PORT)", file=sys.stderr)
        return 2
    setup_logging(config.log_level)
    fix_mmap_threshold()  # no RSS growth per migration (migd/memtrim.py)
    start_gil_probe()  # debug only: MIGD_GIL_PROBE=1 (migd/gilprobe.py)
    freeze_startup_objects()  # full collections skip the import-time objects (migd/gcfreeze.py)
    return Daemon(config).run()


if __name__ == "__main__":
    raise SystemExit(main())
