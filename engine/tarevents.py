"""How a layer tar's entries become events: the one mapping that import stores
and that fsck --deep checks the stored events against.

Names are normalised (`normalize`); `.wh.NAME` is a whiteout of NAME,
`.wh..wh..opq` makes its directory opaque, other `.wh..wh.` names and what
lies below them are AUFS bookkeeping (kept as IGNORED, never applied); every
other entry is a put.  Parents that no entry names are implied directories
(`Parents`).  The same path twice in one diff gives two events: replay applies
puts in tar order, so the later one wins.
"""

from __future__ import annotations

import json
from typing import Callable

from .errors import LayerFormatError
from .kinds import IGNORED, OPAQUE, PUT, WHITEOUT
from .paths import parent as parent_of
from .tarstream import TarEntry

WH = b".wh."
WHWH = WH + WH
OPQ = b".wh..wh..opq"
MAX_DEPTH = 4096  # path components; deeper paths are refused, not truncated
# Bytes of a payload's sha256 kept per tar entry (diff.digests): enough to name the
# entry whose content changed; the diff_id, a whole sha256, is what vouches for it.
TAG_SIZE = 8


def normalize(name: bytes) -> bytes:
    """A tar member name as a path relative to the root: no '.', no empty parts.

    Absolute names are taken relative to the root (as tar and Docker do);
    '..' components and NUL bytes are refused.
    """
    if b"\0" in name:
        raise LayerFormatError(f"tar entry name contains a NUL byte: {name!r}")
    # Most names need no more than their slashes trimmed: no component can be
    # '', '.' or '..' without a '//', a '/.' or a leading '.'.
    s = name.strip(b"/")
    if s.startswith(b"./"):  # `tar -C dir .` names everything so
        s = s[2:].lstrip(b"/")
    if b"//" not in s and b"/." not in s and not s.startswith(b".") and s.count(b"/") < MAX_DEPTH:
        return s
    parts = [p for p in name.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise LayerFormatError(f"tar entry escapes the root: {name.decode('utf-8', 'replace')!r}")
    if len(parts) > MAX_DEPTH:
        raise LayerFormatError(f"tar entry path has {len(parts)} components (limit {MAX_DEPTH})")
    return b"/".join(parts)


class TarEvent:
    """The event a tar entry stores (all but its diff, seq and content blob).

    `entry_path` is the entry's own normalised name; `path` is what the event
    names: the directory of an opaque marker, the path a whiteout deletes."""

    __slots__ = ("kind", "entry_path", "path", "type", "mode", "uid", "gid", "mtime", "size", "link", "target",
                 "devmajor", "devminor", "xattrs")

    def __init__(self, kind, entry_path, path, type, mode, uid, gid, mtime, size, link, target, devmajor, devminor,
                 xattrs):
        self.kind = kind
        self.entry_path = entry_path
        self.path = path
        self.type = type
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.size = size  # regular files only, else None
        self.link = link  # symlink target, raw bytes
        self.target = target  # hard-link target, normalised
        self.devmajor = devmajor
        self.devminor = devminor
        self.xattrs = xattrs  # JSON {name: hex value}, sorted, or None


def event_of(e: TarEntry) -> TarEvent:
    """The event of one tar entry; LayerFormatError for an entry import refuses."""
    path = normalize(e.name)
    base = path.rsplit(b"/", 1)[-1]
    size = e.size if e.type == "f" else None
    aufs = WHWH in path and any(p.startswith(WHWH) for p in path.split(b"/")[:-1])
    if base.startswith(WH) or aufs:
        parent = parent_of(path)
        if base == OPQ and not aufs:
            kind, target = OPAQUE, parent
        elif base.startswith(WHWH) or aufs:
            # AUFS bookkeeping (.wh..wh.plnk and what lies below it), as
            # Docker skips it: not a delete, not a file.
            kind, target = IGNORED, path
        else:
            name = base[len(WH):]
            if not name:
                raise LayerFormatError(f"whiteout entry with an empty name: {e.name!r}")
            kind, target = WHITEOUT, (parent + b"/" + name if parent else name)
        return TarEvent(kind, path, target, e.type, e.mode, e.uid, e.gid, e.mtime, size, None, None, None, None, None)
    if not path and e.type != "d":
        raise LayerFormatError(f"the root is a {e.type!r} entry, not a directory")
    link = hard = None
    if e.type == "h":
        hard = normalize(e.linkname)
        if not hard:
            raise LayerFormatError(f"hard link {e.name!r} points at the root")
    elif e.type == "l":
        link = e.linkname
    xattrs = json.dumps({k: v.hex() for k, v in sorted(e.xattrs.items())}) if e.xattrs else None
    dev = e.type in ("c", "b")
    return TarEvent(PUT, path, path, e.type, e.mode, e.uid, e.gid, e.mtime, size, link, hard,
                    e.devmajor if dev else None, e.devminor if dev else None, xattrs)


class Parents:
    """The parent directories a diff's entries need but never name: its implied
    events.  Only directories are kept, so memory follows them, not the files."""

    def __init__(self) -> None:
        self.named: set[bytes] = set()
        self.needed: set[bytes] = set()

    def add(self, ev: TarEvent) -> None:
        if ev.kind == PUT and ev.type == "d":
            self.named.add(ev.path)
        # needed holds every ancestor of what it holds (but the root), so the walk up
        # stops at the first one there: a step per new directory, not per component.
        q = parent_of(ev.entry_path)
        while q and q not in self.needed:
            self.needed.add(q)
            q = parent_of(q)

    def implied(self, put_here: Callable[[bytes], bool]) -> list[bytes]:
        """The implied directories, sorted (their seqs follow the last entry in
        this order).  put_here(p) says whether the diff puts something at p:
        a file that is also a parent is put, not implied."""
        return [p for p in sorted(self.needed - self.named) if not put_here(p)]
