"""The systemd unit: clean under systemd-analyze verify, documented restarts, the documented venv path,
/proc whole for the process metrics, and an example configuration that works as written."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from migd.cli import parse_config
from migd.config import load_toml

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "migd@.service"
EXAMPLE = UNIT.with_name("migd.toml.example")
VENV_MIGD = "/opt/migd/venv/bin/migd"


def _directives(section: str) -> dict[str, str]:
    values: dict[str, str] = {}
    current = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line
        elif current == section and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def _verify(unit: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # verify only warns (exit 0) about unknown keys and the like: any output is a defect here
    assert proc.stderr.strip() == "" and proc.stdout.strip() == "", proc.stderr + proc.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    """verify also checks that ExecStart's program exists: where /opt/migd/venv is not installed,
    the very same unit is verified with ExecStart pointing at this environment's migd."""
    if Path(VENV_MIGD).exists():
        _verify(UNIT)
        return
    here = shutil.which("migd", path=str(Path(sys.executable).parent)) or shutil.which("migd")
    if here is None:
        pytest.skip("no migd console script installed to stand in for the venv's")
    copy = tmp_path / UNIT.name
    text = UNIT.read_text()
    assert text.count(f"ExecStart={VENV_MIGD} ") == 1
    copy.write_text(text.replace(f"ExecStart={VENV_MIGD} ", f"ExecStart={here} "))
    _verify(copy)


def test_unit_shape() -> None:
    service = _directives("[Service]")
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["RuntimeDirectory"] == "migd/%i"
    for key in ("ProtectSystem", "NoNewPrivileges", "PrivateTmp", "RestrictAddressFamilies"):
        assert key in service
    assert "/etc/migd/%i.toml" in service["ExecStart"]
    assert "ProcSubset" not in service  # ProcSubset=pid hides /proc/stat: no migd_process_* metrics
    assert service["ProtectProc"] == "invisible"


def test_restarts_follow_the_documented_exit_statuses() -> None:
    """Restart on runtime failures (3) and crashes, never on bad configuration (2) or a failed incoming
    migration (1); the README's table says the same."""
    service = _directives("[Service]")
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"].split() == ["1", "2"]
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("Exit statuses, and what the unit does"):]
    rows = dict(re.findall(r"^\| (\d) \| .*? \| (yes|no) \|$", table, re.MULTILINE))
    assert rows == {"0": "no", "1": "no", "2": "no", "3": "yes"}


def test_exec_start_is_the_documented_venv() -> None:
    argv = shlex.split(_directives("[Service]")["ExecStart"])
    assert argv[0] == VENV_MIGD
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running it as a service"):]
    assert "python3 -m venv /opt/migd/venv" in section and "/opt/migd/venv/bin/pip install ." in section


def test_example_config_needs_nothing_that_is_not_there() -> None:
    """No drive file that must already exist, and not node_exporter's port."""
    config = tomllib.loads(EXAMPLE.read_text().replace("NAME", "vm1"))
    assert "drive" not in config
    assert not config.get("http", "").endswith(":9100")


def test_exec_start_and_example_config_are_valid_for_migd(tmp_path: Path) -> None:
    """The unit's options (with %i/%t expanded) and the example file parse with migd's own rules."""
    argv = shlex.split(_directives("[Service]")["ExecStart"])
    assert argv[0] == VENV_MIGD
    config = tmp_path / "vm1.toml"
    config.write_text(EXAMPLE.read_text().replace("NAME", "vm1"))
    args = [a.replace("%t", "/run").replace("%i", "vm1").replace("/etc/migd/vm1.toml", str(config)) for a in argv[1:]]
    cfg = parse_config(args)
    assert cfg.machine.name == "vm1"
    assert cfg.qmp == ["unix:/run/migd/vm1/qmp.sock"]
    assert cfg.machine.memory == 1 << 30 and cfg.machine.smp == 2
    assert cfg.machine.drives == [] and cfg.http == "127.0.0.1:8940"
    assert load_toml(config)["log-level"] == "info"
