"""Writing a view out: as a tar stream, or into a directory that nothing escapes."""

from __future__ import annotations

import collections
import errno
import os
import stat
from typing import BinaryIO, Callable, Iterable

from . import tarwriter as tw
from ..chunks import Prefetch
from ..content import ContentStore
from ..errors import CorruptStore, LayerdbError, UsageError
from ..kinds import PUT
from ..replay import Node, View, decided_events, tree_key
from ..tree import Entry, entries_of, paused_gc

_BATCH = 500


def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


# Tree order visits packs in any order when a layer's tar was not written in
# sorted order, so a pack's later files wait in memory for their turn: only
# those files, cut from the pack when it is decoded, up to this many bytes;
# beyond, the least recently used pack's are dropped and the pack read again
# where its next file comes.  Debian+python3 with 4 MiB packs: whole packs kept
# until their last file would peak at 25.6 MiB, its files alone at 17 MiB, and
# at 16 MiB two of its 28 packs are read twice.
HELD_BYTES = 16 << 20
# A partitioned view (tree.TreeEntries) plans each partition on its own, and a
# pack whose files fall in several partitions would be decoded once for each:
# manyfiles' 50 packs (39 MiB) were decoded 200 times (158 MiB).  Decoded packs
# are kept from one partition to the next up to this many bytes, least recently
# used dropped first: 73 decodes (57 MiB) there.
KEPT_BYTES = 16 << 20
# Headers and small contents gather in one buffer, written when it holds this
# much: a write call per entry cost more than its bytes.
FLUSH_AT = 1 << 20
DIRECT_AT = 64 << 10  # pieces at least this large are written as they are, not copied into the buffer
# A pipe holds 64 KiB unless told otherwise: a reader such as `| cat` then
# wakes for every 64 KiB, and the writer waits on it as often.
PIPE_BYTES = 1 << 20

TAR_FLAGS = {"f": tw.REGTYPE, "d": tw.DIRTYPE, "l": tw.SYMTYPE, "p": tw.FIFOTYPE, "c": tw.CHRTYPE, "b": tw.BLKTYPE}


def _widen_pipe(out: BinaryIO) -> None:
    """Let a pipe we write into hold PIPE_BYTES (never less than it does)."""
    try:
        fd = out.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) < PIPE_BYTES:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (OSError, ValueError, AttributeError):  # not a file, or a limit below PIPE_BYTES: keep what it is
        pass


class _Kept:
    """Decoded packs kept across batches, up to KEPT_BYTES, least recently used
    dropped first (never the one just put)."""

    def __init__(self, limit: int):
        self.packs: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self.held = 0
        self.limit = limit

    def get(self, pack: bytes) -> bytes | None:
        raw = self.packs.get(pack)
        if raw is not None:
            self.packs.move_to_end(pack)
        return raw

    def put(self, pack: bytes, raw: bytes) -> None:
        self.packs[pack] = raw
        self.held += len(raw)
        while self.held > self.limit and len(self.packs) > 1:
            self.held -= len(self.packs.popitem(last=False)[1])


def write_tar(batches: Iterable[list[Entry]], content: ContentStore, out: BinaryIO,
              progress: Callable[[int, int], None] | None = None, total: int = 0, partitioned: bool = False) -> int:
    """Stream entries (batches of them, in tar order) as a tar.  `total` is
    what progress reports as the whole (an estimate is fine).  `partitioned`:
    the batches are a partitioned view's, whose packs recur from batch to batch."""
    _widen_pipe(out)
    buf = bytearray()
    n = 0
    kept = _Kept(KEPT_BYTES) if partitioned else None
    with paused_gc():
        for entries in batches:
            n = _write_entries(entries, content, out, buf, n, progress, max(total, n + len(entries)), kept)
        buf += tw.END
        out.write(buf)
    if progress:
        progress(n, n)
    return n


