"""RUN --mount=type=cache as the Dockerfile reference has it (buildah 1.28 treats
`private` as `shared` and cannot seed a cache): `sharing=locked` lets one step at
a time use the cache, `sharing=private` gives a concurrent use an instance of
its own, and `from=`/`source=` seed a new cache from a stage.

Concurrency is real: two `layerdb build` processes on one store and one cache.
The first build's step holds the cache until the test creates a file in it;
whether the second waits is read from /proc/locks (a blocked flock shows as
`->`) and from what each step wrote, never from timings."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_FIXTURES

BASE = REPO_FIXTURES / "images" / "sample.oci.tar"
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="RUN needs root (namespaces, overlayfs)")
LAYERDB = str(Path(sys.executable).parent / "layerdb")
# Waits until the test creates /c/go in the cache (deadline: the test's own).
HOLD = "RUN --mount=type=cache,target=/c,id=k,sharing={s} echo {w} >> /c/log && until [ -e /c/go ]; do sleep 0.05; done\n"
USE = "RUN --mount=type=cache,target=/c,id=k,sharing={s} cat /c/log > /seen 2>/dev/null; echo {w} >> /c/log\n"


@pytest.fixture
def based(db):
    db.import_archive(str(BASE))
    return db


def _ctx(tmp_path: Path, name: str, text: str) -> Path:
    ctx = tmp_path / name
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM sample:1.0\n" + text)
    return ctx


def _start(tmp_path: Path, ctx: Path, tag: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("LAYERDB_DB", "LAYERDB_BUILD_ROOT")}
    return subprocess.Popen([LAYERDB, "--db", str(tmp_path / "store.sqlite"), "build", "--no-cache", "-t", tag,
                             str(ctx)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**env, "XDG_CACHE_HOME": str(tmp_path / "xdg")})


def _cache(tmp_path: Path, n: int = 0) -> Path:
    d = tmp_path / "xdg" / "layerdb" / "mounts" / hashlib.sha256(b"k").hexdigest()[:24]
    return d if n == 0 else Path(f"{d}-{n}")


def _until(cond, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 120  # a guard against a hang, not an assertion on time
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the build ended before {what}: {proc.stdout.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within 120 s")
        time.sleep(0.05)


def _blocked_on(path: Path) -> bool:
    st = os.stat(path)
    tail = f":{st.st_ino} "
    with open("/proc/locks") as f:
        return any("->" in ln and "FLOCK" in ln and (ln.rstrip() + " ").find(tail) > 0 for ln in f)


def _finish(proc: subprocess.Popen) -> str:
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    return out


def test_a_locked_cache_waits_for_the_step_using_it(based, tmp_path):
    a = _start(tmp_path, _ctx(tmp_path, "a", HOLD.format(s="locked", w="a")), "a:1")
    try:
        _until(lambda: (_cache(tmp_path) / "log").exists(), a, "the first step wrote to the cache")
        b = _start(tmp_path, _ctx(tmp_path, "b", USE.format(s="locked", w="b")), "b:1")
        try:
            _until(lambda: _blocked_on(_cache(tmp_path)), b, "the second build waited for the lock")
            assert (_cache(tmp_path) / "log").read_text() == "a\n"  # the second step has not run
            (_cache(tmp_path) / "go").touch()
            _finish(a)
            _finish(b)
        finally:
            b.kill()
    finally:
        (_cache(tmp_path) / "go").touch()
        a.kill()
    assert b"".join(based.cat("b:1", "/seen")) == b"a\n"
    assert (_cache(tmp_path) / "log").read_text() == "a\nb\n"


def test_a_private_cache_gives_a_concurrent_step_an_instance_of_its_own(based, tmp_path):
    a = _start(tmp_path, _ctx(tmp_path, "a", HOLD.format(s="private", w="a")), "a:1")
    try:
        _until(lambda: (_cache(tmp_path) / "log").exists(), a, "the first step wrote to the cache")
        # Runs to the end while the first step still holds its instance: no waiting.
        _finish(_start(tmp_path, _ctx(tmp_path, "b", USE.format(s="private", w="b")), "b:1"))
        assert a.poll() is None
        (_cache(tmp_path) / "go").touch()
        _finish(a)
    finally:
        (_cache(tmp_path) / "go").touch()
        a.kill()
    assert based.lookup("b:1", "/seen").size == 0  # a fresh, empty instance
    assert (_cache(tmp_path, 1) / "log").read_text() == "b\n"
    assert (_cache(tmp_path) / "log").read_text() == "a\n"
    # Alone, a private use takes the first free instance: the original.
    _finish(_start(tmp_path, _ctx(tmp_path, "c", USE.format(s="private", w="c")), "c:1"))
    assert b"".join(based.cat("c:1", "/seen")) == b"a\n"
    assert not _cache(tmp_path, 2).exists()


SEEDED = """\
FROM sample:1.0 AS seed
RUN mkdir -p /opt/seed/sub && echo seeded > /opt/seed/s && echo deep > /opt/seed/sub/d && chmod 640 /opt/seed/s
FROM sample:1.0
RUN --mount=type=cache,target=/c,from=seed,source=/opt/seed cat /c/s /c/sub/d > /got && ls -ln /c/s | cut -c1-10 >> /got \\
    && echo more >> /c/s
"""


def test_a_cache_is_seeded_from_a_stage_once(based, tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(SEEDED)
    first = based.build(str(ctx), cache_dir=str(tmp_path / "cache"))
    assert b"".join(based.cat(first.id, "/got")) == b"seeded\ndeep\n-rw-r-----\n"
    # The cache keeps what the step wrote; it is not seeded again.
    again = based.build(str(ctx), cache_dir=str(tmp_path / "cache"), no_cache=True)
    assert b"".join(based.cat(again.id, "/got")) == b"seeded\nmore\ndeep\n-rw-r-----\n"
    assert based.lookup(again.id, "/c") is None and based.lookup(again.id, "/opt/seed") is None
