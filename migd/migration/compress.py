"""Page compression for multifd channels: ``multifd-compression`` none, zlib or zstd.

QEMU offers these methods on multifd only, one compressor per channel thread; migd does the same. Each
packet's normal pages are compressed as one independent frame (migd's choice: QEMU keeps one zlib/zstd
stream per channel across packets), so a packet can be decoded on its own and a receiver never holds
more state than one packet. zlib and zstd both release the GIL while they work, so N channel threads
compress in parallel. The method travels in the packet flags (QEMU's values) and the receiver refuses
a packet whose method is not the one it was configured with.
"""

from __future__ import annotations

import zlib

import zstandard

from migd.threads import any_thread

# QEMU's MULTIFD_FLAG_* compression values (bits 1..3 of the packet flags)
FLAG_NOCOMP = 0 << 1
FLAG_ZLIB = 1 << 1
FLAG_ZSTD = 2 << 1
FLAG_MASK = 0xE

METHOD_FLAGS = {"none": FLAG_NOCOMP, "zlib": FLAG_ZLIB, "zstd": FLAG_ZSTD}
FLAG_NAMES = {flag: name for name, flag in METHOD_FLAGS.items()}
SUPPORTED = frozenset(METHOD_FLAGS)


class CompressError(Exception):
    """A frame that does not decode to exactly the expected size."""


def unsupported_text(method: str) -> str:
    """migd's refusal of a method QEMU knows but migd does not implement (qatzip, qpl, uadk)."""
    return f"multifd-compression '{method}' is not supported by migd (use none, zlib or zstd)"


class Compressor:
    """One channel's compressor; used by that channel's thread only."""

    def __init__(self, method: str, level: int) -> None:
        if method not in SUPPORTED:
            raise ValueError(unsupported_text(method))
        self.method = method
        self.flag = METHOD_FLAGS[method]
        self.level = level
        self._zstd = zstandard.ZstdCompressor(level=level) if method == "zstd" else None

    @any_thread
    def compress(self, data: memoryview) -> bytes:
        """One independent frame of ``data`` (not for ``none``)."""
        if self._zstd is not None:
            return self._zstd.compress(data)
        return zlib.compress(data, self.level)


class Decompressor:
    """One channel's decompressor; used by that channel's receiver thread only."""

    def __init__(self, method: str) -> None:
        if method not in SUPPORTED:
            raise ValueError(unsupported_text(method))
        self.method = method
        self.flag = METHOD_FLAGS[method]
        self._zstd = zstandard.ZstdDecompressor() if method == "zstd" else None

    @any_thread
    def decompress(self, frame: bytes | memoryview, size: int) -> bytes:
        """Exactly ``size`` bytes out of one frame; never allocates more than ``size``."""
        try:
            if self._zstd is not None:  # a reader, so a lying frame header cannot make us allocate
                with self._zstd.stream_reader(frame, read_across_frames=False) as reader:
                    out = reader.read(size + 1)
            else:
                d = zlib.decompressobj()
                out = d.decompress(frame, size)
                if d.unconsumed_tail or not d.eof:
                    raise CompressError(f"zlib frame does not end after {size} bytes")
        except (zlib.error, zstandard.ZstdError) as exc:
            raise CompressError(f"{self.method} frame cannot be decoded: {exc}") from None
        if len(out) != size:
            raise CompressError(f"{self.method} frame decodes to {len(out)} bytes, expected {size}")
        return out
