"""`layerdb fsck` and `layerdb stats` on real stores, healthy and damaged.

Damage is planted with apsw straight into the store file, the way a bad disk or
a bug would leave it; the expected layer ids, diff ids and image ids come from
the oracle indexes, never from layerdb.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import apsw
import pytest
import zstandard

from archive_tools import ArchiveEditor, sha256_digest
from conftest import REPO_FIXTURES, SHARED_FIXTURES, load_json_lines, run_cli

IMAGES = REPO_FIXTURES / "images"
SAMPLE = json.loads((REPO_FIXTURES / "oracle" / "sample" / "index.json").read_text())
SAMPLE2 = json.loads((REPO_FIXTURES / "oracle" / "sample2" / "index.json").read_text())
OPAQUE = json.loads((REPO_FIXTURES / "oracle" / "opaque" / "index.json").read_text())
FINDING_KEYS = {"check", "object", "problem", "diff_id", "path", "layers", "images"}


def _store(tmp_path: Path, *archives: Path) -> Path:
    p = tmp_path / "store.sqlite"
    for a in archives:
        r = run_cli("import", str(a), db_path=p)
        assert r.exit_code == 0, r.output
    return p


def _fsck(p: Path, *args: str):
    r = run_cli("fsck", "--json", *args, db_path=p)
    return r, load_json_lines(r.stdout)


def _layer(index: dict, pos: int) -> dict:
    return {"layer_id": index["layers"][pos - 1]["chain_id"], "position": pos}


def _image(index: dict) -> dict:
    return {"id": index["config_digest"], "repo_tags": index["tags"]}


def _content_of(conn, path: bytes, diff_id: str) -> tuple:
    """(blob id, pack chunk or None, offset, size) of the file `path` in the diff."""
    return conn.execute(
        """SELECT b.id, b.chunk, b.offset, b.size FROM event e JOIN diff d ON d.id = e.diff_id
           JOIN path p ON p.id = e.path_id JOIN blob b ON b.id = e.blob_id
           WHERE p.path = ? AND d.diff_id = ? AND e.kind = 3""", (path, diff_id)).fetchone()


def _files_in_pack(conn, pack: bytes) -> set:
    """(path, diff_id) of every file whose content lies in the pack."""
    return {("/" + bytes(q).decode(), d) for q, d in conn.execute(
        """SELECT p.path, d.diff_id FROM event e JOIN blob b ON b.id = e.blob_id JOIN diff d ON d.id = e.diff_id
           JOIN path p ON p.id = e.path_id WHERE b.chunk = ?""", (pack,))}


def _rewrite_chunk(conn, sha: bytes, offset: int, codec: int | None = None) -> None:
    """Flip one byte of a chunk's raw content and store it again, so it still decodes."""
    size, old_codec, data = conn.execute("SELECT size, codec, data FROM chunk WHERE sha256 = ?", (sha,)).fetchone()
    raw = bytearray(zstandard.ZstdDecompressor().decompress(data, max_output_size=size) if old_codec == 1 else data)
    assert len(raw) == size
    raw[offset] ^= 0xFF
    codec = old_codec if codec is None else codec
    new = zstandard.ZstdCompressor(level=3).compress(bytes(raw)) if codec == 1 else bytes(raw)
    conn.execute("UPDATE chunk SET codec = ?, data = ? WHERE sha256 = ?", (codec, new, sha))


def _only(findings: list[dict], **match) -> list[dict]:
    return [f for f in findings if all(f[k] == v for k, v in match.items())]


# Healthy stores -----------------------------------------------------------------------


def _all_archives() -> list[Path]:
    out = sorted(IMAGES.glob("*.tar"))
    if (SHARED_FIXTURES / "images").is_dir():
        out += sorted((SHARED_FIXTURES / "images").glob("*.tar"))
    return out


def test_deep_fsck_passes_on_every_fixture(tmp_path):
    p = _store(tmp_path, *_all_archives())
    r = run_cli("fsck", "--deep", db_path=p)
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    assert r.stderr.startswith("fsck: ok: ") and r.stderr.count("\n") == 1
    diffs = apsw.Connection(str(p)).execute("SELECT count(*) FROM diff").fetchone()[0]
    assert f"{diffs} layer tars rebuilt" in r.stderr
    r, findings = _fsck(p, "--deep")
    assert r.exit_code == 0 and findings == []


def test_fsck_on_an_empty_store(tmp_path):
    r, findings = _fsck(tmp_path / "empty.sqlite", "--deep")
    assert r.exit_code == 0 and findings == []


# One flipped byte ----------------------------------------------------------------------