def _plan(entries: list[Entry], content: ContentStore, kept: _Kept | None = None):
    """What the helper threads decode, in the order the writer needs it: each
    pack once, where its first file goes out, cut into its files of these
    entries, in their order (whole, for the writer to cut and keep, when
    `kept` is given; not at all when `kept` holds it); and every large
    content's chunks.  Returns (work, {blob id: pack}, {pack: [(offset, size)
    of its files]}, {large blob id: its number of chunks})."""
    files = [node for _, node, first in entries if first is None and node.type == "f" and node.size]
    # A replay from the store knows where most packed contents lie; the store is
    # asked for the rest (a container's new files, and the large contents).
    located = content.locate(node.blob_id for node in files if node.pack is None)
    work: list = []  # chunk ids, and (pack, spans) items
    packed: dict[int, bytes] = {}
    spans: dict[bytes, list[tuple[int, int]]] = {}
    chunk_count: dict[int, int] = {}
    for node in files:
        bid, size, pack = node.blob_id, node.size, node.pack
        where = (pack, node.offset) if pack is not None else located.get(bid)
        if where is None:
            shas = content.chunk_list(bid)
            chunk_count[bid] = len(shas)
            work.extend(shas)
        else:
            pack, offset = where
            packed[bid] = pack
            cuts = spans.get(pack)
            if cuts is None:
                cuts = spans[pack] = []
                if kept is None:
                    work.append((pack, cuts))  # complete before any helper sees it: this loop ends first
                elif pack not in kept.packs:
                    work.append(pack)
            cuts.append((offset, size))
    return work, packed, spans, chunk_count


def _write_entries(entries: list[Entry], content: ContentStore, out: BinaryIO, buf: bytearray, n: int,
                   progress: Callable[[int, int], None] | None, total: int, kept: _Kept | None = None) -> int:
    work, packed, spans, chunk_count = _plan(entries, content, kept)
    planned = {p for p in spans if p not in kept.packs} if kept is not None else set()  # decoded ahead
    # A pack's files of this batch, those not yet written, once its first goes
    # out; least recently used first.  What they hold is `held` bytes: past
    # HELD_BYTES the oldest pack's are dropped, and the pack read again where
    # its next file comes.
    decoded: collections.OrderedDict[bytes, list] = collections.OrderedDict()
    cursor: dict[bytes, int] = {}  # pack -> how many of its files are written
    held = 0
    header, padding, write = tw.header, tw.padding, out.write
    reg, lnk, dirtype = tw.REGTYPE, tw.LNKTYPE, tw.DIRTYPE
    with Prefetch(content.chunks, work) as fetched:
        for path, node, first in entries:
            n += 1
            type_ = node.type
            xattrs = node.xattr_dict() if node.xattrs else None
            mode, uid, gid, mtime = node.mode or 0, node.uid or 0, node.gid or 0, node.mtime or 0
            if type_ == "d":
                buf += header(path + b"/", dirtype, mode, uid, gid, 0, mtime, xattrs=xattrs)
            elif first is not None:
                buf += header(path, lnk, mode, uid, gid, 0, mtime, first, xattrs=xattrs)
            elif type_ == "f":
                size = node.size or 0
                buf += header(path, reg, mode, uid, gid, size, mtime, xattrs=xattrs)
                if size:
                    pack = packed.get(node.blob_id)
                    if pack is None:
                        got = 0
                        for _ in range(chunk_count[node.blob_id]):
                            piece = fetched.next()
                            got += len(piece)
                            if len(piece) >= DIRECT_AT:
                                write(buf)
                                buf.clear()
                                write(piece)
                            else:
                                buf += piece
                        if got != size:
                            raise CorruptStore(f"/{_s(path)}: the store holds {got} bytes, the view says {size}")
                    else:
                        k = cursor.get(pack, 0)
                        files = decoded.get(pack)
                        if files is not None:
                            decoded.move_to_end(pack)
                        else:
                            if kept is None and not k:
                                files = fetched.next()  # decoded and cut ahead
                            else:
                                data = kept.get(pack) if kept is not None else None
                                if data is None:
                                    if pack in planned:  # its first file of this batch: decoded ahead
                                        planned.discard(pack)
                                        data = fetched.next()
                                    else:  # dropped to bound memory: read again, here
                                        data = content.chunks.get(pack)
                                    if kept is not None:
                                        kept.put(pack, data)
                                files = [None] * k + [data[o : o + m] for o, m in spans[pack][k:]]
                                del data
                            decoded[pack] = files
                            held += sum(m for _, m in spans[pack][k:])
                            while held > HELD_BYTES and len(decoded) > 1:
                                old, _ = decoded.popitem(last=False)
                                held -= sum(m for _, m in spans[old][cursor.get(old, 0):])
                        piece = files[k]
                        files[k] = None
                        cursor[pack] = k + 1
                        held -= size
                        if k + 1 == len(files):
                            del decoded[pack]
                        if len(piece) != size:
                            raise CorruptStore(f"/{_s(path)}: its content lies outside its pack")
                        if size >= DIRECT_AT:
                            write(buf)
                            buf.clear()
                            write(piece)
                        else:
                            buf += piece
                    buf += padding(size)
            elif type_ == "l":
                buf += header(path, tw.SYMTYPE, mode, uid, gid, 0, mtime, node.link or b"", xattrs=xattrs)
            elif type_ in ("c", "b"):
                buf += header(path, TAR_FLAGS[type_], mode, uid, gid, 0, mtime, b"", node.devmajor or 0,
                              node.devminor or 0, xattrs=xattrs)
            else:
                buf += header(path, TAR_FLAGS[type_], mode, uid, gid, 0, mtime, xattrs=xattrs)
            if len(buf) >= FLUSH_AT:
                write(buf)
                buf.clear()
            if progress and n % 500 == 0:
                progress(n, total)
    return n


