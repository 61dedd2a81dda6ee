#!/usr/bin/env python3
"""Target 4 (second half) and issue 3's benchmark: `log` and `find --sha256` against
the way a user does it today, over the layer tars of the saved (`docker save`) images.

- `layerdb log /etc/app/state.conf --image bench/chain:100` (the path changes in
  all 100 layers) against two peers over the 100 layer tars:
  - `tar -tvf LAYER | grep PATH`: lists the events only (issue 5: <= 0.5x);
  - the same plus `tar -xOf LAYER PATH | sha256sum` in each layer that names the
    path: what a user needs for what `log` prints (each version's sha256).
  Issue 3 asks for at least 50x faster (<= 0.02x).
- `layerdb find --sha256 HEX` (HEX: libssl.so.3, shipped by two layers of the
  family) against two peers over the family's distinct layer tars:
  - bench/tarscan.py: one Python process streams every tar and hashes every
    file, the fastest way without an index (issue 5: <= 0.1x);
  - `tar -xf` of each layer into a scratch directory, then `find -type f -exec
    sha256sum {} +`: the shell way.  Issue 3: at least 50x faster.
- find must not grow with the number of stored images: the same query on a
  store with five more images (bench/chain:100, bench/bigfile:1-2,
  bench/smallfiles:1) takes at most 1.3x (the 1.3 is ours, as for depth).

The layer tars are extracted from the docker-save archives once, beforehand, and
are in the page cache: the peers pay no unpacking of the saved image.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import images  # noqa: E402
from common import (  # noqa: E402
    BENCH, Result, alternate, capture, layerdb_python, ldb, log, main_for, median, rmtree, run, scratch, store_size,
)

LOG_PATH = "/" + images.CHAIN_HOT
FIND_PATH = "usr/lib/x86_64-linux-gnu/libssl.so.3"
OTHERS = ["chain", "bigfile-1", "bigfile-2", "smallfiles"]


# The query alone, inside one process: what the CLI's start-up (tens of ms of
# interpreter and imports) hides.  The engine API may move; then it is N/A.
ENGINE_CALL = """
import sys, time
from layerdb.engine.api import LayerDB
db = LayerDB(sys.argv[1])
t = time.perf_counter()
if sys.argv[2] == "log":
    db.log(sys.argv[3], image=sys.argv[4])
else:
    from layerdb.engine import audit
    audit.find(db, sha256=sys.argv[3])
