"""Linux MSG_ZEROCOPY on one connected socket: sends that pin the caller's pages instead of copying them.

With ``SO_ZEROCOPY`` set, a ``sendmsg(..., MSG_ZEROCOPY)`` returns before the kernel is done with the
buffers; each such call that sent something gets the next number of a per-socket counter, and the
kernel later queues a completion for a range of numbers on the socket's error queue
(``recvmsg(MSG_ERRQUEUE)``: a ``sock_extended_err`` with origin ``SO_EE_ORIGIN_ZEROCOPY`` and the range in
``ee_info``..``ee_data``). Until its completion arrived a buffer must stay alive; its content may change
(guest RAM: the dirty bitmap sends a page written meanwhile again). ``flush`` waits for every
completion, as QEMU does at each multifd sync point. When the kernel copied anyway (loopback, a device
without scatter-gather) the completion says so (``SO_EE_CODE_ZEROCOPY_COPIED``); ``flush`` then reports
the round as missed (QEMU's ``dirty-sync-missed-zero-copy``). Unix sockets do not support it
(``EOPNOTSUPP``): the caller reports QEMU's "Zero copy send feature not detected in host kernel".

``SpliceSender`` is the unix-socket counterpart for one channel (the page runs of a held guest):
``vmsplice`` puts references to the guest's pages into a pipe and ``splice`` moves them into the
socket (Linux >= 6.5 takes page references there too), so the sender never copies a page; the
receiver copies straight out of guest RAM. Until the receiver read them the pages must not change:
``drain`` waits until the socket's send queue (``SIOCOUTQ``: bytes the peer has not consumed) is empty.

Not over TCP: there SIOCOUTQ counts only unacknowledged bytes, so an empty queue does not mean the
peer read the pages, and on loopback references cost more than the copy anyway. Measured with a
scratch splice into TCP (bench/README.md, bench_pageloop): sender 0.426 against 0.377 CPU s/GiB
copied, receiver 0.437 against 0.338; the copy reads what the checksum hash has just brought into
the cache, while references cost page pinning and one 4 KiB frag each on both ends.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

from migd.transports.sendqueue import queued_bytes

SO_ZEROCOPY = 60  # <asm-generic/socket.h>; Python's socket module does not name these
MSG_ZEROCOPY = 0x4000000
SO_EE_ORIGIN_ZEROCOPY = 5  # <linux/errqueue.h>
SO_EE_CODE_ZEROCOPY_COPIED = 1
_RECVERR = {(socket.SOL_IP, 11), (41, 25)}  # (SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # ee_errno, ee_origin, ee_type, ee_code, ee_pad, ee_info, ee_data
_ANC_SIZE = socket.CMSG_SPACE(_EXTENDED_ERR.size + 32)  # the error plus the offender's address
POLL_MS = 50  # between checks of ``stop`` while waiting for completions

NOT_DETECTED = "Zero copy send feature not detected in host kernel"  # QEMU's text

F_SETPIPE_SZ = 1031  # <linux/fcntl.h>
SPLICE_F_NONBLOCK = 2
PIPE_SIZE = 1 << 20  # bytes of page references one vmsplice hands over, at most (pipe-max-size default)
DRAIN_POLL = 0.0002  # seconds between looks at the send queue while draining
DRAIN_MAX = 30.0  # a peer that reads nothing for this long: stop waiting (the checksum still guards)


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_vmsplice = _libc.vmsplice
_vmsplice.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_size_t, ctypes.c_uint]
_vmsplice.restype = ctypes.c_ssize_t


class ZeroCopySocket:
    """MSG_ZEROCOPY sends on ``sock`` and the reaping of their completions. One thread uses it."""

    def __init__(self, sock: socket.socket) -> None:
        """Turn ``SO_ZEROCOPY`` on; OSError (EOPNOTSUPP on a unix socket) when the kernel cannot."""
        sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
        self.sock = sock
        self.queued = 0  # sendmsg calls that will complete
        self.completed = 0
        self.copied = 0  # completions in which the kernel copied after all
        self.avoided = 0  # completions in which it did not
        self._avoided_at_flush = 0

    def send(self, bufs: Sequence[Any], stop: Callable[[], bool]) -> int:
        """One ``sendmsg`` with MSG_ZEROCOPY (may be short). When the kernel runs out of room for
        pinned pages (ENOBUFS), reap completions and try again; a plain send when none are pending."""
        while True:
            try:
                n = self.sock.sendmsg(bufs, [], MSG_ZEROCOPY)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                if self.queued == self.completed:
                    return self.sock.sendmsg(bufs)
                self.reap(wait=True, stop=stop)
                continue
            if n > 0:
                self.queued += 1
            return n

    def reap(self, *, wait: bool, stop: Callable[[], bool]) -> None:
        """Take what completions are queued; with ``wait``, at least one (unless none is pending)."""
        poller: select.poll | None = None
        while self.completed < self.queued:
            try:
                _, anc, _, _ = self.sock.recvmsg(0, _ANC_SIZE, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not wait:
                    return
                if stop():
                    raise OSError(errno.ESHUTDOWN, "Channel was shut down") from None
                if poller is None:
                    poller = select.poll()
                    poller.register(self.sock.fileno(), select.POLLERR)
                poller.poll(POLL_MS)  # the error queue is readable as POLLERR
                continue
            self._completion(anc)
            wait = False  # got one: take the rest without waiting

    def _completion(self, anc: list[tuple[int, int, bytes]]) -> None:
        for level, kind, data in anc:
            if (level, kind) not in _RECVERR or len(data) < _EXTENDED_ERR.size:
                continue
            err, origin, _type, code, _pad, lo, hi = _EXTENDED_ERR.unpack_from(data)
            if err or origin != SO_EE_ORIGIN_ZEROCOPY:
                raise OSError(err or errno.EPROTO, "Error on socket" if err else "Error not from zero copy")
            count = ((hi - lo) & 0xFFFFFFFF) + 1
            self.completed += count
            if code & SO_EE_CODE_ZEROCOPY_COPIED:
                self.copied += count
            else:
                self.avoided += count

    def flush(self, stop: Callable[[], bool]) -> bool:
        """Wait until every send completed (their buffers are free again). True when no completion
        since the previous flush avoided the copy: QEMU counts that as a missed zero copy."""
        while self.completed < self.queued:
            self.reap(wait=True, stop=stop)
        missed = self.avoided == self._avoided_at_flush
        self._avoided_at_flush = self.avoided
        return missed


class SpliceSender:
    """Page references from memory into one connected unix stream socket. One thread uses it."""

    def __init__(self, sock: socket.socket) -> None:
        """A pipe sized ``PIPE_SIZE`` (or what the kernel grants); OSError when there is none."""
        self.sock = sock
        self._r, self._w = os.pipe()
        try:
            self._room = fcntl.fcntl(self._w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            self._room = fcntl.fcntl(self._w, 1032)  # F_GETPIPE_SZ: the default (64 KiB) still works
        self._room -= 4096  # an unaligned start takes one pipe slot more
        self._iov = _IOVec()
        self.spliced = 0  # bytes sent as page references since the last drain

    def send(self, view: memoryview) -> int:
        """Send all of ``view`` (writable memory that outlives the transfer) as page references."""
        addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
        total = len(view)
        done = 0
        fd = self.sock.fileno()
        while done < total:
            self._iov.base = addr + done
            self._iov.len = min(self._room, total - done)
            n = _vmsplice(self._w, ctypes.byref(self._iov), 1, SPLICE_F_NONBLOCK)
            if n < 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            left = n
            while left:  # the pipe is empty again before the next vmsplice: it can never block
                moved = os.splice(self._r, fd, left)
                if moved <= 0:
                    raise OSError(errno.EPIPE, os.strerror(errno.EPIPE))
                left -= moved
            done += n
        self.spliced += total
        return total

    def drain(self, stop: Callable[[], bool]) -> None:
        """Wait until the peer consumed everything sent (the pages may change afterwards)."""
        if not self.spliced:
            return
        deadline = time.monotonic() + DRAIN_MAX
        while time.monotonic() < deadline and not stop():
            if not queued_bytes(self.sock):  # not yet consumed by the peer
                break
            time.sleep(DRAIN_POLL)
        self.spliced = 0

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)