# Directory export --------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class _DirWriter:
    """Creates entries relative to directory fds opened with O_NOFOLLOW.

    Every parent is opened one component at a time without following symlinks,
    so no entry can land outside the target, whatever the view holds.
    """

    # Open directory fds kept, most recently used last.  A deep tree (import
    # accepts 4,096 components) reopens from its nearest kept ancestor.
    KEEP_FDS = 256

    def __init__(self, root: str):
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.cache: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.is_root = os.geteuid() == 0

    def close(self) -> None:
        for fd in self.cache.values():
            os.close(fd)
        self.cache.clear()
        os.close(self.root_fd)

    def dir_fd(self, path: bytes) -> int:
        """The fd of directory `path`, opened component by component from its
        nearest open ancestor (a loop, not recursion: any depth)."""
        if not path:
            return self.root_fd
        fd = self.cache.get(path)
        if fd is not None:
            self.cache.move_to_end(path)
            return fd
        base, fd = b"", self.root_fd
        i = len(path)
        while True:  # the nearest open ancestor
            i = path.rfind(b"/", 0, i)
            if i < 0:
                break
            got = self.cache.get(path[:i])
            if got is not None:
                base, fd = path[:i], got
                break
        start = len(base) + 1 if base else 0
        for name in path[start:].split(b"/"):
            base = base + b"/" + name if base else name
            fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            self.cache[base] = fd
            # Never the fd just opened: the next component opens from it.
            while len(self.cache) > self.KEEP_FDS:
                os.close(self.cache.popitem(last=False)[1])
        return fd

    def split(self, path: bytes) -> tuple[int, bytes]:
        i = path.rfind(b"/")
        return (self.dir_fd(path[:i]), path[i + 1:]) if i >= 0 else (self.root_fd, path)

    def meta(self, dfd: int, name: bytes, node: Node) -> None:
        """Owner, mode, xattrs and mtime of an entry we just created (never a symlink)."""
        if self.is_root:
            os.chown(name, node.uid or 0, node.gid or 0, dir_fd=dfd, follow_symlinks=False)
        os.chmod(name, node.mode or 0, dir_fd=dfd)
        for k, v in node.xattr_dict().items():
            try:
                # setxattr has no dir_fd form: go through the directory fd's /proc name.
                os.setxattr(_fd_path(dfd, name), k, v, follow_symlinks=False)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    raise
        mt = node.mtime or 0
        os.utime(name, (mt, mt), dir_fd=dfd, follow_symlinks=False)


def _fd_path(dfd: int, name: bytes) -> bytes:
    return b"/proc/self/fd/%d/%s" % (dfd, name)


