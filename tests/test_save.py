"""`layerdb save`: archives that other tools load, with layer tars byte-identical to the imported ones.

Every check is independent of layerdb's own reading code: layer digests are
hashed from the saved archive with tarfile/gzip/hashlib, skopeo and umoci read
the archives, and views of a re-import are compared with the oracle manifests.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import (REPO_FIXTURES, SHARED_FIXTURES, export_bytes, manifest_of_dir, manifest_of_tar_bytes,
                      oracle_lines, oracle_positions, run_cli)

SKOPEO = shutil.which("skopeo")
UMOCI = shutil.which("umoci")
needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed (.ci/run installs it)")
needs_umoci = pytest.mark.skipif(UMOCI is None, reason="umoci is not installed (.ci/run installs it)")

SAMPLE = REPO_FIXTURES / "images" / "sample.oci.tar"
SAMPLE2 = REPO_FIXTURES / "images" / "sample2.oci.tar"


def _archives():
    out = [(REPO_FIXTURES, a) for a in sorted((REPO_FIXTURES / "images").glob("*.tar"))]
    if (SHARED_FIXTURES / "images").is_dir():
        out += [(SHARED_FIXTURES, a) for a in sorted((SHARED_FIXTURES / "images").glob("*.tar"))]
    return [pytest.param(root, a, id=a.name) for root, a in out]


ARCHIVES = _archives()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _sha_stream(f, gunzip: bool = False) -> tuple[str, int]:
    if gunzip:
        f = gzip.GzipFile(fileobj=f)
    h = hashlib.sha256()
    n = 0
    while True:
        b = f.read(1 << 20)
        if not b:
            return "sha256:" + h.hexdigest(), n
        h.update(b)
        n += len(b)


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, cwd=cwd, timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"{' '.join(argv)} failed:\n{p.stderr.decode(errors='replace')}"
    return p


def _oracle(root: Path, image_id: str, top_chain: str | None, archive: Path) -> tuple[Path, dict]:
    """The oracle dir of an image: by its top chain id, else (no layer list in the index) by archive name."""
    for index_file in sorted((root / "oracle").glob("*/index.json")):
        index = json.loads(index_file.read_text())
        layers = index.get("layers") or []
        if layers and layers[-1]["chain_id"] == top_chain:
            return index_file.parent, index
    d = root / "oracle" / archive.name.split(".")[0]
    return d, json.loads((d / "index.json").read_text())


def _umoci_agrees(index: dict) -> bool:
    """Whether the oracle says umoci unpacks this image to the oracle's views."""
    return bool((index.get("umoci_top_check") or {}).get("identical")
                or (index.get("checks") or {}).get("umoci_all_positions", {}).get("identical")
                or "umoci" in str(index.get("oracle", "")) or "umoci_views" in index)


def _import(tmp_path: Path, name: str, archive: Path):
    from layerdb.engine.api import LayerDB

    db = LayerDB(tmp_path / name)
    return db, [img["id"] for img in db.import_archive(str(archive)).images]


def _save(db_path: Path, ids: list[str], out: Path, *extra: str) -> None:
    r = run_cli("save", *ids, "-o", str(out), *extra, db_path=db_path)
    assert r.exit_code == 0, r.output
    assert r.stdout == ""


def _check_docker_archive(path: Path, ids: list[str]) -> list[dict]:
    """Hash everything in a docker-save archive independently; returns its manifest."""
    with tarfile.open(path) as t:
        names = t.getnames()
        assert len(names) == len(set(names)), "a member is written twice"
        manifest = json.load(t.extractfile("manifest.json"))
        assert isinstance(json.load(t.extractfile("repositories")), dict)
        assert len(manifest) == len(ids)
        diff_ids_seen: set[str] = set()
        for entry, image_id in zip(manifest, ids):
            config = t.extractfile(entry["Config"]).read()
            assert _sha(config) == image_id
            assert entry["Config"] == image_id.split(":")[1] + ".json"
            diff_ids = json.loads(config)["rootfs"]["diff_ids"]
            assert len(entry["Layers"]) == len(diff_ids)
            for name, diff_id in zip(entry["Layers"], diff_ids):
                m = t.getmember(name)
                got, n = _sha_stream(t.extractfile(m))
                assert got == diff_id, f"{name}: saved layer tar is not byte-identical to the imported one"
                assert n == m.size
                diff_ids_seen.add(diff_id)
        layer_members = [n for n in names if n.endswith(".tar")]
        assert len(layer_members) == len(diff_ids_seen), "a shared layer is stored more than once"
    return manifest


