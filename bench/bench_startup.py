#!/usr/bin/env python3
"""Target 5, CLI start-up: `layerdb --help` and a `cat` of a small file, each <= 150 ms.

The cat reads /etc/debian_version at bench/py-app:1 from a store holding the
five-image family.  Beside them, for scale: the bare interpreter layerdb runs on
(`python -c pass`), and `tar -xOf` of the same file from the saved base layer tar.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import images  # noqa: E402
from common import Result, alternate, layerdb_cmd, layerdb_python, ldb, log, main_for, median, rmtree, run, scratch  # noqa: E402

LIMIT = 0.150
SMALL = "/etc/debian_version"


def run_bench(runs: int) -> list[Result]:
    images.ensure_images(images.FAMILY)
    work = scratch("startup")
    db = work / "store.sqlite"
    run(ldb(db, "import", images.family_archive()))
    base_tar = images.saved_layers(images.DEB_PYTHON)[0]
    ref = images.IMAGES[images.DEB_PYTHON].name
    devnull = open(os.devnull, "wb")
    rounds = max(runs, 10)  # tens of milliseconds each: more rounds, steadier medians
    log(f"start-up: --help, cat of a small file, python -c pass, tar -xOf; {rounds} rounds")
    t = alternate({
        "help": lambda: run(layerdb_cmd() + ["--help"], stdout=devnull).wall,
        "cat": lambda: run(ldb(db, "cat", "--at", ref, SMALL), stdout=devnull).wall,
        "python": lambda: run([layerdb_python(), "-c", "pass"]).wall,
        "tar": lambda: run(["tar", "-xOf", base_tar, SMALL.lstrip("/")], stdout=devnull).wall,
    }, rounds)
    rmtree(work)
    py = {"python -c pass": f"{median(t['python']) * 1000:.1f} ms"}
    return [Result("startup", "layerdb --help", median(t["help"]), "limit", LIMIT, 1.0, extra=py, samples=t),
            Result("startup", f"layerdb cat --at {ref} {SMALL} (store: 5 images)", median(t["cat"]), "limit", LIMIT,
                   1.0, extra={"tar -xOf base layer tar": f"{median(t['tar']) * 1000:.1f} ms"})]


if __name__ == "__main__":
    main_for(__doc__, run_bench)
