"""The pure parts of migctl: addresses, NAME=VALUE typing, the percent logic, completion, renderings."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from migd.migctl import build_parser, main
from migd.migctl.address import AddressError, parse_address
from migd.migctl.commands import format_event
from migd.migctl.demo import _workload_progress
from migd.migctl.display import human_bytes, progress_view, summary_table
from migd.migctl.progress import HOLD_BELOW, Progress, next_percent, raw_percent
from migd.migctl.shell import completions, make_completer
from migd.migctl.values import (
    ValueParseError,
    parse_capabilities,
    parse_command_line,
    parse_parameters,
    parse_size,
)
from migd.migctl.watch import progress_record


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/run/migd/vm1/qmp.sock", "/run/migd/vm1/qmp.sock"),
        ("qmp.sock", "qmp.sock"),
        ("unix:/tmp/a.sock", "/tmp/a.sock"),
        ("tcp:127.0.0.1:4444", ("127.0.0.1", 4444)),
        ("localhost:4444", ("localhost", 4444)),
        ("tcp:[::1]:4444", ("::1", 4444)),
    ],
)
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "unix:", "tcp:host:notaport", "tcp:host:0", "tcp:host:70000", "tcp::44"])
def test_parse_address_rejects(text):
    with pytest.raises(AddressError):
        parse_address(text)


def test_sizes_and_parameters():
    assert parse_size("64M") == 64 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("1.5k") == 1536
    assert parse_size("0") == 0
    assert parse_size("128MB") == 128 << 20
    assert parse_size("64MiB") == 64 << 20
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("1000") == 1000  # a bare number is bytes
    with pytest.raises(ValueParseError, match=r"^invalid size 'fast' \(expected a number"):
        parse_size("fast")
    with pytest.raises(ValueParseError, match=r"^invalid size '-5' "):
        parse_size("-5")
    with pytest.raises(ValueParseError, match=r"a fraction of a byte"):
        parse_size("0.5")
    assert parse_parameters(["max-bandwidth=1.5MiB"]) == {"max-bandwidth": 3 << 19}
    assert parse_size("0.5", default_unit=1 << 20) == 512 << 10  # the demo's --memory, read like migd's -m
    assert parse_parameters(["max-bandwidth=1G", "downtime-limit=50", "tls-creds=123",
                             "cpu-throttle-tailslow=on"]) == {
        "max-bandwidth": 1 << 30, "downtime-limit": 50, "tls-creds": "123", "cpu-throttle-tailslow": True}
    with pytest.raises(ValueParseError):
        parse_parameters(["downtime-limit"])


def test_capabilities_words():
    assert parse_capabilities(["events=on", "auto-converge=off"]) == [
        {"capability": "events", "state": True}, {"capability": "auto-converge", "state": False}]
    with pytest.raises(ValueParseError):
        parse_capabilities(["events=maybe"])


def test_shell_lines():
    assert parse_command_line("query-status") == ("query-status", None)
    assert parse_command_line('migrate {"uri": "unix:/x"}') == ("migrate", {"uri": "unix:/x"})
    assert parse_command_line("migrate-set-parameters max-bandwidth=1M downtime-limit=20") == (
        "migrate-set-parameters", {"max-bandwidth": 1 << 20, "downtime-limit": 20})
    assert parse_command_line('{"execute": "query-migrate"}') == ("query-migrate", None)
    for bad in ("", "migrate {nope", '{"arguments": {}}', "migrate [1]", "x a"):
        with pytest.raises(ValueParseError):
            parse_command_line(bad)


def test_completion():
    names = ["query-migrate", "query-status", "migrate", "migrate_cancel", "quit"]
    assert completions(names, "query-") == ["query-migrate", "query-status"]
    assert completions(names, "mig") == ["migrate", "migrate_cancel"]
    complete = make_completer(names)
    assert [complete("q", i) for i in range(4)] == ["query-migrate", "query-status", "quit", None]


def info(status, remaining, total=1000):
    return {"status": status, "ram": {"remaining": remaining, "total": total}}


def test_percent_basics():
    assert raw_percent({}) is None
    assert raw_percent({"status": "setup"}) is None
    assert raw_percent(info("active", 250)) == 75.0
    assert raw_percent(info("active", 2000)) == 0.0  # remaining above total (RAM hot-added) clamps
    p = Progress()
    assert p.update({"status": "setup"}) == 0.0
    assert p.update(info("active", 600)) == 40.0
    assert p.update(info("active", 900)) == 40.0  # a sync found re-dirtied pages: the bar holds
    assert p.update(info("active", 0)) == HOLD_BELOW  # nothing left, but not completed yet
    assert p.update(info("device", 0)) == HOLD_BELOW
    assert p.update(info("completed", 0)) == 100.0


def test_failed_or_cancelled_never_shows_100():
    p = Progress()
    p.update(info("active", 0))
    assert p.update({"status": "cancelled"}) < 100.0
    assert p.update({"status": "failed"}) < 100.0


statuses = st.sampled_from(["setup", "active", "device", "pre-switchover", "cancelling", "failed"])


@given(st.lists(st.tuples(statuses, st.integers(0, 10**12), st.integers(0, 10**12))))
def test_percent_never_backwards_and_below_100_until_completed(samples):
    previous = 0.0
    for status, remaining, total in samples:
        now = next_percent(previous, {"status": status, "ram": {"remaining": remaining, "total": total}})
        assert now >= previous
        assert 0.0 <= now < 100.0
        previous = now
    assert next_percent(previous, {"status": "completed"}) == 100.0


def render(renderable) -> str:
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(renderable)
    return console.file.getvalue()


FINAL = {
    "status": "completed", "setup-time": 3, "total-time": 1520, "downtime": 41,
    "ram": {"transferred": 1 << 30, "remaining": 0, "total": 1 << 30, "duplicate": 7, "normal": 262000,
            "normal-bytes": 262000 * 4096, "dirty-pages-rate": 0, "mbps": 5600.5, "dirty-sync-count": 4,
            "page-size": 4096, "downtime-bytes": 123456},
    "x-migd-downtime-phases": {"pause-vcpus": 0.8, "drain-flush": 12.0, "ram": 20.5, "devices": 1.2},
}


def test_summary_table_has_phases_and_figures():
    text = render(summary_table(FINAL, 300))
    assert "completed" in text and "1520 ms" in text and "41 ms (limit 300 ms)" in text
    for phase in ("pause-vcpus", "drain-flush", "ram", "devices"):
        assert f"phase {phase}" in text
    assert "20.5 ms" in text and "262000 / 7" in text


def test_progress_view_and_record():
    live = {"status": "active", "expected-downtime": 35, "cpu-throttle-percentage": 30,
            "ram": {"transferred": 5 << 20, "remaining": 3 << 20, "total": 8 << 20, "mbps": 80.0,
                    "dirty-pages-rate": 100, "page-size": 4096, "dirty-sync-count": 2}}
    text = render(progress_view(live, 62.5))
    assert "62.5%" in text and "pass 2" in text and "throttle 30%" in text and "35 ms" in text
    rec = progress_record(live, 62.5)
    assert rec["bandwidth"] == 10_000_000 and rec["dirty-rate"] == 409600 and rec["pass"] == 2


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 << 30) == "3.0 GiB"


def test_format_event():
    line = format_event({"event": "MIGRATION", "data": {"status": "active"},
                         "timestamp": {"seconds": 1795688420, "microseconds": 358194}})
    assert line.endswith('.358 MIGRATION {"status": "active"}')


def test_workload_progress_reads_nested_counters():
    assert _workload_progress({"vcpus": [{"bytes-written": 10}, {"bytes-written": 5}]}) == 15
    assert _workload_progress({"bytes-written": 7, "other": {"bytes-written": 100}}) == 7


def test_every_subcommand_has_json():
    parser = build_parser()
    for argv in (["status"], ["migrate", "unix:/x"], ["cancel"], ["set", "a=1"], ["caps"], ["events"],
                 ["incoming", "unix:/x"], ["shell"], ["raw", "{}"], ["demo"]):
        assert parser.parse_args([*argv, "--json"]).json is True


def test_usage_errors(capsys, monkeypatch):
    monkeypatch.delenv("MIGCTL_SOCKET", raising=False)
    assert main(["-s", "tcp:host:nope", "status"]) == 2
    assert "invalid port" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["status"])  # no socket and no $MIGCTL_SOCKET
    assert exc.value.code == 2


def test_connection_refused_is_one_clear_line(tmp_path, capsys):
    assert main(["-s", str(tmp_path / "absent.sock"), "--connect-timeout", "2", "status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("migctl: cannot connect to QMP socket") and err.count("\n") == 1


def test_digest_texts():
    from migd.migctl.demo import _digest_diff, _digest_text

    a = {"blocks": [{"name": "ram0", "size": 4096, "digest": "aa" * 16}, {"name": "hot0", "digest": "11"}]}
    b = {"blocks": [{"name": "ram0", "size": 4096, "digest": "bb" * 16}]}
    assert _digest_text(a) == "ram0 aaaaaaaaaaaaaaaa, hot0 11"
    assert _digest_diff(a, b) == f"block hot0: source 11 destination absent; block ram0: source {'aa' * 16} destination {'bb' * 16}"
    assert _digest_diff(a, a) == ""
