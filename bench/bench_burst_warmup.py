"""Does a burst of page work cost more per byte after a rate-limit sleep than right after another?

Under a bandwidth cap the migration thread works in bursts: one window's budget (3.4 MB at
32 MiB/s, 13.4 MB at 128 MiB/s), then a sleep to the end of the 100 ms window. The switch-over
policy learns the cost per byte of the final pass from those bursts, but the final pass is one long
burst that never sleeps. If a CPU that slept pays a wake-up cost (caches, TLB, the host's idle
state), every capped window overstates what the final pass will cost, the more the shorter the
burst. This bench measures that cost on this machine: bursts of random scattered 4 KiB pages of a
512 MiB block, gathered (numpy fancy indexing, as the page loop stages short runs) and, with
``--send``, written into a unix socket that a forked reader drains (each timed burst starts on an
empty socket); each size is timed after a sleep of ``--sleep-ms`` and right after another burst of
the same size, alternated, in the same run. Prints the median of each, the difference (the wake-up
cost), and their ratio.

    python3 bench/bench_burst_warmup.py [--sizes-mb 0.84 3.36 13.4 49] [--reps 40] [--sleep-ms 98] [--send]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import statistics
import struct
import termios
import time

import numpy as np

PAGE = 4096
BLOCK = 512 << 20
CHUNK = 26  # pages gathered and written at a time


def reader(sock: socket.socket) -> None:
    """(forked child) Drain the socket until EOF."""
    buf = bytearray(1 << 20)
    while sock.recv_into(buf):
        pass
    os._exit(0)


def drained(sock: socket.socket | None, timeout: float = 1.0) -> None:
    """Spin (the CPU kept busy, so warm) until the reader took everything queued, ``timeout`` at most:
    a timed burst must not wait for the one before it."""
    deadline = time.perf_counter() + timeout
    while sock is not None and time.perf_counter() < deadline:
        if struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0] == 0:
            return


def burst(pages: np.ndarray, idx: np.ndarray, out: np.ndarray, sock: socket.socket | None) -> float:
    """Seconds to gather (and send) the pages ``idx`` in chunks, as a burst of the page loop."""
    t0 = time.perf_counter()
    for start in range(0, idx.size, CHUNK):
        chunk = np.sort(idx[start:start + CHUNK])
        staged = out[:chunk.size]
        np.take(pages, chunk, axis=0, out=staged)
        if sock is not None:
            sock.sendall(staged.data.cast("B"))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[0.84, 3.36, 13.4, 49.0])
    ap.add_argument("--reps", type=int, default=40, help="bursts of each kind per size")
    ap.add_argument("--sleep-ms", type=float, default=98.0, help="the sleep before a cold burst")
    ap.add_argument("--send", action="store_true", help="also write each chunk into a unix socket")
    args = ap.parse_args()
    ram = np.random.default_rng(0).integers(0, 255, BLOCK, dtype=np.uint8)
    pages = ram.reshape(-1, PAGE)
    rng = np.random.default_rng(1)
    out = np.empty((CHUNK, PAGE), dtype=np.uint8)
    sock = child = None
    if args.send:
        sock, peer = socket.socketpair()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        child = os.fork()
        if child == 0:
            sock.close()
            reader(peer)
        peer.close()
    print(f"random 4 KiB pages of a {BLOCK >> 20} MiB block, {CHUNK} a chunk, "
          f"{'gathered and sent' if args.send else 'gathered'}; median of {args.reps} bursts each")
    try:
        for mb in args.sizes_mb:
            n = max(1, int(mb * 1e6 / PAGE))
            cold: list[float] = []
            warm: list[float] = []
            for _ in range(args.reps):
                drained(sock)
                time.sleep(args.sleep_ms / 1000)
                cold.append(burst(pages, rng.choice(pages.shape[0], n, replace=False), out, sock))
                burst(pages, rng.choice(pages.shape[0], n, replace=False), out, sock)  # warms the CPU
                drained(sock)
                warm.append(burst(pages, rng.choice(pages.shape[0], n, replace=False), out, sock))
            c, w = statistics.median(cold), statistics.median(warm)
            print(f"{n * PAGE / 1e6:6.2f} MB: after a {args.sleep_ms:.0f} ms sleep {c * 1e3:7.2f} ms "
                  f"({c / (n * PAGE) * 1e9:.2f} ns/B), after a burst {w * 1e3:7.2f} ms "
                  f"({w / (n * PAGE) * 1e9:.2f} ns/B): {(c - w) * 1e3:5.2f} ms more, x{c / w:.2f}", flush=True)
    finally:
        if sock is not None:
            sock.close()
        if child:
            os.waitpid(child, 0)


if __name__ == "__main__":
    main()
