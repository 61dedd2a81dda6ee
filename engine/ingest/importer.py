"""Importing archives: layer tars become event logs, contents become chunks."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from hashlib import sha256
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Callable


from ..refs import normalize_tag
from ..kinds import IMPLIED, PUT, WHITEOUT  # noqa: F401  (WHITEOUT: containers take it from here)
from ..log import get_logger
from .archive import Archive, ImageSource, LayerSource, LayerStream
from ..content import SMALL, ContentStore
from ..errors import LayerFormatError, UsageError
from ..store import Store
from ..tarevents import TAG_SIZE, Parents, event_of
from ..tarstream import TarReader

log = get_logger("layerdb.import")

BATCH = 2000
# Small contents wait with their batch's events for one dedup query; a batch
# ends early at this many of their bytes, to keep memory flat.
SMALL_BATCH_BYTES = 1 << 20
# Framing records are gathered into pieces of this size before they reach the
# framing writer: one write per record cost ~5 us (a sha256 update too small to
# release the GIL, and the writer's bookkeeping), a second per 200k entries.
FRAMING_PIECE = 1 << 16
# Whether a diff puts something at a path (a file that is also a parent).
NAMED_HERE = "SELECT 1 FROM event WHERE path_id = ? AND diff_id = ? AND kind = ? LIMIT 1"

# progress(kind, done, total): kind is "layer" (bytes of the current blob) or "image".
Progress = Callable[[str, int, int], None]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def chain_ids(diff_ids: list[str]) -> list[str]:
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def encode_framing_record(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


@dataclass
class DiffResult:
    diff_rowid: int
    diff_id: str
    new: bool
    tar_size: int = 0
    file_bytes: int = 0
    entries: int = 0


@dataclass
class ImportResult:
    images: list[dict] = field(default_factory=list)
    new_diffs: int = 0
    reused_diffs: int = 0
    bytes_read: int = 0


class Importer:
    def __init__(self, store: Store, content: ContentStore, progress: Progress | None = None):
        self.store = store
        self.content = content
        self.progress = progress
        self._paths: dict[bytes, int] = {}

    def _pid(self, path: bytes) -> int:
        pid = self._paths.get(path)
        if pid is None:
            self._intern([path])
            pid = self._paths[path]
        return pid

    def _intern(self, paths: list[bytes]) -> None:
        """Put the ids of many paths in self._paths, interning the new ones: a
        few statements a batch instead of two a path (a layer of 200k files
        spent 1.4 s in them).  Ids are taken after max(id): the import holds
        the write lock, as for blob ids."""
        if len(self._paths) > 65_536:  # keep memory flat on huge layers (~10 MB at most)
            self._paths.clear()
        known = self._paths
        missing = [p for p in dict.fromkeys(paths) if p not in known]
        conn = self.store.conn
        for i in range(0, len(missing), 500):
            part = missing[i : i + 500]
            marks = ",".join("?" * len(part))
            for pid, path in conn.execute(f"SELECT id, path FROM path WHERE path IN ({marks})", part):
                known[path] = pid
        new = [p for p in missing if p not in known]
        if new:
            start = (self.store.scalar("SELECT max(id) FROM path") or 0) + 1
            rows = [(start + i, p, p.rsplit(b"/", 1)[-1]) for i, p in enumerate(new)]
            conn.executemany("INSERT INTO path(id, path, name) VALUES (?, ?, ?)", rows)
            known.update((p, pid) for pid, p, _ in rows)

    def _add_small(self, rows: list[list], small: list[tuple[int, bytes, bytes]]) -> None:
        """Store the batch's small contents and put their blob ids (index 10) in rows."""
        for (i, _, _), bid in zip(small, self.content.add_small_batch([(sha, data) for _, sha, data in small])):
            rows[i][10] = bid
        small.clear()

    def _insert_events(self, sql: str, rows: list[list]) -> None:
        """Insert event rows whose path (index 3) and hard-link target (12) are
        still path bytes."""
        self._intern([r[3] for r in rows] + [r[12] for r in rows if r[12] is not None])
        known = self._paths
        for r in rows:
            r[3] = known[r[3]]
            if r[12] is not None:
                r[12] = known[r[12]]
        self.store.conn.executemany(sql, rows)

    # Archive ----------------------------------------------------------------

    def import_archive(self, path: str, tag: str | None = None, platform: str | None = None) -> ImportResult:
        result = ImportResult()
        with Archive(path) as arc:
            images = arc.images(platform)
            if tag is not None and len(images) != 1:
                raise UsageError(f"--tag needs an archive with one image; {path} holds {len(images)}")
            layers = self._plan(arc, images)
            self.content.reset()
            try:
                with self.store.write():
                    # Blob rows of a pack are written when the pack is, after the
                    # events that name them: check references at commit instead.
                    self.store.execute("PRAGMA defer_foreign_keys = ON")
                    diffs: dict[tuple[str, str], DiffResult] = {}
                    for src, what in layers:
                        d = diffs[src.member, src.diff_id] = self._import_layer(arc, src, what)
                        if d.new:
                            result.new_diffs += 1
                        else:
                            result.reused_diffs += 1
                    for img in images:
                        tags = [tag] if tag is not None else img.repo_tags
                        chain = [diffs[src.member, src.diff_id] for src in img.layers]
                        cfg = json.loads(img.config)
                        result.images.append(self.store_image(img.digest, img.config, cfg, chain, tags))
                    self.content.flush()
            except BaseException:
                self.content.reset()
                raise
            result.bytes_read = arc.bytes_read
        return result

    @staticmethod
    def _plan(arc: Archive, images: list[ImageSource]) -> list[tuple[LayerSource, str]]:
        """Each layer blob the images name, once per (member, diff_id), in the order
        to read them; a layer is named, in messages, after the first image and
        position that list it.

        A diff's events depend on its tar alone, never on the layers below it, so
        the order changes no view, event or digest.  A gzipped archive is read in
        the order its blobs lie in it: it seeks back only by decompressing again
        from the start (see Archive), which cost a pass for about every layer of a
        legacy `docker save`.  Other archives keep the images' order, bottom layer
        first, so that a content several layers hold is stored with the lowest,
        which more images share: removing an upper layer then leaves its packs
        whole, without a repack by gc."""
        todo: dict[tuple[str, str], tuple[LayerSource, str]] = {}
        for img in images:
            for i, src in enumerate(img.layers):
                todo.setdefault((src.member, src.diff_id), (src, f"layer {i + 1} ({src.member})"))
        plan = list(todo.values())
        if arc.compressed:
            plan.sort(key=lambda t: arc.offset(t[0].member, t[1]))
        return plan

    def store_image(self, digest: str, config: bytes, cfg: dict, diffs: list[DiffResult], tags: list[str]) -> dict:
        """Record an image whose diffs are stored: its chain's layers, config, history and tags."""
        cids = chain_ids([d.diff_id for d in diffs])
        parent = None
        for pos, (d, cid) in enumerate(zip(diffs, cids), start=1):
            row = self.store.one("SELECT id FROM layer WHERE chain_id = ?", (cid,))
            if row is None:
                row = self.store.one(
                    "INSERT INTO layer(chain_id, parent_id, diff_id, position) VALUES (?, ?, ?, ?) RETURNING id",
                    (cid, parent, d.diff_rowid, pos),
                )
            parent = row[0]
        image_row = self.store.one("SELECT id FROM image WHERE digest = ?", (digest,))
        new_image = image_row is None
        if new_image:
            image_row = self.store.one(
                "INSERT INTO image(digest, config, top_layer, created, os, architecture, imported)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    digest,
                    config,
                    parent,
                    _str(cfg.get("created")),
                    _str(cfg.get("os")),
                    _str(cfg.get("architecture")),
                    now(),
                ),
            )
            self._history(image_row[0], cfg, len(diffs))
        image_id = image_row[0]
        for t in tags:
            self.store.execute(
                "INSERT INTO tag(name, image_id) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET image_id = excluded.image_id",
                (normalize_tag(t), image_id),
            )
        log.info("image", id=digest, tags=tags, layers=len(diffs), new=new_image)
        return {"id": digest, "repo_tags": tags, "layers": len(diffs), "new": new_image}

    def _history(self, image_id: int, cfg: dict, n_layers: int) -> None:
        pos = 0
        rows = []
        for idx, h in enumerate(cfg.get("history") or []):
            empty = bool(h.get("empty_layer"))
            p = None
            if not empty and pos < n_layers:
                pos += 1
                p = pos
            rows.append(
                (image_id, idx, p, _str(h.get("created")), _str(h.get("created_by")), _str(h.get("comment")), int(empty))
            )
        self.store.conn.executemany(
            "INSERT INTO history(image_id, idx, position, created, created_by, comment, empty_layer)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    # Layers -------------------------------------------------------------------

    def _import_layer(self, arc: Archive, src: LayerSource, what: str) -> DiffResult:
        f, size = arc.open_member(src.member, what)
        stream = LayerStream(f)
        try:
            row = self.store.one("SELECT id, tar_size FROM diff WHERE diff_id = ?", (src.diff_id,))
            if row is not None:
                # Stored already: only check that this archive's blob is what it claims.
                stream.drain(src, limit=row[1], what=what)
                stream.verify(src, what)
                return DiffResult(row[0], src.diff_id, new=False)
            return self._ingest(stream, src, what, size)
        except LayerFormatError as err:
            raise LayerFormatError(f"{what}: {err.message}") from None
        finally:
            stream.close()

    def ingest_tar(self, f: BinaryIO, diff_id: str, what: str = "layer", blob_digest: str | None = None) -> DiffResult:
        """A local layer tar (e.g. one `commit` wrote) as a diff, inside the caller's
        write transaction; its sha256 must be diff_id.  A stored diff is reused.
        blob_digest: f's bytes as read (a pull's compressed blob) must have it, and
        are read and checked even when the diff is stored, as _import_layer does."""
        row = self.store.one("SELECT id, tar_size FROM diff WHERE diff_id = ?", (diff_id,))
        if row is not None and blob_digest is None:
            return DiffResult(row[0], diff_id, new=False)
        src = LayerSource(what, blob_digest, diff_id)
        stream = LayerStream(f)
        try:
            if row is not None:
                stream.drain(src, limit=row[1], what=what)
                stream.verify(src, what)
                return DiffResult(row[0], diff_id, new=False)
            return self._ingest(stream, src, what, 0)
        except LayerFormatError as err:
            raise LayerFormatError(f"{what}: {err.message}") from None
        finally:
            stream.close()

    def _ingest(self, stream: LayerStream, src: LayerSource, what: str, blob_size: int) -> DiffResult:
        diff_rowid = self.store.scalar(
            "INSERT INTO diff(diff_id, tar_size, file_bytes, entries, imported) VALUES (?, 0, 0, 0, ?) RETURNING id",
            (src.diff_id, now()),
        )
        reader = TarReader(stream)
        framing = self.content.writer("framing")  # streamed: a big layer's headers never sit in memory
        # 8 bytes of each payload's sha256, in entry order: fsck --deep names the
        # entry whose content no longer matches (schema.sql, version 4).
        tags = self.content.writer("framing")
        rows: list[list] = []
        # Parents the tar never names become implied directories (tarevents.Parents).
        parents = Parents()
        file_bytes = 0
        seq = -1
        ins = (
            "INSERT INTO event(diff_id, kind, seq, path_id, type, mode, uid, gid, mtime, size, blob_id, link,"
            " target_id, devmajor, devminor, xattrs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        progress = self.progress
        small: list[tuple[int, bytes, bytes]] = []  # (index in rows, sha256, bytes) of small files
        small_bytes = 0
        fbuf = bytearray()  # framing records not yet written
        tbuf = bytearray()  # tags not yet written, gathered as the framing is
        for seq, e in enumerate(reader):
            fbuf += struct.pack(">I", len(e.framing))
            fbuf += e.framing
            if len(fbuf) >= FRAMING_PIECE:
                framing.write(bytes(fbuf))
                fbuf.clear()
            ev = event_of(e)
            blob_id = None
            if e.type == "f":
                if e.size <= SMALL:
                    # Looked up with the batch (ContentStore.add_small_batch): one
                    # query per batch instead of one per file.
                    data = b"".join(reader.payload())
                    sha = sha256(data).digest()
                    small.append((len(rows), sha, data))
                    small_bytes += len(data)
                else:
                    blob_id, sha = self.content.add(reader.payload(), e.size)
                tbuf += sha[:TAG_SIZE]
                if len(tbuf) >= FRAMING_PIECE:
                    tags.write(bytes(tbuf))
                    tbuf.clear()
                file_bytes += e.size
            parents.add(ev)
            rows.append(
                [diff_rowid, ev.kind, seq, ev.path, ev.type, ev.mode, ev.uid, ev.gid, ev.mtime, ev.size,
                 blob_id, ev.link, ev.target, ev.devmajor, ev.devminor, ev.xattrs]
            )
            if len(rows) >= BATCH or small_bytes >= SMALL_BATCH_BYTES:
                self._add_small(rows, small)
                small_bytes = 0
                self._insert_events(ins, rows)
                rows.clear()
                if progress:
                    progress("layer", stream.raw.count, blob_size)
        entries = seq + 1
        self._add_small(rows, small)
        self._insert_events(ins, rows)
        rows.clear()
        # A non-directory that is some entry's parent is looked up among this diff's events.
        implied = [self._pid(p) for p in parents.implied(
            lambda p: self.store.scalar(NAMED_HERE, (self._pid(p), diff_rowid, PUT)) is not None)]
        self.store.conn.executemany(ins, [
            (diff_rowid, IMPLIED, entries + i, pid, "d", 0o755, 0, 0, None, None, None, None, None, None, None, None)
            for i, pid in enumerate(implied)])
        framing.write(bytes(fbuf) + encode_framing_record(reader.trailer))
        stream.drain()
        stream.verify(src, what)
        fb_id = framing.close()
        tags.write(bytes(tbuf))
        tags_id = tags.close()
        self.content.end_packs()
        self.store.execute(
            "UPDATE diff SET tar_size = ?, file_bytes = ?, entries = ?, framing = ?, digests = ? WHERE id = ?",
            (stream.tar.count, file_bytes, entries, fb_id, tags_id, diff_rowid),
        )
        if progress:
            progress("layer", stream.raw.count, blob_size)
        log.info("layer", diff_id=src.diff_id, entries=entries, tar_bytes=stream.tar.count,
                 compression=stream.compression)
        return DiffResult(diff_rowid, src.diff_id, True, stream.tar.count, file_bytes, entries)


def _str(v) -> str | None:
    return v if isinstance(v, str) else None
