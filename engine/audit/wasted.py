"""Wasted bytes per layer and image efficiency, as dive scores them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .. import refs
from ..errors import UsageError
from ..paths import show_path
from ..reader import Reader
from ..replay import Node, View
from .diffs import Layer, chain_layers, event_layers, steps

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


def waste(db: Reader, ref: str) -> dict:
    """dive's efficiency analysis, and layerdb's own account of what is wasted.

    The top-level figures are dive's, exactly (efficiency.py: its formula and
    quirks, from the events): efficiency, wasted_bytes (every byte of every
    path some layer names twice or more), size_bytes, user_bytes (every layer
    but the bottom one) and user_wasted_percent (wasted / user, None without
    user bytes: dive's NaN or +Inf, see waste_failures), and its list of
    inefficient paths.  `--ci` checks these, as `dive --ci` does.

    `own` holds layerdb's figures where they differ from dive's.  Its wasted
    bytes are file contents a layer ships that the top view does not show:
    overwritten (even by identical bytes, as a chmod in a RUN step does) or
    deleted later, a file still reachable through another hard-linked name
    not counted; its efficiency is the sum over paths of the smallest size
    seen / the sum of all file sizes added, a deletion or replacement of a
    file counting as a size 0.  The per-layer wasted bytes and the files list
    (which later layer wasted each file, and how) are layerdb's own: dive has
    no such attribution.
    """
    from ..tree import TreeEntries, large
    from .efficiency import dive_efficiency

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
        dive = dive_efficiency(store, r.chain)
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
        "efficiency": dive["efficiency"],
        "wasted_bytes": dive["wasted_bytes"],
        "size_bytes": dive["size_bytes"],
        "user_bytes": dive["user_size_bytes"],
        "user_wasted_percent": dive["wasted_user_percent"],
        "inefficiencies": [{"path": show_path(i["path"]), "count": i["count"], "size": i["size"]}
                           for i in dive["inefficiencies"]],
        "own": {
            "efficiency": smallest / total if total else 1.0,
            "total_bytes": total,
            "smallest_bytes": smallest,
            "wasted_bytes": wasted_bytes,
            "user_wasted_percent": wasted_bytes / user if user else None,
        },
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
    """The thresholds (dive --ci's rules, on dive's figures) that the report fails, as sentences."""
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
