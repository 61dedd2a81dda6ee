"""Indexed search: which images and layers hold a file, by name, path glob or sha256."""

from __future__ import annotations

from dataclasses import dataclass

from .. import refs
from ..errors import UsageError
from ..kinds import PUT
from ..paths import show_path
from ..reader import Reader
from .common import batches, marks

# Find ---------------------------------------------------------------------------

# The lookups `find` runs.  Each starts from a unique or secondary index
# (tests/test_audit.py asserts their EXPLAIN QUERY PLAN); only a GLOB without a
# literal prefix has to scan a (covering) path index.  path and name are BLOBs,
# which GLOB does not match, hence the casts.
_NAME_GLOB = "CAST({q}name AS TEXT) GLOB CAST(? AS TEXT)"
_PATH_GLOB = "('/' || CAST({q}path AS TEXT)) GLOB CAST(? AS TEXT)"
_HIT_COLUMNS = ("e.diff_id, e.path_id, p.path, e.type, e.mode, e.uid, e.gid, e.size, b.sha256, e.link,"
                " e.target_id, t.path")
_HIT_JOINS = ("JOIN path p ON p.id = e.path_id LEFT JOIN path t ON t.id = e.target_id"
              " LEFT JOIN blob b ON b.id = e.blob_id")
FIND_PUTS_ON = f"SELECT {_HIT_COLUMNS} FROM event e {_HIT_JOINS} WHERE e.path_id IN ({{}}) AND e.kind = {PUT}"
FIND_BLOB = (f"SELECT {_HIT_COLUMNS} FROM event e {_HIT_JOINS}"
             f" WHERE e.blob_id IN (SELECT id FROM blob WHERE sha256 >= ? AND sha256 <= ?) AND e.kind = {PUT}")
FIND_LINKS_TO = (f"SELECT {_HIT_COLUMNS} FROM event e {_HIT_JOINS}"
                 f" WHERE e.target_id IN ({{}}) AND e.kind = {PUT} AND e.type = 'h'")
FIND_LAYERS = "SELECT id, position, chain_id FROM layer WHERE diff_id = ?"
# CROSS JOIN keeps the walk going up from the hit layer to the images on top:
# SQLite would otherwise scan every image, and find must not slow down as images
# are added.
FIND_IMAGES_ABOVE = (
    "WITH RECURSIVE up(id) AS (SELECT ? UNION SELECT l.id FROM layer l JOIN up ON l.parent_id = up.id)"
    " SELECT i.id, i.digest, i.top_layer FROM up CROSS JOIN image i ON i.top_layer = up.id"
)
FIND_CREATED_BY = "SELECT created_by FROM history WHERE image_id = ? AND position = ?"


def glob_prefix(pattern: bytes) -> bytes:
    """The literal bytes every match of a GLOB starts with."""
    for i, c in enumerate(pattern):
        if c in b"*?[":
            return pattern[:i]
    return pattern


def prefix_end(prefix: bytes) -> bytes | None:
    """The smallest byte string above every string that starts with prefix (None: no bound)."""
    p = prefix.rstrip(b"\xff")
    return p[:-1] + bytes([p[-1] + 1]) if p else None


def _glob(pattern: str | bytes) -> bytes:
    """A user's find(1)-style glob as an SQLite GLOB: [!...] negates, as in fnmatch."""
    raw = pattern if isinstance(pattern, bytes) else pattern.encode("utf-8", "surrogateescape")
    return raw.replace(b"[!", b"[^")


def _sha_range(hexdigest: str) -> tuple[bytes, bytes]:
    h = hexdigest.lower().removeprefix("sha256:")
    if not 8 <= len(h) <= 64 or any(c not in "0123456789abcdef" for c in h):
        raise UsageError(f"--sha256 needs 8 to 64 hex digits, not {hexdigest!r}")
    return bytes.fromhex(h.ljust(64, "0")), bytes.fromhex(h.ljust(64, "f"))


