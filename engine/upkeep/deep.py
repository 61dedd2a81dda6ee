"""fsck --deep: each diff's events against its layer tar, and containers' logs.

An imported diff's tar is rebuilt from the store (its framing records and its
events' contents) and read back with the reader import uses
(engine/tarstream.py); each entry becomes the event import would store
(engine/tarevents.py: names normalised, PAX and GNU long names, whiteouts,
opaque markers, AUFS names, hard links), which must be the stored event with
the same seq, field by field: path, kind, type, mode (setuid, setgid and
sticky bits included), uid, gid, mtime, size, symlink and hard-link targets,
device numbers, xattrs.  A stored event no entry makes is reported, and so is
an entry without its event; implied parent directories must be exactly those
import derives.  The rebuilt stream must hash to the diff_id: that vouches
for every content at its entry (the plain checks hash each content itself).

The headers come from the framing, never from the events, and each entry's
payload is given to the reader only once its header has been parsed, at the
size the header says: a content of the wrong size cannot shift the entries
after it.

A container's diff has no tar.  Its events must be well formed, the paths
they name canonical, and, replayed over the container's image, each one must
find the parents of its path directories and each hard link its target a
file at that point of the log.  Paths are checked in batches, each replaying
only the events that decide them (replay.decided_events), so memory follows
the batch, not the image.
"""

from __future__ import annotations

import hashlib
import heapq
import json
from typing import Iterator, NamedTuple

from ..content import ContentStore
from ..errors import CorruptStore, LayerFormatError
from ..kinds import IGNORED, IMPLIED, KIND_NAMES, OPAQUE, PUT, WHITEOUT
from ..output.lossless import FramingRecords
from ..paths import ancestors, parse_path, show_path
from ..refs import chain_of
from ..replay import View, decided_events
from ..store import Store
from ..tarevents import TAG_SIZE, Parents, TarEvent, event_of
from ..tarstream import TarReader

# A stored event's columns, in the order of TarEvent's fields after its path.
FIELDS = ("type", "mode", "uid", "gid", "mtime", "size", "link", "hard-link target", "devmajor", "devminor",
          "xattrs")
EVENTS = """SELECT e.seq, e.kind, p.path, e.type, e.mode, e.uid, e.gid, e.mtime, e.size, e.link, t.path,
                   e.devmajor, e.devminor, e.xattrs, e.blob_id, b.size, b.chunk, b.offset, e.target_id, b.sha256
            FROM event e LEFT JOIN path p ON p.id = e.path_id LEFT JOIN path t ON t.id = e.target_id
                 LEFT JOIN blob b ON b.id = e.blob_id
            WHERE e.diff_id = ? AND e.kind = ? AND typeof(e.seq) = 'integer' ORDER BY e.seq"""
# One cursor per kind, each in primary-key order, merged by seq: no sort of a whole diff's events.
KINDS = (OPAQUE, WHITEOUT, PUT, IGNORED)
# Rows no kind's cursor returns: damage only (a kind no event has, a seq that is no integer).
ODD_EVENTS = """SELECT e.seq, e.kind, p.path FROM event e LEFT JOIN path p ON p.id = e.path_id
                WHERE e.diff_id = ? AND (typeof(e.seq) != 'integer' OR e.kind NOT IN (0, 1, 2, 3, 4))
                ORDER BY e.seq"""
IMPLIED_EVENTS = """SELECT e.seq, p.path, e.type, e.mode, e.uid, e.gid, e.mtime, e.size, e.link, e.target_id,
                           e.devmajor, e.devminor, e.xattrs, e.blob_id
                    FROM event e LEFT JOIN path p ON p.id = e.path_id
                    WHERE e.diff_id = ? AND e.kind = ? AND typeof(e.seq) = 'integer' ORDER BY e.seq"""
# What import writes for an implied directory (type .. blob_id of IMPLIED_EVENTS).
IMPLIED_ROW = ("d", 0o755, 0, 0, None, None, None, None, None, None, None, None)
PUT_HERE = ("SELECT 1 FROM event e JOIN path p ON p.id = e.path_id"
            " WHERE p.path = ? AND e.diff_id = ? AND e.kind = ? LIMIT 1")
