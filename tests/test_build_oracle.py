"""`layerdb build` against buildah 1.28 (the oracle): the same Dockerfile and context
built by both, compared per build.md §8 (tests/build_oracle.py).  Both build with
--timestamp 0, so file mtimes are compared too.  Needs buildah and root (CI
installs the Debian package buildah)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from build_oracle import buildah_available, buildah_build, compare, read_archive
from conftest import REPO_FIXTURES

pytestmark = pytest.mark.skipif(not buildah_available(), reason="needs buildah (Debian: buildah) and root")

BASE = REPO_FIXTURES / "images" / "sample.oci.tar"

METADATA = """\
# syntax=docker/dockerfile:1
ARG BASE=scratch
FROM ${BASE} AS first
ARG GREETING=hello
ARG LATE
ARG SECOND=2
ENV A=1 B="two words" \\
    # a comment inside the continuation
    C=$A-${B:+set}
env OLD old style value
LABEL a=b "c d"=e
MAINTAINER someone <a@b>
EXPOSE 80 53/udp $A
VOLUME /data ["/x"]
USER 1000:1000
WORKDIR /app/$A
WORKDIR sub
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=3s --retries=2 CMD ["/bin/true"]
ONBUILD RUN echo hi
ENTRYPOINT ["/bin/e"]
CMD ["run", "me"]
"""

LAYERS = """\
ARG BASE
FROM ${BASE}
ARG GREETING=hello
ENV APP=/app
COPY app/ /app/
COPY top.txt /top1
COPY top.txt /newdir/
COPY --chown=7:8 app /own/deep/
COPY --chown=app --chmod=640 top.txt app/main.py /multi/
RUN echo "$GREETING" > /app/greet && rm /app/main.py && mkdir -p /var/x && echo y > /var/x/y
RUN rm -rf /var/x && mkdir /var/x && echo z > /var/x/z && ln /var/x/z /var/x/z2 && ln -s z /var/x/zl
RUN rm -rf /app/cache && chmod 600 /etc/motd
WORKDIR /srv/work
COPY top.txt rel
USER app
RUN id > /tmp/id.txt && pwd >> /tmp/id.txt
CMD ["/bin/sh"]
"""


def _context(tmp_path: Path, dockerfile: str) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "app" / "sub").mkdir(parents=True)
    (ctx / "app" / "main.py").write_text("print(1)\n")
    (ctx / "app" / "skip.tmp").write_text("ignored\n")
    (ctx / "app" / "sub" / "b.txt").write_text("b\n")
    os.chmod(ctx / "app" / "sub" / "b.txt", 0o600)
    (ctx / "top.txt").write_text("top\n")
    (ctx / ".dockerignore").write_text("**/*.tmp\n")
    (ctx / "Dockerfile").write_text(dockerfile)
    for p in ctx.rglob("*"):
        if p.is_dir():
            os.chmod(p, 0o755)
    return ctx


def _mine(db, ctx: Path, tmp_path: Path, base: str | None, **kw) -> str:
    args = {"BASE": base} if base else {}
    res = db.build(str(ctx), build_args=args, tags=["localhost/mine:1"], timestamp=0,
                   cache_dir=str(tmp_path / "cache"), **kw)
    out = tmp_path / "mine.tar"
    with open(out, "wb") as f:
        db.save(["localhost/mine:1"], f)
    return str(out), res


def test_metadata_steps_match_buildah(db, tmp_path):
    ctx = _context(tmp_path, METADATA)
    oracle = tmp_path / "oracle.tar"
    buildah_build(str(ctx), str(oracle))
    mine, res = _mine(db, ctx, tmp_path, None)
    assert compare(str(oracle), mine) == []
    assert res.layers == 0


@pytest.mark.parametrize("root", ["kernel", "export"])
def test_layers_copy_run_match_buildah(db, tmp_path, monkeypatch, root):
    """On the kernel's overlay and on RUN's export/run/apply fallback alike."""
    monkeypatch.setenv("LAYERDB_BUILD_ROOT", root)
    db.import_archive(str(BASE))
    ctx = _context(tmp_path, LAYERS)
    oracle = tmp_path / "oracle.tar"
    buildah_build(str(ctx), str(oracle), {"BASE": f"oci-archive:{BASE}"})
    mine, res = _mine(db, ctx, tmp_path, "sample:1.0")
    assert compare(str(oracle), mine) == []
    assert res.layers == 6 + 10


def test_the_comparator_sees_a_difference(db, tmp_path):
    """The oracle check can fail: a context changed after buildah's build shows up."""
    db.import_archive(str(BASE))
    ctx = _context(tmp_path, LAYERS)
    oracle = tmp_path / "oracle.tar"
    buildah_build(str(ctx), str(oracle), {"BASE": f"oci-archive:{BASE}"})
    (ctx / "top.txt").write_text("changed\n")
    mine, _ = _mine(db, ctx, tmp_path, "sample:1.0")
    diffs = compare(str(oracle), mine)
    assert diffs and all("top" in d or "/multi/top.txt" in d or "rel" in d for d in diffs), diffs