print(time.perf_counter() - t)
"""


def engine_seconds(db, *args) -> float | None:
    try:
        return float(capture([layerdb_python(), "-c", ENGINE_CALL, db, *args]).strip())
    except (subprocess.CalledProcessError, ValueError):
        return None


def engine_result(what: str, db, args: list, runs: int, peer: str, peer_t: float) -> Result:
    ts = [engine_seconds(db, *args) for _ in range(runs)]
    ok = [x for x in ts if x is not None]
    return Result("log_find", f"{what}: the engine call alone, no CLI start-up (figure only)",
                  median(ok) if ok else None, peer, peer_t, None,
                  note="" if ok else "the engine API this bench calls has moved")


def has_command(db, name: str) -> bool:
    return run(ldb(db, name, "--help"), check=False).rc == 0


def bench_log(work, runs: int) -> list[Result]:
    images.ensure_group("chain")
    db = work / "chain.sqlite"
    run(ldb(db, "import", images.oci_archive("chain")))
    tars = images.saved_layers("chain")
    rows = capture(ldb(db, "log", LOG_PATH, "--image", "bench/chain:100", "--json")).splitlines()
    scan = "for t in " + " ".join(shlex.quote(str(t)) for t in tars) + \
           f"; do tar -tvf \"$t\" | grep -F ' {LOG_PATH.lstrip('/')}'; done"
    hits = len(capture(scan).splitlines())
    member = shlex.quote(LOG_PATH.lstrip("/"))
    scan_x = "for t in " + " ".join(shlex.quote(str(t)) for t in tars) + \
             f"; do tar -tvf \"$t\" | grep -F ' {LOG_PATH.lstrip('/')}' && tar -xOf \"$t\" {member} | sha256sum; done"
    versions = sum(1 for line in capture(scan_x).splitlines() if line.endswith("  -"))
    devnull = open(os.devnull, "wb")
    log(f"log: layerdb log vs tar -tvf (and tar -xO | sha256sum) over {len(tars)} layer tars, {runs} rounds")
    t = alternate({
        "layerdb": lambda: run(ldb(db, "log", LOG_PATH, "--image", "bench/chain:100"), stdout=devnull).wall,
        "tar -tvf": lambda: run(scan, stdout=devnull).wall,
        "tar -tvf + tar -xO": lambda: run(scan_x, stdout=devnull).wall,
    }, runs)
    lt, pt, px = median(t["layerdb"]), median(t["tar -tvf"]), median(t["tar -tvf + tar -xO"])
    facts = {"events": f"layerdb {len(rows)} rows, tar -tvf|grep {hits} lines, {versions} versions hashed"}
    return [Result("log_find", f"log {LOG_PATH} on the 100-layer image vs tar -tvf | grep over its layer tars "
                   "(issue 5: <= 0.5x)", lt, "tar -tvf", pt, 0.5, extra=facts, samples=t),
            Result("log_find", "the same, issue 3's target: at least 50x faster", lt, "tar -tvf", pt, 0.02),
            Result("log_find", "log vs tar -tvf | grep plus tar -xO | sha256sum of each version (what log prints); "
                   "issue 3: at least 50x faster", lt, "tar -tvf + tar -xO", px, 0.02),
            engine_result("log", db, ["log", LOG_PATH, "bench/chain:100"], runs, "tar -tvf", pt)]


def bench_find(work, runs: int) -> list[Result]:
    fam = images.FAMILY
    images.ensure_images(fam + OTHERS)
    db = work / "family.sqlite"
    run(ldb(db, "import", images.family_archive()))
    with open(images.unpacked(images.DEB_PYTHON) / FIND_PATH, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    tars, seen = [], set()
    for s in fam:
        for t in images.saved_layers(s):
            if t.name not in seen:  # skopeo names a layer tar by its diff_id
                seen.add(t.name)
                tars.append(t)
    peer = [sys.executable, BENCH / "tarscan.py", want] + tars
    peer_hits = len(capture(peer).splitlines())
    unpack = work / "unpack"
    shell = " ".join([f"mkdir -p {shlex.quote(str(unpack))};", "for t in " + " ".join(shlex.quote(str(t)) for t in tars) + ";",
                      f"do tar -xf \"$t\" -C {shlex.quote(str(unpack))} &&",
                      f"find {shlex.quote(str(unpack))} -type f -exec sha256sum {{}} + | grep -F {want};",
                      f"rm -rf {shlex.quote(str(unpack))}/*; done; rmdir {shlex.quote(str(unpack))}"])
    what = "find --sha256 (libssl.so.3) over the family, 5 images"
    if not has_command(db, "find"):
        note = "layerdb has no `find` command yet"
        return [Result("log_find", f"{what} vs hashing every file in {len(tars)} layer tars", None,
                       "tar+sha256", None, 0.1, note=note),
                Result("log_find", "the same, issue 3's target: at least 50x faster", None, "tar+sha256", None, 0.02,
                       note=note)]
    rows = capture(ldb(db, "find", "--sha256", want, "--json")).splitlines()
    big = work / "more.sqlite"
    store_size(db)
    shutil.copyfile(db, big)
    for s in OTHERS:
        run(ldb(big, "import", images.oci_archive(s)))
    devnull = open(os.devnull, "wb")
    log(f"find: layerdb find vs hashing every file of {len(tars)} layer tars, {runs} rounds")
    t = alternate({
        "layerdb": lambda: run(ldb(db, "find", "--sha256", want), stdout=devnull).wall,
        "layerdb (10 images)": lambda: run(ldb(big, "find", "--sha256", want), stdout=devnull).wall,
        "tar+sha256": lambda: run(peer, stdout=devnull).wall,
        "tar -x + sha256sum": lambda: run(shell, stdout=devnull, check=False).wall,
    }, runs)
    lt = median(t["layerdb"])
    facts = {"matches": f"layerdb {len(rows)} rows, hashing the tars {peer_hits} files"}
    return [Result("log_find", f"{what} vs hashing every file in {len(tars)} layer tars (issue 5: <= 0.1x)",
                   lt, "tar+sha256", median(t["tar+sha256"]), 0.1, extra=facts, samples=t),
            Result("log_find", "the same, issue 3's target: at least 50x faster", lt, "tar+sha256",
                   median(t["tar+sha256"]), 0.02),
            Result("log_find", f"find --sha256 vs tar -xf of each of the {len(tars)} layer tars + find | sha256sum "
                   "(the shell way); issue 3: at least 50x faster", lt, "tar -x + sha256sum",
                   median(t["tar -x + sha256sum"]), 0.02),
            engine_result("find --sha256", db, ["find", want], runs, "tar+sha256", median(t["tar+sha256"])),
            Result("log_find", "find --sha256 with 10 images stored vs with 5 (must not grow)",
                   median(t["layerdb (10 images)"]), "5 images", lt, 1.3)]


def run_bench(runs: int) -> list[Result]:
    work = scratch("log_find")
    out = bench_log(work, runs) + bench_find(work, runs)
    rmtree(work)
    return out


if __name__ == "__main__":
    main_for(__doc__, run_bench)
