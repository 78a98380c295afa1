"""QMP on the wire: JSON stream framing, the greeting, request checking and reply encoding.

Clients (``qemu.qmp`` among them) send concatenated JSON objects without separators, so input is a
byte *stream* cut into messages the way QEMU's streamer does it: a message ends when its brackets
balance (or at once for a bare scalar). Everything is bounded — a token never grows past 64 MiB,
nesting past 1024, a message past 2M tokens — and a lexical error (such as an ASCII control
character, which clients send on purpose to resynchronise) resets the parser and skips ahead to a
promising restart point. All error texts are QEMU's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from migd import QEMU_COMPAT_VERSION, __version__

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1024


@dataclass(frozen=True)
class ParseError:
    """An input that is not a JSON value; answered with an id-less GenericError."""

    desc: str


# ---------------------------------------------------------------------------------------------
# Lexer building blocks

_WS = frozenset(b" \t\r\n")
_STRUCT = frozenset(b"{}[],:")
_RECOVER_END = re.compile(rb"[\x00-\x1f\xfe\xff\[\]{}]")
_ESCAPE = rb"\\(?:[\"\\/'bfnrt]|u[0-9a-fA-F]{4})"
_BODY = {
    ord('"'): re.compile(rb'(?:[^"\\\x00-\x1f]+|' + _ESCAPE + rb")*"),
    ord("'"): re.compile(rb"(?:[^'\\\x00-\x1f]+|" + _ESCAPE + rb")*"),
}
_PARTIAL_ESCAPE = re.compile(rb"\\(?:u[0-9a-fA-F]{0,3})?")
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_EXTENT = re.compile(rb"-?[0-9]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?")  # what may still become one
_KEYWORD = re.compile(rb"[a-z]+")
_UNESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)", re.S)
_SIMPLE_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", '"': '"', "'": "'", "\\": "\\", "/": "/"}

# Token kinds
_PUNCT, _VALUE, _KW = 0, 1, 2

_INCOMPLETE = object()


class _StringError(Exception):
    pass


def _decode_string(raw: bytes) -> str:
    """The contents of a lexically valid string token, escapes resolved (QEMU's rules)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _StringError("invalid UTF-8 sequence in string") from None
    if "\\" not in text:
        return text
    out: list[str] = []
    pos = 0
    pending_high: int | None = None
    for m in _UNESCAPE.finditer(text):
        if m.start() > pos and pending_high is not None:
            raise _StringError("missing second half of surrogate pair")
        out.append(text[pos : m.start()])
        pos = m.end()
        esc = m.group(1)
        if esc[0] != "u" or len(esc) == 1:
            if pending_high is not None:
                raise _StringError("missing second half of surrogate pair")
            out.append(_SIMPLE_ESCAPES[esc])
            continue
        cp = int(esc[1:], 16)
        if pending_high is not None:
            if not 0xDC00 <= cp <= 0xDFFF:
                raise _StringError("missing second half of surrogate pair")
            out.append(chr(0x10000 + ((pending_high - 0xD800) << 10) + (cp - 0xDC00)))
            pending_high = None
        elif 0xD800 <= cp <= 0xDBFF:
            pending_high = cp
        elif 0xDC00 <= cp <= 0xDFFF:
            raise _StringError("leading surrogate missing")
        elif cp == 0:
            raise _StringError("\\u0000 is not supported")
        else:
            out.append(chr(cp))
    if pending_high is not None:
        raise _StringError("missing second half of surrogate pair")
    out.append(text[pos:])
    return "".join(out)


_MAX_INT_DIGITS = 20  # 2**64 has 20 digits; longer integers become floats (and Python's int() would refuse past 4300)


def _number(raw: bytes) -> int | float:
    """A number token's value: an int if it fits int64/uint64, else a float (inf if huge), as QEMU."""
    digits = raw.lstrip(b"-")
    if digits.isdigit() and len(digits) <= _MAX_INT_DIGITS:
        value = int(raw)
        if -(1 << 63) <= value < (1 << 64):
            return value
    return float(raw)


# ---------------------------------------------------------------------------------------------
# Building one value from tokens, remembering the first syntax error (QEMU reports that one)

_EXPECT_VALUE, _KEY_OR_END, _KEY, _COLON, _OBJ_SEP, _VALUE_OR_END, _ARR_SEP, _DONE = range(8)


class _Builder:
    """A push-down parser fed token by token; only the first error counts."""

    __slots__ = ("stack", "state", "result", "error", "key")

    def __init__(self) -> None:
        self.stack: list[Any] = []  # containers being filled; a dict's pending key lives in self.key
        self.state = _EXPECT_VALUE
        self.result: Any = None
        self.error: str | None = None
        self.key: list[str | None] = []

    def push(self, kind: int, value: Any) -> None:
        if self.error is not None:
            return
        state = self.state
        if kind == _KW:
            if value == "true":
                kind, value = _VALUE, True
            elif value == "false":
                kind, value = _VALUE, False
            elif value == "null":
                kind, value = _VALUE, None
            elif state in (_EXPECT_VALUE, _VALUE_OR_END, _KEY_OR_END, _KEY):
                self.error = f"invalid keyword '{value}'"
                return
            else:
                kind = _VALUE  # misplaced anyway: reported by the state check below
        if state in (_KEY_OR_END, _KEY):
            if kind == _PUNCT and value == "}" and state == _KEY_OR_END:
                self._close()
            elif kind == _VALUE and isinstance(value, str):
                self.key[-1] = value
                self.state = _COLON
            elif kind == _VALUE or (kind == _PUNCT and value in "{["):
                self.error = "key is not a string in object"
            else:
                self.error = "expecting value"
        elif state == _COLON:
            if kind == _PUNCT and value == ":":
                self.state = _EXPECT_VALUE
            else:
                self.error = "missing : in object pair"
        elif state in (_EXPECT_VALUE, _VALUE_OR_END):
            if kind == _VALUE:
                self._value(value)
            elif value == "{":
                self.stack.append({})
                self.key.append(None)
                self.state = _KEY_OR_END
            elif value == "[":
                self.stack.append([])
                self.key.append(None)
                self.state = _VALUE_OR_END
            elif value == "]" and state == _VALUE_OR_END:
                self._close()
            else:
                self.error = "expecting value"
        elif state == _OBJ_SEP:
            if kind == _PUNCT and value == ",":
                self.state = _KEY
            elif kind == _PUNCT and value == "}":
                self._close()
            else:
                self.error = "expected separator in dict"
        elif state == _ARR_SEP:
            if kind == _PUNCT and value == ",":
                self.state = _EXPECT_VALUE
            elif kind == _PUNCT and value == "]":
                self._close()
            else:
                self.error = "expected separator in list"
        else:  # _DONE: cannot happen, a finished value ends the message
            self.error = "unexpected extra input"

    def _close(self) -> None:
        value = self.stack.pop()
        self.key.pop()
        self._value(value)

    def _value(self, value: Any) -> None:
        if not self.stack:
            self.result = value
            self.state = _DONE
            return
        top = self.stack[-1]
        if isinstance(top, dict):
            key = self.key[-1]
            if key in top:
                self.error = "duplicate key"
                return
            top[key] = value
            self.state = _OBJ_SEP
        else:
            top.append(value)
            self.state = _ARR_SEP

    def finish(self) -> Any:
        if self.error is not None:
            return ParseError(f"JSON parse error, {self.error}")
        if self.state != _DONE:
            return ParseError("JSON parse error, premature EOI")
        return self.result

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message


# ---------------------------------------------------------------------------------------------


class JSONStreamParser:
    """Cuts a byte stream into JSON values; ``feed`` returns the values (or ParseErrors) completed."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._recovering = False
        self._resume: int | None = None  # where to continue scanning a partial string token
        self._reset()

    def _reset(self) -> None:
        self._braces = 0
        self._brackets = 0
        self._size = 0
        self._count = 0
        self._builder = _Builder()

    @property
    def buffered(self) -> int:
        """Bytes held: the unfinished token (at most MAX_TOKEN_SIZE plus one read)."""
        return len(self._buf)

    @property
    def pending(self) -> int:
        """Bytes of the unfinished message: its token still being read plus the ones already lexed."""
        return len(self._buf) + self._size

    def discard(self) -> None:
        """Drop the unfinished message (a limit outside the parser was hit) and skip to a restart point."""
        self._buf.clear()
        self._resume = None
        self._reset()
        self._recovering = True

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out: list[Any] = []
        pos = self._lex(out, eof=False)
        del self._buf[:pos]
        if self._resume is not None:
            self._resume -= pos
        return out

    def feed_eof(self) -> list[Any]:
        """The peer closed: finish what can be finished (a dangling message is 'premature EOI')."""
        out: list[Any] = []
        self._lex(out, eof=True)
        self._buf.clear()
        self._resume = None
        if self._count:
            out.append(ParseError("JSON parse error, premature EOI"))
            self._reset()
        return out

    # -- lexer ------------------------------------------------------------------------------------

    def _lex(self, out: list[Any], eof: bool) -> int:
        buf = self._buf
        n = len(buf)
        pos = 0
        while pos < n:
            if self._recovering:
                m = _RECOVER_END.search(buf, pos)
                if m is None:
                    return n
                pos = m.start()
                self._recovering = False
            c = buf[pos]
            if c in _WS:
                pos += 1
            elif c in _STRUCT:
                pos += 1
                self._token(_PUNCT, chr(c), 1, out)
            elif c == 0x22 or c == 0x27:  # " or '
                end = self._lex_string(buf, pos, n, out, eof)
                if end is _INCOMPLETE:
                    return pos
                pos = end  # type: ignore[assignment]
            elif c == 0x2D or 0x30 <= c <= 0x39:  # - or digit
                extent = _NUMBER_EXTENT.match(buf, pos)
                if extent is not None and extent.end() == n and not eof:
                    return self._wait(pos, n, out)  # e.g. "-2." at the end: more may follow
                m = _NUMBER.match(buf, pos)
                if m is None:
                    pos = self._lex_error(buf, pos, pos + 2, out)
                else:
                    self._token(_VALUE, _number(bytes(m.group())), m.end() - pos, out)
                    pos = m.end()
            elif 0x61 <= c <= 0x7A:  # a-z
                m = _KEYWORD.match(buf, pos)
                assert m is not None
                if m.end() == n and not eof:
                    return self._wait(pos, n, out)
                self._token(_KW, m.group().decode(), m.end() - pos, out)
                pos = m.end()
            else:
                pos = self._lex_error(buf, pos, pos + 1, out)
        return pos

    def _wait(self, pos: int, n: int, out: list[Any]) -> int:
        """An unfinished token at the end of the input: keep it, unless it is already too big."""
        if self._size + (n - pos) + 1 > MAX_TOKEN_SIZE:
            out.append(ParseError("JSON token size limit exceeded"))
            self._reset()
            self._resume = None
            self._recovering = True
            return n
        return pos

    def _lex_string(self, buf: bytearray, pos: int, n: int, out: list[Any], eof: bool) -> int | object:
        start = self._resume if self._resume is not None else pos + 1
        m = _BODY[buf[pos]].match(buf, start)
        assert m is not None
        end = m.end()
        if end < n and buf[end] == buf[pos]:
            self._resume = None
            try:
                value: Any = _decode_string(bytes(buf[pos + 1 : end]))
            except _StringError as exc:
                value = None
                self._builder.fail(str(exc))
            self._token(_VALUE, value, end + 1 - pos, out)
            return end + 1
        partial = end == n or (_PARTIAL_ESCAPE.fullmatch(buf, end, n) is not None)
        if partial and not eof:
            self._resume = end
            kept = self._wait(pos, n, out)
            if kept == n:
                return n
            return _INCOMPLETE
        self._resume = None
        if end >= n:  # EOF inside the string: what was read of it is the stray token
            return self._lex_error(buf, pos, n, out)
        bad = end + 2 if buf[end] == 0x5C else end + 1  # a bad escape: the backslash and what follows
        return self._lex_error(buf, pos, bad, out)

    def _lex_error(self, buf: bytearray, start: int, end: int, out: list[Any]) -> int:
        """A character that cannot start or continue a token: report it, reset, skip ahead."""
        end = min(end, len(buf))
        text = bytes(buf[start:end]).decode("latin-1")
        if len(text) > 1024:
            text = text[:1024]
        out.append(ParseError(f"JSON parse error, stray '{text}'"))
        self._reset()
        self._recovering = True
        return end

    # -- streamer ---------------------------------------------------------------------------------

    def _token(self, kind: int, value: Any, size: int, out: list[Any]) -> None:
        if kind == _PUNCT:
            if value == "{":
                self._braces += 1
            elif value == "}":
                self._braces -= 1
            elif value == "[":
                self._brackets += 1
            elif value == "]":
                self._brackets -= 1
        error = None
        if self._size + size + 1 > MAX_TOKEN_SIZE:
            error = "JSON token size limit exceeded"
        elif self._count + 1 > MAX_TOKEN_COUNT:
            error = "JSON token count limit exceeded"
        elif self._braces + self._brackets > MAX_NESTING:
            error = "JSON nesting depth limit exceeded"
        if error is not None:
            out.append(ParseError(error))
            self._reset()
            # Unlike QEMU, skip the rest of an oversized message instead of parsing its tail as
            # new messages: same first error, no flood of follow-up errors.
            self._recovering = error != "JSON nesting depth limit exceeded"
            return
        self._size += size
        self._count += 1
        self._builder.push(kind, value)
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return
        out.append(self._builder.finish())
        self._reset()


# ---------------------------------------------------------------------------------------------
# Requests and replies


class RequestError(Exception):
    """A malformed request object: answered with GenericError, echoing its id if it had one."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


@dataclass(frozen=True)
class Request:
    name: str
    arguments: dict[str, Any]
    oob: bool
    has_id: bool
    id: Any


def check_request(msg: Any, oob_enabled: bool = False) -> Request:
    """Validate the top level of a request (QEMU's qmp_dispatch_check_obj) before dispatch."""
    if not isinstance(msg, dict):
        raise RequestError("QMP input must be a JSON object")
    has_exec = has_oob = False
    for key, value in msg.items():
        if key in ("execute", "exec-oob"):
            if not isinstance(value, str):
                raise RequestError(f"QMP input member '{key}' must be a string")
            if key == "exec-oob":
                if not oob_enabled:
                    raise RequestError("QMP input member 'exec-oob' is unexpected")
                has_oob = True
            else:
                has_exec = True
        elif key == "arguments":
            if not isinstance(value, dict):
                raise RequestError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise RequestError(f"QMP input member '{key}' is unexpected")
    if has_exec and has_oob:
        raise RequestError("QMP input member 'execute' clashes with 'exec-oob'")
    if not has_exec and not has_oob:
        raise RequestError("QMP input lacks member 'execute'")
    name = msg["exec-oob"] if has_oob else msg["execute"]
    return Request(name, msg.get("arguments", {}), has_oob, "id" in msg, msg.get("id"))


def request_id(msg: Any) -> tuple[bool, Any]:
    """Whether a parsed message carries an id, and the id (echoed on every reply to it)."""
    if isinstance(msg, dict) and "id" in msg:
        return True, msg["id"]
    return False, None


def greeting(capabilities: list[str] | None = None) -> dict[str, Any]:
    major, minor, micro = QEMU_COMPAT_VERSION
    return {
        "QMP": {
            "version": {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": f"migd {__version__}"},
            "capabilities": list(capabilities or []),
        }
    }


def success(value: Any, has_id: bool = False, id_: Any = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"return": value}
    if has_id:
        msg["id"] = id_
    return msg


def error(desc: str, error_class: str = "GenericError", has_id: bool = False, id_: Any = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        msg["id"] = id_
    return msg


def encode(msg: dict[str, Any]) -> bytes:
    """One message, one line, ASCII, CRLF-terminated (QEMU's output format)."""
    return json.dumps(msg, ensure_ascii=True).encode("ascii") + b"\r\n"
