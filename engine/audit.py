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

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from . import refs
from .api import LayerDB, _timeline, parse_path, show_path
from .errors import NotFound, UsageError
from .kinds import IGNORED, OPAQUE, PUT, WHITEOUT
from .replay import SUBTREE, Event, Node, View, decided_events, diff_events, event_count, tree_key

# A node's observable state, field by field, as the comparisons see it.
STATE_FIELDS = ("type", "mode", "uid", "gid", "mtime", "size", "sha256", "link", "devmajor", "devminor", "xattrs")

# Bound for `log -p`: both versions of a file are held to diff them, so larger
# contents get a one-line note instead (one content chunk, engine/content.py).
PATCH_LIMIT = 1 << 20

# SQLite caps host parameters per statement (32766 in the bundled SQLite); stay
# well below, and keep IN lists short enough for the planner to use the index.
BATCH = 500


def _ancestors(path: bytes) -> Iterator[bytes]:
    """Proper ancestors of a path, nearest first, down to the root b''."""
    while path:
        i = path.rfind(b"/")
        path = path[:i] if i >= 0 else b""
        yield path


def _batches(items: list, n: int = BATCH) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def state(node: Node | None) -> tuple | None:
    """What a view shows of a path, in STATE_FIELDS order.

    Directory mtimes are left out: they change whenever an entry below changes,
    which is reported on its own (and unpacking tools do not keep them).  Symlink
    permission bits are left out: Linux ignores them and tar writers disagree.
    """
    if node is None:
        return None
    t = node.type
    return (t, None if t == "l" else node.mode, node.uid, node.gid, None if t == "d" else node.mtime,
            node.size if t == "f" else None, node.sha256 if t == "f" else None, node.link,
            node.devmajor, node.devminor, node.xattrs or None)


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


def _change_row(path: bytes, before: Node | None, after: Node | None, c: tuple[str, str | None, list[str]]) -> dict:
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
            rows.append(_change_row(p, a, b, c))
    return rows


def diff(db: LayerDB, ref1: str, ref2: str, restrict: bool = True) -> list[dict]:
    """A/C/D per path from the view at ref1 to the view at ref2, in tree order
    (replay.tree_key: a directory, then its subtree, siblings by raw bytes).

    restrict=False never takes the restricted replay: both views are compared
    in full (the reference the restricted replay is tested against).
    iter_diff() gives the same rows as a stream.
    """
    return list(iter_diff(db, ref1, ref2, restrict))


def iter_diff(db: LayerDB, ref1: str, ref2: str, restrict: bool = True) -> Iterator[dict]:
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


def _diff_rows(db: LayerDB, ref1: str, ref2: str, restrict: bool) -> Iterator[dict | None]:
    from .export import TreeEntries

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
            yield _change_row(p, na, nb, c)


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
            scope.add(path)
            scope.update(_ancestors(path))
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


def changes(db: LayerDB, ref: str) -> list[dict]:
    """Each layer's change set against the layer below (A/C/D per path), newest layer first."""
    return list(iter_changes(db, ref))


def iter_changes(db: LayerDB, ref: str) -> Iterator[dict]:
    """changes() as a stream; a bad ref raises here, before the first row.

    Each layer is the diff of two chains, the layer's and the one below it,
    sharing all but that layer: as `diff`, a restricted replay of what the
    layer can reach, or both views streamed in tree order when it reaches much
    (a base layer): memory stays flat however many files a layer holds."""
    return db.stream(_change_rows(db, ref))


def _change_rows(db: LayerDB, ref: str) -> Iterator[dict | None]:
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
    from .export import TreeEntries

    views = _restricted_views(store, [a, b], k, RESTRICTED_PATHS)
    if views is not None:
        yield from compare_views(*views)
        return
    with TreeEntries(store, a, temp="layerdb_diff_a") as ta, TreeEntries(store, b, temp="layerdb_diff_b") as tb:
        yield from _compare_streams(ta.batches(), tb.batches())


# Waste -----------------------------------------------------------------------

@dataclass
class _Put:
    path: bytes
    position: int
    size: int
    sha256: bytes | None
    node: Node
    gone_at: int | None = None
    how: str | None = None


@dataclass
class _WasteSums:
    total: int = 0  # every file put's size
    smallest: int = 0  # per path, the smallest size it had (0 once the file left it)
    wasted: list[_Put] = field(default_factory=list)
    layer_bytes: dict[int, int] = field(default_factory=dict)  # file bytes each layer adds


