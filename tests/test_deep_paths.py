"""Every path walk works at the deepest path import accepts (4,096 components).

tests/hostile/path-4096-components.tar (make_hostile.py) puts on opaque.oci.tar
a layer with a file and a symlink 4,096 components deep and a hard link to the
file at the top (`deeplink`), then a layer that rewrites the file and removes
the symlink.  What each view must hold follows from those two layer tars; the
commands run as a user runs them (the CLI in a subprocess), and none may leave
a traceback.  A host path that deep is 8 KiB long, twice PATH_MAX: the tests
reach it one directory fd at a time, as the exporter writes it.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from hostile.storecheck import layerdb

HERE = Path(__file__).parent
DEEP_TAR = HERE / "hostile" / "path-4096-components.tar"
DEPTH = 4095  # directories above the deep file
DIR = "/".join(["d"] * DEPTH)
FILE = DIR + "/f"
LINK = DIR + "/l"


def ok(p) -> str:
    err = p.stderr.decode(errors="replace")
    assert p.returncode == 0 and "Traceback" not in err, (p.returncode, err[-2000:])
    return p.stdout.decode("utf-8", "surrogateescape")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("deep") / "store.sqlite"
    ok(layerdb(db, "import", str(DEEP_TAR), "--tag", "deep:1"))
    return db


@pytest.fixture
def tmp_path(tmp_path):
    """tmp_path, emptied by GNU rm at the end: pytest's own cleanup (shutil.rmtree)
    recurses once per directory level and cannot remove a tree this deep."""
    yield tmp_path
    subprocess.run(["rm", "-rf", "--one-file-system", str(tmp_path)], check=False)


def walk_down(root: str, parts: list[str]) -> int:
    """An fd of root/parts..., opened a component at a time (no PATH_MAX)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for name in parts:
        nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nxt
    return fd


def deep_names(root: str) -> tuple[list[str], list[str]]:
    """The chain of names below root/d, level by level: every directory must
    hold exactly one `d` until the deepest, which holds what the layers left."""
    fd = walk_down(root, [])
    levels = 0
    try:
        for _ in range(DEPTH):
            names = os.listdir(fd)
            here = [n for n in names if n != "d"] if levels else []
            assert not here, f"level {levels}: {here}"
            nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
            levels += 1
        return sorted(os.listdir(fd)), [str(levels)]
    finally:
        os.close(fd)


def test_tar_export_holds_the_deep_tree(store, tmp_path):
    out = tmp_path / "view.tar"
    ok(layerdb(store, "export", "--at", "deep:1", "-o", str(out)))
    with tarfile.open(out) as t:
        members = {m.name: m for m in t.getmembers()}
        deep = [n for n in members if n == "d" or n.startswith("d/")]
        assert len(deep) == DEPTH + 1  # the directories and the file; the symlink is gone
        f = members[FILE]
        assert f.isfile() and t.extractfile(f).read() == b"deeper\n"
        assert LINK not in members
        # The hard link keeps the first layer's file: layer 5 replaced f by a new file.
        link = members["deeplink"]
        assert link.isfile() and t.extractfile(link).read() == b"deep\n"


def test_partitioned_export_equals_whole(store, monkeypatch):
    """A large image's export replays partitions of paths (tree.TreeEntries);
    at this depth each partition's ancestors are the whole spine."""
    from conftest import export_bytes, replaying

    from layerdb.engine.api import LayerDB

    with LayerDB(store) as db:
        outs = []
        for partition in (None, 700):
            with monkeypatch.context() as m:
                replaying(m, partition)
                outs.append(export_bytes(db, "deep:1"))
    assert outs[0] == outs[1]


def test_export_dir_writes_the_deep_tree(store, tmp_path):
    target = tmp_path / "out"
    ok(layerdb(store, "export", "--at", "deep:1~1", "--dir", str(target)))
    names, levels = deep_names(str(target))
    assert levels == [str(DEPTH)] and names == ["f", "l"]
    fd = walk_down(str(target), ["d"] * DEPTH)
    try:
        assert os.readlink("l", dir_fd=fd) == "f"
        ffd = os.open("f", os.O_RDONLY, dir_fd=fd)
        with os.fdopen(ffd, "rb") as fh:
            assert fh.read() == b"deep\n"
        # deeplink is the same file as the deep f (a hard link, as in the layer tar).
        st_f = os.stat("f", dir_fd=fd, follow_symlinks=False)
        st_link = os.stat(target / "deeplink")
        assert (st_f.st_ino, st_f.st_nlink) == (st_link.st_ino, 2)
    finally:
        os.close(fd)