def test_flipped_byte_in_a_packed_chunk(tmp_path):
    """A zstd chunk re-encoded with one byte changed: it decodes, only the sha256 check can catch it."""
    p = _store(tmp_path, IMAGES / "sample.oci.tar")
    diff3 = SAMPLE["layers"][2]["diff_id"]
    conn = apsw.Connection(str(p))
    _, pack, offset, size = _content_of(conn, b"etc/passwd", diff3)
    assert pack is not None and size > 10
    assert conn.execute("SELECT codec FROM chunk WHERE sha256 = ?", (pack,)).fetchone()[0] == 1
    _rewrite_chunk(conn, pack, offset + 5)
    conn.close()

    # A pack holds one diff's small files; the ones other layers share by
    # content are damaged there too.  Each file that names the pack is a finding.
    conn = apsw.Connection(str(p))
    lost = _files_in_pack(conn, pack)
    conn.close()
    assert ("/etc/passwd", diff3) in lost

    r, findings = _fsck(p)
    assert r.exit_code == 6
    assert r.stderr.startswith(f"layerdb: error: fsck: {len(lost)} problem")
    assert r.stderr.count("\n") == 1
    assert {(f["path"], f["diff_id"]) for f in findings} == lost
    for f in findings:
        assert set(f) == FINDING_KEYS
        assert f["check"] == "chunk" and f["object"] == bytes(pack).hex()
        assert "sha256 mismatch" in f["problem"]
        assert f["images"] == [_image(SAMPLE)]
    (f,) = [f for f in findings if f["path"] == "/etc/passwd"]
    assert f["layers"] == [_layer(SAMPLE, 3)]

    r, findings = _fsck(p, "--deep")
    assert r.exit_code == 6
    tars = _only(findings, check="layer-tar")
    assert {t["object"] for t in tars} == {d for _, d in lost}
    (tar_finding,) = [t for t in tars if t["object"] == diff3]
    assert tar_finding["layers"] == [_layer(SAMPLE, 3)] and tar_finding["images"] == [_image(SAMPLE)]
    assert len(_only(findings, check="chunk")) == len(lost)

    # The human form names the same things.
    r = run_cli("fsck", db_path=p)
    assert r.exit_code == 6
    assert "/etc/passwd" in r.stdout and SAMPLE["layers"][2]["chain_id"][7:19] in r.stdout and "sample:1.0" in r.stdout


def test_flipped_byte_in_a_shared_large_file(tmp_path):
    """busybox is cut into chunks and sits in the base layer that sample and sample2 share."""
    p = _store(tmp_path, IMAGES / "sample.oci.tar", IMAGES / "sample2.oci.tar")
    base = SAMPLE["layers"][0]["diff_id"]
    assert SAMPLE2["layers"][0]["diff_id"] == base
    conn = apsw.Connection(str(p))
    blob_id, pack, _, _ = _content_of(conn, b"bin/busybox", base)
    assert pack is None
    chunks = [bytes(c) for (c,) in conn.execute("SELECT chunk FROM blob_chunk WHERE blob_id = ? ORDER BY seq",
                                                 (blob_id,))]
    assert len(chunks) > 1
    _rewrite_chunk(conn, chunks[1], 100)
    conn.close()

    r, findings = _fsck(p, "--deep")
    assert r.exit_code == 6
    (f,) = _only(findings, check="chunk")
    assert f["object"] == chunks[1].hex() and f["path"] == "/bin/busybox" and f["diff_id"] == base
    both = sorted([_image(SAMPLE), _image(SAMPLE2)], key=lambda i: i["id"])
    assert f["layers"] == [_layer(SAMPLE, 1)] and f["images"] == both
    (t,) = _only(findings, check="layer-tar")
    assert t["object"] == base and t["images"] == both
    assert len(findings) == 2


def test_flipped_byte_in_a_raw_chunk(tmp_path):
    """A chunk kept uncompressed (codec 0), damaged in place."""
    p = _store(tmp_path, IMAGES / "opaque.oci.tar")
    diff1 = OPAQUE["layers"][0]["diff_id"]
    conn = apsw.Connection(str(p))
    _, pack, offset, size = _content_of(conn, b"opt/lower.dat", diff1)
    _rewrite_chunk(conn, pack, offset, codec=0)
    conn.close()
    lost = _files_in_pack(apsw.Connection(str(p)), pack)
    r, findings = _fsck(p)
    assert r.exit_code == 6
    assert {(f["path"], f["diff_id"]) for f in findings} == lost
    (f,) = [f for f in findings if f["path"] == "/opt/lower.dat"]
    assert f["layers"] == [_layer(OPAQUE, 1)] and f["images"] == [_image(OPAQUE)]


