"""Typing the ``NAME=VALUE`` words an operator types into the JSON values QMP expects.

The daemon validates everything with QEMU's error texts; this module only turns ``64M`` into
67108864 and ``on`` into ``true`` so the operator does not have to write JSON by hand.
"""

from __future__ import annotations

import json
from typing import Any

from migd import units

# Parameters whose value is a byte count (accept K/M/G/T/P/E suffixes) or a plain string (never converted).
SIZE_PARAMS = frozenset({"max-bandwidth", "avail-switchover-bandwidth", "xbzrle-cache-size",
                         "max-postcopy-bandwidth"})
STRING_PARAMS = frozenset({"tls-creds", "tls-hostname", "tls-authz", "multifd-compression", "mode",
                           "zero-page-detection"})

TRUE_WORDS = frozenset({"on", "true", "yes", "1"})
FALSE_WORDS = frozenset({"off", "false", "no", "0"})


class ValueParseError(ValueError):
    pass


def parse_size(text: str, default_unit: int = 1) -> int:
    """``64M`` -> 67108864; plain digits count in ``default_unit`` (bytes; migd's size grammar, ``migd.units``)."""
    try:
        return units.parse_size(text, default_unit=default_unit)
    except units.SizeError as exc:
        raise ValueParseError(str(exc)) from None


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in TRUE_WORDS:
        return True
    if t in FALSE_WORDS:
        return False
    raise ValueParseError(f"invalid switch '{text}': expected on or off")


def guess_value(text: str) -> Any:
    """A value for a key we know nothing about: JSON if it parses as JSON, else the string itself."""
    low = text.lower()
    if low in ("on", "yes"):
        return True
    if low in ("off", "no"):
        return False
    try:
        return json.loads(text)
    except ValueError:
        return text


def parameter_value(name: str, text: str) -> Any:
    """The JSON value of migration parameter ``name`` typed as ``text``."""
    if name in STRING_PARAMS:
        return text
    if name in SIZE_PARAMS:
        return parse_size(text)
    return guess_value(text)


def split_assignment(word: str) -> tuple[str, str]:
    name, sep, value = word.partition("=")
    if not sep or not name:
        raise ValueParseError(f"expected NAME=VALUE, got '{word}'")
    return name.strip(), value


def parse_parameters(words: list[str]) -> dict[str, Any]:
    """``["max-bandwidth=1G", "downtime-limit=50"]`` -> migrate-set-parameters arguments."""
    out: dict[str, Any] = {}
    for word in words:
        name, value = split_assignment(word)
        out[name] = parameter_value(name, value)
    return out


def parse_capabilities(words: list[str]) -> list[dict[str, Any]]:
    """``["events=on"]`` -> ``[{"capability": "events", "state": true}]``."""
    caps = []
    for word in words:
        name, value = split_assignment(word)
        caps.append({"capability": name, "state": parse_bool(value)})
    return caps


def parse_command_line(line: str) -> tuple[str, dict[str, Any] | None]:
    """A shell line: ``cmd``, ``cmd {json}``, ``cmd key=value ...`` or a whole ``{"execute": ...}``."""
    line = line.strip()
    if not line:
        raise ValueParseError("empty command")
    if line.startswith("{"):
        try:
            msg = json.loads(line)
        except ValueError as exc:
            raise ValueParseError(f"invalid JSON: {exc}") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
            raise ValueParseError("a JSON command needs a string 'execute' member")
        args = msg.get("arguments")
        if args is not None and not isinstance(args, dict):
            raise ValueParseError("'arguments' must be an object")
        return msg["execute"], args
    name, _, rest = line.partition(" ")
    rest = rest.strip()
    if not rest:
        return name, None
    if rest.startswith("{"):
        try:
            args = json.loads(rest)
        except ValueError as exc:
            raise ValueParseError(f"invalid JSON arguments: {exc}") from None
        if not isinstance(args, dict):
            raise ValueParseError("arguments must be a JSON object")
        return name, args
    args = {}
    for word in rest.split():
        key, value = split_assignment(word)
        args[key] = parameter_value(key, value)
    return name, args