def _range(column: str, prefix: bytes) -> tuple[list[str], list[bytes]]:
    if not prefix:
        return [], []
    end = prefix_end(prefix)
    if end is None:
        return [f"{column} >= ?"], [prefix]
    return [f"{column} >= ? AND {column} < ?"], [prefix, end]


def path_filter(name: str | bytes | None, path: str | bytes | None, q: str = "") -> tuple[str, tuple]:
    """WHERE conditions on the path table (alias prefix q) for --name and --path.

    A literal prefix becomes an index range; SQLite picks the narrower one when
    both patterns have one.  --path matches the absolute path, as find -path does.
    """
    conds: list[str] = []
    args: list[bytes] = []
    if path is not None:
        pg = _glob(path)
        if pg[:1] not in (b"/", b"*", b"?", b"["):
            raise UsageError(f"--path matches absolute paths: start it with / or a wildcard, not {path!r}")
        c, a = _range(f"{q}path", glob_prefix(pg)[1:])
        conds += c + [_PATH_GLOB.format(q=q)]
        args += a + [pg]
    if name is not None:
        ng = _glob(name)
        c, a = _range(f"{q}name", glob_prefix(ng))
        conds += c + [_NAME_GLOB.format(q=q)]
        args += a + [ng]
    return " AND ".join(conds), tuple(args)


def find_path_query(name: str | bytes | None, path: str | bytes | None) -> tuple[str, tuple]:
    where, args = path_filter(name, path)
    return f"SELECT id FROM path WHERE {where}", args


@dataclass
class Hit:
    diff: int
    path_id: int
    path: bytes
    type: str
    mode: int | None
    uid: int | None
    gid: int | None
    size: int | None
    sha256: bytes | None
    link: bytes | None
    target_id: int | None
    target: bytes | None


class Finder:
    """Caches per layer and image, so that each is looked up once per search."""

    def __init__(self, db: Reader):
        self.db = db
        self.store = db.store
        self.layers: dict[int, list[tuple[int, int, str]]] = {}
        self.images: dict[int, list[tuple[int, str, int]]] = {}
        self.resolved: dict[tuple[int, int], refs.Resolved] = {}
        self.tags: dict[int, list[str]] = {}
        self.top_nodes: dict[tuple[int, bytes], tuple | None] = {}
        self.steps: dict[tuple[int, int], str | None] = {}

    def layers_of(self, diff: int):
        if diff not in self.layers:
            self.layers[diff] = self.store.execute(FIND_LAYERS, (diff,)).fetchall()
        return self.layers[diff]

    def images_above(self, layer: int):
        if layer not in self.images:
            self.images[layer] = self.store.execute(FIND_IMAGES_ABOVE, (layer,)).fetchall()
        return self.images[layer]

    def at(self, layer: int, image: tuple[int, str] | None = None) -> refs.Resolved:
        """The chain up to a layer, borrowing an image's identity (for labels)."""
        key = (layer, image[0] if image else 0)
        if key not in self.resolved:
            chain = refs.chain_of(self.store, layer)
            self.resolved[key] = refs.Resolved(chain[-1].chain_id, chain, image[0] if image else None,
                                               image[1] if image else None, self.tags_of(image[0]) if image else [])
        return self.resolved[key]

    def created_by(self, image: int, position: int) -> str | None:
        key = (image, position)
        if key not in self.steps:
            self.steps[key] = self.store.scalar(FIND_CREATED_BY, key)
        return self.steps[key]

    def tags_of(self, image: int) -> list[str]:
        if image not in self.tags:
            self.tags[image] = refs.image_tags(self.store, image)
        return self.tags[image]

    def shown(self, layer: int, image: tuple[int, str] | None, path: bytes) -> tuple | None:
        """What the view at a layer shows at path: (type, sha256, link, size), by depth-free lookup."""
        key = (layer, path)
        if key not in self.top_nodes:
            n = self.db.lookup(self.at(layer, image), path)
            self.top_nodes[key] = None if n is None else (n.type, n.sha256, n.link, n.size)
        return self.top_nodes[key]


