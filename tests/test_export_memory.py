"""Tar export of a large image replays it partition by partition (engine/export.py).

The partitioned replay must give the very tar the whole-view replay gives: the
same entries, in the same (tree) order, with the same headers, data and hard
links.  These tests force tiny partitions (one or two paths each, so every
cross-partition relation is exercised) and compare byte for byte, on every
fixture image at every layer, on the hostile archives that import, on a store
holding many images that share paths, and on chains built to break a replay
that misses an event.
"""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from conftest import REPO_FIXTURES, SHARED_FIXTURES, count_replays, fixture_archives, replaying
from layerdb.engine import tree as export
from layerdb.engine.errors import LayerdbError

D, H, L = tarfile.DIRTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE


def _tar(db, ref: str, monkeypatch, partition: int | None) -> bytes:
    with monkeypatch.context() as m:
        replaying(m, partition)
        buf = io.BytesIO()
        db.export_tar(ref, buf)
        return buf.getvalue()


def _entries(data: bytes) -> list[tuple]:
    """What a reader sees of each entry, to show a difference readably."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t:
            body = t.extractfile(m).read() if m.isreg() else b""
            out.append((m.name, m.type, oct(m.mode), m.uid, m.gid, m.mtime, m.size, m.linkname,
                        hashlib.sha256(body).hexdigest()[:12], m.pax_headers))
    return out


def _same_all_ways(db, ref: str, monkeypatch, sizes=(1, 2, 3)) -> bytes:
    whole = _tar(db, ref, monkeypatch, None)
    for n in sizes:
        part = _tar(db, ref, monkeypatch, n)
        if part != whole:
            assert _entries(part) == _entries(whole), f"{ref}: partitions of {n} paths"
            assert part == whole, f"{ref}: partitions of {n} paths: same entries, different bytes"
    return whole


def _refs(db) -> list[str]:
    """Every image at every layer position."""
    out = []
    for img in db.images():
        out.extend(f"{img['id']}~{k}" for k in range(img["layers"]))
    return out




def _tree_sorted(names: list[str]) -> bool:
    keys = [n.encode("utf-8", "surrogateescape").rstrip(b"/").split(b"/") for n in names]
    return keys == sorted(keys)


# Differential: partitioned == whole -------------------------------------------------


@pytest.mark.parametrize("archive", fixture_archives(REPO_FIXTURES) + [REPO_FIXTURES / "multiplatform" / "multi.oci.tar"],
                         ids=lambda p: p.name)
def test_repo_fixtures_partitioned_equals_whole(db, archive, monkeypatch):
    db.import_archive(str(archive))
    refs = _refs(db)
    assert refs
    for ref in refs:
        data = _same_all_ways(db, ref, monkeypatch)
        assert _tree_sorted([m[0] for m in _entries(data)])


@pytest.mark.skipif(not SHARED_FIXTURES.is_dir(), reason="../shared/fixtures is not beside the checkout (CI has it)")
@pytest.mark.parametrize("archive", fixture_archives(SHARED_FIXTURES), ids=lambda p: p.name)
def test_shared_fixtures_partitioned_equals_whole(db, archive, monkeypatch):
    db.import_archive(str(archive))
    refs = _refs(db)
    assert refs
    for ref in refs:
        _same_all_ways(db, ref, monkeypatch)


def test_hostile_archives_partitioned_equal_whole(db, monkeypatch):
    imported = 0
    for archive in sorted((REPO_FIXTURES.parent / "hostile").glob("*.tar")):
        if archive.name == "path-4096-components.tar":
            continue  # partitions of 1 and 2 paths each replay 4,096 ancestors: test_deep_paths.py partitions it
        try:
            db.import_archive(str(archive))
        except LayerdbError:
            continue  # refused: nothing to export
        imported += 1
    assert imported >= 5
    for ref in _refs(db):
        _same_all_ways(db, ref, monkeypatch, sizes=(1, 2))


def test_many_images_sharing_paths(db, monkeypatch):
    """Every fixture in one store: the lookups by path meet other images' events
    on the same paths, which must not leak into this chain's replay."""
    for archive in fixture_archives(REPO_FIXTURES) + fixture_archives(SHARED_FIXTURES):
        db.import_archive(str(archive))
    refs = _refs(db)
    assert len(refs) > (20 if SHARED_FIXTURES.is_dir() else 10)  # 12 positions in the repo's own fixtures
    for ref in refs:
        _same_all_ways(db, ref, monkeypatch, sizes=(2,))


def _dir_manifest(db, ref: str, target, monkeypatch, partition: int | None) -> list[str]:
    """`export --dir` of the whole view or in partitions, as tree_manifest lines."""
    from tree_manifest import manifest_lines

    with monkeypatch.context() as m:
        replaying(m, partition)
        db.export_dir(ref, str(target))
    return list(manifest_lines(str(target)))


