"""End-to-end harness: real ``python -m migd`` processes driven over their unix QMP socket.

Use from *synchronous* tests (the qemu.qmp legacy client runs its own event loop)::

    def test_stop(migd_factory):
        vm = migd_factory("src", "-m", "64M")
        vm.cmd("stop")
        vm.wait_event("STOP")
        assert vm.cmd("query-status")["status"] == "paused"
        err = vm.cmd_error("migrate-set-parameters", max_bandwidth="x")   # error dict {class, desc}
        vm.cmd("migrate-set-parameters", **{"max-bandwidth": 0})          # hyphenated keys as is
        assert vm.quit() == 0

``Migd(...)`` returns once the daemon is fully up: QMP greets only after every listener (an
``--incoming`` one included) is open. ``cmd`` keyword names are sent with ``_`` turned into ``-``;
use ``cmd_raw`` for anything exact.
Sockets for a migration between two daemons: ``vm.sock_path("mig")`` gives a short unix path.
Async tests pass ``connect=False`` and use their own ``qemu.qmp.QMPClient`` on ``vm.qmp_path``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")

_SUN_PATH_MAX = 100  # sockaddr_un holds 108 bytes; keep a margin


class MigdError(AssertionError):
    """The daemon did something a test did not expect (exit, error reply, timeout)."""


def wait_for(fn: Callable[[], T], timeout: float = 30, interval: float = 0.02, what: str = "") -> T:
    """Poll ``fn`` until it returns something truthy; return that (or raise MigdError on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise MigdError(f"timed out after {timeout}s waiting for {what or getattr(fn, '__name__', fn)}")
        time.sleep(interval)


HELD = ("active", "pre-switchover")  # where a held migration may be seen


def hold_active(src: Any) -> None:
    """Keep ``src``'s next migration from completing until ``release_hold``: ``pause-before-switchover``
    is the barrier (QEMU's: the migration waits in ``pre-switchover``, vCPUs stopped, for
    ``migrate-continue``), and a 1 ms downtime limit keeps it ``active`` before that for as long as
    each sync finds pages dirtied. Tests must accept either state (``HELD``): a vCPU dirties in 10 ms
    slices and syncs come back to back under a 1 ms limit, so one soon finds nothing dirty, and a sync
    that finds nothing switches over at any limit (a migration "held" by the limit alone completed in
    0.1-0.8 s). A bandwidth cap does not hold it either: the policy predicts the final pass at the
    uncapped link rate."""
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "pause-before-switchover", "state": True}])
    src.cmd("migrate-set-parameters", **{"downtime-limit": 1})


def release_hold(src: Any, timeout: float = 120) -> None:
    """Let a migration held by ``hold_active`` complete: a normal limit, unlimited bandwidth, and
    ``migrate-continue`` once it waits at the barrier (returns early if it ended otherwise)."""
    src.cmd("migrate-set-parameters", **{"downtime-limit": 300, "max-bandwidth": 0})
    status = wait_for(lambda: (lambda s: s if s not in ("setup", "active") else None)(
        src.cmd("query-migrate").get("status")), timeout, what="the held migration to reach its barrier")
    if status == "pre-switchover":
        src.cmd("migrate-continue", state="pre-switchover")


def settled(vm: Any, want: str, timeout: float = 10) -> str:
    """Wait for ``vm``'s run state to become ``want`` and return it. After a migration that stopped the
    vCPUs fails or is cancelled, the status comes first and the guest's resume (or ``postmigrate``)
    a moment later, as in QEMU (MIGRATION ``failed``, then RESUME): a query in between sees
    ``finish-migrate``."""
    wait_for(lambda: vm.cmd("query-status")["status"] == want, timeout, what=f"{vm.name}'s run state to be {want}")
    return want


