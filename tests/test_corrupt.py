"""Bad input to `layerdb import`: damaged, truncated, inconsistent or absent archives.

Each damaged archive is derived from one of the repo's real fixture archives
(tests/fixtures/images) by rewriting members with tests/archive_tools.py;
every member a case does not touch is copied byte for byte.

Every case follows one protocol (`check_rejected`):

1. import a good archive into a fresh store, so the store is not empty;
2. take a full logical dump of the store (schema, user_version, every row of
   every table, sorted);
3. run `python -m layerdb.cli --db S import DAMAGED` in a subprocess and
   require: a non-zero exit code, nothing on stdout, and on stderr exactly one
   non-empty line "layerdb: error: ..." that says what is wrong, no traceback;
4. require the dump to be unchanged, no stray files next to the store, that a
   re-import of the good archive still works and changes nothing, and that the
   pristine archive the damaged one came from imports afterwards.

Where the baseline matters, a case runs twice: with an *unrelated* image
stored first ("other": the damaged layers are new, so the importer writes rows
before it fails and must roll them back) and with the *pristine* source image
stored first ("same": the layers are known, so the importer takes its
verify-only path for them).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable

import apsw
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from archive_tools import ArchiveEditor, flip_byte, sha256_digest  # noqa: E402

IMAGES = Path(__file__).parent / "fixtures" / "images"
# A good archive that shares no layer with the image a damaged archive comes from.
UNRELATED = {"opaque": "sample.oci.tar", "sample": "opaque.oci.tar"}
BASELINES = ["other", "same"]

Edit = Callable[[ArchiveEditor], None]


# Running the CLI ------------------------------------------------------------------


def cli_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.pop("LAYERDB_DB", None)
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")  # never the user's store
    return env


def cli(tmp_path: Path, db: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "layerdb.cli", "--db", str(db), *args],
        capture_output=True,
        env=cli_env(tmp_path),
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def import_ok(tmp_path: Path, db: Path, archive: Path) -> subprocess.CompletedProcess:
    p = cli(tmp_path, db, "import", str(archive))
    assert p.returncode == 0, f"import of good archive {archive.name} failed: {p.stderr.decode(errors='replace')}"
    assert b"Loaded image" in p.stdout, p.stdout
    assert b"Traceback" not in p.stderr, p.stderr.decode(errors="replace")
    return p


def error_line(p: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command; asserts the error contract."""
    err = p.stderr.decode("utf-8", errors="replace")
    assert p.returncode != 0, f"exit code 0 for bad input; stdout={p.stdout!r} stderr={err!r}"
    assert "Traceback" not in err, err
    assert p.stdout == b"", f"stdout not empty: {p.stdout!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr is not exactly one line: {err!r}"
    line = lines[0]
    assert line.startswith("layerdb: error:"), line
    assert line[len("layerdb: error:") :].strip(), f"empty error message: {line!r}"
    return line


def assert_says(line: str, *patterns: str) -> None:
    for pat in patterns:
        assert re.search(pat, line), f"error line {line!r} does not match {pat!r}"


# Store snapshots ----------------------------------------------------------------------


def _row_key(row: tuple) -> list:
    return [(v is None, type(v).__name__, 0 if v is None else v) for v in row]


def store_dump(db: Path) -> dict:
    """A full logical dump: user_version, the schema, every row of every table, sorted."""
    conn = apsw.Connection(str(db))
    try:
        schema = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY type, name"
        ).fetchall()
        tables = [name for typ, name, _, _ in schema if typ == "table"]
        rows = {}
        for name in tables:
            rows[name] = sorted(conn.execute(f'SELECT * FROM "{name}"').fetchall(), key=_row_key)
        return {
            "user_version": conn.execute("PRAGMA user_version").fetchone()[0],
            "tables": tables,
            "schema": schema,
            "rows": rows,
        }
    finally:
        conn.close()


def checkpoint(db: Path) -> tuple[int, int]:
    """Fold the WAL into the main file; returns (page_count, file size)."""
    conn = apsw.Connection(str(db))
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0, "checkpoint blocked: a layerdb process still holds the store"
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    finally:
        conn.close()
    return pages, db.stat().st_size