@pytest.mark.parametrize("archive", fixture_archives(REPO_FIXTURES), ids=lambda p: p.name)
def test_export_dir_partitioned_equals_whole(db, archive, tmp_path, monkeypatch):
    """`export --dir` replays in partitions too: the same tree (the manifest of
    tests/tree_manifest.py: every entry's type, mode, owner, size, content hash,
    link target and hard links) as the whole view gives, and as the tar export."""
    db.import_archive(str(archive))
    for i, ref in enumerate(_refs(db)):
        whole = _dir_manifest(db, ref, tmp_path / f"w{i}", monkeypatch, None)
        assert _dir_manifest(db, ref, tmp_path / f"p{i}", monkeypatch, 2) == whole, ref
        tar = tmp_path / f"t{i}.tar"
        tar.write_bytes(_tar(db, ref, monkeypatch, 2))
        from tree_manifest import manifest_lines

        assert list(manifest_lines(str(tar))) == whole, ref


# Chains built to break a replay that lacks an event --------------------------------


def _stacked(tmp_path, *layers):
    from hostile.make_hostile import layer, on_top, tar_bytes

    return on_top([layer(tar_bytes(entries), why) for why, entries in layers]).write(tmp_path / "x.oci.tar")


def test_tree_order_and_links_across_partitions(db, tmp_path, monkeypatch):
    """Tree order puts `py/python3/` and its subtree before `py/python3.11`
    (raw byte order would not: '.' < '/'); a hard link's first name in that
    order carries the data, wherever the link was written from."""
    from hostile.make_hostile import entry

    arch = _stacked(tmp_path, ("COPY", [
        entry("py/python3.11", b"interpreter\n"),
        entry("py/python3/", type=D),
        entry("py/python3/site.py", b"site\n"),
        entry("z/orig", b"shared\n"),
        entry("a/link", type=H, linkname="z/orig"),
        entry("m/link2", type=H, linkname="a/link"),
    ]))
    db.import_archive(str(arch), tag="t:1")
    data = _same_all_ways(db, "t:1", monkeypatch)
    got = [(m[0], m[7]) for m in _entries(data)]
    names = [n for n, _ in got]
    assert names.index("py/python3") < names.index("py/python3/site.py") < names.index("py/python3.11")
    assert _tree_sorted(names)
    links = {n: target for n, target in got if target and n.split("/")[0] in ("a", "m", "z")}
    assert links == {"m/link2": "a/link", "z/orig": "a/link"}
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        assert t.extractfile("a/link").read() == b"shared\n"


def test_file_that_becomes_a_directory_below_a_partition_edge(db, tmp_path, monkeypatch):
    """A tar naming `f` (a file) then `f/g.txt` makes f a directory (as tar
    extraction does); a link to `t`, a file below, is ignored when an earlier
    entry of the same tar made t a directory.  Neither shows in the events on f
    or t themselves: the partitioned replay must pull in the events below them."""
    from hostile.make_hostile import entry

    arch = _stacked(
        tmp_path,
        ("files", [entry("t", b"was a file\n"), entry("lib", type=L, linkname="usr/lib"),
                   entry("usr/lib/x.so", b"so\n")]),
        ("turn", [entry("f", b"a file\n"), entry("f/g.txt", b"g\n"), entry("t/child", b"c\n"),
                  entry("a/link", type=H, linkname="t"), entry("t/", type=D),
                  entry("lib/", type=D), entry("lib/y.so", b"y\n")]),
    )
    db.import_archive(str(arch), tag="t:1")
    data = _same_all_ways(db, "t:1", monkeypatch)
    got = {m[0]: m[1] for m in _entries(data)}
    assert got["f"] == tarfile.DIRTYPE and got["f/g.txt"] == tarfile.REGTYPE
    assert got["t"] == tarfile.DIRTYPE and "a/link" not in got
    assert got["lib"] == tarfile.DIRTYPE and "lib/y.so" in got


def test_partitions_hold_a_bounded_view(db, tmp_path, monkeypatch):
    """Each partition's replay holds about its own paths, not the image's."""
    from hostile.make_hostile import entry

    arch = _stacked(tmp_path, ("COPY", [entry(f"d{i % 7}/s{i % 3}/f{i}", b"%d\n" % i) for i in range(1500)]))
    db.import_archive(str(arch), tag="t:1")
    whole = _tar(db, "t:1", monkeypatch, None)
    sizes = count_replays(monkeypatch, export)
    part = _tar(db, "t:1", monkeypatch, 100)
    assert part == whole
    assert len(sizes) >= 15 and max(sizes) <= 100 + 10  # its paths, their ancestors and the root


# The lookups are index-backed --------------------------------------------------------