def _check_oci_archive(path: Path, ids: list[str]) -> dict:
    """Check every descriptor of an OCI layout tar by hand; returns {image id: ref names}."""
    refs: dict[str, list[str]] = {}
    with tarfile.open(path) as t:
        names = t.getnames()
        assert len(names) == len(set(names))
        assert json.load(t.extractfile("oci-layout")) == {"imageLayoutVersion": "1.0.0"}
        index = json.load(t.extractfile("index.json"))
        assert index["schemaVersion"] == 2

        def blob(desc) -> bytes:
            data = t.extractfile("blobs/sha256/" + desc["digest"].split(":")[1]).read()
            assert _sha(data) == desc["digest"] and len(data) == desc["size"]
            return data

        for desc in index["manifests"]:
            assert desc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
            manifest = json.loads(blob(desc))
            assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
            config = blob(manifest["config"])
            image_id = _sha(config)
            refs.setdefault(image_id, [])
            if "annotations" in desc:
                refs[image_id].append(desc["annotations"]["org.opencontainers.image.ref.name"])
            diff_ids = json.loads(config)["rootfs"]["diff_ids"]
            assert len(manifest["layers"]) == len(diff_ids)
            for layer, diff_id in zip(manifest["layers"], diff_ids):
                assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
                m = t.getmember("blobs/sha256/" + layer["digest"].split(":")[1])
                assert m.size == layer["size"]
                assert _sha_stream(t.extractfile(m))[0] == layer["digest"]
                assert _sha_stream(t.extractfile(m), gunzip=True)[0] == diff_id
    assert sorted(refs) == sorted(ids)
    return refs


def _check_views(db, root: Path, archive: Path, image_id: str, tmp_path: Path) -> None:
    r = db.resolve(image_id)
    oracle_dir, _ = _oracle(root, image_id, r.chain_id, archive)
    positions = oracle_positions(oracle_dir)
    top = max(positions)
    assert r.position == top
    for pos in positions:
        got = manifest_of_tar_bytes(export_bytes(db, f"{image_id}~{top - pos}"), tmp_path)
        assert got == oracle_lines(oracle_dir, pos), f"{archive.name}: position {pos} of the re-import differs"


# Every fixture archive -------------------------------------------------------------


@pytest.mark.parametrize("root,archive", ARCHIVES)
def test_save_docker_archive_round_trip(root, archive, tmp_path):
    db, ids = _import(tmp_path, "a.sqlite", archive)
    diff_ids = [r[0] for r in db.store.execute("SELECT diff_id FROM diff ORDER BY id")]
    db.close()
    out = tmp_path / "saved.tar"
    _save(tmp_path / "a.sqlite", ids, out)
    manifest = _check_docker_archive(out, ids)
    assert {n.split(".")[0] for e in manifest for n in e["Layers"]} == {d.split(":")[1] for d in diff_ids}

    if SKOPEO:
        for i, image_id in enumerate(ids):
            src = f"docker-archive:{out}" + (f":@{i}" if len(ids) > 1 else "")
            config = _run("skopeo", "inspect", "--config", "--raw", src).stdout
            assert _sha(config) == image_id
            _run("skopeo", "copy", "-q", src, f"oci:{tmp_path / 'copy'}:img{i}")

    fresh, ids2 = _import(tmp_path, "b.sqlite", out)
    try:
        assert ids2 == ids
        for image_id in ids:
            _check_views(fresh, root, archive, image_id, tmp_path)
    finally:
        fresh.close()


@pytest.mark.parametrize("root,archive", ARCHIVES)
def test_save_oci_archive(root, archive, tmp_path):
    db, ids = _import(tmp_path, "a.sqlite", archive)
    tags = {i: db.resolve(i).tags for i in ids}
    oracles = {i: _oracle(root, i, db.resolve(i).chain_id, archive) for i in ids}
    db.close()
    out = tmp_path / "saved-oci.tar"
    _save(tmp_path / "a.sqlite", ids, out, "--format", "oci")
    refs = _check_oci_archive(out, ids)
    assert refs == tags

    layout = tmp_path / "layout"
    layout.mkdir()
    with tarfile.open(out) as t:
        t.extractall(layout, filter="data")
    for i, image_id in enumerate(ids):
        ref = refs[image_id][0] if refs[image_id] else None
        if SKOPEO:
            src = f"oci-archive:{out}" + (f":{ref}" if ref and len(ids) > 1 else "")
            if len(ids) > 1 and ref is None:
                continue  # skopeo names an image of a several-image layout only by its ref
            assert _sha(_run("skopeo", "inspect", "--config", "--raw", src).stdout) == image_id
            _run("skopeo", "copy", "-q", src, f"oci:{tmp_path / 'copy'}:img{i}")
        if UMOCI and ref is not None:
            _run("umoci", "stat", "--image", f"{layout}:{ref}")
            bundle = tmp_path / f"bundle{i}"
            root_user = os.geteuid() == 0
            _run("umoci", "unpack", *([] if root_user else ["--rootless"]), "--image", f"{layout}:{ref}", str(bundle))
            oracle_dir, index = oracles[image_id]
            if root_user and _umoci_agrees(index):
                assert manifest_of_dir(bundle / "rootfs") == oracle_lines(oracle_dir, max(oracle_positions(oracle_dir)))

    fresh, ids2 = _import(tmp_path, "b.sqlite", out)
    try:
        assert sorted(ids2) == sorted(ids)
    finally:
        fresh.close()


