"""Pydantic models for QMP arguments and returns, and QEMU's texts for bad arguments.

Write a command's arguments as a subclass of :class:`QMPArgs`; Python names use ``_`` and the wire
names are the hyphenated ones automatically (``max_bandwidth`` <-> ``max-bandwidth``); give
``Field(alias=...)`` for a wire name that keeps an underscore. Validation is strict like QEMU's
visitor: a JSON int is the only integer (``true`` and ``1.0`` are not), unknown members are refused,
enums are ``Literal``/``Enum`` values compared exactly. Example::

    class MigrateArgs(QMPArgs):
        uri: str | None = None
        detach: bool = False
        resume: bool = False

    class SetParamsArgs(QMPArgs):
        max_bandwidth: UInt64 | None = None      # wire name "max-bandwidth"
        downtime_limit: UInt64 | None = None

    @command("migrate", MigrateArgs)
    def qmp_migrate(ctx, args: MigrateArgs): ...

A ``field_validator`` that raises ``ValueError("<QEMU's text>")`` has that text sent verbatim as a
GenericError. :func:`validate` runs a model and turns pydantic's ValidationError into :class:`QMPError`.
Returns may be plain dicts or :class:`QMPModel` instances (serialised by alias, ``None`` members left out).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import ErrorDetails

from migd.qmp.registry import QMPError


def _wire_name(name: str) -> str:
    return name.replace("_", "-")


class QMPArgs(BaseModel):
    """Base of every command's arguments: strict, closed, hyphenated wire names."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        alias_generator=_wire_name,
        populate_by_name=False,
        frozen=True,
    )


class QMPModel(BaseModel):
    """Base of structured returns: built with Python names, serialised with the wire names."""

    model_config = ConfigDict(alias_generator=_wire_name, populate_by_name=True)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class QMPType:
    """Marks an integer type with QEMU's name, used in "Parameter 'x' expects uint8"."""

    def __init__(self, name: str) -> None:
        self.name = name


def _int_type(name: str, lo: int, hi: int) -> Any:
    return Annotated[int, Field(ge=lo, le=hi), QMPType(name)]


Int8 = _int_type("int8", -(1 << 7), (1 << 7) - 1)
Int16 = _int_type("int16", -(1 << 15), (1 << 15) - 1)
Int32 = _int_type("int32", -(1 << 31), (1 << 31) - 1)
Int64 = _int_type("int64", -(1 << 63), (1 << 63) - 1)
UInt8 = _int_type("uint8", 0, (1 << 8) - 1)
UInt16 = _int_type("uint16", 0, (1 << 16) - 1)
UInt32 = _int_type("uint32", 0, (1 << 32) - 1)
UInt64 = _int_type("uint64", 0, (1 << 64) - 1)
Size = _int_type("size", 0, (1 << 64) - 1)

_TYPE_NAMES = {
    "int_type": "integer",
    "int_parsing": "integer",
    "int_from_float": "integer",
    "string_type": "string",
    "bool_type": "boolean",
    "bool_parsing": "boolean",
    "float_type": "number",
    "float_parsing": "number",
    "dict_type": "object",
    "model_type": "object",
    "model_attributes_type": "object",
    "dataclass_type": "object",
    "list_type": "array",
    "tuple_type": "array",
    "none_required": "null",
}
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_long", "too_short"}
_UNION_TAGS = {"str", "int", "bool", "float", "none", "list", "dict", "is-instance", "literal"}

M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], arguments: dict[str, Any]) -> M:
    """Validate QMP ``arguments`` against ``model``; raise QMPError with QEMU's text if they are bad.

    Strict mode refuses a plain string for an ``Enum`` member: use ``Literal[...]`` for QAPI enums
    (or ``Annotated[MyEnum, Strict(False)]``).
    """
    try:
        return model.model_validate(arguments)
    except ValidationError as exc:
        raise qmp_error(exc, model) from None


def qmp_error(exc: ValidationError, model: type[BaseModel] | None = None) -> QMPError:
    """The QMPError QEMU would report for the first problem (declared members first, extras last)."""
    errors = exc.errors()
    errors.sort(key=lambda e: e["type"] == "extra_forbidden")
    return QMPError(describe(errors[0], model))


def describe(err: ErrorDetails, model: type[BaseModel] | None = None) -> str:
    kind = err["type"]
    name = member_name(err["loc"])
    if kind == "missing":
        return f"Parameter '{name}' is missing"
    if kind == "extra_forbidden":
        return f"Parameter '{name}' is unexpected"
    if kind in ("enum", "literal_error"):
        return f"Parameter '{enum_member_name(err['loc'])}' does not accept value '{_text(err.get('input'))}'"
    if kind in _TYPE_NAMES:
        return f"Invalid parameter type for '{name}', expected: {_TYPE_NAMES[kind]}"
    if kind in _RANGE_ERRORS:
        return f"Parameter '{name}' expects {_type_name(model, err)}"
    if kind in ("value_error", "assertion_error"):
        ctx = err.get("ctx") or {}
        return str(ctx.get("error", err["msg"]))
    return f"Parameter '{name}' {err['msg']}"


def member_name(loc: tuple[int | str, ...]) -> str:
    """QEMU's name for a nested member: ``capabilities[0].state``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or "[" in part:
            continue  # pydantic's tag for a union member, not a member name
        else:
            out += f".{part}" if out else part
    return out or "null"


def enum_member_name(loc: tuple[int | str, ...]) -> str:
    """QEMU's name in an enum error: the member alone (``capability``), ``null`` for a list element.

    QEMU's enum visitor knows only the name it was called with, not the path to it; type errors
    (reported by the input visitor) carry the full path, see :func:`member_name`.
    """
    names = [part for part in loc if isinstance(part, int) or not (part in _UNION_TAGS or "[" in part)]
    if not names or isinstance(names[-1], int):
        return "null"
    return names[-1]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _type_name(model: type[BaseModel] | None, err: ErrorDetails) -> str:
    """The QEMU type of the member that is out of range ("uint8"), else a description of the bound."""
    field = _find_field(model, err["loc"])
    if field is not None:
        name = _qmp_type_in(field.metadata, field.annotation)
        if name:
            return name
    ctx = err.get("ctx") or {}
    bounds = {
        "greater_than_equal": "a value >= {ge}",
        "greater_than": "a value > {gt}",
        "less_than_equal": "a value <= {le}",
        "less_than": "a value < {lt}",
    }
    return bounds.get(err["type"], "a valid value").format(**ctx) if ctx else "a valid value"


def _find_field(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> Any:
    current: Any = model
    field = None
    for part in loc:
        if isinstance(part, int) or current is None:
            continue
        fields = getattr(current, "model_fields", None)
        if not fields:
            return field
        field = next((f for n, f in fields.items() if (f.alias or n) == part or n == part), None)
        if field is None:
            return None
        current = _model_in(field.annotation)
    return field


def _qmp_type_in(metadata: list[Any], annotation: Any) -> str | None:
    for meta in metadata:
        if isinstance(meta, QMPType):
            return meta.name
    for meta in getattr(annotation, "__metadata__", ()) or ():
        if isinstance(meta, QMPType):
            return meta.name
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _qmp_type_in([], arg)
        if found:
            return found
    return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def dump(value: Any) -> Any:
    """A handler's return value as JSON-able data (models by their wire names)."""
    if isinstance(value, QMPModel):
        return value.to_wire()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, list):
        return [dump(v) for v in value]
    if isinstance(value, dict):
        return {k: dump(v) for k, v in value.items()}
    return value
