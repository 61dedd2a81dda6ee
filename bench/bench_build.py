#!/usr/bin/env python3
"""Issue 14, build: a Dockerfile of ten layer steps (COPY and RUN) on bench/deb:12.

- `layerdb build --no-cache` <= 0.5x `buildah bud --layers --no-cache` (vfs driver,
  chroot isolation, a private --root/--runroot, `--format docker`).
- A cached rebuild (nothing changed) <= 0.2x buildah's cached rebuild (`bud --layers`).
- Peak RSS of `layerdb build` (its RUN steps included) <= 100 MiB.

Each round, each tool starts from a store that holds only the base image: layerdb a
copy of a store into which deb.oci.tar was imported, and its materialisation cache
(the RUN steps' overlayfs lower dirs, $XDG_CACHE_HOME/layerdb/layers) holding only
the base, as buildah's vfs store holds the base unpacked after its pull.  Then the
--no-cache build, then the cached rebuild, both timed.  A figure: the same
--no-cache build with an empty materialisation cache (a first build on a new base),
and buildah with the overlay driver, which copies no tree per step (vfs copies the
whole root file system for every layer, which is most of buildah's time here).
No RUN step touches the network.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import images  # noqa: E402
from common import MiB, Result, alternate, have, ldb, log, main_for, median, rmtree, run, scratch, store_size  # noqa: E402

LIMIT_RSS = 100 * MiB
BASE = "deb"  # bench/deb:12, debootstrap minbase

DOCKERFILE = """\
FROM bench/deb:12
ENV APP_HOME=/app LANG=C.UTF-8
WORKDIR /app
COPY requirements.txt /app/
RUN useradd -r -u 999 -d /app app && mkdir -p /var/lib/app /var/log/app
COPY src/ /app/src/
RUN find /app/src -name '*.py' | sort | xargs sha256sum > /app/MANIFEST
RUN cp -a /usr/share/doc /var/lib/app/doc && rm -rf /usr/share/man/* /usr/share/info/*
COPY static/ /app/static/
RUN tar -czf /var/lib/app/static.tar.gz -C /app static && chown -R app:app /app /var/lib/app /var/log/app
RUN head -c 4194304 /dev/urandom > /var/lib/app/seed.bin && sha256sum /var/lib/app/seed.bin > /var/lib/app/seed.sha256
COPY app.conf /etc/app/app.conf
RUN sed -i "s|@HOME@|$APP_HOME|" /etc/app/app.conf && ln -s /etc/app/app.conf /app/app.conf
USER app
EXPOSE 8080
CMD ["/bin/sh", "-c", "cat /etc/app/app.conf"]
"""
LAYER_STEPS = sum(1 for ln in DOCKERFILE.splitlines() if ln.split(" ", 1)[0] in ("COPY", "RUN"))


def make_context(ctx: Path) -> None:
    """The build context: 300 Python sources, 200 static files (a few binary), two small files."""
    rng = random.Random(14)
    (ctx / "src").mkdir(parents=True)
    for i in range(300):
        d = ctx / "src" / f"pkg{i // 30}"
        d.mkdir(exist_ok=True)
        (d / f"mod{i}.py").write_text(images._text(rng, int(rng.lognormvariate(8.3, 0.8))))
    (ctx / "static").mkdir()
    for i in range(200):
        if i % 20 == 0:
            (ctx / "static" / f"img{i}.bin").write_bytes(rng.randbytes(100_000))
        else:
            (ctx / "static" / f"page{i}.html").write_text(images._text(rng, int(rng.lognormvariate(7.5, 0.7))))
    (ctx / "requirements.txt").write_text("pyyaml==6.0\nrequests==2.31\n")
    (ctx / "app.conf").write_text("[server]\nhome = @HOME@\nport = 8080\n")
    (ctx / "Dockerfile").write_text(DOCKERFILE)


class LayerdbSide:
    def __init__(self, work: Path):
        self.work = work
        self.tmpl = work / "base.sqlite"
        self.db = work / "store.sqlite"
        self.cache = work / "xdg-cache"
        self.env = {"XDG_CACHE_HOME": str(self.cache)}
        self.layers = self.cache / "layerdb" / "layers"
        run(ldb(self.tmpl, "import", images.oci_archive(BASE)))
        store_size(self.tmpl)  # the WAL folded in: the file is the whole store
        self.base_entries: set[str] = set()
        self.rss: list[int] = []

    def fresh(self, keep_base: bool) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(str(self.db) + suffix).unlink(missing_ok=True)
        shutil.copy(self.tmpl, self.db)
        if self.layers.is_dir():
            for n in os.listdir(self.layers):
                if keep_base and n.removesuffix(".size") in self.base_entries:
                    continue
                if (self.layers / n).is_dir():
                    rmtree(self.layers / n)
                else:  # a layer's size record, the cache's lock file
                    (self.layers / n).unlink()

    def build(self, ctx: Path, *extra: str) -> tuple[float, str]:
        iid = self.work / "iid"
        iid.unlink(missing_ok=True)
        r = run(ldb(self.db, "build", "-q", "-t", "bench/built:1", "--iidfile", iid, *extra, ctx), env=self.env)
        self.rss.append(r.rss)
        return r.wall, iid.read_text().strip()

    def prime(self, ctx: Path) -> None:
        """One build with an empty cache: what it materialises for the base stays for the timed runs."""
        self.fresh(keep_base=False)
        self.build(ctx, "--no-cache")
        base_diffs = {images.layer_meta(n)["diff_id"].removeprefix("sha256:")[:20]
                      for n in images.IMAGES[BASE].layers}
        self.base_entries = {n for n in os.listdir(self.layers) if n in base_diffs}
        if not self.base_entries:
            raise RuntimeError(f"layerdb build left no materialised base layer in {self.layers}")


class BuildahSide:
    def __init__(self, work: Path, driver: str = "vfs"):
        self.work = work
        self.driver = driver
        self.tmpl = work / "buildah-base"
        self.root = work / "buildah"
        rmtree(self.tmpl)
        self.tmpl.mkdir(parents=True)
        out = subprocess.run(self._cmd(self.tmpl, "pull", "-q", f"oci-archive:{images.oci_archive(BASE)}:"
                                       f"{images.IMAGES[BASE].ref_name}"),
                             check=True, capture_output=True, text=True).stdout.split()[-1]
        subprocess.run(self._cmd(self.tmpl, "tag", out, images.IMAGES[BASE].name), check=True, capture_output=True)

    def _cmd(self, root: Path, *args) -> list[str]:
        return ["buildah", "--root", str(root / "root"), "--runroot", str(root / "run"), "--storage-driver",
                self.driver, *[str(a) for a in args]]

    def fresh(self) -> None:
        rmtree(self.root)
        subprocess.run(["cp", "-a", str(self.tmpl), str(self.root)], check=True)

    def build(self, ctx: Path, *extra: str) -> tuple[float, str]:
        iid = self.work / "buildah-iid"
        iid.unlink(missing_ok=True)
        r = run(self._cmd(self.root, "bud", "--isolation", "chroot", "--layers", "--format", "docker", "-q",
                          "--iidfile", iid, "-t", "bench/built:1", *extra, ctx))
        return r.wall, iid.read_text().strip()


def run_bench(runs: int) -> list[Result]:
    images.ensure_images([BASE])
    if not have("buildah"):
        raise RuntimeError("bench_build needs buildah (Debian package buildah)")
    work = scratch("build")
    try:
        return _bench(runs, work)
    finally:
        rmtree(work)


def _bench(runs: int, work: Path) -> list[Result]:
    ctx = work / "ctx"
    make_context(ctx)
    ldbs = LayerdbSide(work / "layerdb")
    ldbs.prime(ctx)
    bah = BuildahSide(work / "buildah-side")
    ovl = BuildahSide(work / "buildah-overlay", "overlay")
    cached: dict[str, list[float]] = {"layerdb": [], "buildah": [], "buildah-overlay": []}
    same: dict[str, list[bool]] = {"layerdb": [], "buildah": [], "buildah-overlay": []}

    def layerdb_case() -> float:
        ldbs.fresh(keep_base=True)
        t, iid = ldbs.build(ctx, "--no-cache")
        t2, iid2 = ldbs.build(ctx)
        cached["layerdb"].append(t2)
        same["layerdb"].append(iid == iid2)
        return t

    def layerdb_cold_case() -> float:
        ldbs.fresh(keep_base=False)
        return ldbs.build(ctx, "--no-cache")[0]

    def buildah_case(side: BuildahSide, name: str):
        def go() -> float:
            side.fresh()
            t, iid = side.build(ctx, "--no-cache")
            t2, iid2 = side.build(ctx)
            cached[name].append(t2)
            same[name].append(iid == iid2)
            return t

        return go

    log(f"build: layerdb build vs buildah bud --layers (vfs; overlay as a figure), --no-cache then cached, "
        f"{runs} rounds")
    t = alternate({"layerdb": layerdb_case, "buildah": buildah_case(bah, "buildah"), "layerdb-cold": layerdb_cold_case,
                   "buildah-overlay": buildah_case(ovl, "buildah-overlay")}, runs)
    rmtree(bah.root)
    rmtree(ovl.root)
    facts = {"Dockerfile": f"{len(DOCKERFILE.splitlines())} instructions, {LAYER_STEPS} layer steps (COPY, RUN) on "
                           f"bench/deb:12; context {sum(f.stat().st_size for f in ctx.rglob('*') if f.is_file()) / MiB:.1f} MiB",
             "cached rebuild gives the same image id": ", ".join(f"{k} {all(v)}" for k, v in same.items())}
    return [
        Result("build", f"build --no-cache, {LAYER_STEPS} COPY/RUN steps on Debian: layerdb build vs buildah bud "
               "--layers (vfs, chroot)", median(t["layerdb"]), "buildah bud", median(t["buildah"]), 0.5,
               extra=facts, samples=t),
        Result("build", "build --no-cache with an empty materialisation cache (first build on a base) vs buildah "
               "(figure only)", median(t["layerdb-cold"]), "buildah bud", median(t["buildah"]), None),
        Result("build", "build --no-cache: layerdb build vs buildah bud --layers with the overlay driver (figure only)",
               median(t["layerdb"]), "buildah bud (overlay)", median(t["buildah-overlay"]), None),
        Result("build", "cached rebuild (nothing changed): layerdb build vs buildah bud --layers (vfs)",
               median(cached["layerdb"]), "buildah bud", median(cached["buildah"]), 0.2, samples=cached),
        Result("build", "cached rebuild: layerdb build vs buildah bud --layers with the overlay driver (figure only)",
               median(cached["layerdb"]), "buildah bud (overlay)", median(cached["buildah-overlay"]), None),
        Result("build", "peak RSS, layerdb build (RUN steps included; --no-cache, cold, cached)", max(ldbs.rss), "limit",
               LIMIT_RSS, 1.0, unit="B"),
    ]


if __name__ == "__main__":
    main_for(__doc__, run_bench)
