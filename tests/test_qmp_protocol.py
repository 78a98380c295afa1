"""The JSON stream parser, request checks and argument schema, in-process (no daemon)."""

from __future__ import annotations

import json
from typing import Literal

import pytest

from migd.qmp import protocol
from migd.qmp.protocol import JSONStreamParser, ParseError, RequestError, check_request
from migd.qmp.registry import QMPError
from migd.qmp.schema import QMPArgs, QMPModel, UInt8, UInt64, dump, validate


def feed_all(*chunks: bytes) -> list:
    parser = JSONStreamParser()
    out: list = []
    for chunk in chunks:
        out += parser.feed(chunk)
    return out


def test_concatenated_objects_without_separators() -> None:
    data = b'{"execute":"qmp_capabilities","arguments":{}}{"execute":"query-migrate","id":"__qmp#00000"}'
    assert feed_all(data) == [
        {"execute": "qmp_capabilities", "arguments": {}},
        {"execute": "query-migrate", "id": "__qmp#00000"},
    ]


def test_every_split_point_gives_the_same_values() -> None:
    data = b'{"a": [1, -2.5e3, "x\\u00e9\\ud83d\\ude00", true, false, null], "b": {"c": "\\n\\t\\\\"}} 7 '
    expected = feed_all(data)
    assert expected == [{"a": [1, -2500.0, "x\u00e9\U0001f600", True, False, None], "b": {"c": "\n\t\\"}}, 7]
    for cut in range(1, len(data)):
        assert feed_all(data[:cut], data[cut:]) == expected, cut
    assert feed_all(*[bytes([b]) for b in data]) == expected


def test_numbers() -> None:
    values = feed_all(b"[0, -0, 12, 9223372036854775807, 18446744073709551615, 18446744073709551616, 1.5, 1e2]")
    assert values == [[0, 0, 12, 2**63 - 1, 2**64 - 1, float(2**64), 1.5, 100.0]]
    assert isinstance(values[0][5], float)


def test_number_at_end_waits_for_its_terminator() -> None:
    parser = JSONStreamParser()
    assert parser.feed(b"12") == []
    assert parser.feed(b"3 ") == [123]
    assert parser.feed(b"-") == []
    assert parser.feed(b"4]") == [-4, ParseError("JSON parse error, expecting value")]


def test_errors_are_reported_once_the_message_balances() -> None:
    parser = JSONStreamParser()
    assert parser.feed(b'{"a" 1, "b": [1, 2]') == []  # first error remembered, brackets still open
    assert parser.feed(b"}") == [ParseError("JSON parse error, missing : in object pair")]
    assert parser.feed(b"{}") == [{}]


@pytest.mark.parametrize(
    ("data", "desc"),
    [
        (b'{"a":1,"a":2}', "duplicate key"),
        (b"{,}", "expecting value"),
        (b'{"a":}', "expecting value"),
        (b"[1,]", "expecting value"),
        (b"[}", "expecting value"),
        (b'{"a":1]', "expected separator in dict"),
        (b"[1}", "expected separator in list"),
        (b"[nul]", "invalid keyword 'nul'"),
        (b'["\\u0000"]', "\\u0000 is not supported"),
        (b'["\\udc00"]', "leading surrogate missing"),
        (b'["\\ud800x"]', "missing second half of surrogate pair"),
        (b'["\\ud800\\u0041"]', "missing second half of surrogate pair"),
        (b'["\xc3\x28"]', "invalid UTF-8 sequence in string"),
    ],
)
def test_syntax_errors(data: bytes, desc: str) -> None:
    assert feed_all(data, b" {}") == [ParseError(f"JSON parse error, {desc}"), {}]


def test_lexical_error_resets_and_skips_to_a_restart_point() -> None:
    # after the stray character, everything up to the next bracket or control character is skipped
    assert feed_all(b'{"a": [1, \x01 junk "more" {"ok": 1}') == [
        ParseError("JSON parse error, stray '\x01'"),
        {"ok": 1},
    ]
    assert feed_all(b'"abc\x1b{}') == [ParseError("JSON parse error, stray '\"abc\x1b'"), {}]
    assert feed_all(b"True {}") == [ParseError("JSON parse error, stray 'T'"), {}]