def thread_names(vm: Any, prefix: str) -> list[str]:
    """Names of the daemon's OS threads that start with ``prefix`` (from /proc: what really runs)."""
    names = []
    task = f"/proc/{vm.proc.pid}/task"
    for tid in os.listdir(task):
        try:
            with open(f"{task}/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            continue  # the thread ended meanwhile
    return [n for n in names if n.startswith(prefix)]


def random_ram_file(path: Path, mib: int) -> Path:
    """A guest RAM file of ``mib`` MiB of random bytes (``--mem-path``): every page costs its full size."""
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    return path


def _kill_if_running(proc: subprocess.Popen[bytes]) -> None:
    """At interpreter exit: a daemon still running is killed (and reaped)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _wire_args(arguments: dict[str, Any]) -> dict[str, Any]:
    return {key.replace("_", "-"): value for key, value in arguments.items()}


class Migd:
    """One migd process with a unix QMP socket in a (short) temp dir, and a negotiated client."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        *args: str,
        env: dict[str, str] | None = None,
        timeout: float = 30,
        connect: bool = True,
        prefix: Sequence[str] = (),
    ) -> None:
        """``prefix`` goes before the interpreter (``ip netns exec NS`` runs it in a network namespace)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.args = args
        self._sockdir: Path | None = None
        self._expect_exit = not connect
        self.qmp_path = self.sock_path("qmp")
        self.log_path = self.workdir / f"{name}.log"
        self.events: list[dict[str, Any]] = []  # received on the harness client, not yet waited for
        self._clients: list[QEMUMonitorProtocol] = []
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
        full_env.pop("NOTIFY_SOCKET", None)
        full_env.update(env or {})
        cmdline = [*prefix, sys.executable, "-m", "migd", "--name", name, "--qmp", f"unix:{self.qmp_path}", *args]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmdline, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=self.workdir)
        # a script using this harness outside pytest (whose fixture kills its daemons) must not leave
        # them running: 16 forgotten guests once loaded this 2-core machine for 40 minutes
        atexit.register(_kill_if_running, self.proc)
        try:
            wait_for(self._socket_ready, timeout, what=f"{name}'s QMP socket")
            # connect=False: no harness client (for async tests, which bring their own QMPClient,
            # and for daemons expected to exit at once)
            self.qmp: QEMUMonitorProtocol = self.client() if connect else None  # type: ignore[assignment]
        except BaseException:
            self.kill()
            raise

    # -- paths and processes --------------------------------------------------------------------

    def sock_path(self, what: str) -> Path:
        """A unix socket path for ``what`` that fits in sockaddr_un (the workdir may be too deep)."""
        path = self.workdir / f"{self.name}.{what}.sock"
        if len(str(path)) <= _SUN_PATH_MAX:
            return path
        if self._sockdir is None:
            self._sockdir = Path(tempfile.mkdtemp(prefix="migd-"))
        return self._sockdir / f"{self.name}.{what}.sock"

    def _socket_ready(self) -> bool:
        if self.proc.poll() is not None and self._expect_exit:
            return True  # a daemon meant to exit (a failed --incoming) may do so before any socket
        if self.proc.poll() is not None:
            raise MigdError(f"migd {self.name} exited with {self.proc.returncode} before its socket was up:\n{self.log()}")
        return self.qmp_path.exists()

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float = 30) -> int:
        """Wait for the process to exit; its exit status."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise MigdError(f"migd {self.name} did not exit within {timeout}s:\n{self.log()}") from None

    # -- QMP ------------------------------------------------------------------------------------

    def client(self, negotiate: bool = True) -> QEMUMonitorProtocol:
        """A new client on the QMP socket (negotiated unless told otherwise); closed by close()."""
        last: Exception | None = None
        for _ in range(100):  # the socket file can exist a moment before listen()
            qmp = QEMUMonitorProtocol(str(self.qmp_path))
            try:
                qmp.connect(negotiate=negotiate)
                break
            except Exception as exc:  # ConnectError, with the OSError inside
                last = exc
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        else:
            raise MigdError(f"cannot connect to {self.qmp_path}: {last}\n{self.log()}")
        if self.proc.poll() is not None and last is not None:
            raise MigdError(f"cannot connect to {self.qmp_path}: {last}\n{self.log()}")
        qmp.settimeout(60)
        self._clients.append(qmp)
        return qmp

    def cmd(self, name: str, **arguments: Any) -> Any:
        """Run a command; its ``return`` value. An error reply raises qemu.qmp's ExecuteError."""
        return self.qmp.cmd(name, **_wire_args(arguments))

    def cmd_raw(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run a command with exactly these arguments; the whole reply ({"return"} or {"error"})."""
        msg: dict[str, Any] = {"execute": name}
        if arguments is not None:
            msg["arguments"] = arguments
        return self.qmp.cmd_obj(msg)

    def cmd_error(self, name: str, **arguments: Any) -> dict[str, str]:
        """Run a command that must fail; its error as {"class": ..., "desc": ...}."""
        try:
            value = self.cmd(name, **arguments)
        except ExecuteError as exc:
            return {"class": exc.error_class, "desc": exc.error.error.desc}
        raise MigdError(f"{name} {arguments} succeeded ({value!r}) but an error was expected")

    def _pull(self, timeout: float) -> None:
        try:
            event = self.qmp.pull_event(wait=max(timeout, 0.001))
        except TimeoutError:
            return
        if event is not None:
            self.events.append(event)

    def wait_event(
        self, name: str, pred: Callable[[dict[str, Any]], bool] | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        """The first not-yet-consumed event ``name`` (matching ``pred(event)``) on the harness client.

        Events that do not match stay queued for later calls, in order.
        """
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("event") == name and (pred is None or pred(event)):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [e.get("event") for e in self.events]
                raise MigdError(f"no {name} event within {timeout}s on {self.name} (queued: {seen})")
            if self.proc.poll() is not None and self.qmp._qmp.events.empty():  # noqa: SLF001
                raise MigdError(f"migd {self.name} exited ({self.proc.returncode}) while waiting for {name}")
            self._pull(min(left, 0.5))

    def clear_events(self) -> None:
        self.events.clear()
        self.qmp.clear_events()

    def wait_for(self, fn: Callable[[], T], timeout: float = 30, what: str = "") -> T:
        """Poll ``fn`` until truthy, failing early if the daemon died."""

        def check() -> T:
            if self.proc.poll() is not None:
                raise MigdError(f"migd {self.name} exited ({self.proc.returncode}):\n{self.log()}")
            return fn()

        return wait_for(check, timeout, what=what)

    def status(self) -> str:
        return self.cmd("query-status")["status"]

    # -- ending ---------------------------------------------------------------------------------

    def quit(self, timeout: float = 30) -> int:
        """``quit`` over QMP; the exit status (0 for a clean exit)."""
        if self.proc.poll() is None:
            try:
                if self.qmp is None:
                    self.qmp = self.client()
                self.cmd("quit")
            except Exception:  # the daemon may go before the reply is read
                pass
        code = self.wait(timeout)
        self.close()
        return code

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.wait(timeout)
        self.close()
        return code

    def kill(self) -> None:
        """SIGKILL (no clean-up by the daemon): for crash tests and for tidying after a failure."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.close()

    def close(self) -> None:
        """Close the harness's clients and files (the process is left alone)."""
        for qmp in self._clients:
            try:
                qmp.close()
            except Exception:
                pass
        self._clients.clear()
        if not self._log.closed:
            self._log.close()
        if self._sockdir is not None and self.proc.poll() is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None


class RawQMP:
    """A bare socket client for protocol tests: exact bytes out, one parsed line at a time back."""

    def __init__(self, path: Path | str, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._file = self.sock.makefile("rb")
        self.greeting = self.recv()

    def send(self, data: bytes | str | dict[str, Any]) -> None:
        if isinstance(data, dict):
            data = json.dumps(data)
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def recv_line(self) -> bytes:
        line = self._file.readline()
        if not line:
            raise MigdError("connection closed by migd")
        return line

    def recv(self) -> dict[str, Any]:
        """The next message (events included); every message must be one CRLF-terminated object."""
        line = self.recv_line()
        if not line.endswith(b"\r\n"):
            raise MigdError(f"line without CRLF: {line!r}")
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise MigdError(f"not a JSON object: {line!r}")
        return msg

    def reply(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            msg = self.recv()
            if "event" not in msg:
                return msg

    def negotiate(self) -> None:
        self.send(b'{"execute":"qmp_capabilities"}')
        reply = self.reply()
        if reply != {"return": {}}:
            raise MigdError(f"negotiation failed: {reply}")

    def execute(self, name: str, arguments: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name, **extra}
        if arguments is not None:
            msg["arguments"] = arguments
        self.send(msg)
        return self.reply()

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> RawQMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
