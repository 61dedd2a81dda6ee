#!/usr/bin/env python3
"""Issue 13, registry pull: `layerdb pull` from a loopback registry into an empty store.

- Debian+python3 (4 layers): layerdb pull <= 0.8x `skopeo copy docker://... oci-archive:F`
  then `layerdb import F` (what a user runs without pull).
- ... <= 0.25x `buildah pull` into a fresh vfs store (private --root/--runroot).
- With Debian+python3 stored, pulling each other member of the family moves <= 1.05x
  the blob bytes of its layers that Debian+python3 lacks (bytes from the registry's
  access log: every response body, manifests and config included).
- Peak RSS of every pull <= 100 MiB.

The registry is Debian's docker-registry (CNCF distribution 2.8) on 127.0.0.1, a random
port, plain HTTP, filesystem storage under the bench cache, seeded with `skopeo copy`
from the bench's OCI archives (the gzip blobs as images.py wrote them).  Every run
pulls into a fresh store or a fresh buildah root; the registry's files are in the page
cache for all three.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import images  # noqa: E402
from common import (MiB, Result, alternate, have, ldb, log, main_for, median, rmtree, run, scratch,  # noqa: E402
                    store_size)

LIMIT_RSS = 100 * MiB
REGISTRY_BIN = "/opt/docker-registry/usr/bin/docker-registry"  # apt-get download docker-registry; dpkg-deb -x


def registry_binary() -> str | None:
    found = shutil.which("docker-registry")
    if found:
        return found
    return REGISTRY_BIN if os.access(REGISTRY_BIN, os.X_OK) else None


class Registry:
    """docker-registry on 127.0.0.1:0 (the port read from its log), plain HTTP, filesystem storage."""

    def __init__(self, workdir: Path):
        binary = registry_binary()
        if not binary:
            raise RuntimeError("no docker-registry (Debian package docker-registry, or "
                               f"{REGISTRY_BIN})")
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = {"version": 0.1,
               "log": {"level": "info", "accesslog": {"disabled": False}},
               "storage": {"filesystem": {"rootdirectory": str(workdir / "data")},
                           "maintenance": {"uploadpurging": {"enabled": False}}},
               "http": {"addr": "127.0.0.1:0", "secret": os.urandom(16).hex()}}
        conf = workdir / "config.yml"
        conf.write_text(json.dumps(cfg))  # YAML is a superset of JSON
        self.access_log, err = workdir / "access.log", workdir / "registry.log"
        with open(self.access_log, "wb") as fo, open(err, "wb") as fe:
            self.proc = subprocess.Popen([binary, "serve", str(conf)], stdout=fo, stderr=fe,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            m = re.search(r"listening on (127\.0\.0\.1:\d+)", err.read_text(errors="replace"))
            if m:
                self.host = m.group(1)
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry did not start: {err.read_text()[-2000:]}")
            time.sleep(0.02)

    def requests(self) -> list[tuple[str, str, int, int]]:
        """(method, path, status, body bytes) of every request so far (the combined log format)."""
        out = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            m = re.search(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d+) (\d+|-)', line)
            if m:
                out.append((m.group(1), m.group(2), int(m.group(3)), 0 if m.group(4) == "-" else int(m.group(4))))
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def fresh_store(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)


def layerdb_case(src: str, db: Path, rss: list[int]):
    def go() -> float:
        fresh_store(db)
        r = run(ldb(db, "pull", "--tls-verify=false", "-q", src))
        rss.append(r.rss)
        return r.wall

    return go


def skopeo_import_case(src: str, ref_name: str, work: Path, rss: list[int], parts: dict[str, list[float]]):
    """skopeo copy docker://SRC oci-archive:F, then layerdb import F: two commands, their times added."""

    def go() -> float:
        archive, db = work / "pulled.oci.tar", work / "s.sqlite"
        work.mkdir(parents=True, exist_ok=True)
        archive.unlink(missing_ok=True)
        fresh_store(db)
        a = run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{src}",
                 f"oci-archive:{archive}:{ref_name}"])
        b = run(ldb(db, "import", archive))
        rss.append(b.rss)
        parts["skopeo copy"].append(a.wall)
        parts["layerdb import"].append(b.wall)
        archive.unlink()
        return a.wall + b.wall

    return go


def buildah_case(src: str, root: Path):
    def go() -> float:
        rmtree(root)
        root.mkdir(parents=True)
        return run(["buildah", "--root", root / "root", "--runroot", root / "run", "--storage-driver", "vfs",
                    "pull", "-q", "--tls-verify=false", f"docker://{src}"]).wall

    return go


