"""Chunk storage: the one place that knows where chunk bytes live.

Everything else addresses chunks by their sha256 through this interface, so a
second backend (an S3-compatible object store, say) can hold the bytes while
events, views and indexes stay in SQLite.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Protocol

from .errors import CorruptStore

RAW, ZSTD = 0, 1
LEVEL = 3

_local = threading.local()


def _cctx():
    # One compressor per thread: reuse is much faster for small inputs, and a
    # context must not be shared between threads.
    c = getattr(_local, "cctx", None)
    if c is None:
        import zstandard  # loaded on first use: commands that read no contents skip it

        c = _local.cctx = zstandard.ZstdCompressor(level=LEVEL)
    return c


def _dctx():
    d = getattr(_local, "dctx", None)
    if d is None:
        import zstandard

        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def encode(raw: bytes) -> tuple[int, bytes]:
    """Compress, or keep raw when compressing does not shrink it."""
    z = _cctx().compress(raw)
    return (ZSTD, z) if len(z) < len(raw) else (RAW, raw)


def decode(codec: int, data: bytes, size: int) -> bytes:
    if codec == RAW:
        out = bytes(data)
    elif codec == ZSTD:
        import zstandard

        try:
            # The stored raw size is the bound; never trust the frame header.
            out = _dctx().decompress(data, max_output_size=size)
        except zstandard.ZstdError as e:
            raise CorruptStore(f"chunk does not decompress: {e}") from None
    else:
        raise CorruptStore(f"chunk has unknown codec {codec}")
    if len(out) != size:
        raise CorruptStore(f"chunk decompresses to {len(out)} bytes, expected {size}")
    return out


class ChunkStore(Protocol):
    def has(self, sha: bytes) -> bool: ...
    def put(self, sha: bytes, raw: bytes) -> bool: ...
    def put_encoded(self, sha: bytes, raw_size: int, encoded: tuple[int, bytes]) -> bool: ...
    def get(self, sha: bytes) -> bytes: ...
    def delete(self, sha: bytes) -> None: ...


class SqliteChunkStore:
    """Chunks in the store's own `chunk` table."""

    def __init__(self, conn):
        self.conn = conn

    def has(self, sha: bytes) -> bool:
        return self.conn.execute("SELECT 1 FROM chunk WHERE sha256 = ?", (sha,)).fetchone() is not None

    def put(self, sha: bytes, raw: bytes) -> bool:
        """Store a chunk unless present; True when it was new."""
        if self.has(sha):
            return False
        return self.put_encoded(sha, len(raw), encode(raw))

    def put_encoded(self, sha: bytes, raw_size: int, encoded: tuple[int, bytes]) -> bool:
        codec, data = encoded
        cur = self.conn.execute(
            "INSERT INTO chunk(sha256, size, codec, data) VALUES (?, ?, ?, ?) ON CONFLICT(sha256) DO NOTHING"
            " RETURNING id",
            (sha, raw_size, codec, data),
        )
        return cur.fetchone() is not None

    def get(self, sha: bytes) -> bytes:
        row = self.conn.execute("SELECT size, codec, data FROM chunk WHERE sha256 = ?", (sha,)).fetchone()
        if row is None:
            raise CorruptStore(f"chunk {sha.hex()} is missing")
        size, codec, data = row
        raw = decode(codec, data, size)
        # Every read is checked: a damaged chunk is an error, never wrong bytes.
        if hashlib.sha256(raw).digest() != sha:
            raise CorruptStore(f"chunk {sha.hex()}: sha256 mismatch (the store is damaged)")
        return raw

    def delete(self, sha: bytes) -> None:
        self.conn.execute("DELETE FROM chunk WHERE sha256 = ?", (sha,))