def test_corrupt_zstd_frame(tmp_path):
    """A chunk whose zstd frame no longer decodes: every file in it is lost, each one is named."""
    p = _store(tmp_path, IMAGES / "sample.oci.tar")
    diff3 = SAMPLE["layers"][2]["diff_id"]
    conn = apsw.Connection(str(p))
    _, pack, _, _ = _content_of(conn, b"etc/passwd", diff3)
    data = bytearray(conn.execute("SELECT data FROM chunk WHERE sha256 = ?", (pack,)).fetchone()[0])
    data[0] ^= 0xFF  # the frame's magic number
    conn.execute("UPDATE chunk SET data = ? WHERE sha256 = ?", (bytes(data), pack))
    # What was in the pack: files (diff, path) and layer framings (diff, None).
    lost = {(d, "/" + bytes(q).decode()) for d, q in conn.execute(
        """SELECT d.diff_id, p.path FROM event e JOIN blob b ON b.id = e.blob_id JOIN diff d ON d.id = e.diff_id
           JOIN path p ON p.id = e.path_id WHERE b.chunk = ?""", (pack,))}
    lost |= {(d, None) for (d,) in conn.execute(
        "SELECT d.diff_id FROM diff d JOIN blob b ON b.id = d.framing WHERE b.chunk = ?", (pack,))}
    conn.close()

    r, findings = _fsck(p, "--deep")
    assert r.exit_code == 6
    content = _only(findings, check="chunk")
    assert {(f["diff_id"], f["path"]) for f in content} == lost
    assert all("does not decompress" in f["problem"] and f["object"] == bytes(pack).hex() for f in content)
    assert all(f["images"] == [_image(SAMPLE)] for f in findings)
    (passwd,) = _only(content, path="/etc/passwd", diff_id=diff3)
    assert passwd["layers"] == [_layer(SAMPLE, 3)]
    (t,) = _only(findings, check="layer-tar", object=diff3)
    assert "cannot be rebuilt" in t["problem"] and t["layers"] == [_layer(SAMPLE, 3)]


# Broken structure -----------------------------------------------------------------------

ZERO = "sha256:" + "0" * 64


def _chain(pos: int) -> str:
    return SAMPLE["layers"][pos - 1]["chain_id"]