def store_files(tmp_path: Path) -> set[str]:
    """Files next to the store, without SQLite's own -wal/-shm."""
    return {p.name for p in tmp_path.iterdir() if p.name.startswith("s.db") and not p.name.endswith(("-wal", "-shm"))}


# The protocol -----------------------------------------------------------------------


def derive(tmp_path: Path, source: str, edit: Edit, name: str = "damaged.tar") -> Path:
    ed = ArchiveEditor(IMAGES / source)
    edit(ed)
    out = tmp_path / "in" / name
    out.parent.mkdir(exist_ok=True)
    ed.write(out)
    assert out.read_bytes() != (IMAGES / source).read_bytes(), "the edit changed nothing"
    return out


def baseline_archive(source: str, baseline: str) -> Path:
    if baseline == "same":
        return IMAGES / source
    return IMAGES / UNRELATED[source.split(".")[0]]


def check_rejected(tmp_path: Path, bad: Path | str, *, good: Path, pristine: Path | None, expect: tuple[str, ...]) -> str:
    db = tmp_path / "s.db"
    import_ok(tmp_path, db, good)
    before = store_dump(db)
    assert before["rows"]["image"], "baseline import stored no image"
    files = store_files(tmp_path)

    line = error_line(cli(tmp_path, db, "import", str(bad)))
    assert_says(line, *expect)

    assert store_dump(db) == before, "a failed import changed the store"
    assert store_files(tmp_path) == files, "a failed import left files next to the store"
    import_ok(tmp_path, db, good)
    assert store_dump(db) == before, "re-importing the good archive changed the store"
    if pristine is not None and pristine != good:
        import_ok(tmp_path, db, pristine)
    return line


def reject(tmp_path, source: str, baseline: str, edit: Edit, *expect: str) -> str:
    bad = derive(tmp_path, source, edit)
    return check_rejected(
        tmp_path, bad, good=baseline_archive(source, baseline), pristine=IMAGES / source, expect=expect
    )


def names_layer(n: int, member: str) -> str:
    """The message must say which layer: its position or its blob's name/digest."""
    hex_ = re.search(r"[0-9a-f]{64}", member)
    alts = [rf"layer {n}\b"] + ([hex_.group(0)[:12]] if hex_ else [re.escape(member)])
    return "|".join(alts)


# Flipped bytes in compressed layers (OCI, gzip) ---------------------------------------------


