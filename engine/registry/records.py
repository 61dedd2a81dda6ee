"""What the store remembers of registries: manifest and index bytes as pulled,
each layer's descriptor beside its diff_id, and where each blob was seen.

Push reads them back: the original manifest can go out byte for byte (same
digest) when every blob it names is at the destination or can be mounted from
a repository of the same registry where it was seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..store import Store
from .manifest import Fetched
from .reference import Reference


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _manifest_row(store: Store, m: Fetched, image_rowid: int | None) -> int:
    row = store.one("SELECT id, image_id FROM manifest WHERE digest = ?", (m.digest,))
    if row is not None:
        if image_rowid is not None and row[1] is None:
            store.execute("UPDATE manifest SET image_id = ? WHERE id = ?", (image_rowid, row[0]))
        return row[0]
    return store.scalar(
        "INSERT INTO manifest(digest, media_type, data, image_id, added) VALUES (?, ?, ?, ?, ?) RETURNING id",
        (m.digest, m.media_type, m.data, image_rowid, _now()))


def seen(store: Store, digest: str, registry: str, repository: str) -> None:
    store.execute("INSERT OR IGNORE INTO seen(digest, registry, repository) VALUES (?, ?, ?)",
                  (digest, registry, repository))


def remember(store: Store, registry: str, repository: str, m: Fetched, index: Fetched | None,
             image_rowid: int, layers: list[dict], diff_ids: list[str], config_digest: str) -> None:
    """Inside the caller's write transaction."""
    mid = _manifest_row(store, m, image_rowid)
    if store.scalar("SELECT count(*) FROM manifest_layer WHERE manifest_id = ?", (mid,)) == 0:
        store.conn.executemany(
            "INSERT INTO manifest_layer(manifest_id, idx, digest, media_type, size, annotations, diff_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(mid, i, d["digest"], d.get("mediaType") or "", d["size"],
              json.dumps(d["annotations"], sort_keys=True) if isinstance(d.get("annotations"), dict) else None, did)
             for i, (d, did) in enumerate(zip(layers, diff_ids))])
    if index is not None:
        iid = _manifest_row(store, index, None)
        store.execute("INSERT OR IGNORE INTO manifest_child(index_id, child_id) VALUES (?, ?)", (iid, mid))
        seen(store, index.digest, registry, repository)
    for d in [m.digest, config_digest] + [x["digest"] for x in layers]:
        seen(store, d, registry, repository)


def remember_pull(store: Store, ref: Reference, m: Fetched, index: Fetched | None, image_rowid: int,
                  layers: list[dict], diff_ids: list[str], config_digest: str) -> None:
    remember(store, ref.registry, ref.repository, m, index, image_rowid, layers, diff_ids, config_digest)


@dataclass
class Original:
    digest: str
    media_type: str
    data: bytes
    layers: list[dict]  # descriptors as in the manifest, bottom first


def originals(store: Store, image_rowid: int) -> list[Original]:
    """The manifests stored for an image, newest first."""
    out = []
    for mid, digest, mt, data in store.execute(
            "SELECT id, digest, media_type, data FROM manifest WHERE image_id = ? ORDER BY id DESC",
            (image_rowid,)).fetchall():
        layers = []
        for d, lmt, size, ann in store.execute(
                "SELECT digest, media_type, size, annotations FROM manifest_layer WHERE manifest_id = ? ORDER BY idx",
                (mid,)):
            desc = {"mediaType": lmt, "digest": d, "size": size}
            if ann:
                desc["annotations"] = json.loads(ann)
            layers.append(desc)
        out.append(Original(digest, mt, bytes(data), layers))
    return out


@dataclass
class StoredIndex:
    digest: str
    media_type: str
    data: bytes
    doc: dict
    children: dict[str, int]  # digest of each image manifest of it that is stored -> image row

    @property
    def entries(self) -> list[dict]:
        return [d for d in self.doc.get("manifests") or [] if isinstance(d, dict)]


def indexes_of(store: Store, image_rowid: int) -> list[StoredIndex]:
    """The indexes that list one of the image's manifests, newest first."""
    out = []
    for iid, digest, mt, data in store.execute(
            """SELECT DISTINCT i.id, i.digest, i.media_type, i.data FROM manifest i
               JOIN manifest_child c ON c.index_id = i.id JOIN manifest m ON m.id = c.child_id
               WHERE m.image_id = ? ORDER BY i.id DESC""", (image_rowid,)).fetchall():
        children = dict(store.execute(
            "SELECT m.digest, m.image_id FROM manifest_child c JOIN manifest m ON m.id = c.child_id"
            " WHERE c.index_id = ? AND m.image_id IS NOT NULL", (iid,)).fetchall())
        out.append(StoredIndex(digest, mt, bytes(data), json.loads(data), children))
    return out


def seen_in(store: Store, digest: str, registry: str) -> list[str]:
    """Repositories of registry where a blob was seen."""
    return [r for (r,) in store.execute(
        "SELECT repository FROM seen WHERE digest = ? AND registry = ? ORDER BY repository", (digest, registry))]


def blob_for_diff(store: Store, diff_id: str, media_types: tuple[str, ...]) -> list[dict]:
    """Descriptors of compressed blobs known to hold diff_id (from any pulled manifest)."""
    out = []
    seen_d = set()
    for d, mt, size in store.execute(
            "SELECT digest, media_type, size FROM manifest_layer WHERE diff_id = ? ORDER BY manifest_id DESC",
            (diff_id,)):
        if mt in media_types and d not in seen_d:
            seen_d.add(d)
            out.append({"mediaType": mt, "digest": d, "size": size})
    return out
