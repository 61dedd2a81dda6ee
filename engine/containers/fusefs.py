"""FUSE mounts: any view read-only, a container read-write (pyfuse3 over libfuse3).

Reads stream from the chunk store: a read touches only the chunks that hold
its range (a few decoded chunks are cached).  Writes are copy-on-write at the
granularity of an open file: the first write copies the file into a temporary
file (a truncation to zero copies nothing), later writes and reads of that
inode go there, and when it is flushed (close(2), fsync) or released, the
contents become one write event of the container's log.  Every other change
(mkdir, unlink, rename, chmod, symlink, link, ...) is its own event at once.
Each event commits in its own transaction, so a crash of the mount process
loses no event it acknowledged; only bytes of files still open are lost.

Inodes: the view shares one Node between the names of a hard-linked file, so
an inode number is given per Node.  A write replaces the file's Node (the
replay makes a new one), so the inode is moved over to the new Node, and a
renamed directory's inode to the directory at its new path.

Handlers run on trio's one thread and never await, so each runs to the end
before the next begins: no locking is needed.
"""

from __future__ import annotations

import bisect
import collections
import errno
import functools
import os
import signal
import stat
import subprocess
import tempfile
from typing import Callable

from .container import TYPE_BITS, TYPE_OF_BITS, Container, join, names_by_node, parent
from ..errors import LayerdbError, NotFound, UsageError
from ..log import get_logger
from ..replay import Node, View, below, chain_view, decided_events, tree_key
from ..tree import large

try:
    import pyfuse3
    import trio
except ImportError:  # the `fuse` extra is optional: only mounting needs it
    pyfuse3 = trio = None

log = get_logger("layerdb.fuse")

FSNAME = "layerdb"
# The kernel caches entries and attributes this long.  A read-only view never
# changes; a container can also be written by other processes (`layerdb cp`),
# so nothing is cached for it.
RO_TIMEOUT, RW_TIMEOUT = 60.0, 0.0
COPY_SIZE = 1 << 20
CHUNK_CACHE = 8  # decoded chunks (<= 1 MiB each, packs a little more): sequential reads decode each once
META_CACHE = 4096


class BlobRanges:
    """Random access to stored contents, through the chunk store's interface."""

    def __init__(self, store, chunks):
        self.store = store
        self.chunks = chunks
        self._chunks: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._meta: collections.OrderedDict[int, tuple] = collections.OrderedDict()

    def _chunk(self, sha: bytes) -> bytes:
        data = self._chunks.get(sha)
        if data is None:
            data = self._chunks[sha] = self.chunks.get(sha)  # checked against its sha256
            if len(self._chunks) > CHUNK_CACHE:
                self._chunks.popitem(last=False)
        else:
            self._chunks.move_to_end(sha)
        return data

    def _layout(self, blob_id: int) -> tuple:
        """(size, pack sha, offset in pack) or (size, chunk offsets, chunk shas)."""
        m = self._meta.get(blob_id)
        if m is not None:
            return m
        size, pack, offset = self.store.one("SELECT size, chunk, offset FROM blob WHERE id = ?", (blob_id,))
        if pack is not None or not size:
            m = (size, pack, offset)
        else:
            rows = self.store.execute("SELECT offset, chunk FROM blob_chunk WHERE blob_id = ? ORDER BY seq",
                                      (blob_id,)).fetchall()
            m = (size, [r[0] for r in rows], [r[1] for r in rows])
        self._meta[blob_id] = m
        if len(self._meta) > META_CACHE:
            self._meta.popitem(last=False)
        return m

    def read(self, blob_id: int | None, off: int, n: int) -> bytes:
        if blob_id is None:
            return b""
        size, where, pos = self._layout(blob_id)
        end = min(off + n, size or 0)
        if off >= end:
            return b""
        if not isinstance(where, list):
            return self._chunk(where)[pos + off: pos + end]
        offsets, shas = where, pos
        i = bisect.bisect_right(offsets, off) - 1
        out = []
        at = off
        while at < end:
            data = self._chunk(shas[i])
            piece = data[at - offsets[i]: end - offsets[i]]
            out.append(piece)
            at += len(piece)
            i += 1
        return b"".join(out)


