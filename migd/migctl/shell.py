"""``migctl shell``: an interactive QMP prompt with history and command-name completion.

Uses ``qemu.qmp``'s synchronous ``QEMUMonitorProtocol``, because a prompt is blocking by nature and
``readline`` wants the main thread. Lines are ``cmd``, ``cmd {json}``, ``cmd key=value ...`` or a whole
``{"execute": ...}`` object; events that arrived meanwhile are printed before each reply.
"""

from __future__ import annotations

import json
import os
import readline  # line editing, completion and history for the interactive shell (stdlib on Linux)
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO, cast

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from migd.migctl.address import QMPAddress
from migd.migctl.client import MigctlError
from migd.migctl.commands import format_event
from migd.migctl.signals import Terminated
from migd.migctl.values import ValueParseError, parse_command_line

PROMPT = "(migd) "
LEAVE_WORDS = frozenset({"exit", "bye", "\\q"})
HELP = ("enter a QMP command: 'cmd', 'cmd {\"arg\": 1}', 'cmd key=value ...' or a full JSON object; "
        "Tab completes command names; 'exit' or Ctrl-D leaves (the QMP command 'quit' stops the daemon)")


def completions(names: Sequence[str], text: str) -> list[str]:
    """Command names starting with ``text``, sorted, for readline."""
    return sorted(name for name in names if name.startswith(text))


def make_completer(names: Sequence[str]) -> Callable[[str, int], str | None]:
    cache: dict[str, list[str]] = {}

    def complete(text: str, state: int) -> str | None:
        options = cache.setdefault(text, completions(names, text))
        return options[state] if state < len(options) else None

    return complete


def history_path() -> str:
    return os.environ.get("MIGCTL_HISTORY") or os.path.join(os.path.expanduser("~"), ".migctl_history")


def _setup_readline(names: Sequence[str]) -> Callable[[], None]:
    """Enable completion and history; returns the function that saves the history."""
    readline.set_completer(make_completer(names))
    readline.set_completer_delims(" \t\n")
    readline.parse_and_bind("tab: complete")
    path = history_path()
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError:
            pass

    return save


def _write(stream: TextIO, value: Any, json_mode: bool) -> None:
    text = json.dumps(value, separators=(",", ":")) if json_mode else json.dumps(value, indent=2)
    stream.write(text + "\n")
    stream.flush()


def run_shell(address: QMPAddress, json_mode: bool = False, stdin: TextIO | None = None,
              stdout: TextIO | None = None) -> int:
    """Read-eval-print over one QMP session; returns 0 at end of input, 1 if the connection is lost."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    qmp = QEMUMonitorProtocol(address)
    try:
        qmp.connect(negotiate=True)
    except (QMPError, OSError) as exc:
        raise MigctlError(f"cannot connect to QMP socket {address}: {exc}") from None
    try:
        # query-commands answers [CommandInfo]; qemu.qmp types every answer as object
        commands = cast(list[dict[str, Any]], qmp.cmd("query-commands"))
        names = [c["name"] for c in commands]
        interactive = stdin.isatty()
        save_history = _setup_readline(names) if interactive else (lambda: None)
        if interactive:
            stdout.write(f"connected to {address}; {HELP}\n")
        try:
            while True:
                try:
                    line = input(PROMPT) if interactive else stdin.readline()
                except EOFError:
                    break
                except Terminated:
                    raise  # SIGTERM ends the shell; Ctrl-C only clears the line
                except KeyboardInterrupt:
                    stdout.write("\n")
                    continue
                if not interactive and line == "":
                    break
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if line in LEAVE_WORDS:
                    break
                if line in ("help", "?"):
                    stdout.write(HELP + "\n")
                    continue
                try:
                    name, arguments = parse_command_line(line)
                except ValueParseError as exc:
                    stdout.write(f"error: {exc}\n")
                    continue
                msg: dict[str, Any] = {"execute": name}
                if arguments is not None:
                    msg["arguments"] = arguments
                try:
                    reply = qmp.cmd_obj(msg)
                except (QMPError, OSError) as exc:
                    stdout.write(f"error: connection lost: {exc}\n")
                    return 1
                for event in qmp.get_events(wait=False):
                    stdout.write(("" if json_mode else "event ") + (
                        json.dumps(event, separators=(",", ":")) if json_mode else format_event(event)) + "\n")
                qmp.clear_events()
                _write(stdout, reply, json_mode)
                if name == "quit":
                    break
        finally:
            save_history()
    finally:
        qmp.close()
    return 0
