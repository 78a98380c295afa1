"""``exec:CMD``: the source writes the stream to ``sh -c CMD``'s stdin, the destination reads its stdout.

The child is reaped when the channel closes. After a whole stream (the source wrote everything, or the
destination read to EOF) the command gets time to finish, e.g. ``cat > file`` must have written it
all; after a cancel or a failure it is killed at once, so neither side waits on a command that has
become pointless.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from typing import IO, Any

from migd.transports.base import Listener, TransportError
from migd.transports.channel import FdChannel
from migd.transports.uri import ExecURI
from migd.transports.wake import Waker

REAP_TIMEOUT = 10.0  # seconds a finished stream's command gets to exit before it is killed


class CommandChannel(FdChannel):
    """An FdChannel on a child's pipe that reports errors like QEMU and reaps the child on close."""

    def __init__(self, fd: int, proc: subprocess.Popen[bytes], direction: str) -> None:
        super().__init__(fd)
        self.proc = proc
        self._direction = direction  # "write" (source) or "read" (destination)
        self._reaped = False
        self._failed = False  # an I/O error or a shutdown: the stream did not end normally
        self._eof = False

    def write_vectored(self, bufs: Sequence[Any]) -> int:
        try:
            return super().write_vectored(bufs)
        except OSError as exc:
            self._failed = True
            raise TransportError(f"Unable to write to command: {exc.strerror or exc}") from exc

    def read_into(self, mv: Any) -> int:
        try:
            n = super().read_into(mv)
        except OSError as exc:
            self._failed = True
            raise TransportError(f"Unable to read from command: {exc.strerror or exc}") from exc
        if n == 0:
            self._eof = True
        return n

    def shutdown(self) -> None:
        self._failed = True
        super().shutdown()

    def close(self) -> None:
        super().close()
        complete = not self._failed and (self._direction == "write" or self._eof)
        self.reap(REAP_TIMEOUT if complete else 0.0)

    def reap(self, timeout: float = REAP_TIMEOUT) -> int | None:
        """Wait for the command (bounded), kill it if it does not exit; returns its exit status."""
        if self._reaped:
            return self.proc.returncode
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(self.proc)
        self._reaped = True
        return self.proc.returncode


def _spawn(uri: ExecURI, **pipes: Any) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(list(uri.args), close_fds=True, start_new_session=True, **pipes)
    except OSError as exc:
        raise TransportError(f"Unable to spawn command '{uri.display()}': {exc.strerror or exc}") from exc


def _detach(pipe: IO[bytes]) -> int:
    """Move a Popen pipe's descriptor into our hands (the file object would close it when collected).

    The FdChannel it becomes enlarges the pipe's buffer."""
    fd = os.dup(pipe.fileno())
    pipe.close()
    return fd



def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill the command's whole process group (``sh -c`` may have children) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def connect(uri: ExecURI) -> CommandChannel:
    proc = _spawn(uri, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    return CommandChannel(_detach(proc.stdin), proc, "write")


class ExecListener(Listener):
    """The command starts at once; like QEMU, ``accept`` returns its stdout once data (or EOF) is
    there, so the status stays ``setup`` until the source really begins."""

    def __init__(self, uri: ExecURI) -> None:
        self.uri = uri
        self.socket_address = []
        self._proc = _spawn(uri, stdout=subprocess.PIPE)
        self._taken = False
        self._waker = Waker()

    def accept(self) -> CommandChannel:
        if self._taken:
            raise TransportError("exec: the command's output was already taken")
        assert self._proc.stdout is not None
        if not self._waker.wait(self._proc.stdout.fileno()):
            raise TransportError("Listener closed before a connection arrived")
        self._taken = True
        fd = _detach(self._proc.stdout)
        self._proc.stdout = None
        return CommandChannel(fd, self._proc, "read")

    def close(self) -> None:
        """Before accept the command is ours to stop; after it the channel reaps it."""
        self._waker.wake()
        if not self._taken:
            self._taken = True
            _kill(self._proc)
            if self._proc.stdout is not None:
                self._proc.stdout.close()


def listen(uri: ExecURI) -> ExecListener:
    return ExecListener(uri)
