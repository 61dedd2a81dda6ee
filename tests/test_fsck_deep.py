"""`fsck --deep` checks every stored event against its layer tar, header by header
(issue 17), and containers' logs against what a container can write.

The store is a real import of a fixture archive whose top layer is rewritten
to hold one entry of every kind a layer can carry: device nodes, a fifo,
setuid, setgid and sticky modes, owners, xattrs, PAX and GNU long names and
link targets, a symlink, a hard link, the same path twice, a whiteout, an
opaque directory, AUFS bookkeeping and parents no entry names.  Each case
damages one field of one event through SQL in a copy of that store, as a
failing disk or an attacker would, and `fsck --deep` must name the path, its
diff, layer and image; most of the damage is invisible to a plain `fsck`,
which the cases say and check.  Expected paths, diff ids and chain ids come
from the archive the test writes, never from layerdb.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import apsw
import pytest

from archive_tools import ArchiveEditor, sha256_digest
from conftest import REPO_FIXTURES, SHARED_FIXTURES, load_json_lines, run_cli

BASE = REPO_FIXTURES / "images" / "opaque.docker.tar"
T = 1_600_000_000
LONG_NAME = "long/" + "n" * 120 + "/file.txt"  # PAX path: its parent is named by no entry (implied)
GNU_NAME = "gnu/" + "g" * 110  # a GNU long name (././@LongLink), and a GNU long link target below
FAR = "/" + "t" * 150  # a symlink target longer than the 100 bytes of a header
PUT, WHITEOUT, OPAQUE, IMPLIED, IGNORED = 3, 1, 0, 2, 4
KIND = {"opaque": OPAQUE, "whiteout": WHITEOUT, "implied": IMPLIED, "put": PUT, "ignored": IGNORED}


def _info(name: str, type_=tarfile.REGTYPE, mode=0o644, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = type_, mode, T, 0, 0
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _entries() -> list[tuple[tarfile.TarInfo, bytes | None, int]]:
    """(header, data, format) of every entry the test appends to the top layer."""
    pax, gnu = tarfile.PAX_FORMAT, tarfile.GNU_FORMAT
    attrs = _info("opt/attrs.txt", pax_headers={"SCHILY.xattr.user.fixture": "v1",
                                                 "SCHILY.xattr.security.selinux": "ctx"})
    out = [
        (_info("dev", tarfile.DIRTYPE, 0o755), None, pax),
        (_info("dev/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3), None, pax),
        (_info("dev/sda", tarfile.BLKTYPE, 0o660, devmajor=8, devminor=0, gid=6), None, pax),
        (_info("dev/fifo", tarfile.FIFOTYPE, 0o600), None, pax),
        (_info("usr/bin/su", mode=0o4755), b"#!/bin/sh\nexec id\n", pax),  # usr, usr/bin: implied
        (_info("usr/bin/wall", mode=0o2755, gid=5), b"#!/bin/sh\necho wall\n", pax),
        (_info("srv/drop", tarfile.DIRTYPE, 0o1733), None, pax),  # srv: implied
        (_info("home/u", tarfile.DIRTYPE, 0o700, uid=1000, gid=1000), None, pax),
        (_info("home/u/notes", mode=0o640, uid=1000, gid=100, mtime=1_234_567_890), b"notes\n", pax),
        (attrs, b"attrs\n", pax),
        (_info("opt/link", tarfile.SYMTYPE, 0o777, linkname="../cfg/a"), None, pax),
        (_info("opt/far", tarfile.SYMTYPE, 0o777, linkname=FAR), None, pax),
        (_info("opt/hard", tarfile.LNKTYPE, 0o644, linkname="opt/attrs.txt"), None, pax),
        (_info(LONG_NAME), b"long\n", pax),
        (_info(GNU_NAME), b"gnu\n", gnu),
        (_info("gnu/link", tarfile.SYMTYPE, 0o777, linkname="/" + "l" * 120), None, gnu),
        (_info("opt/twice"), b"first\n", pax),
        (_info("opt/twice", mode=0o600), b"second\n", pax),  # the same path again: the later wins
        (_info(".wh.gone"), b"", pax),  # a whiteout of /gone
        (_info("var/cache", tarfile.DIRTYPE, 0o755), None, pax),
        (_info("var/cache/.wh..wh..opq"), b"", pax),  # /var/cache is opaque
        (_info(".wh..wh.plnk", tarfile.DIRTYPE, 0o700), None, pax),  # AUFS bookkeeping: kept, ignored
        (_info(".wh..wh.plnk/1.2"), b"", pax),
    ]
    return out


def _layer_tar(original: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(original)) as src:
        for m in src.getmembers():
            buf.write(m.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            if m.isfile() and m.size:
                buf.write(src.extractfile(m).read() + b"\0" * (-m.size % 512))
    for info, data, fmt in _entries():
        info.size = len(data or b"")
        buf.write(info.tobuf(fmt, "utf-8", "surrogateescape"))
        if data:
            buf.write(data + b"\0" * (-len(data) % 512))
    buf.write(b"\0" * 1024)
    return buf.getvalue()


class Fixture:
    def __init__(self, store: Path, diff_ids: list[str], digest: str):
        self.store = store
        self.diff_ids = diff_ids
        chain: list[str] = []
        for d in diff_ids:
            chain.append(d if not chain else sha256_digest(f"{chain[-1]} {d}".encode()))
        self.chain_ids = chain
        self.image = {"id": digest, "repo_tags": ["localhost/opaque:1.0"]}

    def layer(self, pos: int) -> list[dict]:
        return [{"layer_id": self.chain_ids[pos - 1], "position": pos}]


@pytest.fixture(scope="module")
def rich(tmp_path_factory) -> Fixture:
    """The store of opaque.docker.tar with its top layer holding every kind of entry."""
    d = tmp_path_factory.mktemp("rich")
    ed = ArchiveEditor(BASE)
    top = ed.layer_names()[-1]
    data = _layer_tar(ed.read(top))
    ed.set(top, data)
    config = ed.read_json(ed.config_name())
    config["rootfs"]["diff_ids"][-1] = sha256_digest(data)
    raw = json.dumps(config).encode()
    digest = ed.replace_config(raw)
    archive = ed.write(d / "rich.docker.tar")
    store = d / "store.sqlite"
    r = run_cli("import", str(archive), db_path=store)
    assert r.exit_code == 0, r.output
    return Fixture(store, config["rootfs"]["diff_ids"], digest)


def _copy(fx: Fixture, tmp_path: Path) -> Path:
    p = tmp_path / "store.sqlite"
    shutil.copy(fx.store, p)
    for suffix in ("-wal", "-shm"):
        if Path(str(fx.store) + suffix).exists():
            shutil.copy(str(fx.store) + suffix, str(p) + suffix)
    return p


def _fsck(p: Path, *args: str):
    r = run_cli("fsck", "--json", *args, db_path=p)
    return r, load_json_lines(r.stdout)


def test_the_rich_store_passes_and_holds_every_kind_of_entry(rich, tmp_path):
    p = _copy(rich, tmp_path)
    r = run_cli("fsck", "--deep", db_path=p)
    assert r.exit_code == 0, r.output
    assert "3 layer tars rebuilt" in r.stderr
    conn = apsw.Connection(str(p))
    top = conn.execute("SELECT id, entries FROM diff WHERE diff_id = ?", (rich.diff_ids[-1],)).fetchone()
    kinds = {(k, t) for k, t in conn.execute("SELECT kind, type FROM event WHERE diff_id = ?", (top[0],))}
    assert {(PUT, t) for t in "fdlhpcb"} <= kinds
    assert {(WHITEOUT, "f"), (OPAQUE, "f"), (IMPLIED, "d"), (IGNORED, "d"), (IGNORED, "f")} <= kinds
    (entries,) = conn.execute("SELECT sum(entries) FROM diff").fetchone()
    assert f"{entries} tar entries compared to their events" in r.stderr


# One damaged field of one event ------------------------------------------------------------------

# Each case: (SQL, arguments; '{ev}' is the event's primary key condition), the event
# (path, kind, layer position, which occurrence), the path fsck must name, words of the
# problem, and whether a plain fsck sees the damage too.
EV = "diff_id = ? AND kind = ? AND seq = ?"
CASES = {
    "path": ("UPDATE event SET path_id = (SELECT id FROM path WHERE path = CAST('cfg/b' AS BLOB)) WHERE {ev}",
             ("usr/bin/su", "put", 3), "/usr/bin/su", "names /cfg/b where the tar has /usr/bin/su", False),
    "type": ("UPDATE event SET type = 'd' WHERE {ev}", ("dev/fifo", "put", 3), "/dev/fifo",
             "type 'd' where the tar has 'p'", False),
    "setuid bit set": ("UPDATE event SET mode = mode | 2048 WHERE {ev}", ("home/u/notes", "put", 3), "/home/u/notes",
                       "mode 4640 where the tar has 0640", False),
    "setuid bit cleared": ("UPDATE event SET mode = 493 WHERE {ev}", ("usr/bin/su", "put", 3), "/usr/bin/su",
                           "mode 0755 where the tar has 4755", False),
    "setgid bit cleared": ("UPDATE event SET mode = 493 WHERE {ev}", ("usr/bin/wall", "put", 3), "/usr/bin/wall",
                           "mode 0755 where the tar has 2755", False),
    "sticky bit cleared": ("UPDATE event SET mode = 511 WHERE {ev}", ("var/tmp", "put", 1), "/var/tmp",
                           "mode 0777 where the tar has 1777", False),
    "uid": ("UPDATE event SET uid = uid + 1 WHERE {ev}", ("home/u/notes", "put", 3), "/home/u/notes",
            "uid 1001 where the tar has 1000", False),
    "gid": ("UPDATE event SET gid = gid + 1 WHERE {ev}", ("cfg/a", "put", 1), "/cfg/a",
            "gid 1 where the tar has 0", False),
    "mtime": ("UPDATE event SET mtime = mtime + 1 WHERE {ev}", ("home/u/notes", "put", 3), "/home/u/notes",
              "mtime 1234567891 where the tar has 1234567890", False),
    "size": ("UPDATE event SET size = size + 1 WHERE {ev}", ("opt/attrs.txt", "put", 3), "/opt/attrs.txt",
             "size 7 where the tar has 6", True),
    "symlink target": ("UPDATE event SET link = CAST('/etc/shadow' AS BLOB) WHERE {ev}", ("opt/link", "put", 3),
                       "/opt/link", "link '/etc/shadow' where the tar has '../cfg/a'", False),
    "long symlink target": ("UPDATE event SET link = substr(link, 1, 140) WHERE {ev}", ("opt/far", "put", 3),
                            "/opt/far", "where the tar has '" + FAR + "'", False),
    "GNU long link target": ("UPDATE event SET link = CAST('/x' AS BLOB) WHERE {ev}", ("gnu/link", "put", 3),
                             "/gnu/link", "link '/x' where the tar has '/" + "l" * 120 + "'", False),
    "hard-link target": ("UPDATE event SET target_id = (SELECT id FROM path WHERE path = CAST('cfg/b' AS BLOB))"
                         " WHERE {ev}", ("opt/hard", "put", 3), "/opt/hard",
                         "hard-link target /cfg/b where the tar has /opt/attrs.txt", False),
    "hard-link target of a lower layer": (
        "UPDATE event SET target_id = (SELECT id FROM path WHERE path = CAST('cfg/sub/c' AS BLOB)) WHERE {ev}",
        ("cfg/h2", "put", 1), "/cfg/h2", "hard-link target /cfg/sub/c where the tar has", False),
    "devmajor": ("UPDATE event SET devmajor = 4 WHERE {ev}", ("dev/null", "put", 3), "/dev/null",
                 "devmajor 4 where the tar has 1", False),
    "devminor": ("UPDATE event SET devminor = 1 WHERE {ev}", ("dev/sda", "put", 3), "/dev/sda",
                 "devminor 1 where the tar has 0", False),
    "device numbers on a file": ("UPDATE event SET devmajor = 1, devminor = 3 WHERE {ev}", ("cfg/b", "put", 1),
                                 "/cfg/b", "devmajor 1 where the tar has none", False),
    "xattr value": ("UPDATE event SET xattrs = replace(xattrs, '7631', '7632') WHERE {ev}",
                    ("opt/attrs.txt", "put", 3), "/opt/attrs.txt", "xattrs", False),
    "xattrs dropped": ("UPDATE event SET xattrs = NULL WHERE {ev}", ("opt/attrs.txt", "put", 3), "/opt/attrs.txt",
                       "xattrs none where the tar has", False),
    "xattr added": ("UPDATE event SET xattrs = '{{\"security.capability\": \"01\"}}' WHERE {ev}",
                    ("usr/bin/su", "put", 3), "/usr/bin/su", "where the tar has none", False),
    "content of another size": (
        "UPDATE event SET blob_id = (SELECT e.blob_id FROM event e JOIN path p ON p.id = e.path_id"
        " WHERE p.path = CAST('usr/bin/su' AS BLOB)) WHERE {ev}", ("home/u/notes", "put", 3), "/home/u/notes",
        "holds", True),
    "a put's path under a long PAX name": (
        "UPDATE event SET path_id = (SELECT id FROM path WHERE path = CAST('cfg/b' AS BLOB)) WHERE {ev}",
        (LONG_NAME, "put", 3), "/" + LONG_NAME, "names /cfg/b", False),
    "a GNU long name's mode": ("UPDATE event SET mode = 420 + 2048 WHERE {ev}", (GNU_NAME, "put", 3), "/" + GNU_NAME,
                               "mode 4644 where the tar has 0644", False),
    "the earlier of two puts of one path": ("UPDATE event SET mode = 511 WHERE {ev}", ("opt/twice", "put", 3, 0),
                                            "/opt/twice", "mode 0777 where the tar has 0644", False),
    "the later of two puts of one path": ("UPDATE event SET uid = 7 WHERE {ev}", ("opt/twice", "put", 3, 1),
                                          "/opt/twice", "uid 7 where the tar has 0", False),
    "a whiteout's path": ("UPDATE event SET path_id = (SELECT id FROM path WHERE path = CAST('cfg/b' AS BLOB))"
                          " WHERE {ev}", ("cfg/new", "whiteout", 3), "/cfg/new", "names /cfg/b", False),
    # Whiteouts and opaque directories: removed, and added where the tar has none.
    # (A removed entry also leaves the diff's entry count short, which a plain fsck sees.)
    "whiteout removed": ("DELETE FROM event WHERE {ev}", ("cfg/new", "whiteout", 3), "/cfg/new",
                         "a whiteout of /cfg/new, has no event", True),
    "root whiteout removed": ("DELETE FROM event WHERE {ev}", ("gone", "whiteout", 3), "/gone",
                              "a whiteout of /gone, has no event", True),
    "opaque removed": ("DELETE FROM event WHERE {ev}", ("cfg", "opaque", 2), "/cfg",
                       "an opaque of /cfg, has no event", True),
    "top-layer opaque removed": ("DELETE FROM event WHERE {ev}", ("var/cache", "opaque", 3), "/var/cache",
                                        "has no event", True),
    "put turned into a whiteout": ("UPDATE event SET kind = 1 WHERE {ev}", ("opt/lower.dat", "put", 1),
                                   "/opt/lower.dat", "has no event", False),
    "whiteout turned into a put": ("UPDATE event SET kind = 3 WHERE {ev}", ("cfg/new", "whiteout", 3), "/cfg/new",
                                   "which the tar does not hold", False),
    "AUFS entry removed": ("DELETE FROM event WHERE {ev}", (".wh..wh.plnk/1.2", "ignored", 3), "/.wh..wh.plnk/1.2",
                           "has no event", True),
    "put removed": ("DELETE FROM event WHERE {ev}", ("dev/sda", "put", 3), "/dev/sda", "has no event", True),
    "implied directory removed": ("DELETE FROM event WHERE {ev}", ("usr/bin", "implied", 3), "/usr/bin",
                                  "no implied event", False),
}
# Events the tar does not hold, inserted: (path, kind, layer position, seq or None for after the last).
ADDED = {
    "whiteout added": ("opt/lower.dat", "whiteout", 3, None, "/opt/lower.dat"),
    "whiteout added at a put's seq": ("cfg/b", "whiteout", 1, 2, "/cfg/b"),
    "opaque added": ("opt", "opaque", 1, None, "/opt"),
    "opaque added at a whiteout's seq": ("opt", "opaque", 3, "cfg/new", "/opt"),
    "put added": ("opt/lower.dat", "put", 3, None, "/opt/lower.dat"),
    "implied directory added": ("cfg/sub", "implied", 1, None, "/cfg/sub"),
    "implied directory added where nothing lies below": ("opt/lower.dat", "implied", 3, None, "/opt/lower.dat"),
}


def _diff_rowid(conn, fx: Fixture, pos: int) -> int:
    return conn.execute("SELECT id FROM diff WHERE diff_id = ?", (fx.diff_ids[pos - 1],)).fetchone()[0]


def _key(conn, fx: Fixture, path: str, kind: str, pos: int, nth: int = 0) -> tuple[int, int, int]:
    """(diff rowid, kind, seq) of the nth event of that kind on path in the diff at pos."""
    d = _diff_rowid(conn, fx, pos)
    seqs = [s for (s,) in conn.execute(
        "SELECT e.seq FROM event e JOIN path p ON p.id = e.path_id WHERE e.diff_id = ? AND e.kind = ? AND p.path = ?"
        " ORDER BY e.seq", (d, KIND[kind], path.encode()))]
    assert len(seqs) > nth, (path, kind, pos, seqs)
    return d, KIND[kind], seqs[nth]


def _check_named(findings: list[dict], fx: Fixture, pos: int, path: str, words: str) -> dict:
    hits = [f for f in findings if f["path"] == path and f["diff_id"] == fx.diff_ids[pos - 1]]
    assert hits, f"no finding names {path}: {findings}"
    said = [f for f in hits if words in f["problem"]]
    assert said, f"no finding on {path} says {words!r}: {hits}"
    f = said[0]
    assert f["layers"] == fx.layer(pos) and f["images"] == [fx.image]
    return f


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_field_is_named(rich, tmp_path, case):
    sql, (path, kind, pos, *nth), shown, words, plain_sees = CASES[case]
    p = _copy(rich, tmp_path)
    conn = apsw.Connection(str(p))
    key = _key(conn, rich, path, kind, pos, *nth)
    conn.execute(sql.format(ev=EV), key)
    assert conn.changes() == 1
    conn.close()

    r, findings = _fsck(p, "--deep")
    assert r.exit_code == 6, r.output
    f = _check_named(findings, rich, pos, shown, words)
    assert f["check"] == "event" and f"{key[2]} of {rich.diff_ids[pos - 1]}" in f["object"]
    # Only the damaged entry is named (the headers after it still line up).  The layer
    # tar still rebuilds from the framing, unless a content or a whole entry's event is gone.
    assert {g["path"] for g in findings if g["check"] == "event"} <= {shown, None}, findings
    tars = [g for g in findings if g["check"] == "layer-tar"]
    if case == "content of another size" or (case.endswith(" removed") and kind != "implied"):
        (t,) = tars
        assert "cannot be rebuilt" in t["problem"] and t["layers"] == rich.layer(pos), t
    else:
        assert not tars, findings
    r_plain, plain = _fsck(p)
    assert (r_plain.exit_code == 6) == plain_sees, plain


@pytest.mark.parametrize("case", list(ADDED))
def test_an_event_the_tar_does_not_hold_is_named(rich, tmp_path, case):
    path, kind, pos, seq, shown = ADDED[case]
    p = _copy(rich, tmp_path)
    conn = apsw.Connection(str(p))
    d = _diff_rowid(conn, rich, pos)
    if seq is None:  # after every event of the diff
        seq = conn.execute("SELECT max(seq) + 1 FROM event WHERE diff_id = ?", (d,)).fetchone()[0]
    elif isinstance(seq, str):  # the seq of that path's whiteout
        seq = _key(conn, rich, seq, "whiteout", pos)[2]
    pid = conn.execute("SELECT id FROM path WHERE path = ?", (path.encode(),)).fetchone()[0]
    row = ("d", 0o755, 0, 0, None) if kind in ("implied", "opaque") else ("f", 0o644, 0, 0, T)
    conn.execute("INSERT INTO event(diff_id, kind, seq, path_id, type, mode, uid, gid, mtime) VALUES (?, ?, ?, ?, ?, ?,"
                 " ?, ?, ?)", (d, KIND[kind], seq, pid, *row))
    conn.close()

    r, findings = _fsck(p, "--deep")
    assert r.exit_code == 6, r.output
    words = "which the tar does not imply" if kind == "implied" else "which the tar does not hold"
    f = _check_named(findings, rich, pos, shown, words)
    assert f"event {seq} of {rich.diff_ids[pos - 1]}" == f["object"]


def _swap_content(fx: Fixture, tmp_path: Path, path: str = "cfg/a") -> tuple[Path, str]:
    """Point a file's event at another stored content of its size: every header
    still agrees and the plain checks see intact contents.  Returns the store
    and the sha256 of the content the tar held."""
    p = _copy(fx, tmp_path)
    conn = apsw.Connection(str(p))
    key = _key(conn, fx, path, "put", 1)
    size, sha = conn.execute("SELECT b.size, b.sha256 FROM event e JOIN blob b ON b.id = e.blob_id WHERE "
                             + EV.replace("diff_id", "e.diff_id").replace("kind", "e.kind").replace("seq", "e.seq"),
                             key).fetchone()
    other = conn.execute("SELECT b.id FROM blob b WHERE b.size = ? AND b.id != (SELECT blob_id FROM event WHERE "
                         + EV + ")", (size, *key)).fetchone()
    assert other is not None, "the fixture holds two contents of the same size"
    conn.execute("UPDATE event SET blob_id = ? WHERE " + EV, (other[0], *key))
    conn.close()
    return p, sha.hex()


def test_a_content_swapped_for_one_of_the_same_size_is_named(rich, tmp_path):
    p, sha = _swap_content(rich, tmp_path)
    assert _fsck(p)[0].exit_code == 0
    r, findings = _fsck(p, "--deep")
    assert r.exit_code == 6
    f = _check_named(findings, rich, 1, "/cfg/a", f"its tar entry held a content whose sha256 starts {sha[:16]}")
    assert f["check"] == "event"
    # The layer's own sha256 no longer matches either: that finding names the layer.
    (t,) = [f for f in findings if f["check"] == "layer-tar"]
    assert t["diff_id"] == rich.diff_ids[0] and "hashing to the diff_id" in t["problem"]
    assert t["layers"] == rich.layer(1) and t["images"] == [rich.image]
    assert len(findings) == 2, findings


def test_a_store_from_before_content_tags_names_the_layer(rich, tmp_path):
    """A diff imported before schema version 4 has no tags (digests NULL): the
    swap is still caught, by the diff_id, which names the layer only."""
    p, _ = _swap_content(rich, tmp_path)
    conn = apsw.Connection(str(p))
    conn.execute("UPDATE diff SET digests = NULL")
    conn.close()
    assert _fsck(p)[0].exit_code == 0
    r, findings = _fsck(p, "--deep")
    assert r.exit_code == 6
    (f,) = findings
    assert f["check"] == "layer-tar" and f["diff_id"] == rich.diff_ids[0]
    assert "every entry agrees with its event" in f["problem"]
    assert f["layers"] == rich.layer(1) and f["images"] == [rich.image]


def test_the_content_tags_are_the_tar_entries_sha256(rich, tmp_path):
    """Checked against tarfile and hashlib reading each layer tar (picked out of
    `save`'s archive by its sha256, so these are the imported bytes): the tags
    blob is sha256(payload)[:8] of each regular file, in tar order."""
    import hashlib

    from layerdb.engine.chunks import SqliteChunkStore
    from layerdb.engine.content import ContentStore

    r = run_cli("save", "-o", str(tmp_path / "s.tar"), "localhost/opaque:1.0", db_path=rich.store)
    assert r.exit_code == 0, r.output
    want = {}
    with tarfile.open(tmp_path / "s.tar") as outer:
        for m in outer.getmembers():
            if not m.isfile():
                continue
            data = outer.extractfile(m).read()
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            if digest in rich.diff_ids:
                with tarfile.open(fileobj=io.BytesIO(data)) as t:
                    want[digest] = b"".join(hashlib.sha256(t.extractfile(e).read()).digest()[:8]
                                            for e in t.getmembers() if e.isreg())
    assert sorted(want) == sorted(rich.diff_ids)
    conn = apsw.Connection(str(_copy(rich, tmp_path)))
    content = ContentStore(conn, SqliteChunkStore(conn))
    for pos, diff_id in enumerate(rich.diff_ids, 1):
        (bid,) = conn.execute("SELECT digests FROM diff WHERE id = ?", (_diff_rowid(conn, rich, pos),)).fetchone()
        assert bid is not None
        assert b"".join(content.iter_blob(bid)) == want[diff_id], pos
    conn.close()


def test_damaged_content_tags_are_found(rich, tmp_path):
    p = _copy(rich, tmp_path)
    conn = apsw.Connection(str(p))
    d = _diff_rowid(conn, rich, 1)
    (bid,) = conn.execute("SELECT digests FROM diff WHERE id = ?", (d,)).fetchone()
    conn.execute("DELETE FROM blob WHERE id = ?", (bid,))
    conn.close()
    r, findings = _fsck(p)
    assert r.exit_code == 6
    (f,) = findings
    assert f["diff_id"] == rich.diff_ids[0] and f"its content tags (blob row {bid}) are missing" in f["problem"]


def test_a_missing_content_leaves_the_headers_checked(rich, tmp_path):
    """A file whose content row is gone: the layer cannot be rebuilt, and the entries
    after it are still compared (the reader is given zeros of the header's size)."""
    p = _copy(rich, tmp_path)
    conn = apsw.Connection(str(p))
    notes = _key(conn, rich, "home/u/notes", "put", 3)
    conn.execute("UPDATE event SET blob_id = 999999 WHERE " + EV, notes)
    later = _key(conn, rich, "opt/link", "put", 3)
    conn.execute("UPDATE event SET uid = 5 WHERE " + EV, later)
    conn.close()
    r, findings = _fsck(p, "--deep")
    assert r.exit_code == 6
    assert {(f["check"], f["path"]) for f in findings} == {
        ("event", "/home/u/notes"), ("layer-tar", None), ("event", "/opt/link")}, findings
    (t,) = [f for f in findings if f["check"] == "layer-tar"]
    assert "cannot be rebuilt" in t["problem"] and "/home/u/notes" in t["problem"]


def test_the_human_form_names_path_layer_and_image(rich, tmp_path):
    p = _copy(rich, tmp_path)
    conn = apsw.Connection(str(p))
    conn.execute("UPDATE event SET mode = mode | 2048 WHERE " + EV, _key(conn, rich, "cfg/a", "put", 1))
    conn.close()
    r = run_cli("fsck", "--deep", db_path=p)
    assert r.exit_code == 6
    assert "/cfg/a" in r.stdout and "mode 4644 where the tar has 0644" in r.stdout
    assert rich.chain_ids[0][7:19] in r.stdout and "localhost/opaque:1.0" in r.stdout
    assert r.stderr.startswith("layerdb: error: fsck: 1 problem breaking 1 layer(s) of 1 image(s)")


# Containers -------------------------------------------------------------------------------------


@pytest.fixture
def with_container(rich, tmp_path):
    """A copy of the store with a container that did a bit of everything."""
    from layerdb.engine.api import LayerDB

    p = _copy(rich, tmp_path)
    host = tmp_path / "host"
    (host / "sub" / "deeper").mkdir(parents=True)
    (host / "sub" / "one.txt").write_bytes(b"one\n")
    os.link(host / "sub" / "one.txt", host / "sub" / "deeper" / "same.txt")
    os.symlink("../one.txt", host / "sub" / "deeper" / "up")
    db = LayerDB(p)
    try:
        db.container_create("localhost/opaque:1.0", "c1")
        c = db.container("c1")
        c.mkdir("/work", mtime=T)
        c.write_file("/work/data.txt", b"container data\n", mtime=T)
        c.write_file("/work/big.bin", bytes(range(256)) * 1500, mtime=T)  # chunked, not packed
        c.symlink("/work/link", "data.txt", mtime=T)
        c.link("/work/hard", "/work/data.txt", mtime=T)
        c.link("/work/lower-hard", "/opt/lower.dat", mtime=T)  # a target from the image
        c.mknod("/work/fifo", "p", mtime=T)
        c.mknod("/dev/zero", "c", 0o666, (1, 5), mtime=T)
        c.setattr("/work/data.txt", mode=0o4750, xattrs={"user.x": b"1"})
        c.write_file("/work/tmp.txt", b"tmp\n", mtime=T)
        c.rename("/work/tmp.txt", "/work/moved.txt", mtime=T)
        c.rename("/opt", "/opt2", mtime=T)  # a directory of the image, with hard links in it
        c.remove("/opt2/twice", mtime=T)
        c.remove("/x", mtime=T)
        c.copy_in(str(host), "/srv/drop")  # a host tree: directories, a hard-linked pair, a symlink
    finally:
        db.close()
    return p


def _container_event(conn, path: str) -> tuple[int, int, int]:
    return conn.execute(
        "SELECT e.diff_id, e.kind, e.seq FROM event e JOIN diff d ON d.id = e.diff_id JOIN path p ON p.id = e.path_id"
        " WHERE d.container = 1 AND p.path = ? ORDER BY e.seq DESC LIMIT 1", (path.encode(),)).fetchone()


def test_a_container_log_passes(with_container):
    r = run_cli("fsck", "--deep", db_path=with_container)
    assert r.exit_code == 0, r.output
    assert "1 container log" in r.stderr


CONTAINER_CASES = {
    "hard link to a directory": ("UPDATE event SET target_id = (SELECT id FROM path WHERE path = CAST('cfg' AS BLOB))"
                                 " WHERE {ev}", "work/hard", "/work/hard", "its target /cfg is a directory"),
    "hard link to a path gone by then": (
        "UPDATE event SET target_id = (SELECT id FROM path WHERE path = CAST('x/inner' AS BLOB)) WHERE {ev}",
        "work/lower-hard", "/work/lower-hard", "its target /x/inner does not exist"),
    "a put below a file": ("UPDATE event SET path_id = (SELECT id FROM path WHERE path = CAST('x/in' AS BLOB))"
                           " WHERE {ev}", "work/fifo", "/x/in", "its parent /x is no directory"),
    "mode out of range": ("UPDATE event SET mode = 65535 WHERE {ev}", "work/data.txt", "/work/data.txt",
                          "has mode 65535"),
    "symlink without a target": ("UPDATE event SET link = CAST('' AS BLOB) WHERE {ev}", "work/link", "/work/link",
                                 "symlink without a target"),
    "device numbers lost": ("UPDATE event SET devminor = NULL WHERE {ev}", "dev/zero", "/dev/zero",
                            "device numbers 1,None"),
    "missing content": ("UPDATE event SET blob_id = 999999 WHERE {ev}", "work/data.txt", "/work/data.txt",
                        "names a missing content blob"),
    "a path that is not canonical": (
        "UPDATE event SET path_id = (SELECT id FROM path WHERE path = CAST('work/../etc' AS BLOB)) WHERE {ev}",
        "work/fifo", "/work/../etc", "not canonical"),
}


@pytest.mark.parametrize("case", list(CONTAINER_CASES))
def test_a_damaged_container_event_is_named(rich, with_container, case):
    sql, path, shown, words = CONTAINER_CASES[case]
    conn = apsw.Connection(str(with_container))
    for q in ("x/in", "work/../etc"):
        conn.execute("INSERT OR IGNORE INTO path(path, name) VALUES (?, ?)", (q.encode(), q.rsplit("/")[-1].encode()))
    key = _container_event(conn, path)
    conn.execute(sql.format(ev=EV), key)
    assert conn.changes() == 1
    conn.close()
    r, findings = _fsck(with_container, "--deep")
    assert r.exit_code == 6, r.output
    hits = [f for f in findings if f["path"] == shown and words in f["problem"]]
    assert hits, findings
    assert hits[0]["check"] == "event" and hits[0]["object"].startswith("event ")
    # A container's diff is in no layer: its container's image is what it breaks.
    assert hits[0]["images"] == [rich.image] and hits[0]["layers"] == []


def test_a_container_log_without_its_container(with_container):
    conn = apsw.Connection(str(with_container))
    (diff_id,) = conn.execute("SELECT d.diff_id FROM diff d JOIN container c ON c.diff_id = d.id").fetchone()
    conn.execute("DELETE FROM container")
    conn.close()
    r, findings = _fsck(with_container, "--deep")
    assert r.exit_code == 6
    (f,) = findings
    assert f["check"] == "diff" and f["object"] == diff_id and "no container holds it" in f["problem"]


def test_a_damaged_container_content_is_named(with_container):
    """Blobs a container wrote are hashed as every other content: a flipped byte names the file."""
    conn = apsw.Connection(str(with_container))
    (chunk,) = conn.execute(
        "SELECT b.chunk FROM event e JOIN blob b ON b.id = e.blob_id JOIN path p ON p.id = e.path_id"
        " WHERE p.path = CAST('work/data.txt' AS BLOB) AND b.chunk IS NOT NULL").fetchone()
    conn.execute("UPDATE chunk SET data = CAST(? AS BLOB) WHERE sha256 = ?", (b"\x00" * 16, chunk))
    conn.close()
    r, findings = _fsck(with_container)
    assert r.exit_code == 6
    hits = [f for f in findings if f["path"] == "/work/data.txt" and f["diff_id"].startswith("container:")]
    assert hits and hits[0]["check"] == "chunk" and hits[0]["images"][0]["repo_tags"] == ["localhost/opaque:1.0"]


# Every undamaged fixture store passes ----------------------------------------------------------------


def test_hostile_archives_that_import_pass(tmp_path):
    """Odd but accepted tars (no end-of-archive blocks, absolute names, 4096 components,
    uids beyond 32 bits, devices, dangling hard links) read back as they imported."""
    p = tmp_path / "store.sqlite"
    imported = 0
    for a in sorted((REPO_FIXTURES.parent / "hostile").glob("*.tar")):
        if a.name.startswith(("bomb-", "truncated-", "path-10000")):
            continue  # refused by design, and slow to refuse
        imported += run_cli("import", str(a), db_path=p).exit_code == 0
    assert imported >= 8
    r, findings = _fsck(p, "--deep")
    assert r.exit_code == 0 and findings == [], findings



def _archives() -> list:
    out = [pytest.param(a, id=a.name) for a in sorted((REPO_FIXTURES / "images").glob("*.tar"))]
    shared = SHARED_FIXTURES / "images"
    if shared.is_dir():
        out += [pytest.param(a, id="shared/" + a.name) for a in sorted(shared.glob("*.tar"))]
    else:
        out.append(pytest.param(None, id="shared", marks=pytest.mark.skip(reason="../shared is absent")))
    return out


@pytest.mark.parametrize("archive", _archives())
def test_every_fixture_store_passes(tmp_path, archive):
    p = tmp_path / "store.sqlite"
    r = run_cli("import", str(archive), db_path=p)
    assert r.exit_code == 0, r.output
    r, findings = _fsck(p, "--deep")
    assert r.exit_code == 0 and findings == [], findings
    conn = apsw.Connection(str(p))
    n = conn.execute("SELECT count(*) FROM diff").fetchone()[0]
    entries = conn.execute("SELECT sum(entries) FROM diff").fetchone()[0] or 0
    conn.close()
    assert f"{n} layer tars rebuilt" in r.stderr and f"{entries} tar entries" in r.stderr, r.stderr
