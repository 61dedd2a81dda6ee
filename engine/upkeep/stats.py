"""Sizes and dedup figures of a store.

Three kinds of bytes:
  logical   what the images are as plain layer tars, each image counted whole
            (a layer shared by two images counts twice), as `docker save` of
            each image alone would hold them
  raw       what is left after dedup: each content and each chunk once
  stored    what the chunks take in the store after zstd

The framing (tar headers, PAX/GNU records, padding, end blocks: what a layer
tar holds besides file payloads) is stored beside the contents so that layer
tars rebuild byte for byte.  `framing_share` is its cost: stored framing bytes
over stored content bytes.  A small framing shares a pack with file contents,
and a pack's compressed bytes cannot be split exactly between its members;
splitting by raw size charges the framing (tar headers: about 30x smaller
under zstd) for its neighbours' incompressible bytes, which on fx-blob made a
0.3% framing look like 3.4%.  So a packed framing is measured as it
compresses on its own, and the contents are charged the rest of what their
chunks take.  That reads each pack holding a framing once.  The content tags
(8 bytes of sha256 per file, for fsck --deep) are stored as framing and counted
with it in the stored figures; `tag_bytes` is their raw size.
"""

from __future__ import annotations

from ..chunks import encode
from ..content import ContentStore
from ..kinds import IGNORED
from ..store import Store

# Each image's chain, from its top layer down; UNION stops at a (damaged) cycle.
_IMAGE_LAYERS = """WITH RECURSIVE c(img, lid) AS (
    SELECT id, top_layer FROM image WHERE top_layer IS NOT NULL
    UNION SELECT c.img, l.parent_id FROM layer l JOIN c ON l.id = c.lid WHERE l.parent_id IS NOT NULL)"""

_CONTENT_BLOBS = "SELECT blob_id FROM event WHERE blob_id IS NOT NULL"
_FRAMING_BLOBS = ("SELECT framing FROM diff WHERE framing IS NOT NULL"
                  " UNION ALL SELECT digests FROM diff WHERE digests IS NOT NULL")
# The chunk figures read the SQLite chunk table: they describe that backend.
_CHUNKS_OF = """SELECT sha256 FROM chunk WHERE sha256 IN (SELECT chunk FROM blob WHERE id IN ({blobs}))
    OR sha256 IN (SELECT chunk FROM blob_chunk WHERE blob_id IN ({blobs}))"""


def _ratio(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def _framing_stored(store: Store, content: ContentStore) -> int:
    """Compressed bytes of every framing: its own chunks, or for a packed one, zstd of it alone."""
    own = store.scalar(f"""SELECT coalesce(sum(length(data)), 0) FROM chunk WHERE sha256 IN
        (SELECT chunk FROM blob_chunk WHERE blob_id IN ({_FRAMING_BLOBS}))""")
    packed = 0
    # In pack order, so that the content store's cache decompresses each pack once.
    for (blob_id,) in store.execute(
        f"SELECT id FROM blob WHERE chunk IS NOT NULL AND id IN ({_FRAMING_BLOBS}) ORDER BY chunk, offset"
    ).fetchall():
        packed += len(encode(b"".join(content.iter_blob(blob_id)))[1])
    return own + packed


def stats(store: Store, content: ContentStore) -> dict:
    q = store.scalar
    with store.read():
        out: dict = {
            "images": q("SELECT count(*) FROM image"),
            "tags": q("SELECT count(*) FROM tag"),
            "layers": q("SELECT count(*) FROM layer"),
            "diffs": q("SELECT count(*) FROM diff"),
            "entries": q("SELECT coalesce(sum(entries), 0) FROM diff"),
            "events": q("SELECT count(*) FROM event"),
            "paths": q("SELECT count(*) FROM path"),
            "contents": q(f"SELECT count(DISTINCT blob_id) FROM ({_CONTENT_BLOBS})"),
            "chunks": q("SELECT count(*) FROM chunk"),
            # .wh..wh.plnk and other AUFS bookkeeping: stored for the rebuild, never applied.
            "aufs_entries": q("SELECT count(*) FROM event WHERE kind = ?", (IGNORED,)),
            # What pulls and pushes kept (engine/registry/records.py).
            "manifests": q("SELECT count(*) FROM manifest WHERE image_id IS NOT NULL"),
            "indexes": q("SELECT count(*) FROM manifest WHERE image_id IS NULL"),
            "index_entries": q("SELECT count(*) FROM manifest_child"),
            "manifest_bytes": q("SELECT coalesce(sum(length(data)), 0) FROM manifest"),
            "layer_descriptors": q("SELECT count(*) FROM manifest_layer"),
            "seen": q("SELECT count(*) FROM seen"),
            "registries": q("SELECT count(DISTINCT registry) FROM seen"),
        }
        logical_tar, logical_files = store.one(
            f"""{_IMAGE_LAYERS} SELECT coalesce(sum(d.tar_size), 0), coalesce(sum(d.file_bytes), 0)
                FROM c JOIN layer l ON l.id = c.lid JOIN diff d ON d.id = l.diff_id""")
        # Raw bytes after dedup: packed contents once each, chunked ones as their distinct chunks.
        content_raw = q(f"SELECT coalesce(sum(size), 0) FROM blob WHERE chunk IS NOT NULL AND id IN ({_CONTENT_BLOBS})")
        content_raw += q(f"""SELECT coalesce(sum(size), 0) FROM chunk WHERE sha256 IN
            (SELECT chunk FROM blob_chunk WHERE blob_id IN ({_CONTENT_BLOBS}))""")
        used = q(f"SELECT coalesce(sum(length(data)), 0) FROM chunk WHERE sha256 IN ("
                 f"{_CHUNKS_OF.format(blobs=_CONTENT_BLOBS)} UNION {_CHUNKS_OF.format(blobs=_FRAMING_BLOBS)})")
        framing_stored = _framing_stored(store, content)
        chunk_raw, stored = store.one("SELECT coalesce(sum(size), 0), coalesce(sum(length(data)), 0) FROM chunk")
        content_stored = max(used - framing_stored, 0)
        out.update({
            "logical_bytes": logical_tar,
            "logical_file_bytes": logical_files,
            "tar_bytes": q("SELECT coalesce(sum(tar_size), 0) FROM diff"),
            "file_bytes": q("SELECT coalesce(sum(file_bytes), 0) FROM diff"),
            "content_raw_bytes": content_raw,
            "chunk_bytes": chunk_raw,
            "stored_bytes": stored,
            "content_stored_bytes": content_stored,
            "framing_bytes": q("SELECT coalesce(sum(size), 0) FROM blob WHERE id IN"
                               " (SELECT framing FROM diff WHERE framing IS NOT NULL)"),
            "tag_bytes": q("SELECT coalesce(sum(size), 0) FROM blob WHERE id IN"
                           " (SELECT digests FROM diff WHERE digests IS NOT NULL)"),
            "framing_stored_bytes": framing_stored,
            "db_bytes": q("PRAGMA page_count") * q("PRAGMA page_size"),
        })
    out["dedup_ratio"] = _ratio(logical_files, content_raw)
    out["compression_ratio"] = _ratio(chunk_raw, stored)
    out["overall_ratio"] = _ratio(logical_tar, stored)
    out["framing_share"] = _ratio(framing_stored, content_stored)
    out["framing_bytes_per_entry"] = _ratio(framing_stored, out["entries"])
    return out