ZEROS = bytes(1 << 20)
BATCH = 4096  # container paths checked per replay
TYPES = frozenset("fdlhpcb")


class Problem(NamedTuple):
    check: str  # "event" or "layer-tar"
    obj: str
    text: str
    path: bytes | None = None


def _kind(kind) -> str:
    return KIND_NAMES.get(kind, f"kind-{kind}")


def _path(v) -> str:
    """A path as findings show it; a value damage made something else, as it is."""
    return show_path(v) if isinstance(v, bytes) else repr(v)


def _show(v, field: str) -> str:
    if v is None:
        return "none"
    if field == "mode" and isinstance(v, int):
        return "%04o" % v
    if field == "hard-link target":
        return _path(v)
    if isinstance(v, bytes):
        return repr(v.decode("utf-8", "surrogateescape"))
    return repr(v) if isinstance(v, str) and field != "xattrs" else str(v)


def _what(kind, path) -> str:
    shown = "a missing path" if path is None else _path(path)
    name = _kind(kind)
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} of {shown}"


class _Feed:
    """The rebuilt tar as a stream for TarReader: framing record i, then the
    payload of entry i, which the checker sets once the reader has yielded
    entry i.  Reads never run past the piece at hand, so the reader has parsed
    a header before the payload after it is chosen.  Hashes what it serves."""

    def __init__(self, records: FramingRecords):
        self.records = records
        self.served = 0  # framing records handed out
        self.payload: Iterator[bytes] | None = None
        self.cur = b""
        self.pos = 0
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        while self.pos >= len(self.cur):
            if self.payload is not None:
                piece = next(self.payload, None)
                if piece is None:
                    self.payload = None
                    continue
            elif self.records.at_end():
                return b""
            else:
                piece = self.records.next()
                self.served += 1
            self.sha.update(piece)
            self.size += len(piece)
            self.cur, self.pos = piece, 0
        if self.pos == 0 and (n < 0 or n >= len(self.cur)):
            self.pos = len(self.cur)
            return self.cur
        b = self.cur[self.pos : self.pos + n] if n >= 0 else self.cur[self.pos :]
        self.pos += len(b)
        return b


