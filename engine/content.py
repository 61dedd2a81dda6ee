"""File contents: hashing, packing, content-defined chunking, dedup, reading back.

Writing (one import at a time, inside its write transaction):
- a content of at most SMALL bytes is deduplicated by its sha256, then appended
  to the current pack; a full pack (PACK_TARGET raw bytes) is compressed as one
  chunk.  Packing lets zstd find the redundancy between neighbouring files of a
  layer, which per-file compression cannot see (bench/README.md has what each
  pack size and codec setting bought).
- a larger content is cut by FastCDC into chunks of 64 KiB..1 MiB (256 KiB on
  average); each chunk is stored once, however many contents share it, so an
  in-place edit of a big file costs only the chunks it touches.
Hashing and compression run on WORKERS threads (zstd and hashlib release the
GIL), so they overlap with gunzip on the read-ahead thread and with tar parsing
and SQLite on the importing thread.  Blob rows of a pack are inserted when its
chunk is; events may name those blob ids earlier, which is
why importing defers foreign-key checks to commit.
"""

from __future__ import annotations

import collections
import io
from typing import Iterable, Iterator

from .chunks import ChunkStore, Prefetch, encode
from .errors import CorruptStore

SMALL = 256 << 10
# 4 MiB packs with a zstd window as large (chunks.WINDOW_LOG) store the bench
# family's small files in 43.2 MiB instead of 45.8 with 1 MiB packs, for the
# same compression time; 8 MiB packs save 0.5 MiB more but make every read of
# one small file decode twice as much (bench/README.md, "store size").
PACK_TARGET = 4 << 20
# A pack also ends at this many contents: each waits in memory as a row of
# about 250 bytes until its pack is stored, so a layer of a million one-byte
# files would otherwise hold them all in one pack.  Real images mostly reach
# PACK_TARGET first (4096 files in 4 MiB means files of 1 KiB on average).
PACK_MEMBERS = 4096
CACHE_BYTES = 12 << 20  # decoded packs kept for reads file by file (three of PACK_TARGET)
CDC_MIN, CDC_AVG, CDC_MAX = 64 << 10, 256 << 10, 1 << 20
CDC_WINDOW = 4 * CDC_MAX  # bytes gathered before cutting: all but the last CDC_MAX are cut for good
# One worker: with the read-ahead thread and the importing thread that makes
# three busy threads for two cores, and the sum of their CPU time, not the
# balance, bounds an import.  A second worker measured no faster and ~8 MiB
# more peak RSS (one more malloc arena, one more zstd context).
WORKERS = 1
# Raw bytes handed to the workers and not yet stored: bounds memory (a pack or
# a chunk, its compressed copy, and the window a chunk is a view of).  Two
# packs: with one, the importing thread stopped at every full pack until the
# worker had compressed the one before (0.4-0.55 s of waiting in an import of
# py-app:1), and the read-ahead then stopped too, its queue full.  8 MiB took
# web:1 from 2.47-2.88 s to 2.26-2.50 and py-app:1 from 2.02-2.49 to 2.00-2.18,
# for 5-8 MiB more peak RSS (at most 92 MiB on the bench images); 12 MiB gained
# a little more and reached 98-100 MiB.
MAX_IN_FLIGHT_BYTES = 8 << 20


# Magic numbers of formats that are compressed already: zstd cannot shrink them.
_PACKED_MAGIC = (b"\x1f\x8b", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd", b"BZh", b"\x89PNG", b"\xff\xd8\xff", b"PK\x03\x04",
                 b"GIF8", b"RIFF", b"OggS")


def sniff(data) -> str:
    """The kind of a content, from its first bytes: elf, packed (compressed
    already), text, or binary."""
    head = bytes(data[:512])
    if head.startswith(b"\x7fELF"):
        return "elf"
    if head.startswith(_PACKED_MAGIC):
        return "packed"
    return "binary" if b"\0" in head else "text"


def _sha256(data: bytes = b""):
    import hashlib  # loading OpenSSL costs ~2 ms: commands that read no contents skip it

    return hashlib.sha256(data)


def _cdc():
    from fastcdc import fastcdc  # imported on first large content: keeps CLI start-up fast

    return fastcdc


class _Pack:
    def __init__(self) -> None:
        # Handed to a worker as a view when full, not copied: a pack is the
        # largest buffer an import holds, and a copy would hold it twice.
        self.buf = bytearray()
        self.members: list[tuple[int, bytes, int, int]] = []  # (blob id, sha, offset, size)


