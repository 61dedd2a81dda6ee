"""The parts of tar export that make it fast: headers with a C checksum, chunks
decoded and verified ahead on helper threads (whole or cut into a pack's files),
a widened output pipe, the collector paused.  Each is checked against an
independent oracle (tarfile, Python slicing of the stored bytes, the fixture
oracle's manifests) on a real store file."""

from __future__ import annotations

import fcntl
import gc
import hashlib
import io
import os
import random
import subprocess
import sys
import tarfile
import threading
import zlib

import pytest

from conftest import REPO_FIXTURES, manifest_of_tar_bytes, oracle_lines, oracle_positions

# Tar headers ------------------------------------------------------------------


def _checksum_ok(block: bytes) -> bool:
    """POSIX: the sum of the block's bytes, the chksum field counted as spaces."""
    return int(block[148:154], 8) == sum(block[:148]) + 8 * 32 + sum(block[156:])


def test_headers_agree_with_tarfile():
    """Random entries, names and link names of every length up to and past 100
    bytes (bytes of 0x01..0xff: not all UTF-8), numbers at and past their
    fields' limits, xattrs: tarfile reads every field back, and every block's
    checksum is the plain byte sum."""
    from layerdb.engine.output import tarwriter as tw

    rng = random.Random(16)
    stream = bytearray()
    want = []
    for i in range(3000):
        name = bytes(rng.choice([rng.randrange(1, 256), 0xFF, 0x61]) for _ in range(rng.choice([1, 99, 100, 101, 250])))
        name = b"%d/" % i + name  # unique
        typeflag = rng.choice([tw.REGTYPE, tw.SYMTYPE, tw.DIRTYPE, tw.CHRTYPE, tw.LNKTYPE])
        link = bytes(rng.randrange(1, 256) for _ in range(rng.choice([0, 7, 100, 101]))) if typeflag in (
            tw.SYMTYPE, tw.LNKTYPE) else b""
        mode = rng.choice([0o644, 0o7777, 0o4755])
        uid, gid = rng.choice([0, 1000, tw.MAX7, tw.MAX7 + 1, 2 ** 40]), rng.choice([0, tw.MAX7, -5])
        mtime = rng.choice([0, 1700000000, tw.MAX11, tw.MAX11 + 1, -1])
        size = rng.choice([0, 1, 513]) if typeflag == tw.REGTYPE else 0
        dev = (rng.choice([0, 8, tw.MAX7]), rng.choice([0, 1])) if typeflag == tw.CHRTYPE else (0, 0)
        xattrs = {"user.k": bytes(rng.randrange(256) for _ in range(rng.randrange(4)))} if rng.random() < 0.1 else None
        hdr = tw.header(name, typeflag, mode, uid, gid, size, mtime, link, *dev, xattrs=xattrs)
        assert len(hdr) % 512 == 0
        # The entry's block, and the PAX header's before its records when there is one.
        assert _checksum_ok(hdr[:512]) and _checksum_ok(hdr[-512:]), i
        stream += hdr + bytes(size) + tw.padding(size)
        want.append((name, typeflag, mode, uid, gid, size, mtime, link, dev, xattrs))
    stream += tw.END
    got = tarfile.open(fileobj=io.BytesIO(bytes(stream)), mode="r:", encoding="utf-8",
                       errors="surrogateescape").getmembers()
    assert len(got) == len(want)
    for m, (name, typeflag, mode, uid, gid, size, mtime, link, dev, xattrs) in zip(got, want):
        shown = name + b"/" if typeflag == tw.DIRTYPE else name
        assert m.name.encode("utf-8", "surrogateescape") == shown.rstrip(b"/")
        assert (m.type, m.mode, m.uid, m.gid, m.size, m.mtime) == (typeflag, mode & 0o7777, uid, gid, size, mtime)
        assert m.linkname.encode("utf-8", "surrogateescape") == link
        if typeflag == tw.CHRTYPE:
            assert (m.devmajor, m.devminor) == dev
        for k, v in (xattrs or {}).items():
            assert m.pax_headers["SCHILY.xattr." + k].encode("utf-8", "surrogateescape") == v


def test_header_parts_give_the_whole_block():
    """header() builds most blocks from parts kept per owner and per type: the
    very block _ustar formats whole, for any name, owner, size, time and type,
    and after its part caches have been cleared."""
    from layerdb.engine.output import tarwriter as tw

    rng = random.Random(17)
    for i in range(20000):
        name = bytes(rng.randrange(1, 256) for _ in range(rng.choice([1, 40, 100])))
        typeflag = rng.choice([tw.REGTYPE, tw.DIRTYPE, tw.FIFOTYPE, tw.SYMTYPE])
        mode = rng.choice([0o644, 0o7777, 0o100755, rng.randrange(1 << 16)])
        uid, gid = rng.randrange(tw.MAX7 + 1), rng.choice([0, rng.randrange(tw.MAX7 + 1)])
        size, mtime = rng.choice([0, rng.randrange(tw.MAX11 + 1)]), rng.randrange(tw.MAX11 + 1)
        assert tw.header(name, typeflag, mode, uid, gid, size, mtime) == tw._ustar(
            name, mode & 0o7777, uid, gid, size, mtime, typeflag, b"", 0, 0), i
    assert 0 < len(tw._IDS) <= 4096


