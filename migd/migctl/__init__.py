"""migctl: the operator's client for migd (and QEMU), built on QEMU's own ``qemu.qmp`` library.

``main(argv)`` parses the command line, connects, runs one subcommand and returns its exit status:
0 success, 1 the daemon refused or the migration failed/was cancelled, 2 bad usage, 130 interrupted.
SIGTERM is handled exactly like Ctrl-C (what migctl started is cancelled, its daemons and files are
removed, the terminal is restored). The global options (``-s``, ``--json``, ...) may come before or
after the subcommand.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence

from migd.migctl import commands
from migd.migctl.address import AddressError, parse_address
from migd.migctl.analyze_cmd import add_analyze_arguments, run_analyze
from migd.migctl.client import Client, CommandFailed, MigctlError, quiet_library_logs
from migd.migctl.convergence import STALL_AFTER
from migd.migctl.demo import add_demo_arguments, run_demo
from migd.migctl.output import Output
from migd.migctl.shell import run_shell
from migd.migctl.signals import sigterm_like_ctrl_c

Handler = Callable[[Client, argparse.Namespace, Output], Awaitable[int]]

DEFAULT_SOCKET_ENV = "MIGCTL_SOCKET"


def _global_options(p: argparse.ArgumentParser, top: bool) -> None:
    """The options accepted on both sides of the subcommand; only the top level has defaults, so a
    subcommand's parser leaves an option given before it alone."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    p.add_argument("-s", "--socket", default=default(os.environ.get(DEFAULT_SOCKET_ENV)),
                   help=f"QMP socket: unix path, unix:PATH, or tcp:HOST:PORT (default ${DEFAULT_SOCKET_ENV})")
    p.add_argument("--connect-timeout", type=float, default=default(10.0),
                   help="seconds to wait for the connection")
    p.add_argument("-v", "--verbose", action="store_true", default=default(False),
                   help="show the QMP library's own log")
    p.add_argument("--json", action="store_true", default=default(False),
                   help="machine-readable output, one JSON per line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migctl", description="Control a migd (or QEMU) over QMP.")
    _global_options(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, top=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Handler | None, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        return p

    add("status", commands.status, "guest run state and migration status")
    p = add("migrate", commands.migrate, "start an outgoing migration")
    p.add_argument("uri", help="destination, e.g. unix:/path, tcp:host:port, exec:cmd, file:/path")
    p.add_argument("--bandwidth", help="max-bandwidth in bytes/s (K/M/G suffixes; 0 = unlimited)")
    p.add_argument("--downtime", type=int, metavar="MS", help="downtime-limit in milliseconds")
    p.add_argument("--auto-converge", action="store_true", help="enable the auto-converge capability")
    p.add_argument("--wait", action="store_true",
                   help="follow the migration with a live display and a final summary; exit 1 if it fails or is "
                        "cancelled, Ctrl-C or SIGTERM cancels it (with --json: progress lines, then query-migrate)")
    p.add_argument("--stall-warn", type=float, default=STALL_AFTER, metavar="S",
                   help=f"warn when remaining makes no new low for S seconds (default {STALL_AFTER:.0f})")
    p.add_argument("--time-limit", type=float, metavar="S", help="cancel the migration if it runs longer than S s")
    p.add_argument("--interval", type=float, default=0.2, help=argparse.SUPPRESS)
    add("cancel", commands.cancel, "cancel the running migration (migrate_cancel)")
    p = add("set", commands.set_parameters, "set migration parameters")
    p.add_argument("assignments", nargs="+", metavar="PARAM=VALUE")
    p = add("caps", commands.capabilities, "show, or set, migration capabilities")
    p.add_argument("assignments", nargs="*", metavar="CAP=on|off")
    p = add("events", commands.events, "print QMP events as they arrive")
    p.add_argument("--count", type=int, help="stop after this many events")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--enable", action="store_true", help="turn the 'events' capability on first")
    p = add("incoming", commands.incoming, "start listening for an incoming migration (migrate-incoming)")
    p.add_argument("uri")
    add("shell", None, "interactive QMP prompt with history and completion")
    p = add("raw", commands.raw, "send one QMP command written as JSON")
    p.add_argument("message", metavar="JSON", help='e.g. \'{"execute": "query-status"}\'')
    p = add("analyze", None, "read a saved migration stream (file): sections, RAM blocks, devices")
    add_analyze_arguments(p)
    p = add("demo", None, "migrate a running machine between two local migd processes")
    add_demo_arguments(p)
    return parser


async def _run(handler: Handler, args: argparse.Namespace, out: Output) -> int:
    client = Client(parse_address(args.socket))
    await client.connect(timeout=args.connect_timeout)
    try:
        return await handler(client, args, out)
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_library_logs(args.verbose)
    out = Output(json_mode=args.json)
    with sigterm_like_ctrl_c():
        return _main(parser, args, out)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, out: Output) -> int:
    try:
        if args.command == "analyze":
            return run_analyze(args, out)
        if args.command == "demo":
            return run_demo(args, out)
        if not args.socket:
            parser.error(f"-s/--socket is required (or set ${DEFAULT_SOCKET_ENV})")
        if args.command == "shell":
            return run_shell(parse_address(args.socket), json_mode=args.json)
        return asyncio.run(_run(args.handler, args, out))
    except AddressError as exc:
        out.error(str(exc))
        return 2
    except CommandFailed as exc:
        if out.json_mode:
            out.data({"error": {"class": exc.error_class, "desc": exc.desc}})
        out.error(f"{exc.command}: {exc.desc}")
        return commands.EXIT_FAILED
    except MigctlError as exc:
        out.error(str(exc))
        return commands.EXIT_FAILED
    except KeyboardInterrupt:
        out.error("interrupted")
        return commands.EXIT_INTERRUPTED