class ImageTree:
    """A read-only view, loaded as the kernel asks for it: a path with the events
    that decide it (replay.decided_events), a directory with its children.

    Nodes wait in an LRU of NODES paths, so memory stays flat however many
    files the image holds or the kernel has looked up.  Inode numbers come from
    the path table (a path's id plus one), so no table of them grows either.
    The names of a hard-linked file share one Node and one inode: its first
    name's in tree order (every load of a name also loads its partners).
    """

    NODES = 16384
    SUBTREE = 1024  # a directory with at most this many paths below it loads them all at once
    LISTINGS = 1024  # directory listings kept
    ROOT = 1  # FUSE's root inode (FUSE_ROOT_ID)

    def __init__(self, store, chain: list[tuple[int, int]], whole: bool = False):
        self.store = store
        self.chain = chain
        # whole=True: the chain is small (tree.WHOLE_EVENTS), so it replays once and
        # every lookup is a dict access.  A lookup loaded alone replays the path's
        # ancestors, which for a path thousands of components deep, looked up level
        # by level as the kernel does, costs the square of its depth.
        self._whole: View | None = None
        self.whole = whole
        self._nodes: collections.OrderedDict[bytes, Node | None] = collections.OrderedDict()
        self._ids: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._paths: collections.OrderedDict[int, bytes] = collections.OrderedDict()  # inode -> path
        self._listings: collections.OrderedDict[bytes, list[bytes]] = collections.OrderedDict()
        # Hard-linked files, kept for the mount's life (few images hold many):
        # first name -> the shared Node, and per Node its first name and link count.
        self._linked: dict[bytes, Node] = {}
        self._names: dict[int, tuple[bytes, int]] = {}
        self._totals: tuple[int, int] | None = None

    def _remember(self, path: bytes, node: Node | None) -> None:
        self._nodes[path] = node
        self._nodes.move_to_end(path)
        if len(self._nodes) > self.NODES:
            self._nodes.popitem(last=False)

    def _load(self, paths: list[bytes], known: list[tuple[int, bytes]] = ()) -> View:
        if self.whole:
            if self._whole is None:
                with self.store.read():
                    self._whole = chain_view(self.store.conn, self.chain)
            view = self._whole
        else:
            with self.store.read():
                view = View().replay(decided_events(self.store, [self.chain], paths, known)[0])
        links = names_by_node(view)
        for p in [*paths, *(q for _, q in known)]:
            node = view.get(p)
            if node is not None and id(node) in links:
                names = links[id(node)]
                first = min(names, key=tree_key)
                shared = self._linked.get(first)
                if shared is None:
                    shared = self._linked[first] = node
                    self._names[id(node)] = (first, len(names))
                node = shared
            self._remember(p, node)
        for i, q in known:
            self._ids[q] = i
            self._ids.move_to_end(q)
        while len(self._ids) > self.NODES:
            self._ids.popitem(last=False)
        return view

    def get(self, path: bytes) -> Node | None:
        if path in self._nodes:
            self._nodes.move_to_end(path)
            return self._nodes[path]
        self._load([path])
        return self._nodes.get(path)

    def list_dir(self, d: bytes) -> list[bytes]:
        """The paths directly below directory d, sorted by raw bytes.  A small
        subtree loads whole, listing its directories ahead (`ls -R`, `find`)."""
        kids = self._listings.get(d)
        if kids is not None:
            self._listings.move_to_end(d)
            return kids
        if self.whole:
            self._load([d])
            return self._listing(d, sorted(self._whole.children.get(d, ())))
        with self.store.read():
            rows = below(self.store, self.chain, d, limit=self.SUBTREE + 1)
            small = len(rows) <= self.SUBTREE
            if not small:
                rows = below(self.store, self.chain, d, children=True)
        view = self._load([d], rows)
        for q in (q for _, q in rows) if small else ():
            if q not in self._listings and (n := view.get(q)) is not None and n.type == "d":
                self._listing(q, sorted(view.children.get(q, ())))
        return self._listing(d, sorted(view.children.get(d, ())))

    def _listing(self, d: bytes, kids: list[bytes]) -> list[bytes]:
        self._listings[d] = kids
        self._listings.move_to_end(d)
        while len(self._listings) > self.LISTINGS:
            self._listings.popitem(last=False)
        return kids

    def nlink(self, node: Node) -> int:
        return self._names.get(id(node), (b"", 1))[1]

    def ino(self, path: bytes, node: Node) -> int:
        if not path:
            return self.ROOT
        key = self._names.get(id(node), (path,))[0]
        i = self._ids.get(key)
        if i is None:
            i = self.store.scalar("SELECT id FROM path WHERE path = ?", (key,))
            self._ids[key] = i
            if len(self._ids) > self.NODES:
                self._ids.popitem(last=False)
        self._paths[i + 1] = key
        self._paths.move_to_end(i + 1)
        if len(self._paths) > self.NODES:
            self._paths.popitem(last=False)
        return i + 1

    def path_of(self, ino: int) -> bytes | None:
        if ino == self.ROOT:
            return b""
        p = self._paths.get(ino)
        if p is None:
            p = self.store.scalar("SELECT path FROM path WHERE id = ?", (ino - 1,))
        return p

    def totals(self) -> tuple[int, int]:
        """(bytes of regular files, entries), counted once, streamed (export.TreeEntries)."""
        if self._totals is None:
            from ..tree import TreeEntries

            used = files = 0
            with self.store.read(), TreeEntries(self.store, self.chain, temp="layerdb_mount") as t:
                for batch in t.batches():
                    for _, node, _ in batch:
                        files += 1
                        if node.type == "f":
                            used += node.size or 0
            self._totals = used, files + 1  # and the root
        return self._totals


