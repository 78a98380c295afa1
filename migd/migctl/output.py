"""Where migctl writes: rich tables for people, one JSON document per line for scripts (``--json``)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from rich.console import Console, RenderableType


@dataclass
class Output:
    json_mode: bool = False
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    console: Console = field(init=False)

    def __post_init__(self) -> None:
        self.console = Console(file=self.stream, highlight=False, soft_wrap=True)

    def data(self, value: Any) -> None:
        """A machine-readable result: compact JSON on one line in --json mode, pretty JSON otherwise."""
        if self.json_mode:
            self.stream.write(json.dumps(value, separators=(",", ":")) + "\n")
            self.stream.flush()
        else:
            self.console.print_json(json.dumps(value))

    def show(self, renderable: RenderableType) -> None:
        if not self.json_mode:
            self.console.print(renderable)

    def line(self, text: str) -> None:
        if not self.json_mode:
            self.console.print(text, markup=False)

    def error(self, text: str) -> None:
        sys.stderr.write(f"migctl: {text}\n")
        sys.stderr.flush()
