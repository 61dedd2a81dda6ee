"""Layers a build makes: entries -> a deterministic layer tar, and overlay directories.

A step's layer is a list of LayerEntry (from the context for COPY/ADD, from an
overlay upper directory for RUN), written as a tar in tree order with
`.wh.NAME` whiteouts and `.wh..wh..opq` opaque markers, and ingested like any
imported layer (so diff_ids are exact and `save` rebuilds it byte for byte).

For RUN, every diff of the chain below is an overlay lower directory:
materialize() writes a stored diff's events in overlayfs format (a whiteout
is a 0:0 character device, an opaque directory has trusted.overlay.opaque=y),
once per diff, under the build cache; upper_entries() reads an upper
directory back into entries, dropping the trusted.overlay.* xattrs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable

from ..content import ContentStore
from ..errors import BuildError
from ..kinds import IGNORED, IMPLIED, OPAQUE, PUT, WHITEOUT
from ..output import tarwriter as tw
from ..replay import diff_events, tree_key

READ = 1 << 20
WH = b".wh."
OPQ = b".wh..wh..opq"
OVERLAY_XATTR = "trusted.overlay."
# fuse-overlayfs marks an opaque directory three ways (the xattr, and these two names
# in it) and keeps its own xattrs: none of that is part of the tree.
FUSE_OPAQUE = (b".wh..wh..opq", b".wh..opq")
FUSE_XATTR = "user.fuseoverlayfs."
SKIPPED_XATTRS = {"security.selinux"}  # set by the host, not part of the tree
FLAGS = {"f": tw.REGTYPE, "d": tw.DIRTYPE, "l": tw.SYMTYPE, "p": tw.FIFOTYPE, "c": tw.CHRTYPE, "b": tw.BLKTYPE,
         "h": tw.LNKTYPE}
TYPE_OF = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFIFO: "p", stat.S_IFCHR: "c",
           stat.S_IFBLK: "b"}


@dataclass
class LayerEntry:
    path: bytes  # relative to the root, no leading '/'
    type: str  # f d l h p c b, or "wh" (a whiteout of path) / "opq" (path is an opaque directory)
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    size: int = 0
    data: bytes | None = None  # contents held in memory (heredocs, small files)
    source: str | bytes | None = None  # or a host file to read them from
    blob_id: int | None = None  # or a stored content
    link: bytes = b""  # symlink target, or the earlier path a hard link names
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)

    def tar_name(self) -> bytes:
        if self.type == "wh":
            head, _, base = self.path.rpartition(b"/")
            return (head + b"/" if head else b"") + WH + base
        if self.type == "opq":
            return self.path + b"/" + OPQ
        return self.path


def _key(e: LayerEntry) -> tuple[bytes, int]:
    # An opaque marker comes right after its directory; tree order otherwise.
    return (tree_key(e.path), 1 if e.type == "opq" else 0)


def write_layer(entries: Iterable[LayerEntry], content: ContentStore, f: BinaryIO) -> tuple[str, int]:
    """The entries as a tar in tree order (a later entry for the same path wins);
    returns the diff_id and the entry count."""
    by_path: dict[tuple[bytes, str], LayerEntry] = {}
    for e in entries:
        kind = "opq" if e.type == "opq" else "x"
        by_path[(e.path, kind)] = e
    ordered = sorted(by_path.values(), key=_key)
    sha = hashlib.sha256()

    def out(b: bytes) -> None:
        sha.update(b)
        f.write(b)

    for e in ordered:
        name = e.tar_name()
        if e.type in ("wh", "opq"):
            out(tw.header(name, tw.REGTYPE, 0, 0, 0, 0, e.mtime))
            continue
        flag = FLAGS[e.type]
        size = e.size if e.type == "f" else 0
        mode = 0o777 if e.type == "l" else e.mode
        out(tw.header(name + (b"/" if e.type == "d" else b""), flag, mode & 0o7777, e.uid, e.gid, size, e.mtime,
                      e.link if e.type in ("l", "h") else b"", e.devmajor, e.devminor, e.xattrs or None))
        if e.type == "f" and size:
            n = 0
            for piece in _contents(e, content):
                n += len(piece)
                out(piece)
            if n != size:
                raise BuildError(f"/{name.decode('utf-8', 'replace')}: changed size while it was read"
                                 f" ({size} -> {n} bytes)")
            out(tw.padding(size))
    out(tw.END)
    return "sha256:" + sha.hexdigest(), len(ordered)


def _contents(e: LayerEntry, content: ContentStore):
    if e.data is not None:
        yield e.data
    elif e.blob_id is not None:
        yield from content.iter_blob(e.blob_id)
    else:
        assert e.source is not None
        with open(e.source, "rb") as src:
            while b := src.read(READ):
                yield b


def host_xattrs(full: str | bytes) -> dict[str, bytes]:
    try:
        names = os.listxattr(full, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in sorted(names):
        if n.startswith(OVERLAY_XATTR) or n.startswith(FUSE_XATTR) or n in SKIPPED_XATTRS:
            continue
        try:
            out[n] = os.getxattr(full, n, follow_symlinks=False)
        except OSError:
            continue
    return out


def host_entry(rel: bytes, full: str | bytes, st: os.stat_result) -> LayerEntry:
    t = TYPE_OF.get(stat.S_IFMT(st.st_mode))
    if t is None:
        raise BuildError(f"/{rel.decode('utf-8', 'replace')}: a socket cannot be part of an image")
    e = LayerEntry(rel, t, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime),
                   xattrs=host_xattrs(full))
    if t == "f":
        e.size, e.source = st.st_size, full
    elif t == "l":
        e.link = os.readlink(full if isinstance(full, bytes) else os.fsencode(full))
    elif t in ("c", "b"):
        e.devmajor, e.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    return e


def upper_entries(upper: str) -> list[LayerEntry]:
    """An overlay upper directory as layer entries (whiteouts and opaque
    directories included, hard links within the upper kept as links)."""
    root = os.fsencode(upper)
    out: list[LayerEntry] = []
    first: dict[tuple[int, int], bytes] = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        d = os.path.join(root, rel) if rel else root
        for name in sorted(os.listdir(d)):
            if name in FUSE_OPAQUE:
                continue
            r = rel + b"/" + name if rel else name
            full = os.path.join(root, r)
            st = os.lstat(full)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                out.append(LayerEntry(r, "wh", mtime=int(st.st_mtime)))
                continue
            e = host_entry(r, full, st)
            if e.type == "d":
                try:
                    opaque = os.getxattr(full, OVERLAY_XATTR + "opaque", follow_symlinks=False) == b"y"
                except OSError:
                    opaque = False
                opaque = opaque or os.path.lexists(os.path.join(full, FUSE_OPAQUE[0]))
                out.append(e)
                if opaque:
                    out.append(LayerEntry(r, "opq", mtime=e.mtime))
                stack.append(r)
                continue
            if e.type != "d" and st.st_nlink > 1:
                ino = (st.st_dev, st.st_ino)
                if ino in first:
                    e = LayerEntry(r, "h", e.mode, e.uid, e.gid, e.mtime, link=first[ino])
                else:
                    first[ino] = r
            out.append(e)
    # Hard links must follow the name they point at in tree order: the first
    # name in tree order carries the data.
    return order_links(out)


def order_links(entries: list[LayerEntry]) -> list[LayerEntry]:
    """Each hard-linked group with its bytes on the first of its names in tree order
    (a link entry must follow the name it points at)."""
    by_path = {e.path: e for e in entries}
    groups: dict[bytes, list[LayerEntry]] = {}
    for e in entries:
        if e.type == "h":
            groups.setdefault(e.link, []).append(e)
    for head, links in groups.items():
        names = sorted([head] + [e.path for e in links], key=tree_key)
        if names[0] == head:
            continue
        data = by_path[head]
        new_head = names[0]
        # Taken first: `data` itself becomes a link in the loop.
        size, source, blob_id, xattrs = data.size, data.source, data.blob_id, data.xattrs
        for e in [data] + links:
            if e.path == new_head:
                e.type, e.link, e.size, e.source, e.blob_id = "f", b"", size, source, blob_id
                e.xattrs = xattrs
            else:
                e.type, e.link, e.size, e.source, e.blob_id = "h", new_head, 0, None, None
    return entries


# Overlay lower directories --------------------------------------------------------


def materialize(conn, content: ContentStore, diff_rowid: int, target: str) -> None:
    """Write one stored diff into a new directory, in overlayfs upper-dir format."""
    tmp = target + ".tmp"
    if os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    os.chmod(tmp, 0o755)
    root = os.fsencode(tmp)
    dirs: list[tuple[bytes, int, int, int, int, dict]] = []
    linked: dict[bytes, bytes] = {}  # path -> its host path, for hard links within the diff
    for ev in diff_events(conn, diff_rowid, 0):
        if ev.kind == IGNORED:
            continue
        full = os.path.join(root, ev.path) if ev.path else root
        if ev.path:
            _mkparents(root, ev.path)
        if ev.kind == OPAQUE:
            if not os.path.isdir(full):
                _remove(full)
                os.mkdir(full, 0o755)
            os.setxattr(full, OVERLAY_XATTR + "opaque", b"y", follow_symlinks=False)
            continue
        if ev.kind == WHITEOUT:
            _remove(full)
            os.mknod(full, stat.S_IFCHR | 0o600, 0)
            continue
        if ev.kind == IMPLIED:
            if not os.path.isdir(full):
                _remove(full)
                os.mkdir(full, 0o755)
            continue
        assert ev.kind == PUT
        xattrs = json.loads(ev.xattrs) if ev.xattrs else {}
        if ev.type == "d":
            if not ev.path:
                dirs.append((b"", ev.mode or 0o755, ev.uid or 0, ev.gid or 0, ev.mtime or 0, xattrs))
                continue
            was_whiteout = os.path.lexists(full) and stat.S_ISCHR(os.lstat(full).st_mode)
            if not os.path.isdir(full) or os.path.islink(full):
                _remove(full)
                os.mkdir(full, 0o700)
                if was_whiteout:  # deleted and made again in one layer: nothing lower shows through
                    os.setxattr(full, OVERLAY_XATTR + "opaque", b"y", follow_symlinks=False)
            dirs.append((ev.path, ev.mode or 0, ev.uid or 0, ev.gid or 0, ev.mtime or 0, xattrs))
            continue
        _remove(full)
        if ev.type == "h":
            src = linked.get(ev.target or b"")
            if src is None:
                raise BuildError(f"/{ev.path.decode('utf-8', 'replace')}: a hard link to a file of a lower layer"
                                 " cannot be a RUN step's lower directory")
            os.link(src, full)
            linked[ev.path] = full
            continue
        if ev.type == "f":
            with open(full, "xb") as f:
                if ev.size:
                    for piece in content.iter_blob(ev.blob_id):
                        f.write(piece)
            linked[ev.path] = full
        elif ev.type == "l":
            os.symlink(ev.link or b"", full)
        elif ev.type == "p":
            os.mkfifo(full, 0o600)
        elif ev.type in ("c", "b"):
            kind = stat.S_IFCHR if ev.type == "c" else stat.S_IFBLK
            os.mknod(full, kind | 0o600, os.makedev(ev.devmajor or 0, ev.devminor or 0))
        _meta(full, ev.mode or 0, ev.uid or 0, ev.gid or 0, ev.mtime or 0, xattrs, ev.type == "l")
    for path, mode, uid, gid, mtime, xattrs in sorted(dirs, key=lambda d: d[0], reverse=True):
        full = os.path.join(root, path) if path else root
        _meta(full, mode, uid, gid, mtime, xattrs, False)
    os.rename(tmp, target)


def _mkparents(root: bytes, path: bytes) -> None:
    parts = path.split(b"/")[:-1]
    cur = root
    for p in parts:
        cur = os.path.join(cur, p)
        if not os.path.isdir(cur) or os.path.islink(cur):
            _remove(cur)
            os.mkdir(cur, 0o755)


def _remove(full: bytes | str) -> None:
    if os.path.isdir(full) and not os.path.islink(full):
        shutil.rmtree(full)
    elif os.path.lexists(full):
        os.unlink(full)


def _meta(full, mode: int, uid: int, gid: int, mtime: int, xattrs: dict, symlink: bool) -> None:
    os.chown(full, uid, gid, follow_symlinks=False)
    if not symlink:
        os.chmod(full, mode & 0o7777)
    for k, v in xattrs.items():
        os.setxattr(full, k, bytes.fromhex(v), follow_symlinks=False)
    os.utime(full, (mtime, mtime), follow_symlinks=False)
