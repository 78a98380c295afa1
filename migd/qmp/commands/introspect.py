"""``query-qmp-schema`` and ``query-events``: what a client may send and what it may receive.

The schema is derived from the registry (each command's pydantic arguments model) and the table of
events below, so it cannot drift from what the server accepts. Like QEMU, object, enum and array
types get opaque numeric names; builtins keep theirs (``str``, ``int``, ``uint8``, ``bool``, ...).
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, Field

from migd.migration.status import MigrationStatus
from migd.qmp.registry import REGISTRY, CommandContext, command
from migd.qmp.schema import QMPArgs, QMPType

StatusName = Literal[tuple(str(s) for s in MigrationStatus)]  # type: ignore[valid-type]
ShutdownCause = Literal[
    "none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal", "host-ui",
    "guest-shutdown", "guest-reset", "guest-panic", "subsystem-reset", "snapshot-load",
]


class MigrationEvent(QMPArgs):
    status: StatusName  # type: ignore[valid-type]


class MigrationPassEvent(QMPArgs):
    pass_: int = Field(alias="pass")


class ShutdownEvent(QMPArgs):
    guest: bool
    reason: ShutdownCause


# Every event migd emits and the model of its data (None: no data).
EVENTS: dict[str, type[BaseModel] | None] = {
    "MIGRATION": MigrationEvent,
    "MIGRATION_PASS": MigrationPassEvent,
    "RESUME": None,
    "SHUTDOWN": ShutdownEvent,
    "STOP": None,
}

_BUILTIN_JSON = {
    "str": "string", "int": "int", "number": "number", "bool": "boolean", "null": "null", "any": "value",
    "int8": "int", "int16": "int", "int32": "int", "int64": "int",
    "uint8": "int", "uint16": "int", "uint32": "int", "uint64": "int", "size": "int",
}
_PLAIN = {str: "str", bool: "bool", int: "int", float: "number", type(None): "null"}


class _SchemaBuilder:
    """Collects SchemaInfo entries; each type is described once and named by a counter."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._names: dict[Any, str] = {}
        self._builtins: set[str] = set()
        self._next = 0

    def _new_name(self) -> str:
        name = str(self._next)
        self._next += 1
        return name

    def builtin(self, name: str) -> str:
        if name not in self._builtins:
            self._builtins.add(name)
            self.entries.append({"name": name, "meta-type": "builtin", "json-type": _BUILTIN_JSON[name]})
        return name

    def object_type(self, model: type[BaseModel] | None) -> str:
        """The name of an object type with ``model``'s members (None: the empty object)."""
        key = model if model is not None else "empty"
        if key in self._names:
            return self._names[key]
        name = self._new_name()
        self._names[key] = name
        entry: dict[str, Any] = {"name": name, "meta-type": "object", "members": []}
        self.entries.append(entry)
        for field_name, field in (model.model_fields.items() if model is not None else ()):
            member: dict[str, Any] = {"name": field.alias or field_name,
                                      "type": self.type_of(field.annotation, field.metadata)}
            if not field.is_required():
                member["default"] = None
            entry["members"].append(member)
        return name

    def type_of(self, annotation: Any, metadata: list[Any] | None = None) -> str:
        """The schema name of a Python annotation (optional ``X | None`` is ``X``)."""
        for meta in metadata or ():
            if isinstance(meta, QMPType):
                return self.builtin(meta.name)
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin is typing.Annotated:
            return self.type_of(args[0], list(annotation.__metadata__))
        if origin in (Union, types.UnionType):
            real = [a for a in args if a is not type(None)]
            return self.type_of(real[0]) if len(real) == 1 else self.builtin("any")
        if origin is Literal:
            return self._enum(tuple(str(a) for a in args))
        if origin is list:
            return self._array(self.type_of(args[0]) if args else self.builtin("any"))
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return self.object_type(annotation)
        plain = _PLAIN.get(annotation)
        return self.builtin(plain if plain is not None else "any")

    def _enum(self, values: tuple[str, ...]) -> str:
        key = ("enum", values)
        if key not in self._names:
            self._names[key] = name = self._new_name()
            self.entries.append({"name": name, "meta-type": "enum", "values": list(values),
                                 "members": [{"name": v} for v in values]})
        return self._names[key]

    def _array(self, element: str) -> str:
        name = f"[{element}]"
        if ("array", element) not in self._names:
            self._names[("array", element)] = name
            self.entries.append({"name": name, "meta-type": "array", "element-type": element})
        return name


def build_schema() -> list[dict[str, Any]]:
    """SchemaInfo for every registered command and every event (any thread)."""
    builder = _SchemaBuilder()
    commands: list[dict[str, Any]] = []
    for name in sorted(REGISTRY):
        cmd = REGISTRY[name]
        info: dict[str, Any] = {"name": name, "meta-type": "command",
                                "arg-type": builder.object_type(cmd.args_model), "ret-type": builder.builtin("any")}
        if cmd.allow_oob:
            info["allow-oob"] = True
        commands.append(info)
    events = [{"name": name, "meta-type": "event", "arg-type": builder.object_type(model)}
              for name, model in sorted(EVENTS.items())]
    return commands + events + builder.entries


@command("query-qmp-schema")
def query_qmp_schema(ctx: CommandContext, args: None) -> list[dict[str, Any]]:
    return build_schema()


@command("query-events")
def query_events(ctx: CommandContext, args: None) -> list[dict[str, str]]:
    return [{"name": name} for name in sorted(EVENTS)]