def _waste_pass(sums: _WasteSums, layers: Iterable[Layer], members: set[bytes] | None) -> None:
    """Step through layers, adding to sums what the puts on `members` (None:
    every path) cost and whether the top view still shows them."""
    view = View()
    puts: list[_Put] = []
    by_node: dict[int, list[_Put]] = {}
    cum: dict[bytes, int] = {}
    least: dict[bytes, int] = {}
    for st in steps(layers, view):
        put_paths = set()
        file_puts = [(ev, node) for ev, node in st.file_puts if members is None or ev.path in members]
        for ev, node in file_puts:
            size = ev.size or 0
            rec = _Put(ev.path, st.position, size, ev.sha256, node)
            puts.append(rec)
            by_node.setdefault(id(node), []).append(rec)
            put_paths.add(ev.path)
            sums.layer_bytes[st.position] = sums.layer_bytes.get(st.position, 0) + size
            cum[ev.path] = cum.get(ev.path, 0) + size
            least[ev.path] = min(least.get(ev.path, size), size)
        after_at = {p: after for p, _, _, after in st.paths}
        for p, before, _, after in st.paths:
            if before is None or after is before:
                continue
            how = "deleted" if after is None else "overwritten"
            for rec in by_node.get(id(before), ()):
                rec.gone_at, rec.how = st.position, how
            if p in least and p not in put_paths:
                least[p] = 0  # the file left this path: dive counts a size 0 for it
        for ev, node in file_puts:
            if after_at.get(ev.path) is not node:  # the same path again later in this layer
                for rec in by_node[id(node)]:
                    if rec.gone_at is None:
                        rec.gone_at, rec.how = st.position, "overwritten"
    live = {id(n) for n in view.nodes.values()}
    sums.total += sum(cum.values())
    sums.smallest += sum(least.values())
    sums.wasted.extend(p for p in puts if id(p.node) not in live)


def waste(db: LayerDB, ref: str) -> dict:
    """dive's efficiency analysis over the event log.

    efficiency = sum over paths of the smallest size seen / sum of all file sizes
    added (a deletion or replacement of a file counts as a size 0, as in dive).
    Wasted bytes are file contents a layer ships that the top view does not show:
    overwritten (even by identical bytes, as a chmod in a RUN step does) or
    deleted later.  A file still reachable through another hard-linked name is
    not wasted.

    user_wasted_percent = wasted bytes / user bytes, a fraction as in dive
    (its WastedUserPercent): the user bytes are the file bytes of every layer
    but the bottom one (dive's "all bytes except for the base image").  With
    no user bytes (a one-layer image) it is None: dive's ratio is then NaN
    when nothing is wasted and +Inf otherwise (see waste_failures).
    """
    from .export import TreeEntries, large

    store = db.store
    sums = _WasteSums()
    with store.read():
        r = refs.resolve(store, ref)
        created_by = db.created_by(r)
        chain_ids = {li.position: li.chain_id for li in r.layers}
        if not large(store, r.chain):
            _waste_pass(sums, chain_layers(store.conn, r.chain), None)
        else:
            # Path by path, the analysis is additive: each partition of paths
            # (with the events that decide them) is analysed on its own, so
            # memory holds a partition and the wasted files found, not the image.
            with TreeEntries(store, r.chain, temp="layerdb_waste") as parts:
                for paths, events in parts.partitions():
                    _waste_pass(sums, event_layers(events), set(paths))
    total, smallest, wasted, layer_bytes = sums.total, sums.smallest, sums.wasted, sums.layer_bytes
    per_layer: dict[int, int] = {}
    for p in wasted:
        per_layer[p.position] = per_layer.get(p.position, 0) + p.size
    wasted.sort(key=lambda p: (-p.size, p.path, p.position))
    wasted_bytes = sum(p.size for p in wasted)
    user = sum(layer_bytes.get(li.position, 0) for li in r.layers[1:])
    return {
        "image": r.image_digest,
        "repo_tags": r.tags,
        "efficiency": smallest / total if total else 1.0,
        "total_bytes": total,
        "smallest_bytes": smallest,
        "wasted_bytes": wasted_bytes,
        "user_bytes": user,
        "user_wasted_percent": wasted_bytes / user if user else None,
        "layers": [{"position": li.position, "layer_id": li.chain_id, "created_by": created_by.get(li.position),
                    "size": layer_bytes.get(li.position, 0), "wasted_bytes": per_layer.get(li.position, 0)}
                   for li in r.layers],
        "files": [{"path": show_path(p.path), "position": p.position, "layer_id": chain_ids[p.position],
                   "size": p.size, "sha256": p.sha256.hex() if p.sha256 else None, "how": p.how,
                   "wasted_by": p.gone_at, "wasted_by_layer_id": chain_ids.get(p.gone_at),
                   "wasted_by_created_by": created_by.get(p.gone_at)} for p in wasted],
    }