MOUNTS = """\
ARG BASE
FROM ${BASE} AS s1
RUN echo staged > /staged.txt && mkdir -p /opt/d && echo deep > /opt/d/f
FROM ${BASE}
RUN --mount=type=bind,source=app,target=/mnt/ctx cat /mnt/ctx/main.py /mnt/ctx/sub/b.txt > /out1
RUN --mount=type=bind,from=s1,source=/opt/d,target=/mnt/st cat /mnt/st/f > /out2
RUN --mount=type=bind,from=s1,target=/s1 cat /s1/staged.txt > /out2b && ls /s1/opt >> /out2b
RUN --mount=type=cache,target=/var/cache/x echo c >> /var/cache/x/c && cat /var/cache/x/c > /out3
RUN --mount=type=tmpfs,target=/tmpx echo t > /tmpx/t && ls /tmpx > /out4
RUN --mount=type=secret,id=mysec cat /run/secrets/mysec > /out5 && ls -ln /run/secrets/mysec | cut -c1-10 >> /out5
RUN --mount=type=bind,source=top.txt,target=/etc/top.txt cat /etc/top.txt > /out6
"""
MOUNT_TARGETS = ("/mnt/ctx", "/mnt/st", "/s1", "/var/cache/x", "/tmpx", "/run/secrets/mysec", "/etc/top.txt")


def test_run_mounts_match_buildah(db, tmp_path):
    """RUN --mount of the context, a stage, a stage's subdirectory, a cache, a tmpfs, a
    secret and a context file: the same layers as buildah's, bar the mountpoint parents
    buildah leaves behind (mount_targets)."""
    db.import_archive(str(BASE))
    ctx = _context(tmp_path, MOUNTS)
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret\n")
    oracle = tmp_path / "oracle.tar"
    buildah_build(str(ctx), str(oracle), {"BASE": f"oci-archive:{BASE}"},
                  extra=["--secret", f"id=mysec,src={secret}"])
    mine, res = _mine(db, ctx, tmp_path, "sample:1.0", secrets={"mysec": str(secret)})
    assert compare(str(oracle), mine, mount_targets=MOUNT_TARGETS) == []
    assert b"".join(db.cat("localhost/mine:1", "/out5")) == b"s3cret\n-r--------\n"
    assert b"".join(db.cat("localhost/mine:1", "/out2b")) == b"staged\nd\n"
    # Nothing of the mounts is in a layer: only the file each step wrote.
    _, layers = read_archive(mine)
    assert [sorted(layer) for layer in layers[-7:]] == [[f"out{n}"] for n in ("1", "2", "2b", "3", "4", "5", "6")]


def test_changes_of_every_kind_match_buildah_on_both_roots(db, tmp_path, monkeypatch):
    """A RUN that adds, modifies and deletes files, deletes a directory with contents,
    replaces a directory by a file, changes only a mode or an owner, makes hard links
    and a symlink, and writes a file with the same bytes: buildah's layers, on the
    kernel's overlay and on the export/run/apply fallback alike, bar two places where
    buildah's vfs driver (a plain tree difference) and overlayfs part ways, and
    layerdb follows overlayfs as docker does: a hard link to a file of a lower layer
    copies that file up (buildah stores the new name as a file of its own), and a
    directory in which a name came and went is copied up."""
    from test_build_fallback import CHANGES

    db.import_archive(str(BASE))
    ctx = _context(tmp_path, CHANGES.replace("FROM sample:1.0", "ARG BASE\nFROM ${BASE}"))
    oracle = tmp_path / "oracle.tar"
    buildah_build(str(ctx), str(oracle), {"BASE": f"oci-archive:{BASE}"})
    motd = "'f', 420, 0, 0, 37, '53550fa5a9112f8e6814d9b5bdef22b24d05af1a3b30a0aadc26c34553b6b336'"
    for mode in ("kernel", "export"):
        monkeypatch.setenv("LAYERDB_BUILD_ROOT", mode)
        mine, res = _mine(db, ctx, tmp_path, "sample:1.0", no_cache=True)
        assert compare(str(oracle), mine, mount_targets=("/etc/scratch",)) == [
            f"layer 8 /etc/motd: oracle None, mine ({motd}, '', ())",
            f"layer 8 /motd-link: oracle ({motd}, '', ()), mine ('h', 420, 0, 0, 0, '', 'etc/motd', ())",
            "layer 9 /root: oracle None, mine ('d', 448, 0, 0, 0, '', '', ())"], mode
