"""`layerdb build` on its own: the cache, stages, bad input, heredocs, ADD, the CLI.

RUN steps use real namespaces and kernel overlayfs (root needed); expected
results of what buildah 1.28 lacks (heredocs, --link, symbolic --chmod) come
from the Dockerfile reference."""

from __future__ import annotations

import gzip
import http.server
import io
import os
import tarfile
import threading
from pathlib import Path

import pytest

from conftest import REPO_FIXTURES, run_cli, store_dump
from layerdb.engine.errors import BuildError, ContextError, DockerfileError, StepFailed

BASE = REPO_FIXTURES / "images" / "sample.oci.tar"
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="RUN needs root (namespaces, overlayfs)")


@pytest.fixture
def based(db):
    db.import_archive(str(BASE))
    return db


def make_ctx(tmp_path: Path, dockerfile: str, files: dict[str, str] | None = None) -> Path:
    ctx = tmp_path / "ctx"
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "Dockerfile").write_text(dockerfile)
    for name, text in (files or {}).items():
        p = ctx / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return ctx


def build(db, ctx, tmp_path, **kw):
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return db.build(str(ctx), **kw)


def cat(db, ref, path) -> bytes:
    return b"".join(db.cat(ref, path))


CACHED = """\
FROM sample:1.0
ARG V=1
COPY app.txt /app/app.txt
RUN echo $V > /app/v
CMD ["/bin/true"]
"""


@root_only
def test_cache_hits_misses_and_says_why(based, tmp_path):
    ctx = make_ctx(tmp_path, CACHED, {"app.txt": "one\n"})
    first = build(based, ctx, tmp_path, tags=["t:1"])
    assert first.cached == 0 and first.new_image
    again = build(based, ctx, tmp_path, tags=["t:1"])
    assert (again.id, again.cached, again.new_image) == (first.id, 4, False)  # no new layer, no new image
    os.utime(ctx / "app.txt", (1, 1))  # a touch still hits
    assert build(based, ctx, tmp_path).id == first.id
    (ctx / "app.txt").write_text("two\n")
    changed = build(based, ctx, tmp_path)
    assert changed.id != first.id
    assert [m["step"] for m in changed.misses] == ["COPY app.txt /app/app.txt", "RUN echo $V > /app/v",
                                                  'CMD ["/bin/true"]']
    assert "sources /app/app.txt changed" in changed.misses[0]["why"]
    assert changed.misses[1]["why"] == "an earlier step was rebuilt"
    arg = build(based, ctx, tmp_path, build_args={"V": "2"})
    assert arg.misses[0]["step"] == "ARG V=1" and "args" in arg.misses[0]["why"]
    assert cat(based, arg.id, "/app/v") == b"2\n"
    nocache = build(based, ctx, tmp_path, no_cache=True)
    assert nocache.cached == 0 and all(m["why"] == "--no-cache" for m in nocache.misses)


@root_only
def test_reproducible_with_timestamp(based, tmp_path):
    ctx = make_ctx(tmp_path, CACHED, {"app.txt": "one\n"})
    a = build(based, ctx, tmp_path, timestamp=1700000000)
    b = build(based, ctx, tmp_path, timestamp=1700000000, no_cache=True)
    assert a.id == b.id
    node = based.lookup(a.id, "/app/v")
    assert node.mtime == 1700000000


@root_only
def test_run_writes_are_audited_per_step(based, tmp_path):
    ctx = make_ctx(tmp_path, "FROM sample:1.0\nRUN echo a > /f\nRUN echo b > /f && rm /etc/motd\n")
    res = build(based, ctx, tmp_path, tags=["audit:1"])
    rows = based.log("/f", image="audit:1")
    assert [(r["op"], r["created_by"]) for r in rows] == [("add", "/bin/sh -c echo a > /f"),
                                                        ("modify", "/bin/sh -c echo b > /f && rm /etc/motd")]
    motd = based.log("/etc/motd", image="audit:1")
    assert motd[-1]["op"] == "delete"
    assert res.layers == 8


@root_only
def test_run_failure_and_bad_input_leave_the_store_as_it_was(based, tmp_path):
    cases = [
        ("FROM sample:1.0\nRUN echo out; echo err >&2; exit 3\n", StepFailed, "exited with status 3"),
        ("FROM sample:1.0\nECHO hi\n", DockerfileError, "Dockerfile:2: unknown instruction: ECHO"),
        ("FROM sample:1.0\nCOPY missing.txt /\n", ContextError, "missing.txt: no such file"),
        ("FROM sample:1.0\nCOPY ../outside /\n", ContextError, "outside the build context"),
        ("FROM nothing:here\n", BuildError, "FROM nothing:here: no such image in the store"),
    ]
    for i, (text, cls, message) in enumerate(cases):
        ctx = make_ctx(tmp_path / str(i), text)
        based.store.conn.execute("PRAGMA wal_checkpoint")
        before = store_dump(tmp_path / "store.sqlite")
        with pytest.raises(cls) as e:
            build(based, ctx, tmp_path, tags=["bad:1"])
        assert message in e.value.message
        after = store_dump(tmp_path / "store.sqlite")
        assert [t for t in before if t[0] != "build_cache"] == [t for t in after if t[0] != "build_cache"], text
    assert not [r for r in based.images() if "bad:1" in r["repo_tags"]]


@root_only
def test_failed_run_reports_its_last_lines(based, tmp_path):
    ctx = make_ctx(tmp_path, "FROM sample:1.0\nRUN echo out; echo err >&2; exit 3\n")
    with pytest.raises(StepFailed) as e:
        build(based, ctx, tmp_path)
    assert e.value.exit_status == 3 and e.value.output.splitlines() == ["out", "err"]
    assert "Dockerfile:2" in e.value.message


