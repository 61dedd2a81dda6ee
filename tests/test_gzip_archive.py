"""`docker save | gzip` archives: the same store as the plain archive, in two passes.

A gzipped outer archive seeks back only by decompressing again from the start.
The importer reads it in one listing pass that keeps the JSON members, then one
pass over the layers in archive order (engine/archive.py, Archive): these tests
hold it to that with real archives, gzipped here with Python's gzip module, and
to the store the plain archive gives: the same images, layers, events, paths and
contents (row ids aside), the oracle's views, the same `save` output.

The Docker < 25 layout (`<id>/layer.tar` directories sorted by id, so in no
relation to the layer order, manifest.json last) is derived here from the
buildah archives, which store their layers in order.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import sys
import tarfile
from pathlib import Path

import apsw
import pytest

from conftest import (REPO_FIXTURES, SHARED_FIXTURES, export_bytes, manifest_of_tar_bytes, oracle_lines,
                      oracle_positions, run_cli)
from layerdb.engine.ingest import archive as archive_mod
from layerdb.engine.errors import LayerdbError

sys.path.insert(0, str(Path(__file__).parent))
from archive_tools import ArchiveEditor, flip_byte  # noqa: E402

IMAGES = REPO_FIXTURES / "images"
SHARED = SHARED_FIXTURES / "images"
# Two passes over the compressed bytes, and a little for buffers and the gzip trailer.
MAX_PASSES = 2.2


# Deriving archives -------------------------------------------------------------------------


def gzipped(src: Path, dst: Path) -> Path:
    dst.write_bytes(gzip.compress(src.read_bytes(), compresslevel=1, mtime=0))
    return dst


def docker_legacy(src: Path, dst: Path) -> Path:
    """The image of a buildah docker-archive in the layout of `docker save` before Docker 25:
    <v1 id>/{VERSION,json,layer.tar} per layer, directories sorted by id (the hex of the chain
    id), then <config>.json, manifest.json and repositories.  Layer bytes are unchanged."""
    with tarfile.open(src) as t:
        (ent,) = json.load(t.extractfile("manifest.json"))
        config = t.extractfile(ent["Config"]).read()
        chain: list[str] = []
        for d in json.loads(config)["rootfs"]["diff_ids"]:
            chain.append(d if not chain else "sha256:" + hashlib.sha256(f"{chain[-1]} {d}".encode()).hexdigest())
        ids = [c.split(":", 1)[1] for c in chain]
        with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as out:

            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 1600000000, 0o644
                out.addfile(info, io.BytesIO(data))

            for i in sorted(range(len(ids)), key=lambda i: ids[i]):
                d = tarfile.TarInfo(ids[i])
                d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1600000000
                out.addfile(d)
                add(f"{ids[i]}/VERSION", b"1.0")
                add(f"{ids[i]}/json", json.dumps({"id": ids[i]}).encode())
                add(f"{ids[i]}/layer.tar", t.extractfile(t.getmember(ent["Layers"][i])).read())
            add(ent["Config"], config)
            manifest = [{"Config": ent["Config"], "RepoTags": ent["RepoTags"],
                         "Layers": [f"{i}/layer.tar" for i in ids]}]
            add("manifest.json", json.dumps(manifest).encode())
            add("repositories", json.dumps({}).encode())
    order = [m for m in tarfile.open(dst).getnames() if m.endswith("/layer.tar")]
    assert order != [f"{i}/layer.tar" for i in ids], "the layers should not lie in chain order"
    return dst


def _plain(tmp_path: Path, case: str) -> Path:
    if case == "sample-legacy":
        return docker_legacy(IMAGES / "sample.docker.tar", tmp_path / "sample-legacy.tar")
    if case == "multi":
        return REPO_FIXTURES / "multiplatform" / "multi.oci.tar"
    path = (SHARED if case.startswith(("fx-", "hc-")) else IMAGES) / f"{case}.tar"
    if not path.exists():
        pytest.skip(f"{path} is not here (../shared/fixtures is beside the checkout in CI)")
    return path


# Stores -------------------------------------------------------------------------------------


LOGICAL = {  # every table, with each reference to a row replaced by what names that row
    "image": """SELECT i.digest, i.config, l.chain_id, i.created, i.os, i.architecture
                FROM image i LEFT JOIN layer l ON l.id = i.top_layer""",
    "tag": "SELECT t.name, i.digest FROM tag t JOIN image i ON i.id = t.image_id",
    "history": """SELECT i.digest, h.idx, h.position, h.created, h.created_by, h.comment, h.empty_layer
                  FROM history h JOIN image i ON i.id = h.image_id""",
    "layer": """SELECT l.chain_id, p.chain_id, d.diff_id, l.position
                FROM layer l JOIN diff d ON d.id = l.diff_id LEFT JOIN layer p ON p.id = l.parent_id""",
    "diff": """SELECT d.diff_id, d.tar_size, d.file_bytes, d.entries, b.sha256, d.container
               FROM diff d LEFT JOIN blob b ON b.id = d.framing""",
    "event": """SELECT d.diff_id, e.kind, e.seq, p.path, e.type, e.mode, e.uid, e.gid, e.mtime, e.size, b.sha256,
                       e.link, t.path, e.devmajor, e.devminor, e.xattrs, e.time
                FROM event e JOIN diff d ON d.id = e.diff_id JOIN path p ON p.id = e.path_id
                LEFT JOIN blob b ON b.id = e.blob_id LEFT JOIN path t ON t.id = e.target_id""",
    "path": "SELECT path, name FROM path",
    "blob": "SELECT sha256, size, chunk IS NULL FROM blob",
    "blob_chunk": "SELECT b.sha256, c.seq, c.offset, c.chunk FROM blob_chunk c JOIN blob b ON b.id = c.blob_id",
    # What pulls remember (engine/registry/records.py); an import leaves them empty.
    "manifest": "SELECT m.digest, m.media_type, m.data, i.digest FROM manifest m LEFT JOIN image i ON i.id = m.image_id",
    "manifest_child": """SELECT a.digest, b.digest FROM manifest_child c
                         JOIN manifest a ON a.id = c.index_id JOIN manifest b ON b.id = c.child_id""",
    "manifest_layer": """SELECT m.digest, l.idx, l.digest, l.media_type, l.size, l.annotations, l.diff_id
                         FROM manifest_layer l JOIN manifest m ON m.id = l.manifest_id""",
    "seen": "SELECT digest, registry, repository FROM seen",
    "build_cache": "SELECT key, parent, step, inputs, diff_id, created, used FROM build_cache",
}


def logical(path: Path) -> dict:
    """The store's content, sorted, without row ids or import times.

    Row ids, and which pack holds a small content shared by several layers,
    follow the order layers are read in: archive order for a gzipped archive,
    bottom first for a plain one (engine/importer.py, Importer._plan)."""
    conn = apsw.Connection(str(path))
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
        assert tables == set(LOGICAL) | {"chunk", "container"}, "a new table: add it to LOGICAL"
        return {name: sorted(conn.execute(sql).fetchall(), key=repr) for name, sql in LOGICAL.items()}
    finally:
        conn.close()


def import_into(path: Path, archive: Path, **kw):
    from layerdb.engine.api import LayerDB

    with LayerDB(path) as db:
        return db.import_archive(str(archive), **kw)


# Same store ---------------------------------------------------------------------------------

CASES = [
    "sample-legacy",  # Docker < 25 layout: 6 layers out of order, manifest last
    "sample.docker",  # buildah: <diff>.tar in order, <id>/layer.tar symlinks, manifest last
    "sample.oci",  # OCI, gzip layers
    "opaque.oci-zstd",  # OCI, zstd layers
    "opaque.docker",  # Docker < 25 layout as fxtool.py writes it: 3 layers
    "fx-trio.multi.docker",  # three images sharing a layer
    "fx-links.docker25",  # Docker 25+ layout: blobs/ and manifest.json
    "fx-history.oci-zstd",  # 13 layers
]


@pytest.mark.parametrize("case", CASES)
def test_gzipped_archive_gives_the_same_store_in_two_passes(tmp_path, case):
    plain = _plain(tmp_path, case)
    gz = gzipped(plain, tmp_path / "archive.tar.gz")
    res_plain = import_into(tmp_path / "plain.sqlite", plain)
    res_gz = import_into(tmp_path / "gz.sqlite", gz)
    assert res_gz.images == res_plain.images
    assert (res_gz.new_diffs, res_gz.reused_diffs) == (res_plain.new_diffs, res_plain.reused_diffs)
    want = logical(tmp_path / "plain.sqlite")
    assert want["event"] and logical(tmp_path / "gz.sqlite") == want
    size = gz.stat().st_size
    assert size <= res_gz.bytes_read <= MAX_PASSES * size, f"read {res_gz.bytes_read / size:.2f} times the archive"

    # Importing again only verifies every layer: still two passes, and nothing changes.
    again = import_into(tmp_path / "gz.sqlite", gz)
    assert again.new_diffs == 0 and size <= again.bytes_read <= MAX_PASSES * size
    assert logical(tmp_path / "gz.sqlite") == logical(tmp_path / "plain.sqlite")


def test_gzipped_legacy_archive_matches_the_oracle_and_rebuilds_its_layers(db, tmp_path):
    """Not only the plain archive's store: the independent oracle's views, and byte-exact layers."""
    gz = gzipped(_plain(tmp_path, "sample-legacy"), tmp_path / "sample-legacy.tar.gz")
    res = db.import_archive(str(gz), tag="fixture/sample:gz")
    assert res.new_diffs == 6
    oracle = REPO_FIXTURES / "oracle" / "sample"
    index = json.loads((oracle / "index.json").read_text())
    history = db.history("fixture/sample:gz")
    assert [h["layer_id"] for h in history if h["layer_id"]] == [la["chain_id"] for la in reversed(index["layers"])]
    top = max(oracle_positions(oracle))
    for pos in oracle_positions(oracle):
        got = manifest_of_tar_bytes(export_bytes(db, f"fixture/sample:gz~{top - pos}"), tmp_path)
        assert got == oracle_lines(oracle, pos), f"position {pos} differs from the oracle"
    for layer in index["layers"]:
        h = hashlib.sha256()
        for piece in db.layer_tar(layer["diff_id"]):
            h.update(piece)
        assert "sha256:" + h.hexdigest() == layer["diff_id"]


def test_save_round_trip_of_a_gzipped_archive(tmp_path):
    """`layerdb save` writes the same archive whether the import was gzipped or not."""
    plain = _plain(tmp_path, "sample-legacy")
    gz = gzipped(plain, tmp_path / "sample-legacy.tar.gz")
    out = {}
    for name, src in (("plain", plain), ("gz", gz)):
        store = tmp_path / f"{name}.sqlite"
        assert run_cli("import", str(src), db_path=store).exit_code == 0
        r = run_cli("save", "localhost/sample:1.0", "-o", str(tmp_path / f"{name}-saved.tar"), db_path=store)
        assert r.exit_code == 0, r.stderr
        out[name] = (tmp_path / f"{name}-saved.tar").read_bytes()
    assert out["gz"] == out["plain"]


def test_platform_selection_in_a_gzipped_index(tmp_path):
    plain = _plain(tmp_path, "multi")
    gz = gzipped(plain, tmp_path / "multi.tar.gz")
    for i, platform in enumerate(("linux/amd64", "linux/arm64/v8")):
        a, b = tmp_path / f"plain{i}.sqlite", tmp_path / f"gz{i}.sqlite"
        res = import_into(b, gz, platform=platform)
        assert res.images == import_into(a, plain, platform=platform).images
        assert logical(a) == logical(b)
        assert gz.stat().st_size <= res.bytes_read <= MAX_PASSES * gz.stat().st_size


def test_json_beyond_the_memory_cap_is_read_by_seeking(tmp_path, monkeypatch):
    """With nothing kept in memory the import seeks back (one more pass per JSON member
    behind the read position) and still gives the same store."""
    plain = _plain(tmp_path, "sample-legacy")
    gz = gzipped(plain, tmp_path / "sample-legacy.tar.gz")
    import_into(tmp_path / "plain.sqlite", plain)
    monkeypatch.setattr(archive_mod, "KEEP_JSON", 0)
    res = import_into(tmp_path / "gz.sqlite", gz)
    assert logical(tmp_path / "gz.sqlite") == logical(tmp_path / "plain.sqlite")
    assert res.bytes_read > MAX_PASSES * gz.stat().st_size  # what the kept JSON saves


# Members that appear twice: the later copy is the member --------------------------------------


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_later_copy_of_manifest_json_wins(tmp_path, compressed):
    ed = ArchiveEditor(IMAGES / "opaque.docker.tar")
    good = ed.read("manifest.json")
    ed.set("manifest.json", b'[{"Config": "nothing.json", "Layers": []}]')
    ed.add("manifest.json", good, like="manifest.json")
    src = ed.write(tmp_path / "two-manifests.tar")
    if compressed:
        src = gzipped(src, tmp_path / "two-manifests.tar.gz")
    res = import_into(tmp_path / "s.sqlite", src)
    assert [i["repo_tags"] for i in res.images] == [["localhost/opaque:1.0"]]


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("last", [b"[{\"Config\": ", b"not json"], ids=["cut-json", "not-json"])
def test_bad_later_copy_of_manifest_json_is_refused(tmp_path, compressed, last):
    """The good first copy, kept in memory, must not stand in for the bad later one."""
    ed = ArchiveEditor(IMAGES / "opaque.docker.tar")
    ed.add("manifest.json", last, like="manifest.json")
    src = ed.write(tmp_path / "bad-last.tar")
    if compressed:
        src = gzipped(src, tmp_path / "bad-last.tar.gz")
    with pytest.raises(LayerdbError, match=r"manifest\.json is not valid JSON"):
        import_into(tmp_path / "s.sqlite", src)


# Damage: the same refusal as for the plain archive ----------------------------------------------


def test_damaged_layer_in_a_gzipped_legacy_archive_names_the_layer(tmp_path):
    ed = ArchiveEditor(_plain(tmp_path, "sample-legacy"))
    (ent,) = ed.read_json("manifest.json")
    third = ent["Layers"][2]
    data = ed.read(third)
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        f = next(m for m in t.getmembers() if m.isfile() and m.size >= 2)
    ed.set(third, flip_byte(data, f.offset_data + f.size // 2))
    plain = ed.write(tmp_path / "damaged.tar")
    gz = gzipped(plain, tmp_path / "damaged.tar.gz")
    messages = []
    for src in (plain, gz):
        with pytest.raises(LayerdbError) as ei:
            import_into(tmp_path / "s.sqlite", src)
        messages.append(ei.value.message)
    assert messages[0] == messages[1]
    assert re.match(rf"^layer 3 \({re.escape(third)}\): diff_id: digest mismatch", messages[1]), messages[1]
    assert logical(tmp_path / "s.sqlite")["diff"] == []


def test_truncated_gzipped_archive_is_damaged(tmp_path):
    gz = gzipped(_plain(tmp_path, "sample-legacy"), tmp_path / "cut.tar.gz")
    data = gz.read_bytes()
    gz.write_bytes(data[: len(data) * 3 // 4])
    r = run_cli("import", str(gz), db_path=tmp_path / "s.sqlite")
    assert r.exit_code != 0
    assert re.fullmatch(r"layerdb: error: .*cut\.tar\.gz: damaged archive \(.*\)\n", r.stderr), r.stderr


HOSTILE = sorted((REPO_FIXTURES.parent / "hostile").glob("*.tar"))


@pytest.mark.parametrize("archive", HOSTILE, ids=[p.stem for p in HOSTILE])
def test_gzipped_hostile_archive_meets_the_same_fate(tmp_path, archive):
    """Each of tests/hostile's archives, gzipped: refused with the same error as the
    plain one (which layer, which fault), or imported to the same store."""
    gz = gzipped(archive, tmp_path / "hostile.tar.gz")
    fates = []
    for i, src in enumerate((archive, gz)):
        store = tmp_path / f"s{i}.sqlite"
        try:
            import_into(store, src)
            fates.append(("imported", logical(store)))
        except LayerdbError as e:
            fates.append((type(e).__name__, e.message))
    assert fates[1] == fates[0]


@pytest.mark.parametrize("where", ["crc", "length"])
def test_gzipped_archive_with_a_bad_trailer_is_damaged(tmp_path, where):
    """The gzip trailer (CRC-32 and length of the whole tar) is checked too, though
    tarfile itself stops reading at the end-of-archive blocks."""
    gz = gzipped(_plain(tmp_path, "sample-legacy"), tmp_path / "bad.tar.gz")
    data = bytearray(gz.read_bytes())
    data[-8 if where == "crc" else -4] ^= 0x01
    gz.write_bytes(bytes(data))
    db = tmp_path / "s.sqlite"
    r = run_cli("import", str(gz), db_path=db)
    assert r.exit_code != 0
    assert re.fullmatch(r"layerdb: error: .*bad\.tar\.gz: damaged archive \(.*\)\n", r.stderr), r.stderr
    assert run_cli("images", "--json", db_path=db).stdout == ""