def test_view_recursive_and_long(store):
    lines = ok(layerdb(store, "view", "--at", "deep:1", "-R")).splitlines()
    deep = [ln for ln in lines if ln.startswith("/d/") or ln == "/d/"]
    assert len(deep) == DEPTH + 1 and deep[-1] == "/" + FILE
    assert ok(layerdb(store, "view", "--at", "deep:1", "/" + DIR)).splitlines() == ["f"]
    assert ok(layerdb(store, "cat", "--at", "deep:1~1", "/" + FILE)) == "deep\n"


def test_diff_and_history_changes(store):
    rows = ok(layerdb(store, "diff", "deep:1~1", "deep:1")).splitlines()
    assert rows == [f"C /{FILE}  (content: size, sha256)", f"D /{LINK}"]
    changes = ok(layerdb(store, "history", "deep:1", "--changes"))
    assert f"/{LINK}" in changes and "Traceback" not in changes


def test_log_of_the_deep_file(store):
    import json

    rows = [json.loads(ln) for ln in ok(layerdb(store, "log", "/" + FILE, "--image", "deep:1", "--json")).splitlines()]
    assert [(r["position"], r["op"], r["size"]) for r in rows] == [(4, "add", 5), (5, "modify", 7)]


def test_container_cp_out_commit_and_gc(store, tmp_path):
    db = tmp_path / "c.sqlite"
    db.write_bytes(store.read_bytes())  # a copy: this test removes the image
    for suffix in ("-wal", "-shm"):
        if Path(str(store) + suffix).exists():
            Path(str(db) + suffix).write_bytes(Path(str(store) + suffix).read_bytes())
    ok(layerdb(db, "container", "create", "deep:1", "--name", "c"))
    src = tmp_path / "g.txt"
    src.write_bytes(b"written deep\n")
    ok(layerdb(db, "cp", str(src), "c:/" + DIR + "/g.txt"))
    out = tmp_path / "cpout"
    ok(layerdb(db, "cp", "c:/d", str(out)))
    # cp of c:/d into a new directory cpout writes d's contents there: cpout/d/.../d/f.
    fd = walk_down(str(out), ["d"] * (DEPTH - 1))
    try:
        assert sorted(os.listdir(fd)) == ["f", "g.txt"]
    finally:
        os.close(fd)
    ok(layerdb(db, "commit", "c", "deep:2"))
    assert ok(layerdb(db, "cat", "--at", "deep:2", "/" + DIR + "/g.txt")) == "written deep\n"
    assert ok(layerdb(db, "diff", "deep:1", "deep:2")).splitlines()[-1] == f"A /{DIR}/g.txt"
    ok(layerdb(db, "container", "rm", "c"))
    ok(layerdb(db, "rm", "deep:1", "deep:2"))
    ok(layerdb(db, "gc"))
    assert "Traceback" not in ok(layerdb(db, "fsck"))
    assert ok(layerdb(db, "images")).splitlines()[1:] == []


def test_mount_looks_up_the_deep_tree(store, tmp_path):
    from test_fuse import _fuse_missing, mounted

    if _fuse_missing():
        pytest.skip(_fuse_missing())
    mnt = tmp_path / "mnt"
    with mounted(store, ["--at", "deep:1"], mnt):
        fd = walk_down(str(mnt), ["d"] * DEPTH)
        try:
            assert os.listdir(fd) == ["f"]
            ffd = os.open("f", os.O_RDONLY, dir_fd=fd)
            with os.fdopen(ffd, "rb") as fh:
                assert fh.read() == b"deeper\n"
        finally:
            os.close(fd)
        assert (mnt / "deeplink").read_bytes() == b"deep\n"