def waste_failures(report: dict, lowest_efficiency: float | None, highest_wasted_bytes: int | None,
                   highest_user_wasted_percent: float | None = None) -> list[str]:
    """The thresholds (dive --ci style) that the report fails, as sentences."""
    out = []
    for name, value in (("--lowest-efficiency", lowest_efficiency),
                        ("--highest-user-wasted-percent", highest_user_wasted_percent)):
        if value is not None and not 0 <= value <= 1:
            raise UsageError(f"{name} must be between 0 and 1, not {value}")
    if lowest_efficiency is not None and report["efficiency"] < lowest_efficiency:
        out.append(f"efficiency {report['efficiency']:.4f} is below {lowest_efficiency}")
    if highest_wasted_bytes is not None and report["wasted_bytes"] > highest_wasted_bytes:
        out.append(f"wasted bytes {report['wasted_bytes']} exceed {highest_wasted_bytes}")
    if highest_user_wasted_percent is not None:
        share = report["user_wasted_percent"]
        if share is None:  # no user bytes: dive's ratio is NaN (passes) or +Inf (fails)
            if report["wasted_bytes"]:
                out.append(f"wasted bytes {report['wasted_bytes']} with no user bytes (one layer) exceed "
                           f"{highest_user_wasted_percent} of them")
        elif share > highest_user_wasted_percent:
            out.append(f"wasted bytes are {share:.4f} of the user bytes, above {highest_user_wasted_percent}")
    return out


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
class _Hit:
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


class _Finder:
    """Caches per layer and image, so that each is looked up once per search."""

    def __init__(self, db: LayerDB):
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


def find(db: LayerDB, name: str | bytes | None = None, path: str | bytes | None = None,
         sha256: str | None = None, visible_only: bool = False) -> list[dict]:
    """Every file put by any stored layer that matches, in every image holding that layer.

    visible: the image's top view still shows this path with this content (same
    type and sha256, or link target); otherwise the layer still ships the bytes
    but they were deleted or overwritten above it.
    """
    if name is None and path is None and sha256 is None:
        raise UsageError("find needs --name, --path or --sha256")
    store = db.store
    f = _Finder(db)
    rows: list[dict] = []
    with store.read():
        hits: list[_Hit] = []
        if sha256 is not None:
            lo, hi = _sha_range(sha256)
            sql, args = FIND_BLOB, (lo, hi)
            if name is not None or path is not None:
                where, pargs = path_filter(name, path, "p.")
                sql += " AND " + where
                args += pargs
            hits = [_Hit(*r) for r in store.execute(sql, args)]
            hits += _links_to(store, hits)
        else:
            sql, args = find_path_query(name, path)
            ids = [pid for (pid,) in store.execute(sql, args)]
            for batch in _batches(ids):
                hits.extend(_Hit(*r) for r in store.execute(FIND_PUTS_ON.format(_marks(len(batch))), batch))
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


def _content(f: _Finder, h: _Hit, layer: int) -> tuple | None:
    """(type, sha256, link, size) of a hit; a hard link shows its file as the view at its layer has it."""
    if h.type == "h":
        return f.shown(layer, None, h.path)
    return (h.type, h.sha256, h.link, h.size)


def _same(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and a[:3] == b[:3]


def _links_to(store, hits: list[_Hit]) -> list[_Hit]:
    """Hard-link entries that name one of the hits' paths, or name such a link (they have no blob
    of their own); find checks, layer by layer, which of them show the wanted content."""
    out: list[_Hit] = []
    frontier = sorted({h.path_id for h in hits})
    seen = set(frontier)
    while frontier:
        nxt = []
        for batch in _batches(frontier):
            for r in store.execute(FIND_LINKS_TO.format(_marks(len(batch))), batch):
                h = _Hit(*r)
                out.append(h)
                if h.path_id not in seen:
                    seen.add(h.path_id)
                    nxt.append(h.path_id)
        frontier = nxt
    return out


# Log ---------------------------------------------------------------------------

LOG_DIFFS = "SELECT DISTINCT diff_id FROM event WHERE path_id = ?"


def log_all(db: LayerDB, path: bytes) -> list[dict]:
    """The timeline of a path in every image whose chain touches it, one image after another.

    Each row's `shared_with` lists the other images whose chain holds the same
    layer (same chain id): one stored event, seen from several images.
    """
    store = db.store
    f = _Finder(db)
    pid = store.path_id(path)
    diffs = [d for (d,) in store.execute(LOG_DIFFS, (pid,))] if pid is not None else []
    images: dict[int, tuple[int, str, int]] = {}
    for d in diffs:
        for layer, _, _ in f.layers_of(d):
            for img in f.images_above(layer):
                images[img[0]] = img
    per_image = []
    holders: dict[str, list[str]] = {}
    for rowid, digest, top in images.values():
        r = f.at(top, (rowid, digest))
        rows = _timeline(path, db._closure_events(r, path), r, db.created_by(r),
                         {li.position: li.chain_id for li in r.layers})
        if not rows:
            continue
        for li in r.layers:
            holders.setdefault(li.chain_id, []).append(r.label())
        per_image.append((r.label(), digest, rows))
    per_image.sort(key=lambda t: (t[0], t[1]))
    out = []
    for label, _, rows in per_image:
        for i, row in enumerate(rows, 1):
            row["version"] = i
            row["shared_with"] = [x for x in holders.get(row["layer_id"], []) if x != label]
            out.append(row)
    return out


def _blob(db: LayerDB, row: dict) -> int:
    return db.content.blob_id(bytes.fromhex(row["sha256"]))


def _version_bytes(db: LayerDB, row: dict) -> bytes:
    """A version's contents for diffing (at most PATCH_LIMIT bytes): file bytes or symlink target."""
    if row["type"] == "l":
        return (row["link"] or "").encode("utf-8", "surrogateescape")
    return b"".join(db.content.iter_blob(_blob(db, row))) if row["size"] else b""


def _binary(db: LayerDB, row: dict) -> bool:
    """git's rule: a NUL byte in the first 8000 bytes makes a file binary."""
    if row["type"] != "f" or not row["size"]:
        return False
    head = b""
    for chunk in db.content.iter_blob(_blob(db, row)):
        head += chunk[: 8000 - len(head)]
        if len(head) >= 8000:
            break
    return b"\0" in head


def _lines(data: bytes) -> list[str]:
    # Lines end at \n only, as for git (str.splitlines would also cut at \r, \f, ...).
    parts = data.decode("utf-8", "surrogateescape").split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1] + "\n\\ No newline at end of file\n")
    return lines


