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
"""

from __future__ import annotations

import errno
import select
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

SO_ZEROCOPY = 60  # <asm-generic/socket.h>; Python's socket module does not name these
MSG_ZEROCOPY = 0x4000000
SO_EE_ORIGIN_ZEROCOPY = 5  # <linux/errqueue.h>
SO_EE_CODE_ZEROCOPY_COPIED = 1
_RECVERR = {(socket.SOL_IP, 11), (41, 25)}  # (SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # ee_errno, ee_origin, ee_type, ee_code, ee_pad, ee_info, ee_data
_ANC_SIZE = socket.CMSG_SPACE(_EXTENDED_ERR.size + 32)  # the error plus the offender's address
POLL_MS = 50  # between checks of ``stop`` while waiting for completions

NOT_DETECTED = "Zero copy send feature not detected in host kernel"  # QEMU's text


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
