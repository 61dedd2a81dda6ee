"""Replaying events into a view, whole or restricted to a few paths.

One replay engine serves every reader: ``view``/``export`` replay all events
of a chain; ``cat``/``log`` replay only the events on a path, its ancestors and
its hard-link partners, found through the path index, so their cost does not
grow with the depth of the chain.  Both apply the same rules (DESIGN.md):

per layer, bottom up:
  1. opaque D: the lower children of D disappear;
  2. whiteout P: P and its subtree disappear;
  3. implied D: a parent the tar never names; created as a 0755 directory
     unless a directory is already there;
  4. puts, in tar order: a non-directory replaces whatever was there with its
     subtree; a directory over a directory changes only its attributes; a
     hard link shares its target's node and sets the shared metadata.

A container's diff is a time-ordered log instead: its events (they carry a
time) replay in seq order, so a whiteout there removes what is present at that
moment, the container's own earlier writes included.  replay_key() is that
order for events gathered from several diffs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from .paths import parent
from .kinds import IGNORED, IMPLIED, OPAQUE, PUT, WHITEOUT


class Node:
    """A file object in a view.  Hard-linked names share one Node."""

    __slots__ = ("type", "mode", "uid", "gid", "mtime", "size", "blob_id", "sha256", "link", "devmajor",
                 "devminor", "xattrs", "position", "implied", "pack", "offset")

    def __init__(self, type, mode, uid, gid, mtime, size, blob_id, sha256, link, devmajor, devminor, xattrs,
                 position, implied=False, pack=None, offset=None):
        self.type = type
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.size = size
        self.blob_id = blob_id
        self.sha256 = sha256
        self.link = link
        self.devmajor = devmajor
        self.devminor = devminor
        self.xattrs = xattrs
        self.position = position
        self.implied = implied
        # Where a packed content lies (blob.chunk, blob.offset), when the replay's rows
        # said: export then asks the store only for the others (content.locate).
        self.pack = pack
        self.offset = offset

    def xattr_dict(self) -> dict[str, bytes]:
        if not self.xattrs:
            return {}
        import json  # few views hold xattrs; most commands never load json

        return {k: bytes.fromhex(v) for k, v in json.loads(self.xattrs).items()}


@dataclass(slots=True)
class Event:
    position: int
    kind: int
    seq: int
    path: bytes
    type: str | None
    mode: int | None
    uid: int | None
    gid: int | None
    mtime: int | None
    size: int | None
    blob_id: int | None
    sha256: bytes | None
    link: bytes | None
    target: bytes | None
    devmajor: int | None
    devminor: int | None
    xattrs: str | None
    time: float | None = None  # set on container events only
    pack: bytes | None = None  # the content's pack and offset in it, when packed and read from the store
    offset: int | None = None


def replay_key(ev: Event) -> tuple[int, int, int]:
    """Replay order: by position; within an imported diff by (kind, seq), within a container's log by seq."""
    return ev.position, (ev.kind if ev.time is None else -1), ev.seq


EVENT_COLUMNS = (
    "e.kind, e.seq, p.path, e.type, e.mode, e.uid, e.gid, e.mtime, e.size, e.blob_id, b.sha256, e.link, t.path,"
    " e.devmajor, e.devminor, e.xattrs, e.time, b.chunk, b.offset"
)
EVENT_JOINS = (
    "JOIN path p ON p.id = e.path_id LEFT JOIN path t ON t.id = e.target_id LEFT JOIN blob b ON b.id = e.blob_id"
)


def _diff_rows(conn, diff_rowid: int):
    """The EVENT_COLUMNS rows of one diff in replay order: an imported diff's in
    primary key order (no sort), a container's in log order."""
    log = conn.execute("SELECT container FROM diff WHERE id = ?", (diff_rowid,)).fetchone()
    order = "e.seq" if log and log[0] else "e.kind, e.seq"
    return conn.execute(f"SELECT {EVENT_COLUMNS} FROM event e {EVENT_JOINS} WHERE e.diff_id = ? ORDER BY {order}",
                        (diff_rowid,))


def diff_events(conn, diff_rowid: int, position: int) -> Iterator[Event]:
    """Every event of one diff in replay order."""
    for r in _diff_rows(conn, diff_rowid):
        yield Event(position, *r)


def chain_events(conn, chain: list[tuple[int, int]]) -> Iterator[Event]:
    """All events of a chain given as [(position, diff rowid)], bottom up."""
    for pos, diff in chain:
        yield from diff_events(conn, diff, pos)


