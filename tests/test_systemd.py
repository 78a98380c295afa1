"""The systemd unit: clean under systemd-analyze verify, and its command line is one migd accepts."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from migd.cli import parse_config
from migd.config import load_toml

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "migd@.service"
EXAMPLE = UNIT.with_name("migd.toml.example")


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


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_is_clean() -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # verify only warns (exit 0) about unknown keys and the like: any output is a defect here
    assert proc.stderr.strip() == "" and proc.stdout.strip() == "", proc.stderr + proc.stdout


def test_unit_shape() -> None:
    service = _directives("[Service]")
    assert service["Type"] == "notify"
    assert service["Restart"] == "on-failure"
    assert service["RuntimeDirectory"] == "migd/%i"
    for key in ("ProtectSystem", "NoNewPrivileges", "PrivateTmp", "RestrictAddressFamilies"):
        assert key in service
    assert "/etc/migd/%i.toml" in service["ExecStart"]


def test_exec_start_and_example_config_are_valid_for_migd(tmp_path: Path) -> None:
    """The unit's options (with %i/%t expanded) and the example file parse with migd's own rules."""
    argv = shlex.split(_directives("[Service]")["ExecStart"])
    assert argv[:2] == ["/usr/bin/env", "migd"]
    config = tmp_path / "vm1.toml"
    config.write_text(EXAMPLE.read_text().replace("NAME", "vm1"))
    args = [a.replace("%t", "/run").replace("%i", "vm1").replace("/etc/migd/vm1.toml", str(config)) for a in argv[2:]]
    cfg = parse_config(args)
    assert cfg.machine.name == "vm1"
    assert cfg.qmp == ["unix:/run/migd/vm1/qmp.sock"]
    assert cfg.machine.memory == 1 << 30 and cfg.machine.smp == 2
    assert str(cfg.machine.drives[0].file) == "/var/lib/migd/vm1/disk0.img"
    assert load_toml(config)["log-level"] == "info"
