"""Verifying a store: every hash, every reference, every chain.

`Fsck.findings()` yields one Finding per problem, as it finds them, inside one
read transaction; only the blame of diffs with findings is kept, so memory
stays flat however big the store.  Each finding names what it breaks: the diff and path it sits in, the
layers whose diff that is, and every image whose chain runs through them.

Checks, cheapest first:
  layers   parent chain complete, positions consecutive, chain_id(n) =
           sha256(chain_id(n-1) + " " + diff_id(n))
  images   sha256(config) is the image id; rootfs.diff_ids is the chain
  tags     name an existing image
  manifests (what pulls kept for push) hash to their digest; an image's names
           its config and, in order, the layer descriptors and diff_ids
           stored beside it; an index lists the images stored as its own
  diffs    have a framing blob and content tags for their files; their events
           number their tar entries
  events   name an existing diff, path, link target and blob of their size
  contents every chunk exists, decompresses and hashes to its name; a packed
           content hashes to its sha256 where it lies in its pack (each
           pack read once); a chunked one's chunks concatenate to its size
           and sha256
  --deep   (engine/upkeep/deep.py) every layer tar is rebuilt from the store,
           hashes to its diff_id, and is read as import reads it: each entry
           must be its stored event, field by field, each file's content the
           one its tag says it held at import, and no event may be one the
           tar does not hold (but its implied parents); each container's
           log is well formed and resolves over its image
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Iterator

from ..content import ContentStore
from ..errors import CorruptStore
from ..kinds import IGNORED, IMPLIED
from ..store import Store
from ..tarevents import TAG_SIZE
from .deep import ContainerCheck, TarCheck


@dataclass
class Finding:
    check: str  # layer, image, tag, diff, event, chunk, blob, layer-tar
    object: str  # what is broken: a digest, a chain id, an event
    problem: str
    diff_id: str | None = None
    path: str | None = None  # absolute, non-UTF-8 bytes as surrogate escapes
    layers: list[dict] = field(default_factory=list)  # {"layer_id", "position"}: layers whose diff is broken
    images: list[dict] = field(default_factory=list)  # {"id", "repo_tags"}: images whose chain holds them

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Blame:
    layers: list[dict]
    images: list[dict]


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _show(path: bytes | None) -> str | None:
    return None if path is None else "/" + bytes(path).decode("utf-8", "surrogateescape")


class Fsck:
    def __init__(self, store: Store, content: ContentStore, deep: bool = False):
        self.store = store
        self.content = content
        self.deep = deep
        self.counts: dict[str, int] = {}
        self._diff_blame: dict[int, Blame] = {}

    def findings(self) -> Iterator[Finding]:
        with self.store.read():
            self._count()
            yield from self._layers()
            yield from self._images()
            yield from self._tags()
            yield from self._manifests()
            yield from self._diffs()
            yield from self._events()
            yield from self._blobs()
            if self.deep:
                yield from self._layer_tars()

    def _count(self) -> None:
        q = self.store.scalar
        self.counts = {
            "images": q("SELECT count(*) FROM image"),
            "layers": q("SELECT count(*) FROM layer"),
            "diffs": q("SELECT count(*) FROM diff"),
            "events": q("SELECT count(*) FROM event"),
            "blobs": q("SELECT count(*) FROM blob"),
            "chunks": q("SELECT count(*) FROM (SELECT chunk FROM blob WHERE chunk IS NOT NULL"
                        " UNION SELECT chunk FROM blob_chunk)"),
            # AUFS bookkeeping (.wh..wh.plnk and kin): kept, never applied; reported, not a fault.
            "ignored": q("SELECT count(*) FROM event WHERE kind = ?", (IGNORED,)),
            "manifests": q("SELECT count(*) FROM manifest"),
            "layer_tars": 0,  # --deep: layer tars rebuilt and read
            "tar_entries": 0,  # --deep: their entries, checked against their events
            "container_logs": 0,  # --deep: containers' diffs checked
            "container_events": 0,
        }

    # Blame ------------------------------------------------------------------

    def _images_above(self, seed_sql: str, arg: int) -> list[dict]:
        # UNION, not UNION ALL: a damaged store may hold a parent cycle.
        rows = self.store.execute(
            f"""WITH RECURSIVE up(id) AS ({seed_sql} UNION SELECT l.id FROM layer l JOIN up ON l.parent_id = up.id)
                SELECT DISTINCT i.id, i.digest FROM image i JOIN up ON i.top_layer = up.id ORDER BY i.digest""",
            (arg,),
        ).fetchall()
        return [{"id": digest, "repo_tags": self._tags_of(rowid)} for rowid, digest in rows]

    def _tags_of(self, image_rowid: int) -> list[str]:
        return [r[0] for r in self.store.execute("SELECT name FROM tag WHERE image_id = ? ORDER BY name",
                                                 (image_rowid,))]

    def blame_diff(self, diff_rowid: int | None) -> Blame:
        """The layers made of this diff and the images whose chains hold them."""
        if diff_rowid is None:
            return Blame([], [])
        b = self._diff_blame.get(diff_rowid)
        if b is None:
            layers = [{"layer_id": c, "position": p} for c, p in self.store.execute(
                "SELECT chain_id, position FROM layer WHERE diff_id = ? ORDER BY position, chain_id", (diff_rowid,))]
            b = Blame(layers, self._images_above("SELECT id FROM layer WHERE diff_id = ?", diff_rowid))
            if not layers:  # a container's diff is in no layer: its container's image is what it breaks
                b.images = [{"id": digest, "repo_tags": self._tags_of(rowid)} for rowid, digest in self.store.execute(
                    "SELECT i.id, i.digest FROM container c JOIN image i ON i.id = c.image_id WHERE c.diff_id = ?",
                    (diff_rowid,))]
            self._diff_blame[diff_rowid] = b
        return b

    def blame_layer(self, layer_rowid: int, chain_id: str, position: int) -> Blame:
        return Blame([{"layer_id": chain_id, "position": position}],
                     self._images_above("SELECT ?", layer_rowid))

    def _finding(self, check: str, obj: str, problem: str, blame: Blame, diff_id: str | None = None,
                 path: bytes | None = None) -> Finding:
        return Finding(check, obj, problem, diff_id, _show(path), blame.layers, blame.images)

    # Chains and images ------------------------------------------------------

    def _layers(self) -> Iterator[Finding]:
        for lid, chain, pos, parent_id, p_id, p_chain, p_pos, diff_id in self.store.execute(
            """SELECT l.id, l.chain_id, l.position, l.parent_id, p.id, p.chain_id, p.position, d.diff_id
               FROM layer l LEFT JOIN layer p ON p.id = l.parent_id LEFT JOIN diff d ON d.id = l.diff_id
               ORDER BY l.id"""
        ):
            problems = []
            if diff_id is None:
                problems.append("its diff is missing")
            if pos == 1:
                if parent_id is not None:
                    problems.append("the bottom layer (position 1) has a parent")
                expected = diff_id
            elif parent_id is None or p_id is None:
                problems.append(f"parent chain is broken: the layer at position {pos} has no parent layer")
                expected = None
            else:
                if p_pos != pos - 1:
                    problems.append(f"parent {p_chain} is at position {p_pos}, not {pos - 1}")
                expected = None if diff_id is None else _sha(f"{p_chain} {diff_id}".encode())
            if expected is not None and expected != chain:
                problems.append(f"chain id is wrong: its parent and diff give {expected}")
            if problems:
                yield self._finding("layer", chain, "; ".join(problems), self.blame_layer(lid, chain, pos), diff_id)

    def _chain_diff_ids(self, top: int) -> tuple[list[str], str | None]:
        """Diff ids from the bottom up to `top`, and what stops the walk early, if anything."""
        out: list[str] = []
        seen: set[int] = set()
        cur: int | None = top
        while cur is not None:
            if cur in seen:
                return out[::-1], "its layer chain has a cycle"
            seen.add(cur)
            row = self.store.one(
                "SELECT l.parent_id, d.diff_id FROM layer l LEFT JOIN diff d ON d.id = l.diff_id WHERE l.id = ?",
                (cur,))
            if row is None:
                return out[::-1], f"its layer chain names a missing layer (row {cur})"
            cur = row[0]
            out.append(row[1] or "<missing diff>")
        return out[::-1], None

    def _images(self) -> Iterator[Finding]:
        for rowid, digest, config, top in self.store.execute(
            "SELECT id, digest, config, top_layer FROM image ORDER BY digest"
        ):
            if isinstance(config, str):  # damage: SQLite turned the blob into text
                config = config.encode("utf-8", "surrogateescape")
            blame = Blame([], [{"id": digest, "repo_tags": self._tags_of(rowid)}])
            if top is not None:
                tl = self.store.one("SELECT chain_id, position FROM layer WHERE id = ?", (top,))
                if tl is not None:
                    blame.layers = [{"layer_id": tl[0], "position": tl[1]}]
            got = _sha(config)
            if got != digest:
                yield self._finding("image", digest, f"config digest mismatch: the stored config hashes to {got}",
                                    blame)
                continue
            try:
                want = json.loads(config)["rootfs"]["diff_ids"]
            except (ValueError, KeyError, TypeError):
                yield self._finding("image", digest, "config has no readable rootfs.diff_ids", blame)
                continue
            have, broken = self._chain_diff_ids(top) if top is not None else ([], None)
            if broken:
                yield self._finding("image", digest, broken, blame)
            elif have != want:
                yield self._finding(
                    "image", digest,
                    f"rootfs.diff_ids ({len(want)}) do not match the stored layer chain ({len(have)})"
                    + _first_difference(want, have), blame)

    def _tags(self) -> Iterator[Finding]:
        for name, image_id in self.store.execute(
            "SELECT name, image_id FROM tag t WHERE NOT EXISTS (SELECT 1 FROM image i WHERE i.id = t.image_id)"
        ):
            yield self._finding("tag", name, f"names a missing image (row {image_id})", Blame([], []))

    # Registry records -----------------------------------------------------------

    def _manifests(self) -> Iterator[Finding]:
        for mid, digest, media_type, data, image_rowid, image_digest, config in self.store.execute(
            """SELECT m.id, m.digest, m.media_type, m.data, m.image_id, i.digest, i.config
               FROM manifest m LEFT JOIN image i ON i.id = m.image_id ORDER BY m.id"""
        ).fetchall():
            blame = Blame([], [])
            if image_digest is not None:
                blame.images = [{"id": image_digest, "repo_tags": self._tags_of(image_rowid)}]
            problems = _manifest_problems(self.store, mid, digest, media_type, data, image_rowid, image_digest,
                                          config)
            if problems:
                yield self._finding("manifest", digest, "; ".join(problems), blame)
        for (digest,) in self.store.execute(
                "SELECT DISTINCT digest FROM seen WHERE digest NOT GLOB 'sha256:*' OR length(digest) != 71"):
            yield self._finding("manifest", str(digest), "a `seen` row names a malformed digest", Blame([], []))

    # Diffs and events -----------------------------------------------------------

    def _diffs(self) -> Iterator[Finding]:
        for (rowid, diff_id, entries, file_bytes, framing, has_framing, n, distinct, payload, digests, tags_size,
             files) in self.store.execute(
            """SELECT d.id, d.diff_id, d.entries, d.file_bytes, d.framing,
                      EXISTS (SELECT 1 FROM blob b WHERE b.id = d.framing),
                      count(e.seq), count(DISTINCT e.seq), coalesce(sum(CASE WHEN e.type = 'f' THEN e.size END), 0),
                      d.digests, (SELECT b.size FROM blob b WHERE b.id = d.digests),
                      count(CASE WHEN e.type = 'f' THEN 1 END)
               FROM diff d LEFT JOIN event e ON e.diff_id = d.id AND e.kind != ? AND e.seq < d.entries
               WHERE d.container = 0  -- a container's diff is a log of writes, not a tar
               GROUP BY d.id ORDER BY d.id""",
            (IMPLIED,),
        ):
            problems = []
            if framing is None:
                problems.append("has no tar framing, so its layer tar cannot be rebuilt")
            elif not has_framing:
                problems.append(f"its tar framing (blob row {framing}) is missing")
            if digests is not None and tags_size is None:
                problems.append(f"its content tags (blob row {digests}) are missing")
            elif digests is not None and tags_size != files * TAG_SIZE:
                problems.append(f"its content tags cover {tags_size // TAG_SIZE} files, it has {files}")
            if n != entries or distinct != entries:
                problems.append(f"the tar had {entries} entries but {distinct} are stored")
            if payload != file_bytes:
                problems.append(f"its files hold {payload} bytes, the diff records {file_bytes}")
            if problems:
                yield self._finding("diff", diff_id, "; ".join(problems), self.blame_diff(rowid), diff_id)

    def _events(self) -> Iterator[Finding]:
        for (diff_rowid, kind, seq, path, diff_id, type_, size, blob_id, blob_size, has_blob, target_id, has_target,
             has_path, path_id) in self.store.execute(
            """SELECT e.diff_id, e.kind, e.seq, p.path, d.diff_id, e.type, e.size, e.blob_id, b.size,
                      b.id IS NOT NULL, e.target_id, t.id IS NOT NULL, p.id IS NOT NULL, e.path_id
               FROM event e LEFT JOIN diff d ON d.id = e.diff_id LEFT JOIN path p ON p.id = e.path_id
                    LEFT JOIN blob b ON b.id = e.blob_id LEFT JOIN path t ON t.id = e.target_id
               WHERE d.id IS NULL OR p.id IS NULL
                  OR (e.blob_id IS NOT NULL AND (b.id IS NULL OR b.size IS NOT e.size))
                  OR (e.type = 'f' AND e.kind != ? AND e.blob_id IS NULL)
                  OR (e.target_id IS NOT NULL AND t.id IS NULL) OR (e.type = 'h' AND e.target_id IS NULL)""",
            (IMPLIED,),
        ):
            problems = []
            if diff_id is None:
                problems.append(f"names a missing diff (row {diff_rowid})")
            if not has_path:
                problems.append(f"names a missing path (row {path_id})")
            if blob_id is not None and not has_blob:
                problems.append(f"names a missing content blob (row {blob_id})")
            elif blob_id is not None and blob_size != size:
                problems.append(f"records size {size} but its content holds {blob_size} bytes")
            if type_ == "f" and blob_id is None:
                problems.append("is a regular file without content")
            if target_id is not None and not has_target:
                problems.append(f"is a hard link to a missing path (row {target_id})")
            if type_ == "h" and target_id is None:
                problems.append("is a hard link without a target")
            obj = f"event {seq} of {diff_id or f'diff row {diff_rowid}'}"
            blame = self.blame_diff(diff_rowid if diff_id is not None else None)
            yield self._finding("event", obj, "; ".join(problems), blame, diff_id, path)

    # Content ----------------------------------------------------------------------

    def _blobs(self) -> Iterator[Finding]:
        # Packed contents, grouped by pack, so that each pack is decompressed once.
        pack: bytes | None = None
        data: bytes | None = None
        pack_fault: str | None = None
        for blob_id, sha, size, chunk, offset in self.store.execute(
            "SELECT id, sha256, size, chunk, offset FROM blob WHERE chunk IS NOT NULL ORDER BY chunk, offset"
        ):
            sha, chunk = bytes(sha), bytes(chunk)
            if chunk != pack:
                pack = chunk
                data, pack_fault = self._read_chunk(chunk)
            if data is None:
                yield from self._blob_findings(blob_id, "chunk", chunk.hex(), pack_fault or "")
            elif offset is None or offset < 0 or offset + size > len(data):
                yield from self._blob_findings(blob_id, "blob", sha.hex(), f"lies outside its pack {chunk.hex()}")
            else:
                got = hashlib.sha256(data[offset:offset + size]).hexdigest()
                if got != sha.hex():
                    # A pack holds only its members' bytes: a damaged pack shows as damaged members.
                    check, obj = ("chunk", chunk.hex()) if pack_fault else ("blob", sha.hex())
                    yield from self._blob_findings(
                        blob_id, check, obj, (pack_fault + "; " if pack_fault else "")
                        + f"content {sha.hex()} in it hashes to {got}")
        # Large contents (a list of chunks) and empty ones.
        for blob_id, sha, size in self.store.execute("SELECT id, sha256, size FROM blob WHERE chunk IS NULL ORDER BY id"):
            bad = self._check_chunked(blob_id, bytes(sha), size)
            if bad is not None:
                yield from self._blob_findings(blob_id, *bad)

    def _read_chunk(self, sha: bytes) -> tuple[bytes | None, str | None]:
        """The chunk's bytes (None if unreadable), and what is wrong with it, if anything."""
        try:
            raw = self.content.chunks.get(sha)
        except CorruptStore as e:
            return None, e.message
        got = hashlib.sha256(raw).digest()
        if got != sha:
            return raw, f"sha256 mismatch: its bytes hash to {got.hex()}"
        return raw, None

    def _check_chunked(self, blob_id: int, sha: bytes, size: int) -> tuple[str, str, str] | None:
        """(check, object, problem) for the first fault in a chunked content, or None."""
        refs = self.store.execute(
            "SELECT seq, offset, chunk FROM blob_chunk WHERE blob_id = ? ORDER BY seq", (blob_id,)).fetchall()
        h = hashlib.sha256()
        total = 0
        for i, (seq, offset, csha) in enumerate(refs):
            csha = bytes(csha)
            if seq != i or offset != total:
                return "blob", sha.hex(), f"chunk list is broken at seq {seq} (offset {offset}, expected {total})"
            raw, fault = self._read_chunk(csha)
            if raw is None or fault:
                return "chunk", csha.hex(), fault or ""
            h.update(raw)
            total += len(raw)
        if total != size:
            return "blob", sha.hex(), f"its chunks hold {total} bytes, the content is {size} bytes"
        if h.digest() != sha:
            return "blob", sha.hex(), f"sha256 mismatch: its chunks hash to {h.hexdigest()}"
        return None

    def _blob_findings(self, blob_id: int, check: str, obj: str, problem: str) -> Iterator[Finding]:
        """One finding per use of a damaged blob: each file that holds it, each layer framed by it."""
        used = False
        for diff_rowid, diff_id in self.store.execute(
            "SELECT id, diff_id FROM diff WHERE framing = ? ORDER BY id", (blob_id,)
        ).fetchall():
            used = True
            yield self._finding(check, obj, problem + " (in the layer's tar framing)", self.blame_diff(diff_rowid),
                                diff_id)
        for diff_rowid, diff_id, path in self.store.execute(
            """SELECT e.diff_id, d.diff_id, p.path FROM event e LEFT JOIN diff d ON d.id = e.diff_id
               LEFT JOIN path p ON p.id = e.path_id WHERE e.blob_id = ? ORDER BY e.diff_id, e.seq""", (blob_id,)
        ).fetchall():
            used = True
            yield self._finding(check, obj, problem, self.blame_diff(diff_rowid), diff_id, path)
        if not used:
            yield self._finding(check, obj, problem + " (content no file uses)", Blame([], []))

    def _layer_tars(self) -> Iterator[Finding]:
        tars = TarCheck(self.store, self.content)
        for rowid, diff_id, entries, tar_size, framing, digests in self.store.execute(
            "SELECT id, diff_id, entries, tar_size, framing, digests FROM diff WHERE container = 0 ORDER BY id"
        ).fetchall():
            self.counts["layer_tars"] += 1
            for p in tars.diff(rowid, diff_id, entries, tar_size, framing, digests):
                yield self._finding(p.check, p.obj, p.text, self.blame_diff(rowid), diff_id, p.path)
        self.counts["tar_entries"] = tars.entries
        logs = ContainerCheck(self.store)
        for rowid, diff_id, name, layer_id in self.store.execute(
            """SELECT d.id, d.diff_id, c.name, c.layer_id FROM diff d LEFT JOIN container c ON c.diff_id = d.id
               WHERE d.container = 1 ORDER BY d.id"""
        ).fetchall():
            self.counts["container_logs"] += 1
            for p in logs.diff(rowid, diff_id, name, layer_id):
                yield self._finding(p.check, p.obj, p.text, self.blame_diff(rowid), diff_id, p.path)
        self.counts["container_events"] = logs.events