def image_id(db: Path, name: str) -> str:
    out = subprocess.run(ldb(db, "images", "--json"), capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        obj = json.loads(line)
        if name in obj.get("repo_tags", []):
            return obj["id"]
    return ""


def run_bench(runs: int) -> list[Result]:
    fam = images.FAMILY
    images.ensure_images(fam)
    for tool in ("skopeo", "buildah"):
        if not have(tool):
            raise RuntimeError(f"bench_pull needs {tool} (Debian package {tool})")
    work = scratch("pull")
    reg = Registry(work / "registry")
    try:
        return _bench(runs, work, reg)
    finally:
        reg.stop()
        rmtree(work)


def _bench(runs: int, work: Path, reg: Registry) -> list[Result]:
    fam = images.FAMILY
    src = {}
    for s in fam:
        img = images.IMAGES[s]
        src[s] = f"{reg.host}/{img.name}"
        run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci-archive:{images.oci_archive(s)}:{img.ref_name}",
             f"docker://{src[s]}"])
    log(f"registry {reg.host}: the family pushed with skopeo")
    base = images.DEB_PYTHON
    bimg = images.IMAGES[base]
    db = work / "store.sqlite"
    rss_pull: list[int] = []
    rss_import: list[int] = []
    parts: dict[str, list[float]] = {"skopeo copy": [], "layerdb import": []}
    log(f"pull Debian+python3: layerdb pull vs skopeo copy + layerdb import vs buildah pull (vfs), {runs} rounds")
    t = alternate({"layerdb": layerdb_case(src[base], db, rss_pull),
                   "skopeo+import": skopeo_import_case(src[base], bimg.ref_name, work / "skopeo", rss_import,
                                                       parts),
                   "buildah": buildah_case(src[base], work / "buildah")}, runs)
    rmtree(work / "buildah")
    # The pull must store what the archive import stores: the same image id (the config digest).
    pulled_id = image_id(db, f"{src[base]}")
    want_id = "sha256:" + _config_digest(base)
    check = "image id == config digest" if pulled_id == want_id else f"image id {pulled_id!r} != {want_id}"
    blob_bytes = sum(images.layer_meta(n)["size"] for n in bimg.layers)
    lt = median(t["layerdb"])
    out = [
        Result("pull", "pull Debian+python3 from a loopback registry: layerdb pull vs skopeo copy to oci-archive "
               "+ layerdb import", lt, "skopeo+import", median(t["skopeo+import"]), 0.8,
               extra={"image": f"{len(bimg.layers)} layers, {blob_bytes / MiB:.1f} MiB of gzip blobs; {check}",
                      "store": f"{store_size(db) / MiB:.1f} MiB",
                      "the peer's parts (medians)": ", ".join(f"{k} {median(v):.3f} s" for k, v in parts.items())},
               samples=t),
        Result("pull", "pull Debian+python3: layerdb pull vs layerdb import of skopeo's archive alone (figure only)",
               lt, "layerdb import", median(parts["layerdb import"]), None),
        Result("pull", "pull Debian+python3 from a loopback registry: layerdb pull vs buildah pull (vfs, fresh root)",
               lt, "buildah pull", median(t["buildah"]), 0.25, samples=t),
    ]

    # With the base stored, each other family member: the bytes moved against its unshared blobs.
    tmpl = work / "base.sqlite"
    fresh_store(tmpl)
    run(ldb(tmpl, "pull", "--tls-verify=false", "-q", src[base]))
    store_size(tmpl)  # folds the WAL into the file, so copying the file copies the store
    have_ids = {images.layer_meta(n)["diff_id"] for n in bimg.layers}
    worst = None
    facts = {}
    rss_fam: list[int] = []
    for s in fam:
        if s == base:
            continue
        img = images.IMAGES[s]
        unshared = [n for n in img.layers if images.layer_meta(n)["diff_id"] not in have_ids]
        want = sum(images.layer_meta(n)["size"] for n in unshared)
        fresh_store(db)
        shutil.copy(tmpl, db)
        mark = len(reg.requests())
        r = run(ldb(db, "pull", "--tls-verify=false", "-q", src[s]))
        rss_fam.append(r.rss)
        reqs = reg.requests()[mark:]
        moved = sum(b for m, _, st, b in reqs if m == "GET" and st in (200, 206))
        blobs_got = sum(1 for m, p, st, _ in reqs if m == "GET" and "/blobs/" in p and st in (200, 206))
        ratio = moved / want if want else float("inf")
        facts[img.name] = (f"{moved / MiB:.2f} MiB moved for {len(unshared)} unshared layers of "
                           f"{want / MiB:.2f} MiB ({ratio:.3f}x; {blobs_got} blob GETs incl. the config; "
                           f"{len(reqs)} requests; {r.wall:.2f} s)")
        if worst is None or ratio > worst[2]:
            worst = (s, moved, ratio, want)
    s, moved, _, want = worst
    out.append(Result("pull", f"pull a family member with Debian+python3 stored: bytes moved vs its unshared "
                      f"layers' blobs (worst: {images.IMAGES[s].name})", moved, "unshared blobs", want, 1.05,
                      unit="B", extra=facts,
                      note="response bodies from the registry's access log (manifest, config, layers); "
                           "HTTP headers not counted"))
    out.append(Result("pull", "peak RSS, layerdb pull (Debian+python3 into an empty store, family members "
                      "onto it)", max(rss_pull + rss_fam), "limit", LIMIT_RSS, 1.0, unit="B",
                      extra={"pull into an empty store": f"{max(rss_pull) / MiB:.0f} MiB",
                             "family members": f"{max(rss_fam) / MiB:.0f} MiB",
                             "layerdb import of skopeo's archive": f"{max(rss_import) / MiB:.0f} MiB"}))
    return out


def _config_digest(slug: str) -> str:
    """The config digest of the image in its OCI archive (index -> manifest -> config)."""
    import tarfile

    with tarfile.open(images.oci_archive(slug)) as tar:
        def blob(digest: str) -> bytes:
            return tar.extractfile("blobs/sha256/" + digest.split(":", 1)[1]).read()

        index = json.loads(tar.extractfile("index.json").read())
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        return manifest["config"]["digest"].split(":", 1)[1]


if __name__ == "__main__":
    main_for(__doc__, run_bench)
