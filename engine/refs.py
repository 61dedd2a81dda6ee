"""Resolving REFs: NAME[:TAG], image id prefixes, layer (chain) ids, and ~N."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import AmbiguousRef, NotFound, UsageError
from .store import Store

MIN_PREFIX = 6
_HEX = re.compile(r"^(sha256:)?([0-9a-f]+)$")
_TILDE = re.compile(r"^(.*?)((?:~\d*)+)$")


@dataclass
class LayerInfo:
    position: int
    layer_rowid: int | None  # None: a container's writable top, which is no layer row
    chain_id: str  # for a container's top: its diff_id, 'container:<hex>'
    diff_rowid: int
    diff_id: str


@dataclass
class Resolved:
    """A point in a chain, and the image it was reached from (if any)."""

    ref: str
    layers: list[LayerInfo]  # bottom .. the resolved layer
    image_rowid: int | None = None
    image_digest: str | None = None
    tags: list[str] = field(default_factory=list)
    container: str | None = None  # the container's name, when REF is a container (its log is the top)

    @property
    def position(self) -> int:
        return len(self.layers)

    @property
    def chain(self) -> list[tuple[int, int]]:
        return [(li.position, li.diff_rowid) for li in self.layers]

    @property
    def chain_id(self) -> str | None:
        return self.layers[-1].chain_id if self.layers else None

    def label(self) -> str:
        if self.container:
            return self.container
        if self.tags:
            return self.tags[0]
        if self.image_digest:
            return short(self.image_digest)
        return short(self.chain_id)


def normalize_tag(t: str) -> str:
    """'name' -> 'name:latest'; a tag is what follows ':' in the last path part."""
    last = t.rsplit("/", 1)[-1]
    if "@" in t:
        return t
    return t if ":" in last else t + ":latest"


def short(digest: str | None) -> str:
    return digest.partition(":")[2][:12] if digest else ""


def _parse_tilde(ref: str) -> tuple[str, int]:
    m = _TILDE.match(ref)
    if not m:
        return ref, 0
    n = 0
    for part in m.group(2).split("~")[1:]:
        n += int(part) if part else 1
    return m.group(1), n


def chain_of(store: Store, layer_rowid: int) -> list[LayerInfo]:
    rows = store.execute(
        """WITH RECURSIVE c(id) AS (SELECT ? UNION ALL SELECT l.parent_id FROM layer l JOIN c ON l.id = c.id
                                   WHERE l.parent_id IS NOT NULL)
           SELECT l.position, l.id, l.chain_id, l.diff_id, d.diff_id
           FROM c JOIN layer l ON l.id = c.id JOIN diff d ON d.id = l.diff_id ORDER BY l.position""",
        (layer_rowid,),
    ).fetchall()
    return [LayerInfo(*r) for r in rows]


def image_tags(store: Store, image_rowid: int) -> list[str]:
    return [r[0] for r in store.execute("SELECT name FROM tag WHERE image_id = ? ORDER BY name", (image_rowid,))]


def resolve(store: Store, ref: str) -> Resolved:
    """Resolve a REF (see DESIGN.md); unknown or ambiguous REFs raise with the candidates."""
    if not ref:
        raise UsageError("empty REF")
    base, down = _parse_tilde(ref)
    ctr = find_container(store, base)
    if ctr is not None:
        _check_unique(store, base, ctr)
        name, diff_rowid, diff_id, rowid, digest, top = ctr
        layers = chain_of(store, top) if top is not None else []
        layers.append(LayerInfo(len(layers) + 1, None, diff_id, diff_rowid, diff_id))
        res = Resolved(ref, layers, rowid, digest, image_tags(store, rowid), container=name)
    elif (image := find_image(store, base)) is not None:
        rowid, digest, top = image
        layers = chain_of(store, top) if top is not None else []
        res = Resolved(ref, layers, rowid, digest, image_tags(store, rowid))
    else:
        layer = _find_layer(store, base)
        if layer is None:
            raise NotFound(f"no image, layer or container matches {base!r} (see `layerdb images`)")
        res = Resolved(ref, chain_of(store, layer))
        # Borrow an image that contains this layer, for its history (created_by).
        img = store.one(
            """WITH RECURSIVE d(id) AS (SELECT ? UNION ALL SELECT l.id FROM layer l JOIN d ON l.parent_id = d.id)
               SELECT i.id, i.digest FROM image i JOIN d ON i.top_layer = d.id ORDER BY i.id LIMIT 1""",
            (layer,),
        )
        if img is not None:
            res.image_rowid, res.image_digest = img
    if down:
        if down >= len(res.layers):
            raise NotFound(f"{ref}: {base} has {len(res.layers)} layer(s); ~{down} goes below the bottom")
        res.layers = res.layers[: len(res.layers) - down]
        res.tags = [] if res.image_rowid is None else res.tags
        res.container = None
    return res


CONTAINER_ID = "container:"
_CONTAINER_ROW = (
    "SELECT c.name, d.id, d.diff_id, i.id, i.digest, c.layer_id FROM container c"
    " JOIN diff d ON d.id = c.diff_id JOIN image i ON i.id = c.image_id"
)


def find_container(store: Store, name: str):
    """(name, diff rowid, diff_id, image rowid, image digest, top layer rowid) of the
    container named `name`, or with that id ('container:<hex>', or a hex prefix of
    at least MIN_PREFIX digits); None when there is none."""
    row = store.one(_CONTAINER_ROW + " WHERE c.name = ?", (name,))
    if row is not None:
        return row
    hex_ = name[len(CONTAINER_ID):] if name.startswith(CONTAINER_ID) else name
    if len(hex_) < MIN_PREFIX or not _HEX.match(hex_) or hex_.startswith("sha256:"):
        return None
    prefix = CONTAINER_ID + hex_
    rows = store.execute(_CONTAINER_ROW + " WHERE d.diff_id >= ? AND d.diff_id < ? ORDER BY d.diff_id LIMIT 11",
                         (prefix, prefix + "g")).fetchall()
    if len(rows) > 1:
        raise AmbiguousRef(f"{name!r} is ambiguous: it matches containers {', '.join(r[0] for r in rows[:10])}")
    return rows[0] if rows else None


def _check_unique(store: Store, name: str, ctr) -> None:
    """A container name or id that also names an image or a layer is ambiguous."""
    try:
        other = find_image(store, name) is not None or _find_layer(store, name) is not None
    except AmbiguousRef:
        other = True
    if other:
        raise AmbiguousRef(f"{name!r} is ambiguous: it names container {ctr[0]} ({ctr[2]}) and an image or layer;"
                           " use the image's NAME:TAG or the container's full id")


def find_image(store: Store, name: str):
    exact = store.one(
        "SELECT i.id, i.digest, i.top_layer FROM tag t JOIN image i ON i.id = t.image_id WHERE t.name = ?",
        (normalize_tag(name),),
    )
    if exact is not None:
        return exact
    # A short name: "app" or "app:1" for "localhost/app:1" or "docker.io/library/app:1".
    want = normalize_tag(name)
    rows = store.execute(
        "SELECT t.name, i.id, i.digest, i.top_layer FROM tag t JOIN image i ON i.id = t.image_id"
        " WHERE t.name LIKE ? ESCAPE '\\'",
        ("%/" + want.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_"),),
    ).fetchall()
    if len({r[1] for r in rows}) == 1:
        return rows[0][1:]
    if len(rows) > 1:
        raise AmbiguousRef(f"{name!r} is ambiguous: it could be {', '.join(sorted(r[0] for r in rows))}")
    m = _HEX.match(name)
    if not m or len(m.group(2)) < MIN_PREFIX:
        return None
    prefix = "sha256:" + m.group(2)
    imgs = store.execute(
        "SELECT id, digest, top_layer FROM image WHERE digest >= ? AND digest < ? ORDER BY digest",
        (prefix, prefix + "g"),
    ).fetchall()
    layers = store.execute(
        "SELECT chain_id FROM layer WHERE chain_id >= ? AND chain_id < ? ORDER BY chain_id", (prefix, prefix + "g")
    ).fetchall()
    if len(imgs) == 1 and not layers:
        return imgs[0]
    if len(imgs) + len(layers) > 1:
        cands = [f"image {d}" for _, d, _ in imgs] + [f"layer {c}" for (c,) in layers]
        raise AmbiguousRef(f"{name!r} is ambiguous: it matches {'; '.join(cands[:10])}")
    return None


def _find_layer(store: Store, name: str) -> int | None:
    m = _HEX.match(name)
    if not m or len(m.group(2)) < MIN_PREFIX:
        return None
    prefix = "sha256:" + m.group(2)
    rows = store.execute(
        "SELECT id, chain_id FROM layer WHERE chain_id >= ? AND chain_id < ? ORDER BY chain_id LIMIT 11",
        (prefix, prefix + "g"),
    ).fetchall()
    if len(rows) > 1:
        raise AmbiguousRef(f"{name!r} is ambiguous: it matches layers {', '.join(c for _, c in rows[:10])}")
    return rows[0][0] if rows else None