class _Tags:
    """The TAG_SIZE-byte tags of a diff.digests blob, across chunk borders."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks = chunks
        self.buf = b""
        self.pos = 0

    def next(self) -> bytes | None:
        pos = self.pos
        end = pos + TAG_SIZE
        if end > len(self.buf):
            while len(self.buf) - self.pos < TAG_SIZE:
                c = next(self.chunks, None)
                if c is None:
                    return None
                self.buf, self.pos = self.buf[self.pos :] + c, 0
            pos, end = 0, TAG_SIZE
        self.pos = end
        return self.buf[pos:end]

    def more(self) -> bool:
        return self.pos < len(self.buf) or any(self.chunks)


class TarCheck:
    """Checks imported diffs one at a time; `entries` counts the tar entries read."""

    def __init__(self, store: Store, content: ContentStore):
        self.store = store
        self.content = content
        self.entries = 0

    def diff(self, rowid: int, diff_id: str, entries: int, tar_size: int, framing: int | None,
             digests: int | None = None) -> Iterator[Problem]:
        def tar(text: str) -> Problem:
            return Problem("layer-tar", diff_id, f"layer {diff_id} {text}")

        if framing is None:
            yield tar(f"cannot be rebuilt: diff {rowid} has no framing")
            return
        # Diffs imported before schema version 4 have no tags: a swapped content
        # is then caught by the diff_id alone, which names the layer only.
        tags = None if digests is None else _Tags(self.content.iter_blob(digests))
        payloads = 0  # entries with a payload so far: the index of the next tag
        feed = _Feed(FramingRecords(self.content.iter_blob(framing)))
        reader = TarReader(feed)  # type: ignore[arg-type]  (a stream is anything with read)
        faults = 0  # event problems in this diff
        for r in self.store.execute(ODD_EVENTS, (rowid,)):
            faults += 1
            yield self._extra(diff_id, r, f"no tar entry makes an event of kind {r[1]!r} and seq {r[0]!r}")
        rows = heapq.merge(*(self.store.execute(EVENTS, (rowid, k)) for k in KINDS))
        nxt = next(rows, None)
        parents = Parents()
        unreadable: list[str] = []  # why a content could not be given at its header's size
        n = 0
        try:
            for n, e in enumerate(reader):
                if feed.served != n + 1:
                    yield tar(f"cannot be rebuilt: its framing record {feed.served - 1} does not hold one tar entry")
                    return
                here: list = []
                while nxt is not None and nxt[0] <= n:
                    if nxt[0] < n:  # a seq no entry has (negative)
                        faults += 1
                        yield self._extra(diff_id, nxt, f"no tar entry has seq {nxt[0]}")
                    else:
                        here.append(nxt)
                    nxt = next(rows, None)
                try:
                    ev = event_of(e)
                except LayerFormatError as err:
                    faults += 1
                    yield Problem("event", f"entry {n} of {diff_id}", f"the tar's entry {n} would not import: "
                                  f"{err.message}", None)
                    ev = None
                if ev is not None:
                    parents.add(ev)
                    r = here[0] if len(here) == 1 else None
                    if r is None or r[1] != ev.kind or r[2] != ev.path or r[3:14] != (
                            ev.type, ev.mode, ev.uid, ev.gid, ev.mtime, ev.size, ev.link, ev.target, ev.devmajor,
                            ev.devminor, ev.xattrs) or (r[14] is not None and e.type != "f"):
                        for p in self._compare(diff_id, n, ev, here):
                            faults += 1
                            yield p
                if not here:  # the rebuild (save) splices each entry's content at its event
                    unreadable.append(f"entry {n} has no event")
                if e.type == "f":
                    feed.payload = self._payload(n, ev, e.size, here, unreadable)
                    if tags is not None:
                        tag = tags.next()
                        payloads += 1
                        # The usual case, one event holding the content it held: no call.
                        if len(here) != 1 or tag is None or here[0][19] is None or here[0][19][:TAG_SIZE] != tag:
                            p = self._tag(diff_id, n, ev, here, tag, payloads - 1)
                            if p is not None:
                                faults += 1
                                yield p
            n = reader.entries
        except LayerFormatError as err:
            yield tar(f"cannot be rebuilt: its framing does not read as a tar after entry {n}: {err.message}")
            return
        except CorruptStore as err:
            yield tar(f"cannot be rebuilt: {err.message}")
            return
        self.entries += n
        if tags is not None and tags.more():
            yield tar(f"has content tags for more than its {payloads} files: the store is damaged")
        while nxt is not None:
            faults += 1
            yield self._extra(diff_id, nxt, f"the tar has {n} entries")
            nxt = next(rows, None)
        if n != entries:
            yield tar(f"has {n} tar entries, the diff records {entries}")
        for p in self._implied(rowid, diff_id, n, parents):
            faults += 1
            yield p
        got = "sha256:" + feed.sha.hexdigest()
        if unreadable:
            yield tar("cannot be rebuilt: " + "; ".join(unreadable[:3])
                      + (f"; and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""))
        elif got != diff_id or feed.size != tar_size:
            why = "" if faults else (
                ": every entry agrees with its event, so the content of one of its files is not the one imported")
            yield tar(f"rebuilds to {feed.size} bytes hashing to {got}; expected {tar_size} bytes hashing to the"
                      f" diff_id: the store is damaged{why}")

    # Entries ------------------------------------------------------------------

    def _tag(self, diff_id: str, n: int, ev: TarEvent | None, here: list, tag: bytes | None,
             k: int) -> Problem | None:
        """Entry n's content against the tag import kept of the bytes it held."""
        where = f"entry {n} of {diff_id}"
        if tag is None:
            return Problem("event", where, f"the diff's content tags end before its file number {k + 1}",
                           None if ev is None else ev.path)
        rows = [r for r in here if r[14] is not None]
        if ev is not None:
            rows.sort(key=lambda r: r[1] != ev.kind)
        if not rows or rows[0][19] is None:
            return None  # no content, or a missing one: _payload reports it
        have = rows[0][19]
        if have[:TAG_SIZE] == tag:
            return None
        path = ev.path if ev is not None else rows[0][2]
        return Problem("event", f"event {rows[0][0]} of {diff_id}",
                       f"{_kind(rows[0][1])} of {_path(path)} names content sha256:{have.hex()[:16]}..., but its"
                       f" tar entry held a content whose sha256 starts {tag.hex()}: the event was changed after"
                       " import", path if isinstance(path, bytes) else None)

    def _extra(self, diff_id: str, r, why: str) -> Problem:
        return Problem("event", f"event {r[0]} of {diff_id}", f"is {_what(r[1], r[2])}, which the tar does not"
                       f" hold: {why}", r[2] if isinstance(r[2], bytes) else None)

    def _compare(self, diff_id: str, n: int, ev: TarEvent, here: list) -> Iterator[Problem]:
        mine = [r for r in here if r[1] == ev.kind]
        for r in here:
            if r[1] != ev.kind:
                yield self._extra(diff_id, r, f"its entry {n} is {_what(ev.kind, ev.path)}")
        if not mine:
            yield Problem("event", f"entry {n} of {diff_id}",
                          f"the tar's entry {n}, {_what(ev.kind, ev.path)}, has no event", ev.path)
            return
        r = mine[0]
        want = (ev.type, ev.mode, ev.uid, ev.gid, ev.mtime, ev.size, ev.link, ev.target, ev.devmajor, ev.devminor,
                ev.xattrs)
        have = r[3:14]
        stray_content = r[14] is not None and ev.type != "f"
        if r[2] == ev.path and have == want and not stray_content:
            return
        diffs = []
        # A missing path row or hard-link target row is a plain check's finding already.
        if r[2] is not None and r[2] != ev.path:
            diffs.append(f"names {_path(r[2])} where the tar has {show_path(ev.path)}")
        for field, h, w in zip(FIELDS, have, want):
            if h != w and not (field == "hard-link target" and h is None and r[18] is not None):
                diffs.append(f"{field} {_show(h, field)} where the tar has {_show(w, field)}")
        if stray_content:
            diffs.append(f"names a content (blob row {r[14]}) where the tar's entry has none")
        if diffs:
            yield Problem("event", f"event {n} of {diff_id}",
                          f"{_kind(ev.kind)} disagrees with its tar entry: " + "; ".join(diffs), ev.path)

    def _payload(self, n: int, ev: TarEvent | None, size: int, here: list, unreadable: list[str]) -> Iterator[bytes]:
        """The content of entry n as `size` bytes: its event's, else zeros (and why, in unreadable)."""
        rows = [r for r in here if r[14] is not None]
        if len(rows) > 1 and ev is not None:
            rows.sort(key=lambda r: r[1] != ev.kind)
        if rows and rows[0][15] == size and rows[0][16] is not None:  # the usual case: a packed content
            if not size:
                return iter(())
            try:
                return iter((self.content.read_packed(rows[0][16], rows[0][17], size),))
            except CorruptStore as err:
                unreadable.append(f"{self._where(n, ev)}: {err.message}")
                return self._sized(iter(()), size)
        return self._sized(self._content(n, ev, size, rows, unreadable), size)

    @staticmethod
    def _where(n: int, ev: TarEvent | None) -> str:
        return show_path(ev.path) if ev is not None else f"entry {n}"

    def _content(self, n: int, ev: TarEvent | None, size: int, rows: list, unreadable: list[str]) -> Iterator[bytes]:
        if not rows:
            if size:
                unreadable.append(f"no event holds the content of {self._where(n, ev)}")
            return
        blob_id, bsize, chunk, offset = rows[0][14:18]
        if bsize is None:
            unreadable.append(f"{self._where(n, ev)}: content {blob_id} is missing")
            return
        if bsize != size:
            unreadable.append(f"the content of {self._where(n, ev)} holds {bsize} bytes, its tar header says {size}")
        if not bsize:
            return
        try:
            if chunk is not None:
                yield self.content.read_packed(chunk, offset, bsize)
                return
            pieces = self.content.iter_chunks(blob_id)
            try:
                yield from pieces
            finally:
                pieces.close()  # a large content's prefetch threads, when the reader stops early
        except CorruptStore as err:
            unreadable.append(f"{self._where(n, ev)}: {err.message}")

    @staticmethod
    def _sized(pieces: Iterator[bytes], size: int) -> Iterator[bytes]:
        """Exactly size bytes: pieces cut there, or made up with zeros."""
        given = 0
        try:
            for p in pieces:
                p = p[: size - given]
                given += len(p)
                if p:
                    yield p
                if given >= size:
                    break
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        while given < size:
            z = ZEROS[: min(len(ZEROS), size - given)]
            given += len(z)
            yield z

    def _implied(self, rowid: int, diff_id: str, n: int, parents: Parents) -> Iterator[Problem]:
        want = parents.implied(lambda p: self.store.scalar(PUT_HERE, (p, rowid, PUT)) is not None)
        have = {r[1]: r for r in self.store.execute(IMPLIED_EVENTS, (rowid, IMPLIED))}
        for i, p in enumerate(want):
            r = have.pop(p, None)
            if r is None:
                yield Problem("event", f"event {n + i} of {diff_id}",
                              "the tar has entries below this directory and names no directory there, but the"
                              " diff has no implied event for it", p)
                continue
            bad = [f"{f} {_show(h, f)} where import writes {_show(w, f)}"
                   for f, h, w in zip(FIELDS + ("content",), r[2:], IMPLIED_ROW) if h != w]
            if r[0] != n + i:
                bad.append(f"seq {r[0]} where import numbers it {n + i}")
            if bad:
                yield Problem("event", f"event {r[0]} of {diff_id}",
                              "implied directory disagrees with what import writes: " + "; ".join(bad), p)
        for p, r in have.items():
            if p is None:
                continue  # names a missing path: a plain check's finding
            why = ("the tar names that directory itself" if p in parents.named else
                   "the tar puts a file there" if p in parents.needed else "no entry of the tar lies below it")
            yield Problem("event", f"event {r[0]} of {diff_id}",
                          f"is an implied directory {_path(p)}, which the tar does not imply: {why}",
                          p if isinstance(p, bytes) else None)