def _temp():
    # Unbuffered: every access is pread/pwrite or a read after seek, never a stale buffer.
    return tempfile.TemporaryFile(prefix="layerdb-cow-", buffering=0)


class _Buffer:
    """The copy-on-write contents of one inode open for writing."""

    def __init__(self, node: Node):
        self.node = node  # the version the buffer started from
        self.file = None  # a temporary file once written or truncated
        self.size = node.size or 0
        self.refs = 0
        self.dirty = False

    def materialize(self, blobs: BlobRanges) -> None:
        if self.file is not None:
            return
        self.file = _temp()
        for off in range(0, self.size, COPY_SIZE):
            os.pwrite(self.file.fileno(), blobs.read(self.node.blob_id, off, COPY_SIZE), off)

    def truncate(self, size: int, blobs: BlobRanges) -> None:
        if self.file is None and size == 0:
            self.file = _temp()
        self.materialize(blobs)
        self.file.truncate(size)
        self.size = size
        self.dirty = True

    def write(self, off: int, data: bytes, blobs: BlobRanges) -> None:
        self.materialize(blobs)
        os.pwrite(self.file.fileno(), data, off)
        self.size = max(self.size, off + len(data))
        self.dirty = True

    def read(self, off: int, n: int) -> bytes:
        return os.pread(self.file.fileno(), n, off)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _op(fn: Callable) -> Callable:
    """A handler: engine errors become their errno; a bug is logged and is EIO,
    never an exception that would end pyfuse3's main loop (and the mount)."""

    @functools.wraps(fn)
    async def handler(self, *args):
        try:
            return fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except LayerdbError as e:
            code = getattr(e, "errno", errno.ENOENT if isinstance(e, NotFound) else errno.EIO)
            raise pyfuse3.FUSEError(code) from None
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.error("fuse handler failed", handler=fn.__name__, exc_info=True)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


def _fail(code: int):
    return pyfuse3.FUSEError(code)


