"""Rebuilding a layer tar byte for byte from its events, contents and framing."""

from __future__ import annotations

import struct
from typing import Iterator

from ..content import ContentStore
from ..errors import CorruptStore


class FramingRecords:
    """Reads a framing blob's length-prefixed records (one per tar entry, then
    the trailer) across chunk borders.  fsck --deep reads them too."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks = chunks
        self.buf = b""
        self.pos = 0  # records are read from buf at pos: slicing off the rest would copy a chunk per record

    def _need(self, n: int) -> bytes:
        end = self.pos + n
        if end <= len(self.buf):
            b = self.buf[self.pos : end]
            self.pos = end
            return b
        parts = [self.buf[self.pos :]]
        have = len(parts[0])
        while have < n:
            c = next(self.chunks, None)
            if c is None:
                raise CorruptStore("layer framing ends early")
            parts.append(c)
            have += len(c)
        self.buf, self.pos = b"".join(parts), n
        return self.buf[:n]

    def next(self) -> bytes:
        (n,) = struct.unpack(">I", self._need(4))
        return self._need(n)

    def at_end(self) -> bool:
        if self.pos < len(self.buf):
            return False
        for c in self.chunks:
            if c:
                self.buf, self.pos = c, 0
                return False
        return True


def iter_layer_tar(conn, content: ContentStore, diff_rowid: int) -> Iterator[bytes]:
    """The diff's original tar stream, in pieces of at most one chunk."""
    row = conn.execute("SELECT framing, entries, diff_id FROM diff WHERE id = ?", (diff_rowid,)).fetchone()
    if row is None or row[0] is None:
        raise CorruptStore(f"diff {diff_rowid} has no framing")
    framing_blob, entries, diff_id = row
    rec = FramingRecords(content.iter_blob(framing_blob))
    # Streamed from the cursor, not fetched: a layer of many files would hold a row per file.
    payloads = conn.execute(
        "SELECT seq, blob_id FROM event WHERE diff_id = ? AND seq < ? AND kind != 2 ORDER BY seq",
        (diff_rowid, entries),
    )
    n = 0
    for seq, blob_id in payloads:
        if seq != n:
            break
        n += 1
        yield rec.next()
        if blob_id is not None:
            yield from content.iter_blob(blob_id)
    if n != entries:
        raise CorruptStore(f"{diff_id}: {entries} tar entries but the events stop at {n}")
    yield rec.next()
    if not rec.at_end():
        raise CorruptStore(f"{diff_id}: framing has bytes after the end of the tar")
