"""`layerdb build` on its own: the cache, stages, bad input, heredocs, ADD, the CLI.

RUN steps use real namespaces and kernel overlayfs (root needed); expected
results of what buildah 1.28 lacks (heredocs, --link, symbolic --chmod) come
from the Dockerfile reference."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import shutil
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
        ("FROM sample:1.0\nRUN --mount=type=secret,id=nope,required cat /run/secrets/nope\n", BuildError,
         "no secret 'nope' was given"),
        ("FROM sample:1.0\nRUN --mount=type=nfs,target=/x true\n", DockerfileError,
         "Dockerfile:2: RUN --mount: type=nfs is not supported"),
        ("FROM sample:1.0\nRUN --mount=type=bind,target=/x,bogus=1 true\n", DockerfileError, "unknown key 'bogus'"),
        ("FROM sample:1.0\nRUN --mount=type=bind,source=../up,target=/x true\n", ContextError,
         "outside the build context"),
        ("FROM sample:1.0\nRUN --mount=type=bind,from=nothing,target=/x true\n", BuildError,
         "--from=nothing: no stage or stored image"),
        ("FROM sample:1.0\nRUN --mount=type=tmpfs true\n", DockerfileError, "needs a target"),
        ("FROM sample:1.0\nRUN --mount=type=secret,id=missing true\n", BuildError,
         "secret 'missing': cannot read /nonexistent/secret: No such file or directory"),
        ("FROM --platform=linux/arm64 sample:1.0\n", BuildError,
         "FROM sample:1.0: the stored image is linux/amd64, not linux/arm64/v8"),
    ]
    for i, (text, cls, message) in enumerate(cases):
        ctx = make_ctx(tmp_path / str(i), text)
        based.store.conn.execute("PRAGMA wal_checkpoint")
        before = store_dump(tmp_path / "store.sqlite")
        with pytest.raises(cls) as e:
            build(based, ctx, tmp_path, tags=["bad:1"], secrets={"missing": "/nonexistent/secret"})
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


def _serve(directory: Path) -> http.server.ThreadingHTTPServer:
    """A real HTTP server for ADD of URLs (call .shutdown())."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(directory), **kw)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_add_archive_and_url(db, tmp_path):
    ctx = make_ctx(tmp_path, "", {})
    _tar_gz(ctx / "pkg.tar.gz")
    served = tmp_path / "www"
    served.mkdir()
    (served / "file.bin").write_bytes(b"remote bytes")
    srv = _serve(served)
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
        (ctx / "Dockerfile").write_text("FROM sample:1.0\nRUN --mount=type=secret,id=k cat /run/secrets/k > /k\n")
        (tmp_path / "k").write_text("key\n")
        import platform

        plat = ["--platform", "linux/amd64"] if platform.machine() == "x86_64" else []  # sample:1.0 is amd64
        r = run_cli("build", "-q", *plat, "--secret", f"id=k,src={tmp_path / 'k'}", str(ctx), db_path=db_path)
        assert r.exit_code == 0 and r.stderr == "", r.output
        assert run_cli("cat", "--at", r.stdout.strip(), "/k", db_path=db_path).stdout == "key\n"
        r = run_cli("build", "--secret", "k", str(ctx), db_path=db_path)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "expected id=ID,src=FILE" in r.stderr
    finally:
        del os.environ["XDG_CACHE_HOME"]


MOUNTS = """\
FROM sample:1.0
ARG TGT=/mnt/in
RUN --mount=type=bind,source=d,target=$TGT,rw echo gone > $TGT/new && cat $TGT/f > /read && ls $TGT > /listed
RUN --mount=type=cache,target=/root/.cache,id=c1 echo run >> /root/.cache/log && cat /root/.cache/log > /seen
RUN --mount=type=secret,id=tok,required=true cat /run/secrets/tok > /dev/null && echo ok > /secret-ok
RUN --mount=type=tmpfs,target=/scratch,size=1m echo x > /scratch/x && ls /scratch > /tmpfs
"""


