"""File contents: hashing, chunking, dedup, and reading back as a stream."""

from __future__ import annotations

import hashlib
import io
from typing import Iterable, Iterator

from .chunks import ChunkStore
from .errors import CorruptStore

# Contents up to this size are one chunk, kept whole; larger ones are cut into
# chunks of this size, each stored once however many files share it.
CHUNK_SIZE = 1 << 20


class ContentStore:
    def __init__(self, conn, chunks: ChunkStore):
        self.conn = conn
        self.chunks = chunks

    def blob_id(self, sha: bytes) -> int | None:
        row = self.conn.execute("SELECT id FROM blob WHERE sha256 = ?", (sha,)).fetchone()
        return None if row is None else row[0]

    def write(self, pieces: Iterable[bytes], size: int) -> tuple[int, bytes]:
        """Store contents given as pieces (of ``size`` bytes in all); return (blob id, sha256).

        Memory holds one chunk at a time.  A content already stored costs only
        its hashing: small contents are looked up before compressing.
        """
        if size <= CHUNK_SIZE:
            data = b"".join(pieces)
            sha = hashlib.sha256(data).digest()
            bid = self.blob_id(sha)
            if bid is not None:
                return bid, sha
            self.chunks.put(sha, data)
            bid = self._insert_blob(sha, len(data))
            self.conn.execute(
                "INSERT INTO blob_chunk(blob_id, seq, offset, chunk) VALUES (?, 0, 0, ?)", (bid, sha)
            )
            return bid, sha
        w = self.writer()
        for p in pieces:
            w.write(p)
        return w.close()

    def writer(self) -> "BlobWriter":
        """A streaming writer for contents of unknown size."""
        return BlobWriter(self)

    def _insert_blob(self, sha: bytes, size: int) -> int:
        return self.conn.execute(
            "INSERT INTO blob(sha256, size) VALUES (?, ?) RETURNING id", (sha, size)
        ).fetchone()[0]

    def iter_blob(self, blob_id: int) -> Iterator[bytes]:
        """The contents, chunk by chunk."""
        shas = [r[0] for r in self.conn.execute("SELECT chunk FROM blob_chunk WHERE blob_id = ? ORDER BY seq", (blob_id,))]
        if not shas:
            size = self.conn.execute("SELECT size FROM blob WHERE id = ?", (blob_id,)).fetchone()
            if size is None or size[0]:
                raise CorruptStore(f"blob {blob_id} has no chunks")
        yield from self.chunks.get_many(shas)

    def open_blob(self, blob_id: int) -> "BlobReader":
        return BlobReader(self.iter_blob(blob_id))


class BlobWriter:
    """Cuts a stream into chunks as it arrives; memory holds at most one chunk."""

    def __init__(self, cs: ContentStore):
        self.cs = cs
        self.whole = hashlib.sha256()
        self.buf = bytearray()
        self.refs: list[tuple[int, int, bytes]] = []
        self.size = 0
        self._offset = 0

    def write(self, b: bytes) -> None:
        self.whole.update(b)
        self.size += len(b)
        self.buf += b
        while len(self.buf) >= CHUNK_SIZE:
            self._flush(bytes(self.buf[:CHUNK_SIZE]))
            del self.buf[:CHUNK_SIZE]

    def _flush(self, chunk: bytes) -> None:
        csha = hashlib.sha256(chunk).digest()
        self.cs.chunks.put(csha, chunk)
        self.refs.append((len(self.refs), self._offset, csha))
        self._offset += len(chunk)

    def close(self) -> tuple[int, bytes]:
        if self.buf or not self.refs:
            self._flush(bytes(self.buf))
            self.buf.clear()
        sha = self.whole.digest()
        bid = self.cs.blob_id(sha)
        if bid is None:
            bid = self.cs._insert_blob(sha, self.size)
            self.cs.conn.executemany(
                "INSERT INTO blob_chunk(blob_id, seq, offset, chunk) VALUES (?, ?, ?, ?)",
                [(bid, seq, off, c) for seq, off, c in self.refs],
            )
        return bid, sha


class BlobReader(io.RawIOBase):
    """A file object over a stream of chunks (for tarfile.addfile and shutil)."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._cur = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._cur:
            nxt = next(self._chunks, None)
            if nxt is None:
                return 0
            self._cur = memoryview(nxt)
        n = min(len(b), len(self._cur))
        b[:n] = self._cur[:n]
        self._cur = self._cur[n:]
        return n
