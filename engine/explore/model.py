"""What `layerdb explore` shows, computed from the store: no UI toolkit here.

The file tree never replays the image whole.  A directory's listing replays
only the events that decide that directory and the children read (as `view
DIR` does, with replay.decided_events), for the two views it compares; a
directory is listed when the user opens it, WINDOW names at a time (a skip scan
of the path index), the next window when the user scrolls to it.  So a
200k-file image, or a 200k-name directory, opens as fast as a small one, and
memory follows what the user has opened and scrolled through.

Marks compare two views: the view at the selected layer t and a base view.
The base is the view at b below t in the image's own chain: "this layer's
changes" takes b = t - 1; "aggregated" takes b = 1, the base layer, as dive
compares against its bottom layer (at t = 1 both take b = 0: everything the
base layer holds is added); a range of layers lo..hi shows the view at hi
against b = lo - 1.  Or the base is another image's top view (a base given as
that image's Explorer).  A mark is the engine's `diff` of the two nodes:
A added, M changed (content, metadata or type), R removed, U unmodified.
"""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

from .. import refs
from ..errors import LayerdbError, NotFound, UsageError
from ..kinds import OPAQUE
from ..paths import parent, parse_path, show_path
from ..reader import Reader
from ..replay import View, decided_events, in_diffs, tree_key
from ..audit.common import state
from ..audit.diffs import classify
from ..audit.search import Finder, find, path_filter
from ..audit.timeline import log, patch
from ..audit.efficiency import dive_efficiency

ADDED, MODIFIED, REMOVED, UNMODIFIED = "A", "M", "R", "U"
MARKS = (ADDED, REMOVED, MODIFIED, UNMODIFIED)  # the order of keys 1 2 3 4
_CHANGE_MARK = {"A": ADDED, "C": MODIFIED, "D": REMOVED}

VIEW_LIMIT = 256 << 10  # bytes of a file shown in the app; the pager gets all of it
HEX_HEAD = 256  # bytes of a binary file shown as hex
MATCH_LIMIT = 5000  # filter matches kept (in tree order); the status bar says when there were more
TOP_WASTED = 20
_LISTINGS = 512  # directory listings kept (each is the children read, a few hundred bytes each)
WINDOW = 1000  # names of a directory read at a time: a 200k-name directory opens as fast as a small one


@dataclass(slots=True)
class Entry:
    """One name in the tree, as the compared views show it."""

    path: bytes
    type: str
    mode: int | None
    uid: int | None
    gid: int | None
    size: int | None  # files: their size; directories: the bytes below them once known (dir_sizes)
    link: bytes | None
    sha256: bytes | None
    mark: str
    touched_below: bool = False  # a directory with events of the compared layers below it
    opens: bool = False  # a directory in either view: a file that replaced one lists what it removed

    @property
    def name(self) -> str:
        return self.path.rpartition(b"/")[2].decode("utf-8", "surrogateescape") or "/"

    @property
    def shown(self) -> str:
        return show_path(self.path)

    @property
    def is_dir(self) -> bool:
        return self.type == "d"


@dataclass(slots=True)
class _Listing:
    """A directory's names read so far: the first windows, in order, and names read
    out of order beyond them (extra)."""

    entries: list[Entry]
    after: bytes | None  # the last path read; None: every name is read
    extra: dict[bytes, Entry]


@dataclass(slots=True)
class Row:
    """A visible line of the tree: an entry, its depth and its tree guides."""

    entry: Entry  # for a `more` row, a stand-in whose path is the directory's
    depth: int
    guides: str  # "│   ├── " and the like, for the depth
    expanded: bool
    more: bool = False  # the directory has names not read yet: reaching this row reads them