@root_only
def test_run_mounts_follow_the_reference(based, tmp_path):
    """What buildah 1.28 does otherwise, from the Dockerfile reference: writes to a
    read-write bind are thrown away (buildah writes them into the context); a cache
    persists between builds and is not part of the key; a secret's contents are
    neither in a layer nor in the key; a bind's contents are."""
    ctx = make_ctx(tmp_path, MOUNTS, {"d/f": "one\n"})
    tok = tmp_path / "tok"
    tok.write_text("T0KEN-VALUE\n")
    first = build(based, ctx, tmp_path, tags=["m:1"], secrets={"tok": str(tok)})
    assert sorted(os.listdir(ctx / "d")) == ["f"]  # the context is unchanged
    assert cat(based, "m:1", "/read") == b"one\n" and cat(based, "m:1", "/listed") == b"f\nnew\n"
    assert cat(based, "m:1", "/seen") == b"run\n" and cat(based, "m:1", "/secret-ok") == b"ok\n"
    assert cat(based, "m:1", "/tmpfs") == b"x\n"
    for gone in ("/mnt", "/run/secrets", "/scratch", "/root/.cache"):  # no mountpoint is left
        assert based.lookup("m:1", gone) is None, gone
    tar = tmp_path / "m.tar"
    with open(tar, "wb") as f:
        based.save(["m:1"], f)
    assert b"T0KEN-VALUE" not in tar.read_bytes()
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"layerdb-secret-{os.getpid()}-")] == []
    tok.write_text("OTHER\n")  # a secret's contents are no input
    again = build(based, ctx, tmp_path, secrets={"tok": str(tok)})
    assert (again.id, again.misses) == (first.id, [])
    nocache = build(based, ctx, tmp_path, secrets={"tok": str(tok)}, no_cache=True)
    assert cat(based, nocache.id, "/seen") == b"run\nrun\n"  # the cache mount kept the first build's write
    (ctx / "d" / "f").write_text("two\n")  # a bind's contents are an input
    changed = build(based, ctx, tmp_path, secrets={"tok": str(tok)})
    assert changed.misses[0]["step"].startswith("RUN --mount=type=bind") and "mounts" in changed.misses[0]["why"]
    assert cat(based, changed.id, "/read") == b"two\n"


@root_only
def test_a_secret_not_required_and_not_given_is_no_mount(based, tmp_path):
    ctx = make_ctx(tmp_path, "FROM sample:1.0\nRUN --mount=type=secret,id=nope cat /run/secrets/nope || echo absent > /a\n")
    assert cat(based, build(based, ctx, tmp_path).id, "/a") == b"absent\n"


def test_copy_parents_exclude_and_add_checksum(db, tmp_path):
    """COPY --parents, COPY --exclude and ADD --checksum, which buildah 1.28 refuses: the
    expected trees come from the Dockerfile reference's own examples."""
    files = {"x/a.txt": "xa", "y/a.txt": "ya", "x/y/b.txt": "xyb", "x/y/c.md": "xyc", "home.txt": "h1",
             "homer.bin": "h2", "src/keep.py": "k", "src/notes.md": "n", "src/sub/deep.md": "d", "src/sub/ok.py": "o"}
    served = tmp_path / "www"
    served.mkdir()
    (served / "blob").write_bytes(b"remote bytes")
    good = "sha256:" + hashlib.sha256(b"remote bytes").hexdigest()
    srv = _serve(served)
    url = f"http://127.0.0.1:{srv.server_address[1]}/blob"
    text = f"""\
FROM scratch AS base
COPY --parents ./x/a.txt ./y/a.txt /parents/
COPY --parents ./x/./y/*.txt /pivot/
COPY --exclude=*.txt hom* /mydir/
COPY --exclude=*.md --exclude=sub/ok.py src /app/
ADD --checksum={good} {url} /dl/blob
FROM scratch
COPY --from=base --parents /parents/./x/a.txt /again/
COPY --from=base --exclude=**/*.py /app /fromapp
"""
    try:
        ctx = make_ctx(tmp_path, text, files)
        res = build(db, ctx, tmp_path, target="base")
        listed = sorted(r["path"] for r in db.listing(res.id, "/", recursive=True) if r["type"] != "d")
        assert listed == ["/app/keep.py", "/app/sub/deep.md", "/dl/blob", "/mydir/homer.bin", "/parents/x/a.txt",
                          "/parents/y/a.txt", "/pivot/y/b.txt"]
        assert cat(db, res.id, "/parents/y/a.txt") == b"ya" and cat(db, res.id, "/dl/blob") == b"remote bytes"
        final = build(db, ctx, tmp_path)
        listed = sorted(r["path"] for r in db.listing(final.id, "/", recursive=True) if r["type"] != "d")
        assert listed == ["/again/x/a.txt", "/fromapp/sub/deep.md"]
        bad = make_ctx(tmp_path / "bad", f"FROM scratch\nADD --checksum=sha256:{'0' * 64} {url} /f\n")
        with pytest.raises(BuildError, match=f"digest mismatch: expected sha256:{'0' * 64}, got {good}"):
            build(db, bad, tmp_path)
        local = make_ctx(tmp_path / "local", f"FROM scratch\nADD --checksum={good} home.txt /f\n", {"home.txt": "h"})
        with pytest.raises(BuildError, match="home.txt is not a URL"):
            build(db, local, tmp_path)
    finally:
        srv.shutdown()


