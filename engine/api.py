"""The library's front door: one LayerDB per store file.

Every method returns values or writes to a stream it is given; nothing here
prints.  The CLI (layerdb.cli) is one client of this class.
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator

from . import refs
from .chunks import SqliteChunkStore
from .content import ContentStore
from .errors import NotFound, UsageError
from .replay import Event, Node, View, below, chain_events, decided_events
from .store import Store, default_db_path

if TYPE_CHECKING:  # the importer and exporter pull in tarfile and more: loaded when used
    from .importer import ImportResult, Progress

TYPE_NAMES = {"f": "file", "d": "dir", "l": "symlink", "h": "hardlink", "p": "fifo", "c": "chardev", "b": "blockdev"}


def parse_path(path: str | bytes) -> bytes:
    """A user-given path (absolute or not) as the store's raw relative path."""
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    return b"/".join(p for p in raw.split(b"/") if p and p != b".")


def show_path(path: bytes) -> str:
    """Absolute, /-rooted, non-UTF-8 bytes as surrogate escapes (DESIGN.md)."""
    return "/" + path.decode("utf-8", "surrogateescape")


class LayerDB:
    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.store = Store(path if path is not None else default_db_path())
        self.chunks = SqliteChunkStore(self.store.conn)
        self.content = ContentStore(self.store.conn, self.chunks)
        self._streams: weakref.WeakSet = weakref.WeakSet()

    def close(self) -> None:
        # A stream left unfinished (`view -R | head`) holds a read transaction:
        # end it while the connection is still open.
        for rows in list(self._streams):
            rows.close()
        self.content.close()
        self.store.close()

    def stream(self, rows: Iterator[Any]) -> Iterator[Any]:
        """Start a generator of rows whose first item is None (it has checked its
        arguments, so errors come before any output) and let close() end it."""
        next(rows)
        self._streams.add(rows)
        return rows

    def __enter__(self) -> "LayerDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Import ---------------------------------------------------------------

    def import_archive(self, archive: str, tag: str | None = None, platform: str | None = None,
                       progress: Progress | None = None) -> ImportResult:
        from .importer import Importer

        return Importer(self.store, self.content, progress).import_archive(archive, tag, platform)

    # Listing --------------------------------------------------------------

    def images(self) -> list[dict]:
        out = []
        with self.store.read():
            for rowid, digest, top, created in self.store.execute(
                "SELECT id, digest, top_layer, created FROM image ORDER BY created DESC, digest"
            ).fetchall():
                chain = refs.chain_of(self.store, top) if top is not None else []
                size = 0
                for li in chain:
                    size += self.store.scalar("SELECT file_bytes FROM diff WHERE id = ?", (li.diff_rowid,))
                out.append({"id": digest, "repo_tags": refs.image_tags(self.store, rowid), "layers": len(chain),
                            "size": size, "created": created})
        return out

    def resolve(self, ref: str) -> refs.Resolved:
        with self.store.read():
            return refs.resolve(self.store, ref)

    def history(self, ref: str) -> list[dict]:
        """The image's history, newest first, like `docker history`."""
        with self.store.read():
            r = refs.resolve(self.store, ref)
            if r.image_rowid is None:
                raise NotFound(f"{ref}: no image holds this layer, so it has no history")
            by_pos = {li.position: li for li in r.layers}
            rows = self.store.execute(
                "SELECT idx, position, created, created_by, comment, empty_layer FROM history"
                " WHERE image_id = ? ORDER BY idx", (r.image_rowid,)
            ).fetchall()
            sizes = {li.position: self.store.scalar("SELECT file_bytes FROM diff WHERE id = ?", (li.diff_rowid,))
                     for li in r.layers}
            out = []
            for idx, pos, created, created_by, comment, empty in rows:
                li = by_pos.get(pos) if pos is not None else None
                if pos is not None and li is None:
                    continue  # above the REF's position (REF~N)
                out.append({
                    "position": pos,
                    "layer_id": li.chain_id if li else None,
                    "diff_id": li.diff_id if li else None,
                    "created": created,
                    "created_by": created_by,
                    "comment": comment,
                    "size": sizes.get(pos, 0) if pos is not None else 0,
                    "empty_layer": bool(empty),
                })
        out.reverse()
        return out

    def created_by(self, r: refs.Resolved) -> dict[int, str | None]:
        if r.image_rowid is None:
            return {}
        return {pos: cb for pos, cb in self.store.execute(
            "SELECT position, created_by FROM history WHERE image_id = ? AND position IS NOT NULL", (r.image_rowid,))}

    # Views ------------------------------------------------------------------

    def view(self, ref: str | refs.Resolved) -> View:
        """The whole view at REF, replayed from the chain's events.  It holds every
        path of the image: the commands stream instead (export.TreeEntries,
        iter_listing, iter_diff) or load only what they read (lookup, cat)."""
        with self.store.read():
            r = ref if isinstance(ref, refs.Resolved) else refs.resolve(self.store, ref)
            return View().replay(chain_events(self.store.conn, r.chain))

    def _closure_events(self, r: refs.Resolved, path: bytes) -> list[Event]:
        """The events that decide `path` at r: on it, its ancestors and its hard-link partners."""
        return decided_events(self.store, [r.chain], [path])[0]

    def lookup(self, ref: str | refs.Resolved, path: str | bytes) -> Node | None:
        """One path at REF, without replaying the whole chain."""
        p = parse_path(path)
        with self.store.read():
            r = ref if isinstance(ref, refs.Resolved) else refs.resolve(self.store, ref)
            return View().replay(self._closure_events(r, p)).get(p)

    def cat(self, ref: str, path: str | bytes) -> Iterator[bytes]:
        """The bytes of a regular file at REF, chunk by chunk."""
        p = parse_path(path)
        with self.store.read():
            r = refs.resolve(self.store, ref)
            node = View().replay(self._closure_events(r, p)).get(p)
            if node is None:
                raise NotFound(f"{show_path(p)}: no such file at {ref}")
            if node.type == "d":
                raise UsageError(f"{show_path(p)}: is a directory at {ref}")
            if node.type != "f":
                raise UsageError(f"{show_path(p)}: is a {TYPE_NAMES.get(node.type, node.type)}, not a regular file, at {ref}")
            if node.size:
                yield from self.content.iter_blob(node.blob_id)

    def listing(self, ref: str, path: str | bytes = b"", recursive: bool = False) -> list[dict]:
        """Entries of a directory at REF (or the one entry, for a non-directory), as dicts.

        A directory's own entries come sorted by raw bytes; recursive=True lists
        everything below it in tree order (replay.tree_key, as export writes
        it).  iter_listing() gives the same rows as a stream."""
        return list(self.iter_listing(ref, path, recursive))

    def iter_listing(self, ref: str, path: str | bytes = b"", recursive: bool = False) -> Iterator[dict]:
        """listing() as an iterator.  Errors (no such path) are raised here, before
        the first row.  recursive=True streams the subtree in tree order from
        export.TreeEntries (a large image replays partition by partition), so
        memory stays flat however many files the image holds."""
        p = parse_path(path)
        if not recursive:
            with self.store.read():
                r = refs.resolve(self.store, ref)
                # The directory and its children only: the rest of the image is not replayed.
                kids = below(self.store, r.chain, p, children=True)
                view = View().replay(decided_events(self.store, [r.chain], [p], known=kids)[0])
            chain_ids = {li.position: li.chain_id for li in r.layers}
            node = view.get(p)
            if node is None:
                raise NotFound(f"{show_path(p)}: no such file or directory at {ref}")
            entries = [(p, node)] if node.type != "d" else view.list_dir(p)
            return iter([node_dict(q, n, chain_ids) for q, n in entries])
        return self.stream(self._tree_rows(ref, p))

    def _tree_rows(self, ref: str, top: bytes) -> Iterator[dict | None]:
        """None once REF and top are checked, then every entry below top (not top
        itself; a non-directory: that entry), in tree order, streamed.  One read
        transaction from the resolution to the last row."""
        from .export import TreeEntries, within

        with self.store.read():
            r = refs.resolve(self.store, ref)
            chain_ids = {li.position: li.chain_id for li in r.layers}
            if top:
                node = View().replay(self._closure_events(r, top)).get(top)
                if node is None:
                    raise NotFound(f"{show_path(top)}: no such file or directory at {ref}")
                if node.type != "d":
                    yield None
                    yield node_dict(top, node, chain_ids)
                    return
            yield None
            with TreeEntries(self.store, r.chain) as source:
                for q, n, _ in within(source.batches(), top):
                    yield node_dict(q, n, chain_ids)


    # Export -----------------------------------------------------------------

    # One read transaction around the replay and the reading of contents: a gc
    # committing in between must not take contents the view still names.

    def export_tar(self, ref: str, out: BinaryIO, progress: Callable[[int, int], None] | None = None) -> int:
        """The view at REF as a tar, in tree order (engine/export.py).  An image's
        view replays partition by partition when large: memory stays flat."""
        from .export import TreeEntries, write_tar

        with self.store.read():
            r = refs.resolve(self.store, ref)
            with TreeEntries(self.store, r.chain) as source:
                return write_tar(source.batches(), self.content, out, progress, source.total)

    def export_dir(self, ref: str, target: str, allow_devices: bool = False) -> int:
        """The view at REF into a new directory DIR, in tree order, replayed in
        partitions when large (as export_tar)."""
        from .export import TreeEntries, refuse_specials, write_dir_entries

        with self.store.read():
            r = refs.resolve(self.store, ref)
            if not allow_devices:
                refuse_specials(self.store, r.chain)
            with TreeEntries(self.store, r.chain) as source:
                return write_dir_entries(source.batches(), self.content, target)

    def layer_tar(self, diff_id: str) -> Iterator[bytes]:
        """The original tar of a stored diff, byte for byte, as a stream."""
        from .lossless import iter_layer_tar

        with self.store.read():
            rowid = self.store.scalar("SELECT id FROM diff WHERE diff_id = ?", (diff_id,))
            if rowid is None:
                raise NotFound(f"no stored diff {diff_id}")
            yield from iter_layer_tar(self.store.conn, self.content, rowid)

    # Audit ------------------------------------------------------------------

    def default_image(self) -> str:
        rows = self.store.execute("SELECT digest FROM image LIMIT 2").fetchall()
        if len(rows) == 1:
            return rows[0][0]
        if not rows:
            raise NotFound("the store holds no images (see `layerdb import`)")
        raise UsageError("the store holds several images: say which with --image")

    def log(self, path: str | bytes, image: str | None = None, all_images: bool = False,
            patch: bool = False) -> list[dict]:
        """Every change to `path` along the image's chain, oldest first.

        Deletions that do not name the path (a whiteout or replacement of an
        ancestor, an opaque directory above it) are reported with `via`.
        Each row's `version` numbers it in its image's timeline (1 = oldest).
        all_images: one timeline per image whose chain touches the path.
        patch: each row gets a git-style `patch` from the previous version.
        """
        p = parse_path(path)
        if not p:
            raise UsageError("log needs a path below /")
        if all_images and image:
            raise UsageError("give either --image or --all, not both")
        with self.store.read():
            if all_images:
                from . import audit

                rows = audit.log_all(self, p)
                if not rows:
                    raise NotFound(f"{show_path(p)}: no stored image ever held this path")
            else:
                r = refs.resolve(self.store, image or self.default_image())
                created_by = self.created_by(r)
                chain_ids = {li.position: li.chain_id for li in r.layers}
                events = self._closure_events(r, p)
                rows = _timeline(p, events, r, created_by, chain_ids)
                if not rows:
                    raise NotFound(f"{show_path(p)}: no event in the chain of {image or r.label()} ever touched this path")
                for i, row in enumerate(rows, 1):
                    row["version"] = i
            if patch:
                from . import audit

                audit.add_patches(self, p, rows)
        return rows

    # Save, verify, measure ------------------------------------------------------

    def save(self, images: list[str], out: BinaryIO, fmt: str = "docker") -> list[dict]:
        """Write images as one docker-save ("docker") or OCI layout ("oci") tar to out."""
        from .save import save

        with self.store.read():
            return save(self.store, self.content, images, out, fmt)

    def fsck(self, deep: bool = False):
        """A checker: iterate its findings(); its counts say what was checked."""
        from .fsck import Fsck

        return Fsck(self.store, self.content, deep)

    def stats(self) -> dict:
        from .stats import stats

        return stats(self.store, self.content)

    # Remove, reclaim ----------------------------------------------------------------

    def remove(self, names: list[str]):
        """Remove images (or single tags of images with several), all or none."""
        from .maint import remove

        return remove(self.store, names)

    def gc(self):
        """Delete what no image references, then shrink the file."""
        from .maint import collect

        return collect(self.store, self.chunks)

    # Containers (engine/container.py): every write is an event of the container's log ------

    def container(self, name: str, whole: bool | None = None):
        """A handle on a container (cached: its view is kept and caught up, not
        replayed per call).  whole=True keeps the whole view even for a large
        image (container.WHOLE_EVENTS), as a FUSE mount needs."""
        from .container import Container

        handles = self.__dict__.setdefault("_containers", {})
        h = Container(self.store, self.content, name, whole)
        return handles.setdefault((h.diff_rowid, h.whole), h)

    def container_create(self, image: str, name: str | None = None) -> dict:
        from . import container

        return container.create(self.store, image, name)

    def containers(self) -> list[dict]:
        from . import container

        return container.listing(self.store)

    def container_rm(self, name: str) -> dict:
        from . import container

        return container.remove(self.store, name)

    def container_diff(self, name: str) -> list[dict]:
        """`docker diff`: A/C/D from the container's image to the container."""
        from . import audit, container

        c = self.container(name)
        return container.docker_changes(audit.diff(self, c.image_digest, c.diff_id))

    def container_apply(self, name: str, directory: str) -> int:
        return self.container(name).apply_dir(directory)

    # The writes below are engine/container.Container's; see there for each one's keywords.

    def write_file(self, container: str, path, data, mode=None, uid=None, gid=None, **kw) -> bytes:
        """Create or replace a regular file from bytes, a file object or an iterable of bytes."""
        return self.container(container).write_file(path, data, mode, uid, gid, **kw)

    def append_file(self, container: str, path, data, **kw) -> bytes:
        return self.container(container).append_file(path, data, **kw)

    def mkdir(self, container: str, path, mode=0o755, uid=0, gid=0, **kw) -> bytes:
        return self.container(container).mkdir(path, mode, uid, gid, **kw)

    def symlink(self, container: str, path, target, **kw) -> bytes:
        return self.container(container).symlink(path, target, **kw)

    def link(self, container: str, path, target, **kw) -> bytes:
        return self.container(container).link(path, target, **kw)

    def remove_path(self, container: str, path, recursive=False, **kw) -> bytes:
        """rm (-r): a whiteout.  (`remove` is taken: it removes images.)"""
        return self.container(container).remove(path, recursive, **kw)

    def rename(self, container: str, src, dst, **kw) -> bytes:
        return self.container(container).rename(src, dst, **kw)

    def chmod(self, container: str, path, mode, **kw) -> bytes:
        return self.container(container).chmod(path, mode, **kw)

    def chown(self, container: str, path, uid=None, gid=None, **kw) -> bytes:
        return self.container(container).chown(path, uid, gid, **kw)

    def utime(self, container: str, path, mtime, **kw) -> bytes:
        return self.container(container).utime(path, mtime, **kw)

    def copy_in(self, source: str, container: str, dest, archive=False) -> bytes:
        return self.container(container).copy_in(source, dest, archive)

    def copy_out(self, container: str, path, target: str, allow_devices=False) -> str:
        return self.container(container).copy_out(path, target, allow_devices)

    def commit(self, container: str, tag: str | None, message: str | None = None, changes=()) -> dict:
        return self.container(container).commit(tag, message, changes)

    def mount(self, target: str, mountpoint: str, writable: bool) -> None:
        """Serve REF (read-only) or a container (writable) over FUSE until unmounted."""
        from . import fusefs

        fusefs.mount(self, target, mountpoint, writable)