def chain_view(conn, chain: list[tuple[int, int]]) -> "View":
    """A chain's whole view: View().replay(chain_events(conn, chain)), from the rows."""
    view = View()
    for pos, diff in chain:
        view.replay_rows(_diff_rows(conn, diff), pos)
    return view


PATH_ID = "SELECT id FROM path WHERE path = ?"
PATH_IDS = "SELECT id FROM path WHERE path IN ({})"
# Every event on some paths, or every link naming them, in the chains' diffs:
# restricted in SQL, so the cost follows the chains, not the number of images
# in the store that hold these paths.
# INDEXED BY: with a long IN list the planner would rather walk whole diffs
# by primary key (seconds instead of a fraction for a large partition).  The
# last {} is in_diffs(): an IN list for a chain, a rowid range for many chains.
EVENTS_IN = (f"SELECT e.diff_id, {EVENT_COLUMNS} FROM event e INDEXED BY event_by_path {EVENT_JOINS}"
             " WHERE e.path_id IN ({}) AND {}")
LINKS_IN = ("SELECT DISTINCT p.path FROM event e INDEXED BY event_by_target JOIN path p ON p.id = e.path_id"
            " WHERE e.target_id IN ({}) AND {}")
_MAX_DIFFS = 32  # an IN list costs one index seek per (path, diff): beyond this, one range per path


def in_diffs(diffs: list[int]) -> tuple[str, list[int]]:
    """A condition on e.diff_id that an index on (x, diff_id) serves, and its arguments."""
    diffs = sorted(set(diffs))
    if len(diffs) <= _MAX_DIFFS:
        return f"e.diff_id IN ({','.join('?' * len(diffs))})", diffs
    return "e.diff_id BETWEEN ? AND ?", [diffs[0], diffs[-1]]


_BATCH = 500  # ids per IN (...): far below SQLite's limit on bound parameters
_TARGET = 13  # where an EVENTS_IN row holds the hard-link target


def closure_events(store, chains: list[list[tuple[int, int]]], paths: Iterable[bytes],
                   known: Iterable[tuple[int, bytes]] = ()) -> list[list[Event]]:
    """Per chain, in replay order, the events that decide the given paths: those
    on the paths, on their ancestors and on their hard-link partners, closed
    under those relations.  `known` adds (path id, path) pairs without their
    ancestors (a subtree the caller already enumerated).

    Uses the (path_id, diff_id) index, on the chains' diffs only: the cost
    follows the number of events on those paths in the chains, not the depth
    of the chains nor the other images in the store.
    """
    pos_of: list[dict[int, list[int]]] = []
    for chain in chains:
        m: dict[int, list[int]] = {}
        for pos, diff in chain:
            m.setdefault(diff, []).append(pos)
        pos_of.append(m)
    in_chain, diffs = in_diffs([d for m in pos_of for d in m])
    events: list[list[Event]] = [[] for _ in chains]
    wanted: set[bytes] = set()
    pending: list[int] = []
    for pid, p in known:
        if p not in wanted:
            wanted.add(p)
            pending.append(pid)
    todo = list(paths)
    # Paths whose ancestors are all wanted: a walk up stops at the first one, so
    # a deep path's ancestors cost each one step, not one per path below them.
    closed: set[bytes] = set()
    while todo or pending:
        lookup: list[bytes] = []
        for p in todo:
            q = p
            while q not in closed:
                closed.add(q)
                if q not in wanted:
                    wanted.add(q)
                    lookup.append(q)
                if not q:
                    break
                q = parent(q)
        todo = []
        # Path ids in batches: a path 4,096 components deep has as many ancestors.
        for i in range(0, len(lookup), _BATCH):
            part = lookup[i : i + _BATCH]
            pending.extend(pid for (pid,) in store.execute(PATH_IDS.format(",".join("?" * len(part))), part))
        for i in range(0, len(pending), _BATCH):
            ids = pending[i : i + _BATCH]
            marks = ",".join("?" * len(ids))
            rows = store.execute(EVENTS_IN.format(marks, in_chain), ids + diffs)
            if len(chains) == 1:  # export's partitions: many rows, one chain
                m, out = pos_of[0], events[0]
                for r in rows:
                    poss = m.get(r[0])
                    if poss is None:
                        continue  # another chain's diff within the rowid range (long chains)
                    ev = r[1:]
                    for pos in poss:
                        out.append(Event(pos, *ev))
                    target = r[_TARGET]
                    if target is not None and target not in wanted:
                        todo.append(target)
            else:
                for r in rows:
                    hit = False
                    for m, out in zip(pos_of, events):
                        for pos in m.get(r[0], ()):
                            out.append(Event(pos, *r[1:]))
                            hit = True
                    target = r[_TARGET]
                    if hit and target is not None and target not in wanted:
                        todo.append(target)
            # A hard link elsewhere that names one of these paths shares (and changes) its file.
            for (lp,) in store.execute(LINKS_IN.format(marks, in_chain), ids + diffs):
                if lp not in wanted:
                    todo.append(lp)
        pending = []
    for evs in events:
        evs.sort(key=replay_key)
    return events


