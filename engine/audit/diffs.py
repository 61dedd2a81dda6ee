"""Audits over the event log: path timelines across images, view diffs, indexed search,
wasted bytes and per-layer change sets.

Two replay strategies serve them (both apply engine/replay.py's rules):

- `diff` of two views that share a chain prefix replays only the events that can
  make them differ: the events of the layers above the shared prefix name a few
  paths; a whiteout, opaque directory or non-directory put also reaches the
  subtree below its path (an index range on path(path)); every path's ancestors
  and hard-link partners decide it too.  Those events are fetched along both
  chains through the path index and replayed into two small views.
- `changes` (history --changes) and `waste` need every layer anyway: they replay
  the chain once, layer by layer, and compare only the paths a layer can reach
  (its event paths, their ancestors, subtrees below deletions and replacements,
  other names of hard-linked files), before and after that layer.

Nothing here prints: functions return rows (dicts, JSON-ready) for the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from .. import refs
from ..kinds import IGNORED, OPAQUE, PUT, WHITEOUT
from ..paths import add_with_ancestors, show_path
from ..reader import Reader
from ..replay import SUBTREE, Event, Node, View, decided_events, diff_events, event_count, tree_key
from .common import STATE_FIELDS, state

def classify(before: tuple | None, after: tuple | None) -> tuple[str, str | None, list[str]] | None:
    """(change, what, fields) between two states, or None when they are equal."""
    if before == after:
        return None
    if before is None:
        return "A", None, []
    if after is None:
        return "D", None, []
    fields = [f for f, x, y in zip(STATE_FIELDS, before, after) if x != y]
    if before[0] != after[0]:
        return "C", "type", fields
    if "sha256" in fields or "size" in fields:
        return "C", "content", fields
    return "C", "metadata", fields


def change_row(path: bytes, before: Node | None, after: Node | None, c: tuple[str, str | None, list[str]]) -> dict:
    change, what, fields = c
    node = after if after is not None else before
    row = {
        "path": show_path(path),
        "change": change,
        "what": what,
        "fields": fields,
        "type": node.type,
        "size": node.size if node.type == "f" else None,
        "sha256": node.sha256.hex() if node.type == "f" and node.sha256 else None,
    }
    if change == "C":
        row["old_type"] = before.type
        row["old_size"] = before.size if before.type == "f" else None
        row["old_sha256"] = before.sha256.hex() if before.type == "f" and before.sha256 else None
    return row


# Diff ---------------------------------------------------------------------------

def _reaches_subtree(kind: int, type_: str | None) -> bool:
    """Whether an event can remove what lies below its path."""
    return kind in (OPAQUE, WHITEOUT) or (kind == PUT and type_ != "d")


SCOPE_EVENTS = (
    "SELECT e.kind, p.path, e.type, t.path FROM event e JOIN path p ON p.id = e.path_id"
    " LEFT JOIN path t ON t.id = e.target_id WHERE e.diff_id = ?"
)


def _subtree_bounds(path: bytes) -> tuple[bytes, bytes]:
    # Every path below D sorts between b'D/' and b'D0' ('0' follows '/').
    return path + b"/", path + b"0"


def _restricted_views(store, chains: list[list[tuple[int, int]]], k: int,
                      limit: int | None = None) -> list[View] | None:
    """Views of the given chains (which share their first k layers), replayed only
    from the events that can differ between them; None when that is everything,
    or when more than `limit` paths are in reach (events above the prefix, then
    named paths and subtrees below deletions and replacements)."""
    if limit is not None:
        if event_count(store, (diff for chain in chains for _, diff in chain[k:])) > limit:
            return None
    named: set[bytes] = set()
    roots: set[bytes] = set()
    for chain in chains:
        for _, diff in chain[k:]:
            for kind, path, type_, target in store.execute(SCOPE_EVENTS, (diff,)):
                if kind == IGNORED:
                    continue
                named.add(path)
                if target is not None:
                    named.add(target)
                if _reaches_subtree(kind, type_):
                    roots.add(path)
    if b"" in roots:
        return None
    subtrees: list[tuple[int, bytes]] = []
    for root in sorted(roots):
        subtrees.extend(store.execute(SUBTREE, _subtree_bounds(root)))
        if limit is not None and len(named) + len(subtrees) > limit:
            return None
    events = decided_events(store, chains, named, known=subtrees)
    views = []
    for evs in events:
        views.append(View().replay(evs))
    return views


def _common_prefix(a: refs.Resolved, b: refs.Resolved) -> int:
    k = 0
    for x, y in zip(a.layers, b.layers):
        # A container's writable top has no layer row (None): never shared.
        if x.layer_rowid is None or x.layer_rowid != y.layer_rowid:
            break
        k += 1
    return k


def compare_views(va: View, vb: View) -> list[dict]:
    """The change rows from va to vb, in tree order (replay.tree_key)."""
    rows = []
    for p in sorted(va.nodes.keys() | vb.nodes.keys(), key=tree_key):
        if not p:
            continue  # the root always exists; its attributes are not an image change
        a, b = va.nodes.get(p), vb.nodes.get(p)
        c = classify(state(a), state(b))
        if c is not None:
            rows.append(change_row(p, a, b, c))
    return rows


def diff(db: Reader, ref1: str, ref2: str, restrict: bool = True) -> list[dict]:
    """A/C/D per path from the view at ref1 to the view at ref2, in tree order
    (replay.tree_key: a directory, then its subtree, siblings by raw bytes).

    restrict=False never takes the restricted replay: both views are compared
    in full (the reference the restricted replay is tested against).
    iter_diff() gives the same rows as a stream.
    """
    return list(iter_diff(db, ref1, ref2, restrict))


def iter_diff(db: Reader, ref1: str, ref2: str, restrict: bool = True) -> Iterator[dict]:
    """diff() as an iterator; errors in the refs are raised here, before the first row.

    Refs sharing a chain prefix, whose layers above it reach at most
    RESTRICTED_PATHS paths, replay only those (_restricted_views).  Otherwise
    both views stream in tree order from export.TreeEntries (a large chain
    replays partition by partition) and are merged path by path: memory stays
    flat however many files the images hold.
    """
    return db.stream(_diff_rows(db, ref1, ref2, restrict))


# Beyond this many paths in reach, the restricted replay's two views would hold
# as much as a whole one: the streamed comparison is used instead.
RESTRICTED_PATHS = 32768


def _diff_rows(db: Reader, ref1: str, ref2: str, restrict: bool) -> Iterator[dict | None]:
    from ..tree import TreeEntries

    store = db.store
    with store.read():
        a = refs.resolve(store, ref1)
        b = refs.resolve(store, ref2)
        k = _common_prefix(a, b)
        yield None
        if restrict and k:
            yield from _chain_diff(store, a.chain, b.chain, k)
            return
        with TreeEntries(store, a.chain, temp="layerdb_diff_a") as ta, \
                TreeEntries(store, b.chain, temp="layerdb_diff_b") as tb:
            yield from _compare_streams(ta.batches(), tb.batches())


def _tree_stream(batches) -> Iterator[tuple[bytes, bytes, Node]]:
    for batch in batches:
        for p, node, _ in batch:
            yield tree_key(p), p, node


def _compare_streams(xa, xb) -> Iterator[dict]:
    """Two views' entries (batches in tree order) merged path by path: the change rows."""
    ia, ib = _tree_stream(xa), _tree_stream(xb)
    x, y = next(ia, None), next(ib, None)
    while x is not None or y is not None:
        if y is None or (x is not None and x[0] < y[0]):
            p, na, nb = x[1], x[2], None
            x = next(ia, None)
        elif x is None or y[0] < x[0]:
            p, na, nb = y[1], None, y[2]
            y = next(ib, None)
        else:
            p, na, nb = x[1], x[2], y[2]
            x, y = next(ia, None), next(ib, None)
        c = classify(state(na), state(nb))
        if c is not None:
            yield change_row(p, na, nb, c)