MULTI = REPO_FIXTURES / "multiplatform" / "multi.oci.tar"


def test_from_platform_picks_the_index_image_or_refuses(db, tmp_path):
    """FROM --platform takes that platform's image of the index the stored image came
    from; a stored image of another platform is refused without a registry (--no-pull)
    and pulled for that platform with one, as buildah's pull policy 'missing' does."""
    import json

    import registry_env as R

    if R.registry_binary() is None:
        pytest.skip("needs docker-registry")
    oracle = {n: json.loads((REPO_FIXTURES / "oracle" / n / "index.json").read_text())["config_digest"]
              for n in ("sample", "opaque")}
    regs = R.env()
    ref = R.seed(regs["plain"], f"oci-archive:{MULTI}:multi:1.0", "fx/multi:1.0", "--all")
    amd = R.seed(regs["plain"], f"oci-archive:{REPO_FIXTURES / 'images' / 'sample2.oci.tar'}", "fx/amdonly:1")
    db.pull(ref, all_platforms=True, tls_verify=False)
    db.pull(amd, platform="linux/amd64", tls_verify=False)
    ctx = make_ctx(tmp_path, f"FROM --platform=linux/arm64 {ref}\nENV X=1\n")
    arm = build(db, ctx, tmp_path)
    assert db.history(arm.id)[-1]["diff_id"] == db.history(oracle["opaque"])[-1]["diff_id"]
    assert [h["diff_id"] for h in db.history(arm.id) if h["diff_id"]] == \
        [h["diff_id"] for h in db.history(oracle["opaque"]) if h["diff_id"]]
    plain = build(db, make_ctx(tmp_path / "p", f"FROM {ref}\nENV X=1\n"), tmp_path, platform="linux/amd64")
    assert [h["diff_id"] for h in db.history(plain.id) if h["diff_id"]] == \
        [h["diff_id"] for h in db.history(oracle["sample"]) if h["diff_id"]]
    scratch = build(db, make_ctx(tmp_path / "s", "FROM --platform=linux/arm64 scratch\nENV X=1\n"), tmp_path)
    cfg = json.loads(db.store.scalar("SELECT config FROM image WHERE digest = ?", (scratch.id,)))
    assert (cfg["os"], cfg["architecture"], cfg["variant"]) == ("linux", "arm64", "v8")
    bad = make_ctx(tmp_path / "b", f"FROM --platform=linux/arm64 {amd}\nENV X=1\n")
    with pytest.raises(BuildError, match=f"FROM {amd}: the stored image is linux/amd64, not linux/arm64/v8"):
        build(db, bad, tmp_path)
    # With a registry, the platform the store lacks is pulled; an image with no such
    # platform stays refused after the pull.
    with pytest.raises(BuildError, match="the stored image is linux/amd64, not linux/arm64/v8"):
        build(db, bad, tmp_path, pull=True, tls_verify=False)
    from layerdb.engine.api import LayerDB

    with LayerDB(tmp_path / "two.sqlite") as two:
        two.pull(ref, platform="linux/amd64", tls_verify=False)
        got = build(two, ctx, tmp_path, pull=True, tls_verify=False)
        assert [h["diff_id"] for h in two.history(got.id) if h["diff_id"]] == \
            [h["diff_id"] for h in db.history(oracle["opaque"]) if h["diff_id"]]  # the arm64 image, pulled