SUBTREE = "SELECT id, path FROM path WHERE path > ? AND path < ?"
# Which of some paths have any path below them (in the path table: in any image).
_HAS_BELOW = ("WITH c(p, lo, hi) AS (VALUES {}) SELECT p FROM c"
              " WHERE EXISTS (SELECT 1 FROM path WHERE path > c.lo AND path < c.hi)")
_HAS_BELOW_ROWS = 300
EVENT_KEYS = ("SELECT e.diff_id, e.kind, e.seq, e.path_id, e.time FROM event e INDEXED BY event_by_path"
              " WHERE e.path_id IN ({}) AND {}")


def undecided(store, chain: list[tuple[int, int]], events: list[Event],
              might_miss: Callable[[bytes], bool] = lambda p: True) -> list[tuple[int, bytes]]:
    """Paths (id, path) whose events a closure lacks although they change a path it decides.

    closure_events leaves out one effect: an event below a path P makes P a
    directory (mkdir -p) when P is a file or a link at that moment, as when a
    tar names P as a file and then P/x.  For the non-directories P of `events`
    that might_miss says may lack them, the chain's later events below P are
    returned; callers add them to the closure (`known`) until none are left.
    They almost never exist: a file has nothing below it.
    """
    since: dict[bytes, tuple] = {}
    for ev in events:
        if ev.kind == PUT and ev.type != "d" and ev.path not in since and might_miss(ev.path):
            since[ev.path] = replay_key(ev)  # events come in replay order: the first is the earliest
    if not since:
        return []
    # One statement per few hundred paths finds the few with anything below them.
    tops = list(since)
    with_below: set[bytes] = set()
    for i in range(0, len(tops), _HAS_BELOW_ROWS):
        part = tops[i : i + _HAS_BELOW_ROWS]
        args = [x for t in part for x in (t, t + b"/", t + b"0")]
        with_below.update(p for (p,) in store.execute(_HAS_BELOW.format(",".join(["(?,?,?)"] * len(part))), args))
    since = {t: k for t, k in since.items() if t in with_below}
    if not since:
        return []
    have = {ev.path for ev in events}
    pos_of: dict[int, list[int]] = {}
    for pos, d in chain:
        pos_of.setdefault(d, []).append(pos)
    in_chain, diffs = in_diffs(list(pos_of))
    more: list[tuple[int, bytes]] = []
    for top, key in since.items():
        below = store.execute(SUBTREE, (top + b"/", top + b"0")).fetchall()
        for i in range(0, len(below), _BATCH):
            part = dict(below[i : i + _BATCH])
            marks = ",".join("?" * len(part))
            for d, kind, seq, pid, t in store.execute(EVENT_KEYS.format(marks, in_chain), [*part, *diffs]):
                path = part[pid]
                if path in have or kind not in (WHITEOUT, IMPLIED, PUT):
                    continue
                order = kind if t is None else -1  # as replay_key: a container's log is by seq alone
                if any((pos, order, seq) > key for pos in pos_of.get(d, ())):
                    have.add(path)
                    more.append((pid, path))
    return more


def event_count(store, diffs: Iterable[int]) -> int:
    """How many events these diffs hold (the primary key counts them)."""
    return sum(store.scalar("SELECT count(*) FROM event WHERE diff_id = ?", (d,)) for d in diffs)


_IN_CHAIN = " AND EXISTS (SELECT 1 FROM event e INDEXED BY event_by_path WHERE e.path_id = p.id AND {})"


