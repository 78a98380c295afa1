"""The one-shot subcommands: each one a short conversation with the daemon over QMP.

Every function takes the connected client, the parsed arguments and the output, and returns the exit
status. Errors from the daemon are raised as ``CommandFailed`` and reported with QEMU's own text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from migd.migctl.client import Client, CommandFailed, MigctlError
from migd.migctl.display import status_table, summary_table
from migd.migctl.output import Output
from migd.migctl.values import ValueParseError, parse_capabilities, parse_parameters, parse_size
from migd.migctl.watch import NO_LIMITS, Limits, WaitResult, wait_for_migration
from migd.transports.uri import socket_address_text

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


async def status(client: Client, args: argparse.Namespace, out: Output) -> int:
    run = await client.execute("query-status")
    info = await client.execute("query-migrate")
    if out.json_mode:
        out.data({"status": run, "migration": info})
    else:
        out.show(status_table(run, info))
    return EXIT_OK


async def migrate(client: Client, args: argparse.Namespace, out: Output) -> int:
    params: dict[str, Any] = {}
    if args.bandwidth is not None:
        params["max-bandwidth"] = parse_size(args.bandwidth)
    if args.downtime is not None:
        params["downtime-limit"] = args.downtime
    if params:
        await client.execute("migrate-set-parameters", params)
    if args.auto_converge:
        await client.execute("migrate-set-capabilities",
                             {"capabilities": [{"capability": "auto-converge", "state": True}]})
    await client.execute("migrate", {"uri": args.uri})
    if not args.wait:
        if out.json_mode:
            out.data({})
        else:
            out.line(f"migration to {args.uri} started")
        return EXIT_OK
    limits = Limits(stall_warn=args.stall_warn, time_limit=args.time_limit)
    code, _ = await follow(client, out, interval=args.interval, limits=limits)
    return code


async def follow(client: Client, out: Output, interval: float = 0.2,
                 limits: Limits = NO_LIMITS) -> tuple[int, WaitResult]:
    """Wait for the running migration to end, then print the summary; shared with the demo."""
    result = await wait_for_migration(client, out, interval=interval, limits=limits)
    info, interrupted = result.info, result.interrupted
    status_name = info.get("status")
    if status_name not in ("completed", "failed", "cancelled"):
        out.error(f"stopped waiting; the migration is still '{status_name}'")
        return EXIT_INTERRUPTED, result
    if out.json_mode:
        out.data(info)
    else:
        limit = await _downtime_limit(client)
        out.show(summary_table(info, limit))
    if status_name != "completed":
        if result.gave_up is not None:
            reason = result.gave_up
        else:
            reason = info.get("error-desc", "cancelled by the operator" if interrupted else status_name)
        out.error(f"migration {status_name}: {reason}")
        return EXIT_FAILED, result
    return EXIT_OK, result


async def _downtime_limit(client: Client) -> int | None:
    try:
        params = await client.execute("query-migrate-parameters")
    except MigctlError:
        return None
    value = params.get("downtime-limit") if isinstance(params, dict) else None
    return value if isinstance(value, int) else None


async def cancel(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.execute("migrate_cancel")
    if out.json_mode:
        out.data({})
    else:
        out.line("cancel requested")
    return EXIT_OK


async def set_parameters(client: Client, args: argparse.Namespace, out: Output) -> int:
    try:
        params = parse_parameters(args.assignments)
    except ValueParseError as exc:
        raise MigctlError(str(exc)) from None
    await client.execute("migrate-set-parameters", params)
    now = await client.execute("query-migrate-parameters")
    shown = {name: now.get(name) for name in params} if isinstance(now, dict) else {}
    if out.json_mode:
        out.data(shown)
    else:
        for name, value in shown.items():
            out.line(f"{name} = {json.dumps(value)}")
    return EXIT_OK


async def capabilities(client: Client, args: argparse.Namespace, out: Output) -> int:
    try:
        caps = parse_capabilities(args.assignments)
    except ValueParseError as exc:
        raise MigctlError(str(exc)) from None
    if caps:
        await client.execute("migrate-set-capabilities", {"capabilities": caps})
    current = await client.execute("query-migrate-capabilities")
    if out.json_mode:
        out.data(current)
    else:
        for cap in current:
            out.line(f"{cap['capability']:<24} {'on' if cap['state'] else 'off'}")
    return EXIT_OK


async def incoming(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Start listening; print the address really listened on (``tcp:HOST:0`` gets its port)."""
    await client.execute("migrate-incoming", {"uri": args.uri})
    info = await client.execute("query-migrate")
    addresses = info.get("socket-address") if isinstance(info, dict) else None
    shown = [socket_address_text(a, bracket_ipv6=True) for a in addresses or [] if isinstance(a, dict)] or [args.uri]
    if out.json_mode:
        out.data({"socket-address": addresses} if addresses else {})
    else:
        out.line(f"waiting for an incoming migration on {', '.join(shown)}")
    return EXIT_OK


def format_event(event: dict[str, Any]) -> str:
    ts = event.get("timestamp") or {}
    seconds = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
    when = time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{ts.get('microseconds', 0) // 1000:03d}"
    data = event.get("data")
    return f"{when} {event.get('event')}" + (f" {json.dumps(data)}" if data is not None else "")


async def events(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Print events as they come, until --count events, --timeout seconds or the daemon goes away."""
    if args.enable:
        await client.execute("migrate-set-capabilities",
                             {"capabilities": [{"capability": "events", "state": True}]})
    listener = client.qmp.events
    seen = 0
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    out.line(f"following events on {client.describe()} (Ctrl-C to stop)")
    while args.count is None or seen < args.count:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            break
        get = asyncio.ensure_future(listener.get())
        gone = asyncio.ensure_future(client.qmp.runstate_changed())
        done, _ = await asyncio.wait({get, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if get not in done:
            get.cancel()
            gone.cancel()
            if gone in done:
                break
            continue
        gone.cancel()
        event = dict(get.result())
        seen += 1
        if out.json_mode:
            out.data(event)
        else:
            out.line(format_event(event))
    return EXIT_OK


async def raw(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Send one QMP command written as JSON; print QEMU's whole reply (return or error)."""
    try:
        msg = json.loads(args.message)
    except ValueError as exc:
        raise MigctlError(f"invalid JSON: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
        raise MigctlError("raw needs a JSON object with a string 'execute' member")
    arguments = msg.get("arguments")
    try:
        value = await client.execute(msg["execute"], arguments)
    except CommandFailed as exc:
        out.data({"error": {"class": exc.error_class, "desc": exc.desc}})
        return EXIT_FAILED
    out.data({"return": value})
    return EXIT_OK
