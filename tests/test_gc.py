"""`rm` and `gc`: what goes, what stays, and that the file really shrinks.

sample.oci.tar and sample2.oci.tar share their bottom layer (busybox, 1.9 MB,
stored as content-defined chunks); every surviving view is compared with the
containers/storage oracle, every surviving layer tar is rebuilt and hashed
against its diff_id.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import (REPO_FIXTURES, export_bytes, load_json_lines, manifest_of_tar_bytes, oracle_lines,
                      oracle_positions, run_cli)
from hostile.storecheck import check_store, counts, dump, one_error_line

IMAGES = REPO_FIXTURES / "images"
ORACLE = REPO_FIXTURES / "oracle"
SAMPLE, SAMPLE2 = IMAGES / "sample.oci.tar", IMAGES / "sample2.oci.tar"
S1, S2 = "sample:1.0", "sample2:1.0"


def index(name: str) -> dict:
    return json.loads((ORACLE / name / "index.json").read_text())


def ok(db_path, *args: str):
    r = run_cli(*args, db_path=db_path)
    assert r.exit_code == 0, f"{args}: {r.stdout}{r.stderr}"
    return r


def refused(db_path, *args: str, exit_code: int) -> str:
    r = run_cli(*args, db_path=db_path)
    line = one_error_line(r.exit_code, r.stdout, r.stderr)
    assert r.exit_code == exit_code, line
    return line


@pytest.fixture
def both(tmp_path):
    db = tmp_path / "s.sqlite"
    # 4 KiB pages, as stores made before 2026-12-03 have: what sample:1.0 holds
    # alone is a few KiB of small files, which frees whole 4 KiB pages but not
    # 8 KiB ones, and these tests are about the file shrinking.
    import apsw

    c = apsw.Connection(str(db))
    c.execute("PRAGMA page_size = 4096")
    c.execute("PRAGMA journal_mode = WAL")
    c.close()
    ok(db, "import", str(SAMPLE))
    ok(db, "import", str(SAMPLE2))
    return db


def assert_views_match_oracle(db_path, ref: str, oracle: str, tmp_path) -> None:
    from layerdb.engine.api import LayerDB

    positions = oracle_positions(ORACLE / oracle)
    top = max(positions)
    with LayerDB(db_path) as db:
        for pos in positions:
            got = manifest_of_tar_bytes(export_bytes(db, f"{ref}~{top - pos}"), tmp_path)
            assert got == oracle_lines(ORACLE / oracle, pos), f"{ref} position {pos} differs from the oracle"
        # The lossless promise survives too: every layer tar rebuilds to its diff_id.
        for layer in index(oracle)["layers"]:
            h = hashlib.sha256()
            for piece in db.layer_tar(layer["diff_id"]):
                h.update(piece)
            assert "sha256:" + h.hexdigest() == layer["diff_id"]


def empty_store_pages(tmp_path) -> int:
    from layerdb.engine.api import LayerDB

    LayerDB(tmp_path / "empty.sqlite").close()
    return page_count(tmp_path / "empty.sqlite")


def page_count(path) -> int:
    import apsw

    conn = apsw.Connection(str(path))
    try:
        return conn.execute("PRAGMA page_count").fetchone()[0]
    finally:
        conn.close()


# rm + gc ------------------------------------------------------------------------------------


def test_rm_one_of_two_sharing_a_base_then_gc_keeps_the_other_whole(both, tmp_path):
    s1_layers = [li["chain_id"] for li in index("sample")["layers"]]
    s2_layers = [li["chain_id"] for li in index("sample2")["layers"]]
    assert s1_layers[0] == s2_layers[0], "premise: the two images share their bottom layer"

    r = ok(both, "rm", S1)
    assert r.stdout.splitlines() == ["Untagged: sample:1.0", f"Deleted: {index('sample')['config_digest']}"]
    # Until gc, the image's layers stay, reachable by layer id (like unreachable git commits).
    got = manifest_of_tar_bytes(export_bytes_cli(both, s1_layers[-1][7:19]), tmp_path)
    assert got == oracle_lines(ORACLE / "sample", len(s1_layers))

    (res,) = load_json_lines(ok(both, "gc", "--json").stdout)
    assert res["layers"] == len(s1_layers) - 1
    assert res["diffs"] == len(s1_layers) - 1
    assert res["vacuumed"] is True
    assert res["bytes_after"] < res["bytes_before"]

    c = counts(dump(both))
    assert (c["image"], c["layer"], c["diff"], c["tag"]) == (1, len(s2_layers), len(s2_layers), 1)
    assert_views_match_oracle(both, S2, "sample2", tmp_path)
    refused(both, "view", "--at", s1_layers[-1][7:19], exit_code=5)
    ok(both, "view", "--at", s1_layers[0][7:19])  # the shared bottom layer stays
    check_store(both)


def export_bytes_cli(db_path, ref: str) -> bytes:
    r = run_cli("export", "--at", ref, "-o", "-", db_path=db_path)
    assert r.exit_code == 0, r.stderr
    return r.stdout_bytes


def test_rm_both_then_gc_leaves_an_empty_store(both, tmp_path):
    empty = empty_store_pages(tmp_path)
    big = page_count(both)
    ok(both, "rm", S1, S2)
    (res,) = load_json_lines(ok(both, "gc", "--json").stdout)
    assert res["chunks"] > 0 and res["paths"] > 0 and res["blobs"] > 0
    assert all(n == 0 for n in counts(dump(both)).values()), counts(dump(both))
    pages = page_count(both)
    assert pages <= empty + 4, f"{pages} pages after gc (empty store: {empty}, before: {big})"
    assert both.stat().st_size == res["bytes_after"]
    wal = both.with_name(both.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "the WAL was not truncated"
    check_store(both)

    # The store is as good as new: the images import again and match the oracle.
    ok(both, "import", str(SAMPLE))
    assert_views_match_oracle(both, S1, "sample", tmp_path)


def test_gc_with_nothing_to_collect_changes_nothing(both):
    before = dump(both)
    (res,) = load_json_lines(ok(both, "gc", "--json").stdout)
    assert {k: v for k, v in res.items() if not k.startswith("bytes")} == {
        "layers": 0, "diffs": 0, "events": 0, "blobs": 0, "chunks": 0, "paths": 0, "repacked": 0, "vacuumed": False,
        "checkpointed": True, "manifests": 0, "seen": 0}
    assert dump(both) == before


def test_gc_twice_is_gc_once(both):
    ok(both, "rm", S2)
    ok(both, "gc")
    after = dump(both)
    (res,) = load_json_lines(ok(both, "gc", "--json").stdout)
    assert (res["layers"], res["blobs"], res["chunks"], res["paths"]) == (0, 0, 0, 0)
    assert dump(both) == after


def test_gc_text_output(both):
    ok(both, "rm", S2)
    line = ok(both, "gc").stdout.strip()
    assert line.startswith("removed 2 layers, 2 diffs, ") and " -> " in line, line


# rm: names, tags, ids, atomicity -----------------------------------------------------------


def test_rm_one_tag_of_several_keeps_the_image(tmp_path):
    db = tmp_path / "s.sqlite"
    ok(db, "import", str(SAMPLE))
    ok(db, "import", str(SAMPLE), "--tag", "other/name:2")
    (img,) = load_json_lines(ok(db, "images", "--json").stdout)
    assert sorted(img["repo_tags"]) == ["other/name:2", "sample:1.0"]

    assert ok(db, "rm", "other/name:2").stdout.splitlines() == ["Untagged: other/name:2"]
    (img,) = load_json_lines(ok(db, "images", "--json").stdout)
    assert img["repo_tags"] == ["sample:1.0"]
    assert_views_match_oracle(db, S1, "sample", tmp_path)


def test_rm_by_short_name_and_by_image_id(tmp_path):
    db = tmp_path / "s.sqlite"
    ok(db, "import", str(SAMPLE), "--tag", "localhost/app:1")
    ok(db, "import", str(SAMPLE), "--tag", "localhost/app:2")
    ok(db, "import", str(SAMPLE2))
    # A short name finds localhost/app:1; the image keeps its other tag.
    (r,) = load_json_lines(ok(db, "rm", "--json", "app:1").stdout)
    assert r == {"image": index("sample")["config_digest"], "untagged": ["localhost/app:1"], "deleted": False}
    ok(db, "import", str(SAMPLE), "--tag", "localhost/app:3")
    # An id prefix removes the image whatever its tags.
    (r,) = load_json_lines(ok(db, "rm", "--json", index("sample")["config_digest"][7:19]).stdout)
    assert r["deleted"] is True and sorted(r["untagged"]) == ["localhost/app:2", "localhost/app:3"]
    assert [i["repo_tags"] for i in load_json_lines(ok(db, "images", "--json").stdout)] == [["sample2:1.0"]]


def test_rm_is_all_or_nothing(both):
    before = dump(both)
    line = refused(both, "rm", S1, "nosuch:1", exit_code=5)
    assert "nosuch:1" in line
    assert dump(both) == before


@pytest.mark.parametrize("ref,code", [
    ("sample:1.0~1", 2),  # a REF into a chain is no image
    ("5a8f7132721b", 5),  # a layer id (sample's 4th) is no image
    ("sample", 5),  # sample:latest does not exist
    ("", 2),
])
def test_rm_refuses_what_is_not_an_image(both, ref, code):
    before = dump(both)
    refused(both, "rm", ref, exit_code=code)
    assert dump(both) == before


def test_rm_then_reimport_restores_the_same_store(both, tmp_path):
    before = dump(both)
    ok(both, "rm", S1)
    ok(both, "gc")
    ok(both, "import", str(SAMPLE))
    after = dump(both)
    # Row ids may be new; what the store says is the same.  Chunks may not be:
    # the small files of sample now fill a pack of their own, while the pack
    # they shared with the base keeps their dead bytes (gc does not repack).
    assert {**counts(after), "chunk": 0} == {**counts(before), "chunk": 0}
    assert_views_match_oracle(both, S1, "sample", tmp_path)
    assert_views_match_oracle(both, S2, "sample2", tmp_path)
    check_store(both)


def test_gc_beside_a_reader_holding_an_old_snapshot(both, tmp_path):
    """The reader's snapshot stays whole; the WAL it pins is folded in by a later gc."""
    import apsw

    reader = apsw.Connection(str(both))
    reader.execute("BEGIN")
    blobs = reader.execute("SELECT count(*) FROM blob").fetchone()[0]
    ok(both, "rm", S1)
    (res,) = load_json_lines(ok(both, "gc", "--json").stdout)
    assert res["vacuumed"] and not res["checkpointed"]
    assert reader.execute("SELECT count(*) FROM blob").fetchone()[0] == blobs
    reader.execute("COMMIT")
    reader.close()
    (again,) = load_json_lines(ok(both, "gc", "--json").stdout)
    assert again["checkpointed"] and again["bytes_after"] < res["bytes_after"]
    assert_views_match_oracle(both, S2, "sample2", tmp_path)
    check_store(both)


