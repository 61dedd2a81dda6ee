#!/usr/bin/env python3
"""Target 6, memory: peak RSS of `layerdb import` and `layerdb export` <= 100 MiB, for
every image, and not growing with the image's size.

Peak RSS is the child's own ru_maxrss (os.wait4), so runs do not mix.  Export
writes the tar to stdout, redirected to /dev/null.  Beside each image: the peak
RSS of `umoci unpack`, for scale.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import images  # noqa: E402
from common import MiB, Result, ldb, log, main_for, rmtree, run, scratch  # noqa: E402

LIMIT = 100 * MiB
CASES = [  # (slug, why)
    (images.DEB_APACHE, "Debian+apache2"),
    (images.DEB_PYTHON, "Debian+python3"),
    ("bigfile-2", "150 MiB file + its edit"),
    ("smallfiles", "20k small files"),
    ("manyfiles", "200k tiny files"),
    ("chain", "100 layers"),
]


def run_bench(runs: int) -> list[Result]:
    images.ensure_images([s for s, _ in CASES])
    out = []
    devnull = open(os.devnull, "wb")
    for slug, why in CASES:
        img = images.IMAGES[slug]
        work = scratch("memory")
        archive = images.oci_archive(slug)
        mib = images.unpacked_size(slug) / MiB
        imp, exp, umo = [], [], []
        log(f"memory: {img.name}: import, export, umoci unpack; {runs} rounds")
        for i in range(runs):
            db = work / f"store{i}.sqlite"
            imp.append(run(ldb(db, "import", archive)).rss)
            exp.append(run(ldb(db, "export", "--at", img.name, "-o", "-"), stdout=devnull).rss)
            lay = work / f"layout{i}"
            lay.mkdir()
            run(["tar", "-xf", archive, "-C", lay])
            umo.append(run(["umoci", "unpack", "--image", f"{lay}:{img.ref_name}", work / f"bundle{i}"]).rss)
            rmtree(work)
            work.mkdir(parents=True)
        rmtree(work)
        size = f"{archive.stat().st_size / MiB:.0f} MiB archive, {mib:.0f} MiB unpacked"
        out.append(Result("memory", f"peak RSS, import {img.name} ({why}; {size})", max(imp), "limit", LIMIT, 1.0,
                          unit="B", extra={"umoci unpack": f"{max(umo) / MiB:.0f} MiB"}))
        out.append(Result("memory", f"peak RSS, export {img.name} ({why})", max(exp), "limit", LIMIT, 1.0, unit="B"))
    return out


if __name__ == "__main__":
    main_for(__doc__, run_bench)
