"""RUN's export/run/apply fallback (engine/build/rootdir.py): where neither kernel
overlayfs nor fuse-overlayfs can serve a step's root.

The same Dockerfiles built on the fallback (forced, and for real in a mount
namespace where the cache sits on an overlayfs, which the kernel refuses as an
upper directory) give the same image id as the kernel-overlay build, so the same
layer tars byte for byte; the layers themselves are checked against what
overlayfs records, written out below by hand."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from build_oracle import read_archive
from conftest import REPO_FIXTURES, store_dump
from test_build import FUSE
from layerdb.engine.build.builder import BuildOptions, Builder
from layerdb.engine.errors import StepFailed

BASE = REPO_FIXTURES / "images" / "sample.oci.tar"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="RUN needs root (namespaces, overlayfs)")
ANNOUNCED = "each RUN exports its root, runs there and applies the difference"

# sample:1.0 has /app/VERSION and /app/version.txt as one hard-linked file, /app/cache/new,
# /app/config.ini, /app/run.sh, /app/settings.ini, /etc/motd, /etc/group, a directory /tmp
# and an empty /root.
CHANGES = """\
FROM sample:1.0
RUN echo new > /added && echo more >> /app/config.ini && rm /app/VERSION && rm -rf /app/cache \\
    && rm -rf /tmp && echo file > /tmp
RUN chmod 600 /app/settings.ini && chown 1:1 /app/run.sh && ln /etc/motd /motd-link && ln -s /etc/passwd /pw \\
    && cp /etc/group /g && cat /g > /etc/group && rm /g
RUN rm -rf /app && mkdir /app && echo again > /app/again && mkdir /a1 && echo h > /a1/x && ln /a1/x /z1 \\
    && echo t > /root/t && rm /root/t