class Explorer:
    """One image (or REF) in the explorer.  Positions are 1-based, as in `log`."""

    def __init__(self, db: Reader, ref: str):
        self.db = db
        self.store = db.store
        self.ref = ref
        with self.store.read():
            self.r = refs.resolve(self.store, ref)
            self.steps = db.created_by(self.r)
            self._sizes = {li.position: self.store.scalar("SELECT file_bytes FROM diff WHERE id = ?",
                                                          (li.diff_rowid,)) for li in self.r.layers}
        if not self.r.layers:
            raise UsageError(f"{ref}: the image has no layers to explore")
        self._listings: OrderedDict[tuple, _Listing] = OrderedDict()
        self._touched: dict[tuple[int, int], set[bytes]] = {}
        self._dir_sizes: dict[int, dict[bytes, int]] = {}
        self._details: dict | None = None

    def reopen(self) -> "Explorer":
        """The same explorer on a connection of its own, for another thread."""
        return Explorer(Reader(self.store.path), self.ref)

    @property
    def top(self) -> int:
        return len(self.r.layers)

    @property
    def label(self) -> str:
        return self.r.label()

    def at(self, t: int) -> refs.Resolved:
        """The chain up to position t, still this image's (labels, created_by)."""
        self._check(t)
        return refs.Resolved(f"{self.ref}~{self.top - t}", self.r.layers[:t], self.r.image_rowid,
                             self.r.image_digest, self.r.tags, self.r.container)

    def _check(self, t: int) -> None:
        if not 1 <= t <= self.top:
            raise UsageError(f"layer position {t} is not in 1..{self.top}")

    @staticmethod
    def base(t: int, aggregated: bool) -> int:
        """The position of the view that the marks at t compare against (0: empty)."""
        if aggregated:
            return 1 if t > 1 else 0
        return t - 1

    # Layers and details -----------------------------------------------------------

    def layers(self) -> list[dict]:
        return [{"position": li.position, "layer_id": li.chain_id, "diff_id": li.diff_id,
                 "size": self._sizes[li.position], "created_by": self.steps.get(li.position) or ""}
                for li in self.r.layers]

    def layer_details(self, t: int) -> dict:
        self._check(t)
        li = self.r.layers[t - 1]
        with self.store.read():
            # The images whose top is this layer carry tags for it, as dive shows them.
            tags = [name for (name,) in self.store.execute(
                "SELECT t.name FROM tag t JOIN image i ON i.id = t.image_id WHERE i.top_layer = ? ORDER BY t.name",
                (li.layer_rowid,))] if li.layer_rowid is not None else []
        return {"position": t, "tags": tags, "layer_id": li.chain_id, "diff_id": li.diff_id,
                "size": self._sizes[t], "created_by": self.steps.get(t) or ""}

    def image_details(self) -> dict:
        """Total size, efficiency, wasted bytes and the inefficient files, as dive
        computes them (efficiency.py: one pass over the layers' events)."""
        if self._details is None:
            with self.store.read():
                d = dive_efficiency(self.store, self.r.chain, TOP_WASTED)
                base = {i["path"]: self._in_base(i["path"]) for i in d["inefficiencies"]}
            self._details = {
                "image": self.label,
                "total_size": d["size_bytes"],
                "efficiency": d["efficiency"],
                "wasted_bytes": d["wasted_bytes"],
                "user_wasted_percent": d["wasted_user_percent"],
                "top_wasted": [{"path": show_path(i["path"]), "count": i["count"], "size": i["size"],
                                "base": base[i["path"]]} for i in d["inefficiencies"]],
            }
        return self._details

    def _in_base(self, path: bytes) -> bool:
        """Whether the path's first version is in the bottom layer: it came with the
        base image, so the image's own steps only wasted it by changing it (dive #454)."""
        return self.store.execute(
            "SELECT 1 FROM event e JOIN path p ON p.id = e.path_id WHERE p.path = ? AND e.diff_id = ? LIMIT 1",
            (path, self.r.chain[0][1])).fetchone() is not None

    # The tree ----------------------------------------------------------------------

    def chain_of(self, b: "int | Explorer") -> list[tuple[int, int]]:
        """The base's chain: b layers of this image, or another image's whole chain."""
        return b.r.chain if isinstance(b, Explorer) else self.r.chain[:b]

    @staticmethod
    def _key(b: "int | Explorer"):
        return ("image", tuple(b.r.chain)) if isinstance(b, Explorer) else b

    def children(self, d: bytes, t: int, b: "int | Explorer") -> list[Entry]:
        """The names in directory d in the view at t or in the base view b (removed
        ones), marked, sorted by raw bytes: those read so far.  A directory is read
        WINDOW names at a time (more_names, read_more); only d and the names read
        are replayed."""
        listing = self._listing(d, t, b)
        return listing.entries + [listing.extra[p] for p in sorted(listing.extra)] if listing.extra \
            else listing.entries

    def more_names(self, d: bytes, t: int, b: "int | Explorer") -> bool:
        """Whether directory d has names not read yet."""
        return self._listing(d, t, b).after is not None

    def read_more(self, d: bytes, t: int, b: "int | Explorer") -> None:
        """Read directory d's next WINDOW names."""
        listing = self._listing(d, t, b)
        if listing.after is not None:
            self._read_window(listing, d, t, b)

    def ensure(self, d: bytes, t: int, b: "int | Explorer", paths) -> None:
        """Read these children of d too (a filter's match, a jump's target), whatever
        window they lie in."""
        listing = self._listing(d, t, b)
        want = sorted(p for p in paths if listing.after is not None and p > listing.after and p not in listing.extra)
        if not want:
            return
        with self.store.read():
            ids = []
            for i in range(0, len(want), 500):
                part = want[i:i + 500]
                ids += self.store.execute(f"SELECT id, path FROM path WHERE path IN ({','.join('?' * len(part))})",
                                          part).fetchall()
            entries = self._entries(d, t, b, ids)
        listing.extra.update((e.path, e) for e in entries)

    def _listing(self, d: bytes, t: int, b: "int | Explorer") -> "_Listing":
        self._check(t)
        key = (t, self._key(b), d)
        hit = self._listings.get(key)
        if hit is not None:
            self._listings.move_to_end(key)
            return hit
        listing = _Listing([], b"", {})
        self._read_window(listing, d, t, b)
        self._listings[key] = listing
        if len(self._listings) > _LISTINGS:
            self._listings.popitem(last=False)
        return listing

    def _read_window(self, listing: "_Listing", d: bytes, t: int, b: "int | Explorer") -> None:
        chains = [self.r.chain[:t], self.chain_of(b)]
        with self.store.read():
            names, listing.after = self._names(d, chains, listing.after, WINDOW)
            entries = self._entries(d, t, b, names)
        for e in entries:
            listing.extra.pop(e.path, None)
        listing.entries.extend(entries)

    def _names(self, d: bytes, chains, after: bytes, limit: int) -> tuple[list[tuple[int, bytes]], bytes | None]:
        """Up to `limit` (id, path) children of d after `after` that an event of the
        chains names (every name a view can hold), in byte order, and the last one
        read (None: no more).  A skip scan of the path index: one seek per child,
        past each child's subtree, so a directory with a large subtree but few
        children costs those few, and a window of a huge directory costs the window."""
        cond, diffs = in_diffs([x for c in chains for _, x in c])
        prefix = d + b"/" if d else b""
        bound = " AND path < ?" if d else ""
        tail = [d + b"0"] if d else []
        last = max(after, prefix) if prefix else after  # the last child read (exclusive bound)
        cur, op = last, ">"
        out: list[tuple[int, bytes]] = []
        while len(out) < limit:
            row = self.store.execute(f"SELECT id, path FROM path WHERE path {op} ?{bound} ORDER BY path LIMIT 1",
                                     [cur] + tail).fetchone()
            if row is None:
                return out, None
            pid, p = row
            cut = p.find(b"/", len(prefix))
            if cut >= 0:  # below a child: past its subtree ('0' follows '/'; a child named so is kept)
                cur, op = p[:cut] + b"0", ">="
                continue
            last = cur = p
            op = ">"
            if self.store.execute(f"SELECT 1 FROM event e INDEXED BY event_by_path WHERE e.path_id = ? AND {cond}"
                                  " LIMIT 1", [pid] + diffs).fetchone():
                out.append((pid, p))
        return out, last

    def _entries(self, d: bytes, t: int, b: "int | Explorer", kids: list[tuple[int, bytes]]) -> list[Entry]:
        chain_t, chain_b = self.r.chain[:t], self.chain_of(b)
        chains = [chain_t, chain_b] if chain_b else [chain_t]
        events = decided_events(self.store, chains, [d], known=kids)
        vt = View().replay(events[0])
        vb = View().replay(events[1]) if chain_b else View()
        touched = self.touched(t, b)
        sizes = self._dir_sizes.get(t, {})
        out = []
        for _, p in kids:
            old, new = vb.nodes.get(p), vt.nodes.get(p)
            if old is None and new is None:
                continue  # named, but in neither view
            c = classify(state(old), state(new))
            node = new if new is not None else old
            out.append(Entry(p, node.type, node.mode, node.uid, node.gid,
                             node.size if node.type == "f" else sizes.get(p), node.link, node.sha256,
                             UNMODIFIED if c is None else _CHANGE_MARK[c[0]],
                             p in touched, "d" in (old.type if old else None, new.type if new else None)))
        return out

    def touched(self, t: int, b: "int | Explorer") -> set[bytes]:
        """The directories with an event below them (an opaque directory counts
        itself) in the layers the two chains do not share: where the compared
        views can differ.  For b a position below t, those are b+1..t."""
        key = (t, self._key(b))
        if key not in self._touched:
            chain_t, chain_b = self.r.chain[:t], self.chain_of(b)
            same = 0
            while same < min(len(chain_t), len(chain_b)) and chain_t[same][1] == chain_b[same][1]:
                same += 1
            dirs: set[bytes] = set()
            with self.store.read():
                for _, diff in chain_t[same:] + chain_b[same:]:
                    for kind, path in self.store.execute(
                            "SELECT e.kind, p.path FROM event e JOIN path p ON p.id = e.path_id WHERE e.diff_id = ?",
                            (diff,)):
                        q = path if kind == OPAQUE and path else parent(path) if path else None
                        while q is not None and q not in dirs:
                            dirs.add(q)
                            q = parent(q) if q else None
            self._touched[key] = dirs
        return self._touched[key]

    def dir_sizes(self, t: int) -> dict[bytes, int]:
        """Regular-file bytes below each directory of the view at t (every name
        counts, as `du --count-links`), from one streamed pass over the view."""
        from ..tree import TreeEntries

        self._check(t)
        if t not in self._dir_sizes:
            sizes: dict[bytes, int] = {}
            with self.store.read(), TreeEntries(self.store, self.r.chain[:t], temp="layerdb_explore") as src:
                for batch in src.batches():
                    for p, node, _ in batch:
                        if node.type == "d":
                            sizes.setdefault(p, 0)
                        elif node.type == "f" and node.size:
                            q = p
                            while q:
                                q = parent(q)
                                sizes[q] = sizes.get(q, 0) + node.size
            self._dir_sizes[t] = sizes
            for (lt, _, _), listing in self._listings.items():
                if lt == t:
                    for e in [*listing.entries, *listing.extra.values()]:
                        if e.is_dir:
                            e.size = sizes.get(e.path)
        return self._dir_sizes[t]

    def matches(self, pattern: str, t: int, b: "int | Explorer") -> tuple[list[bytes], bool]:
        """Paths shown at t or only in the base view b that match, in tree order (at most
        MATCH_LIMIT), and whether there were more.

        A pattern with * ? or [ is a glob over the absolute path (a relative one
        may start in any directory: `cfg/*.conf`); otherwise it is a substring of
        the path, anchored at the root when it starts with '/'."""
        if not pattern:
            return [], False
        chain_t, chain_b = self.r.chain[:t], self.chain_of(b)
        cond, diffs = in_diffs([d for _, d in chain_t + chain_b])
        in_chain = f"EXISTS (SELECT 1 FROM event e INDEXED BY event_by_path WHERE e.path_id = p.id AND {cond})"
        if any(c in pattern for c in "*?["):
            where, args = path_filter(None, pattern if pattern[0] in "/*?[" else "*/" + pattern, "p.")
            args = list(args)
        else:
            raw = pattern.encode("utf-8", "surrogateescape")
            if raw.startswith(b"/"):
                where, args = "instr(p.path, ?) = 1", [raw.lstrip(b"/")]
            else:
                where, args = "instr(p.path, ?) > 0", [raw]
        with self.store.read():
            found = [path for (path,) in self.store.execute(
                f"SELECT p.path FROM path p WHERE {where} AND p.path != x'' AND {in_chain}", args + diffs)]
            found.sort(key=tree_key)
            more = len(found) > MATCH_LIMIT
            found = found[:MATCH_LIMIT]
            chains = [chain_t, chain_b] if chain_b else [chain_t]
            views = [View().replay(evs) for evs in decided_events(self.store, chains, found)]
        return [p for p in found if any(p in v.nodes for v in views)], more

    # One path ------------------------------------------------------------------------

    def history(self, path: str | bytes) -> list[dict]:
        """The path's timeline along this chain (audit: `log`), oldest first."""
        return log(self.db, path, image=self.ref)

    def version_at(self, rows: list[dict], t: int) -> int | None:
        """The number (1-based) of the timeline row in force at position t."""
        v = None
        for i, row in enumerate(rows, 1):
            if row["position"] <= t:
                v = i
        return v

    def diff(self, path: str | bytes, t: int, old: int | None = None, new: int | None = None) -> str:
        """A git-style patch between two versions of the path (audit: `log -p`);
        by default the version in force at t against the one before it."""
        p = parse_path(path)
        rows = self.history(p)
        if new is None:
            new = self.version_at(rows, t)
            if new is None:
                raise NotFound(f"{show_path(p)}: no version at or below layer {t}")
        if old is None:
            old = new - 1
        for v in (old, new):
            if not 0 <= v <= len(rows):
                raise UsageError(f"{show_path(p)} has versions 1..{len(rows)}, not {v}")
        with self.store.read():
            return patch(self.db, p, rows[old - 1] if old else None, rows[new - 1])

    def file_view(self, path: str | bytes, t: int) -> dict:
        """What the app shows of one entry at t: text (the first VIEW_LIMIT bytes),
        or for a binary file its size, sha256 and a hex head."""
        p = parse_path(path)
        with self.store.read():
            node = self.db.lookup(self.at(t), p)
            if node is None:
                raise NotFound(f"{show_path(p)}: not in the view at layer {t}")
            out = {"path": show_path(p), "type": node.type, "size": node.size if node.type == "f" else None,
                   "sha256": node.sha256.hex() if node.sha256 else None,
                   "link": node.link.decode("utf-8", "surrogateescape") if node.link is not None else None,
                   "binary": False, "text": None, "hex": None, "truncated": False}
            if node.type != "f":
                return out
            head = bytearray()
            if node.size:
                for chunk in self.db.content.iter_blob(node.blob_id):
                    head += chunk[: VIEW_LIMIT - len(head)]
                    if len(head) >= VIEW_LIMIT:
                        break
        out["truncated"] = (node.size or 0) > len(head)
        if b"\0" in head[:8000]:  # git's rule for binary
            out["binary"] = True
            out["hex"] = hexdump(bytes(head[:HEX_HEAD]))
        else:
            out["text"] = head.decode("utf-8", "replace")
        return out

    def contents(self, path: str | bytes, t: int) -> Iterator[bytes]:
        """A regular file's bytes at t, chunk by chunk (for the pager)."""
        p = parse_path(path)
        with self.store.read():
            node = self.db.lookup(self.at(t), p)
            if node is None or node.type != "f":
                raise UsageError(f"{show_path(p)}: not a regular file at layer {t}")
            if node.size:
                yield from self.db.content.iter_blob(node.blob_id)

    def extract(self, path: str | bytes, t: int, into: str) -> str:
        """Write the file or directory at t as a new entry of directory `into`,
        under its own name; refuse to replace anything.  Only its last name is
        used, so nothing lands outside `into`."""
        from ..output.export import refuse_specials, write_dir_entries
        from ..tree import TreeEntries, subtree_batches

        p = parse_path(path)
        if not p:
            raise UsageError("pick a file or directory to extract, not /")
        target = os.path.join(os.fsencode(into), p.rpartition(b"/")[2])
        shown = os.fsdecode(target)
        if os.path.lexists(target):
            raise UsageError(f"{shown}: already exists")
        with self.store.read():
            node = self.db.lookup(self.at(t), p)
            if node is None:
                raise NotFound(f"{show_path(p)}: not in the view at layer {t}")
            try:
                if node.type == "d":
                    chain = self.r.chain[:t]
                    refuse_specials(self.store, chain, p)
                    with TreeEntries(self.store, chain, temp="layerdb_explore") as src:
                        write_dir_entries(subtree_batches(src, p), self.db.content, shown)
                elif node.type == "f":
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    with os.fdopen(fd, "wb") as f:
                        if node.size:
                            for chunk in self.db.content.iter_blob(node.blob_id):
                                f.write(chunk)
                    os.chmod(target, (node.mode or 0o644) & 0o777)
                elif node.type == "l":
                    os.symlink(node.link or b"", target)
                else:
                    raise UsageError(f"{show_path(p)}: a device or fifo is not extracted")
            except OSError as e:
                raise LayerdbError(f"extract to {shown}: {e}") from None
        return shown

    # Across images -------------------------------------------------------------------

    def find(self, query: str) -> list[dict]:
        """`find` across every stored image: a sha256 (8..64 hex digits, `sha256:`
        allowed), a path glob (with a '/'), or a name glob."""
        q = query.strip()
        h = q.lower().removeprefix("sha256:")
        if 8 <= len(h) <= 64 and all(c in "0123456789abcdef" for c in h):
            return find(self.db, sha256=h)
        if "/" in q:
            return find(self.db, path=q if q[0] in "/*?[" else "*/" + q)
        return find(self.db, name=q)

    def sharing(self, t: int) -> list[dict]:
        """The other images whose chains hold layer t (the same chain id, so the same view below it)."""
        li = self.r.layers[t - 1]
        if li.layer_rowid is None:
            return []
        with self.store.read():
            f = Finder(self.db)
            out = []
            for rowid, digest, _ in f.images_above(li.layer_rowid):
                if rowid == self.r.image_rowid:
                    continue
                tags = f.tags_of(rowid)
                out.append({"image": digest, "repo_tags": tags, "label": tags[0] if tags else refs.short(digest),
                            "position": t, "layer_id": li.chain_id})
        out.sort(key=lambda r: (r["label"], r["image"]))
        return out