def test_export_lookups_use_indexes(db):
    """EXPLAIN QUERY PLAN of every lookup the partitioned export runs, with
    lists as long as it binds (the planner's choice depends on their length):
    an index serves the path and the diff, nothing scans a table."""
    from layerdb.engine import replay

    db.import_archive(str(REPO_FIXTURES / "images" / "sample.oci.tar"), tag="s:1")
    ids = list(range(1, 501))
    for diffs in ([1, 2, 3], list(range(1, 100))):
        cond, dargs = replay.in_diffs(diffs)
        marks = ",".join("?" * len(ids))
        checks = [
            (replay.EVENTS_IN.format(marks, cond), ids + dargs, "event_by_path (path_id=? AND diff_id"),
            (replay.LINKS_IN.format(marks, cond), ids + dargs, "event_by_target (target_id=? AND diff_id"),
            (replay.EVENT_KEYS.format(marks, cond), ids + dargs, "event_by_path (path_id=? AND diff_id"),
        ]
        for sql, args, want in checks:
            plan = [row[3] for row in db.store.execute("EXPLAIN QUERY PLAN " + sql, args)]
            assert any(want in step for step in plan), (sql, plan)
            assert not any(step.startswith("SCAN") for step in plan), (sql, plan)
    db.store.execute(export._CREATE)
    for sql, args, want in [
        (export._FILL, (1,), "PRIMARY KEY (diff_id=?)"),
        (export.PAGE, (b"", 0, 10), "PRIMARY KEY"),
        (replay.SUBTREE, (b"etc/", b"etc0"), "(path>? AND path<?)"),
    ]:
        plan = [row[3] for row in db.store.execute("EXPLAIN QUERY PLAN " + sql, args)]
        assert any(want in step for step in plan), (sql, plan)
        assert not any(step.startswith("SCAN") for step in plan), (sql, plan)


def test_has_below_seeks_the_path_index(db):
    """undecided()'s batched check: one index seek per listed path; the only
    scans are of the listed values themselves."""
    from layerdb.engine import replay

    db.import_archive(str(REPO_FIXTURES / "images" / "sample.oci.tar"), tag="s:1")
    sql = replay._HAS_BELOW.format(",".join(["(?,?,?)"] * replay._HAS_BELOW_ROWS))
    plan = [row[3] for row in db.store.execute("EXPLAIN QUERY PLAN " + sql,
                                                [b"etc", b"etc/", b"etc0"] * replay._HAS_BELOW_ROWS)]
    assert any("SEARCH path" in step and "(path>? AND path<?)" in step for step in plan), plan
    assert [step for step in plan if step.startswith("SCAN")] == ["SCAN %d CONSTANT ROWS" % replay._HAS_BELOW_ROWS,
                                                                  "SCAN c"], plan


def test_partitioned_export_of_a_damaged_store_fails_cleanly(db, monkeypatch):
    """A damaged chunk met in a later partition is CorruptStore, as in a whole
    replay, and the temporary table does not outlive the export."""
    from layerdb.engine.errors import CorruptStore

    db.import_archive(str(REPO_FIXTURES / "images" / "sample.oci.tar"), tag="s:1")
    with db.store.write():
        db.store.execute("UPDATE chunk SET data = zeroblob(length(data)) WHERE codec = 1")
    monkeypatch.setattr(export, "WHOLE_EVENTS", 0)
    monkeypatch.setattr(export, "PARTITION_PATHS", 2)
    with pytest.raises(CorruptStore):
        db.export_tar("s:1", io.BytesIO())
    assert db.store.execute("SELECT name FROM temp.sqlite_schema").fetchall() == []


def test_partitions_decode_each_pack_once(db, tmp_path, monkeypatch):
    """A pack whose files fall in several partitions is decoded once and kept for
    the next ones (output.export.KEPT_BYTES); with no room to keep it, it is read
    again where it comes back, and the tar is the oracle's view either way."""
    from collections import Counter

    from conftest import export_bytes, manifest_of_tar_bytes, oracle_lines, oracle_positions
    from layerdb.engine.output import export as out

    oracle = REPO_FIXTURES / "oracle" / "sample"
    db.import_archive(str(REPO_FIXTURES / "images" / "sample.oci.tar"), tag="s:1")
    chunks = db.content.chunks
    real = chunks.get_encoded
    reads: list[bytes] = []
    monkeypatch.setattr(chunks, "get_encoded", lambda sha: reads.append(sha) or real(sha))
    with db.store.read():
        blobs = [b for (b,) in db.store.execute("SELECT id FROM blob")]
        packs = {pack for pack, _ in db.content.locate(blobs).values()}

    def pack_reads(kept: int) -> tuple[bytes, Counter]:
        reads.clear()
        with monkeypatch.context() as m:
            replaying(m, 2)
            m.setattr(out, "KEPT_BYTES", kept)
            data = export_bytes(db, "s:1")
        return data, Counter(sha for sha in reads if sha in packs)

    kept, once = pack_reads(16 << 20)
    assert len(once) > 1 and set(once.values()) == {1}  # the view needs some of the packs, each once
    assert manifest_of_tar_bytes(kept, tmp_path) == oracle_lines(oracle, max(oracle_positions(oracle)))
    dropped, again = pack_reads(0)
    assert dropped == kept and max(again.values()) > 1
