"""File contents: hashing, packing, content-defined chunking, dedup, reading back.

Writing (one import at a time, inside its write transaction):
- a content of at most SMALL bytes is deduplicated by its sha256, then appended
  to the current pack; a full pack (PACK_TARGET raw bytes) is compressed as one
  chunk.  Packing lets zstd find the redundancy between neighbouring files of a
  layer, which per-file compression cannot see.
- a larger content is cut by FastCDC into chunks of 64 KiB..1 MiB (256 KiB on
  average); each chunk is stored once, however many contents share it, so an
  in-place edit of a big file costs only the chunks it touches.
Compression runs on a worker thread (zstd releases the GIL), so it overlaps
with tar parsing and SQLite on the importing thread.  Blob rows of a pack are
inserted when its chunk is; events may name those blob ids earlier, which is
why importing defers foreign-key checks to commit.
"""

from __future__ import annotations

import collections
import io
from typing import Iterable, Iterator

from .chunks import ChunkStore, Prefetch, encode
from .errors import CorruptStore

SMALL = 256 << 10
PACK_TARGET = 1 << 20
# A pack also ends at this many contents: each waits in memory as a row of
# about 250 bytes until its pack is stored, so a layer of a million one-byte
# files would otherwise hold them all in one pack.  Real images reach
# PACK_TARGET first (a 1 MiB pack of 4096 files means 256-byte files).
PACK_MEMBERS = 4096
CACHE_BYTES = 8 << 20  # decoded packs kept for reads file by file
CDC_MIN, CDC_AVG, CDC_MAX = 64 << 10, 256 << 10, 1 << 20
# Compressed chunks waiting for their INSERT: bounds memory to about this many MiB.
MAX_IN_FLIGHT = 4


def _sha256(data: bytes = b""):
    import hashlib  # loading OpenSSL costs ~2 ms: commands that read no contents skip it

    return hashlib.sha256(data)


def _cdc():
    from fastcdc import fastcdc  # imported on first large content: keeps CLI start-up fast

    return fastcdc


class _Pack:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.members: list[tuple[int, bytes, int, int]] = []  # (blob id, sha, offset, size)


