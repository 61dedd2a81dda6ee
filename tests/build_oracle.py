"""Comparing two image archives as build.md §8 says: the layer count, the history
(created_by with COPY/ADD content digests masked, empty_layer), the config
fields, and per layer every path's type, mode, owner, size, sha256, link
target and xattrs.  Used with buildah as the oracle (tests/test_build_oracle.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile

CONFIG_FIELDS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "ExposedPorts", "Volumes", "Labels",
                 "StopSignal", "Healthcheck", "OnBuild", "Shell")
# What buildah 1.28's chroot isolation leaves in a RUN layer when the base lacks
# it (buildah #4242); layerdb leaves none of it, on purpose.
RUNTIME_STUBS = {"dev", "proc", "sys", "run", "etc/hosts", "etc/resolv.conf", "etc/hostname", "run/.containerenv"}
DIGEST = re.compile(r"\b(file|dir|multi):[0-9a-f]{64}")


def buildah_available() -> bool:
    return shutil.which("buildah") is not None and os.geteuid() == 0


def buildah_build(context: str, out_tar: str, build_args: dict[str, str] | None = None,
                  dockerfile: str | None = None, timestamp: int = 0, extra: list[str] | None = None) -> None:
    """buildah bud --layers --format docker into a private vfs store, pushed to a docker-archive."""
    work = tempfile.mkdtemp(prefix="layerdb-oracle-")
    ba = ["buildah", "--storage-driver", "vfs", "--root", f"{work}/root", "--runroot", f"{work}/run"]
    try:
        cmd = ba + ["bud", "-q", "--isolation", "chroot", "--layers", "--format", "docker", "--timestamp",
                    str(timestamp), "-t", "localhost/oracle:1"]
        for k, v in (build_args or {}).items():
            cmd += ["--build-arg", f"{k}={v}"]
        if dockerfile:
            cmd += ["-f", dockerfile]
        cmd += list(extra or [])
        # buildah keeps RUN --mount=type=cache directories under $TMPDIR (else /var/tmp),
        # outside its --root: a private one keeps them from leaking between builds.
        os.makedirs(f"{work}/tmp")
        r = subprocess.run(cmd + [context], capture_output=True, text=True, env={**os.environ, "TMPDIR": f"{work}/tmp"})
        if r.returncode:
            raise AssertionError(f"buildah bud failed: {r.stderr.strip()[-2000:]}")
        subprocess.run(ba + ["push", "-q", "localhost/oracle:1", f"docker-archive:{out_tar}:localhost/oracle:1"],
                       check=True, capture_output=True)
    finally:
        subprocess.run(ba + ["rm", "-a"], capture_output=True)
        subprocess.run(["chmod", "-R", "u+w", work], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def read_archive(path: str) -> tuple[dict, list[dict[str, tuple]]]:
    """(config, [per layer: {path: (type, mode, uid, gid, size, sha256, link, xattrs)}])."""
    with tarfile.open(path) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        config = json.load(t.extractfile(manifest["Config"]))
        layers = []
        for name in manifest["Layers"]:
            with tarfile.open(fileobj=t.extractfile(name)) as lt:
                layers.append(_layer(lt))
    return config, layers


def _layer(lt: tarfile.TarFile) -> dict[str, tuple]:
    out = {}
    for m in lt:
        p = m.name.lstrip("./").rstrip("/") if m.name not in (".", "./") else ""
        if not p:
            continue
        kind = {tarfile.REGTYPE: "f", tarfile.AREGTYPE: "f", tarfile.DIRTYPE: "d", tarfile.SYMTYPE: "l",
                tarfile.LNKTYPE: "h", tarfile.CHRTYPE: "c", tarfile.BLKTYPE: "b", tarfile.FIFOTYPE: "p"}[m.type]
        sha = ""
        if kind == "f":
            sha = hashlib.sha256(lt.extractfile(m).read()).hexdigest()
        xattrs = tuple(sorted((k, v) for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")))
        out[p] = (kind, m.mode & 0o7777, m.uid, m.gid, m.size if kind == "f" else 0, sha,
                  m.linkname.lstrip("/") if kind == "h" else m.linkname, xattrs)
    return out


def _empty(v) -> bool:
    return v in (None, "", [], {})


def compare(oracle: str, mine: str, mtimes: bool = False, mount_targets: tuple[str, ...] = ()) -> list[str]:
    """Every difference between two image archives, one line each (empty: the same).
    mount_targets: RUN --mount targets, whose parents buildah 1.28 leaves in the layer
    when the image lacks them (as its runtime stubs) and layerdb does not."""
    runtime_stubs = set(RUNTIME_STUBS)
    for t in mount_targets:
        parts = t.strip("/").split("/")
        runtime_stubs |= {"/".join(parts[:i]) for i in range(1, len(parts) + 1)}
    ocfg, olayers = read_archive(oracle)
    mcfg, mlayers = read_archive(mine)
    out = []
    if len(olayers) != len(mlayers):
        out.append(f"layer count: oracle {len(olayers)}, mine {len(mlayers)}")

    def hist(cfg):
        return [(DIGEST.sub(r"\1", h.get("created_by", "")).rstrip(), bool(h.get("empty_layer")))
                for h in cfg.get("history", [])]

    oh, mh = hist(ocfg), hist(mcfg)
    if oh != mh:
        for i in range(max(len(oh), len(mh))):
            a = oh[i] if i < len(oh) else None
            b = mh[i] if i < len(mh) else None
            if a != b:
                out.append(f"history {i}: oracle {a}, mine {b}")
    oc, mc = ocfg.get("config") or {}, mcfg.get("config") or {}
    for k in CONFIG_FIELDS:
        a, b = oc.get(k), mc.get(k)
        if k == "Labels" and isinstance(a, dict):
            a = {x: y for x, y in a.items() if x != "io.buildah.version"} or None
        if not (_empty(a) and _empty(b)) and a != b:
            out.append(f"config {k}: oracle {a!r}, mine {b!r}")
    if ocfg.get("author") != mcfg.get("author"):
        out.append(f"author: oracle {ocfg.get('author')!r}, mine {mcfg.get('author')!r}")
    # Per layer: every entry but the whiteout markers, exactly; and the view after
    # the layer (what the markers hide), as a whiteout per file and an opaque
    # directory say the same thing in two ways (buildah's vfs diff writes the former).
    oview: dict[str, tuple] = {}
    mview: dict[str, tuple] = {}
    for i, (a, b) in enumerate(zip(olayers, mlayers), 1):
        stubs = {p for p, x in a.items() if p in runtime_stubs and p not in b and (x[0] == "d" or x[4] == 0)}
        for p in sorted((set(a) | set(b)) - stubs):
            if _marker(p):
                continue
            x, y = a.get(p), b.get(p)
            if x != y:
                out.append(f"layer {i} /{p}: oracle {x}, mine {y}")
        _apply(oview, {p: x for p, x in a.items() if p not in stubs})
        _apply(mview, b)
        for p in sorted(set(oview) ^ set(mview)):
            out.append(f"view after layer {i} /{p}: oracle {'has' if p in oview else 'lacks'} it,"
                       f" mine {'has' if p in mview else 'lacks'} it")
    return out


def _marker(p: str) -> bool:
    return p.rsplit("/", 1)[-1].startswith(".wh.")


def _apply(view: dict[str, tuple], layer: dict[str, tuple]) -> None:
    def drop(prefix: str) -> None:
        for q in [q for q in view if q.startswith(prefix)]:
            del view[q]

    for p in layer:
        head, _, base = p.rpartition("/")
        if base == ".wh..wh..opq":
            drop(head + "/" if head else "")
        elif base.startswith(".wh."):
            gone = (head + "/" if head else "") + base[4:]
            view.pop(gone, None)
            drop(gone + "/")
    for p, x in layer.items():
        if not _marker(p):
            view[p] = x