@root_only
def test_run_on_more_lower_layers_than_fit_in_a_mount_page(based, tmp_path):
    """250 layers below a RUN: more lower directories than one page of mount options
    holds (overlayfs then gets them one by one through fsconfig); the step sees every
    layer, whiteouts included."""
    n = 250
    lines = ["FROM sample:1.0"] + [f"COPY f{i} /d/f{i}" for i in range(n)]
    lines += ["RUN rm /d/f0", "RUN ls /d | wc -l > /count && cat /d/f1 /d/f249 > /both && ls /d/f0 2>/dev/null >> /both; true"]
    ctx = make_ctx(tmp_path, "\n".join(lines) + "\n", {f"f{i}": f"{i}\n" for i in range(n)})
    res = build(based, ctx, tmp_path)
    assert res.layers == 6 + n + 2
    assert cat(based, res.id, "/count").strip() == str(n - 1).encode()
    assert cat(based, res.id, "/both") == b"1\n249\n"


FUSE = """\
FROM sample:1.0 AS other
RUN mkdir -p /opt/o && echo other > /opt/o/f
FROM sample:1.0
RUN echo a > /a && mkdir -p /var/x && echo y > /var/x/y && ln /a /a2 && ln -s a /al
RUN rm -rf /var/x && mkdir /var/x && echo z > /var/x/z && rm /etc/motd && chmod 600 /app/config.ini
RUN --mount=type=bind,from=other,source=/opt/o,target=/mnt/o cat /mnt/o/f > /from-other
RUN --mount=type=bind,source=.,target=/c,rw echo gone > /c/gone && cat /c/Dockerfile | wc -l > /lines
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("fuse-overlayfs") is None or not os.path.exists("/dev/fuse"),
                    reason="needs root and fuse-overlayfs")
def test_fuse_overlayfs_fallback_makes_the_same_image(based, tmp_path):
    """Where kernel overlayfs cannot be mounted, RUN runs on fuse-overlayfs (forced here):
    the layers come out byte for byte as on the kernel's overlay (same image id), its
    opaque-directory markers and xattrs left out, and it says so once."""
    from layerdb.engine.build.builder import BuildOptions, Builder

    ctx = make_ctx(tmp_path, FUSE)
    kernel = build(based, ctx, tmp_path, timestamp=0, no_cache=True)
    said = []
    opts = BuildOptions(str(ctx), timestamp=0, no_cache=True, cache_dir=str(tmp_path / "cache2"), overlay="fuse")
    fuse = Builder(based.store, based.content, opts, lambda kind, text: said.append((kind, text))).build()
    assert fuse.id == kernel.id
    assert based.lookup(fuse.id, "/etc/motd") is None and cat(based, fuse.id, "/from-other") == b"other\n"
    assert not (ctx / "gone").exists()
    rows = based.log("/var/x/y", image=fuse.id)
    assert [r["op"] for r in rows] == ["add", "delete"]
    assert [k for k, t in said if "fuse-overlayfs" in t] == []  # forced, so not announced as a fallback


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("fuse-overlayfs") is None or not os.path.exists("/dev/fuse"),
                    reason="needs root and fuse-overlayfs")
def test_past_the_kernels_500_lowers_run_falls_back_to_fuse_overlayfs(based, tmp_path):
    n = 500
    lines = ["FROM sample:1.0"] + [f"COPY f{i} /d/f{i}" for i in range(n)] + ["RUN ls /d | wc -l > /count"]
    ctx = make_ctx(tmp_path, "\n".join(lines) + "\n", {f"f{i}": f"{i}\n" for i in range(n)})
    said = []
    res = build(based, ctx, tmp_path, progress=lambda kind, text: said.append(text))
    assert cat(based, res.id, "/count").strip() == str(n).encode()
    assert [t for t in said if "fuse-overlayfs" in t] == [
        "RUN: kernel overlayfs cannot be used (506 lower layers, over its limit of 500); using fuse-overlayfs"]


@root_only
def test_copy_from_a_subtree_reads_it_as_the_whole_view_shows_it(based, tmp_path):
    """COPY --from of one directory replays only the events on its paths: what it copies
    is what the stage's whole view (`view -R`) shows there, hard links, whiteouts and
    opaque directories below it included, and a link to a file outside it as a file."""
    text = """\