def refuse_specials(store, chain: list[tuple[int, int]], under: bytes = b"") -> None:
    """Refuse a view (or its subtree at `under`) that shows a fifo or a device,
    before anything is written and without replaying the view: only the paths
    that ever held one in the chain, and the hard links to them, are looked up."""
    found: set[bytes] = set()
    for _, diff in chain:
        found.update(p for (p,) in store.execute(
            "SELECT p.path FROM event e JOIN path p ON p.id = e.path_id"
            " WHERE e.diff_id = ? AND e.kind = ? AND e.type IN ('c', 'b', 'p')", (diff, PUT)))
    special = sorted(found)
    for i in range(0, len(special), _BATCH):
        part = special[i : i + _BATCH]
        found.update(p for (p,) in store.execute(
            "SELECT DISTINCT p.path FROM event e JOIN path p ON p.id = e.path_id JOIN path t ON t.id = e.target_id"
            f" WHERE t.path IN ({','.join('?' * len(part))})", part))
    for p in sorted(found):
        if under and not p.startswith(under + b"/"):
            continue
        node = View().replay(decided_events(store, [chain], [p])[0]).get(p)
        if node is not None and node.type in ("c", "b", "p"):
            _refuse_special(p, node)


def _refuse_special(path: bytes, node: Node) -> None:
    # Special files are refused unless asked for, as tarfile.data_filter does.
    kind = "a fifo" if node.type == "p" else "a device file"
    raise UsageError(f"the view holds {kind} (/{_s(path)}); pass --allow-devices to create special files")


def write_dir(view: View, content: ContentStore, target: str, allow_devices: bool = False) -> int:
    """A view (a container's subtree, say) into a new directory."""
    if not allow_devices:
        for path, node in view.walk():
            if node.type in ("c", "b", "p"):
                _refuse_special(path, node)
    paths = sorted((p for p in view.nodes if p), key=tree_key)
    return write_dir_entries([entries_of(view, paths, None)], content, target)


def write_dir_entries(batches: Iterable[list[Entry]], content: ContentStore, target: str) -> int:
    """Entries in tree order (TreeEntries.batches) into a new directory that nothing
    escapes.  Memory holds a batch and the directories (their modes and times are
    set last)."""
    if os.path.lexists(target):
        if not os.path.isdir(target) or os.path.islink(target):
            raise UsageError(f"{target}: exists and is not a directory")
        if os.listdir(target):
            raise UsageError(f"{target}: exists and is not empty (the target must be new or an empty directory)")
    else:
        os.makedirs(target)
    w = _DirWriter(target)
    dirs: list[tuple[bytes, Node]] = []
    n = 0
    try:
        for path, node, first in (e for batch in batches for e in batch):
            n += 1
            dfd, name = w.split(path)
            if node.type == "d":
                os.mkdir(name, 0o700, dir_fd=dfd)
                dirs.append((path, node))
                continue
            if first is not None:
                sfd, sname = w.split(first)
                os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                continue
            if node.type == "f":
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                             0o600, dir_fd=dfd)
                with os.fdopen(fd, "wb") as f:
                    if node.size:
                        for chunk in content.iter_blob(node.blob_id):
                            f.write(chunk)
                w.meta(dfd, name, node)
            elif node.type == "l":
                os.symlink(node.link or b"", name, dir_fd=dfd)
                if w.is_root:
                    os.chown(name, node.uid or 0, node.gid or 0, dir_fd=dfd, follow_symlinks=False)
                mt = node.mtime or 0
                os.utime(name, (mt, mt), dir_fd=dfd, follow_symlinks=False)
            elif node.type == "p":
                os.mkfifo(name, 0o600, dir_fd=dfd)
                w.meta(dfd, name, node)
            elif node.type in ("c", "b"):
                kind = stat.S_IFCHR if node.type == "c" else stat.S_IFBLK
                os.mknod(name, kind | 0o600, os.makedev(node.devmajor or 0, node.devminor or 0), dir_fd=dfd)
                w.meta(dfd, name, node)
        # Directory modes and times last, deepest first, as tar does: a read-only
        # directory must not stop its own children from being written.
        for path, node in reversed(dirs):
            dfd, name = w.split(path)
            w.meta(dfd, name, node)
    except OSError as e:
        raise LayerdbError(f"export to {target}: {e}") from None
    except OverflowError as e:  # a uid, gid or time the host cannot represent
        raise LayerdbError(f"export to {target}: {e}") from None
    finally:
        w.close()
    return n