# Several images, streams, errors ----------------------------------------------------


@pytest.fixture
def two_images(tmp_path):
    """sample and sample2: they share their bottom layer."""
    from layerdb.engine.api import LayerDB

    p = tmp_path / "two.sqlite"
    with LayerDB(p) as db:
        ids = [db.import_archive(str(a)).images[0]["id"] for a in (SAMPLE, SAMPLE2)]
    return p, ids


def test_several_images_share_layers(two_images, tmp_path):
    p, ids = two_images
    out = tmp_path / "two.tar"
    _save(p, ["sample:1.0", "sample2:1.0"], out)
    manifest = _check_docker_archive(out, ids)
    assert [e["RepoTags"] for e in manifest] == [["sample:1.0"], ["sample2:1.0"]]
    assert manifest[0]["Layers"][0] == manifest[1]["Layers"][0]
    with tarfile.open(out) as t:
        assert len([n for n in t.getnames() if n.endswith(".tar")]) == 6 + 3 - 1
    if SKOPEO:
        for tag, image_id in zip(["sample:1.0", "sample2:1.0"], ids):
            assert _sha(_run("skopeo", "inspect", "--config", "--raw", f"docker-archive:{out}:{tag}").stdout) == image_id

    oci = tmp_path / "two-oci.tar"
    _save(p, ["sample:1.0", "sample2:1.0"], oci, "--format", "oci")
    assert _check_oci_archive(oci, ids) == {ids[0]: ["sample:1.0"], ids[1]: ["sample2:1.0"]}
    with tarfile.open(oci) as t:
        blobs = [n for n in t.getnames() if n.startswith("blobs/")]
    assert len(blobs) == (6 + 3 - 1) + 2 + 2  # layers once, two configs, two manifests


def test_same_image_twice_is_written_once(two_images, tmp_path):
    p, ids = two_images
    out = tmp_path / "once.tar"
    _save(p, ["sample:1.0", ids[0]], out)
    assert len(_check_docker_archive(out, ids[:1])) == 1


def test_save_to_stdout(two_images, tmp_path):
    p, ids = two_images
    r = run_cli("save", "sample2:1.0", "-o", "-", db_path=p)
    assert r.exit_code == 0
    out = tmp_path / "stdout.tar"
    out.write_bytes(r.stdout_bytes)
    _check_docker_archive(out, ids[1:])


def test_save_refuses_layers_and_unknown_images(two_images, tmp_path):
    p, ids = two_images
    out = tmp_path / "x.tar"
    for ref, code in (("sample:1.0~1", 2), ("nosuch:1", 5)):
        r = run_cli("save", ref, "-o", str(out), db_path=p)
        assert r.exit_code == code, r.output
        assert r.stderr.startswith("layerdb: error: ") and r.stderr.count("\n") == 1
        assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".layerdb-")]


def test_damaged_store_leaves_no_archive(two_images, tmp_path):
    """A layer that no longer hashes to its diff_id stops the save; the old file stays as it was."""
    import apsw

    from layerdb.engine import chunks

    p, ids = two_images
    conn = apsw.Connection(str(p))
    # A chunk of sample2's top layer's content: rewrite it so it still decodes but holds other bytes.
    sha, size, codec, data, offset = conn.execute(
        """SELECT c.sha256, c.size, c.codec, c.data, b.offset FROM chunk c JOIN blob b ON b.chunk = c.sha256
           JOIN event e ON e.blob_id = b.id JOIN path pa ON pa.id = e.path_id
           WHERE pa.path = CAST('srv/data/n' AS BLOB)""").fetchone()
    raw = bytearray(chunks.decode(codec, data, size))
    raw[offset] ^= 0xFF
    conn.execute("UPDATE chunk SET codec = ?, data = ? WHERE sha256 = ?", (*chunks.encode(bytes(raw)), sha))
    conn.close()

    out = tmp_path / "keep.tar"
    out.write_bytes(b"previous contents")
    r = run_cli("save", "sample2:1.0", "-o", str(out), db_path=p)
    assert r.exit_code == 6
    top_diff = json.loads((REPO_FIXTURES / "oracle" / "sample2" / "index.json").read_text())["layers"][2]["diff_id"]
    assert top_diff in r.stderr and r.stderr.count("\n") == 1
    assert out.read_bytes() == b"previous contents"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".layerdb-")]