class ContentStore:
    def __init__(self, conn, chunks: ChunkStore):
        self.conn = conn
        self.chunks = chunks
        self._pool = None  # a ThreadPoolExecutor, started by the first write
        self._inflight: collections.deque = collections.deque()
        self._inflight_bytes = 0
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

    def add_small_batch(self, items: list[tuple[bytes, bytes]]) -> list[int]:
        """Store small contents given as (sha256, bytes); their blob ids, in order.
        What the store holds already is found with one query per 500 contents:
        a query per file was a sixth of an import of 20k small files."""
        # Ids are settled before anything is stored: storing may complete a pack,
        # which takes its contents out of _pending.
        known: dict[bytes, int | None] = {}
        for sha, _ in items:
            if sha not in known:
                known[sha] = self._pending.get(sha)
        ask = [sha for sha, bid in known.items() if bid is None]
        for i in range(0, len(ask), 500):
            part = ask[i : i + 500]
            marks = ",".join("?" * len(part))
            known.update((sha, bid) for bid, sha in
                         self.conn.execute(f"SELECT id, sha256 FROM blob WHERE sha256 IN ({marks})", part))
        out = []
        for sha, data in items:
            bid = known[sha]
            if bid is None:
                bid = known[sha] = self._store_small(data, sha, "data")
            out.append(bid)
        return out

    def add_small(self, data: bytes, kind: str = "data") -> int:
        return self._add_small(data, _sha256(data).digest(), kind)

    def _add_small(self, data: bytes, sha: bytes, kind: str) -> int:
        bid = self.blob_id(sha)
        return bid if bid is not None else self._store_small(data, sha, kind)

    def _store_small(self, data: bytes, sha: bytes, kind: str) -> int:
        """A new small content: its blob id, its bytes appended to the open pack."""
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

    def _submit(self, raw, on_done, sha: bytes | None = None) -> None:
        """Hash (unless sha is given) and compress raw on a worker; on_done(sha,
        raw size, encoded) runs on this thread, in the order of submission."""
        if self._pool is None:
            import concurrent.futures  # writers only: readers start faster without it

            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="layerdb-zstd")
        self._inflight.append((self._pool.submit(_hash_encode, raw, sha), on_done, len(raw)))
        self._inflight_bytes += len(raw)
        # Store what is done already, so rows go in while the workers compress,
        # and wait only when too much is in flight; never for the newest alone,
        # so this thread goes on while it compresses.
        inflight = self._inflight
        while inflight and (inflight[0][0].done() or len(inflight) > 1 and self._inflight_bytes > MAX_IN_FLIGHT_BYTES):
            self._complete_one()

    def _complete_one(self) -> None:
        fut, on_done, n = self._inflight.popleft()
        self._inflight_bytes -= n
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

        self._submit(memoryview(pack.buf), done)

    def _insert_blob_rows(self, rows: list[tuple]) -> None:
        self.conn.executemany("INSERT INTO blob(id, sha256, size, chunk, offset) VALUES (?, ?, ?, ?, ?)", rows)
        for _, sha, *_ in rows:
            self._pending.pop(sha, None)

    def _put_chunk(self, chunk) -> bytes:
        """Store one content-defined chunk (bytes or a memoryview of them) unless
        present; returns its sha256.  Hashed here, before compressing, so that a
        chunk stored already is never compressed again."""
        csha = _sha256(chunk).digest()
        if csha in self._pending_chunks or self.chunks.has(csha):
            return csha
        self._pending_chunks.add(csha)

        def done(sha: bytes, raw_len: int, encoded) -> None:
            if self.chunks.put_encoded(sha, raw_len, encoded):
                self.stored_bytes += len(encoded[1])
            self._pending_chunks.discard(sha)

        self._submit(chunk, done, csha)
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
            fut, _, _ = self._inflight.popleft()
            fut.cancel()
        self._inflight_bytes = 0
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


def _hash_encode(raw, sha: bytes | None):
    return sha or _sha256(raw).digest(), len(raw), encode(raw)


class BlobWriter:
    """Takes a stream; small results go to a pack, large ones through FastCDC.

    Memory holds at most SMALL bytes, or a window of CDC_WINDOW bytes plus one
    read while chunking.  Chunks go to the workers as views of their window, so
    the bytes are copied once into it, and the last CDC_MAX once more.
    """

    def __init__(self, cs: ContentStore, kind: str = "data"):
        self.cs = cs
        self.kind = kind
        self.whole = _sha256()
        # Bytes not cut yet.  A new window starts after each cut, because the
        # chunks cut from the last one are views of it until they are stored.
        self.window = bytearray()
        self.base = 0  # offset in the blob of the window's first byte
        self.refs: list[tuple[int, bytes]] = []  # (offset in blob, chunk sha)
        self.size = 0
        self.cdc = False

    def write(self, b: bytes) -> None:
        self.whole.update(b)
        self.size += len(b)
        self.window += b
        if len(self.window) > SMALL:
            self.cdc = True
        if self.cdc and len(self.window) >= CDC_WINDOW:
            self._cut(final=False)

    def _cut(self, final: bool) -> None:
        view = memoryview(self.window)
        end = 0
        for c in _cdc()(view, CDC_MIN, CDC_AVG, CDC_MAX):
            # A cut is final only if the whole window after its start was seen.
            if not final and c.offset + CDC_MAX > len(view):
                break
            csha = self.cs._put_chunk(view[c.offset : c.offset + c.length])
            self.refs.append((self.base + c.offset, csha))
            end = c.offset + c.length
        self.base += end
        self.window = bytearray(view[end:])

    def close(self) -> int:
        self.sha = sha = self.whole.digest()
        if not self.cdc:
            return self.cs._add_small(bytes(self.window), sha, self.kind)
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