def patch(db: LayerDB, path: bytes, old: dict | None, new: dict) -> str:
    """A git-style patch from one version of a path (None: absent) to the next."""
    shown = show_path(path)
    a_present = old is not None and old["op"] != "delete"
    b_present = new["op"] != "delete"
    a = "a" + shown if a_present else "/dev/null"
    b = "b" + shown if b_present else "/dev/null"
    head = ""
    if a_present and b_present:
        for key, label in (("type", "type"), ("mode", "mode")):
            if old[key] != new[key]:
                head += f"old {label} {old[key]}\nnew {label} {new[key]}\n"
        if (old["uid"], old["gid"]) != (new["uid"], new["gid"]):
            head += f"old owner {old['uid']}:{old['gid']}\nnew owner {new['uid']}:{new['gid']}\n"
        if old["type"] == new["type"] and (old["sha256"], old["link"]) == (new["sha256"], new["link"]):
            return head
    versions = [v for v, present in ((old, a_present), (new, b_present)) if present]
    if any(v["type"] not in ("f", "l") for v in versions):
        return head  # directories, devices, fifos: no contents to show
    if any(_binary(db, v) for v in versions):
        return head + f"Binary files {a} and {b} differ\n"
    if any(v["type"] == "f" and (v["size"] or 0) > PATCH_LIMIT for v in versions):
        sizes = " -> ".join(str(v["size"]) for v in versions)
        return head + f"Contents larger than {PATCH_LIMIT} bytes not shown ({sizes} bytes)\n"
    texts = [_lines(_version_bytes(db, v)) if present else [] for v, present in ((old, a_present), (new, b_present))]
    import difflib  # only `log -p` needs it

    return head + "".join(difflib.unified_diff(texts[0], texts[1], a, b))


def add_patches(db: LayerDB, path: bytes, rows: list[dict]) -> None:
    """Give every row a `patch` against the previous version in the same image's timeline."""
    with db.store.read():
        prev: dict | None = None
        for row in rows:
            if row["version"] == 1:
                prev = None
            row["patch"] = patch(db, path, prev, row)
            prev = row


def version_contents(db: LayerDB, path: str | bytes, version: int, image: str | None = None) -> Iterator[bytes]:
    """The contents of the version-th entry (1 = oldest) of a path's log: file bytes or link target."""
    p = parse_path(path)
    rows = db.log(p, image=image)
    if not 1 <= version <= len(rows):
        raise UsageError(f"{show_path(p)} has {len(rows)} version(s) in {rows[0]['image']}; "
                         f"--at-version takes 1 to {len(rows)}")
    row = rows[version - 1]
    if row["op"] == "delete":
        raise NotFound(f"{show_path(p)}: version {version} is its deletion (position {row['position']})")
    if row["type"] == "l":
        yield (row["link"] or "").encode("utf-8", "surrogateescape")
        return
    if row["type"] != "f":
        raise UsageError(f"{show_path(p)}: version {version} is a {row['type']!r} entry, not a file")
    if row["size"]:
        with db.store.read():
            yield from db.content.iter_blob(_blob(db, row))
