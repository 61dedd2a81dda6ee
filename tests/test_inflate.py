"""Layers are gunzipped by ISA-L (python-isal) when it is installed, else zlib:
both must give the same bytes, the same stored layers, and the same refusals."""

from __future__ import annotations

import gzip
import io
import zlib

import pytest

from conftest import REPO_FIXTURES, export_bytes
from layerdb.engine.ingest import archive as archive_mod

isal = pytest.importorskip("isal.isal_zlib")


class Raw:
    """The one method _Gunzip reads its input through."""

    def __init__(self, data: bytes, step: int):
        self.f, self.step = io.BytesIO(data), step

    def read(self, n: int = -1) -> bytes:
        return self.f.read(min(n, self.step) if n > 0 else self.step)


def gunzip_all(data: bytes, step: int, module, monkeypatch) -> bytes:
    with monkeypatch.context() as m:
        m.setattr(archive_mod, "inflate", module)
        g = archive_mod._Gunzip(Raw(data, step))
        out = bytearray()
        while chunk := g.read(7919):
            out += chunk
        return bytes(out)


def test_isal_is_the_inflater():
    assert archive_mod.inflate is isal


@pytest.mark.parametrize("step", [1, 4096, 1 << 20])
def test_both_inflaters_give_gzip_modules_bytes(step, monkeypatch):
    """Several members, one with an empty body, zero padding after the last one
    (as some registries pad blobs), read in pieces of every size."""
    parts = [bytes(range(256)) * 300, b"", b"tail " * 5000]
    data = b"".join(gzip.compress(p, mtime=0) for p in parts) + b"\0" * 1024
    want = b"".join(parts)
    assert gunzip_all(data, step, isal, monkeypatch) == want
    assert gunzip_all(data, step, zlib, monkeypatch) == want


@pytest.mark.parametrize("module", [isal, zlib], ids=["isal", "zlib"])
def test_a_corrupt_or_cut_stream_is_refused_alike(module, monkeypatch):
    from layerdb.engine.errors import LayerFormatError

    data = gzip.compress(b"x" * 100000, mtime=0)
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(LayerFormatError, match="gzip stream is (corrupt|truncated)"):
        gunzip_all(bytes(bad), 4096, module, monkeypatch)
    with pytest.raises(LayerFormatError, match="gzip stream is truncated"):
        gunzip_all(data[: len(data) // 2], 4096, module, monkeypatch)


@pytest.mark.parametrize("archive", ["sample.oci.tar", "sample.docker.tar", "opaque.oci.tar"])
def test_a_store_filled_through_either_is_the_same(archive, tmp_path, monkeypatch):
    from layerdb.engine.api import LayerDB

    got = []
    for name, module in (("isal", isal), ("zlib", zlib)):
        with monkeypatch.context() as m:
            m.setattr(archive_mod, "inflate", module)
            with LayerDB(tmp_path / f"{name}.sqlite") as db:
                db.import_archive(str(REPO_FIXTURES / "images" / archive), tag="x:1")
                layers = [h["diff_id"] for h in db.history("x:1") if h["diff_id"]]
                got.append((db.images()[0]["id"], layers, [b"".join(db.layer_tar(d)) for d in layers],
                            [export_bytes(db, f"x:1~{k}") for k in range(len(layers))]))
    assert got[0] == got[1]
