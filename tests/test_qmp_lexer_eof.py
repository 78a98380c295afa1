"""The QMP lexer never raises: any prefix of any input, cut anywhere, then EOF, gives values or errors.

A client that closes in the middle of a string used to raise IndexError (``buf[end]`` at EOF), a
traceback per connection; a 5000-digit integer raised ValueError (Python's int() digit limit).
"""

from __future__ import annotations

import json
import re
import socket

import pytest
from helpers import Migd, RawQMP
from hypothesis import given, settings
from hypothesis import strategies as st

from migd.qmp.protocol import JSONStreamParser, ParseError

texts = st.text(max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)
# inputs that look like QMP: JSON text (both quote styles, escapes), plus raw bytes and lexer corner cases
pieces = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False).replace('"', "'").encode()),
    st.binary(max_size=16),
    st.sampled_from([b'"', b"'", b"\\", b"\\u", b"\\u12", b"\\ud800", b"-", b"1e", b"0.", b"tru", b"{", b"[",
                     b"\x1b", b"\xff", b"1" * 5000, b"-" + b"9" * 30, b"1e99999", b'"\xc3', b"\x00"]),
)


def feed_all(chunks: list[bytes]) -> list[object]:
    parser = JSONStreamParser()
    out: list[object] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    out += parser.feed_eof()
    assert parser.buffered == 0
    return out


@settings(max_examples=1500, deadline=None)
@given(st.lists(pieces, max_size=6), st.data())
def test_any_prefix_then_eof_never_raises(parts: list[bytes], data: st.DataObject) -> None:
    raw = b"".join(parts)
    end = data.draw(st.integers(0, len(raw)), "prefix length")
    prefix = raw[:end]
    cuts = sorted(data.draw(st.lists(st.integers(0, end), max_size=4), "cuts"))
    chunks = [prefix[a:b] for a, b in zip([0, *cuts], [*cuts, end], strict=True)]
    for item in feed_all(chunks):
        if isinstance(item, ParseError):
            assert item.desc.startswith("JSON ")


@pytest.mark.parametrize(
    ("data", "desc"),
    [
        (b'{"execute": "query-st', "JSON parse error, stray '\"query-st'"),
        (b"'abc", "JSON parse error, stray ''abc'"),
        (b'{"execute": "x", "arguments": {"a": "\\u00', "JSON parse error, stray '\"\\u'"),
        (b"{", "JSON parse error, premature EOI"),
    ],
)
def test_eof_inside_a_token_is_an_error_reply(data: bytes, desc: str) -> None:
    out = feed_all([data])
    assert out == [ParseError(desc)]


def test_huge_integer_becomes_a_float_like_qemu() -> None:
    assert feed_all([b"1" * 5000 + b" "]) == [float("inf")]
    assert feed_all([b"[-" + b"9" * 21 + b"]"]) == [[-1e21]]


@pytest.mark.e2e
def test_clients_closing_mid_string_leave_no_traceback(migd_factory) -> None:
    vm: Migd = migd_factory("lx", "-m", "16M")
    for data in (b'{"execute": "query-st', b"'abc", b'"\\u12', b'{"a": ' + b"1" * 5000 + b"}"):
        raw = RawQMP(vm.qmp_path)
        raw.send(data)
        raw.sock.shutdown(socket.SHUT_WR)  # EOF mid-token; the reply (if any) still comes back
        while raw.sock.recv(65536):
            pass
        raw.close()
    assert vm.cmd("query-status")["status"] == "running"
    assert not re.search(r"Traceback|IndexError|ValueError", vm.log()), vm.log()
