"""Removing images (`rm`) and reclaiming what nothing references (`gc`).

Both run in one write transaction, so a crash at any point leaves the store as
it was before or as it is after, never in between.  `rm` only drops images and
tags; what they leave unreferenced stays (and stays readable by layer id, as
git keeps unreachable commits) until `gc` deletes it, top-down:

  layers   that no image's chain runs through
  diffs    that no layer uses (their events go with them)
  blobs    that no event and no diff's framing or content tags name
  chunks   that no remaining blob names (through the chunk store's interface,
           so a second backend is collected the same way)
  paths    that no event names
  registry indexes none of whose images is stored, and `seen` rows (where a
           blob was seen, for push's mounts) of digests no stored image,
           manifest or layer descriptor names

After the commit, `gc` folds the WAL into the file and VACUUMs when the
deletes left free pages, so the file really shrinks.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass

from .. import refs
from ..chunks import ChunkStore
from ..errors import NotFound, UsageError
from ..log import get_logger
from ..store import BUSY_TIMEOUT_MS, Store

log = get_logger("layerdb.maint")

# The final checkpoint waits for readers of older snapshots to finish; a
# reader that stays longer leaves the rest of the WAL to a later checkpoint
# rather than holding gc for the whole busy timeout.
CHECKPOINT_WAIT_MS = 1000


@dataclass
class Removed:
    image: str  # the image id
    untagged: list[str]
    deleted: bool  # False when only a tag went (the image has others)

    def as_dict(self) -> dict:
        return asdict(self)


def remove(store: Store, names: list[str]) -> list[Removed]:
    """Remove images, all or none.

    NAME[:TAG] of an image with several tags removes just that tag (like
    `docker rmi`); the last tag, or an image id, removes the image with its
    tags and history.  Layers stay until `gc`.
    """
    out = []
    with store.write():
        for name in names:
            out.append(_remove_one(store, name))
    return out


def _remove_one(store: Store, name: str) -> Removed:
    if not name or "~" in name:
        raise UsageError(f"rm {name!r}: expected an image name or id, not a layer REF")
    # refs' lookup knows tags, short names and id prefixes; a layer id is no image.
    found = refs.find_image(store, name)
    if found is None:
        raise NotFound(f"no image matches {name!r} (see `layerdb images`)")
    rowid, digest, _ = found
    tags = refs.image_tags(store, rowid)
    want = refs.normalize_tag(name)
    named = [t for t in tags if t == want or t.endswith("/" + want)]
    if named and len(tags) > 1:
        store.execute("DELETE FROM tag WHERE name = ?", (named[0],))
        log.info("untag", image=digest, tag=named[0])
        return Removed(digest, named[:1], deleted=False)
    users = [r[0] for r in store.execute("SELECT name FROM container WHERE image_id = ? ORDER BY name", (rowid,))]
    if users:
        raise UsageError(f"image {digest[7:19]} is used by container(s) {', '.join(users)}: remove them first"
                         " (`layerdb container rm`)")
    store.execute("DELETE FROM image WHERE id = ?", (rowid,))  # tags, history and its manifests cascade
    # An index whose last stored image went describes nothing the store holds.
    store.execute(_EMPTY_INDEXES)
    log.info("rm", image=digest, tags=tags)
    return Removed(digest, tags, deleted=True)


@dataclass
class GcResult:
    layers: int = 0
    diffs: int = 0
    events: int = 0
    blobs: int = 0
    chunks: int = 0
    paths: int = 0
    repacked: int = 0  # packs rewritten without their dead members
    bytes_before: int = 0  # the store file plus its WAL
    bytes_after: int = 0
    manifests: int = 0  # registry indexes left without a stored image
    seen: int = 0  # `seen` rows of digests nothing stored names
    vacuumed: bool = False
    checkpointed: bool = False  # False: a reader kept part of the WAL (the file shrinks later)

    def as_dict(self) -> dict:
        return asdict(self)


# Every layer on some image's chain.
_LIVE_LAYERS = """
WITH RECURSIVE live(id) AS (
    SELECT top_layer FROM image WHERE top_layer IS NOT NULL
    UNION
    SELECT layer_id FROM container WHERE layer_id IS NOT NULL
    UNION
    SELECT l.parent_id FROM layer l JOIN live ON l.id = live.id WHERE l.parent_id IS NOT NULL
) SELECT id FROM live"""

_DEAD_BLOBS = """
SELECT b.id, b.chunk FROM blob b
WHERE NOT EXISTS (SELECT 1 FROM event e WHERE e.blob_id = b.id)
  AND b.id NOT IN (SELECT framing FROM diff WHERE framing IS NOT NULL)
  AND b.id NOT IN (SELECT digests FROM diff WHERE digests IS NOT NULL)"""

_EMPTY_INDEXES = """DELETE FROM manifest WHERE image_id IS NULL
  AND NOT EXISTS (SELECT 1 FROM manifest_child c WHERE c.index_id = manifest.id)"""

# A digest may be seen in several repositories; a row is kept while the store
# holds something that a push could mount with it.
_DEAD_SEEN = """DELETE FROM seen
WHERE digest NOT IN (SELECT digest FROM manifest)
  AND digest NOT IN (SELECT digest FROM manifest_layer)
  AND digest NOT IN (SELECT digest FROM image)"""


def collect(store: Store, chunks: ChunkStore) -> GcResult:
    res = GcResult(bytes_before=_file_bytes(store))
    x = store.execute
    with store.write():
        res.layers = _delete(store, f"DELETE FROM layer WHERE id NOT IN ({_LIVE_LAYERS})")
        log.info("gc", step="layers", removed=res.layers)
        dead_diffs = ("SELECT id FROM diff WHERE id NOT IN (SELECT diff_id FROM layer)"
                      " AND id NOT IN (SELECT diff_id FROM container)")
        res.events = store.scalar(f"SELECT count(*) FROM event WHERE diff_id IN ({dead_diffs})")
        res.diffs = _delete(store, f"DELETE FROM diff WHERE id IN ({dead_diffs})")  # events cascade
        log.info("gc", step="diffs", removed=res.diffs, events=res.events)

        # Temp tables are part of the transaction: a failure rolls them back too.
        x("CREATE TEMP TABLE gc_blob(id INTEGER PRIMARY KEY, chunk BLOB)")
        x("CREATE TEMP TABLE gc_chunk(sha BLOB PRIMARY KEY) WITHOUT ROWID")
        x(f"INSERT INTO gc_blob {_DEAD_BLOBS}")
        # Chunks that may die with these blobs: the packs holding small
        # contents, and the pieces of large ones.
        x("INSERT OR IGNORE INTO gc_chunk SELECT chunk FROM gc_blob WHERE chunk IS NOT NULL")
        x("INSERT OR IGNORE INTO gc_chunk SELECT bc.chunk FROM blob_chunk bc JOIN gc_blob g ON g.id = bc.blob_id")
        res.blobs = _delete(store, "DELETE FROM blob WHERE id IN (SELECT id FROM gc_blob)")  # blob_chunk cascades
        x("CREATE TEMP TABLE gc_pack(sha BLOB PRIMARY KEY) WITHOUT ROWID")
        x("INSERT INTO gc_pack SELECT DISTINCT chunk FROM gc_blob WHERE chunk IS NOT NULL")
        x("DELETE FROM gc_chunk WHERE sha IN (SELECT chunk FROM blob WHERE chunk IS NOT NULL)"
          " OR EXISTS (SELECT 1 FROM blob_chunk bc WHERE bc.chunk = gc_chunk.sha)")
        for (sha,) in x("SELECT sha FROM gc_chunk").fetchall():
            chunks.delete(sha)
            res.chunks += 1
        res.repacked = _repack(store, chunks, [r[0] for r in x(
            "SELECT sha FROM gc_pack WHERE sha NOT IN (SELECT sha FROM gc_chunk)").fetchall()])
        x("DROP TABLE temp.gc_blob")
        x("DROP TABLE temp.gc_chunk")
        x("DROP TABLE temp.gc_pack")
        log.info("gc", step="contents", blobs=res.blobs, chunks=res.chunks)

        res.paths = _delete(store, "DELETE FROM path WHERE NOT EXISTS (SELECT 1 FROM event e WHERE e.path_id = path.id)"
                                   " AND NOT EXISTS (SELECT 1 FROM event e WHERE e.target_id = path.id)")
        log.info("gc", step="paths", removed=res.paths)
        res.manifests = _delete(store, _EMPTY_INDEXES)
        res.seen = _delete(store, _DEAD_SEEN)
        log.info("gc", step="registry", indexes=res.manifests, seen=res.seen)
    # VACUUM cannot run inside a transaction; it is atomic on its own.  It
    # rewrites the whole file, so it runs only when the deletes freed pages.
    if store.scalar("PRAGMA freelist_count"):
        log.info("gc", step="vacuum")
        x("VACUUM")
        res.vacuumed = True
    # Fold the WAL into the file and truncate it: the file shrinks only now.
    store.conn.setbusytimeout(CHECKPOINT_WAIT_MS)
    try:
        busy = x("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    finally:
        store.conn.setbusytimeout(BUSY_TIMEOUT_MS)
    res.checkpointed = not busy
    res.bytes_after = _file_bytes(store)
    log.info("gc", step="done", bytes_before=res.bytes_before, bytes_after=res.bytes_after)
    return res


# A pack that lost members keeps their bytes until it is rewritten; rewrite it
# when more than a quarter of it is dead.
REPACK_BELOW = 0.75


def _repack(store: Store, chunks: ChunkStore, packs: list[bytes]) -> int:
    """Rewrite packs whose removed members left dead bytes; returns how many."""
    n = 0
    for sha in packs:
        members = store.execute("SELECT id, offset, size FROM blob WHERE chunk = ? ORDER BY offset", (sha,)).fetchall()
        if not members:
            continue
        raw = chunks.get(sha)
        if sum(size for _, _, size in members) >= REPACK_BELOW * len(raw):
            continue
        new = bytearray()
        moves = []
        for bid, off, size in members:
            moves.append((len(new), bid))
            new += raw[off : off + size]
        new_sha = hashlib.sha256(new).digest()
        chunks.put(new_sha, bytes(new))
        store.conn.executemany("UPDATE blob SET chunk = ?, offset = ? WHERE id = ?",
                               [(new_sha, off, bid) for off, bid in moves])
        if new_sha != sha:
            chunks.delete(sha)
        n += 1
    return n


def _delete(store: Store, sql: str) -> int:
    store.execute(sql)
    return store.conn.changes()


def _file_bytes(store: Store) -> int:
    total = 0
    for suffix in ("", "-wal"):
        try:
            total += os.stat(str(store.path) + suffix).st_size
        except FileNotFoundError:
            pass
    return total
