"""What the audits share: a node's comparable state and batched SQL lists."""

from __future__ import annotations

from typing import Iterator

from ..replay import Node

# A node's observable state, field by field, as the comparisons see it.
STATE_FIELDS = ("type", "mode", "uid", "gid", "mtime", "size", "sha256", "link", "devmajor", "devminor", "xattrs")

# SQLite caps host parameters per statement (32766 in the bundled SQLite); stay
# well below, and keep IN lists short enough for the planner to use the index.
BATCH = 500


def batches(items: list, n: int = BATCH) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def marks(n: int) -> str:
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