RUN --mount=type=tmpfs,target=/etc/scratch echo t > /etc/scratch/t && echo k > /kept
"""

# Per RUN layer: path -> (type, mode, uid, gid), as the kernel's overlay upper holds it.
EXPECTED = [
    {"added": ("f", 0o644, 0, 0), "app": ("d", 0o755, 0, 0), "app/.wh.VERSION": ("f", 0, 0, 0),
     "app/.wh.cache": ("f", 0, 0, 0), "app/config.ini": ("f", 0o644, 0, 0), "tmp": ("f", 0o644, 0, 0)},
    # /etc/group: rewritten with the same bytes, so copied up; /etc/motd: copied up for its link.
    {"app": ("d", 0o755, 0, 0), "app/run.sh": ("f", 0o755, 1, 1), "app/settings.ini": ("f", 0o600, 0, 0),
     "etc": ("d", 0o755, 0, 0), "etc/group": ("f", 0o644, 0, 0), "etc/motd": ("f", 0o644, 0, 0),
     "motd-link": ("h", 0o644, 0, 0), "pw": ("l", 0o777, 0, 0)},
    # /app made again: opaque; /root: a name came and went, so copied up; /a1/x carries
    # the bytes (first in tree order), /z1 links to it.
    {"a1": ("d", 0o755, 0, 0), "a1/x": ("f", 0o644, 0, 0), "app": ("d", 0o755, 0, 0),
     "app/.wh..wh..opq": ("f", 0, 0, 0), "app/again": ("f", 0o644, 0, 0), "root": ("d", 0o700, 0, 0),
     "z1": ("h", 0o644, 0, 0)},
    # A mountpoint made in /etc for the step leaves nothing of /etc in the layer.
    {"kept": ("f", 0o644, 0, 0)},
]


@pytest.fixture
def based(db):
    db.import_archive(str(BASE))
    return db


def _ctx(tmp_path: Path, text: str) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir(exist_ok=True)
    (ctx / "Dockerfile").write_text(text)
    return ctx


def _build(db, ctx: Path, cache: Path, overlay: str, said: list | None = None, **kw):
    opts = BuildOptions(str(ctx), timestamp=0, no_cache=True, cache_dir=str(cache), overlay=overlay, **kw)
    return Builder(db.store, db.content, opts, (lambda k, t: said.append(t)) if said is not None else None).build()


def _layers(db, ref: str, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"{ref.replace(':', '_')}.tar"
    with open(out, "wb") as f:
        db.save([ref], f)
    return read_archive(str(out))[1]


def test_export_run_apply_makes_the_kernel_overlays_image(based, tmp_path):
    ctx = _ctx(tmp_path, CHANGES)
    kernel = _build(based, ctx, tmp_path / "c1", "kernel", tags=["kernel:1"])
    said: list[str] = []
    export = _build(based, ctx, tmp_path / "c2", "export", said, tags=["export:1"])
    assert export.id == kernel.id
    for name in ("kernel:1", "export:1"):
        layers = _layers(based, name, tmp_path)[-4:]
        assert [{p: x[:4] for p, x in layer.items()} for layer in layers] == EXPECTED, name
    assert b"".join(based.cat(export.id, "/a1/x")) == b"h\n" == b"".join(based.cat(export.id, "/z1"))
    assert b"".join(based.cat(export.id, "/etc/group")) == b"".join(based.cat("sample:1.0", "/etc/group"))
    assert not [t for t in said if ANNOUNCED in t]  # forced: not a fallback
    # The step's root was removed once its layer was stored; nothing of it went to the layer cache.
    assert os.listdir(tmp_path / "c2" / "tmp") == []
    assert not [n for n in os.listdir(tmp_path / "c2" / "layers") if n.startswith("upper-")]


# test_build.FUSE (a directory made again, a stage's subdirectory and the context bound
# read-write), then a whole stage bound read-write, a WORKDIR and a cache.
OPAQUE_AND_MOUNTS = FUSE + """\
RUN --mount=type=bind,from=other,target=/o2,rw cat /o2/opt/o/f > /whole && echo x > /o2/etc/passwd
WORKDIR /srv/w
RUN --mount=type=cache,target=/var/cache/c echo c >> /var/cache/c/n && cat /var/cache/c/n > here
"""


def test_export_run_apply_with_mounts_workdir_and_a_directory_made_again(based, tmp_path):
    ctx = _ctx(tmp_path, OPAQUE_AND_MOUNTS)
    kernel = _build(based, ctx, tmp_path / "c1", "kernel")
    export = _build(based, ctx, tmp_path / "c2", "export")
    assert export.id == kernel.id
    assert [r["op"] for r in based.log("/var/x/y", image=export.id)] == ["add", "delete"]
    assert b"".join(based.cat(export.id, "/srv/w/here")) == b"c\n"
    assert b"".join(based.cat(export.id, "/whole")) == b"other\n"
    assert b"".join(based.cat(export.id, "/lines")).strip() == b"%d" % OPAQUE_AND_MOUNTS.count("\n")
    assert not (ctx / "gone").exists()  # a read-write bind's writes are thrown away


def test_a_failing_run_on_the_fallback_leaves_the_store_and_no_directories(based, tmp_path):
    ctx = _ctx(tmp_path, "FROM sample:1.0\nRUN echo x > /x && mkdir /d && echo bye && exit 4\n")
    based.store.conn.execute("PRAGMA wal_checkpoint")
    before = store_dump(tmp_path / "store.sqlite")
    with pytest.raises(StepFailed) as e:
        _build(based, ctx, tmp_path / "c", "export", tags=["bad:1"])
    assert "exited with status 4; its last output:\nbye" in e.value.message
    assert store_dump(tmp_path / "store.sqlite") == before
    cache = tmp_path / "c"
    assert os.listdir(cache / "tmp") == []
    assert not [n for n in os.listdir(cache / "layers") if n.startswith("upper-")]
    with open("/proc/self/mountinfo") as f:
        assert str(cache) not in f.read()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_where_overlayfs_cannot_mount_the_fallback_is_announced_once(based, tmp_path):
    """For real: in a mount namespace of its own, the build cache is on an overlayfs
    (the kernel refuses that as an upper directory) and PATH finds no fuse-overlayfs.
    RUN --mount of a stage and a read-write bind, overlays elsewhere, work there too."""
    ctx = _ctx(tmp_path, OPAQUE_AND_MOUNTS)
    kernel = _build(based, ctx, tmp_path / "c1", "kernel")
    layerdb = str(Path(sys.executable).parent / "layerdb")
    d = tmp_path / "ns"
    for n in ("lower", "upper", "work", "cache"):
        (d / n).mkdir(parents=True)
    script = (f"/bin/mount --make-rprivate / && /bin/mount -t overlay overlay -o lowerdir={d}/lower,upperdir={d}/upper,"
              f"workdir={d}/work {d}/cache && exec {layerdb} --db {tmp_path}/store.sqlite build --no-cache"
              f" --timestamp 0 --iidfile {tmp_path}/iid {ctx}")
    env = {k: v for k, v in os.environ.items() if k not in ("LAYERDB_BUILD_ROOT", "LAYERDB_DB")}
    r = subprocess.run([shutil.which("unshare"), "-m", "/bin/sh", "-c", script], capture_output=True, text=True,
                       env={**env, "PATH": "/nonexistent", "XDG_CACHE_HOME": str(d / "cache")})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (r.stdout + r.stderr).splitlines()
    announced = [ln for ln in lines if ANNOUNCED in ln]
    assert len(announced) == 1 and "kernel overlayfs cannot be used" in announced[0], lines
    assert (tmp_path / "iid").read_text().strip() == kernel.id
    assert not os.path.ismount(d / "cache")


def test_an_unknown_forced_root_is_one_error_line(based, tmp_path, monkeypatch):
    from conftest import run_cli

    ctx = _ctx(tmp_path, "FROM sample:1.0\nRUN true\n")
    monkeypatch.setenv("LAYERDB_BUILD_ROOT", "vfs")
    r = run_cli("build", str(ctx), db_path=tmp_path / "store.sqlite")
    assert r.exit_code != 0
    assert r.output.strip().splitlines() == ["layerdb: error: LAYERDB_BUILD_ROOT=vfs: use one of auto, kernel, fuse,"
                                             " export"]