def test_checksum_bound_holds_for_the_largest_block():
    """adler32's low half is the byte sum only below 65521: the block with every
    field at its largest still is."""
    from layerdb.engine.output import tarwriter as tw

    block = tw.header(b"\xff" * 100, b"\xff", 0o7777, tw.MAX7, tw.MAX7, tw.MAX11, tw.MAX11, b"\xff" * 100,
                      tw.MAX7, tw.MAX7)
    assert len(block) == 512 and _checksum_ok(block)
    assert sum(block[:148]) + 256 + sum(block[156:]) < 65521
    assert (zlib.adler32(block[:148] + b" " * 8 + block[156:]) & 0xFFFF) - 1 == int(block[148:154], 8)


# Prefetch -----------------------------------------------------------------------


@pytest.fixture
def chunk_store(tmp_path):
    from layerdb.engine.chunks import SqliteChunkStore
    from layerdb.engine.store import Store

    store = Store(tmp_path / "chunks.sqlite")
    rng = random.Random(7)
    raws = []
    with store.write():
        cs = SqliteChunkStore(store.conn)
        for i in range(40):
            n = rng.choice([1, 1000, 300_000, 1 << 20])
            # Half compressible text, half random bytes (stored raw: zstd cannot shrink them).
            raw = (b"chunk %d " % i * (n // 8 + 1))[:n] if i % 2 else rng.randbytes(n)
            cs.put(hashlib.sha256(raw).digest(), raw)
            raws.append(raw)
    yield store, cs, raws
    store.close()


def _sha(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def test_prefetch_gives_chunks_and_cuts_in_order(chunk_store):
    """Chunks whole and cut into spans come out in the order asked for, repeats
    included, each exactly the stored bytes (or Python's slices of them)."""
    from layerdb.engine.chunks import Prefetch

    store, cs, raws = chunk_store
    rng = random.Random(3)
    items, want = [], []
    for _ in range(120):
        raw = raws[rng.randrange(len(raws))]
        if rng.random() < 0.5:
            items.append(_sha(raw))
            want.append(raw)
        else:
            spans = sorted((o, rng.randrange(len(raw) - o + 1)) for o in (rng.randrange(len(raw)) for _ in range(5)))
            items.append((_sha(raw), spans))
            want.append([raw[o:o + n] for o, n in spans])
    with store.read(), Prefetch(cs, items) as p:
        got = list(p)
    assert got == want


def test_prefetch_reads_a_bounded_way_ahead(chunk_store, monkeypatch):
    """The helpers never hold more than AHEAD_BYTES of chunks the reader has not
    taken, plus the one that crossed it."""
    from layerdb.engine.chunks import Prefetch

    store, cs, raws = chunk_store
    big = [r for r in raws if len(r) == 1 << 20]
    monkeypatch.setattr(Prefetch, "AHEAD_BYTES", 3 << 20)
    fetched = []
    real = cs.get_encoded
    monkeypatch.setattr(cs, "get_encoded", lambda sha: fetched.append(sha) or real(sha))
    items = [_sha(r) for r in big * 4]
    with store.read(), Prefetch(cs, items) as p:
        for k in range(len(items)):
            assert p.next() == big[k % len(big)]
            assert len(fetched) - (k + 1) <= 3 + 1
        with pytest.raises(StopIteration):
            p.next()


def test_prefetch_damage_surfaces_at_its_chunk(chunk_store):
    """A damaged chunk and a missing one raise CorruptStore where the reader
    reaches them, not before: every chunk ahead of them comes out intact."""
    from layerdb.engine.chunks import Prefetch
    from layerdb.engine.errors import CorruptStore

    store, cs, raws = chunk_store
    damaged, ok = raws[3], [r for i, r in enumerate(raws) if i != 3]
    with store.write():
        (data,) = store.execute("SELECT data FROM chunk WHERE sha256 = ?", (_sha(damaged),)).fetchone()
        flipped = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
        store.execute("UPDATE chunk SET data = ? WHERE sha256 = ?", (flipped, _sha(damaged)))
    for bad, why in ((_sha(damaged), "sha256 mismatch|decompress"), (b"\1" * 32, "missing")):
        items = [_sha(r) for r in ok[:10]] + [(bad, [(0, 1)])] + [_sha(r) for r in ok[10:]]
        with store.read(), Prefetch(cs, items) as p:
            for r in ok[:10]:
                assert p.next() == r
            with pytest.raises(CorruptStore, match=why):
                p.next()


def test_prefetch_left_early_stops_its_helpers(chunk_store):
    from layerdb.engine.chunks import Prefetch

    store, cs, raws = chunk_store
    before = threading.active_count()
    with store.read(), Prefetch(cs, [_sha(r) for r in raws * 3]) as p:
        assert p.next() == raws[0]
        assert threading.active_count() > before
    assert threading.active_count() == before


# The whole export -----------------------------------------------------------------


def _sample_db(tmp_path):
    from layerdb.engine.api import LayerDB

    db = LayerDB(tmp_path / "store.sqlite")
    db.import_archive(str(REPO_FIXTURES / "images" / "sample.oci.tar"), tag="s:1")
    return db


def test_export_widens_its_pipe_and_writes_the_oracle_view(tmp_path):
    """`export -o -` into a pipe: the pipe now holds 1 MiB, and what came through
    is the oracle's view."""
    db = _sample_db(tmp_path)
    db.close()
    r, w = os.pipe()
    assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) < 1 << 20
    cmd = [sys.executable, "-c", "from layerdb.cli.main import main; main()", "--db", str(tmp_path / "store.sqlite"),
           "export", "--at", "s:1", "-o", "-"]
    p = subprocess.Popen(cmd, stdout=w)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
        widened = fcntl.fcntl(f.fileno(), fcntl.F_GETPIPE_SZ)
    assert p.wait() == 0
    assert widened == 1 << 20
    oracle = REPO_FIXTURES / "oracle" / "sample"
    assert manifest_of_tar_bytes(data, tmp_path) == oracle_lines(oracle, max(oracle_positions(oracle)))


def test_export_pauses_the_collector_and_restores_it(tmp_path):
    db = _sample_db(tmp_path)
    seen = []

    class Out(io.BytesIO):
        def write(self, b):
            seen.append(gc.isenabled())
            return super().write(b)

    try:
        assert gc.isenabled()
        db.export_tar("s:1", Out())
        assert seen and not any(seen) and gc.isenabled()
        gc.disable()
        db.export_tar("s:1", Out())
        assert not gc.isenabled()  # the caller's setting, kept
    finally:
        gc.enable()
        db.close()


def test_export_of_a_damaged_pack_into_a_pipe_stops_with_one_line(tmp_path, monkeypatch):
    """Packs are decoded and verified ahead on helper threads while the tar goes
    out: a damaged pack met halfway stops `export -o -` with one error line and
    a non-zero exit, and everything written before it is the undamaged export's
    beginning (nothing wrong went out)."""
    import apsw
    import zstandard

    from layerdb.engine import content

    monkeypatch.setattr(content, "PACK_TARGET", 4096)  # many packs, so one can fail halfway
    db = _sample_db(tmp_path)
    good = io.BytesIO()
    db.export_tar("s:1", good)
    db.close()
    conn = apsw.Connection(str(tmp_path / "store.sqlite"))
    packs = [r[0] for r in conn.execute("SELECT DISTINCT b.chunk FROM event e JOIN blob b ON b.id = e.blob_id"
                                        " WHERE b.chunk IS NOT NULL ORDER BY b.id")]  # files' packs, not framing
    assert len(packs) > 4
    sha = packs[len(packs) // 2]
    size, codec, data = conn.execute("SELECT size, codec, data FROM chunk WHERE sha256 = ?", (sha,)).fetchone()
    raw = bytearray(data if codec == 0 else zstandard.ZstdDecompressor().decompress(data, max_output_size=size))
    raw[len(raw) // 2] ^= 0xFF
    conn.execute("UPDATE chunk SET codec = 0, data = ? WHERE sha256 = ?", (bytes(raw), sha))
    conn.close()
    cmd = [sys.executable, "-c", "from layerdb.cli.main import main; main()", "--db", str(tmp_path / "store.sqlite"),
           "export", "--at", "s:1", "-o", "-"]
    p = subprocess.run(cmd, capture_output=True)
    assert p.returncode == 6
    err = p.stderr.decode()
    assert err.count("\n") == 1 and "sha256 mismatch" in err and "Traceback" not in err
    assert len(p.stdout) < len(good.getvalue()) and good.getvalue().startswith(p.stdout)


def test_export_into_a_pipe_closed_early_exits_quietly(tmp_path):
    """`export -o - | head -c 100`: the reader leaves, the helper threads stop,
    and export exits 0 with nothing on stderr."""
    db = _sample_db(tmp_path)
    db.close()
    cmd = [sys.executable, "-c", "from layerdb.cli.main import main; main()", "--db", str(tmp_path / "store.sqlite"),
           "export", "--at", "s:1", "-o", "-"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(p.stdout.read(100)) == 100
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=60) == 0
    assert err == b""