@root_only
def test_stages_target_and_copy_from(based, tmp_path):
    text = """\
FROM sample:1.0 AS builder
RUN echo built > /out.txt
FROM sample:1.0 AS unused
RUN exit 1
FROM scratch
COPY --from=builder /out.txt /got.txt
COPY --from=0 /app/run.sh /run.sh
"""
    ctx = make_ctx(tmp_path, text)
    res = build(based, ctx, tmp_path, tags=["final:1"])  # the failing stage is never built
    assert cat(based, "final:1", "/got.txt") == b"built\n"
    assert based.lookup("final:1", "/run.sh").mode == 0o755
    assert res.layers == 2
    tgt = build(based, ctx, tmp_path, target="builder")
    assert cat(based, tgt.id, "/out.txt") == b"built\n"
    with pytest.raises(BuildError, match="--target nope: no such stage"):
        build(based, ctx, tmp_path, target="nope")


def test_heredocs_link_and_symbolic_chmod(db, tmp_path):
    text = """\
FROM scratch
ARG WHO=world
COPY <<EOF /hello.txt
hello $WHO
EOF
COPY --chmod=u+x,g-r <<'RAW' /raw.sh
echo $WHO
RAW
COPY --link --chown=5:6 a.txt /l/a.txt
"""
    ctx = make_ctx(tmp_path, text, {"a.txt": "a\n"})
    os.chmod(ctx / "a.txt", 0o644)
    res = build(db, ctx, tmp_path)
    assert cat(db, res.id, "/hello.txt") == b"hello world\n"
    assert cat(db, res.id, "/raw.sh") == b"echo $WHO\n"
    assert db.lookup(res.id, "/raw.sh").mode == 0o704  # 0644 u+x g-r
    a = db.lookup(res.id, "/l/a.txt")
    assert (a.uid, a.gid, a.mode) == (5, 6, 0o644)
    assert (db.lookup(res.id, "/l").uid, db.lookup(res.id, "/l").gid) == (5, 6)


@root_only
def test_run_heredoc_script(based, tmp_path):
    text = 'FROM sample:1.0\nRUN <<EOT\necho one > /h1\necho "$HOME" > /h2\nEOT\nRUN cat > /h3 <<X\nthree\nX\n'
    res = build(based, make_ctx(tmp_path, text), tmp_path)
    assert cat(based, res.id, "/h1") == b"one\n"
    assert cat(based, res.id, "/h3") == b"three\n"


def _tar_gz(path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in (("pkg/a.txt", b"A\n"), ("pkg/b/c.txt", b"C\n")):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.uid, ti.mode = len(data), 12345, 3, 0o640
            t.addfile(ti, io.BytesIO(data))
    path.write_bytes(gzip.compress(buf.getvalue()))


def test_add_archive_and_url(db, tmp_path):
    ctx = make_ctx(tmp_path, "", {})
    _tar_gz(ctx / "pkg.tar.gz")
    served = tmp_path / "www"
    served.mkdir()
    (served / "file.bin").write_bytes(b"remote bytes")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/file.bin"
        (ctx / "Dockerfile").write_text(f"FROM scratch\nADD pkg.tar.gz /opt/\nADD {url} /dl/\n")
        res = build(db, ctx, tmp_path)
    finally:
        srv.shutdown()
    assert cat(db, res.id, "/opt/pkg/b/c.txt") == b"C\n"
    a = db.lookup(res.id, "/opt/pkg/a.txt")
    assert (a.mtime, a.uid, a.mode) == (12345, 3, 0o640)  # as the archive says
    assert cat(db, res.id, "/dl/file.bin") == b"remote bytes"
    assert db.lookup(res.id, "/dl/file.bin").mode == 0o600
    hist = db.history(res.id)
    assert hist[1]["created_by"].startswith("/bin/sh -c #(nop) ADD file:")


def test_copy_keeps_mtimes_and_dockerignore(db, tmp_path):
    ctx = make_ctx(tmp_path, "FROM scratch\nCOPY . /c/\n", {"keep.txt": "k", "drop.log": "d", "sub/x.log": "x",
                                                             "sub/y.txt": "y", ".dockerignore": "**/*.log\n"})
    os.utime(ctx / "keep.txt", (1111, 1111))
    res = build(db, ctx, tmp_path)
    paths = sorted(r["path"] for r in db.listing(res.id, "/c", recursive=True))
    assert paths == ["/c/.dockerignore", "/c/Dockerfile", "/c/keep.txt", "/c/sub", "/c/sub/y.txt"]
    assert db.lookup(res.id, "/c/keep.txt").mtime == 1111


@root_only
def test_cli_build(based, tmp_path):
    import layerdb.cli.build_cmds  # noqa: F401  (registers `build` until cli/main.py imports it)

    ctx = make_ctx(tmp_path, "FROM sample:1.0\nRUN echo hi && echo there > /t\n")
    iid = tmp_path / "iid"
    db_path = tmp_path / "store.sqlite"
    based.close()
    env_cache = str(tmp_path / "cache")
    os.environ["XDG_CACHE_HOME"] = env_cache
    try:
        r = run_cli("build", "-t", "cli:1", "-t", "cli:2", "--iidfile", str(iid), str(ctx), db_path=db_path)
        assert r.exit_code == 0, r.output
        assert iid.read_text().startswith("sha256:") and iid.read_text() in r.output
        assert "STEP 2/2: RUN echo hi" in r.output and "hi\n" in r.output
        r = run_cli("build", "-f", str(ctx / "nope"), str(ctx), db_path=db_path)
        assert r.exit_code == 7 and "cannot read the Dockerfile" in r.output
    finally:
        del os.environ["XDG_CACHE_HOME"]
