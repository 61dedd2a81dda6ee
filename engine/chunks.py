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
# A window as large as a pack (content.PACK_TARGET), where level 3 would use
# 2 MiB: the second half of a pack then finds matches in the first.  It costs
# no compression time, and a decoder needs no window buffer for a frame it
# decodes whole.  Frames smaller than the window get a smaller one.
WINDOW_LOG = 22

_local = threading.local()


def _cctx():
    # One compressor per thread: reuse is much faster for small inputs, and a
    # context must not be shared between threads.
    c = getattr(_local, "cctx", None)
    if c is None:
        import zstandard  # loaded on first use: commands that read no contents skip it

        params = zstandard.ZstdCompressionParameters.from_level(LEVEL, window_log=WINDOW_LOG)
        c = _local.cctx = zstandard.ZstdCompressor(compression_params=params)
    return c


def _dctx():
    d = getattr(_local, "dctx", None)
    if d is None:
        import zstandard

        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def encode(raw) -> tuple[int, bytes]:
    """Compress raw (bytes, or a view of them), or keep it raw when compressing
    does not shrink it."""
    z = _cctx().compress(raw)
    return (ZSTD, z) if len(z) < len(raw) else (RAW, bytes(raw))


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
        # changes(), not RETURNING: SQLite runs a RETURNING statement with a
        # statement journal, and inside an import's one transaction that
        # journal copied every page the insert touched that an earlier insert
        # had written: 11,008 pages (86 MiB) for py-app:1, as many as the WAL.
        self.conn.execute(
            "INSERT INTO chunk(sha256, size, codec, data) VALUES (?, ?, ?, ?) ON CONFLICT(sha256) DO NOTHING",
            (sha, raw_size, codec, data),
        )
        return self.conn.changes() > 0

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


class _Job:
    """One chunk to decode and verify, run by whichever thread claims it first;
    with spans, its result is those slices of it instead (see Prefetch)."""

    __slots__ = ("args", "spans", "size", "claim", "done", "result", "error")

    def __init__(self, sha: bytes, size: int, codec: int, data: bytes, spans: "list[tuple[int, int]] | None" = None):
        self.args = (sha, size, codec, data)
        self.spans = spans
        self.size = size
        self.claim = threading.Lock()
        self.done = threading.Lock()
        self.done.acquire()
        self.result = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            raw = verified(*self.args)
            self.result = raw if self.spans is None else [raw[o : o + n] for o, n in self.spans]
        except BaseException as e:  # handed to the reader, where it reaches this chunk
            self.error = e
        self.args = self.spans = None
        self.done.release()


def _work(jobs) -> None:
    while (job := jobs.get()) is not None:
        if job.claim.acquire(False):
            job.run()


class Prefetch:
    """Verified chunks in the order given, decoded ahead of the reader.

    The stored bytes are fetched on the calling thread: apsw refuses a
    connection used from two threads at once.  Decoding and the sha256 check
    (zstd and hashlib release the GIL) run on WORKERS helper threads, up to
    AHEAD_BYTES of raw chunk ahead, so memory stays bounded whatever the pack
    size while both cores work.  A reader that reaches a chunk no helper has
    started decodes it itself instead of waiting.  Plain threads, not
    concurrent.futures: that package loads logging, ~10 ms of every export's
    start.  Use as a context manager.

    An item is a chunk id, or (chunk id, [(offset, length), ...]): then next()
    returns those slices of the chunk, cut on the helper, and the decoded chunk
    is freed there (export takes a pack's files this way and holds only those
    still to be written).
    """

    WORKERS = 2
    AHEAD_BYTES = 8 << 20

    def __init__(self, chunks: ChunkStore, items: "Iterable[bytes | tuple[bytes, list[tuple[int, int]]]]"):
        self.fetch = chunks.get_encoded
        self.items = iter(items)
        self.pending: collections.deque[_Job] = collections.deque()
        self.ahead = 0  # raw bytes of the pending jobs
        self.jobs = None  # the helpers' queue, made when a second chunk is wanted
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> "Prefetch":
        return self

    def _submit(self) -> bool:
        item = next(self.items, None)
        if item is None:
            return False
        sha, spans = (item, None) if isinstance(item, bytes) else item
        try:
            job = _Job(sha, *self.fetch(sha), spans)
        except CorruptStore as e:  # raised where the reader reaches this chunk, not before
            job = _Job(sha, 0, RAW, b"")
            job.claim.acquire()
            job.error = e
            job.done.release()
        self.pending.append(job)
        self.ahead += job.size
        if self.jobs is not None:
            self.jobs.put(job)
        elif len(self.pending) > 1:  # helpers start with a second chunk: a lone one the reader decodes itself
            # queue.SimpleQueue is this C type; the queue module around it costs ~1 ms of start-up.
            from _queue import SimpleQueue

            self.jobs = SimpleQueue()
            for _ in range(self.WORKERS):
                t = threading.Thread(target=_work, args=(self.jobs,), name="layerdb-read", daemon=True)
                t.start()
                self.threads.append(t)
            for j in self.pending:
                self.jobs.put(j)
        return True

    def next(self):
        """The next chunk (or its slices); StopIteration when none is left."""
        if not self.pending and not self._submit():
            raise StopIteration
        job = self.pending.popleft()
        self.ahead -= job.size
        # Topped up only once this one is out of the count: while the reader
        # works through it (a pack's files take a while to write), the helpers
        # have AHEAD_BYTES of work, not AHEAD_BYTES less this job.
        while self.ahead < self.AHEAD_BYTES and self._submit():
            pass
        if job.claim.acquire(False):
            job.run()
        else:
            job.done.acquire()
        if job.error is not None:
            raise job.error
        data, job.result = job.result, None
        return data

    def __iter__(self):
        while True:
            try:
                yield self.next()
            except StopIteration:
                return

    def __exit__(self, *exc: object) -> None:
        for job in self.pending:
            job.claim.acquire(False)  # a helper that has not started it skips it
        self.pending.clear()
        self.ahead = 0
        if self.jobs is not None:
            for _ in self.threads:
                self.jobs.put(None)
            for t in self.threads:
                t.join()
            self.threads.clear()
            self.jobs = None
