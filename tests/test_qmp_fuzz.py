"""Hypothesis throws random bytes and random JSON at a real daemon; it must keep answering.

After each example the client resynchronises the way the QMP spec says (an ASCII control character)
and a probe command must get its reply; every line the server sends must be one JSON object.
"""

from __future__ import annotations

import json
import socket

import pytest
from helpers import Migd, RawQMP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migd.qmp.protocol import JSONStreamParser

pytestmark = pytest.mark.e2e

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Commands a fuzzer may run without ending the test (no quit).
SAFE_COMMANDS = ["query-status", "query-name", "query-version", "query-commands", "stop", "cont",
                 "getfd", "closefd", "qmp_capabilities", "no-such-command", ""]

texts = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12,
)
requests = st.fixed_dictionaries(
    {"execute": st.sampled_from(SAFE_COMMANDS) | json_values},
    optional={
        "arguments": st.dictionaries(st.sampled_from(["fdname", "enable", "x", "id"]), json_values, max_size=3)
        | json_values,
        "id": json_values,
        "exec-oob": json_values,
        "bogus": json_values,
    },
).filter(lambda m: m.get("execute") != "quit" and m.get("exec-oob") != "quit")


def _probe(raw: RawQMP, tag: str) -> list[dict]:
    """Resync, then send a probe; every message up to its reply (all must be well-formed)."""
    raw.send(b"\x1b")
    raw.send({"execute": "query-name", "id": tag})
    seen = []
    while True:
        msg = raw.recv()  # asserts one CRLF-terminated JSON object per line
        seen.append(msg)
        if msg.get("id") == tag:
            assert msg == {"return": {"name": "fz"}, "id": tag}
            return seen
        assert "event" in msg or "return" in msg or ("error" in msg and set(msg["error"]) == {"class", "desc"})


@pytest.fixture
def fuzz_vm(migd_factory) -> Migd:
    return migd_factory("fz", "-m", "16M")


def test_random_bytes(fuzz_vm: Migd) -> None:
    raw = RawQMP(fuzz_vm.qmp_path)
    raw.negotiate()
    counter = iter(range(1_000_000))

    @FUZZ
    @given(st.binary(max_size=600))
    def check(data: bytes) -> None:
        if b"quit" in data:
            data = data.replace(b"quit", b"qu1t")
        raw.send(data)
        _probe(raw, f"p{next(counter)}")

    try:
        check()
    finally:
        raw.close()
    assert fuzz_vm.returncode is None
    assert fuzz_vm.cmd("query-name") == {"name": "fz"}


def test_random_requests(fuzz_vm: Migd) -> None:
    raw = RawQMP(fuzz_vm.qmp_path)
    raw.negotiate()
    counter = iter(range(1_000_000))

    @FUZZ
    @given(st.lists(requests, min_size=1, max_size=4), st.booleans())
    def check(msgs: list[dict], compact: bool) -> None:
        sep = (",", ":") if compact else (", ", ": ")
        raw.send("".join(json.dumps(m, separators=sep) for m in msgs))
        replies = 0
        for msg in _probe(raw, f"r{next(counter)}")[:-1]:
            replies += "event" not in msg
        # every request gets exactly one reply (a stray \x1b error may add one more)
        assert len(msgs) <= replies <= len(msgs) + 1

    try:
        check()
    finally:
        raw.close()
    assert fuzz_vm.returncode is None


def test_random_bytes_before_negotiation(fuzz_vm: Migd) -> None:
    """Garbage on fresh connections (then a hang-up) never disturbs the daemon."""

    @FUZZ
    @given(st.binary(max_size=300))
    def check(data: bytes) -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(str(fuzz_vm.qmp_path))
            sock.sendall(data.replace(b"quit", b"qu1t"))
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        lines = received.split(b"\r\n")
        assert lines[-1] == b""
        for line in lines[:-1]:
            assert isinstance(json.loads(line), dict)

    check()
    assert fuzz_vm.cmd("query-status")["status"] in ("running", "paused")


@settings(max_examples=200, deadline=None)
@given(st.lists(json_values, max_size=5), st.data())
def test_parser_matches_json_module(values: list, data: st.DataObject) -> None:
    """Any split of valid JSON text gives back the values, like json.loads on each."""
    text = " ".join(json.dumps(v) for v in values) + " "
    raw = text.encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=4)))
    parser = JSONStreamParser()
    out = []
    last = 0
    for cut in [*cuts, len(raw)]:
        out += parser.feed(raw[last:cut])
        last = cut
    assert out == [_as_qemu(json.loads(json.dumps(v))) for v in values]


def _as_qemu(value):
    """QEMU keeps integers outside int64/uint64 as doubles."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else float(value)
    if isinstance(value, list):
        return [_as_qemu(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_qemu(v) for k, v in value.items()}
    return value
