"""A path's timeline: every add, modify and delete along a chain (`log`), in
one image or in all, with patches between versions."""

from __future__ import annotations

from typing import Iterator

from .. import refs
from ..errors import NotFound, UsageError
from ..paths import parse_path, show_path
from ..reader import Reader
from ..replay import Event, Node, View
from ..kinds import OPAQUE, PUT, WHITEOUT
from .search import Finder

# Bound for `log -p`: both versions of a file are held to diff them, so larger
# contents get a one-line note instead (one content chunk, engine/content.py).
PATCH_LIMIT = 1 << 20

# Log ---------------------------------------------------------------------------

LOG_DIFFS = "SELECT DISTINCT diff_id FROM event WHERE path_id = ?"


def log_all(db: Reader, path: bytes) -> list[dict]:
    """The timeline of a path in every image whose chain touches it, one image after another.

    Each row's `shared_with` lists the other images whose chain holds the same
    layer (same chain id): one stored event, seen from several images.
    """
    store = db.store
    f = Finder(db)
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
        rows = timeline(path, db.closure_events(r, path), r, db.created_by(r),
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


def _blob(db: Reader, row: dict) -> int:
    return db.content.blob_id(bytes.fromhex(row["sha256"]))


def _version_bytes(db: Reader, row: dict) -> bytes:
    """A version's contents for diffing (at most PATCH_LIMIT bytes): file bytes or symlink target."""
    if row["type"] == "l":
        return (row["link"] or "").encode("utf-8", "surrogateescape")
    return b"".join(db.content.iter_blob(_blob(db, row))) if row["size"] else b""


def _binary(db: Reader, row: dict) -> bool:
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


def patch(db: Reader, path: bytes, old: dict | None, new: dict) -> str:
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


def add_patches(db: Reader, path: bytes, rows: list[dict]) -> None:
    """Give every row a `patch` against the previous version in the same image's timeline."""
    with db.store.read():
        prev: dict | None = None
        for row in rows:
            if row["version"] == 1:
                prev = None
            row["patch"] = patch(db, path, prev, row)
            prev = row


def version_contents(db: Reader, path: str | bytes, version: int, image: str | None = None) -> Iterator[bytes]:
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


def log(db: Reader, path: str | bytes, image: str | None = None, all_images: bool = False,
        patch: bool = False) -> list[dict]:
    """Every change to `path` along the image's chain, oldest first.

    Deletions that do not name the path (a whiteout or replacement of an
    ancestor, an opaque directory above it) are reported with `via`.
    Each row's `version` numbers it in its image's timeline (1 = oldest).
    all_images: one timeline per image whose chain touches the path.
    patch: each row gets a git-style `patch` from the previous version.
    """
    p = parse_path(path)
    if not p:
        raise UsageError("log needs a path below /")
    if all_images and image:
        raise UsageError("give either --image or --all, not both")
    with db.store.read():
        if all_images:
            rows = log_all(db, p)
            if not rows:
                raise NotFound(f"{show_path(p)}: no stored image ever held this path")
        else:
            r = refs.resolve(db.store, image or db.default_image())
            created_by = db.created_by(r)
            chain_ids = {li.position: li.chain_id for li in r.layers}
            events = db.closure_events(r, p)
            rows = timeline(p, events, r, created_by, chain_ids)
            if not rows:
                raise NotFound(f"{show_path(p)}: no event in the chain of {image or r.label()} ever touched this path")
            for i, row in enumerate(rows, 1):
                row["version"] = i
        if patch:
            add_patches(db, p, rows)
    return rows


def snapshot(node: Node | None):
    if node is None:
        return None
    return (node.type, node.mode, node.uid, node.gid, node.mtime, node.size, node.sha256, node.link,
            node.devmajor, node.devminor, node.xattrs)


def timeline(p: bytes, events: list[Event], r: refs.Resolved, created_by, chain_ids) -> list[dict]:
    view = View()
    out = []
    label = r.label()
    i = 0
    while i < len(events):
        pos = events[i].position
        layer_events = []
        while i < len(events) and events[i].position == pos:
            layer_events.append(events[i])
            i += 1
        before = snapshot(view.get(p))
        view.replay(layer_events)
        node = view.get(p)
        after = snapshot(node)
        touched = any(ev.path == p and ev.kind == PUT for ev in layer_events)
        if before is None and after is None:
            continue
        if after is None:
            via = "whiteout"
            for ev in layer_events:
                if ev.kind == WHITEOUT and ev.path == p:
                    via = "whiteout"
                    break
                if ev.kind == OPAQUE and p.startswith(ev.path + b"/" if ev.path else b""):
                    via = "opaque"
                elif ev.kind == WHITEOUT and p.startswith(ev.path + b"/"):
                    via = "parent-whiteout"
                elif ev.kind == PUT and ev.type != "d" and p.startswith(ev.path + b"/"):
                    via = "parent-replaced"
            op = "delete"
        elif before is None:
            op, via = "add", None
        elif touched or before != after:
            op, via = "modify", None
        else:
            continue
        row = {
            "image": label,
            "position": pos,
            "layer_id": chain_ids.get(pos),
            "op": op,
            "via": via,
            "type": node.type if node else None,
            "mode": "%04o" % node.mode if node and node.mode is not None else None,
            "uid": node.uid if node else None,
            "gid": node.gid if node else None,
            "size": node.size if node and node.type == "f" else None,
            "sha256": node.sha256.hex() if node and node.sha256 else None,
            "link": node.link.decode("utf-8", "surrogateescape") if node and node.link is not None else None,
            "mtime": node.mtime if node else None,
            "created_by": created_by.get(pos),
        }
        out.append(row)
    return out