class ContainerCheck:
    """Checks a container's log: what can be checked without a tar."""

    def __init__(self, store: Store):
        self.store = store
        self.events = 0

    def diff(self, rowid: int, diff_id: str, name: str | None, layer_id: int | None) -> Iterator[Problem]:
        """The log of the container `name` on the layer `layer_id` (None: an image without diffs).
        A container diff no container holds is reported, and only its events' form is checked."""
        if name is None:
            yield Problem("diff", diff_id, "is a container's diff, but no container holds it: what its events"
                          " resolve against is unknown")
        paths: list[bytes] = []
        seen: set[bytes] = set()
        for r in self.store.execute(
            """SELECT e.seq, e.kind, p.path, e.type, e.mode, e.uid, e.gid, e.size, e.blob_id, e.link, e.target_id,
                      t.path, e.devmajor, e.devminor, e.xattrs, e.time
               FROM event e LEFT JOIN path p ON p.id = e.path_id LEFT JOIN path t ON t.id = e.target_id
               WHERE e.diff_id = ? ORDER BY e.seq""", (rowid,)
        ):
            self.events += 1
            bad = _malformed(*r[1:])
            if bad:
                yield Problem("event", f"event {r[0]} of container {name or diff_id}", "; ".join(bad),
                              r[2] if isinstance(r[2], bytes) else None)
            for p in (r[2], r[11]):
                if p is not None and p not in seen and not _malformed_path(p):
                    seen.add(p)
                    paths.append(p)
        if name is None:
            return
        chain = [(li.position, li.diff_rowid) for li in chain_of(self.store, layer_id)] if layer_id else []
        top = len(chain) + 1
        chain.append((top, rowid))
        for i in range(0, len(paths), BATCH):
            yield from self._resolve(name, chain, top, set(paths[i : i + BATCH]))

    def _resolve(self, name: str, chain: list[tuple[int, int]], top: int, batch: set[bytes]) -> Iterator[Problem]:
        """Replay what decides the batch's paths; at each of the container's events on them, its parents must be
        directories and a hard link's target a file."""
        view = View()
        for ev in decided_events(self.store, [chain], sorted(batch))[0]:
            if ev.position == top and ev.path in batch and ev.kind in (PUT, WHITEOUT, OPAQUE):
                for a in reversed(list(ancestors(ev.path))):
                    node = view.get(a)
                    if node is None or node.type != "d":
                        what = "does not exist" if node is None else "is no directory"
                        yield Problem("event", f"event {ev.seq} of container {name}",
                                      f"{_kind(ev.kind)} does not resolve: its parent {show_path(a)} {what} at"
                                      " that point of the log", ev.path)
                        break
                if ev.kind == PUT and ev.type == "h" and ev.target is not None:
                    node = view.get(ev.target)
                    if node is None or node.type == "d":
                        what = "does not exist" if node is None else "is a directory"
                        yield Problem("event", f"event {ev.seq} of container {name}",
                                      f"hard link does not resolve: its target {show_path(ev.target)} {what} at"
                                      " that point of the log", ev.path)
            view.apply(ev)


