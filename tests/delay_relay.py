"""A delaying TCP relay: what ``tc netem delay`` would do, for a kernel without ``sch_netem``.

The fault test bed (tests/netfault.py) runs it inside a network namespace, between a migration source
and its destination: every byte that arrives on one side is written to the other side a fixed delay
later, in both directions, so the round trip grows by twice the delay. Each direction holds at most
``--buffer`` bytes; past that it stops reading, and TCP's own flow control pushes back on the sender
(as a real link's window would). Half-closes are forwarded after the same delay; a reset on either side
closes both.

Run as a script (it prints ``listening PORT`` once it accepts connections, then serves until killed)::

    python3 tests/delay_relay.py --listen 10.231.0.2:0 --connect 127.0.0.1:4444 --delay 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys

CHUNK = 64 << 10
DEFAULT_BUFFER = 16 << 20  # bytes in flight per direction: 320 MB/s at 50 ms, more than migd sends here


def split_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (the last colon splits) as a tuple; a clear error for anything else."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


class DelayedPipe:
    """One direction of a relayed connection: read, hold each chunk ``delay`` s, write (event loop)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float,
                 buffer: int) -> None:
        self.reader = reader
        self.writer = writer
        self.delay = delay
        self.buffer = buffer
        self.pending = 0  # bytes read and not yet written
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()  # (due time, data; b"" = EOF)
        self.arrived = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def read_side(self) -> None:
        """Read chunks and queue them with their due time; wait while the buffer is full (event loop)."""
        loop = asyncio.get_running_loop()
        while True:
            await self.room.wait()
            data = await self.reader.read(CHUNK)
            self.queue.append((loop.time() + self.delay, data))
            self.arrived.set()
            if not data:
                return
            self.pending += len(data)
            if self.pending >= self.buffer:
                self.room.clear()

    async def write_side(self) -> None:
        """Write each queued chunk once it is due; forward the EOF as a half-close (event loop)."""
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.arrived.clear()
                await self.arrived.wait()
            due, data = self.queue.popleft()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self.writer.write(data)
            await self.writer.drain()
            self.pending -= len(data)
            if self.pending < self.buffer:
                self.room.set()

    async def run(self) -> None:
        """Both halves of this direction until the EOF was written (event loop)."""
        await asyncio.gather(self.read_side(), self.write_side())


async def relay_connection(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                           target: tuple[str, int], delay: float, buffer: int) -> None:
    """Relay one accepted connection to ``target`` until both directions ended or one failed (event loop)."""
    try:
        server_r, server_w = await asyncio.open_connection(*target)
    except OSError as exc:
        print(f"delay_relay: cannot connect to {target[0]}:{target[1]}: {exc}", file=sys.stderr, flush=True)
        client_w.transport.abort()
        return
    up = DelayedPipe(client_r, server_w, delay, buffer)
    down = DelayedPipe(server_r, client_w, delay, buffer)
    tasks = [asyncio.ensure_future(up.run()), asyncio.ensure_future(down.run())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # re-raises what ended that direction
    except (OSError, asyncio.IncompleteReadError):
        pass  # a reset on one side: close both below
    finally:
        for task in tasks:
            task.cancel()
        client_w.transport.abort()
        server_w.transport.abort()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: float, buffer: int) -> None:
    """Accept connections on ``listen`` forever, relaying each to ``target`` (event loop)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await relay_connection(reader, writer, target, delay, buffer)

    server = await asyncio.start_server(handle, listen[0], listen[1], limit=CHUNK * 2)
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and serve until killed (main thread)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=split_hostport, required=True, help="HOST:PORT (port 0: any)")
    parser.add_argument("--connect", type=split_hostport, required=True, help="HOST:PORT to relay to")
    parser.add_argument("--delay", type=float, required=True, help="seconds added in each direction")
    parser.add_argument("--buffer", type=int, default=DEFAULT_BUFFER, help="bytes held per direction")
    args = parser.parse_args(argv)
    if args.delay < 0 or args.buffer <= 0:
        parser.error("--delay must be >= 0 and --buffer > 0")
    try:
        asyncio.run(serve(args.listen, args.connect, args.delay, args.buffer))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