def test_eof_inside_a_message() -> None:
    parser = JSONStreamParser()
    assert parser.feed(b'{"execute": "x"') == []
    assert parser.feed_eof() == [ParseError("JSON parse error, premature EOI")]
    parser = JSONStreamParser()
    assert parser.feed(b"42") == []
    assert parser.feed_eof() == [42]


def test_nesting_limit() -> None:
    (value,) = feed_all(b"[" * 1024 + b"]" * 1024)
    depth = 0
    while value != []:
        (value,) = value
        depth += 1
    assert depth == 1023
    assert feed_all(b"[" * 1025) == [ParseError("JSON nesting depth limit exceeded")]
    assert feed_all(b"{" * 1024 + b"[") == [ParseError("JSON nesting depth limit exceeded")]


def test_token_count_limit(monkeypatch) -> None:
    monkeypatch.setattr(protocol, "MAX_TOKEN_COUNT", 10)
    assert feed_all(b"[1,2,3,4]") == [[1, 2, 3, 4]]  # 9 tokens
    assert feed_all(b"[1,2,3,4,5] {}") == [ParseError("JSON token count limit exceeded"), {}]
    # the rest of an oversized message is skipped up to the next bracket
    assert feed_all(b'[1,2,3,4,5,6,"7",8] {}') == [
        ParseError("JSON token count limit exceeded"),
        ParseError("JSON parse error, expecting value"),
        {},
    ]


def test_token_size_limit_bounds_the_buffer(monkeypatch) -> None:
    monkeypatch.setattr(protocol, "MAX_TOKEN_SIZE", 1000)
    parser = JSONStreamParser()
    assert parser.feed(b'["' + b"a" * 500) == []
    assert parser.feed(b"a" * 600) == [ParseError("JSON token size limit exceeded")]
    assert parser.buffered == 0
    assert parser.feed(b"a" * 5000) == []  # still skipping the rest of it
    assert parser.buffered == 0
    assert parser.feed(b'"] {"x": 1}') == [ParseError("JSON parse error, expecting value"), {"x": 1}]
    # many small tokens count too
    assert feed_all(b"[" + b'"aaaaaaaaa",' * 100 + b"1]") == [
        ParseError("JSON token size limit exceeded"),
        ParseError("JSON parse error, expecting value"),  # its closing bracket
    ]


def test_long_string_is_scanned_once() -> None:
    """A big string arriving in small pieces must not be rescanned from its start every time."""
    parser = JSONStreamParser()
    parser.feed(b'["')
    for _ in range(2000):
        assert parser.feed(b"x" * 1000 + b"\\n") == []
    assert parser.feed(b'"]') == [["".join(["x" * 1000 + "\n"] * 2000)]]


# -- requests ---------------------------------------------------------------------------------------


def test_check_request() -> None:
    req = check_request({"execute": "stop", "id": {"a": 1}})
    assert (req.name, req.arguments, req.has_id, req.id, req.oob) == ("stop", {}, True, {"a": 1}, False)
    assert not check_request({"execute": "stop"}).has_id
    oob = check_request({"exec-oob": "migrate-pause", "id": 1}, oob_enabled=True)
    assert oob.oob and oob.name == "migrate-pause"
    with pytest.raises(RequestError, match="QMP input member 'execute' clashes with 'exec-oob'"):
        check_request({"execute": "a", "exec-oob": "b"}, oob_enabled=True)
    with pytest.raises(RequestError, match="QMP input member 'exec-oob' must be a string"):
        check_request({"exec-oob": 5}, oob_enabled=True)
    with pytest.raises(RequestError, match="QMP input must be a JSON object"):
        check_request([])