def _malformed_path(p) -> bool:
    return not isinstance(p, bytes) or b"\0" in p or parse_path(p) != p or b".." in p.split(b"/")


def _malformed(kind, path, type_, mode, uid, gid, size, blob_id, link, target_id, target, devmajor, devminor,
               xattrs, time) -> list[str]:
    """What is wrong with a container event on its own (the plain checks own missing rows and contents)."""
    bad = []
    if path is not None and _malformed_path(path):
        bad.append(f"names the path {path!r}, which is not canonical")
    if target is not None and _malformed_path(target):
        bad.append(f"links to the path {target!r}, which is not canonical")
    if time is None:
        bad.append("has no time, which every write in a container's log has")
    if kind in (WHITEOUT, OPAQUE):
        if kind == WHITEOUT and path == b"":
            bad.append("is a whiteout of the root")
        return bad
    if kind != PUT:
        return bad + [f"is a {_kind(kind)} event, which a container never writes"]
    if type_ not in TYPES:
        return bad + [f"has type {type_!r}"]
    if not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        bad.append(f"has mode {mode!r}")
    for what, v in (("uid", uid), ("gid", gid)):
        if not isinstance(v, int) or v < 0:
            bad.append(f"has {what} {v!r}")
    if (type_ == "f") != (size is not None) or (type_ != "f" and blob_id is not None):
        bad.append(f"a {type_!r} entry with size {size!r} and content {blob_id!r}")
    if type_ == "l" and (not isinstance(link, bytes) or not link):
        bad.append("is a symlink without a target")
    if type_ != "l" and link is not None:
        bad.append(f"a {type_!r} entry with a symlink target")
    if type_ != "h" and target_id is not None:
        bad.append(f"a {type_!r} entry with a hard-link target")
    dev = type_ in ("c", "b")
    if dev != (isinstance(devmajor, int) and isinstance(devminor, int)) or (not dev and (devmajor, devminor) != (None, None)):
        bad.append(f"a {type_!r} entry with device numbers {devmajor!r},{devminor!r}")
    if xattrs is not None:
        try:
            x = json.loads(xattrs)
            ok = isinstance(x, dict) and all(isinstance(v, str) and bytes.fromhex(v) is not None for v in x.values())
        except (ValueError, TypeError):
            ok = False
        if not ok:
            bad.append("has xattrs that are not a JSON object of hex values")
    return bad
