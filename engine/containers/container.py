"""Containers: a writable layer on top of an image, whose writes are events.

A container is a row in `container` and a diff of its own (diff.container = 1)
whose events form a time-ordered log: every write appends PUT or WHITEOUT
events stamped with their time, in a short transaction of its own, so a crash
loses nothing that was acknowledged.  The container's view is the image's
chain plus that log, replayed by the one replay engine (engine/replay.py,
which replays a container's events in seq order).

Writes are copy-on-write by construction: a modified file is put again in
full (its unchanged chunks are shared by the content store), a removal is a
whiteout, and nothing below the container ever changes.  Hard links stay hard
links: a change to a file with several names puts it under one name and links
every other name to it again, so all names show the change, as on a real
file system.  As there too, creating, removing or renaming a name changes its
directory's mtime (a put of the directory, as overlayfs copies it up), so
`commit` writes the directory with its new time, as `buildah commit` does.

`commit` seals the net change between the image and the container into a
deterministic OCI layer tar (sorted entries, `.wh.NAME` whiteouts,
`.wh..wh..opq` for a directory that was removed and made again) and ingests it
through the importer like any layer, then stores a new image config.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shlex
import stat
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

from .. import refs
from ..content import ContentStore
from ..errors import NoSuchPath, NotFound, PathError, UsageError
from ..ingest.importer import PUT, WHITEOUT, DiffResult, Importer, chain_ids, now
from ..paths import ancestors, join, parent, show_path as show
from ..replay import EVENT_COLUMNS, EVENT_JOINS, Event, Node, View, below, chain_view, decided_events, event_count
from ..store import Store

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_SYMLINKS = 40  # as Linux: more links in one path is ELOOP
WH = b".wh."
OPQ = b".wh..wh..opq"
READ_SIZE = 1 << 20
TYPE_BITS = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK, "p": stat.S_IFIFO, "c": stat.S_IFCHR,
             "b": stat.S_IFBLK}
TYPE_OF_BITS = {v: k for k, v in TYPE_BITS.items()}
ALL_KINDS = "(0, 1, 2, 3, 4)"  # lets the (diff_id, kind, seq) key serve `seq > ?` one kind at a time
# Up to this many events in its chain, a container keeps its whole view and
# catches it up (the FUSE mount and API handles that write many times).  Above,
# it keeps a partial view: each operation loads the paths it reads (their
# deciding events, replay.decided_events), so a write into a container of a
# large image costs what the write touches, not the image (as export.WHOLE_EVENTS).
WHOLE_EVENTS = 32768

_INSERT = (
    "INSERT INTO event(diff_id, kind, seq, path_id, type, mode, uid, gid, mtime, size, blob_id, link, target_id,"
    " devmajor, devminor, xattrs, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def split(path: str | bytes) -> list[bytes]:
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    return [p for p in raw.split(b"/") if p and p != b"."]


def names_by_node(view: View) -> dict[int, list[bytes]]:
    """Every name of each file with more than one (hard links), sorted; keyed by id(node)."""
    by: dict[int, list[bytes]] = {}
    for p, n in view.nodes.items():
        if n.type != "d":
            by.setdefault(id(n), []).append(p)
    return {k: sorted(v) for k, v in by.items() if len(v) > 1}


# Lifecycle ----------------------------------------------------------------------


def create(store: Store, image: str, name: str | None = None) -> dict:
    """A new, empty container on top of an image."""
    hex_ = uuid.uuid4().hex
    with store.write():
        r = refs.resolve(store, image)
        top = None if r.image_rowid is None else store.one(
            "SELECT i.top_layer, l.chain_id FROM image i LEFT JOIN layer l ON l.id = i.top_layer WHERE i.id = ?",
            (r.image_rowid,))
        if r.container or top is None or r.chain_id != top[1]:
            raise UsageError(f"{image}: not an image; a container starts from a whole image (see `layerdb images`)")
        if name is None:
            base = (r.tags[0] if r.tags else r.image_digest[7:]).rsplit("/", 1)[-1].split(":")[0]
            name = f"{re.sub(r'[^A-Za-z0-9_.-]', '-', base)[:40]}-{hex_[:6]}"
        _check_name(store, name)
        diff = store.scalar(
            "INSERT INTO diff(diff_id, tar_size, file_bytes, entries, framing, imported, container)"
            " VALUES (?, 0, 0, 0, NULL, ?, 1) RETURNING id", (refs.CONTAINER_ID + hex_, now()))
        created = now()
        store.execute("INSERT INTO container(name, image_id, layer_id, diff_id, created) VALUES (?, ?, ?, ?, ?)",
                      (name, r.image_rowid, top[0], diff, created))
    return {"id": hex_, "name": name, "image": r.label(), "image_id": r.image_digest, "created": created}


def _check_name(store: Store, name: str) -> None:
    if not NAME_RE.match(name):
        raise UsageError(f"container name {name!r}: use letters, digits and _ . - (starting with a letter or digit)")
    if store.one("SELECT 1 FROM container WHERE name = ?", (name,)) is not None:
        raise UsageError(f"a container named {name!r} exists already")
    try:
        taken = refs.resolve(store, name) is not None
    except NotFound:
        taken = False
    if taken:
        raise UsageError(f"container name {name!r} already names an image or layer: choose another")


def listing(store: Store) -> list[dict]:
    out = []
    with store.read():
        for name, diff_id, rowid, image_rowid, digest, created, events, last in store.execute(
            """SELECT c.name, d.diff_id, d.id, i.id, i.digest, c.created,
                      (SELECT count(*) FROM event e WHERE e.diff_id = d.id),
                      (SELECT max(e.time) FROM event e WHERE e.diff_id = d.id)
               FROM container c JOIN diff d ON d.id = c.diff_id JOIN image i ON i.id = c.image_id
               ORDER BY c.created DESC, c.name"""
        ):
            tags = refs.image_tags(store, image_rowid)
            out.append({"id": diff_id[len(refs.CONTAINER_ID):], "name": name, "image": tags[0] if tags else digest,
                        "image_id": digest, "created": created, "events": events, "last_write": last})
    return out


def remove(store: Store, name: str) -> dict:
    """Drop a container and its log; the contents it wrote stay until `gc`."""
    with store.write():
        row = refs.find_container(store, name)
        if row is None:
            raise NotFound(f"no container matches {name!r} (see `layerdb container ls`)")
        cname, diff_rowid, diff_id = row[:3]
        events = store.scalar("SELECT count(*) FROM event WHERE diff_id = ?", (diff_rowid,))
        store.execute("DELETE FROM container WHERE diff_id = ?", (diff_rowid,))
        store.execute("DELETE FROM diff WHERE id = ?", (diff_rowid,))  # its events cascade
    return {"id": diff_id[len(refs.CONTAINER_ID):], "name": cname, "events": events}


def docker_changes(rows: list[dict]) -> list[dict]:
    """`diff` rows (image -> container) as `docker diff` reports them: a deleted
    subtree by its top path only, and every directory holding a change as C."""
    by_path = {r["path"]: r for r in rows}
    out = [r for r in rows if not (r["change"] == "D" and by_path.get(_str_parent(r["path"]), {}).get("change") == "D")]
    for r in list(out):
        p = _str_parent(r["path"])
        while p != "/" and p not in by_path:
            by_path[p] = {"path": p, "change": "C", "what": "metadata", "fields": [], "type": "d", "size": None,
                          "sha256": None}
            out.append(by_path[p])
            p = _str_parent(p)
    out.sort(key=lambda r: r["path"].encode("utf-8", "surrogateescape"))
    return out


def _str_parent(p: str) -> str:
    return p.rsplit("/", 1)[0] or "/"


# Writing ------------------------------------------------------------------------


class Container:
    """A handle on one container: its current view and the operations that write it.

    The view is the image's replay plus every event of the log up to last_seq;
    before each read or write, events that other processes appended are
    replayed too (the log is append-only, so catching up is exact).

    A container of a large image (more than WHOLE_EVENTS events) holds a
    partial view instead: the paths loaded so far, each with every event that
    decides it.  Reads go through _get/_children/_subtree, which load what is
    missing; appended events drop the partial view (the next read reloads).
    whole=True forces the whole view: a read-write mount binds inodes to Node
    objects, which a partial view replaces each time it loads.
    """

    def __init__(self, store: Store, content: ContentStore, name: str, whole: bool | None = None):
        self.store = store
        self.content = content
        with store.read():
            row = refs.find_container(store, name)
            if row is None:
                raise NotFound(f"no container matches {name!r} (see `layerdb container ls`)")
            self.name, self.diff_rowid, self.diff_id, self.image_rowid, self.image_digest, top = row
            self.base = refs.chain_of(store, top) if top is not None else []
            if whole is None:
                whole = event_count(store, (d for _, d in self.base_chain)) <= WHOLE_EVENTS
        self.whole = whole
        self.position = len(self.base) + 1
        self._view: View | None = None
        self.last_seq = -1
        self.version = 0  # bumped whenever the view changes
        # The partial view's bookkeeping (whole=False): paths decided, paths
        # enumerated below directories (id by path), directories whose
        # children or whole subtree are in.
        self._loaded: set[bytes] = set()
        self._known: dict[bytes, int] = {}
        self._listed: set[bytes] = set()
        self._subtrees: set[bytes] = set()

    @property
    def id(self) -> str:
        return self.diff_id[len(refs.CONTAINER_ID):]

    @property
    def base_chain(self) -> list[tuple[int, int]]:
        return [(li.position, li.diff_rowid) for li in self.base]

    @property
    def view(self) -> View:
        """The whole view, brought up to date first (a partial handle turns whole)."""
        self.refresh()
        self._load(subtrees=[b""])
        return self.current

    def get(self, path: str | bytes) -> Node | None:
        """The node at a path now (no symlink followed), loading only what decides it."""
        self.refresh()
        return self._get(b"/".join(split(path)))

    @property
    def current(self) -> View:
        """The view as last refreshed (no query: for callers that refresh on their own schedule)."""
        if self._view is None:
            self.refresh()
            if self._view is None:  # a partial view loads on first use
                self._load()
        assert self._view is not None
        return self._view

    @property
    def chain(self) -> list[tuple[int, int]]:
        """The image's chain and the container's log on top."""
        return self.base_chain + [(self.position, self.diff_rowid)]

    def refresh(self) -> None:
        """Replay what the log gained since we last looked."""
        if not self.whole:
            self._refresh_partial()
            return
        with self.store.read():
            if self._view is None:
                self._view = chain_view(self.store.conn, self.base_chain)
            new = self.store.execute(
                f"SELECT {EVENT_COLUMNS} FROM event e {EVENT_JOINS}"
                f" WHERE e.diff_id = ? AND e.kind IN {ALL_KINDS} AND e.seq > ? ORDER BY e.seq",
                (self.diff_rowid, self.last_seq)).fetchall()
        for r in new:
            ev = Event(self.position, *r)
            self._view.apply(ev)
            self.last_seq = ev.seq
        if new:
            self.version += 1

    # The partial view -----------------------------------------------------------

    def _refresh_partial(self) -> None:
        with self.store.read():
            top = self.store.scalar(f"SELECT max(seq) FROM event WHERE diff_id = ? AND kind IN {ALL_KINDS}",
                                    (self.diff_rowid,))
        top = -1 if top is None else top
        if self._view is not None and top == self.last_seq:
            return
        # Events were appended: what was loaded may have changed.  Start empty;
        # reads load again what they need (a few queries per path).
        self._view = None
        self._loaded = {b""}
        self._known.clear()
        self._listed.clear()
        self._subtrees.clear()
        self.last_seq = top
        self.version += 1

    def _covered(self, d: bytes) -> bool:
        return d in self._subtrees or any(a in self._subtrees for a in ancestors(d))

    def _load(self, paths: Iterable[bytes] = (), children: Iterable[bytes] = (),
              subtrees: Iterable[bytes] = ()) -> None:
        """Make the partial view decide these paths, list these directories'
        children, hold these subtrees; replays again only when something is new.
        The root's subtree is the whole view: the handle turns whole."""
        if self.whole:
            return
        new = False
        with self.store.read():
            chain = self.chain
            subtrees, children = list(subtrees), list(children)
            paths = [*paths, *subtrees, *children]  # a listed directory is decided itself too
            for d in subtrees:
                if not d:
                    self.whole, self._view, self.last_seq = True, None, -1
                    self.refresh()
                    return
                if not self._covered(d):
                    self._known.update((p, i) for i, p in below(self.store, chain, d))
                    self._subtrees.add(d)
                    new = True
            for d in children:
                if d not in self._listed and not self._covered(d):
                    self._known.update((p, i) for i, p in below(self.store, chain, d, children=True))
                    self._listed.add(d)
                    new = True
            for p in paths:
                if p not in self._loaded and p not in self._known:
                    self._loaded.add(p)
                    new = True
            if not new and self._view is not None:
                return
            events = decided_events(self.store, [chain], sorted(self._loaded),
                                    known=[(i, p) for p, i in self._known.items()])[0]
        self._view = View().replay(events)
        for p in list(self._loaded):  # their ancestors were decided with them
            while p and (p := parent(p)) not in self._loaded:
                self._loaded.add(p)

    def _get(self, p: bytes) -> Node | None:
        if not self.whole and p not in self._loaded and p not in self._known:
            self._load([p])
        return self.current.get(p)

    def _children(self, d: bytes) -> set[bytes]:
        """The names directly below d (full paths)."""
        self._load(children=[d])
        return self.current.children.get(d, set())

    def _subtree(self, d: bytes) -> list[tuple[bytes, Node]]:
        """Every entry below d, sorted by raw bytes."""
        self._load(subtrees=[d])
        return list(self.current.walk(d))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[list[Event]]:
        """One short write transaction: yields the list to append events to.

        The view is brought up to date inside the transaction, so the checks
        an operation makes against it hold when its events commit.
        """
        events: list[Event] = []
        self.content.reset()  # another process may have allocated blob ids since our last write
        try:
            with self.store.write():
                # Blob rows of a pack are written at flush, after the events naming them.
                self.store.execute("PRAGMA defer_foreign_keys = ON")
                if self.store.one("SELECT 1 FROM container WHERE diff_id = ?", (self.diff_rowid,)) is None:
                    raise NotFound(f"container {self.name} was removed")
                self.refresh()
                yield events
                t = time.time()
                rows = []
                for i, ev in enumerate(events, start=self.last_seq + 1):
                    rows.append((self.diff_rowid, ev.kind, i, self.store.intern_path(ev.path), ev.type, ev.mode,
                                 ev.uid, ev.gid, ev.mtime, ev.size, ev.blob_id, ev.link,
                                 None if ev.target is None else self.store.intern_path(ev.target),
                                 ev.devmajor, ev.devminor, ev.xattrs, t))
                self.store.conn.executemany(_INSERT, rows)
                self.content.flush()
        except BaseException:
            self.content.reset()
            raise
        self.refresh()

    # Paths ----------------------------------------------------------------------

    def walk(self, path: str | bytes, follow: bool) -> tuple[bytes, Node | None]:
        """Resolve a path inside the container, as the kernel would in a chroot:
        symlinks in every parent component are followed (absolute ones from the
        container's root, `..` stops at the root), the last one only if follow.
        Returns the canonical path and its node (None when only the last
        component is missing)."""
        parts = split(path)
        if not self.whole and b".." not in parts:  # the usual path: one load for every component
            self._load([b"/".join(parts[:i]) for i in range(1, len(parts) + 1)])
        todo = list(reversed(parts))
        out: list[bytes] = []
        links = 0
        while todo:
            name = todo.pop()
            if name == b"..":
                if out:
                    out.pop()
                continue
            cand = b"/".join(out + [name])
            node = self._get(cand)
            if node is not None and node.type == "l" and (todo or follow):
                links += 1
                if links > MAX_SYMLINKS:
                    raise PathError(errno.ELOOP, cand)
                target = node.link or b""
                if target.startswith(b"/"):
                    out = []
                todo.extend(reversed(split(target)))
                continue
            if todo:
                if node is None:
                    raise NoSuchPath(cand)
                if node.type != "d":
                    raise PathError(errno.ENOTDIR, cand)
            out.append(name)
        p = b"/".join(out)
        return p, self._get(p)

    def _existing(self, path: str | bytes, follow: bool) -> tuple[bytes, Node]:
        p, node = self.walk(path, follow)
        if node is None:
            raise NoSuchPath(p)
        return p, node

    def _new(self, path: str | bytes) -> bytes:
        """The canonical path of an entry to create; it must not exist yet."""
        p, node = self.walk(path, follow=False)
        if not p:
            raise PathError(errno.EEXIST, p)
        if node is not None:
            raise PathError(errno.EEXIST, p)
        return p

    # Event builders ---------------------------------------------------------

    def _put(self, path: bytes, node: Node, **changes) -> Event:
        ev = Event(self.position, PUT, 0, path, node.type, node.mode, node.uid, node.gid, node.mtime, node.size,
                   node.blob_id, node.sha256, node.link, None, node.devmajor, node.devminor, node.xattrs)
        for k, v in changes.items():
            setattr(ev, k, v)
        return ev

    def _relinks(self, node: Node, path: bytes, ev: Event) -> list[Event]:
        """Every other name of a changed file, linked again to its new version."""
        if node.type == "d":
            return []
        out = []
        for q, n in self.current.nodes.items():  # a partial view holds every name of a loaded file
            if n is node and q != path:
                out.append(Event(self.position, PUT, 0, q, "h", ev.mode, ev.uid, ev.gid, ev.mtime, None, None, None,
                                 None, path, None, None, None))
        out.sort(key=lambda e: e.path)
        return out

    def _store(self, data: bytes | BinaryIO | Iterable[bytes]) -> tuple[int, int]:
        """Stream data into the content store: (blob id, size)."""
        w = self.content.writer()
        if isinstance(data, (bytes, bytearray, memoryview)):
            w.write(bytes(data))
        elif hasattr(data, "read"):
            while True:
                b = data.read(READ_SIZE)  # type: ignore[union-attr]
                if not b:
                    break
                w.write(b)
        else:
            for b in data:
                w.write(b)
        size = w.size
        return w.close(), size

    # Operations ---------------------------------------------------------------

    def write_file(self, path: str | bytes, data: bytes | BinaryIO | Iterable[bytes], mode: int | None = None,
                   uid: int | None = None, gid: int | None = None, mtime: int | None = None,
                   follow: bool = True, append: bool = False) -> bytes:
        """Create or replace a regular file (open(2) with O_CREAT: a symlink as the
        last component is followed).  Replacing keeps the file's mode, owner and
        other names unless given; append adds data after the current contents.
        mtime is the time of the write (default now): the file's mtime, and its
        directory's when the file is new."""
        mt = int(time.time()) if mtime is None else mtime
        with self._writing() as evs:
            p, old = self.walk(path, follow)
            if not p or (old is not None and old.type == "d"):
                raise PathError(errno.EISDIR, p)
            keep = old if old is not None and old.type == "f" else None
            if append and keep is not None and keep.size:
                data = _chain(self.content.iter_blob(keep.blob_id), data)
            blob_id, size = self._store(data)
            dmode, duid, dgid, xattrs = (keep.mode, keep.uid, keep.gid, keep.xattrs) if keep else (0o644, 0, 0, None)
            ev = Event(self.position, PUT, 0, p, "f", (dmode if mode is None else mode) & 0o7777,
                       duid if uid is None else uid, dgid if gid is None else gid, mt, size, blob_id, None, None,
                       None, None, None, xattrs)
            evs.append(ev)
            if keep is not None:
                evs.extend(self._relinks(keep, p, ev))
            if old is None:
                self._touch_dirs(evs, [parent(p)], mt)
        return p

    def append_file(self, path: str | bytes, data: bytes | BinaryIO | Iterable[bytes], **kw) -> bytes:
        return self.write_file(path, data, append=True, **kw)

    def mkdir(self, path: str | bytes, mode: int = 0o755, uid: int = 0, gid: int = 0, mtime: int | None = None,
              parents: bool = False) -> bytes:
        mt = int(time.time()) if mtime is None else mtime
        with self._writing() as evs:
            if not parents:
                p = self._new(path)
                evs.append(self._dir_event(p, mode, uid, gid, mt))
                self._touch_dirs(evs, [parent(p)], mt)
                return p
            parts = split(path)
            for i in range(1, len(parts) + 1):
                p, node = self.walk(b"/".join(parts[:i]), follow=True)
                if node is None:
                    if b".." in parts[i:]:
                        raise NoSuchPath(p)
                    for q in [p] + [join(p, b"/".join(parts[i:j])) for j in range(i + 1, len(parts) + 1)]:
                        evs.append(self._dir_event(q, mode, uid, gid, mt))
                    self._touch_dirs(evs, [parent(p)], mt)
                    return q
                if node.type != "d":
                    raise PathError(errno.ENOTDIR if i < len(parts) else errno.EEXIST, p)
            return p

    def _dir_event(self, p: bytes, mode: int, uid: int, gid: int, mtime: int) -> Event:
        return Event(self.position, PUT, 0, p, "d", mode & 0o7777, uid, gid, mtime, None, None, None, None, None,
                     None, None, None)

    def symlink(self, path: str | bytes, target: str | bytes, uid: int = 0, gid: int = 0,
                mtime: int | None = None) -> bytes:
        link = target if isinstance(target, bytes) else os.fsencode(target)
        if not link:
            raise PathError(errno.ENOENT, b"", "a symlink needs a target")
        mt = int(time.time()) if mtime is None else mtime
        with self._writing() as evs:
            p = self._new(path)
            evs.append(Event(self.position, PUT, 0, p, "l", 0o777, uid, gid, mt, None, None, None, link, None, None,
                             None, None))
            self._touch_dirs(evs, [parent(p)], mt)
        return p

    def link(self, path: str | bytes, target: str | bytes, mtime: int | None = None) -> bytes:
        """A hard link: `path` becomes another name of the file `target` names (the file
        keeps its mtime; `path`'s directory gets mtime, default now)."""
        mt = int(time.time()) if mtime is None else mtime
        with self._writing() as evs:
            tp, tnode = self._existing(target, follow=False)
            if tnode.type == "d":
                raise PathError(errno.EPERM, tp, "hard links to directories are not allowed")
            p = self._new(path)
            evs.append(Event(self.position, PUT, 0, p, "h", tnode.mode, tnode.uid, tnode.gid, tnode.mtime, None,
                             None, None, None, tp, None, None, None))
            self._touch_dirs(evs, [parent(p)], mt)
        return p

    def mknod(self, path: str | bytes, type_: str, mode: int = 0o644, rdev: tuple[int, int] = (0, 0),
              uid: int = 0, gid: int = 0, mtime: int | None = None) -> bytes:
        if type_ not in ("p", "c", "b"):
            raise UsageError(f"mknod: type {type_!r} is not p, c or b")
        dev = type_ in ("c", "b")
        mt = int(time.time()) if mtime is None else mtime
        with self._writing() as evs:
            p = self._new(path)
            evs.append(Event(self.position, PUT, 0, p, type_, mode & 0o7777, uid, gid, mt, None, None, None, None,
                             None, rdev[0] if dev else None, rdev[1] if dev else None, None))
            self._touch_dirs(evs, [parent(p)], mt)
        return p

    def remove(self, path: str | bytes, recursive: bool = False, want_dir: bool | None = None,
               mtime: int | None = None) -> bytes:
        """Remove a path (a whiteout); a non-empty directory only when recursive (rm -r).
        want_dir: True to act as rmdir(2), False as unlink(2).  mtime: the time of the
        removal (default now), the whiteout's and the directory's new mtime."""
        mt = int(time.time()) if mtime is None else mtime
        with self._writing() as evs:
            p, node = self._existing(path, follow=False)
            if not p:
                raise PathError(errno.EBUSY, p, "cannot remove the root")
            if want_dir is True and node.type != "d":
                raise PathError(errno.ENOTDIR, p)
            if want_dir is False and node.type == "d":
                raise PathError(errno.EISDIR, p)
            if node.type == "d" and not recursive and self._children(p):
                raise PathError(errno.ENOTEMPTY, p)
            evs.append(self._whiteout(p, mt))
            self._touch_dirs(evs, [parent(p)], mt)
        return p

    def _whiteout(self, p: bytes, mtime: int) -> Event:
        return Event(self.position, WHITEOUT, 0, p, None, None, None, None, mtime, None, None, None, None, None,
                     None, None, None)

    def _touch_dirs(self, evs: list[Event], dirs: Iterable[bytes], mtime: int | dict[bytes, int]) -> None:
        """Give directories whose entries this write changed (a name created, removed
        or renamed in them) the write's time as their mtime, as a file system does:
        a put of each directory with its attributes and the new mtime.  mtime is one
        time for all, or a time per directory.  Directories this write puts itself
        (new ones, or ones from a host tree) keep the mtime their put gives them;
        one whose mtime is that time already needs no event."""
        put = {e.path for e in evs if e.kind == PUT}
        for d in sorted(set(dirs)):
            node = self._get(d)
            t = mtime if isinstance(mtime, int) else mtime.get(d)
            if d in put or node is None or node.type != "d" or t is None or node.mtime == t:
                continue
            evs.append(self._put(d, node, mtime=t))

    def rename(self, src: str | bytes, dst: str | bytes, noreplace: bool = False, mtime: int | None = None) -> bytes:
        """rename(2): the moved entries keep their identity and their mtimes (files are
        linked to their new names before the old names go); the directories the
        name leaves and enters get mtime (default now)."""
        mt = int(time.time()) if mtime is None else mtime
        with self._writing() as evs:
            sp, snode = self._existing(src, follow=False)
            dp, dnode = self.walk(dst, follow=False)
            if not sp or not dp:
                raise PathError(errno.EBUSY, sp or dp)
            if not self.whole:  # load all that follows first: nodes must come from one replay
                self._load(subtrees=[sp] if snode.type == "d" else [],
                           children=[dp] if dnode is not None and dnode.type == "d" else [])
                snode, dnode = self._get(sp), self._get(dp)
            if dnode is snode:
                return dp  # the same file (or two names of it): nothing to do, as POSIX says
            if dp.startswith(sp + b"/"):
                raise PathError(errno.EINVAL, dp, f"cannot move {show(sp)} into itself")
            if dnode is not None:
                if noreplace:
                    raise PathError(errno.EEXIST, dp)
                if snode.type == "d" and dnode.type != "d":
                    raise PathError(errno.ENOTDIR, dp)
                if snode.type != "d" and dnode.type == "d":
                    raise PathError(errno.EISDIR, dp)
                if dnode.type == "d" and self._children(dp):
                    raise PathError(errno.ENOTEMPTY, dp)
                evs.append(self._whiteout(dp, mt))
            moved = [(sp, snode)] + (self._subtree(sp) if snode.type == "d" else [])
            for q, n in moved:
                nq = dp + q[len(sp):]
                if n.type == "d":
                    evs.append(self._put(nq, n))
                else:
                    evs.append(Event(self.position, PUT, 0, nq, "h", n.mode, n.uid, n.gid, n.mtime, None, None,
                                     None, None, q, None, None, None))
            evs.append(self._whiteout(sp, mt))
            self._touch_dirs(evs, [parent(sp), parent(dp)], mt)
        return dp

    def setattr(self, path: str | bytes, mode: int | None = None, uid: int | None = None, gid: int | None = None,
                mtime: int | None = None, xattrs: dict[str, bytes] | None = None, follow: bool = True) -> bytes:
        """chmod, chown, touch -m and xattr changes, as one put."""
        with self._writing() as evs:
            p, node = self._existing(path, follow)
            changes: dict = {}
            if mode is not None and node.type != "l":
                changes["mode"] = mode & 0o7777
            if uid is not None:
                changes["uid"] = uid
            if gid is not None:
                changes["gid"] = gid
            if mtime is not None:
                changes["mtime"] = mtime
            if xattrs is not None:
                changes["xattrs"] = json.dumps({k: v.hex() for k, v in sorted(xattrs.items())}) if xattrs else None
            if not changes:
                return p
            ev = self._put(p, node, **changes)
            evs.append(ev)
            evs.extend(self._relinks(node, p, ev))
        return p

    def chmod(self, path: str | bytes, mode: int, follow: bool = True) -> bytes:
        return self.setattr(path, mode=mode, follow=follow)

    def chown(self, path: str | bytes, uid: int | None = None, gid: int | None = None, follow: bool = True) -> bytes:
        return self.setattr(path, uid=uid, gid=gid, follow=follow)

    def utime(self, path: str | bytes, mtime: int, follow: bool = True) -> bytes:
        return self.setattr(path, mtime=mtime, follow=follow)

    # Host directories -------------------------------------------------------------

    def apply_dir(self, directory: str) -> int:
        """Record the difference between the view and a host directory (which
        stands for the whole container): whiteouts for what it lacks, puts for
        what it adds or changes; a directory in which that creates or removes a
        name gets the host directory's mtime.  One transaction; returns the
        events written."""
        host = _scan_host(directory)
        times = {rel: h.mtime for rel, h in host.items() if h.type == "d"}
        times[b""] = int(os.stat(directory).st_mtime)
        removed_at = int(time.time())
        with self._writing() as evs:
            self._load(subtrees=[b""])  # the host tree stands for all of it: the whole view
            view = self.current
            gone: set[bytes] = set()
            for p, node in view.walk():  # parents first: a removed subtree is one whiteout
                h = host.get(p)
                if (h is None or h.type != node.type) and not any(a in gone for a in ancestors(p)):
                    gone.add(p)
                    evs.append(self._whiteout(p, removed_at))

            def current(p: bytes) -> Node | None:
                return None if p in gone or any(a in gone for a in ancestors(p)) else view.get(p)

            self._host_puts(evs, directory, host, b"", current)
            self._touch_dirs(evs, _dirs_changed_by(evs, current), times)
        return len(evs)

    def copy_in(self, source: str, dest: str | bytes, archive: bool = False) -> bytes:
        """`docker cp SOURCE CONTAINER:DEST`: a file or a directory tree, merged
        into what is there (an existing directory DEST receives SOURCE by name).
        Entries are owned by root unless archive (-a) keeps the host's owners.
        Entries keep the host's mtimes, as tar extraction does (a directory of the
        tree that gains a name too); the directory receiving a new SOURCE gets now."""
        src = os.path.abspath(source)
        try:
            st = os.lstat(src)
        except OSError as e:
            raise UsageError(f"{source}: {e.strerror}") from None
        with self._writing() as evs:
            p, node = self.walk(dest, follow=True)
            if node is not None and node.type == "d":
                p = join(p, os.fsencode(os.path.basename(src.rstrip("/"))))
                node = self._get(p)
            if not p:
                raise PathError(errno.EISDIR, p)
            if stat.S_ISDIR(st.st_mode):
                if node is not None and node.type != "d":
                    raise PathError(errno.ENOTDIR, p, "cannot copy a directory over a non-directory")
                host = _scan_host(src)
                host[b""] = _HostEntry.of(st, src)
            else:
                if node is not None and node.type == "d":
                    raise PathError(errno.EISDIR, p)
                host = {b"": _HostEntry.of(st, src)}
            if not archive:
                for h in host.values():
                    h.uid = h.gid = 0
            self._load([join(p, rel) for rel in host])  # every path the copy compares with
            view = self.current
            self._host_puts(evs, src, host, p, lambda q: view.get(q))
            times = {join(p, rel): h.mtime for rel, h in host.items() if h.type == "d"}
            times[parent(p)] = int(time.time())
            self._touch_dirs(evs, _dirs_changed_by(evs, view.get), times)
        return p

    def _host_puts(self, evs: list[Event], root: str, host: dict[bytes, "_HostEntry"], at: bytes, current) -> None:
        """Puts that make the view show `host` (relative paths -> entries) at `at`,
        skipping entries that match already; hard-linked host files stay linked
        (the first name is put, the others are linked to it)."""
        host_links: dict[tuple[int, int], list[bytes]] = {}
        for rel, h in host.items():
            if h.type != "d" and h.nlink > 1:
                host_links.setdefault(h.inode, []).append(rel)
        view_links = names_by_node(self.current)
        reput: set[bytes] = set()
        for rel in sorted(host):
            h = host[rel]
            p = join(at, rel)
            node = current(p)
            names = sorted(host_links.get(h.inode, [rel])) if h.type != "d" else [rel]
            if rel != names[0]:
                first = join(at, names[0])
                if first in reput or node is None or node is not current(first):
                    evs.append(Event(self.position, PUT, 0, p, "h", h.mode, h.uid, h.gid, h.mtime, None, None,
                                     None, None, first, None, None, None))
                continue
            full = os.path.join(root, os.fsdecode(rel)) if rel else root
            want = [join(at, n) for n in names] if len(names) > 1 else None
            if node is not None and view_links.get(id(node)) == want and _matches(h, node, full):
                continue
            blob_id = size = None
            if h.type == "f":
                with open(full, "rb") as f:
                    blob_id, size = self._store(f)
            reput.add(p)
            evs.append(Event(self.position, PUT, 0, p, h.type, h.mode, h.uid, h.gid, h.mtime, size, blob_id, None,
                             h.link, None, h.major, h.minor, h.xattrs))

    # Reading out ------------------------------------------------------------------

    def copy_out(self, path: str | bytes, target: str, allow_devices: bool = False) -> str:
        """`docker cp CONTAINER:PATH TARGET`: a file, a symlink, or a directory tree
        (holding fifos or device files only with allow_devices, as `export --dir`)."""
        from ..tree import TreeEntries, subtree_batches
        from ..output.export import refuse_specials, write_dir, write_dir_entries

        self.refresh()
        p, node = self._existing(path, follow=False)
        dest = target
        if p and os.path.isdir(target) and not os.path.islink(target):
            dest = os.path.join(target, os.fsdecode(p.rsplit(b"/", 1)[-1]))
        if node.type == "d":
            with self.store.read():
                if self.whole or len(below(self.store, self.chain, p, limit=WHOLE_EVENTS + 1)) <= WHOLE_EVENTS:
                    write_dir(subview(self._subtree(p), p), self.content, dest, allow_devices)
                    return dest
                # A large subtree streams from the container's whole view in tree order,
                # partition by partition (as export --dir): memory stays flat.
                if not allow_devices:
                    refuse_specials(self.store, self.chain, p)
                with TreeEntries(self.store, self.chain, temp="layerdb_copy") as source:
                    write_dir_entries(subtree_batches(source, p), self.content, dest)
            return dest
        if node.type == "l":
            os.symlink(node.link or b"", dest)
        elif node.type == "f":
            with self.store.read(), open(dest, "wb") as f:
                if node.size:
                    for chunk in self.content.iter_blob(node.blob_id):
                        f.write(chunk)
            os.chmod(dest, node.mode or 0)
        else:
            raise UsageError(f"{show(p)}: cannot copy a {node.type!r} file out")
        mt = node.mtime or 0
        os.utime(dest, (mt, mt), follow_symlinks=False)
        return dest

    # Commit -----------------------------------------------------------------------

    def commit(self, tag: str | None, message: str | None = None, changes: Iterable[str] = ()) -> dict:
        """Seal the container's net changes into a new layer and image (tagged `tag`)."""
        with self.store.read():
            self.refresh()
            lower, upper = self._changed_views()
            wipe_time = self._whiteouts()
            base_config = self.store.scalar("SELECT config FROM image WHERE id = ?", (self.image_rowid,))
        cfg = json.loads(base_config)
        apply_changes(cfg.setdefault("config", {}), changes)
        entries = plan_layer(lower, upper, wipe_time)
        with tempfile.TemporaryFile(prefix="layerdb-commit-") as f:
            diff_id, n = write_layer(entries, self.content, self.store, f)
            f.seek(0)
            created = now()
            rootfs = cfg.get("rootfs") if isinstance(cfg.get("rootfs"), dict) else {}
            base_ids = [li.diff_id for li in self.base]
            cfg["rootfs"] = {**rootfs, "type": "layers", "diff_ids": base_ids + [diff_id]}
            hist = {"created": created, "created_by": "layerdb commit"}
            if message:
                hist["comment"] = message
            cfg["history"] = list(cfg.get("history") or []) + [hist]
            cfg["created"] = created
            config = json.dumps(cfg, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            digest = "sha256:" + hashlib.sha256(config).hexdigest()
            self.content.reset()
            imp = Importer(self.store, self.content)
            try:
                with self.store.write():
                    self.store.execute("PRAGMA defer_foreign_keys = ON")
                    d = imp.ingest_tar(f, diff_id, f"the layer of {self.name}")
                    base = [DiffResult(li.diff_rowid, li.diff_id, new=False) for li in self.base]
                    img = imp.store_image(digest, config, cfg, base + [d], [tag] if tag else [])
                    self.content.flush()
            except BaseException:
                self.content.reset()
                raise
        return {**img, "diff_id": diff_id, "layer_id": chain_ids(base_ids + [diff_id])[-1], "entries": n,
                "container": self.name}

    def _changed_views(self) -> tuple[View, View]:
        """The image's view and the container's, each replayed only for the paths
        the log names (with their ancestors and hard-link partners): a path
        that no event of the log names is the same in both, so it cannot be in
        the layer, and the views hold what the container changed, not the image."""
        named: set[bytes] = set()
        for path, target in self.store.execute(
                "SELECT p.path, t.path FROM event e JOIN path p ON p.id = e.path_id"
                " LEFT JOIN path t ON t.id = e.target_id WHERE e.diff_id = ?", (self.diff_rowid,)):
            named.add(path)
            if target is not None:
                named.add(target)
        # One closure for both chains: both views decide the same paths.
        lower, upper = decided_events(self.store, [self.base_chain, self.chain], named)
        return View().replay(lower), View().replay(upper)

    def _whiteouts(self) -> dict[bytes, int]:
        """Every path the log removed, with the time of its last removal."""
        return dict(self.store.execute(
            "SELECT p.path, e.mtime FROM event e JOIN path p ON p.id = e.path_id"
            " WHERE e.diff_id = ? AND e.kind = ? ORDER BY e.seq", (self.diff_rowid, WHITEOUT)).fetchall())


def _dirs_changed_by(evs: list[Event], current) -> set[bytes]:
    """The directories in which events create or remove a name (current: the
    node a path had before them)."""
    return {parent(e.path) for e in evs if e.path and (e.kind == WHITEOUT or current(e.path) is None)}


def _chain(pieces: Iterator[bytes], data: bytes | BinaryIO | Iterable[bytes]) -> Iterator[bytes]:
    yield from pieces
    if isinstance(data, (bytes, bytearray, memoryview)):
        yield bytes(data)
    elif hasattr(data, "read"):
        while b := data.read(READ_SIZE):  # type: ignore[union-attr]
            yield b
    else:
        yield from data


def subview(entries: list[tuple[bytes, Node]], top: bytes) -> View:
    """The subtree at `top` (its entries, as View.walk gives them) as a view of
    its own (hard links inside it stay shared)."""
    sub = View()
    cut = len(top) + 1 if top else 0
    for p, n in entries:
        rel = p[cut:]
        sub.nodes[rel] = n
        if n.type == "d":
            sub.children.setdefault(rel, set())
        sub.children.setdefault(parent(rel), set()).add(rel)
    return sub


# Host files -------------------------------------------------------------------------

IGNORED_XATTRS = {"security.selinux"}  # set by the host, not part of the tree (as tree_manifest.py)


@dataclass
class _HostEntry:
    type: str
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int | None
    link: bytes | None
    major: int | None
    minor: int | None
    xattrs: str | None
    nlink: int
    inode: tuple[int, int]

    @classmethod
    def of(cls, st: os.stat_result, full: str | bytes) -> "_HostEntry":
        m = st.st_mode
        t = TYPE_OF_BITS.get(stat.S_IFMT(m))
        if t is None:
            raise UsageError(f"{os.fsdecode(full)}: sockets cannot be part of an image")
        dev = t in ("c", "b")
        return cls(t, 0o777 if t == "l" else stat.S_IMODE(m), st.st_uid, st.st_gid, int(st.st_mtime),
                   st.st_size if t == "f" else None, os.readlink(os.fsencode(full)) if t == "l" else None,
                   os.major(st.st_rdev) if dev else None, os.minor(st.st_rdev) if dev else None,
                   _host_xattrs(full), st.st_nlink, (st.st_dev, st.st_ino))


def _host_xattrs(full: str | bytes) -> str | None:
    try:
        names = os.listxattr(full, follow_symlinks=False)
    except OSError:
        return None
    out = {}
    for n in sorted(names):
        if n in IGNORED_XATTRS:
            continue
        try:
            out[n] = os.getxattr(full, n, follow_symlinks=False).hex()
        except OSError:
            continue
    return json.dumps(out) if out else None


def _scan_host(directory: str) -> dict[bytes, _HostEntry]:
    """Every entry below a host directory (not following symlinks), by relative path."""
    root = os.fsencode(os.path.abspath(directory))
    if not os.path.isdir(root):
        raise UsageError(f"{directory}: not a directory")
    out: dict[bytes, _HostEntry] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for e in it:
                r = join(rel, e.name)
                full = os.path.join(root, r)
                h = _HostEntry.of(os.lstat(full), full)
                out[r] = h
                if h.type == "d":
                    stack.append(r)
    return out


def _matches(h: _HostEntry, node: Node, full: str | bytes) -> bool:
    """Whether a view node shows what the host entry is (directory mtimes aside,
    as in audit.state), hashing the host file only when everything else agrees."""
    if h.type != node.type or h.uid != node.uid or h.gid != node.gid or (h.xattrs or None) != (node.xattrs or None):
        return False
    if h.type == "l":
        return h.link == node.link and h.mtime == node.mtime
    if h.mode != node.mode:
        return False
    if h.type in ("c", "b"):
        return (h.major, h.minor) == (node.devmajor, node.devminor)
    if h.type != "f":
        return True
    if h.size != node.size or h.mtime != node.mtime:
        return False
    sha = hashlib.sha256()
    with open(full, "rb") as f:
        while b := f.read(READ_SIZE):
            sha.update(b)
    return sha.digest() == node.sha256


# Commit: the layer tar ----------------------------------------------------------------


@dataclass
class Entry:
    name: bytes  # the tar member name (a path, or a .wh. marker)
    node: Node | None  # None for whiteout and opaque markers
    link: bytes | None = None  # a hard link to this earlier name
    mtime: int = 0  # for markers


def plan_layer(lower: View, upper: View, removed: dict[bytes, int]) -> list[Entry]:
    """The entries of the layer that turns `lower` into `upper`, sorted by name.

    removed: the paths the container's log whited out, with the time of it.
    Per OCI: a path is put when it is new or changed, or when nothing lower
    can show through its parent; a directory that the log removed (itself or
    an ancestor) and that exists again gets `.wh..wh..opq`; a lower path the
    upper view lacks gets `.wh.NAME` in its nearest surviving directory.
    Every parent of an entry is in the tar too, and all names of a hard-linked
    file go together (the first as the file, the others as links to it).
    """
    from ..audit.common import state

    lower_links = names_by_node(lower)
    upper_links = names_by_node(upper)
    # see_through[D]: entries of lower layers below directory D still show in upper.
    see_through: dict[bytes, bool] = {b"": True}
    put: set[bytes] = set()
    marks: dict[bytes, int] = {}  # marker name -> its mtime
    # wiped_at[D]: the latest removal of D or an ancestor, None if none; carried
    # down the walk, so a path costs one step whatever its depth.
    wiped_at: dict[bytes, int | None] = {b"": removed.get(b"")}
    for p, node in upper.walk():  # parents first
        low = lower.get(p) if see_through.get(parent(p)) else None
        above = wiped_at.get(parent(p))
        here = removed.get(p)
        wiped = above if here is None else (here if above is None else max(here, above))
        if node.type == "d":
            wiped_at[p] = wiped
        reopened = node.type == "d" and low is not None and low.type == "d" and wiped is not None
        if node.type == "d":
            see_through[p] = low is not None and low.type == "d" and not reopened
        if low is None or reopened or state(low) != state(node):
            put.add(p)
        elif node.type != "d" and lower_links.get(id(low)) != upper_links.get(id(node)):
            put.add(p)  # same file, but its hard links differ
        if reopened:
            marks[join(p, OPQ)] = wiped
    for p in lower.nodes:
        if p and p not in upper.nodes and see_through.get(parent(p)):
            marks[join(parent(p), WH + p.rsplit(b"/", 1)[-1])] = removed.get(p, 0)
    for p in list(put):
        put.update(upper_links.get(id(upper.nodes[p]), ()))
    closed: set[bytes] = set()  # directories whose ancestors are all in put
    for name in list(put) + list(marks):
        q = parent(name)
        while q and q not in closed:
            closed.add(q)
            put.add(q)
            q = parent(q)
    entries: list[Entry] = []
    first: dict[int, bytes] = {}
    for name in sorted(put | marks.keys()):
        if name in marks:
            entries.append(Entry(name, None, mtime=marks[name]))
            continue
        _refuse_marker(name)
        node = upper.nodes[name]
        if node.type != "d" and id(node) in upper_links:
            if id(node) in first:
                entries.append(Entry(name, node, link=first[id(node)]))
                continue
            first[id(node)] = name
        entries.append(Entry(name, node))
    return entries


def _refuse_marker(p: bytes) -> None:
    if p.rsplit(b"/", 1)[-1].startswith(WH):
        raise UsageError(f"{show(p)}: a name starting with .wh. cannot go into a layer (it would read as a whiteout)")


class _HashingWriter:
    def __init__(self, f: BinaryIO):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


TAR_TYPES = {
    "f": tarfile.REGTYPE,
    "d": tarfile.DIRTYPE,
    "l": tarfile.SYMTYPE,
    "p": tarfile.FIFOTYPE,
    "c": tarfile.CHRTYPE,
    "b": tarfile.BLKTYPE,
}


def tarinfo(path: bytes, node: Node) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(_text(path))
    ti.type = TAR_TYPES[node.type]
    ti.mode = node.mode or 0
    ti.uid, ti.gid = node.uid or 0, node.gid or 0
    ti.uname = ti.gname = ""
    ti.mtime = node.mtime or 0
    if node.type == "f":
        ti.size = node.size or 0
    elif node.type == "l":
        ti.linkname = _text(node.link or b"")
    elif node.type in ("c", "b"):
        ti.devmajor, ti.devminor = node.devmajor or 0, node.devminor or 0
    if node.xattrs:
        ti.pax_headers = {"SCHILY.xattr." + k: _text(v) for k, v in node.xattr_dict().items()}
    return ti


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def write_layer(entries: list[Entry], content: ContentStore, store: Store, f: BinaryIO) -> tuple[str, int]:
    """Write the layer tar (PAX, deterministic: every field from the events) to f;
    returns its diff_id and entry count."""
    hw = _HashingWriter(f)
    with store.read(), tarfile.open(fileobj=hw, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                                    errors="surrogateescape") as tar:
        for e in entries:
            if e.node is None:
                ti = tarfile.TarInfo(e.name.decode("utf-8", "surrogateescape"))
                ti.type, ti.mode, ti.mtime, ti.uname, ti.gname = tarfile.REGTYPE, 0, e.mtime, "", ""
                tar.addfile(ti)
                continue
            ti = tarinfo(e.name, e.node)
            if e.link is not None:
                ti.type, ti.size, ti.linkname = tarfile.LNKTYPE, 0, e.link.decode("utf-8", "surrogateescape")
                tar.addfile(ti)
            elif e.node.type == "f" and e.node.size:
                tar.addfile(ti, content.open_blob(e.node.blob_id))
            else:
                tar.addfile(ti)
    return "sha256:" + hw.sha.hexdigest(), len(entries)


# Commit: the config ------------------------------------------------------------------

CHANGE_KEYS = ("CMD", "ENTRYPOINT", "ENV", "EXPOSE", "LABEL", "USER", "VOLUME", "WORKDIR")


def apply_changes(config: dict, changes: Iterable[str]) -> None:
    """Apply Dockerfile-style instructions (`docker commit --change`) to an image config's `config`."""
    for change in changes:
        word, _, rest = change.strip().partition(" ")
        key, rest = word.upper(), rest.strip()
        if key not in CHANGE_KEYS:
            raise UsageError(f"--change {change!r}: supported instructions are {', '.join(CHANGE_KEYS)}")
        if not rest:
            raise UsageError(f"--change {change!r}: {key} needs a value")
        if key in ("CMD", "ENTRYPOINT"):
            config["Cmd" if key == "CMD" else "Entrypoint"] = _exec_form(rest, change)
        elif key == "ENV":
            env = [e for e in config.get("Env") or []]
            for k, v in _pairs(rest, change, allow_space=True):
                env = [e for e in env if e.split("=", 1)[0] != k] + [f"{k}={v}"]
            config["Env"] = env
        elif key == "LABEL":
            labels = dict(config.get("Labels") or {})
            labels.update(_pairs(rest, change, allow_space=False))
            config["Labels"] = labels
        elif key == "EXPOSE":
            ports = dict(config.get("ExposedPorts") or {})
            for port in rest.split():
                ports[port if "/" in port else port + "/tcp"] = {}
            config["ExposedPorts"] = ports
        elif key == "VOLUME":
            vols = dict(config.get("Volumes") or {})
            for v in (_exec_form(rest, change) if rest.startswith("[") else rest.split()):
                vols[v] = {}
            config["Volumes"] = vols
        elif key == "USER":
            config["User"] = rest
        elif key == "WORKDIR":
            config["WorkingDir"] = rest


def _exec_form(rest: str, change: str) -> list[str]:
    if rest.startswith("["):
        try:
            v = json.loads(rest)
        except ValueError:
            raise UsageError(f"--change {change!r}: not a JSON array of strings") from None
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise UsageError(f"--change {change!r}: not a JSON array of strings")
        return v
    return ["/bin/sh", "-c", rest]


def _pairs(rest: str, change: str, allow_space: bool) -> list[tuple[str, str]]:
    try:
        words = shlex.split(rest)
    except ValueError as e:
        raise UsageError(f"--change {change!r}: {e}") from None
    if allow_space and words and "=" not in words[0]:
        return [(words[0], rest.split(None, 1)[1] if len(words) > 1 else "")]  # ENV KEY VALUE...
    out = []
    for w in words:
        k, eq, v = w.partition("=")
        if not eq or not k:
            raise UsageError(f"--change {change!r}: expected KEY=VALUE, got {w!r}")
        out.append((k, v))
    return out


__all__ = ["Container", "create", "listing", "remove", "docker_changes", "plan_layer", "write_layer",
           "apply_changes", "PathError", "NoSuchPath"]