def diff_stat(rows: Iterable[dict]) -> dict:
    """Counts per change kind and the file bytes that came and went."""
    s = {"added": 0, "changed": 0, "deleted": 0, "content": 0, "metadata": 0, "type": 0,
         "bytes_added": 0, "bytes_removed": 0}
    for r in rows:
        if r["change"] == "A":
            s["added"] += 1
            s["bytes_added"] += r["size"] or 0
        elif r["change"] == "D":
            s["deleted"] += 1
            s["bytes_removed"] += r["size"] or 0
        else:
            s["changed"] += 1
            s[r["what"]] += 1
            if r["what"] != "metadata":
                s["bytes_added"] += r["size"] or 0
                s["bytes_removed"] += r["old_size"] or 0
    return s


# Layer by layer -------------------------------------------------------------------

@dataclass
class Step:
    """One layer replayed: the paths it could change, before and after it."""

    position: int
    paths: list[tuple[bytes, Node | None, tuple | None, Node | None]]  # (path, before, state before, after)
    file_puts: list[tuple[Event, Node]]  # regular-file puts, with the node each one made


def _subtree(view: View, path: bytes, out: set[bytes]) -> None:
    stack = [path]
    while stack:
        for c in view.children.get(stack.pop(), ()):
            out.add(c)
            stack.append(c)


