#!/usr/bin/env python3
"""Gunzip of layers (issue 16, import): ISA-L (python-isal) against zlib, through the
importer's own streaming inflater (engine/ingest/archive.py _Gunzip), on the
Debian+python3 image's layers gzipped at level 6 as registries serve them.

A figure, not a target: the import targets are bench_import.py's.  Both inflaters
read the same file in the same 1 MiB pieces; the bytes out are compared.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import images  # noqa: E402
from common import Result, alternate, log, main_for, median, rmtree, scratch  # noqa: E402


def _inflate(path, module) -> tuple[float, str]:
    from layerdb.engine.ingest import archive

    old, archive.inflate = archive.inflate, module
    try:
        t = time.perf_counter()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            g = archive._Gunzip(f)
            while chunk := g.read(1 << 20):
                h.update(chunk)
        return time.perf_counter() - t, h.hexdigest()
    finally:
        archive.inflate = old


def run_bench(runs: int) -> list[Result]:
    from isal import isal_zlib

    images.ensure_images([images.DEB_PYTHON])
    work = scratch("gunzip")
    layers = []
    for i, tar in enumerate(images.saved_layers(images.DEB_PYTHON)):
        gz = work / f"layer{i}.tar.gz"
        with open(tar, "rb") as src, gzip.GzipFile(gz, "wb", compresslevel=6, mtime=0) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        layers.append(gz)
    size = sum(p.stat().st_size for p in layers)
    log(f"gunzip: {len(layers)} layers, {size / 2**20:.1f} MiB gzipped; isal and zlib alternated, {runs} rounds")
    digests: dict[str, list[str]] = {"isal": [], "zlib": []}

    def one(name, module):
        total = 0.0
        out = []
        for p in layers:
            s, d = _inflate(p, module)
            total += s
            out.append(d)
        digests[name] = out
        return total

    t = alternate({"isal": lambda: one("isal", isal_zlib), "zlib": lambda: one("zlib", zlib)}, runs)
    assert digests["isal"] == digests["zlib"], "the inflaters disagree"
    rmtree(work)
    return [Result("gunzip", f"inflate the Debian+python3 layers ({size / 2**20:.0f} MiB gzip-6), isal",
                   median(t["isal"]), "zlib", median(t["zlib"]), None, samples=t)]


if __name__ == "__main__":
    main_for(__doc__, run_bench)
