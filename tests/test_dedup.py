"""Sharing: a diff is stored once however many images use it; contents are stored once."""

from __future__ import annotations

import json

from conftest import REPO_FIXTURES

IMAGES = REPO_FIXTURES / "images"


def _index(name):
    return json.loads((REPO_FIXTURES / "oracle" / name / "index.json").read_text())


def _chunk_bytes(db):
    return db.store.scalar("SELECT coalesce(sum(length(data)), 0) FROM chunk")


def test_two_images_sharing_a_base_store_it_once(db):
    s1, s2 = _index("sample"), _index("sample2")
    base = s1["layers"][0]["diff_id"]
    assert s2["layers"][0]["diff_id"] == base
    db.import_archive(str(IMAGES / "sample.oci.tar"))
    after_first = _chunk_bytes(db)
    events_first = db.store.scalar("SELECT count(*) FROM event")
    db.import_archive(str(IMAGES / "sample2.oci.tar"))
    want = {l["diff_id"] for l in s1["layers"]} | {l["diff_id"] for l in s2["layers"]}
    assert {r[0] for r in db.store.execute("SELECT diff_id FROM diff")} == want
    assert db.store.scalar("SELECT count(*) FROM diff WHERE diff_id = ?", (base,)) == 1
    # the base's events are not written again ...
    base_events = db.store.scalar("SELECT count(*) FROM event e JOIN diff d ON d.id = e.diff_id WHERE d.diff_id = ?",
                                  (base,))
    added = db.store.scalar("SELECT count(*) FROM event") - events_first
    assert added == db.store.scalar(
        "SELECT count(*) FROM event e JOIN diff d ON d.id = e.diff_id WHERE d.diff_id IN (%s)"
        % ",".join("?" * (len(s2["layers"]) - 1)), [l["diff_id"] for l in s2["layers"][1:]])
    assert base_events > 10
    # ... and its 2 MB of contents (busybox) are not stored again: sample2's own
    # layers hold a few small files only.
    assert _chunk_bytes(db) - after_first < 20_000
    # both chains hang off the same bottom layer row
    assert db.resolve("sample:1.0").layers[0].layer_rowid == db.resolve("sample2:1.0").layers[0].layer_rowid


def test_identical_contents_in_different_layers_are_stored_once(db):
    db.import_archive(str(IMAGES / "sample.oci.tar"))
    # sample's layer 5 copies /app/config.ini to settings.ini (a full copy in the tar,
    # see tests/fixtures/README.md): two events, one content.
    top = {r["path"]: r for r in db.listing("sample:1.0", "/app")}
    sha = bytes.fromhex(top["/app/config.ini"]["sha256"])
    assert top["/app/settings.ini"]["sha256"] == sha.hex()
    assert db.store.scalar("SELECT count(*) FROM blob WHERE sha256 = ?", (sha,)) == 1
    blob_ids = {r[0] for r in db.store.execute(
        """SELECT e.blob_id FROM event e JOIN path p ON p.id = e.path_id JOIN blob b ON b.id = e.blob_id
           WHERE p.path IN (CAST('app/config.ini' AS BLOB), CAST('app/settings.ini' AS BLOB)) AND b.sha256 = ?""",
        (sha,))}
    assert len(blob_ids) == 1


def test_tiny_files_fill_packs_by_count_too(db, tmp_path):
    """10k distinct few-byte files: packs close at PACK_MEMBERS contents, not
    only at 1 MiB, since each content waits in memory until its pack is stored.
    Every file still reads back."""
    import io
    import tarfile

    from hostile.make_hostile import entry
    from test_export_memory import _stacked

    from layerdb.engine import content

    n = 10_000
    db.import_archive(str(_stacked(tmp_path, ("tiny", [entry(f"t/{i}", b"%d" % i) for i in range(n)]))),
                      tag="t:1")
    sizes = [c for (c,) in db.store.execute(
        "SELECT count(*) FROM blob WHERE chunk IS NOT NULL GROUP BY chunk ORDER BY 1 DESC")]
    assert max(sizes) == content.PACK_MEMBERS and sum(sizes) >= n
    buf = io.BytesIO()
    db.export_tar("t:1", buf)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as t:
        got = {m.name: t.extractfile(m).read() for m in t if m.isreg() and m.name.startswith("t/")}
    assert got == {f"t/{i}": b"%d" % i for i in range(n)}
