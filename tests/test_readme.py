"""The README's quick start and service install, as a new user runs them: the two commands make and use their own virtual
environment, and the first one works verbatim with Debian's own Python, as root and as a plain user.

Running the commands installs migd's dependencies from the package index into a fresh environment
(about a minute each), so those two tests run only with ``MIGD_TEST_QUICKSTART=1`` (a CI step).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_for

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
SYSTEM_PATH = "/usr/bin:/bin"  # Debian's python3 (externally managed), not a developer's
NOBODY = 65534


def quick_start_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```sh\n(.*?)\n```", section, re.DOTALL)


def test_quick_start_commands_make_and_use_a_virtual_environment() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2
    for cmd in commands:
        assert "\n" not in cmd
        assert cmd.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -e ")
    assert commands[0].endswith("&& migctl demo")
    assert commands[1].endswith("&& python3 -m pytest")


needs_opt_in = pytest.mark.skipif(os.environ.get("MIGD_TEST_QUICKSTART") != "1",
                                  reason="installs from the package index; set MIGD_TEST_QUICKSTART=1")
needs_debian_python = pytest.mark.skipif(not Path("/usr/lib/python3.11/EXTERNALLY-MANAGED").exists(),
                                         reason="needs Debian 12's externally managed python3")


@pytest.fixture
def clone() -> Iterator[Path]:
    """The repository's tracked files in a fresh folder any user can enter (no .venv, no caches)."""
    top = Path(tempfile.mkdtemp(prefix="migd-quickstart-"))
    os.chmod(top, 0o755)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            dst = top / "migd" / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (top / "home").mkdir()
    yield top
    shutil.rmtree(top, ignore_errors=True)


def _run(cmd: str, clone: Path, preexec: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": SYSTEM_PATH, "HOME": str(clone / "home"), "LANG": "C.UTF-8", "COLUMNS": "120"}
    return subprocess.run([*(preexec or []), "sh", "-c", cmd], cwd=clone / "migd", env=env, capture_output=True,
                          text=True, timeout=900)


@needs_opt_in
@needs_debian_python
def test_quick_start_demo_as_root_on_debians_python(clone: Path) -> None:
    bare = _run("python3 -m pip install -e .", clone)  # what the README used to say
    if os.geteuid() == 0:
        assert bare.returncode != 0 and "externally-managed-environment" in bare.stderr, bare.stderr
    r = _run(quick_start_commands()[0], clone)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[demo] success: RAM identical on both sides" in r.stdout
    assert (clone / "migd" / ".venv" / "bin" / "migctl").exists()


@needs_opt_in
@needs_debian_python
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to become nobody")
def test_quick_start_demo_as_a_plain_user(clone: Path) -> None:
    for path in [clone, *clone.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    r = _run(quick_start_commands()[0], clone, as_nobody)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[demo] success: RAM identical on both sides" in r.stdout
    assert (clone / "migd" / ".venv").stat().st_uid == NOBODY


def _service_install_commands() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Running it as a service"):]
    (block,) = re.findall(r"```sh\n(.*?)\n```", section, re.DOTALL)[:1]
    return [line.split("#")[0].strip() for line in block.splitlines()]


@needs_opt_in
@needs_debian_python
def test_service_install_as_written(clone: Path) -> None:
    """The README's venv steps for the unit, under a scratch prefix instead of /opt, then the unit's own
    command line with the example configuration: it starts, serves /metrics with the process metrics
    (read from /proc/stat), and stops cleanly on SIGTERM."""
    commands = _service_install_commands()
    prefix = clone / "opt"
    venv_steps = [c.replace("/opt/migd/venv", str(prefix / "migd" / "venv")) for c in commands
                  if "/opt/migd/venv" in c and "pip install" in c or c.startswith("/usr/bin/python3 -m venv")]
    assert len(venv_steps) == 2, commands
    for cmd in venv_steps:
        r = _run(cmd, clone)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    migd = prefix / "migd" / "venv" / "bin" / "migd"
    config = clone / "vm1.toml"
    config.write_text((REPO / "systemd" / "migd.toml.example").read_text().replace("NAME", "vm1"))
    unit = (REPO / "systemd" / "migd@.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.MULTILINE).group(1)
    sock = clone / "qmp.sock"
    argv = [a.replace("/opt/migd/venv/bin/migd", str(migd)).replace("/etc/migd/%i.toml", str(config))
            .replace("%i", "vm1").replace("unix:%t/migd/vm1/qmp.sock", f"unix:{sock}") for a in exec_start.split()]
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8940)) == 0:
            pytest.skip("something already listens on 127.0.0.1:8940")
    proc = subprocess.Popen(argv, cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={"PATH": SYSTEM_PATH})
    try:
        def metrics() -> str | None:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                with urllib.request.urlopen("http://127.0.0.1:8940/metrics", timeout=5) as resp:
                    return resp.read().decode()
            except OSError:
                return None
        text = wait_for(metrics, timeout=60, what="/metrics of the installed daemon")
        assert "migd_process_cpu_seconds_total" in text and "migd_process_resident_memory_bytes" in text
        assert sock.exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0
