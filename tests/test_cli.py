"""The command line and the TOML configuration: defaults, suffixes, precedence, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from migd.cli import main, parse_config
from migd.config import DriveConfig, parse_size

REPO = Path(__file__).resolve().parent.parent


def test_defaults() -> None:
    cfg = parse_config([])
    m = cfg.machine
    assert (m.name, m.memory, m.smp, m.workload, m.drives, m.mem_path, m.start_paused) == (
        None, 256 << 20, 1, "idle", [], None, False
    )
    assert (cfg.qmp, cfg.incoming, cfg.http, cfg.log_level) == ([], None, None, "info")


def test_every_option() -> None:
    cfg = parse_config([
        "--name", "vm1", "-m", "1G", "--smp", "4", "--workload", "random,rate=10M",
        "--drive", "file=/tmp/a.img", "--drive", "file=/tmp/b,,c.img,cache=none",
        "--mem-path", "/dev/shm/vm1", "--qmp", "unix:/tmp/q.sock", "--qmp", "tcp:127.0.0.1:4444",
        "--incoming", "defer", "-S", "--http", "127.0.0.1:8080", "--log-level", "debug",
    ])
    m = cfg.machine
    assert m.name == "vm1" and m.memory == 1 << 30 and m.smp == 4 and m.workload == "random,rate=10M"
    assert m.drives == [DriveConfig(file=Path("/tmp/a.img")), DriveConfig(file=Path("/tmp/b,c.img"), cache="none")]
    assert m.mem_path == Path("/dev/shm/vm1") and m.start_paused
    assert cfg.qmp == ["unix:/tmp/q.sock", "tcp:127.0.0.1:4444"]
    assert cfg.incoming == "defer" and cfg.http_address() == ("127.0.0.1", 8080) and cfg.log_level == "debug"


@pytest.mark.parametrize(
    ("text", "size"),
    [("256M", 256 << 20), ("256m", 256 << 20), ("512", 512 << 20), ("1G", 1 << 30), ("4096K", 4 << 20),
     ("1.5G", 3 << 29), ("5000b", 8192), ("8k", 8192), ("1GB", 1 << 30), ("1GiB", 1 << 30), ("1gib", 1 << 30),
     ("0.5g", 512 << 20), ("1.5", 3 << 19), ("64 MiB", 64 << 20), ("4097B", 8192)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert parse_config(["-m", text]).machine.memory == size


def test_memory_error_names_the_option_and_the_grammar(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-m", "1GQ"]) == 2
    assert capsys.readouterr().err == (
        "migd: error: --memory: invalid size '1GQ' (expected a number with an optional K, M, G, T, P or E suffix)\n")
    assert main(["-m", "1.5B"]) == 2
    assert capsys.readouterr().err == "migd: error: --memory: invalid size '1.5B' (a fraction of a byte)\n"


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["-m", "lots"], "--memory"),
        (["-m", "0"], "--memory"),
        (["-m", "12Q"], "--memory"),
        (["-m", "1.5.5G"], "--memory"),
        (["-m", "1iB"], "--memory"),
        (["-m", "-1G"], "--memory"),
        (["--smp", "0"], "--smp"),
        (["--smp", "two"], "--smp"),
        (["--drive", "cache=none"], "--drive"),
        (["--drive", "file=/x,cache=sometimes"], "--drive"),
        (["--drive", "file=/x,bogus=1"], "--drive"),
        (["--drive", "/just/a/path"], "--drive"),
        (["--qmp", "stdio"], "--qmp"),
        (["--qmp", "tcp:localhost"], "--qmp"),
        (["--qmp", "tcp:localhost:99999"], "--qmp"),
        (["--incoming", "nowhere"], "--incoming"),
        (["--http", "8080"], "--http"),
        (["--workload", " "], "--workload"),
        (["--workload", "bogus"], "--workload"),
        (["--workload", "random,rate=-1"], "--workload"),
        (["--log-level", "loud"], "--log-level"),
        (["--frobnicate"], "--frobnicate"),
        (["--config", "/nonexistent/migd.toml"], "--config"),
    ],
)
def test_bad_values_exit_2_with_one_line(argv: list[str], option: str, capsys) -> None:
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("migd: error: ")
    assert option in err


def test_toml_keys_and_command_line_precedence(tmp_path: Path) -> None:
    conf = tmp_path / "vm.toml"
    conf.write_text(
        'name = "fromfile"\nmemory = "64M"\nsmp = 2\nworkload = "counter"\n'
        'drive = ["file=/tmp/d1.img", {file = "/tmp/d2.img", cache = "unsafe"}]\n'
        'mem-path = "/tmp/ram"\nqmp = ["unix:/tmp/f.sock"]\nincoming = "tcp:0.0.0.0:4444"\n'
        'S = true\nhttp = "127.0.0.1:9000"\nlog-level = "warning"\n'
    )
    cfg = parse_config(["--config", str(conf)])
    m = cfg.machine
    assert (m.name, m.memory, m.smp, m.workload, m.mem_path, m.start_paused) == (
        "fromfile", 64 << 20, 2, "counter", Path("/tmp/ram"), True
    )
    assert m.drives[1] == DriveConfig(file=Path("/tmp/d2.img"), cache="unsafe")
    assert cfg.qmp == ["unix:/tmp/f.sock"] and cfg.incoming == "tcp:0.0.0.0:4444" and cfg.log_level == "warning"

    cfg = parse_config(["--config", str(conf), "--name", "cli", "-m", "128M", "--qmp", "unix:/tmp/c.sock",
                        "--drive", "file=/tmp/only.img"])
    assert cfg.machine.name == "cli" and cfg.machine.memory == 128 << 20
    assert cfg.qmp == ["unix:/tmp/c.sock"]  # a repeatable option given on the command line replaces the file's
    assert [d.file for d in cfg.machine.drives] == [Path("/tmp/only.img")]
    assert cfg.machine.smp == 2  # not given on the command line: the file's value stays


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("colour = 'blue'\n", "unknown key 'colour'"),
        ("memory = 'huge'\n", "--memory"),
        ("smp = 'x'\n", "--smp"),
        ("drive = [{file = '/x', speed = 3}]\n", "--drive"),
        ("memory = \n", "--config"),
    ],
)
def test_bad_config_file(tmp_path: Path, body: str, needle: str, capsys) -> None:
    conf = tmp_path / "bad.toml"
    conf.write_text(body)
    assert main(["--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


def test_process_exit_status_and_version() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run([sys.executable, "-m", "migd", "-m", "x"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "--memory" in bad.stderr
    version = subprocess.run([sys.executable, "-m", "migd", "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("migd ")