class ContentStore:
    def __init__(self, conn, chunks: ChunkStore):
        self.conn = conn
        self.chunks = chunks
        self._pool = None  # a ThreadPoolExecutor, started by the first write
        self._inflight: collections.deque = collections.deque()
        self._pending: dict[bytes, int] = {}  # sha -> blob id, for blobs whose rows are not inserted yet
        self._pending_chunks: set[bytes] = set()
        # Framing (tar headers) compresses best among its own kind, so it gets
        # packs of its own, apart from file contents.
        self._packs = {"data": _Pack(), "framing": _Pack()}
        self._next_id: int | None = None
        self._cache: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._cached = 0  # bytes in _cache
        self.stored_bytes = 0  # compressed bytes written by this ContentStore

    # Writing ----------------------------------------------------------------

    def _alloc(self) -> int:
        if self._next_id is None:
            # We hold the write lock for the whole import, so nobody else allocates.
            self._next_id = (self.conn.execute("SELECT max(id) FROM blob").fetchone()[0] or 0) + 1
        i = self._next_id
        self._next_id += 1
        return i

    def blob_id(self, sha: bytes) -> int | None:
        bid = self._pending.get(sha)
        if bid is not None:
            return bid
        row = self.conn.execute("SELECT id FROM blob WHERE sha256 = ?", (sha,)).fetchone()
        return None if row is None else row[0]

    def add(self, pieces: Iterable[bytes], size: int) -> tuple[int, bytes]:
        """Store a content given as pieces of `size` bytes in all; return its
        blob id and sha256 (import keeps a tag of the sha256 per tar entry)."""
        if size <= SMALL:
            data = b"".join(pieces)
            sha = _sha256(data).digest()
            return self._add_small(data, sha, "data"), sha
        w = self.writer()
        for p in pieces:
            w.write(p)
        bid = w.close()
        return bid, w.sha

    def add_small(self, data: bytes, kind: str = "data") -> int:
        return self._add_small(data, _sha256(data).digest(), kind)

    def _add_small(self, data: bytes, sha: bytes, kind: str) -> int:
        bid = self.blob_id(sha)
        if bid is not None:
            return bid
        bid = self._alloc()
        self._pending[sha] = bid
        if not data:
            self._insert_blob_rows([(bid, sha, 0, None, None)])
            return bid
        pack = self._packs[kind]
        pack.members.append((bid, sha, len(pack.buf), len(data)))
        pack.buf += data
        if len(pack.buf) >= PACK_TARGET or len(pack.members) >= PACK_MEMBERS:
            self._flush_pack(kind)
        return bid

    def writer(self, kind: str = "data") -> "BlobWriter":
        """A streaming writer for a content of unknown size."""
        return BlobWriter(self, kind)

    def _submit(self, raw: bytes, on_done) -> None:
        """Compress raw on the worker; on_done(sha, encoded) runs on this thread."""
        if self._pool is None:
            import concurrent.futures  # writers only: readers start faster without it

            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerdb-zstd")
        self._inflight.append((self._pool.submit(_hash_encode, raw), on_done))
        while len(self._inflight) > MAX_IN_FLIGHT:
            self._complete_one()

    def _complete_one(self) -> None:
        fut, on_done = self._inflight.popleft()
        sha, raw_len, encoded = fut.result()
        on_done(sha, raw_len, encoded)

    def _flush_pack(self, kind: str) -> None:
        pack, self._packs[kind] = self._packs[kind], _Pack()
        if not pack.members:
            return

        def done(sha: bytes, raw_len: int, encoded) -> None:
            if self.chunks.put_encoded(sha, raw_len, encoded):
                self.stored_bytes += len(encoded[1])
            self._insert_blob_rows([(bid, bsha, size, sha, off) for bid, bsha, off, size in pack.members])

        self._submit(bytes(pack.buf), done)

    def _insert_blob_rows(self, rows: list[tuple]) -> None:
        self.conn.executemany("INSERT INTO blob(id, sha256, size, chunk, offset) VALUES (?, ?, ?, ?, ?)", rows)
        for _, sha, *_ in rows:
            self._pending.pop(sha, None)

    def _put_chunk(self, chunk: bytes) -> bytes:
        """Store one content-defined chunk unless present; returns its sha256."""
        csha = _sha256(chunk).digest()
        if csha in self._pending_chunks or self.chunks.has(csha):
            return csha
        self._pending_chunks.add(csha)

        def done(sha: bytes, raw_len: int, encoded) -> None:
            if self.chunks.put_encoded(sha, raw_len, encoded):
                self.stored_bytes += len(encoded[1])
            self._pending_chunks.discard(sha)

        self._submit(chunk, done)
        return csha

    def end_packs(self) -> None:
        """Close the open packs.  Called at the end of each diff: a pack then
        holds one diff's contents only, so removing that diff frees whole packs
        and damage to one pack stays within one layer."""
        for kind in self._packs:
            self._flush_pack(kind)

    def flush(self) -> None:
        """Write out everything pending; call before the transaction commits."""
        self.end_packs()
        while self._inflight:
            self._complete_one()

    def reset(self) -> None:
        """Forget pending work (after a rollback): ids and packs start afresh."""
        while self._inflight:
            fut, _ = self._inflight.popleft()
            fut.cancel()
        self._pending.clear()
        self._pending_chunks.clear()
        self._packs = {k: _Pack() for k in self._packs}
        self._next_id = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # Reading ----------------------------------------------------------------

    def _chunk(self, sha: bytes) -> bytes:
        data = self._cache.get(sha)
        if data is not None:
            self._cache.move_to_end(sha)
            return data
        data = self.chunks.get(sha)
        self._cache[sha] = data
        self._cached += len(data)
        # A few packs by bytes (a pack that closed at its count of files is
        # small): export --dir and cp read neighbours from the same pack.
        while self._cached > CACHE_BYTES and len(self._cache) > 1:
            self._cached -= len(self._cache.popitem(last=False)[1])
        return data

    def locate(self, blob_ids: Iterable[int]) -> dict[int, tuple[bytes, int]]:
        """Where packed contents lie: {blob id: (pack, offset)}, for many at once.
        Export asks once for a whole view instead of once per file."""
        out: dict[int, tuple[bytes, int]] = {}
        ids = sorted(set(blob_ids))
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            marks = ",".join("?" * len(part))
            for bid, chunk, offset in self.conn.execute(
                f"SELECT id, chunk, offset FROM blob WHERE id IN ({marks}) AND chunk IS NOT NULL", part
            ):
                out[bid] = (chunk, offset)
        return out

    def read_packed(self, chunk: bytes, offset: int, size: int) -> bytes:
        data = self._chunk(chunk)
        if offset + size > len(data):
            raise CorruptStore(f"a content lies outside its pack {chunk.hex()}")
        return data[offset : offset + size]

    def iter_blob(self, blob_id: int) -> Iterator[bytes]:
        """The contents, piece by piece (at most one chunk in memory)."""
        row = self.conn.execute("SELECT size, chunk, offset FROM blob WHERE id = ?", (blob_id,)).fetchone()
        if row is None:
            raise CorruptStore(f"content {blob_id} is missing")
        size, chunk, offset = row
        if not size:
            return
        if chunk is not None:
            data = self._chunk(chunk)
            if offset + size > len(data):
                raise CorruptStore(f"content {blob_id} lies outside its pack")
            yield data[offset : offset + size]
            return
        yield from self.iter_chunks(blob_id)

    def chunk_list(self, blob_id: int) -> list[bytes]:
        """The chunk ids of a large content, in order."""
        shas = [r[0] for r in self.conn.execute("SELECT chunk FROM blob_chunk WHERE blob_id = ? ORDER BY seq", (blob_id,))]
        if not shas:
            raise CorruptStore(f"content {blob_id} has no chunks")
        return shas

    def iter_chunks(self, blob_id: int) -> Iterator[bytes]:
        """A large content's chunks, through the chunk store only (no cache),
        decoded and checked ahead on helper threads."""
        with Prefetch(self.chunks, self.chunk_list(blob_id)) as chunks:
            yield from chunks

    def open_blob(self, blob_id: int) -> io.BufferedReader:
        """A file object; read(n) returns n bytes until the end (tarfile relies on it)."""
        return io.BufferedReader(BlobReader(self.iter_blob(blob_id)), buffer_size=1 << 16)