def hexdump(data: bytes) -> str:
    lines = []
    for i in range(0, len(data), 16):
        part = data[i : i + 16]
        hexes = " ".join(f"{b:02x}" for b in part)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in part)
        lines.append(f"{i:08x}  {hexes:<47}  |{text}|")
    return "\n".join(lines)


@dataclass
class TreeState:
    """The tree pane's state: which layer and comparison, what is open, hidden,
    filtered and sorted, the visible rows and the cursor.  Rows are rebuilt from
    cached directory listings; only opened directories are ever listed.

    `layer` is the layer the user selected; `t` the layer whose view is shown:
    the same, but for a range (`mark` set), where t is the range's top."""

    ex: Explorer
    t: int
    aggregated: bool = False
    mark: int | None = None  # a range's other end: the changes of layers min..max(mark, layer)
    against: Explorer | None = None  # another image, whose top view is the base
    sort: str = "name"  # or "size": largest first
    hidden: set[str] = field(default_factory=set)
    expanded: set[bytes] = field(default_factory=set)
    filter: str = ""
    matched: list[bytes] = field(default_factory=list)
    more_matches: bool = False
    rows: list[Row] = field(default_factory=list)
    cursor: int = 0

    def __post_init__(self) -> None:
        self.layer = self.t
        self._allowed: set[bytes] | None = None
        self._allowed_by_dir: dict[bytes, set[bytes]] = {}
        self._match_keys: list[bytes] = []
        self.refresh()

    @property
    def b(self) -> "int | Explorer":
        """The base the marks compare against: a position of this chain, or another image."""
        if self.against is not None:
            return self.against
        if self.mark is not None:
            return min(self.mark, self.layer) - 1
        return self.ex.base(self.t, self.aggregated)

    @property
    def mode(self) -> str:
        """What the marks compare, in words (the tree's title and the status bar)."""
        if self.against is not None:
            return f"against {self.against.label}"
        if self.mark is not None:
            lo, hi = sorted((self.mark, self.layer))
            return f"layers {lo}-{hi}" if lo < hi else "this layer"
        return "aggregated" if self.aggregated else "this layer"

    @property
    def current(self) -> Entry | None:
        if not self.rows or self.rows[self.cursor].more:
            return None
        return self.rows[self.cursor].entry

    def children(self, d: bytes) -> list[Entry]:
        if self._allowed is not None:
            self.ex.ensure(d, self.t, self.b, self._allowed_by_dir.get(d, ()))
        out = []
        for e in self.ex.children(d, self.t, self.b):
            if self._allowed is not None and e.path not in self._allowed:
                continue
            # An added or removed directory holds only added or removed names: it goes
            # with its subtree.  Another one stays when it leads to changes.
            if e.mark in self.hidden and not (e.opens and e.touched_below and e.mark in (MODIFIED, UNMODIFIED)):
                continue
            out.append(e)
        if self.sort == "size":
            out.sort(key=lambda e: (-(e.size or 0), e.path))
        return out

    def refresh(self, keep: bytes | None = None) -> None:
        """Rebuild the rows; the cursor stays on `keep` (default: its entry), or
        on its nearest shown ancestor."""
        if keep is None and self.rows:
            keep = self.rows[min(self.cursor, len(self.rows) - 1)].entry.path
        rows: list[Row] = []

        def walk(d: bytes, depth: int, prefix: str) -> None:
            kids = self.children(d)
            more = self._allowed is None and self.ex.more_names(d, self.t, self.b)
            for i, e in enumerate(kids):
                last = i == len(kids) - 1 and not more
                opened = e.opens and e.path in self.expanded
                rows.append(Row(e, depth, prefix + ("└── " if last else "├── "), opened))
                if opened:
                    walk(e.path, depth + 1, prefix + ("    " if last else "│   "))
            if more:
                rows.append(Row(Entry(d, "d", None, None, None, None, None, None, UNMODIFIED), depth,
                                prefix + "└── ", False, True))

        walk(b"", 0, "")  # recursion as deep as the paths, which tar bounds
        self.rows = rows
        self.cursor = 0
        if keep is not None and rows:
            index = {r.entry.path: i for i, r in enumerate(rows) if not r.more}
            q = keep
            while q and q not in index:
                q = parent(q)
            self.cursor = index.get(q, 0)

    # Moving and opening ----------------------------------------------------------------

    def move(self, n: int) -> None:
        if self.rows:
            self.cursor = max(0, min(len(self.rows) - 1, self.cursor + n))

    def read_more(self, i: int) -> bool:
        """Row i is a `more` row: read its directory's next window; the cursor, if
        it was there, lands on the first name read.  False if row i is no such row."""
        if not (0 <= i < len(self.rows) and self.rows[i].more):
            return False
        at = self.cursor
        self.ex.read_more(self.rows[i].entry.path, self.t, self.b)
        self.refresh()
        self.cursor = min(at, len(self.rows) - 1)
        return True

    def toggle(self) -> None:
        e = self.current
        if e is None or not e.opens:
            return
        self.expanded.symmetric_difference_update({e.path})
        self.refresh(e.path)

    def collapse_all(self) -> None:
        keep = self.current.path if self.current else None
        self.expanded.clear()
        if keep:
            keep = keep.split(b"/", 1)[0]
        self.refresh(keep)

    def select(self, path: str | bytes) -> bool:
        """Open the path's ancestors and put the cursor on it; False if it is not shown."""
        p = parse_path(path)
        q = p
        while q:
            self.ex.ensure(parent(q), self.t, self.b, [q])  # in whatever window of its directory
            q = parent(q)
            if q:
                self.expanded.add(q)
        self.refresh(p)
        return bool(self.rows) and self.current.path == p

    def set_layer(self, t: int, aggregated: bool | None = None) -> None:
        """Select layer t; `aggregated` given also leaves a range or another image's comparison."""
        self.ex._check(t)
        self.layer = t
        if aggregated is not None:
            self.aggregated, self.mark, self.against = aggregated, None, None
        self.t = max(t, self.mark) if self.mark is not None else t
        self._reload()

    def set_range(self, mark: int | None) -> None:
        """Compare over a range of layers: from `mark` to the selected layer, either
        way round (None: back to the aggregated or this-layer mode)."""
        if mark is not None:
            self.ex._check(mark)
        self.mark, self.against = mark, None
        self.set_layer(self.layer)

    def compare_with(self, other: Explorer | None) -> None:
        """Compare the view at the selected layer with another image's top view (None: stop)."""
        self.against, self.mark = other, None
        self.set_layer(self.layer)

    def _reload(self) -> None:
        if self.filter:
            self.apply_filter(self.filter)
        else:
            self.refresh()

    def toggle_mark(self, mark: str) -> None:
        self.hidden.symmetric_difference_update({mark})
        self.refresh()

    def toggle_sort(self) -> None:
        self.sort = "size" if self.sort == "name" else "name"
        if self.sort == "size":
            self.ex.dir_sizes(self.t)
        self.refresh()

    # Filter ------------------------------------------------------------------------------

    def apply_filter(self, pattern: str) -> None:
        """Show only the matches and their ancestors (opened); the cursor goes to the first match."""
        self.filter = pattern
        if not pattern:
            self.clear_filter()
            return
        self.matched, self.more_matches = self.ex.matches(pattern, self.t, self.b)
        self._match_keys = [tree_key(p) for p in self.matched]
        above: set[bytes] = set()
        for p in self.matched:
            q = p
            while q:
                q = parent(q)
                if q in above:
                    break
                above.add(q)
        self.expanded |= above
        self._allowed = above | set(self.matched)
        self._allowed_by_dir = {}
        for q in self._allowed:
            if q:
                self._allowed_by_dir.setdefault(parent(q), set()).add(q)
        if self.matched:
            self.select(self.matched[0])
        else:
            self.refresh()

    def clear_filter(self) -> None:
        keep = self.current.path if self.current else None
        self.filter, self.matched, self.more_matches = "", [], False
        self._allowed, self._match_keys = None, []
        self.refresh(keep)

    def next_match(self, step: int = 1) -> bool:
        """n / N: the cursor to the next (previous) match in tree order, wrapping."""
        if not self.matched:
            return False
        here = tree_key(self.current.path) if self.current else b""
        if step > 0:
            i = bisect.bisect_right(self._match_keys, here)
            i = i if i < len(self.matched) else 0
        else:
            i = bisect.bisect_left(self._match_keys, here) - 1
        return self.select(self.matched[i])
