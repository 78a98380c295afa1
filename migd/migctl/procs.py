"""Local migd processes for the demo: start, reach over QMP, stop, and never leave one behind.

Each daemon runs as ``sys.executable -P -m migd`` in the demo's temporary directory, with the folder
that holds the very ``migd`` package migctl runs from first on ``PYTHONPATH``: whatever the operator's
working directory holds (a clone's parent, another checkout) cannot shadow it. Its log is kept there
too, so a failure can show the daemon's own last words.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import migd
from migd.migctl.client import Client, MigctlError

# The directory holding the migd package this process imported (a checkout or site-packages).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(migd.__file__)))


def daemon_environment() -> dict[str, str]:
    """This environment with PACKAGE_ROOT first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    return env


@dataclass
class DaemonProcess:
    name: str
    workdir: str
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    client: Client | None = None
    qmp_path: str = field(init=False)
    log_path: str = field(init=False)

    def __post_init__(self) -> None:
        self.qmp_path = os.path.join(self.workdir, f"{self.name}.qmp")
        self.log_path = os.path.join(self.workdir, f"{self.name}.log")

    def start(self) -> None:
        cmd = [sys.executable, "-P", "-m", "migd", "--name", self.name, "--qmp", f"unix:{self.qmp_path}",
               *self.args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=self.workdir, env=daemon_environment())

    async def connect(self, timeout: float = 60.0) -> Client:
        """Connect once the daemon listens; fail early, with its log, if it exits instead."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise MigctlError(f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}")
            if os.path.exists(self.qmp_path):
                client = Client(self.qmp_path, name=f"migctl-demo-{self.name}")
                try:
                    await client.connect(timeout=5.0)
                    self.client = client
                    return client
                except MigctlError:
                    pass
            if time.monotonic() > deadline:
                raise MigctlError(f"{self.name} did not open {self.qmp_path} within {timeout:.0f} s:\n"
                                  f"{self.log_tail()}")
            await asyncio.sleep(0.05)  # polling for a file another process creates

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                text = f.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    async def stop(self, timeout: float = 10.0) -> None:
        """quit over QMP, then SIGTERM, then SIGKILL: the process is gone when this returns."""
        asked = False
        if self.client is not None:
            try:
                await asyncio.wait_for(self.client.execute("quit"), 2.0)
                asked = True
            except (TimeoutError, MigctlError):
                pass
            await self.client.close()
            self.client = None
        if self.proc is None:
            return
        if asked:
            await self._exited(timeout)
        if self.proc.poll() is None:
            self.proc.terminate()  # never connected (interrupted early) or did not honour quit
            await self._exited(timeout)
        if self.proc.poll() is None:
            self.proc.kill()
        await asyncio.to_thread(self.proc.wait)

    async def _exited(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.proc.poll() is not None