def below(store, chain: list[tuple[int, int]], top: bytes, children: bool = False,
          limit: int = -1) -> list[tuple[int, bytes]]:
    """The (id, path) pairs below `top` that the chain's events name: every
    path of its subtree, or its direct children only (at most `limit`).  Every
    path a view holds is named by an event of its chain (parents no tar names
    are IMPLIED events), so these are all the paths the view can hold there."""
    cond, diffs = in_diffs([d for _, d in chain])
    if top:
        sql, args = "SELECT p.id, p.path FROM path p WHERE p.path > ? AND p.path < ?", [top + b"/", top + b"0"]
        if children:
            sql += " AND instr(substr(p.path, ?), '/') = 0"
            args.append(len(top) + 2)
    else:
        sql, args = "SELECT p.id, p.path FROM path p WHERE p.path > ?", [b""]
        if children:
            sql += " AND instr(p.path, '/') = 0"
    return store.execute(sql + _IN_CHAIN.format(cond) + " LIMIT ?", args + diffs + [limit]).fetchall()


def decided_events(store, chains: list[list[tuple[int, int]]], paths: Iterable[bytes],
                   known: Iterable[tuple[int, bytes]] = ()) -> list[list[Event]]:
    """closure_events closed under undecided() too: per chain, in replay order,
    every event that decides the given paths.  A view replayed from them shows
    those paths (and their ancestors and hard-link partners) as the whole
    chain's view does."""
    paths = list(paths)
    known = list(known)
    out = closure_events(store, chains, paths, known=known)  # one pass for all chains: the usual case
    for i, chain in enumerate(chains):
        extra = list(known)
        while more := undecided(store, chain, out[i]):
            extra.extend(more)
            out[i] = closure_events(store, [chain], paths, known=extra)[0]
    return out


def tree_key(path: bytes) -> bytes:
    """The export order (GNU tar --sort=name): depth first, a directory before
    its children, siblings by raw bytes.  '/' becomes NUL, which sorts below
    every byte of a name (import refuses NUL in names), so `a/x` comes before
    `a.b` although '/' > '.'.  TREE_KEY_SQL is the same key in SQL."""
    return path.replace(b"/", b"\0")


TREE_KEY_SQL = "CAST(replace({}, '/', x'00') AS BLOB)"


