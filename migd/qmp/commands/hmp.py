"""``human-monitor-command``: the HMP commands operators type, tunnelled over QMP (``qmp-shell -H``).

Each HMP command parses its words and calls the registered QMP handlers through the registry (the
same validation, the same refusals, the same texts), then prints the answer in QEMU's layout
(``migd.qmp.hmp_text``). An error prints ``Error: <QEMU's text>`` and the command still succeeds at
the QMP level, as in QEMU. Output lines end in ``\\r\\n`` like QEMU's monitor.
"""

from __future__ import annotations

import inspect
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from migd.migration.params import SPECS
from migd.qmp import hmp_text
from migd.qmp.registry import REGISTRY, CommandContext, QMPError, command
from migd.qmp.schema import QMPArgs, dump, validate
from migd.units import SizeError, parse_size


class HumanMonitorArgs(QMPArgs):
    command_line: str
    cpu_index: int | None = None


class HMPError(Exception):
    """A refusal printed as ``Error: <text>`` (QEMU's hmp_handle_error)."""


async def call_qmp(ctx: CommandContext, name: str, arguments: dict[str, Any] | None = None) -> Any:
    """Run a registered QMP command as a client would (validation included) (event loop)."""
    cmd = REGISTRY[name]
    args = validate(cmd.args_model, arguments or {}) if cmd.args_model is not None else None
    result = cmd.handler(ctx, args)
    if inspect.isawaitable(result):
        result = await result
    return dump(result) if result is not None else {}


HMPHandler = Callable[[CommandContext, list[str]], Awaitable[str]]


@dataclass(frozen=True)
class HMPCommand:
    name: str
    params: str  # the argument synopsis shown by ``help``
    help: str
    handler: HMPHandler


COMMANDS: dict[str, HMPCommand] = {}
INFO: dict[str, HMPCommand] = {}


def hmp(name: str, params: str, help_: str, table: dict[str, HMPCommand] = COMMANDS) -> Callable[[HMPHandler], HMPHandler]:
    """Register an HMP command (or an ``info`` subcommand with ``table=INFO``)."""

    def register(fn: HMPHandler) -> HMPHandler:
        table[name] = HMPCommand(name, params, help_, fn)
        return fn

    return register


def _arity(argv: list[str], name: str, lo: int, hi: int) -> None:
    if len(argv) < lo:
        raise HMPError(f"{name}: missing argument")
    if len(argv) > hi:
        raise HMPError(f"{name}: extraneous characters at the end of line")


# -- info --------------------------------------------------------------------------------------------

@hmp("migrate", "[-a]", "show migration status (-a: all information)", INFO)
async def info_migrate(ctx: CommandContext, argv: list[str]) -> str:
    show_all = "-a" in argv
    _arity([a for a in argv if a != "-a"], "info migrate", 0, 0)
    return hmp_text.info_migrate(await call_qmp(ctx, "query-migrate"), show_all)


@hmp("status", "", "show the current VM status (running|paused)", INFO)
async def info_status(ctx: CommandContext, argv: list[str]) -> str:
    _arity(argv, "info status", 0, 0)
    return hmp_text.info_status(await call_qmp(ctx, "query-status"))


@hmp("migrate_parameters", "", "show current migration parameters", INFO)
async def info_migrate_parameters(ctx: CommandContext, argv: list[str]) -> str:
    _arity(argv, "info migrate_parameters", 0, 0)
    return hmp_text.info_migrate_parameters(await call_qmp(ctx, "query-migrate-parameters"))


@hmp("migrate_capabilities", "", "show current migration capabilities", INFO)
async def info_migrate_capabilities(ctx: CommandContext, argv: list[str]) -> str:
    _arity(argv, "info migrate_capabilities", 0, 0)
    return hmp_text.info_migrate_capabilities(await call_qmp(ctx, "query-migrate-capabilities"))


@hmp("version", "", "show the version of QEMU", INFO)
async def info_version(ctx: CommandContext, argv: list[str]) -> str:
    v = await call_qmp(ctx, "query-version")
    q = v["qemu"]
    return f"{q['major']}.{q['minor']}.{q['micro']} ({v['package']})\n"


# -- commands ------------------------------------------------------------------------------------------

@hmp("info", "[subcommand]", "show various information about the system state")
async def info(ctx: CommandContext, argv: list[str]) -> str:
    if not argv:
        return _listing("info ", INFO)
    sub = INFO.get(argv[0])
    if sub is None:
        return f"unknown command: 'info {argv[0]}'\n"
    return await sub.handler(ctx, argv[1:])


@hmp("help|?", "[cmd]", "show the help")
async def help_(ctx: CommandContext, argv: list[str]) -> str:
    if argv and argv[0] == "info":
        return _listing("info ", INFO)
    if argv:
        found = _lookup(argv[0])
        if found is None:
            return f"unknown command: '{argv[0]}'\n"
        return _listing("", {found.name: found})
    return _listing("", COMMANDS)


