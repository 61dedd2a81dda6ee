"""dive's image efficiency, wasted bytes and inefficient files, computed as dive
computes them (dive/filetree/efficiency.go and dive/image/analysis.go), from
the stored events: no layer tar is read.

dive builds one tree per layer tar and visits each tree's leaves (nodes without
children: files, links, empty directories, whiteouts).  Per path it adds up the
sizes of those visits and keeps the smallest:

- a leaf that is no whiteout counts its tar header's size (0 but for regular
  files);
- a whiteout counts what it deleted, looked up in the lower layers stacked as
  dive stacks them: the whole subtree's sizes when the lower node is a
  directory tar entry, else 0 (so a deleted file counts 0, and so does a
  directory no tar named, as dive's implied parents are no directories);
- efficiency = the sum of the smallest sizes / the sum of all sizes (1 when
  that is 0); a path visited at least twice is inefficient, and the wasted
  bytes are the sum of those paths' sizes, every visit included;
- the user bytes are every layer's header sizes but the bottom layer's.

Three details of dive's that change the figures, kept here because the score
is meant to equal dive's:

- dive stacks the bottom layer twice and ignores opaque directories while
  stacking (a lower child of an opaque directory is still there to be sized);
- when a whiteout's path is missing below, dive gives up on the rest of that
  layer's tree (the leaves after it in its depth-first, name-sorted walk are
  not counted), and the missing path itself counts a smallest size of -1;
- a file that replaces a directory keeps the directory's children in the
  stacked tree.

Memory: only the subtrees below deleted paths are stacked; every other leaf
goes to a temporary table, summed per path by SQLite, so a 200k-file image
holds its directories, not its files.
"""

from __future__ import annotations

from ..kinds import IMPLIED, PUT, WHITEOUT
from ..paths import parent
from ..replay import in_diffs

WH = b".wh."
WH_WH = b".wh..wh."
TOP = 20  # inefficient paths listed, largest first
_TEMP = "temp.layerdb_dive"


def _dive_name(path: bytes, whiteout: bool) -> tuple[bytes, ...]:
    """The node's names from the root, as dive names them (a whiteout keeps its .wh. prefix)."""
    names = tuple(path.split(b"/"))
    return names[:-1] + (WH + names[-1],) if whiteout else names


def _post_order(names: tuple[bytes, ...]) -> tuple:
    # dive's child-first walk: siblings by name, a directory after its children.
    return tuple((0, n) for n in names) + ((1,),)


class _Stack:
    """dive's stacked tree, kept only at and below the paths some whiteout deletes."""

    def __init__(self, deleted: set[bytes]):
        self.deleted = deleted
        self.info: dict[bytes, tuple[bool, int]] = {}  # path -> (a directory entry?, header size)
        self.kids: dict[bytes, set[bytes]] = {}

    def covers(self, path: bytes) -> bool:
        q: bytes | None = path
        while q:
            if q in self.deleted:
                return True
            q = parent(q) or None
        return False

    def add(self, path: bytes, info: tuple[bool, int]) -> None:
        self.info[path] = info
        q = path
        while (up := parent(q)) and self.covers(up):
            self.kids.setdefault(up, set()).add(q)
            if up in self.info:
                break
            self.info[up] = (False, 0)  # created on the way: dive's empty FileInfo
            q = up

    def remove(self, path: bytes) -> None:
        if path not in self.info:
            return  # dive records a failed removal and goes on
        todo = [path]
        while todo:
            q = todo.pop()
            self.info.pop(q, None)
            todo.extend(self.kids.pop(q, ()))
        up = parent(path)
        if up in self.kids:
            self.kids[up].discard(path)

    def deleted_size(self, path: bytes) -> int | None:
        """What a whiteout of path counts; None when the path is not there (dive's error)."""
        got = self.info.get(path)
        if got is None:
            return None
        if not got[0]:
            return 0
        total, todo = 0, [path]
        while todo:
            q = todo.pop()
            total += self.info.get(q, (False, 0))[1]
            todo.extend(self.kids.get(q, ()))
        return total

    def apply(self, ops: list[tuple[tuple, bool, bytes, tuple[bool, int]]]) -> None:
        for _, whiteout, path, info in sorted(ops, key=lambda o: o[0]):
            if whiteout:
                self.remove(path)
            else:
                self.add(path, info)


