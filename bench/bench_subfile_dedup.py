#!/usr/bin/env python3
"""Target 3, sub-file dedup: a 1 MiB in-place edit of a 150 MiB pseudo-random file.

- Importing bench/bigfile:2 (one more layer: the file with 1 MiB rewritten in the
  middle, at an offset that is not a multiple of 1 MiB) into a store that holds
  bench/bigfile:1 grows the store by at most 2 MiB.  Peers, for the same edit:
  the gzip layer blob, an ostree archive repo, a casync chunk store.
- `layerdb cat` of the 150 MiB file to /dev/null runs at 500 MB/s or more
  (shown as time against the time 500 MB/s would take); `cat` of the unpacked
  file and `tar -xOf` of the saved layer tar are shown beside it.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import images  # noqa: E402
import peers  # noqa: E402
from common import MiB, Result, alternate, ldb, log, main_for, median, rmtree, run, scratch, store_size  # noqa: E402

BIG = "/data/big.bin"
LIMIT_GROWTH = 2 * MiB
LIMIT_RATE = 500e6  # bytes/s


def run_bench(runs: int) -> list[Result]:
    images.ensure_group("bigfile")
    work = scratch("subfile")
    db = work / "store.sqlite"
    log("sub-file dedup: importing bigfile:1, then bigfile:2")
    run(ldb(db, "import", images.oci_archive("bigfile-1")))
    s1 = store_size(db)
    r2 = run(ldb(db, "import", images.oci_archive("bigfile-2")))
    s2 = store_size(db)
    growth = s2 - s1
    gz_growth = images.layer_meta("bigedit")["size"]
    trees = [("v1", images.unpacked("bigfile-1")), ("v2", images.unpacked("bigfile-2"))]
    log("sub-file dedup: ostree and casync on the two top views")
    ost = peers.ostree_sizes(work / "ostree", trees)
    cas = peers.casync_sizes(work / "casync", trees)
    out = [Result("subfile_dedup", "sub-file dedup: store growth for a 1 MiB in-place edit of a 150 MiB file",
                  growth, "limit", LIMIT_GROWTH, 1.0, unit="B",
                  extra={"store after bigfile:1": f"{s1 / MiB:.1f} MiB",
                         "peers' growth": ", ".join(
                             f"{n} {g / MiB:.1f} MiB" for n, g in (
                                 ("gzip layer blob", gz_growth),
                                 ("ostree", ost[1] - ost[0] if ost else None),
                                 ("casync", cas[1] - cas[0] if cas else None)) if g is not None),
                         "import bigfile:2": f"{r2.wall:.2f} s, peak RSS {r2.rss / MiB:.0f} MiB"})]
    if cas:
        out.append(Result("subfile_dedup", "sub-file dedup: store growth, layerdb vs casync (figure only)",
                          growth, "casync", cas[1] - cas[0], None, unit="B"))

    size = os.path.getsize(trees[1][1] / BIG.lstrip("/"))
    layer_tar = images.saved_layers("bigfile-2")[-1]
    unpacked_file = trees[1][1] / BIG.lstrip("/")
    devnull = open(os.devnull, "wb")
    log(f"sub-file dedup: cat of the {size / MiB:.0f} MiB file, {runs} rounds")
    t = alternate({
        "layerdb": lambda: run(ldb(db, "cat", "--at", "bench/bigfile:2", BIG), stdout=devnull).wall,
        "cat": lambda: run(["cat", unpacked_file], stdout=devnull).wall,
        "tar -xO": lambda: run(["tar", "-xOf", layer_tar, BIG.lstrip("/")], stdout=devnull).wall,
    }, runs)
    rmtree(work)
    lt = median(t["layerdb"])
    out.append(Result("subfile_dedup", f"cat of the {size / MiB:.0f} MiB chunked file: layerdb vs 500 MB/s",
                      lt, "500 MB/s", size / LIMIT_RATE, 1.0,
                      extra={"layerdb rate": f"{size / lt / 1e6:.0f} MB/s",
                             "cat (page cache)": f"{size / median(t['cat']) / 1e6:.0f} MB/s",
                             "tar -xOf layer tar": f"{size / median(t['tar -xO']) / 1e6:.0f} MB/s"},
                      samples=t))
    return out


if __name__ == "__main__":
    main_for(__doc__, run_bench)
