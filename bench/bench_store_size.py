#!/usr/bin/env python3
"""Store size (issue 16, target 2): the five related Debian images, every layer's history kept.

- layerdb store file (after `PRAGMA wal_checkpoint(TRUNCATE)`) <= 0.65x the unique
  gzip layer blobs (what a registry or containerd's content store holds).
- ... and smaller than an ostree archive repo and a casync chunk store that hold
  only the five top views (no history).
- The same figure on a second family of five built from other packages (perl,
  nginx: images.FAMILY2), so the settings are not tuned to one family.
- bench/codec_study.py says what each candidate setting would buy on these stores.

Sizes do not vary between runs, so each store is built once; `--runs` is ignored.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import images  # noqa: E402
import peers  # noqa: E402
from common import MiB, Result, layerdb_stats, ldb, log, main_for, rmtree, run, scratch, store_size  # noqa: E402


def run_bench(runs: int = 1) -> list[Result]:
    fam = images.FAMILY
    images.ensure_images(fam)
    work = scratch("store_size")
    db = work / "store.sqlite"
    log("store size: importing the family")
    r = run(ldb(db, "import", images.family_archive()))
    size = store_size(db)
    st = layerdb_stats(db)
    blobs = images.unique_blob_bytes(fam)
    layers = {n for s in fam for n in images.IMAGES[s].layers}
    tars = sum(images.layer_meta(n)["tar_size"] for n in layers)
    trees = [(s, images.unpacked(s)) for s in fam]
    views = sum(images.unpacked_size(s) for s in fam)
    log("store size: ostree commit of the five top views")
    ostree = peers.ostree_sizes(work / "ostree", trees)
    log("store size: casync make of the five top views")
    casync = peers.casync_sizes(work / "casync", trees)
    rmtree(work)
    what = f"{len(fam)} images, {len(layers)} distinct layers"
    facts = {"layer tars (uncompressed, distinct)": f"{tars / MiB:.1f} MiB",
             "top views (file bytes, 5 images)": f"{views / MiB:.1f} MiB",
             "layerdb import time": f"{r.wall:.2f} s"}
    if st and {"content_stored_bytes", "framing_stored_bytes"} <= st.keys():
        c, fr = st["content_stored_bytes"], st["framing_stored_bytes"]
        facts["layerdb store, by `layerdb stats`"] = (
            f"file contents {c / MiB:.1f} MiB, tar framing {fr / MiB:.1f} MiB, "
            f"events/indexes/free {(size - c - fr) / MiB:.1f} MiB")
    out = [Result("store_size", f"store size, family ({what}): layerdb store vs unique gzip blobs", size, "gzip blobs",
                  blobs, 0.65, unit="B", extra=facts)]
    out.append(second_family())
    out.append(Result("store_size", "store size, family: layerdb (all layers) vs ostree archive repo (top views only)",
                      size, "ostree", ostree[-1] if ostree else None, 1.0, unit="B",
                      note="" if ostree else "ostree not installed (apt-get install ostree)"))
    out.append(Result("store_size", "store size, family: layerdb (all layers) vs casync store (top views only)",
                      size, "casync", casync[-1] if casync else None, 1.0, unit="B",
                      note="" if casync else "casync not installed (apt-get install casync)"))
    return out


def second_family() -> Result:
    fam = images.FAMILY2
    images.ensure_images(fam)
    work = scratch("store_size2")
    db = work / "store.sqlite"
    log("store size: importing the second family (perl, nginx)")
    r = run(ldb(db, "import", images.family_archive(fam)))
    size = store_size(db)
    rmtree(work)
    layers = {n for s in fam for n in images.IMAGES[s].layers}
    return Result("store_size", f"store size, second family ({len(fam)} images, {len(layers)} distinct layers: perl, "
                  "nginx): layerdb store vs unique gzip blobs", size, "gzip blobs", images.unique_blob_bytes(fam),
                  None, unit="B", extra={"layerdb import time": f"{r.wall:.2f} s"})


if __name__ == "__main__":
    main_for(__doc__, run_bench)
