"""Chunk storage: the one place that knows where chunk bytes live.

Everything else addresses chunks by their sha256 through this interface, so a
second backend (an S3-compatible object store, say) can hold the bytes while
events, views and indexes stay in SQLite.
"""

from __future__ import annotations

import collections
import threading
from typing import Iterable, Protocol

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


def verified(sha: bytes, size: int, codec: int, data: bytes) -> bytes:
    """A stored chunk's bytes, decoded and checked against its sha256."""
    import hashlib  # loading OpenSSL costs ~2 ms: commands that read no contents skip it

    raw = decode(codec, data, size)
    # Every read is checked: a damaged chunk is an error, never wrong bytes.
    if hashlib.sha256(raw).digest() != sha:
        raise CorruptStore(f"chunk {sha.hex()}: sha256 mismatch (the store is damaged)")
    return raw


class ChunkStore(Protocol):
    def has(self, sha: bytes) -> bool: ...
    def put(self, sha: bytes, raw: bytes) -> bool: ...
    def put_encoded(self, sha: bytes, raw_size: int, encoded: tuple[int, bytes]) -> bool: ...
    def get_encoded(self, sha: bytes) -> tuple[int, int, bytes]: ...
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

    def get_encoded(self, sha: bytes) -> tuple[int, int, bytes]:
        """(raw size, codec, stored bytes), not yet decoded nor checked."""
        row = self.conn.execute("SELECT size, codec, data FROM chunk WHERE sha256 = ?", (sha,)).fetchone()
        if row is None:
            raise CorruptStore(f"chunk {sha.hex()} is missing")
        return row

    def get(self, sha: bytes) -> bytes:
        return verified(sha, *self.get_encoded(sha))

    def delete(self, sha: bytes) -> None:
        self.conn.execute("DELETE FROM chunk WHERE sha256 = ?", (sha,))


class Prefetch:
    """Verified chunks in the order given, decoded ahead of the reader.

    The stored bytes are fetched on the calling thread: queries on one SQLite
    connection from several threads serialise on its mutex and run slower
    than from one.  Decoding and the sha256 check (zstd and hashlib release
    the GIL) run on two helper threads, at most AHEAD chunks ahead, so memory
    stays bounded while both cores work.  Use as a context manager.
    """

    AHEAD = 16  # chunks of at most 1 MiB

    def __init__(self, chunks: ChunkStore, shas: Iterable[bytes]):
        self.fetch = chunks.get_encoded
        self.shas = iter(shas)
        self.pending: collections.deque = collections.deque()
        self.pool = None

    def __enter__(self) -> "Prefetch":
        return self

    def _submit(self) -> bool:
        sha = next(self.shas, None)
        if sha is None:
            return False
        import concurrent.futures

        if self.pool is None:
            self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="layerdb-read")
        try:
            fut = self.pool.submit(verified, sha, *self.fetch(sha))
        except CorruptStore as e:  # raised where the reader reaches this chunk, not before
            fut = concurrent.futures.Future()
            fut.set_exception(e)
        self.pending.append(fut)
        return True

    def next(self) -> bytes:
        """The next chunk; StopIteration when none is left."""
        while len(self.pending) < self.AHEAD and self._submit():
            pass
        if not self.pending:
            raise StopIteration
        return self.pending.popleft().result()  # raises what the helper raised

    def __iter__(self):
        while True:
            try:
                yield self.next()
            except StopIteration:
                return

    def __exit__(self, *exc: object) -> None:
        for f in self.pending:
            f.cancel()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