def test_encode_is_one_ascii_crlf_line() -> None:
    line = protocol.encode({"return": {"s": "\u00e9\nx"}, "id": 1})
    assert line.endswith(b"\r\n") and line.count(b"\n") == 1
    line.decode("ascii")
    assert json.loads(line) == {"return": {"s": "\u00e9\nx"}, "id": 1}


def test_greeting_shape() -> None:
    from migd import QEMU_COMPAT_VERSION, __version__

    g = protocol.greeting()["QMP"]
    major, minor, micro = QEMU_COMPAT_VERSION
    assert g == {
        "version": {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"migd {__version__}"},
        "capabilities": [],
    }


# -- argument models ----------------------------------------------------------------------------


class _Cap(QMPArgs):
    capability: Literal["events", "xbzrle"]
    state: bool


class _Args(QMPArgs):
    uri: str
    max_bandwidth: UInt64 | None = None
    level: UInt8 = 3
    ratio: float = 0.5
    caps: list[_Cap] = []


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        ({}, "Parameter 'uri' is missing"),
        ({"uri": 1}, "Invalid parameter type for 'uri', expected: string"),
        ({"uri": "u", "max-bandwidth": True}, "Invalid parameter type for 'max-bandwidth', expected: integer"),
        ({"uri": "u", "max-bandwidth": 1.0}, "Invalid parameter type for 'max-bandwidth', expected: integer"),
        ({"uri": "u", "max-bandwidth": "1"}, "Invalid parameter type for 'max-bandwidth', expected: integer"),
        ({"uri": "u", "max-bandwidth": -1}, "Parameter 'max-bandwidth' expects uint64"),
        ({"uri": "u", "level": 256}, "Parameter 'level' expects uint8"),
        ({"uri": "u", "ratio": "x"}, "Invalid parameter type for 'ratio', expected: number"),
        ({"uri": "u", "max_bandwidth": 1}, "Parameter 'max_bandwidth' is unexpected"),
        ({"uri": "u", "zzz": 1}, "Parameter 'zzz' is unexpected"),
        ({"zzz": 1}, "Parameter 'uri' is missing"),  # declared members are checked first, as QEMU does
        ({"uri": "u", "caps": {}}, "Invalid parameter type for 'caps', expected: array"),
        ({"uri": "u", "caps": [1]}, "Invalid parameter type for 'caps[0]', expected: object"),
        ({"uri": "u", "caps": [{"capability": "nope", "state": True}]},
         "Parameter 'capability' does not accept value 'nope'"),
        ({"uri": "u", "caps": [{"capability": "events"}]}, "Parameter 'caps[0].state' is missing"),
    ],
)
def test_argument_errors(arguments: dict, desc: str) -> None:
    with pytest.raises(QMPError) as info:
        validate(_Args, arguments)
    assert info.value.desc == desc
    assert info.value.error_class == "GenericError"


def test_valid_arguments_use_python_names() -> None:
    args = validate(_Args, {"uri": "tcp:x:1", "max-bandwidth": 0, "ratio": 1, "caps": [{"capability": "events", "state": True}]})
    assert args.max_bandwidth == 0 and args.ratio == 1.0 and args.caps[0].capability == "events"


def test_validator_text_is_sent_verbatim() -> None:
    from pydantic import field_validator

    class Args(QMPArgs):
        uri: str

        @field_validator("uri")
        @classmethod
        def known(cls, value: str) -> str:
            if ":" not in value:
                raise ValueError(f"unknown migration protocol: {value}")
            return value

    with pytest.raises(QMPError, match="^unknown migration protocol: foo$"):
        validate(Args, {"uri": "foo"})


def test_return_models_serialise_with_wire_names() -> None:
    class Info(QMPModel):
        total_time: int
        expected_downtime: int | None = None

    assert dump([Info(total_time=5)]) == [{"total-time": 5}]
    assert dump({"x": Info(total_time=1, expected_downtime=2)}) == {"x": {"total-time": 1, "expected-downtime": 2}}