@hmp("stop|s", "", "stop emulation")
async def stop(ctx: CommandContext, argv: list[str]) -> str:
    _arity(argv, "stop", 0, 0)
    await call_qmp(ctx, "stop")
    return ""


@hmp("cont|c", "", "resume emulation")
async def cont(ctx: CommandContext, argv: list[str]) -> str:
    _arity(argv, "cont", 0, 0)
    await call_qmp(ctx, "cont")
    return ""


@hmp("migrate", "[-d] [-r] uri", "migrate to URI (using -d to not wait for completion, -r to resume)")
async def migrate(ctx: CommandContext, argv: list[str]) -> str:
    flags = [a for a in argv if a in ("-d", "-r")]
    rest = [a for a in argv if a not in ("-d", "-r")]
    _arity(rest, "migrate", 1, 1)
    await call_qmp(ctx, "migrate", {"uri": rest[0], "resume": "-r" in flags})
    if "-d" not in flags:  # a monitor reached over QMP cannot be suspended until completion
        return "terminal does not allow synchronous migration, continuing detached\n"
    return ""


@hmp("migrate_cancel", "", "cancel the current VM migration")
async def migrate_cancel(ctx: CommandContext, argv: list[str]) -> str:
    _arity(argv, "migrate_cancel", 0, 0)
    await call_qmp(ctx, "migrate_cancel")
    return ""


@hmp("migrate_set_parameter", "parameter value", "Set the parameter for migration")
async def migrate_set_parameter(ctx: CommandContext, argv: list[str]) -> str:
    _arity(argv, "migrate_set_parameter", 2, 2)
    name, text = argv
    await call_qmp(ctx, "migrate-set-parameters", {name: parameter_value(name, text)})
    return ""


@hmp("migrate_set_capability", "capability state", "Enable/Disable the usage of a capability for migration")
async def migrate_set_capability(ctx: CommandContext, argv: list[str]) -> str:
    _arity(argv, "migrate_set_capability", 2, 2)
    name, state = argv
    if state not in ("on", "off"):
        raise HMPError("Expected 'on' or 'off'")
    if not any(c["capability"] == name for c in await call_qmp(ctx, "query-migrate-capabilities")):
        raise HMPError(f"invalid parameter value: {name}")
    await call_qmp(ctx, "migrate-set-capabilities", {"capabilities": [{"capability": name, "state": state == "on"}]})
    return ""


# -- argument values ---------------------------------------------------------------------------------

def parameter_value(name: str, text: str) -> Any:
    """``migrate_set_parameter``'s value as the QMP member of ``name`` (QEMU's texts for bad input)."""
    spec = SPECS.get(name)
    if spec is None:
        raise HMPError(f"invalid parameter value: {name}")
    if spec.kind == "size":
        try:
            return parse_size(text)
        except SizeError:
            raise HMPError(f"Parameter '{name}' expects a size") from None
    if spec.kind in ("uint8", "uint32", "uint64"):
        try:
            number = int(text, 0)
        except ValueError:
            raise HMPError(f"Parameter '{name}' expects uint64") from None
        return number
    if spec.kind == "bool":
        if text in ("on", "yes", "true", "y"):
            return True
        if text in ("off", "no", "false", "n"):
            return False
        raise HMPError(f"Parameter '{name}' expects 'on' or 'off'")
    if spec.kind == "list":
        raise HMPError(f"The {name} parameter can only be set through QMP")
    return text


# -- dispatch ----------------------------------------------------------------------------------------

def _lookup(word: str) -> HMPCommand | None:
    for cmd in COMMANDS.values():
        if word in cmd.name.split("|"):
            return cmd
    return None


def _listing(prefix: str, table: dict[str, HMPCommand]) -> str:
    lines = []
    for cmd in sorted(table.values(), key=lambda c: c.name):
        synopsis = f"{prefix}{cmd.name} {cmd.params}".rstrip()
        lines.append(f"{synopsis} -- {cmd.help}\n")
    return "".join(lines)


async def run_line(ctx: CommandContext, line: str) -> str:
    """One HMP command line's output, ``\\n`` line ends (event loop)."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        return f"Error: {exc}\n"
    if not words:
        return ""
    cmd = _lookup(words[0])
    if cmd is None:
        return f"unknown command: '{words[0]}'\n"
    try:
        return await cmd.handler(ctx, words[1:])
    except (QMPError, HMPError) as exc:
        return f"Error: {exc}\n"


@command("human-monitor-command", HumanMonitorArgs)
async def human_monitor_command(ctx: CommandContext, args: HumanMonitorArgs) -> str:
    """Run ``command-line`` as HMP and return what it printed, ``\\r\\n`` line ends (event loop)."""
    if args.cpu_index is not None and not 0 <= args.cpu_index < ctx.daemon.config.machine.smp:
        raise QMPError("Parameter 'cpu-index' expects a CPU number")
    text = await run_line(ctx, args.command_line)
    return text.replace("\n", "\r\n")