def find(db: Reader, name: str | bytes | None = None, path: str | bytes | None = None,
         sha256: str | None = None, visible_only: bool = False) -> list[dict]:
    """Every file put by any stored layer that matches, in every image holding that layer.

    visible: the image's top view still shows this path with this content (same
    type and sha256, or link target); otherwise the layer still ships the bytes
    but they were deleted or overwritten above it.
    """
    if name is None and path is None and sha256 is None:
        raise UsageError("find needs --name, --path or --sha256")
    store = db.store
    f = Finder(db)
    rows: list[dict] = []
    with store.read():
        hits: list[Hit] = []
        if sha256 is not None:
            lo, hi = _sha_range(sha256)
            sql, args = FIND_BLOB, (lo, hi)
            if name is not None or path is not None:
                where, pargs = path_filter(name, path, "p.")
                sql += " AND " + where
                args += pargs
            hits = [Hit(*r) for r in store.execute(sql, args)]
            hits += _links_to(store, hits)
        else:
            sql, args = find_path_query(name, path)
            ids = [pid for (pid,) in store.execute(sql, args)]
            for batch in batches(ids):
                hits.extend(Hit(*r) for r in store.execute(FIND_PUTS_ON.format(marks(len(batch))), batch))
        for h in hits:
            for layer, position, chain_id in f.layers_of(h.diff):
                content = _content(f, h, layer)
                if sha256 is not None and not (content and content[1] and lo <= content[1] <= hi):
                    continue  # a hard link whose file, in this chain, has other content
                images = f.images_above(layer) or [None]
                for img in images:
                    ident = (img[0], img[1]) if img else None
                    vis = img is not None and _same(content, f.shown(img[2], ident, h.path))
                    if visible_only and not vis:
                        continue
                    rows.append({
                        "image": img[1] if img else None,
                        "repo_tags": f.tags_of(img[0]) if img else [],
                        "position": position,
                        "layer_id": chain_id,
                        "path": show_path(h.path),
                        "type": h.type,
                        "mode": "%04o" % h.mode if h.mode is not None else None,
                        "uid": h.uid,
                        "gid": h.gid,
                        "size": content[3] if content and content[0] == "f" else None,
                        "sha256": content[1].hex() if content and content[1] else None,
                        "link": (h.target if h.type == "h" else h.link or b"").decode("utf-8", "surrogateescape")
                        if h.type in ("h", "l") else None,
                        "created_by": f.created_by(img[0], position) if img else None,
                        "visible": vis,
                    })
    rows.sort(key=lambda r: (r["image"] is None, r["repo_tags"][:1], r["image"] or "", r["position"], r["path"]))
    return rows


def _content(f: Finder, h: Hit, layer: int) -> tuple | None:
    """(type, sha256, link, size) of a hit; a hard link shows its file as the view at its layer has it."""
    if h.type == "h":
        return f.shown(layer, None, h.path)
    return (h.type, h.sha256, h.link, h.size)


def _same(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and a[:3] == b[:3]


def _links_to(store, hits: list[Hit]) -> list[Hit]:
    """Hard-link entries that name one of the hits' paths, or name such a link (they have no blob
    of their own); find checks, layer by layer, which of them show the wanted content."""
    out: list[Hit] = []
    frontier = sorted({h.path_id for h in hits})
    seen = set(frontier)
    while frontier:
        nxt = []
        for batch in batches(frontier):
            for r in store.execute(FIND_LINKS_TO.format(marks(len(batch))), batch):
                h = Hit(*r)
                out.append(h)
                if h.path_id not in seen:
                    seen.add(h.path_id)
                    nxt.append(h.path_id)
        frontier = nxt
    return out