FROM sample:1.0 AS s
RUN mkdir -p /var/x/d /var/x/e && echo a > /a && ln /a /var/x/a2 && echo b > /var/x/b && ln /var/x/b /var/x/b2 \\
 && echo old > /var/x/d/old && echo gone > /var/x/gone && ln -s b /var/x/bl && chmod 640 /var/x/b
RUN rm /var/x/gone && rm -rf /var/x/d && mkdir /var/x/d && echo new > /var/x/d/new && touch /other
FROM scratch
COPY --from=s /var/x /got/
"""
    ctx = make_ctx(tmp_path, text)
    stage = build(based, ctx, tmp_path, target="s")
    res = build(based, ctx, tmp_path)

    def rows(ref, top):
        out = []
        for r in based.listing(ref, top, recursive=True):
            out.append((r["path"][len(top):], r["type"] if r["type"] != "h" else "f", r["mode"], r["size"],
                        r["sha256"], r["link"] if r["type"] == "l" else None))
        return sorted(out)

    want = rows(stage.id, "/var/x")
    assert [r[0] for r in want] == ["/a2", "/b", "/b2", "/bl", "/d", "/d/new", "/e"]
    assert rows(res.id, "/got") == want
    a2 = based.lookup(res.id, "/got/a2")
    assert a2.type == "f" and cat(based, res.id, "/got/a2") == b"a\n"


@root_only
def test_the_layer_cache_is_collected(based, tmp_path):
    """Materialised lower dirs go when their diff is gone (rm + gc) and, least recently
    used first, when the cache is over its bound; never those the build used."""
    from layerdb.engine.build.builder import BuildOptions, Builder

    def cached() -> set[str]:
        return {n for n in os.listdir(tmp_path / "cache" / "layers") if len(n) == 20}

    def names(ref, db=based) -> set[str]:
        return {h["diff_id"][7:27] for h in db.history(ref) if h["diff_id"]}

    based.import_archive(str(REPO_FIXTURES / "images" / "sample2.oci.tar"))
    one = build(based, make_ctx(tmp_path / "1", "FROM sample:1.0\nRUN echo 1 > /one\n"), tmp_path, tags=["one:1"])
    assert cached() == names("one:1")  # the base's layers and the RUN's upper dir
    based.remove(["one:1"])
    based.gc()
    base2 = [i for i in based.images() if i["id"] != one.id and "sample:1.0" not in i["repo_tags"]][0]["id"]
    ctx2 = make_ctx(tmp_path / "2", f"FROM {base2}\nRUN echo 2 > /two\n")
    opts = BuildOptions(str(ctx2), cache_dir=str(tmp_path / "cache"), cache_max=1 << 40)
    two = Builder(based.store, based.content, opts).build()
    assert cached() == names("sample:1.0") | names(two.id)  # one's RUN layer went with its diff
    from layerdb.engine.api import LayerDB

    with LayerDB(tmp_path / "other.sqlite") as other:  # another store, the same per-user cache
        other.import_archive(str(BASE))
        theirs = build(other, make_ctx(tmp_path / "3", "FROM sample:1.0\nRUN echo 3 > /three\n"), tmp_path)
        their_names = names(theirs.id, other)
    Builder(based.store, based.content, BuildOptions(str(ctx2), cache_dir=str(tmp_path / "cache"))).build()
    assert their_names <= cached()  # not this store's to collect
    opts = BuildOptions(str(ctx2), cache_dir=str(tmp_path / "cache"), cache_max=0, no_cache=True)
    again = Builder(based.store, based.content, opts).build()
    assert cached() == names(again.id)  # over the bound: all but what this build used
