#!/usr/bin/env python3
"""Target 7, export: `layerdb export --at IMAGE -o -` (to /dev/null) <= 2x tar of the
same tree unpacked on disk (by umoci).

Two tar peers, because the issue's literal one measures little: GNU tar notices
that its archive is /dev/null and then does not read file contents at all
(`tar -cf /dev/null` only walks and stats the tree).  So the table shows
  - `tar -cf /dev/null DIR`, the target as the issue words it, and
  - `tar -cf - DIR | cat >/dev/null`, which reads and writes every byte, as export does.
layerdb writes with `-o -` into /dev/null, the same bytes as `-o /dev/null`: layerdb
before dcc7c9b renamed a temporary file over /dev/null when run as root.
"""

from __future__ import annotations

import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import images  # noqa: E402
from common import MiB, Result, alternate, capture, ldb, log, main_for, median, rmtree, run, scratch  # noqa: E402

CASES = [(images.DEB_PYTHON, "Debian+python3"), ("smallfiles", "20k small files"), ("bigfile-2", "150 MiB file")]


def run_bench(runs: int) -> list[Result]:
    images.ensure_images([s for s, _ in CASES])
    out = []
    devnull = open(os.devnull, "wb")
    for slug, why in CASES:
        img = images.IMAGES[slug]
        tree = images.unpacked(slug)
        work = scratch("export")
        db = work / "store.sqlite"
        run(ldb(db, "import", images.oci_archive(slug)))
        # Once, untimed: both write a whole tar (a sanity check on the figures, not a test).
        sizes = {n: int(capture(f"{cmd} | wc -c").strip()) for n, cmd in (
            ("layerdb", " ".join(shlex.quote(c) for c in ldb(db, "export", "--at", img.name, "-o", "-"))),
            ("tar", f"tar -cf - -C {shlex.quote(str(tree))} ."))}
        log(f"export {img.name}: layerdb export vs tar, {runs} rounds")
        t = alternate({
            "layerdb": lambda: run(ldb(db, "export", "--at", img.name, "-o", "-"), stdout=devnull).wall,
            "tar /dev/null": lambda: run(["tar", "-cf", "/dev/null", "-C", tree, "."]).wall,
            "tar | cat": lambda: run(f"tar -cf - -C {tree} . | cat >/dev/null").wall,
        }, runs)
        rmtree(work)
        lt = median(t["layerdb"])
        size = f"{images.unpacked_size(slug) / MiB:.0f} MiB unpacked"
        out.append(Result("export", f"export {img.name} ({why}, {size}) vs tar -cf /dev/null (as the issue words it)",
                          lt, "tar -cf /dev/null", median(t["tar /dev/null"]), 2.0, samples=t,
                          extra={"tar bytes written": f"layerdb {sizes['layerdb'] / MiB:.1f} MiB, "
                                                      f"tar {sizes['tar'] / MiB:.1f} MiB"},
                          note="GNU tar does not read file data when the archive is /dev/null"))
        out.append(Result("export", f"export {img.name} vs tar -cf - | cat >/dev/null (reads every byte)",
                          lt, "tar | cat", median(t["tar | cat"]), 2.0))
    return out


if __name__ == "__main__":
    main_for(__doc__, run_bench)