class LayerFS(pyfuse3.Operations if pyfuse3 else object):  # type: ignore[misc]
    """A view (read-only) or a container (read-write) as a FUSE file system."""

    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, db, view: View | None = None, ctr: Container | None = None):
        super().__init__()
        self.ctr = ctr
        self._static = view
        self.blobs = BlobRanges(db.store, db.chunks)
        self.timeout = RW_TIMEOUT if ctr is not None else RO_TIMEOUT
        root = self.view.nodes[b""]
        self.ino_node: dict[int, Node] = {pyfuse3.ROOT_INODE: root}
        self.node_ino: dict[int, int] = {id(root): pyfuse3.ROOT_INODE}
        self.ino_path: dict[int, bytes] = {pyfuse3.ROOT_INODE: b""}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.handles: dict[int, tuple[int, bool]] = {}  # fh -> (inode, writable)
        self.buffers: dict[int, _Buffer] = {}  # inode -> its copy-on-write buffer
        self.dirs: dict[int, list[tuple[bytes, bytes]]] = {}  # fh -> [(name, path)] snapshot
        self.next_fh = 1
        self._links: tuple[int, dict[int, int]] = (-1, {})

    # State -----------------------------------------------------------------------

    @property
    def view(self) -> View:
        return self._static if self.ctr is None else self.ctr.current

    def _writable(self) -> Container:
        if self.ctr is None:
            raise _fail(errno.EROFS)
        return self.ctr

    def _ino(self, path: bytes, node: Node) -> int:
        ino = self.node_ino.get(id(node))
        if ino is None:
            ino = self.next_ino
            self.next_ino += 1
            self.node_ino[id(node)] = ino
            self.ino_node[ino] = node  # also keeps id(node) from being reused while the inode lives
        self.ino_path[ino] = path
        return ino

    def _bind(self, ino: int, node: Node | None) -> None:
        """The inode now stands for node (the file's new version after a write)."""
        old = self.ino_node.get(ino)
        if node is None or old is node:
            return
        if old is not None and self.node_ino.get(id(old)) == ino:
            del self.node_ino[id(old)]
        self.node_ino[id(node)] = ino
        self.ino_node[ino] = node

    def _node(self, ino: int) -> Node:
        node = self.ino_node.get(ino)
        if node is None:
            raise _fail(errno.ENOENT)
        return node

    def _path(self, ino: int) -> bytes | None:
        """A current name of the inode; None when it has none left (unlinked while open)."""
        node = self._node(ino)
        view = self.view
        p = self.ino_path.get(ino)
        if p is not None and view.get(p) is node:
            return p
        for q, n in view.nodes.items():
            if n is node:
                self.ino_path[ino] = q
                return q
        return None

    def _dir(self, ino: int) -> bytes:
        """The path of a directory inode; ENOENT once that directory is gone."""
        node = self._node(ino)
        p = self.ino_path.get(ino)
        if p is None or self.view.get(p) is not node:
            raise _fail(errno.ENOENT)
        if node.type != "d":
            raise _fail(errno.ENOTDIR)
        return p

    def _nlink(self, node: Node) -> int:
        version = self.ctr.version if self.ctr is not None else 0
        if self._links[0] != version:
            self._links = (version, {k: len(v) for k, v in names_by_node(self.view).items()})
        return self._links[1].get(id(node), 1)

    def _attrs(self, ino: int, node: Node) -> "pyfuse3.EntryAttributes":
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = e.attr_timeout = self.timeout
        e.st_mode = TYPE_BITS[node.type] | (0o777 if node.type == "l" else (node.mode or 0) & 0o7777)
        # Directories report 1 link: `find` then does not count on nlink - 2 subdirectories.
        e.st_nlink = 1 if node.type == "d" else self._nlink(node)
        e.st_uid, e.st_gid = node.uid or 0, node.gid or 0
        buf = self.buffers.get(ino)
        if node.type == "f":
            size = buf.size if buf is not None else node.size or 0
        elif node.type == "l":
            size = len(node.link or b"")
        else:
            size = 0
        e.st_size = size
        e.st_blksize = 4096
        e.st_blocks = (size + 511) // 512
        if node.type in ("c", "b"):
            e.st_rdev = os.makedev(node.devmajor or 0, node.devminor or 0)
        t = (node.mtime or 0) * 10**9
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = t
        return e

    def _entry(self, path: bytes) -> "pyfuse3.EntryAttributes":
        node = self.view.get(path)
        if node is None:
            raise _fail(errno.ENOENT)
        return self._attrs(self._ino(path, node), node)

    def _refresh(self) -> None:
        if self.ctr is not None:
            self.ctr.refresh()

    # Reading ---------------------------------------------------------------------------

    @_op
    def lookup(self, parent_inode, name, ctx):
        self._refresh()
        d = self._dir(parent_inode)
        if name == b".":
            return self._attrs(parent_inode, self._node(parent_inode))
        if name == b"..":
            return self._entry(parent(d)) if d else self._attrs(parent_inode, self._node(parent_inode))
        return self._entry(join(d, name))

    @_op
    def forget(self, inode_list):
        return None  # inodes stay mapped: a few bytes each, and a later lookup finds the same number

    @_op
    def getattr(self, inode, ctx):
        return self._attrs(inode, self._node(inode))

    @_op
    def readlink(self, inode, ctx):
        node = self._node(inode)
        if node.type != "l":
            raise _fail(errno.EINVAL)
        return node.link or b""

    @_op
    def opendir(self, inode, ctx):
        self._refresh()
        d = self._dir(inode)
        fh = self.next_fh
        self.next_fh += 1
        self.dirs[fh] = [(c.rsplit(b"/", 1)[-1], c) for c, _ in self.view.list_dir(d)]
        return fh

    @_op
    def readdir(self, fh, start_id, token):
        entries = self.dirs.get(fh, [])
        view = self.view
        for i in range(start_id, len(entries)):
            name, p = entries[i]
            node = view.get(p)
            if node is None:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, name, self._attrs(self._ino(p, node), node), i + 1):
                break

    @_op
    def releasedir(self, fh):
        self.dirs.pop(fh, None)

    @_op
    def open(self, inode, flags, ctx):
        node = self._node(inode)
        if node.type == "d":
            raise _fail(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            self._writable()
            buf = self.buffers.get(inode)
            if buf is None:
                buf = self.buffers[inode] = _Buffer(node)
            buf.refs += 1
            if flags & os.O_TRUNC:  # libfuse3 asks the kernel to pass O_TRUNC here (atomic_o_trunc)
                buf.truncate(0, self.blobs)
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = (inode, writable)
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.ctr is None)

    @_op
    def read(self, fh, off, size):
        ino, _ = self.handles[fh]
        buf = self.buffers.get(ino)
        if buf is not None and buf.file is not None:
            return buf.read(off, size)
        return self.blobs.read(self._node(ino).blob_id, off, size)

    @_op
    def getxattr(self, inode, name, ctx):
        v = self._node(inode).xattr_dict().get(os.fsdecode(name))
        if v is None:
            raise _fail(pyfuse3.ENOATTR)
        return v

    @_op
    def listxattr(self, inode, ctx):
        return [os.fsencode(k) for k in self._node(inode).xattr_dict()]

    @_op
    def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        view = self.view
        used = sum(n.size or 0 for n in view.nodes.values() if n.type == "f")
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = used // 4096 + 1
        # A container has no fixed size: report room, so that tools which check free space go ahead.
        s.f_bfree = s.f_bavail = 0 if self.ctr is None else 1 << 30
        s.f_files = len(view.nodes)
        s.f_ffree = s.f_favail = 0 if self.ctr is None else 1 << 30
        s.f_namemax = 255
        return s

    # Writing (a container) -------------------------------------------------------------

    @_op
    def write(self, fh, off, buf):
        ino, writable = self.handles[fh]
        if not writable:
            raise _fail(errno.EBADF)
        self.buffers[ino].write(off, buf, self.blobs)
        return len(buf)

    def _save(self, ino: int) -> None:
        """A dirty buffer becomes one write event (its file keeps mode, owner and other names)."""
        buf = self.buffers.get(ino)
        if buf is None or not buf.dirty:
            return
        path = self._path(ino)
        buf.dirty = False
        if path is None:
            return  # no name left: like an unlinked file on disk, its bytes go with the last close
        buf.file.seek(0)
        self._writable().write_file(path, _Limited(buf.file, buf.size), follow=False)
        self._bind(ino, self.view.get(path))

    @_op
    def flush(self, fh):
        ino, writable = self.handles[fh]
        if writable:
            self._save(ino)

    @_op
    def fsync(self, fh, datasync):
        ino, writable = self.handles[fh]
        if writable:
            self._save(ino)

    @_op
    def release(self, fh):
        ino, writable = self.handles.pop(fh)
        if not writable:
            return
        buf = self.buffers[ino]
        buf.refs -= 1
        if buf.refs <= 0:
            try:
                self._save(ino)
            finally:
                buf.close()
                del self.buffers[ino]

    def flush_all(self) -> None:
        """Save every dirty buffer (at unmount: files still open keep what was written)."""
        for ino in list(self.buffers):
            try:
                self._save(ino)
            except Exception:
                log.error("saving an open file at unmount failed", inode=ino, exc_info=True)

    @_op
    def create(self, parent_inode, name, mode, flags, ctx):
        ctr = self._writable()
        p = join(self._dir(parent_inode), name)
        if self.view.get(p) is not None:
            raise _fail(errno.EEXIST)
        ctr.write_file(p, b"", mode=mode & ~ctx.umask & 0o7777, uid=ctx.uid, gid=ctx.gid, follow=False)
        node = self.view.get(p)
        ino = self._ino(p, node)
        buf = self.buffers[ino] = _Buffer(node)
        buf.refs = 1
        buf.file = _temp()  # nothing to copy, nothing to save yet: the file is new and empty
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = (ino, True)
        return pyfuse3.FileInfo(fh=fh), self._attrs(ino, node)

    @_op
    def mkdir(self, parent_inode, name, mode, ctx):
        p = join(self._dir(parent_inode), name)
        self._writable().mkdir(p, mode=mode & ~ctx.umask & 0o7777, uid=ctx.uid, gid=ctx.gid)
        return self._entry(p)

    @_op
    def mknod(self, parent_inode, name, mode, rdev, ctx):
        ctr = self._writable()
        p = join(self._dir(parent_inode), name)
        perm = mode & ~ctx.umask & 0o7777
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFREG:
            ctr.write_file(p, b"", mode=perm, uid=ctx.uid, gid=ctx.gid, follow=False)
        elif kind in (stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK):
            ctr.mknod(p, TYPE_OF_BITS[kind], perm, (os.major(rdev), os.minor(rdev)), ctx.uid, ctx.gid)
        else:
            raise _fail(errno.EPERM)  # sockets cannot be part of an image
        return self._entry(p)

    @_op
    def symlink(self, parent_inode, name, target, ctx):
        p = join(self._dir(parent_inode), name)
        self._writable().symlink(p, target, uid=ctx.uid, gid=ctx.gid)
        return self._entry(p)

    @_op
    def link(self, inode, new_parent_inode, new_name, ctx):
        ctr = self._writable()
        src = self._path(inode)
        if src is None:
            raise _fail(errno.ENOENT)
        self._save(inode)
        p = join(self._dir(new_parent_inode), new_name)
        ctr.link(p, src)
        return self._entry(p)

    @_op
    def unlink(self, parent_inode, name, ctx):
        self._writable().remove(join(self._dir(parent_inode), name), want_dir=False)

    @_op
    def rmdir(self, parent_inode, name, ctx):
        self._writable().remove(join(self._dir(parent_inode), name), want_dir=True)

    @_op
    def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        ctr = self._writable()
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise _fail(errno.EINVAL)
        old = join(self._dir(parent_inode_old), name_old)
        new = join(self._dir(parent_inode_new), name_new)
        view = self.view
        moved = [(ino, p) for ino, p in self.ino_path.items()
                 if (p == old or p.startswith(old + b"/")) and view.get(p) is self.ino_node.get(ino)]
        ctr.rename(old, new, noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE))
        view = self.view
        for ino, p in moved:
            q = new + p[len(old):]
            self.ino_path[ino] = q
            self._bind(ino, view.get(q))  # a moved directory is a new Node at its new path

    @_op
    def setattr(self, inode, attr, fields, fh, ctx):
        ctr = self._writable()
        if fields.update_size:
            buf = self.buffers.get(inode)
            if buf is None:
                buf = self.buffers[inode] = _Buffer(self._node(inode))
            buf.truncate(attr.st_size, self.blobs)
            if buf.refs <= 0:  # truncate(2) on a file nobody has open: one event now
                try:
                    self._save(inode)
                finally:
                    buf.close()
                    del self.buffers[inode]
        meta = {}
        if fields.update_mode:
            meta["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            meta["uid"] = attr.st_uid
        if fields.update_gid:
            meta["gid"] = attr.st_gid
        if fields.update_mtime:
            meta["mtime"] = attr.st_mtime_ns // 10**9
        if meta:
            # Written bytes first: a time set now must not be overwritten when the file closes.
            self._save(inode)
            path = self._path(inode)
            if path is None:
                raise _fail(errno.ENOENT)
            ctr.setattr(path, follow=False, **meta)
            self._bind(inode, self.view.get(path))
        return self._attrs(inode, self._node(inode))

    @_op
    def setxattr(self, inode, name, value, ctx):
        self._set_xattr(inode, os.fsdecode(name), value)

    @_op
    def removexattr(self, inode, name, ctx):
        self._set_xattr(inode, os.fsdecode(name), None)

    def _set_xattr(self, inode: int, name: str, value: bytes | None) -> None:
        ctr = self._writable()
        if name.startswith("system.posix_acl_"):
            # No ACLs, as on a file system without them: tools (sed -i, cp -p) then set the mode with chmod.
            raise _fail(errno.EOPNOTSUPP)
        node = self._node(inode)
        xs = node.xattr_dict()
        if value is None and name not in xs:
            raise _fail(pyfuse3.ENOATTR)
        if value is None:
            del xs[name]
        else:
            xs[name] = value
        path = self._path(inode)
        if path is None:
            raise _fail(errno.ENOENT)
        self._save(inode)
        ctr.setattr(path, xattrs=xs, follow=False)
        self._bind(inode, self.view.get(path))


class _Limited:
    """The first `size` bytes of a file object (a buffer's file may be longer after a truncate race)."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def read(self, n: int = COPY_SIZE) -> bytes:
        b = self.f.read(min(n, self.left))
        self.left -= len(b)
        return b


class ImageFS(LayerFS):
    """Any view read-only, from an ImageTree: memory stays flat whatever the
    image holds.  (A container's mount keeps the whole view: it must find every
    name of a node it writes.)"""

    def __init__(self, db, tree: ImageTree):
        pyfuse3.Operations.__init__(self)
        self.ctr = None
        self.tree = tree
        self.blobs = BlobRanges(db.store, db.chunks)
        self.timeout = RO_TIMEOUT
        self.handles: dict[int, tuple[int, bool]] = {}
        self.buffers: dict[int, _Buffer] = {}  # stays empty: nothing is written
        self.dirs: dict[int, list[tuple[bytes, bytes]]] = {}
        self.next_fh = 1

    @property
    def view(self) -> View:
        raise AssertionError("ImageFS reads its ImageTree")

    def _ino(self, path: bytes, node: Node) -> int:
        return self.tree.ino(path, node)

    def _path(self, ino: int) -> bytes | None:
        return self.tree.path_of(ino)

    def _node(self, ino: int) -> Node:
        p = self.tree.path_of(ino)
        node = None if p is None else self.tree.get(p)
        if node is None:
            raise _fail(errno.ENOENT)
        return node

    def _dir(self, ino: int) -> bytes:
        p = self.tree.path_of(ino)
        node = None if p is None else self.tree.get(p)
        if node is None:
            raise _fail(errno.ENOENT)
        if node.type != "d":
            raise _fail(errno.ENOTDIR)
        return p

    def _nlink(self, node: Node) -> int:
        return self.tree.nlink(node)

    def _entry(self, path: bytes) -> "pyfuse3.EntryAttributes":
        node = self.tree.get(path)
        if node is None:
            raise _fail(errno.ENOENT)
        return self._attrs(self._ino(path, node), node)

    @_op
    def opendir(self, inode, ctx):
        d = self._dir(inode)
        fh = self.next_fh
        self.next_fh += 1
        self.dirs[fh] = [(c.rsplit(b"/", 1)[-1], c) for c in self.tree.list_dir(d)]
        return fh

    @_op
    def readdir(self, fh, start_id, token):
        entries = self.dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, p = entries[i]
            node = self.tree.get(p)
            if node is None:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attrs(self._ino(p, node), node), i + 1):
                break

    @_op
    def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        used, files = self.tree.totals()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = used // 4096 + 1
        s.f_bfree = s.f_bavail = 0
        s.f_files = files
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s


# Mounting -----------------------------------------------------------------------------


def mount(db, target: str, mountpoint: str, writable: bool) -> None:
    """Serve target until unmounted: a container read-write, or any REF read-only.

    Returns when the file system is unmounted (umount, fusermount3 -u), or
    after SIGINT/SIGTERM/SIGHUP, which unmount it.
    """
    if pyfuse3 is None:
        raise UsageError("mount needs pyfuse3 and trio (pip install 'layerdb[fuse]'; apt-get install fuse3 libfuse3-dev)")
    if not os.path.isdir(mountpoint):
        raise UsageError(f"{mountpoint}: not a directory")
    if writable:
        try:
            fs = LayerFS(db, ctr=db.container(target, whole=True))
        except NotFound:
            raise NotFound(f"no container matches {target!r}; to mount an image (read-only) use --at {target}") from None
    else:
        with db.store.read():
            chain = db.resolve(target).chain
        fs = ImageFS(db, ImageTree(db.store, chain, whole=not large(db.store, chain)))
    options = set(pyfuse3.default_options) | {f"fsname={FSNAME}", f"subtype={FSNAME}"}
    if not writable:
        options.add("ro")
    try:
        pyfuse3.init(fs, mountpoint, options)
    except RuntimeError as e:
        raise LayerdbError(f"cannot mount {mountpoint}: {e}") from None
    log.info("mounted", target=target, mountpoint=mountpoint, writable=writable)
    unmount = True
    try:
        unmount = trio.run(_serve)
    finally:
        fs.flush_all()
        pyfuse3.close(unmount=unmount)
        log.info("unmounted", mountpoint=mountpoint)


async def _serve() -> bool:
    """Run the FUSE loop; True when a signal stopped it (we must unmount), False
    when it ended because someone unmounted the file system."""
    signalled = False
    async with trio.open_nursery() as nursery:

        async def on_signal():
            nonlocal signalled
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                async for _ in signals:
                    signalled = True
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    return signalled


def _mounts() -> list[tuple[str, str, str]]:
    """(source, mount point, type) of every mount, from /proc/self/mounts."""
    out = []
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                # Spaces and the like are written as octal escapes (\040).
                out.append(tuple(p.encode("latin-1", "surrogateescape").decode("unicode_escape") for p in parts[:3]))
    return out


def is_mounted(mountpoint: str) -> bool:
    mp = os.path.realpath(mountpoint)
    return any(m == mp and t == f"fuse.{FSNAME}" for _, m, t in _mounts())


def unmount(mountpoint: str) -> None:
    """Unmount a layerdb mount; its `layerdb mount` process then exits."""
    if not is_mounted(mountpoint):
        raise UsageError(f"{mountpoint}: no layerdb mount there")
    err = "no fusermount3, fusermount or umount found"
    for cmd in (["fusermount3", "-u"], ["fusermount", "-u"], ["umount"]):
        try:
            r = subprocess.run(cmd + [mountpoint], capture_output=True, text=True)
        except FileNotFoundError:
            continue
        if r.returncode == 0:
            return
        err = r.stderr.strip() or f"{cmd[0]} exited with {r.returncode}"
    raise LayerdbError(f"cannot unmount {mountpoint}: {err}")
