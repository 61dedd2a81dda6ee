"""A read session on one store: resolving REFs, replaying views, looking up paths.

api.LayerDB builds on this class; the audits and the explorer's model take a
Reader, so that they need nothing from the front door above them.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Iterator

from . import refs
from .chunks import SqliteChunkStore
from .content import ContentStore
from .errors import NotFound, UsageError
from .paths import parse_path, show_path
from .replay import Event, Node, View, chain_view, decided_events
from .store import Store, default_db_path

TYPE_NAMES = {"f": "file", "d": "dir", "l": "symlink", "h": "hardlink", "p": "fifo", "c": "chardev", "b": "blockdev"}


class Reader:
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

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resolve(self, ref: str) -> refs.Resolved:
        with self.store.read():
            return refs.resolve(self.store, ref)

    def created_by(self, r: refs.Resolved) -> dict[int, str | None]:
        if r.image_rowid is None:
            return {}
        return {pos: cb for pos, cb in self.store.execute(
            "SELECT position, created_by FROM history WHERE image_id = ? AND position IS NOT NULL", (r.image_rowid,))}

    def default_image(self) -> str:
        rows = self.store.execute("SELECT digest FROM image LIMIT 2").fetchall()
        if len(rows) == 1:
            return rows[0][0]
        if not rows:
            raise NotFound("the store holds no images (see `layerdb import`)")
        raise UsageError("the store holds several images: say which with --image")

    def view(self, ref: str | refs.Resolved) -> View:
        """The whole view at REF, replayed from the chain's events.  It holds every
        path of the image: the commands stream instead (tree.TreeEntries,
        iter_listing, iter_diff) or load only what they read (lookup, cat)."""
        with self.store.read():
            r = ref if isinstance(ref, refs.Resolved) else refs.resolve(self.store, ref)
            return chain_view(self.store.conn, r.chain)

    def closure_events(self, r: refs.Resolved, path: bytes) -> list[Event]:
        """The events that decide `path` at r: on it, its ancestors and its hard-link partners."""
        return decided_events(self.store, [r.chain], [path])[0]

    def lookup(self, ref: str | refs.Resolved, path: str | bytes) -> Node | None:
        """One path at REF, without replaying the whole chain."""
        p = parse_path(path)
        with self.store.read():
            r = ref if isinstance(ref, refs.Resolved) else refs.resolve(self.store, ref)
            return View().replay(self.closure_events(r, p)).get(p)


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