def _nodes(store, diff: int):
    """A layer tree's nodes as dive builds them from the tar: (path id, path,
    whiteout?, (directory entry?, header size)).  A path put twice is one node
    (the later entry's); opaque markers and AUFS names are no nodes."""
    last = {(k, pid): seq for k, pid, seq in store.execute(
        "SELECT kind, path_id, max(seq) FROM event WHERE diff_id = ? AND kind IN (?, ?)"
        " GROUP BY kind, path_id HAVING count(*) > 1", (diff, WHITEOUT, PUT))}
    for kind, seq, pid, path, typ, size in store.execute(
            "SELECT e.kind, e.seq, e.path_id, p.path, e.type, e.size FROM event e JOIN path p ON p.id = e.path_id"
            " WHERE e.diff_id = ? AND e.kind IN (?, ?, ?)", (diff, WHITEOUT, IMPLIED, PUT)):
        if not path or (last and last.get((kind, pid), seq) != seq):
            continue
        if WH_WH in path and any(n.startswith(WH_WH) for n in path.split(b"/")):
            continue  # dive's AddPath stops at such a name
        if kind == WHITEOUT:
            yield pid, path, True, (False, 0)
        elif kind == IMPLIED:
            yield pid, path, False, (False, 0)
        else:
            yield pid, path, False, (typ == "d", (size or 0) if typ == "f" else 0)


def dive_efficiency(store, chain: list[tuple[int, int]], top: int = TOP) -> dict:
    """dive's analysis of the chain (positions and diff rowids, bottom first)."""
    cond, args = in_diffs([d for _, d in chain])
    deleted = {path for (path,) in store.execute(
        f"SELECT DISTINCT p.path FROM event e JOIN path p ON p.id = e.path_id WHERE {cond} AND e.kind = ?",
        args + [WHITEOUT])}
    stack = _Stack(deleted)
    store.execute(f"DROP TABLE IF EXISTS {_TEMP}")
    store.execute(f"CREATE TABLE {_TEMP}(path_id INTEGER NOT NULL, size INTEGER)")  # size NULL: dive's -1
    try:
        for i, (_, diff) in enumerate(chain):
            dirs: set[bytes] = set()
            whiteouts: list[tuple[tuple[bytes, ...], bytes]] = []
            ops = []
            for _, path, whiteout, info in _nodes(store, diff):
                dirs.add(parent(path))
                if whiteout:
                    whiteouts.append((_dive_name(path, True), path))
                if deleted and stack.covers(path):
                    ops.append((_post_order(_dive_name(path, whiteout)), whiteout, path, info))
            if i == 0:
                stack.apply([o for o in ops if not o[1]])  # dive's copy of the bottom tree
            # The first whiteout (in dive's walk) whose path is missing ends the layer's walk.
            sizes: dict[bytes, int] = {}
            stop = None
            for name, path in sorted(whiteouts):
                got = stack.deleted_size(path)
                if got is None:
                    stop = name
                    break
                sizes[path] = got

            def leaves():
                for pid, path, whiteout, info in _nodes(store, diff):
                    if not whiteout and path in dirs:
                        continue  # a node with children: dive visits leaves only
                    if stop is not None:
                        name = _dive_name(path, whiteout)
                        if name > stop:
                            continue
                        if name == stop:
                            yield pid, None
                            continue
                    yield pid, sizes[path] if whiteout else info[1]

            store.conn.cursor().executemany(f"INSERT INTO {_TEMP}(path_id, size) VALUES (?, ?)", leaves())
            stack.apply(ops)
        per_path = (f"SELECT path_id, count(size) AS n, coalesce(sum(size), 0) AS cum, coalesce(min(size), -1) AS least"
                    f" FROM {_TEMP} GROUP BY path_id")
        least, cum, wasted = store.execute(
            f"SELECT coalesce(sum(least), 0), coalesce(sum(cum), 0), coalesce(sum(CASE WHEN n >= 2 THEN cum END), 0)"
            f" FROM ({per_path})").fetchone()
        worst = store.execute(
            f"SELECT p.path, x.n, x.cum FROM ({per_path}) x JOIN path p ON p.id = x.path_id WHERE x.n >= 2"
            " ORDER BY x.cum DESC, p.path LIMIT ?", (top,)).fetchall()
    finally:
        store.execute(f"DROP TABLE IF EXISTS {_TEMP}")
    sizes_by_layer = [store.scalar("SELECT file_bytes FROM diff WHERE id = ?", (d,)) for _, d in chain]
    user = sum(sizes_by_layer[1:])
    return {
        "efficiency": least / cum if cum else 1.0,
        "minimum_bytes": least,
        "discovered_bytes": cum,
        "wasted_bytes": wasted,
        "size_bytes": sum(sizes_by_layer),
        "user_size_bytes": user,
        "wasted_user_percent": wasted / user if user else None,
        "inefficiencies": [{"path": p, "count": n, "size": s} for p, n, s in worst],  # paths as stored
    }
