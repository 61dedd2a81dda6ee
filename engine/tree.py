"""A chain's view in tree order, streamed: whole for a small chain, partition by
partition for a large one, so that no whole-image command holds the whole image.

Tree order is GNU `tar --sort=name` order (replay.tree_key).  Tar and directory
export, `view -R`, `diff`, `waste` and containers all read views through here.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from .kinds import PUT
from .paths import parent
from .replay import TREE_KEY_SQL, Event, Node, View, chain_view, closure_events, event_count, tree_key, undecided

# An entry of the tar: path, node, and for a later name of a file the tar
# already holds, that first name (it becomes a tar hard link).
Entry = tuple[bytes, Node, "bytes | None"]


# What the tar holds, in its order -------------------------------------------------
#
# Every tar export lists the view in tree order (replay.tree_key): a directory,
# then its subtree, siblings by raw bytes, as GNU `tar --sort=name` does.  The
# first name of a file with several names carries the data; later names are
# tar hard links to it.
#
# A small chain replays whole.  A large image replays in partitions: runs of
# PARTITION_PATHS consecutive paths in that order, each replayed from only the
# events that decide it (replay.closure_events: the events on its paths, their
# ancestors and their hard-link partners, looked up by path in the chain's
# diffs), so memory holds one partition's view, never the whole image's.  The
# chain's paths themselves wait, sorted, in a temporary table (on disk).  Both
# ways give the same tar, byte for byte (tests/test_export_memory.py).

WHOLE_EVENTS = 32768  # chains with up to this many events replay whole: one sequential read, ~40 MB at most
PARTITION_PATHS = 4096  # paths per partition: a few MB of view and work lists (larger ones ran no faster)

def _temp_sql(name: str) -> tuple[str, str, str, str]:
    """The temporary table of paths (per connection; gone when it closes) and the
    statements on it.  Two TreeEntries open at once on one connection (diff
    merges two views) need tables of different names."""
    temp = f"temp.{name}"
    create = (f"CREATE TEMP TABLE IF NOT EXISTS {name}(k BLOB NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (k, id))"
              " WITHOUT ROWID")
    fill = (f"INSERT OR IGNORE INTO {temp}(k, id) SELECT {TREE_KEY_SQL.format('p.path')}, p.id"
            " FROM event e JOIN path p ON p.id = e.path_id WHERE e.diff_id = ?")
    page = (f"SELECT x.k, x.id, p.path FROM {temp} x JOIN path p ON p.id = x.id WHERE (x.k, x.id) > (?, ?)"
            " ORDER BY x.k, x.id LIMIT ?")
    return temp, create, fill, page


_TEMP, _CREATE, _FILL, PAGE = _temp_sql("layerdb_export")


class paused_gc:
    """Python's cyclic collector off for a while (a context manager).

    A replay allocates an Event and a Node per path; the collector, run every
    few hundred allocations, scans all the objects alive each time it reaches
    the older generations, so on a view of 23k paths it took as long as the
    replay itself.  Views hold no reference cycles (refcounting frees them), so
    nothing is left for it to find.  The pause that found it on turns it back
    on; one that found it off (nested, or a caller's choice) leaves it off."""

    def __enter__(self) -> None:
        import gc

        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.was:
            import gc

            gc.enable()


_BATCH = 500


def large(store, chain: list[tuple[int, int]]) -> bool:
    """Whether a chain has too many events to replay whole (WHOLE_EVENTS)."""
    return event_count(store, (d for _, d in chain)) > WHOLE_EVENTS


class TreeEntries:
    """The entries of a chain's view in tree order, as batches for write_tar.

    whole=True replays the whole chain at once whatever its size.  A
    container's chain partitions as an image's does: its log's events are
    on paths too, and replay_key keeps them in log order.  Use as a context manager:
    it drops the temporary table.  `temp` names that table: two TreeEntries
    open at once on one connection need different names.
    """

    def __init__(self, store, chain: list[tuple[int, int]], whole: bool = False, temp: str = "layerdb_export"):
        self.store = store
        self._temp, create, fill, self._page = _temp_sql(temp)
        self.chain = chain
        self.view: View | None = None
        self.partitioned = not whole and large(store, chain)
        if self.partitioned:
            store.execute(create)
            store.execute(f"DELETE FROM {self._temp}")
            for d in sorted({d for _, d in chain}):
                store.execute(fill, (d,))
            self.total = store.scalar(f"SELECT count(*) FROM {self._temp}") - 1  # the root is no entry
        else:
            with paused_gc():
                self.view = chain_view(store.conn, chain)
            self.total = len(self.view.nodes) - 1

    def __enter__(self) -> "TreeEntries":
        return self

    def __exit__(self, *exc: object) -> None:
        self.view = None
        if self.partitioned:
            self.store.execute(f"DROP TABLE IF EXISTS {self._temp}")

    def batches(self) -> Iterator[list[Entry]]:
        if not self.partitioned:
            view, self.view = self.view, None
            paths = sorted((p for p in view.nodes if p), key=tree_key)
            yield entries_of(view, paths, None)
            return
        for paths, events in self.partitions():
            view = View().replay(events)
            first = None
            if any(ev.kind == PUT and ev.type == "h" for ev in events):
                first = _first_names(view)
            yield entries_of(view, paths, first)

    def partitions(self) -> Iterator[tuple[list[bytes], list[Event]]]:
        """(paths, events) of a partitioned chain: every path its events name
        (below the root) once, in tree order, PARTITION_PATHS at a time, with
        the events that decide them, in replay order."""
        assert self.partitioned
        after: tuple[bytes, int] = (b"", 1 << 62)  # past the root ('' sorts first)
        while True:
            rows = self.store.execute(self._page, (*after, PARTITION_PATHS)).fetchall()
            if not rows:
                return
            after = rows[-1][0], rows[-1][1]
            members = [(pid, path) for _, pid, path in rows]
            yield [p for _, p in members], self._events(members)

    def _events(self, members: list[tuple[int, bytes]]) -> list[Event]:
        """What decides these paths (consecutive in tree order)."""
        names = {p for _, p in members}
        known = list(members)
        while True:
            events = closure_events(self.store, [self.chain], [members[0][1]], known=known)[0]
            more = self._undecided(events, names, members[-1][1])
            if not more:
                return events
            known.extend(more)

    def _undecided(self, events: list[Event], names: set[bytes], last: bytes) -> list[tuple[int, bytes]]:
        """Within the partition every path's subtree is there, except for the last
        path and its ancestors, whose subtrees go on into the next partitions,
        and for the paths from outside (ancestors before it, hard-link
        partners): only those can miss events below them."""
        spine = {last}
        q = last
        while q:
            q = parent(q)
            spine.add(q)
        return undecided(self.store, self.chain, events, lambda p: p not in names or p in spine)


def _first_names(view: View) -> dict[int, bytes]:
    """For every non-directory node, its first name in tree order."""
    first: dict[int, bytes] = {}
    for p, node in view.nodes.items():
        if node.type != "d":
            k = id(node)
            q = first.get(k)
            if q is None or tree_key(p) < tree_key(q):
                first[k] = p
    return first


def entries_of(view: View, paths: list[bytes], first: dict[int, bytes] | None) -> list[Entry]:
    """The entries for these paths (in tree order; those not in the view skipped).
    A later name of a node names its first one: from `first` when given (the
    first name may lie in another partition), else the first met in `paths`."""
    out: list[Entry] = []
    seen: dict[int, bytes] = {}
    nodes = view.nodes
    for p in paths:
        node = nodes.get(p)
        if node is None or not p:
            continue
        if node.type == "d":
            out.append((p, node, None))
            continue
        if first is not None:
            f = first[id(node)]
            out.append((p, node, f if f != p else None))
        else:
            f = seen.setdefault(id(node), p)
            out.append((p, node, f if f != p else None))
    return out


def within(batches: Iterable[list[Entry]], top: bytes) -> Iterator[Entry]:
    """The entries strictly below `top` from a whole view's batches (all of them
    for the root).  A subtree is one run in tree order: past it, reading stops."""
    if not top:
        for batch in batches:
            yield from batch
        return
    prefix = tree_key(top) + b"\0"
    inside = False
    for batch in batches:
        for entry in batch:
            if tree_key(entry[0]).startswith(prefix):
                inside = True
                yield entry
            elif inside:
                return


def subtree_batches(source: "TreeEntries", top: bytes) -> Iterator[list[Entry]]:
    """The entries below `top`, with paths relative to it, in batches.  A file
    whose first name lies outside the subtree gets its data at its first name
    inside it."""
    if not top:
        yield from source.batches()
        return
    cut = len(top) + 1
    moved: dict[bytes, bytes] = {}  # first name outside -> first name inside
    out: list[Entry] = []
    for path, node, first in within(source.batches(), top):
        if first is not None:
            if first.startswith(top + b"/"):
                first = first[cut:]
            elif first in moved:
                first = moved[first]
            else:
                moved[first] = path[cut:]
                first = None
        out.append((path[cut:], node, first))
        if len(out) >= PARTITION_PATHS:
            yield out
            out = []
    if out:
        yield out