def _hash_encode(raw: bytes):
    return _sha256(raw).digest(), len(raw), encode(raw)


class BlobWriter:
    """Takes a stream; small results go to a pack, large ones through FastCDC.

    Memory holds at most SMALL bytes, or CDC_MAX plus one read while chunking.
    """

    def __init__(self, cs: ContentStore, kind: str = "data"):
        self.cs = cs
        self.kind = kind
        self.whole = _sha256()
        self.buf = bytearray()
        self.refs: list[tuple[int, bytes]] = []  # (offset in blob, chunk sha)
        self.size = 0
        self.cdc = False

    def write(self, b: bytes) -> None:
        self.whole.update(b)
        self.size += len(b)
        self.buf += b
        if len(self.buf) > SMALL:
            self.cdc = True
        if self.cdc and len(self.buf) >= 4 * CDC_MAX:
            self._cut(final=False)

    def _cut(self, final: bool) -> None:
        view = memoryview(self.buf)
        end = 0
        try:
            for c in _cdc()(view, CDC_MIN, CDC_AVG, CDC_MAX):
                # A cut is final only if the whole window after its start was seen.
                if not final and c.offset + CDC_MAX > len(view):
                    break
                csha = self.cs._put_chunk(bytes(view[c.offset : c.offset + c.length]))
                self.refs.append((self.size - len(view) + c.offset, csha))
                end = c.offset + c.length
        finally:
            view.release()
        del self.buf[:end]

    def close(self) -> int:
        self.sha = sha = self.whole.digest()
        if not self.cdc:
            return self.cs._add_small(bytes(self.buf), sha, self.kind)
        self._cut(final=True)
        bid = self.cs.blob_id(sha)
        if bid is None:
            bid = self.cs._alloc()
            self.cs._insert_blob_rows([(bid, sha, self.size, None, None)])
            self.cs.conn.executemany(
                "INSERT INTO blob_chunk(blob_id, seq, offset, chunk) VALUES (?, ?, ?, ?)",
                [(bid, seq, off, c) for seq, (off, c) in enumerate(self.refs)],
            )
        return bid


class BlobReader(io.RawIOBase):
    """A file object over a stream of pieces (for tarfile.addfile and shutil)."""

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