def _gzip_offset(where: str, blob: bytes) -> int:
    return {"middle": len(blob) // 2, "header-mtime": 4, "crc32": len(blob) - 8, "isize": len(blob) - 2}[where]


GZIP_FLIPS = [
    # (archive, layer index, where): "middle" of the deflate data must be caught by the
    # decompressor or a digest; "header-mtime" changes nothing but the blob digest;
    # "crc32"/"isize" are gzip's own trailer checks.
    ("opaque.oci.tar", 0, "middle"),
    ("opaque.oci.tar", 1, "middle"),
    ("opaque.oci.tar", 2, "middle"),
    ("sample.oci.tar", 0, "middle"),  # the 1 MB busybox layer
    ("opaque.oci.tar", 1, "header-mtime"),
    ("opaque.oci.tar", 2, "crc32"),
    ("opaque.oci.tar", 2, "isize"),
]


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("source,idx,where", GZIP_FLIPS, ids=[f"{s.split('.')[0]}-L{i + 1}-{w}" for s, i, w in GZIP_FLIPS])
def test_flipped_byte_in_gzip_layer(tmp_path, source, idx, where, baseline):
    member = ArchiveEditor(IMAGES / source).layer_names()[idx]

    def edit(ed):
        blob = ed.read(member)
        assert blob[:2] == b"\x1f\x8b"
        ed.set(member, flip_byte(blob, _gzip_offset(where, blob)))

    expect = [names_layer(idx + 1, member)]
    if where == "header-mtime":
        # Decompresses to the very same tar: only the blob digest can tell.
        expect.append(r"digest mismatch")
    else:
        expect.append(r"digest mismatch|corrupt|gzip")
    reject(tmp_path, source, baseline, edit, *expect)


def test_gzip_header_flip_still_decompresses_to_same_tar():
    """Guards the premise of the header-mtime case above."""
    ed = ArchiveEditor(IMAGES / "opaque.oci.tar")
    blob = ed.read(ed.layer_names()[1])
    assert gzip.decompress(flip_byte(blob, 4)) == gzip.decompress(blob)


def test_recompressed_gzip_layer_has_wrong_blob_digest(tmp_path):
    """Same tar, different gzip bytes under the old blob name: only the blob digest catches it."""
    source = "opaque.oci.tar"
    member = ArchiveEditor(IMAGES / source).layer_names()[2]

    def edit(ed):
        tar = gzip.decompress(ed.read(member))
        ed.set(member, gzip.compress(tar, compresslevel=1, mtime=12345))

    reject(tmp_path, source, "other", edit, names_layer(3, member), r"digest mismatch")


# Flipped bytes in uncompressed layers (docker save) ----------------------------------------


def _tar_offset(where: str, layer: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
        members = tf.getmembers()
        if where == "file-data":
            m = next(m for m in members if m.isfile() and m.size >= 2)
            return m.offset_data + m.size // 2
        if where == "header-name":
            return members[-1].offset + 1  # a name byte of the last header (checksummed)
        if where == "end-padding":
            return len(layer) - 1  # inside the end-of-archive zero blocks
    raise AssertionError(where)


DOCKER_FLIPS = [
    ("opaque.docker.tar", 0, "file-data"),
    ("opaque.docker.tar", 2, "file-data"),
    ("sample.docker.tar", 1, "file-data"),  # buildah: <v1id>/layer.tar is a symlink member
    ("sample.docker.tar", 0, "file-data"),  # the busybox binary
    ("opaque.docker.tar", 1, "end-padding"),
    ("opaque.docker.tar", 1, "header-name"),
]


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize(
    "source,idx,where", DOCKER_FLIPS, ids=[f"{s.split('.')[0]}-L{i + 1}-{w}" for s, i, w in DOCKER_FLIPS]
)
def test_flipped_byte_in_uncompressed_docker_layer(tmp_path, source, idx, where, baseline):
    member = ArchiveEditor(IMAGES / source).layer_names()[idx]

    def edit(ed):
        layer = ed.read(member)
        ed.set(member, flip_byte(layer, _tar_offset(where, layer)))

    expect = [names_layer(idx + 1, member)]
    if where == "header-name":
        expect.append(r"checksum|digest mismatch")
    else:
        expect.append(r"diff_id.*digest mismatch|digest mismatch.*diff_id")
    reject(tmp_path, source, baseline, edit, *expect)


# Truncated layers ------------------------------------------------------------------------

TRUNCATIONS = [
    ("opaque.oci.tar", 0),  # gzip
    ("opaque.oci.tar", 2),
    ("sample.oci.tar", 0),  # gzip, 1 MB
    ("opaque.oci-zstd.tar", 0),  # zstd
    ("opaque.oci-zstd.tar", 2),
    ("opaque.docker.tar", 0),  # uncompressed tar
    ("sample.docker.tar", 0),
]


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("source,idx", TRUNCATIONS, ids=[f"{s.split('.', 1)[1][:-4]}-{s.split('.')[0]}-L{i + 1}" for s, i in TRUNCATIONS])
def test_truncated_layer(tmp_path, source, idx, baseline):
    """The layer blob cut in half; nothing else fixed (its digests still name the whole blob)."""
    member = ArchiveEditor(IMAGES / source).layer_names()[idx]

    def edit(ed):
        blob = ed.read(member)
        ed.set(member, blob[: len(blob) // 2])

    if source.endswith(".docker.tar"):
        # An uncompressed tar cut at a header boundary is a shorter valid tar, and the
        # verify-only path ("same") does not parse: the diff_id is what catches it.
        expect = r"truncated|diff_id.*digest mismatch"
    else:
        expect = r"truncated"  # the decompressor knows its stream ended early
    reject(tmp_path, source, baseline, edit, names_layer(idx + 1, member), expect)


# Configs whose diff_ids lie -------------------------------------------------------------------


def _rewrite_config(change: Callable[[dict], None]) -> Edit:
    def edit(ed):
        cfg = ed.read_json(ed.config_name())
        change(cfg)
        ed.replace_config(json.dumps(cfg, separators=(",", ":")).encode())

    return edit


CONFIG_ARCHIVES = ["opaque.oci.tar", "opaque.oci-zstd.tar", "opaque.docker.tar", "sample.docker.tar", "sample.oci.tar"]


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("wrong", ["bogus", "other-layer"])
@pytest.mark.parametrize("source", CONFIG_ARCHIVES, ids=lambda s: s[:-4])
def test_config_with_one_wrong_diff_id(tmp_path, source, wrong, baseline):
    """The config and every digest naming it are consistent: only the diff_id check can catch it.

    "bogus": a digest of nothing stored; "other-layer": the diff_id of the
    image's own first layer, which the store knows, so the importer takes its
    verify-only path for the last layer.
    """
    n = len(ArchiveEditor(IMAGES / source).layer_names())

    def change(cfg):
        ids = cfg["rootfs"]["diff_ids"]
        ids[-1] = sha256_digest(b"not this layer") if wrong == "bogus" else ids[0]

    line = reject(tmp_path, source, baseline, _rewrite_config(change), r"diff_id", r"digest mismatch")
    assert re.search(rf"layer {n}\b", line) or ArchiveEditor(IMAGES / source).layer_names()[-1][:12] in line, line


def test_config_rewrite_keeps_every_other_digest_consistent(tmp_path):
    """Guards the premise above: the rewritten archives are self-consistent but for the diff_id."""
    for source in CONFIG_ARCHIVES:
        ed = ArchiveEditor(IMAGES / source)
        _rewrite_config(lambda cfg: cfg["rootfs"]["diff_ids"].__setitem__(-1, sha256_digest(b"x")))(ed)
        ed.write(tmp_path / "x.tar")
        ed = ArchiveEditor(tmp_path / "x.tar")
        cfg_name = ed.config_name()
        cfg_raw = ed.read(cfg_name)
        assert sha256_digest(cfg_raw).split(":")[1] in cfg_name
        if ed.kind == "oci":
            desc = ed.read_json("index.json")["manifests"][0]
            mani = ed.read(ed.oci_manifest_name())
            assert sha256_digest(mani) == desc["digest"] and len(mani) == desc["size"]
            mdesc = json.loads(mani)["config"]
            assert mdesc["digest"] == sha256_digest(cfg_raw) and mdesc["size"] == len(cfg_raw)
            for name, d in zip(ed.layer_names(), json.loads(mani)["layers"]):
                assert sha256_digest(ed.read(name)) == d["digest"]
        assert json.loads(cfg_raw)["rootfs"]["diff_ids"][-1] == sha256_digest(b"x")


@pytest.mark.parametrize("delta", [+1, -1], ids=["one-more", "one-fewer"])
@pytest.mark.parametrize("source", ["opaque.oci.tar", "opaque.docker.tar", "sample.docker.tar"], ids=lambda s: s[:-4])
def test_config_diff_id_count_differs_from_manifest_layers(tmp_path, source, delta):
    n = len(ArchiveEditor(IMAGES / source).layer_names())

    def change(cfg):
        ids = cfg["rootfs"]["diff_ids"]
        if delta > 0:
            ids.append(sha256_digest(b"an extra layer"))
        else:
            ids.pop()

    reject(tmp_path, source, "other", _rewrite_config(change), r"diff_id", rf"\b{n + delta}\b", rf"\b{n}\b")


# Missing members ------------------------------------------------------------------------------

MISSING = [
    ("opaque.oci.tar", "layer", 1),
    ("opaque.oci-zstd.tar", "layer", 2),
    ("opaque.docker.tar", "layer", 1),  # <v1id>/layer.tar deleted
    ("sample.docker.tar", "layer", 1),  # <diff>.tar deleted; <v1id>/layer.tar dangles
    ("opaque.oci.tar", "config", None),
    ("opaque.docker.tar", "config", None),
    ("opaque.oci.tar", "manifest", None),
    ("opaque.oci.tar", "oci-layout", None),
    ("opaque.oci.tar", "index.json", None),
    ("opaque.docker.tar", "manifest.json", None),
]


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize(
    "source,what,idx", MISSING, ids=[f"{s[:-4]}-{w}{'' if i is None else i + 1}" for s, w, i in MISSING]
)
def test_missing_member(tmp_path, source, what, idx, baseline):
    probe = ArchiveEditor(IMAGES / source)
    member = {
        "layer": lambda: probe.layer_names()[idx] if idx is not None else None,
        "config": probe.config_name,
        "manifest": lambda: probe.oci_manifest_name() if probe.kind == "oci" else "manifest.json",
    }.get(what, lambda: what)()

    expect = [r"missing|no such|not found|not an image archive"]
    if what == "layer":
        expect.append(names_layer(idx + 1, member))
        expect.append(r"missing")
    elif what in ("config", "manifest"):
        expect += [r"missing", re.escape(member.rsplit("/", 1)[-1][:12])]
    reject(tmp_path, source, baseline, lambda ed: ed.delete(member), *expect)


# Garbage manifests and indexes ---------------------------------------------------------------

GOOD_DOCKER_MANIFEST = json.loads(ArchiveEditor(IMAGES / "opaque.docker.tar").read("manifest.json"))

MANIFEST_JSON = {
    "garbage": (b"this is not JSON {", [r"manifest\.json", r"not valid JSON"]),
    "half": (json.dumps(GOOD_DOCKER_MANIFEST).encode()[:100], [r"manifest\.json", r"not valid JSON"]),
    "binary": (b"\xff\xfe\x00garbage\x00", [r"manifest\.json", r"not valid JSON"]),
    "empty-file": (b"", [r"manifest\.json", r"not valid JSON|empty"]),
    "empty-list": (b"[]", [r"manifest\.json", r"empty|no image"]),
    "object": (b"{}", [r"manifest\.json", r"list|no image"]),
    "null": (b"null", [r"manifest\.json", r"list|no image"]),
    "no-layers-key": (
        json.dumps([{k: v for k, v in GOOD_DOCKER_MANIFEST[0].items() if k != "Layers"}]).encode(),
        [r"manifest\.json", r"Layers|layers"],
    ),
    "layers-empty": (
        json.dumps([{**GOOD_DOCKER_MANIFEST[0], "Layers": []}]).encode(),
        [r"\b0 layers|no layers", r"diff_ids|layers"],
    ),
    "layers-not-strings": (
        json.dumps([{**GOOD_DOCKER_MANIFEST[0], "Layers": [1, 2, 3]}]).encode(),
        [r"manifest\.json", r"Layers|layers"],
    ),
    "no-config": (
        json.dumps([{k: v for k, v in GOOD_DOCKER_MANIFEST[0].items() if k != "Config"}]).encode(),
        [r"manifest\.json", r"Config|config"],
    ),
}


@pytest.mark.parametrize("case", list(MANIFEST_JSON))
def test_docker_manifest_json_bad(tmp_path, case):
    data, expect = MANIFEST_JSON[case]
    reject(tmp_path, "opaque.docker.tar", "other", lambda ed: ed.set("manifest.json", data), *expect)


INDEX_JSON = {
    "garbage": (b"<html>not json</html>", [r"index\.json", r"not valid JSON"]),
    "half": (ArchiveEditor(IMAGES / "opaque.oci.tar").read("index.json")[:50], [r"index\.json", r"not valid JSON"]),
    "empty-file": (b"", [r"index\.json", r"not valid JSON|empty"]),
    "list": (b"[]", [r"index\.json", r"manifests|not an image index"]),
    "no-manifests": (b'{"schemaVersion":2}', [r"index\.json", r"manifests|not an image index"]),
    "empty-manifests": (b'{"schemaVersion":2,"manifests":[]}', [r"index\.json", r"no image"]),
}


@pytest.mark.parametrize("case", list(INDEX_JSON))
def test_oci_index_json_bad(tmp_path, case):
    data, expect = INDEX_JSON[case]
    reject(tmp_path, "opaque.oci.tar", "other", lambda ed: ed.set("index.json", data), *expect)


# Blobs whose content does not match their digest ---------------------------------------------


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("how", ["reformatted", "annotation-changed"])
def test_oci_manifest_blob_does_not_match_its_digest(tmp_path, how, baseline):
    """Still a valid manifest naming the same config and layers; only its digest is off."""

    def edit(ed):
        name = ed.oci_manifest_name()
        mani = ed.read_json(name)
        if how == "reformatted":
            new = json.dumps(mani, indent=2).encode()
        else:
            mani.setdefault("annotations", {})["org.example.tampered"] = "yes"
            new = json.dumps(mani, separators=(",", ":")).encode()
        ed.set(name, new)

    member = ArchiveEditor(IMAGES / "opaque.oci.tar").oci_manifest_name()
    reject(tmp_path, "opaque.oci.tar", baseline, edit, r"manifest", r"digest mismatch", member[-64:][:12])


@pytest.mark.parametrize("baseline", BASELINES)
@pytest.mark.parametrize("source", ["opaque.oci.tar", "opaque.docker.tar", "sample.docker.tar"], ids=lambda s: s[:-4])
def test_config_blob_does_not_match_its_digest(tmp_path, source, baseline):
    """A config changed in place under its old name (the digest its name and the manifest give)."""

    def edit(ed):
        name = ed.config_name()
        cfg = ed.read_json(name)
        cfg["rootfs"]["diff_ids"][-1] = sha256_digest(b"not this layer")
        ed.set(name, json.dumps(cfg, separators=(",", ":")).encode())

    cfg_hex = ArchiveEditor(IMAGES / source).config_name().rsplit("/", 1)[-1][:12]
    reject(tmp_path, source, baseline, edit, r"config", r"digest mismatch", cfg_hex)


# Several images in one archive: all or nothing ----------------------------------------------


def _two_image_docker_archive(damage_second: bool) -> Edit:
    """opaque.docker.tar plus the sample image (config and layer tars) in one manifest.json.

    The opaque image comes first and is good; with damage_second, one byte of
    sample's 2nd layer is flipped, so the import fails after the first image
    (and sample's first layer) went into the transaction.
    """

    def edit(ed):
        other = ArchiveEditor(IMAGES / "sample.docker.tar")
        (ent,) = other.read_json("manifest.json")
        for name in [ent["Config"], *ent["Layers"]]:
            data = other.read(name)
            if damage_second and name == ent["Layers"][1]:
                data = flip_byte(data, _tar_offset("file-data", data))
            ed.add(name, data, like="manifest.json")
        manifest = ed.read_json("manifest.json") + [ent]
        ed.set("manifest.json", json.dumps(manifest, separators=(",", ":")).encode())

    return edit


@pytest.mark.parametrize("baseline", ["sample2.oci.tar", "opaque.oci.tar"])
def test_multi_image_archive_is_all_or_nothing(tmp_path, baseline):
    """A damaged second image undoes the first: not one row of either is kept."""
    good_pair = derive(tmp_path, "opaque.docker.tar", _two_image_docker_archive(False), "pair.tar")
    bad_pair = derive(tmp_path, "opaque.docker.tar", _two_image_docker_archive(True), "bad-pair.tar")
    line = check_rejected(tmp_path, bad_pair, good=IMAGES / baseline, pristine=good_pair,
                          expect=(names_layer(2, "5cd12b15522ee250bba0f44f8a1171adfe100c0ae1a884870b56b47cc8ca03c1"),
                                  r"diff_id.*digest mismatch"))
    assert "5cd12b15522e" in line
    p = cli(tmp_path, tmp_path / "s.db", "images", "--json")
    tags = {t for row in p.stdout.decode().splitlines() for t in json.loads(row)["repo_tags"]}
    assert {"localhost/opaque:1.0", "localhost/sample:1.0"} <= tags, tags


# Not an archive at all --------------------------------------------------------------------------


def _make_input(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / "in" / f"{kind}.tar"
    p.parent.mkdir(exist_ok=True)
    if kind == "text":
        p.write_text("hello, I am not a tar archive\n" * 40)
    elif kind == "random":
        p.write_bytes(hashlib.sha256(b"seed").digest() * 400)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "zeros":  # a tar with no members: two zero blocks and padding
        p.write_bytes(b"\0" * 10240)
    elif kind == "tar-of-other-things":
        with tarfile.open(p, "w") as tf:
            data = b"just a file\n"
            ti = tarfile.TarInfo("hello.txt")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    elif kind == "gzipped-archive":  # `docker save | gzip`
        p.write_bytes(gzip.compress((IMAGES / "opaque.docker.tar").read_bytes(), mtime=0))
    elif kind == "half-archive":  # the outer tar cut in half
        data = (IMAGES / "opaque.docker.tar").read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "archive-cut-in-last-layer":
        ed = ArchiveEditor(IMAGES / "opaque.oci.tar")
        ed.write(p)
        data = p.read_bytes()
        with tarfile.open(p) as tf:
            m = tf.getmember(ed.layer_names()[-1])
        p.write_bytes(data[: m.offset_data + m.size // 2])
    elif kind == "missing":
        pass
    elif kind == "directory":
        p.mkdir()
    else:
        raise AssertionError(kind)
    return p


NOT_ARCHIVES = {
    "text": [r"not a tar|not an image archive"],
    "random": [r"not a tar|not an image archive"],
    "empty": [r"empty|not a tar|not an image archive"],
    "zeros": [r"not an image archive|empty"],
    "tar-of-other-things": [r"not an image archive"],
    "half-archive": [r"truncated|damaged|missing|unexpected end"],
    "archive-cut-in-last-layer": [r"truncated|damaged|missing|unexpected end"],
    "missing": [r"no such file|does not exist|not found"],
    "directory": [r"directory"],
}


@pytest.mark.parametrize("kind", list(NOT_ARCHIVES))
def test_not_an_archive(tmp_path, kind):
    bad = _make_input(tmp_path, kind)
    line = check_rejected(tmp_path, bad, good=IMAGES / "opaque.oci.tar", pristine=None, expect=tuple(NOT_ARCHIVES[kind]))
    assert bad.name in line, f"the message should name the file: {line!r}"


def test_gzipped_archive_imports_like_docker_load(tmp_path):
    """`docker save | gzip` archives are accepted, as `docker load` accepts them."""
    gz = _make_input(tmp_path, "gzipped-archive")
    db = tmp_path / "s.db"
    import_ok(tmp_path, db, gz)
    plain = tmp_path / "plain.db"
    import_ok(tmp_path, plain, IMAGES / "opaque.docker.tar")
    def ids(path):
        conn = apsw.Connection(str(path))
        try:
            return (conn.execute("SELECT digest, config FROM image ORDER BY digest").fetchall(),
                    conn.execute("SELECT diff_id, tar_size FROM diff ORDER BY diff_id").fetchall())
        finally:
            conn.close()

    assert ids(db) == ids(plain) and ids(db)[0]


# Importing twice changes nothing ------------------------------------------------------------------

ALL_ARCHIVES = sorted(p.name for p in IMAGES.glob("*.tar"))


@pytest.mark.parametrize("source", ALL_ARCHIVES, ids=lambda s: s[:-4])
def test_import_twice_changes_nothing(tmp_path, source):
    db = tmp_path / "s.db"
    import_ok(tmp_path, db, IMAGES / source)
    size1 = checkpoint(db)
    dump1 = store_dump(db)
    import_ok(tmp_path, db, IMAGES / source)
    size2 = checkpoint(db)
    assert store_dump(db) == dump1
    assert size2 == size1, f"(page_count, bytes) grew from {size1} to {size2}"


def test_import_all_twice_changes_nothing(tmp_path):
    db = tmp_path / "s.db"
    for source in ALL_ARCHIVES:
        import_ok(tmp_path, db, IMAGES / source)
    size1 = checkpoint(db)
    dump1 = store_dump(db)
    for source in reversed(ALL_ARCHIVES):
        import_ok(tmp_path, db, IMAGES / source)
    size2 = checkpoint(db)
    assert store_dump(db) == dump1
    assert size2 == size1, f"(page_count, bytes) grew from {size1} to {size2}"


@pytest.mark.parametrize("how", ["bad-header", "cut-in-header"])
def test_damaged_outer_tar_header_is_reported_as_damage(tmp_path, how):
    """tarfile stops listing quietly at a header it cannot read; the importer tells
    that from the end-of-archive blocks and says the archive is damaged, rather
    than that a member is missing."""
    src = IMAGES / "sample.docker.tar"
    with tarfile.open(src) as t:
        members = t.getmembers()
    at = members[len(members) // 2].offset
    data = bytearray(src.read_bytes())
    if how == "bad-header":
        data[at] ^= 0x20  # the name's first byte: the header checksum no longer matches
    else:
        del data[at + 300:]
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "layerdb.cli", "--db", str(tmp_path / "s.sqlite"), "import", str(bad)],
                       capture_output=True, text=True, env=cli_env(tmp_path))
    why = "bad tar header" if how == "bad-header" else "truncated tar header"
    assert r.returncode != 0
    assert r.stderr == f"layerdb: error: {bad}: damaged archive ({why} at offset {at})\n"