def _manifest_problems(store: Store, mid: int, digest: str, media_type: str, data, image_rowid: int | None,
                       image_digest: str | None, config) -> list[str]:
    if isinstance(data, str):  # damage: SQLite turned the blob into text
        data = data.encode("utf-8", "surrogateescape")
    got = _sha(data)
    if got != digest:
        return [f"its stored bytes hash to {got}"]
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return ["its stored bytes are not JSON"]
    if not isinstance(doc, dict):
        return ["its stored bytes are not a JSON object"]
    problems = []
    if isinstance(doc.get("mediaType"), str) and doc["mediaType"] != media_type:
        problems.append(f"it says media type {doc['mediaType']}, the store records {media_type}")
    rows = store.execute("SELECT digest, media_type, size, annotations, diff_id FROM manifest_layer"
                         " WHERE manifest_id = ? ORDER BY idx", (mid,)).fetchall()
    children = [c for (c,) in store.execute(
        "SELECT m.digest FROM manifest_child c JOIN manifest m ON m.id = c.child_id WHERE c.index_id = ?"
        " ORDER BY m.digest", (mid,))]
    if image_rowid is None:
        listed = doc.get("manifests")
        if not isinstance(listed, list):
            return problems + ["it belongs to no image and is no index (no manifests list)"]
        names = {d.get("digest") for d in listed if isinstance(d, dict)}
        problems += [f"its stored image manifest {c} is not one of its entries" for c in children if c not in names]
        if rows:
            problems.append(f"an index with {len(rows)} layer descriptors")
        return problems
    if image_digest is None:
        return problems + [f"names a missing image (row {image_rowid})"]
    if children:
        problems.append(f"an image manifest with {len(children)} index entries")
    cdesc = doc.get("config")
    if not isinstance(cdesc, dict) or cdesc.get("digest") != image_digest:
        problems.append(f"its config is {cdesc.get('digest') if isinstance(cdesc, dict) else None},"
                        f" not the image's {image_digest}")
    layers = doc.get("layers") if isinstance(doc.get("layers"), list) else []
    want = [(d.get("digest"), d.get("mediaType") or "", d.get("size"),
             json.dumps(d["annotations"], sort_keys=True) if isinstance(d.get("annotations"), dict) else None)
            for d in layers if isinstance(d, dict)]
    have = [tuple(r[:4]) for r in rows]
    if have != want:
        i = next((k for k, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
        problems.append(f"it names {len(want)} layers, {len(have)} descriptors are stored beside it"
                        f" (first difference at layer {i + 1})")
    try:
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        diff_ids = None  # _images reports the config
    if diff_ids is not None and [r[4] for r in rows] != diff_ids:
        problems.append("the diff_ids stored beside its layers are not its image's rootfs.diff_ids"
                        + _first_difference(diff_ids, [r[4] for r in rows]))
    return problems


def _first_difference(want: list[str], have: list[str]) -> str:
    for i, (a, b) in enumerate(zip(want, have), start=1):
        if a != b:
            return f": position {i} is {b} in the store, {a} in the config"
    return ""