# A layer to step through: its position, and two ways to read its events: as
# (kind, path, type, target) rows, and as Events in replay order.
Layer = tuple[int, Callable[[], Iterable[tuple]], Callable[[], Iterable[Event]]]


def chain_layers(conn, chain: list[tuple[int, int]]) -> Iterator[Layer]:
    """A chain's layers read from the store (twice each, rather than held: a
    big layer's event list never sits in memory, only the paths it reaches)."""
    for pos, diff in chain:
        yield (pos, lambda diff=diff: conn.execute(SCOPE_EVENTS, (diff,)),
               lambda diff=diff, pos=pos: diff_events(conn, diff, pos))


def event_layers(events: list[Event]) -> Iterator[Layer]:
    """The layers of some events in replay order (a partition's), held."""
    i = 0
    while i < len(events):
        j = i
        while j < len(events) and events[j].position == events[i].position:
            j += 1
        evs = events[i:j]
        yield (evs[0].position, lambda evs=evs: [(e.kind, e.path, e.type, e.target) for e in evs],
               lambda evs=evs: evs)
        i = j


def steps(layers: Iterable[Layer], view: View) -> Iterator[Step]:
    """Replay layers into `view` one by one, yielding what each layer changed."""
    for pos, scope_rows, layer_events in layers:
        scope: set[bytes] = set()
        link_targets = []
        for kind, path, type_, target in scope_rows():
            if kind == IGNORED:
                continue
            add_with_ancestors(path, scope)
            if _reaches_subtree(kind, type_):
                _subtree(view, path, scope)
            if target is not None:
                link_targets.append(target)
        if link_targets:
            # A link header sets the shared file's metadata: every other name changes too.
            shared = {id(view.nodes[t]) for t in link_targets if t in view.nodes}
            scope.update(link_targets)
            scope.update(p for p, n in view.nodes.items() if id(n) in shared)
        scope.discard(b"")
        before = {p: view.nodes.get(p) for p in scope}
        before_state = {p: state(n) for p, n in before.items()}
        puts = []
        for ev in layer_events():
            view.apply(ev)
            if ev.kind == PUT and ev.type == "f":
                puts.append((ev, view.nodes[ev.path]))
        yield Step(pos, [(p, before[p], before_state[p], view.nodes.get(p)) for p in sorted(scope)], puts)


def changes(db: Reader, ref: str) -> list[dict]:
    """Each layer's change set against the layer below (A/C/D per path), newest layer first."""
    return list(iter_changes(db, ref))


def iter_changes(db: Reader, ref: str) -> Iterator[dict]:
    """changes() as a stream; a bad ref raises here, before the first row.

    Each layer is the diff of two chains, the layer's and the one below it,
    sharing all but that layer: as `diff`, a restricted replay of what the
    layer can reach, or both views streamed in tree order when it reaches much
    (a base layer): memory stays flat however many files a layer holds."""
    return db.stream(_change_rows(db, ref))


def _change_rows(db: Reader, ref: str) -> Iterator[dict | None]:
    store = db.store
    with store.read():
        r = refs.resolve(store, ref)
        created_by = db.created_by(r)
        chain_ids = {li.position: li.chain_id for li in r.layers}
        yield None
        for k in range(len(r.chain), 0, -1):
            pos = r.chain[k - 1][0]
            head = {"position": pos, "layer_id": chain_ids[pos], "created_by": created_by.get(pos)}
            for row in _chain_diff(store, r.chain[:k - 1], r.chain[:k], k - 1):
                yield {**head, **row}


def _chain_diff(store, a: list[tuple[int, int]], b: list[tuple[int, int]], k: int) -> Iterator[dict]:
    """The change rows from chain a's view to chain b's (sharing their first k
    layers), in tree order: restricted, else streamed."""
    from ..tree import TreeEntries

    views = _restricted_views(store, [a, b], k, RESTRICTED_PATHS)
    if views is not None:
        yield from compare_views(*views)
        return
    with TreeEntries(store, a, temp="layerdb_diff_a") as ta, TreeEntries(store, b, temp="layerdb_diff_b") as tb:
        yield from _compare_streams(ta.batches(), tb.batches())
