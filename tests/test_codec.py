"""Every way a content is encoded on import, read back byte for byte.

The layer is made by GNU tar and gzip from a directory on disk, and that
directory is the oracle: small files of every kind (text, incompressible,
empty, already gzipped) filling more than one pack, and large files cut by
FastCDC across windows (incompressible ones stored raw, compressible ones
zstd).  Each setting the importer can run with writes a store that must read
back the same bytes, rebuild the layer tar whose sha256 is the diff_id, and
pass `fsck --deep`, also after `rm` and `gc` repacked it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import zstandard

from conftest import manifest_of_dir, manifest_of_tar_bytes, run_cli
from layerdb.engine import chunks, content

MiB = 1 << 20


def _text(rng: random.Random, n: int) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"delta", b"return", b"value", b"(", b")", b"\n", b"    "]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def make_tree(root: Path) -> None:
    rng = random.Random(16)
    for i in range(900):  # ~5.4 MiB of small files: more than one pack
        sub = root / "small" / f"d{i % 30}"
        sub.mkdir(parents=True, exist_ok=True)
        if i % 9 == 0:
            data = rng.randbytes(rng.randint(1, 40_000))  # incompressible
        elif i % 9 == 1:
            data = gzip.compress(_text(rng, 20_000), mtime=0)  # compressed already
        elif i % 9 == 2:
            data = b"\x7fELF" + rng.randbytes(16) + _text(rng, 6000)
        elif i % 9 == 3:
            data = b""
        else:
            data = _text(rng, rng.randint(100, 12_000))
        (sub / f"f{i}").write_bytes(data)
    big = root / "big"
    big.mkdir()
    # Large contents: FastCDC across several windows, incompressible (raw
    # chunks) and compressible (zstd), and the sizes at the edges.
    (big / "random.bin").write_bytes(random.Random(1).randbytes(9 * MiB + 12345))
    (big / "text.log").write_bytes(_text(random.Random(2), 11 * MiB + 7))
    (big / "window.bin").write_bytes(_text(random.Random(3), content.CDC_WINDOW))
    (big / "just-large").write_bytes(_text(random.Random(4), content.SMALL + 1))
    (big / "just-small").write_bytes(_text(random.Random(5), content.SMALL))
    # The same large content twice, and a near-copy: chunks shared.
    (big / "text-copy.log").write_bytes((big / "text.log").read_bytes())
    edited = bytearray((big / "text.log").read_bytes())
    edited[5 * MiB : 5 * MiB + 100] = b"x" * 100
    (big / "text-edited.log").write_bytes(bytes(edited))
    for p in root.rglob("*"):
        os.utime(p, (1_700_000_000, 1_700_000_000), follow_symlinks=False)


def oci_archive(layer_tgz: Path, diff_id: str, out: Path, name: str) -> None:
    """An OCI image layout around one gzip layer, tarred by GNU tar."""
    layout = out.with_suffix(".d")
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> tuple[str, int]:
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return "sha256:" + h, len(data)

    gz = layer_tgz.read_bytes()
    ldig, lsize = blob(gz)
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                      "history": [{"created_by": "COPY . /"}]}).encode()
    cdig, csize = blob(cfg)
    man = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdig,
                                 "size": csize},
                      "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ldig,
                                  "size": lsize}]}).encode()
    mdig, msize = blob(man)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdig, "size": msize,
         "annotations": {"io.containerd.image.name": name}}]}))
    subprocess.run(["tar", "-cf", str(out), "-C", str(layout), "."], check=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("codec")
    tree = d / "tree"
    tree.mkdir()
    make_tree(tree)
    layer = d / "layer.tar"
    subprocess.run(["tar", "--sort=name", "--format=pax", "--numeric-owner", "--owner=0", "--group=0",
                    "-cf", str(layer), "-C", str(tree), "."], check=True)
    raw = layer.read_bytes()
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    subprocess.run(["gzip", "-n", "-6", str(layer)], check=True)
    archive = d / "codec.oci.tar"
    oci_archive(d / "layer.tar.gz", diff_id, archive, "codec/test:1")
    return {"tree": tree, "archive": archive, "diff_id": diff_id, "layer_sha": hashlib.sha256(raw).digest(),
            "manifest": manifest_of_dir(tree)}


SETTINGS = {
    # What stores written before issue 16 used: 1 MiB packs, level 3's own window.
    "before-16": {"PACK_TARGET": 1 * MiB, "WINDOW_LOG": 21, "WORKERS": 1, "MAX_IN_FLIGHT_BYTES": 4 * MiB},
    "default": {},
    "two-workers": {"WORKERS": 2},
    # Nothing in flight but the newest: every submit waits for the one before.
    "no-overlap": {"MAX_IN_FLIGHT_BYTES": 1},
    "small-packs-by-count": {"PACK_MEMBERS": 7},
    # Stores made before 2026-12-03 have 4 KiB pages, and keep them.
    "4k-pages": {"PAGE_SIZE": 4096},
}


def apply(m: pytest.MonkeyPatch, setting: dict) -> None:
    for k, v in setting.items():
        if k == "WINDOW_LOG":
            m.setattr(chunks, "WINDOW_LOG", v)
        elif k == "PAGE_SIZE":
            from layerdb.engine import store

            m.setattr(store, "PRAGMAS", tuple(p for p in store.PRAGMAS if "page_size" not in p)
                      + (f"PRAGMA page_size = {v}",))
        else:
            m.setattr(content, k, v)
    # Compressors are made once per thread with the settings of that moment.
    m.setattr(chunks, "_local", __import__("threading").local())


def _fill(db_path: Path, image) -> None:
    from layerdb.engine.api import LayerDB

    with LayerDB(db_path) as db:
        db.import_archive(str(image["archive"]))


def _check_reads(db_path: Path, image) -> None:
    from layerdb.engine.api import LayerDB

    with LayerDB(db_path) as db:
        tree: Path = image["tree"]
        for p in sorted(tree.rglob("*")):
            if p.is_file():
                got = b"".join(db.cat("codec/test:1", "/" + str(p.relative_to(tree))))
                assert got == p.read_bytes(), p
        buf = io.BytesIO()
        db.export_tar("codec/test:1", buf)
        assert hashlib.sha256(b"".join(db.layer_tar(image["diff_id"]))).digest() == image["layer_sha"]
    assert manifest_of_tar_bytes(buf.getvalue(), db_path.parent) == image["manifest"]


@pytest.mark.parametrize("name", list(SETTINGS))
def test_every_setting_reads_back_and_passes_fsck_deep(name, image, tmp_path, monkeypatch):
    db_path = tmp_path / "store.sqlite"
    with monkeypatch.context() as m:
        apply(m, SETTINGS[name])
        _fill(db_path, image)
    # Read with the code's own settings: a store's format does not depend on
    # the settings that wrote it.
    _check_reads(db_path, image)
    import apsw

    c = apsw.Connection(str(db_path))
    assert c.execute("PRAGMA page_size").fetchone()[0] == SETTINGS[name].get("PAGE_SIZE", 8192)
    c.close()
    r = run_cli("fsck", "--deep", db_path=db_path)
    assert r.exit_code == 0, r.output


def _chunk_rows(db_path: Path) -> list[tuple]:
    import apsw

    c = apsw.Connection(str(db_path))
    try:
        return list(c.execute("SELECT sha256, size, codec, data FROM chunk"))
    finally:
        c.close()


def test_the_codec_paths_are_the_ones_meant(image, tmp_path):
    """Raw chunks for incompressible data, zstd frames with the window a pack
    needs, packs that close at PACK_TARGET, large contents over many chunks."""
    db_path = tmp_path / "store.sqlite"
    _fill(db_path, image)
    rows = _chunk_rows(db_path)
    codecs = {codec for _, _, codec, _ in rows}
    assert codecs == {chunks.RAW, chunks.ZSTD}
    for sha, size, codec, data in rows:
        raw = data if codec == chunks.RAW else zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
        assert len(raw) == size and hashlib.sha256(raw).digest() == sha
        if codec == chunks.ZSTD:
            fp = zstandard.get_frame_parameters(data)
            assert fp.content_size == size
            assert fp.window_size <= max(size, 1 << chunks.WINDOW_LOG)
            if size >= content.PACK_TARGET:  # a full pack sees itself whole (level 3 alone: 2 MiB)
                assert fp.window_size >= 1 << chunks.WINDOW_LOG
    packs = [size for _, size, _, _ in rows if size > content.CDC_MAX]
    # only packs exceed the largest chunk; all but the layer's last one are full
    assert max(packs) >= content.PACK_TARGET and sum(p < content.PACK_TARGET for p in packs) <= 1
    # the 9 MiB random file is stored raw, chunk by chunk, every chunk within FastCDC's bounds
    import apsw

    c = apsw.Connection(str(db_path))
    sha = hashlib.sha256((image["tree"] / "big" / "random.bin").read_bytes()).digest()
    parts = list(c.execute("SELECT bc.offset, ch.size, ch.codec FROM blob b JOIN blob_chunk bc ON bc.blob_id = b.id"
                           " JOIN chunk ch ON ch.sha256 = bc.chunk WHERE b.sha256 = ? ORDER BY bc.seq", (sha,)))
    assert len(parts) > 9 and all(codec == chunks.RAW for _, _, codec in parts)
    assert all(content.CDC_MIN <= size <= content.CDC_MAX for _, size, _ in parts[:-1])
    assert [off for off, _, _ in parts] == [sum(s for _, s, _ in parts[:i]) for i in range(len(parts))]
    # the edited copy shares all but the chunks around its edit
    text, edited = (hashlib.sha256((image["tree"] / "big" / n).read_bytes()).digest()
                    for n in ("text.log", "text-edited.log"))
    sets = [{r[0] for r in c.execute("SELECT bc.chunk FROM blob b JOIN blob_chunk bc ON bc.blob_id = b.id"
                                     " WHERE b.sha256 = ?", (s,))} for s in (text, edited)]
    assert len(sets[1] - sets[0]) <= 3 and len(sets[0] & sets[1]) >= len(sets[0]) - 3
    c.close()


def test_rm_and_gc_keep_what_is_left_readable(image, tmp_path, monkeypatch):
    """gc repacks the packs an image leaves part-empty; the rest reads the same."""
    db_path = tmp_path / "store.sqlite"
    _fill(db_path, image)
    # A second image with a layer of its own: removing it empties its packs.
    d = tmp_path / "second"
    (d / "tree").mkdir(parents=True)
    rng = random.Random(7)
    for i in range(300):
        (d / "tree" / f"only{i}").write_bytes(_text(rng, 5000))
    layer = d / "layer.tar"
    subprocess.run(["tar", "--sort=name", "--format=pax", "-cf", str(layer), "-C", str(d / "tree"), "."], check=True)
    diff_id = "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
    subprocess.run(["gzip", "-n", str(layer)], check=True)
    oci_archive(d / "layer.tar.gz", diff_id, d / "second.oci.tar", "codec/other:1")
    assert run_cli("import", str(d / "second.oci.tar"), db_path=db_path).exit_code == 0
    assert run_cli("rm", "codec/other:1", db_path=db_path).exit_code == 0
    r = run_cli("gc", "--json", db_path=db_path)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.splitlines()[-1])["chunks"] > 0
    _check_reads(db_path, image)
    r = run_cli("fsck", "--deep", db_path=db_path)
    assert r.exit_code == 0, r.output


def test_sniff_tells_the_kinds_apart():
    assert content.sniff(b"\x7fELF\x02\x01") == "elf"
    assert content.sniff(gzip.compress(b"x")) == "packed"
    assert content.sniff(b"\x89PNG\r\n") == "packed"
    assert content.sniff(b"plain text\n") == "text"
    assert content.sniff(b"ab\0cd") == "binary"
    assert content.sniff(memoryview(b"\x28\xb5\x2f\xfd....")) == "packed"


def test_a_window_view_round_trips_through_encode():
    """encode takes views of a window (no copy) and gives bytes back for raw chunks."""
    data = bytearray(random.Random(9).randbytes(300_000)) + b"a" * 300_000
    view = memoryview(data)
    codec, out = chunks.encode(view[:300_000])
    assert codec == chunks.RAW and type(out) is bytes and out == bytes(data[:300_000])
    codec, out = chunks.encode(view[300_000:])
    assert codec == chunks.ZSTD and chunks.decode(codec, out, 300_000) == b"a" * 300_000
