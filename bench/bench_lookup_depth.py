#!/usr/bin/env python3
"""Target 4 (first half), depth-free lookups on the 100-layer image bench/chain:100.

- `cat --at bench/chain:100 PATH` takes at most 1.3x `cat --at bench/chain:100~98 PATH`
  (PATH is modified in every one of the 100 layers);
- `view -R --at bench/chain:100` takes at most 1.3x the same listing at `~98`.

`log` and `find` are in bench_log_find.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import images  # noqa: E402
from common import Result, alternate, capture, ldb, log, main_for, median, rmtree, run, scratch  # noqa: E402

TOP = "bench/chain:100"
DEEP = f"{TOP}~{images.CHAIN_LAYERS - 2}"
HOT = "/" + images.CHAIN_HOT


def run_bench(runs: int) -> list[Result]:
    images.ensure_group("chain")
    work = scratch("lookup_depth")
    db = work / "store.sqlite"
    run(ldb(db, "import", images.oci_archive("chain")))
    devnull = open(os.devnull, "wb")
    entries = {ref: len(capture(ldb(db, "view", "-R", "--at", ref)).splitlines()) for ref in (TOP, DEEP)}
    out = []
    rounds = max(runs, 5)  # each run is tens of milliseconds: more rounds, steadier medians
    for what, args in (("cat", ["cat", "--at", "{ref}", HOT]), ("view -R", ["view", "-R", "--at", "{ref}"])):
        log(f"lookup depth: {what} at layer 100 vs layer 2, {rounds} rounds")
        cases = {ref: (lambda ref=ref: run(ldb(db, *[a.format(ref=ref) for a in args]), stdout=devnull).wall)
                 for ref in (TOP, DEEP)}
        t = alternate(cases, rounds)
        shown = " ".join(args).replace("{ref}", "REF")
        extra = {"entries listed": f"{entries[TOP]} at {TOP}, {entries[DEEP]} at {DEEP}"} if what == "view -R" else {}
        out.append(Result("lookup_depth", f"{shown}: REF={TOP} (layer 100) vs REF={DEEP} (layer 2)",
                          median(t[TOP]), DEEP, median(t[DEEP]), 1.3, extra=extra, samples=t))
    rmtree(work)
    return out


if __name__ == "__main__":
    main_for(__doc__, run_bench)