CASES = {
    "wrong chain id": (
        [("UPDATE layer SET chain_id = ? WHERE chain_id = ?", (ZERO, _chain(4)))],
        [("layer", ZERO, "chain id is wrong", [4]), ("layer", _chain(5), "chain id is wrong", [5])],
    ),
    "broken parent chain": (
        [("UPDATE layer SET parent_id = NULL WHERE chain_id = ?", (_chain(2),))],
        [("layer", _chain(2), "parent chain is broken", [2]), ("image", SAMPLE["config_digest"], "do not match", [6])],
    ),
    "altered config": (
        [("UPDATE image SET config = CAST(config || ' ' AS BLOB)", ())],
        [("image", SAMPLE["config_digest"], "config digest mismatch", [6])],
    ),
    "missing chunk": (
        [("DELETE FROM chunk WHERE sha256 = (SELECT b.chunk FROM blob b JOIN event e ON e.blob_id = b.id"
          " JOIN path p ON p.id = e.path_id WHERE p.path = CAST('app/VERSION' AS BLOB))", ())],
        None,  # every file of that pack: checked below
    ),
    "event names a missing path": (
        [("UPDATE event SET path_id = 999999 WHERE path_id = (SELECT id FROM path WHERE path = CAST('etc/motd' AS BLOB))",
          ())],
        [("event", None, "names a missing path (row 999999)", [2])],
    ),
    "missing framing": (
        [("UPDATE diff SET framing = NULL WHERE diff_id = ?", (SAMPLE["layers"][3]["diff_id"],))],
        [("diff", SAMPLE["layers"][3]["diff_id"], "has no tar framing", [4]),
         ("layer-tar", SAMPLE["layers"][3]["diff_id"], "cannot be rebuilt", [4])],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_structural_damage_is_named(tmp_path, case):
    p = _store(tmp_path, IMAGES / "sample.oci.tar")
    edits, expected = CASES[case]
    conn = apsw.Connection(str(p))
    for sql, args in edits:
        conn.execute(sql, args)
        assert conn.changes() >= 1, sql
    conn.close()
    r, findings = _fsck(p, "--deep")
    assert r.exit_code == 6, r.output
    assert r.stderr.startswith("layerdb: error: fsck: ")
    for f in findings:
        assert set(f) == FINDING_KEYS
        assert [i["id"] for i in f["images"]] in ([SAMPLE["config_digest"]], []), f
    if expected is None:
        assert findings and all("is missing" in f["problem"] for f in findings if f["check"] == "chunk")
        assert any(f["path"] == "/app/VERSION" for f in findings)
        return
    assert len(findings) == len(expected), findings
    for (check, obj, text, positions), f in zip(expected, findings):
        assert f["check"] == check
        if obj is not None:
            assert f["object"] == obj
        assert text in f["problem"]
        assert [li["position"] for li in f["layers"]] == positions
        assert f["images"] == [_image(SAMPLE)]


# AUFS bookkeeping -------------------------------------------------------------------------


def _aufs_archive(tmp_path: Path) -> tuple[Path, str]:
    """opaque.docker.tar with AUFS bookkeeping entries (.wh..wh.plnk, .wh..wh.aufs) in its top layer."""
    ed = ArchiveEditor(IMAGES / "opaque.docker.tar")
    name = ed.layer_names()[-1]
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(ed.read(name))) as src, \
            tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        d = tarfile.TarInfo(".wh..wh.plnk")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o700, 1600000000
        dst.addfile(d)
        f = tarfile.TarInfo(".wh..wh.aufs")
        f.mode, f.mtime = 0o600, 1600000000
        dst.addfile(f, io.BytesIO(b""))
    data = buf.getvalue()
    ed.set(name, data)
    config = ed.read_json(ed.config_name())
    config["rootfs"]["diff_ids"][-1] = sha256_digest(data)
    ed.replace_config(json.dumps(config).encode())
    return ed.write(tmp_path / "aufs.docker.tar"), sha256_digest(data)


def test_aufs_entries_are_kept_and_reported(tmp_path):
    archive, diff_id = _aufs_archive(tmp_path)
    p = _store(tmp_path, archive)
    r = run_cli("fsck", "--deep", db_path=p)  # the layer with them still rebuilds to its diff_id
    assert r.exit_code == 0, r.output
    assert "2 AUFS bookkeeping entries kept, not applied" in r.stderr
    s = json.loads(run_cli("stats", "--json", db_path=p).stdout)
    assert s["aufs_entries"] == 2


# stats ---------------------------------------------------------------------------------------


def _layer_tars(archive: Path):
    """(diff_id, layer tar bytes) of every layer of a one-image OCI archive, read with tarfile and gzip."""
    with tarfile.open(archive) as t:
        index = json.load(t.extractfile("index.json"))
        manifest = json.load(t.extractfile("blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]))
        config = json.load(t.extractfile("blobs/sha256/" + manifest["config"]["digest"].split(":")[1]))
        for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]):
            data = gzip.decompress(t.extractfile("blobs/sha256/" + desc["digest"].split(":")[1]).read())
            assert sha256_digest(data) == diff_id
            yield diff_id, data


def test_stats_against_the_archives(tmp_path):
    archives = [IMAGES / "sample.oci.tar", IMAGES / "sample2.oci.tar", IMAGES / "opaque.oci.tar"]
    p = _store(tmp_path, *archives)
    s = json.loads(run_cli("stats", "--json", db_path=p).stdout)

    logical = logical_files = 0
    diffs: dict[str, tuple[int, int, int]] = {}  # diff_id -> (tar bytes, entries, payload bytes)
    contents: set[bytes] = set()
    chains: set[str] = set()
    for a, index in zip(archives, (SAMPLE, SAMPLE2, OPAQUE)):
        chains.update(li["chain_id"] for li in index["layers"])
        for diff_id, data in _layer_tars(a):
            with tarfile.open(fileobj=io.BytesIO(data)) as lt:
                members = lt.getmembers()
                payload = sum(m.size for m in members if m.isreg())
                contents.update(hashlib.sha256(lt.extractfile(m).read()).digest() for m in members if m.isreg())
            diffs[diff_id] = (len(data), len(members), payload)
            logical += len(data)
            logical_files += payload

    assert (s["images"], s["tags"], s["layers"], s["diffs"]) == (3, 3, len(chains), len(diffs))
    assert s["logical_bytes"] == logical == sum(li["layer_tar_size"] for i in (SAMPLE, SAMPLE2, OPAQUE)
                                                for li in i["layers"])
    assert s["logical_file_bytes"] == logical_files
    assert s["tar_bytes"] == sum(v[0] for v in diffs.values())
    assert s["entries"] == sum(v[1] for v in diffs.values())
    assert s["file_bytes"] == sum(v[2] for v in diffs.values())
    assert s["contents"] == len(contents)
    assert s["aufs_entries"] == 0
    # The framing is each tar minus its file payloads, one length-prefixed record per entry plus the end.
    assert s["framing_bytes"] == s["tar_bytes"] - s["file_bytes"] + 4 * (s["entries"] + s["diffs"])
    assert 0 < s["framing_stored_bytes"] < s["framing_bytes"]
    assert s["framing_share"] == round(s["framing_stored_bytes"] / s["content_stored_bytes"], 4)
    assert s["framing_share"] < 0.03  # the target
    assert s["stored_bytes"] >= s["content_stored_bytes"] + s["framing_stored_bytes"] - 1
    assert s["dedup_ratio"] > 1  # the shared base layer is stored once

    r = run_cli("stats", db_path=p)
    assert r.exit_code == 0 and "framing share" in r.stdout and "dedup ratio" in r.stdout