class View:
    """A materialised file tree: path -> Node, with a child index for subtrees."""

    def __init__(self) -> None:
        self.nodes: dict[bytes, Node] = {b"": Node("d", 0o755, 0, 0, None, None, None, None, None, None, None,
                                                   None, 0, implied=True)}
        self.children: dict[bytes, set[bytes]] = {b"": set()}

    # Mutations ------------------------------------------------------------

    def _remove(self, path: bytes) -> None:
        if path not in self.nodes:
            return
        stack = [path]
        while stack:
            p = stack.pop()
            del self.nodes[p]
            kids = self.children.pop(p, None)
            if kids:
                stack.extend(kids)
        if path:
            sib = self.children.get(parent(path))
            if sib is not None:
                sib.discard(path)

    def _set(self, path: bytes, node: Node) -> None:
        old = self.nodes.get(path)
        if old is not None and (old.type != "d" or node.type != "d"):
            self._remove(path)
        self.nodes[path] = node
        if node.type == "d" and path not in self.children:
            self.children[path] = set()
        if path:
            self.children[parent(path)].add(path)

    def _mkdirs(self, path: bytes, position: int) -> None:
        """Make every ancestor of path a directory (mkdir -p)."""
        missing = []
        p = path
        while p:
            p = parent(p)
            n = self.nodes.get(p)
            if n is not None and n.type == "d":
                break
            missing.append(p)
        for p in reversed(missing):
            self._set(p, Node("d", 0o755, 0, 0, None, None, None, None, None, None, None, None, position,
                              implied=True))

    def apply(self, ev: Event) -> None:
        kind, path = ev.kind, ev.path
        if kind == OPAQUE:
            for c in list(self.children.get(path, ())):
                self._remove(c)
        elif kind == WHITEOUT:
            if path:
                self._mkdirs(path, ev.position)
                self._remove(path)
        elif kind == IMPLIED:
            n = self.nodes.get(path)
            if n is None or n.type != "d":
                self._mkdirs(path, ev.position)
                self._set(path, Node("d", 0o755, 0, 0, None, None, None, None, None, None, None, None,
                                     ev.position, implied=True))
        elif kind == PUT:
            if ev.type == "h":
                target = self.nodes.get(ev.target) if ev.target is not None else None
                if target is None or target.type == "d":
                    return  # a link to nothing: ignored, as a lower-less applier would
                # The link's own header sets the shared inode's metadata.
                target.mode, target.uid, target.gid = ev.mode, ev.uid, ev.gid
                if ev.mtime is not None:
                    target.mtime = ev.mtime
                target.position = ev.position
                if path == ev.target:
                    return
                self._mkdirs(path, ev.position)
                self._set(path, target)
                return
            if not path:
                root = self.nodes[b""]
                root.mode, root.uid, root.gid, root.mtime, root.xattrs = ev.mode, ev.uid, ev.gid, ev.mtime, ev.xattrs
                root.position, root.implied = ev.position, False
                return
            # Every event of a replay comes here, mostly below a directory that
            # exists: that case skips _mkdirs, and _set is inlined with the
            # parent found once (the view of bench py-web, 12k paths, replays a fifth faster).
            nodes = self.nodes
            i = path.rfind(b"/")
            up = path[:i] if i >= 0 else b""
            n = nodes.get(up)
            if n is None or n.type != "d":
                self._mkdirs(path, ev.position)
            old = nodes.get(path)
            type_ = ev.type
            if old is not None:
                if type_ == "d" and old.type == "d":
                    old.mode, old.uid, old.gid, old.mtime, old.xattrs = ev.mode, ev.uid, ev.gid, ev.mtime, ev.xattrs
                    old.position, old.implied = ev.position, False
                    return
                self._remove(path)
            nodes[path] = Node(type_, ev.mode, ev.uid, ev.gid, ev.mtime, ev.size, ev.blob_id, ev.sha256, ev.link,
                               ev.devmajor, ev.devminor, ev.xattrs, ev.position, False, ev.pack, ev.offset)
            if type_ == "d" and path not in self.children:
                self.children[path] = set()
            self.children[up].add(path)
        # IGNORED: not a filesystem change

    def replay(self, events: Iterable[Event]) -> "View":
        """apply() each event; a new path below a directory that exists, most
        events, is put here (a fifth of a partition's replay was apply's calls)."""
        nodes, children, apply = self.nodes, self.children, self.apply
        for ev in events:
            path = ev.path
            if ev.kind == PUT and path not in nodes and ev.type != "h":
                i = path.rfind(b"/")
                up = path[:i] if i >= 0 else b""
                n = nodes.get(up)
                if n is not None and n.type == "d":
                    type_ = ev.type
                    nodes[path] = Node(type_, ev.mode, ev.uid, ev.gid, ev.mtime, ev.size, ev.blob_id, ev.sha256,
                                       ev.link, ev.devmajor, ev.devminor, ev.xattrs, ev.position, False, ev.pack,
                                       ev.offset)
                    if type_ == "d" and path not in children:
                        children[path] = set()
                    children[up].add(path)
                    continue
            apply(ev)
        return self

    def replay_rows(self, rows: Iterable[tuple], position: int) -> None:
        """replay() of the events these EVENT_COLUMNS rows hold, at this position,
        its common case without making an Event (a fifth of a whole replay's time)."""
        nodes, children, apply = self.nodes, self.children, self.apply
        for r in rows:
            path = r[2]
            if r[0] == PUT and path not in nodes and r[3] != "h":
                i = path.rfind(b"/")
                up = path[:i] if i >= 0 else b""
                n = nodes.get(up)
                if n is not None and n.type == "d":
                    type_ = r[3]
                    nodes[path] = Node(type_, r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[13], r[14], r[15],
                                       position, False, r[17], r[18])
                    if type_ == "d" and path not in children:
                        children[path] = set()
                    children[up].add(path)
                    continue
            apply(Event(position, *r))

    # Reading ----------------------------------------------------------------

    def get(self, path: bytes) -> Node | None:
        return self.nodes.get(path)

    def walk(self, top: bytes = b"") -> Iterator[tuple[bytes, Node]]:
        """Every path below top (not top itself), sorted by raw bytes."""
        if top:
            prefix = top + b"/"
            paths = sorted(p for p in self.nodes if p.startswith(prefix))
        else:
            paths = sorted(p for p in self.nodes if p)
        for p in paths:
            yield p, self.nodes[p]

    def list_dir(self, path: bytes) -> list[tuple[bytes, Node]]:
        return [(c, self.nodes[c]) for c in sorted(self.children.get(path, ()))]


__all__ = ["View", "Node", "Event", "chain_events", "chain_view", "closure_events", "decided_events", "below", "event_count", "undecided", "diff_events", "replay_key", "tree_key",
           "IGNORED"]