def test_gc_rewrites_a_pack_that_lost_members(tmp_path):
    """A removed layer's pack still holds a content another image shares: gc keeps
    that content and drops the dead bytes around it."""
    from hostile.make_hostile import entry, layer, on_top, tar_bytes

    from layerdb.engine.api import LayerDB

    db_path = tmp_path / "s.sqlite"
    with LayerDB(db_path) as db:
        db.import_archive(str(SAMPLE))
        keep = b"".join(db.cat("sample:1.0~3", "/app/config.ini"))  # stored in layer 3's pack
        arch = tmp_path / "copy.oci.tar"
        on_top([layer(tar_bytes([entry("copy.ini", keep)]), "COPY copy.ini /")], src="opaque.oci.tar").write(arch)
        db.import_archive(str(arch), tag="copy:1")
        sha = hashlib.sha256(keep).digest()
        pack = db.store.scalar("SELECT chunk FROM blob WHERE sha256 = ?", (sha,))
        raw_before = db.store.scalar("SELECT size FROM chunk WHERE sha256 = ?", (pack,))
        db.remove(["sample:1.0"])
        res = db.gc()
        assert res.repacked == 1
        new_pack = db.store.scalar("SELECT chunk FROM blob WHERE sha256 = ?", (sha,))
        assert new_pack != pack and db.store.scalar("SELECT count(*) FROM chunk WHERE sha256 = ?", (pack,)) == 0
        assert db.store.scalar("SELECT size FROM chunk WHERE sha256 = ?", (new_pack,)) < raw_before
        assert b"".join(db.cat("copy:1", "/copy.ini")) == keep
    ok(db_path, "fsck", "--deep")
