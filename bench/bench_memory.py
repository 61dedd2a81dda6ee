#!/usr/bin/env python3
"""Target 6, memory: peak RSS of `layerdb import` and `layerdb export` <= 100 MiB, for
every image, and not growing with the image's size.

Peak RSS is the child's own (GNU time), so runs do not mix.  Export writes the
tar to stdout, redirected to /dev/null.  Beside each image: the peak RSS of
`umoci unpack`, for scale.  A third row per image holds the largest peak of the
other commands that read a whole image (once each, on the first store):
`save`, `waste`, `history --changes`, `diff` from the base layer, `view` of the
root, a container's life (create, `cp` a file in, `export` it, `commit`),
`fsck`, `fsck --deep`, `stats`, `log --all`, `find --path`, `cat`, and last
`rm` of every image and `gc`.
"""

from __future__ import annotations

import json
import os
import subprocess
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
        others = _other_commands(work, archive, img.name, devnull)
        worst = max(others, key=others.get)
        out.append(Result("memory", f"peak RSS, the other whole-image commands on {img.name} (largest: {worst})",
                          others[worst], "limit", LIMIT, 1.0, unit="B",
                          extra={k: f"{v / MiB:.0f} MiB" for k, v in others.items()}))
    return out


def _layers(db) -> int:
    return json.loads(subprocess.run(ldb(db, "images", "--json"), capture_output=True, check=True,
                                     text=True).stdout.splitlines()[0])["layers"]


def _other_commands(work, archive, name: str, devnull) -> dict[str, int]:
    """Peak RSS of each command on a fresh store of the image (bytes)."""
    work.mkdir(parents=True, exist_ok=True)
    db = work / "store.sqlite"
    run(ldb(db, "import", archive))
    src = work / "hello.txt"
    src.write_bytes(b"hello\n")
    peaks = {}
    for label, args in [
        ("save", ["save", name, "-o", "-"]),
        ("waste", ["waste", name]),
        ("history --changes", ["history", "--changes", name]),
        ("diff", ["diff", f"{name}~{_layers(db) - 1}", name]),
        ("view /", ["view", "--at", name, "/"]),
        ("container create", ["container", "create", name, "--name", "box"]),
        ("cp into it", ["cp", src, "box:/hello.txt"]),
        ("export it", ["export", "--at", "box", "-o", "-"]),
        ("commit", ["commit", "box", "bench/committed:1"]),
        ("fsck", ["fsck"]),
        ("fsck --deep", ["fsck", "--deep"]),
        ("stats", ["stats"]),
        ("log", ["log", "--all", "/etc/passwd"]),
        ("find --path", ["find", "--path", "/usr/*"]),
        ("cat", ["cat", "--at", name, "/etc/passwd"]),
        ("container rm", ["container", "rm", "box"]),
        ("rm", ["rm", name, "bench/committed:1"]),
        ("gc", ["gc"]),
    ]:
        r = run(ldb(db, *args), stdout=devnull, check=False)
        if r.rc not in (0, 1):  # find and log may find nothing (1); anything else is a failed bench
            raise SystemExit(f"memory: {label} on {name} exited {r.rc}: {r.stderr.strip()[-300:]}")
        peaks[label] = r.rss
    rmtree(work)
    return peaks


if __name__ == "__main__":
    main_for(__doc__, run_bench)