def node_dict(path: bytes, node: Node, chain_ids: dict[int, str]) -> dict:
    d = {
        "path": show_path(path),
        "type": node.type,
        "mode": "%04o" % (node.mode or 0),
        "uid": node.uid,
        "gid": node.gid,
        "size": node.size if node.type == "f" else None,
        "mtime": node.mtime,
        "link": node.link.decode("utf-8", "surrogateescape") if node.link is not None else None,
        "sha256": node.sha256.hex() if node.sha256 else None,
        "layer_id": chain_ids.get(node.position),
    }
    if node.type in ("c", "b"):
        d["rdev"] = f"{node.devmajor},{node.devminor}"
    if node.xattrs:
        import json

        d["xattrs"] = json.loads(node.xattrs)
    return d


def _snapshot(node: Node | None):
    if node is None:
        return None
    return (node.type, node.mode, node.uid, node.gid, node.mtime, node.size, node.sha256, node.link,
            node.devmajor, node.devminor, node.xattrs)


def _timeline(p: bytes, events: list[Event], r: refs.Resolved, created_by, chain_ids) -> list[dict]:
    from .kinds import OPAQUE, PUT, WHITEOUT

    view = View()
    out = []
    label = r.label()
    i = 0
    while i < len(events):
        pos = events[i].position
        layer_events = []
        while i < len(events) and events[i].position == pos:
            layer_events.append(events[i])
            i += 1
        before = _snapshot(view.get(p))
        view.replay(layer_events)
        node = view.get(p)
        after = _snapshot(node)
        touched = any(ev.path == p and ev.kind == PUT for ev in layer_events)
        if before is None and after is None:
            continue
        if after is None:
            via = "whiteout"
            for ev in layer_events:
                if ev.kind == WHITEOUT and ev.path == p:
                    via = "whiteout"
                    break
                if ev.kind == OPAQUE and p.startswith(ev.path + b"/" if ev.path else b""):
                    via = "opaque"
                elif ev.kind == WHITEOUT and p.startswith(ev.path + b"/"):
                    via = "parent-whiteout"
                elif ev.kind == PUT and ev.type != "d" and p.startswith(ev.path + b"/"):
                    via = "parent-replaced"
            op = "delete"
        elif before is None:
            op, via = "add", None
        elif touched or before != after:
            op, via = "modify", None
        else:
            continue
        row = {
            "image": label,
            "position": pos,
            "layer_id": chain_ids.get(pos),
            "op": op,
            "via": via,
            "type": node.type if node else None,
            "mode": "%04o" % node.mode if node and node.mode is not None else None,
            "uid": node.uid if node else None,
            "gid": node.gid if node else None,
            "size": node.size if node and node.type == "f" else None,
            "sha256": node.sha256.hex() if node and node.sha256 else None,
            "link": node.link.decode("utf-8", "surrogateescape") if node and node.link is not None else None,
            "mtime": node.mtime if node else None,
            "created_by": created_by.get(pos),
        }
        out.append(row)
    return out
