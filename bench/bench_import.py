#!/usr/bin/env python3
"""Import speed (issue 16, target 1): `layerdb import` against untar + `umoci unpack`, and the floor.

- Debian+python3 (4 layers): layerdb <= 0.45x untar + umoci unpack of the same archive.
- 20k small files: <= 0.12x; the family of five related images: <= 0.10x.
- Debian+python3: layerdb <= 1.15x the two-thread floor (bench/floor.py --two-thread:
  isal gunzip + sha256 on one thread, zstd-3 of the tar stream on the other),
  measured in the same rounds as the import.  The one-thread floors are figures.

Every run imports into a fresh store and unpacks into a fresh directory; the
page cache is warm for both (the archives were read once before).
`--profile` also runs one import under cProfile and prints where the time goes.
"""

from __future__ import annotations

import os
import pstats
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import images  # noqa: E402
from common import (BENCH, MiB, Result, alternate, have, ldb, layerdb_python, log, median, parser,  # noqa: E402
                    python_with, report, rmtree, run, scratch, store_size)


def import_case(archive: Path, work: Path, rss: list[int], sizes: list[int]):
    def go() -> float:
        db = work / "store.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        r = run(ldb(db, "import", archive))
        rss.append(r.rss)
        sizes.append(store_size(db))
        return r.wall

    return go


def umoci_case(archive: Path, refs: list[str], work: Path, rss: list[int]):
    """What a user without layerdb does: untar the archive, `umoci unpack` each image."""

    def go() -> float:
        rmtree(work)
        work.mkdir(parents=True)
        layout = work / "layout"
        layout.mkdir()
        cmd = f"tar -xf {archive} -C {layout}"
        for i, ref in enumerate(refs):
            cmd += f" && umoci unpack --image {layout}:{ref} {work}/bundle{i} >/dev/null"
        r = run(cmd)
        rss.append(r.rss)
        return r.wall

    return go


def floor_case(archive: Path, py: str, mode: str | None):
    def go() -> float:
        return run([py, BENCH / "floor.py"] + ([mode] if mode else []) + [archive]).wall

    return go


def skopeo_case(archive: Path, ref: str, dest: Path):
    def go() -> float:
        rmtree(dest)
        return run(["skopeo", "copy", "-q", f"oci-archive:{archive}:{ref}", f"oci:{dest}:{ref}"]).wall

    return go


def compare_umoci(label: str, archive: Path, refs: list[str], limit: float, runs: int, unpacked: int) -> Result:
    work = scratch("import")
    rss_l: list[int] = []
    rss_u: list[int] = []
    sizes: list[int] = []
    log(f"import {label}: layerdb vs untar + umoci unpack, {runs} rounds")
    t = alternate({"layerdb": import_case(archive, work, rss_l, sizes),
                   "umoci": umoci_case(archive, refs, work / "umoci", rss_u)}, runs)
    rmtree(work)
    return Result("import", f"import {label}: layerdb import vs untar + umoci unpack", median(t["layerdb"]),
                  "untar+umoci unpack", median(t["umoci"]), limit,
                  extra={"archive": f"{archive.stat().st_size / MiB:.1f} MiB, {len(refs)} image(s), "
                                    f"{unpacked / MiB:.0f} MiB unpacked",
                         "peak RSS": f"layerdb {max(rss_l) / MiB:.0f} MiB, umoci {max(rss_u) / MiB:.0f} MiB",
                         "store": f"{sizes[-1] / MiB:.1f} MiB"},
                  samples=t)


def run_bench(runs: int, profile: bool = False) -> list[Result]:
    deb_py = images.DEB_PYTHON
    images.ensure_images(images.FAMILY + ["smallfiles"])
    out = [
        compare_umoci("Debian+python3", images.oci_archive(deb_py), [images.IMAGES[deb_py].ref_name], 0.45, runs,
                      images.unpacked_size(deb_py)),
        compare_umoci("20k small files", images.oci_archive("smallfiles"), [images.IMAGES["smallfiles"].ref_name],
                      0.12, runs, images.unpacked_size("smallfiles")),
        compare_umoci("family of 5 images (one archive)", images.family_archive(),
                      [images.IMAGES[s].ref_name for s in images.FAMILY], 0.10, runs,
                      sum(images.unpacked_size(s) for s in images.FAMILY)),
    ]
    py = python_with("zstandard, isal")  # the floor inflates with ISA-L, as layerdb does
    archive = images.oci_archive(deb_py)
    work = scratch("import")
    rss: list[int] = []
    sizes: list[int] = []
    cases = {"layerdb": import_case(archive, work, rss, sizes)}
    if py:
        cases["floor 2 threads"] = floor_case(archive, py, "--two-thread")
        cases["verified floor"] = floor_case(archive, py, "--verified")
        cases["floor+zstd"] = floor_case(archive, py, "--zstd")
        cases["floor"] = floor_case(archive, py, None)
    if have("skopeo"):
        cases["skopeo"] = skopeo_case(archive, images.IMAGES[deb_py].ref_name, work / "skopeo")
    log(f"import Debian+python3: layerdb vs the gunzip+sha256(+zstd) floors, {runs} rounds")
    t = alternate(cases, runs)
    rmtree(work)
    lt = median(t["layerdb"])
    if py:
        out.append(Result("import", "import Debian+python3: layerdb vs the two-thread floor (isal gunzip + sha256 | "
                          "zstd-3 of the tar stream)", lt, "floor 2 threads", median(t["floor 2 threads"]), 1.15,
                          samples=t, extra={"peak RSS": f"layerdb {max(rss) / MiB:.0f} MiB"}))
        out.append(Result("import", "import Debian+python3: layerdb vs the verified two-thread floor (+ the blob's "
                          "sha256 | + a content sha256; figure only)", lt, "verified floor",
                          median(t["verified floor"]), None))
        out.append(Result("import", "import Debian+python3: layerdb vs gunzip+sha256+zstd-3 floor, one thread "
                          "(figure only)", lt, "floor+zstd", median(t["floor+zstd"]), None))
        out.append(Result("import", "import Debian+python3: layerdb vs gunzip+sha256 floor (figure only)",
                          lt, "floor", median(t["floor"]), None))
    else:
        out.append(Result("import", "import Debian+python3 vs the two-thread floor", lt, "floor 2 threads", None, 1.15,
                          note="no Python with zstandard to run the floor"))
    if "skopeo" in t:
        out.append(Result("import", "import Debian+python3: layerdb vs skopeo copy to an OCI layout dir "
                          "(checks digests, stores the gzip blobs; figure only)", lt, "skopeo copy",
                          median(t["skopeo"]), None))
    if profile:
        out[-1].extra["profile"] = "\n" + profile_import(archive)
    return out


def profile_import(archive: Path, top: int = 25) -> str:
    """One import under cProfile: the functions with the most own time, and cumulative."""
    work = scratch("profile")
    prof = work / "import.prof"
    run([layerdb_python(), "-m", "cProfile", "-o", prof, "-m", "layerdb.cli", "--db", work / "s.sqlite",
         "import", archive])
    import io

    buf = io.StringIO()
    st = pstats.Stats(str(prof), stream=buf)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    rmtree(work)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip() and not ln.startswith(("Ordered", "   Ordered"))]
    return "\n".join("         " + ln for ln in lines)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--profile", action="store_true", help="also profile one Debian+python3 import (cProfile)")
    a = p.parse_args()
    report(run_bench(a.runs, a.profile), a.json)


if __name__ == "__main__":
    main()
