"""Containers: writes as events, replay in log order, `container diff`, `commit`, `cp`, `apply`.

The main test applies the same operations to a container and to a real
directory holding the image's exported view, then compares the two with
tree_manifest.py: the container's export, the committed image's view, and the
image as umoci unpacks it from a `save` archive.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import REPO_FIXTURES, count_replays, export_bytes, load_json_lines, manifest_of_dir, manifest_of_tar_bytes, run_cli

SAMPLE = REPO_FIXTURES / "images" / "sample.oci.tar"
T = 1_700_086_400  # every write's mtime: tree_manifest compares file and symlink mtimes
BIG = bytes(range(256)) * 1200  # 307200 bytes: above the pack size, so it goes through content-defined chunks

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="export --dir keeps owners only when run as root")


@pytest.fixture(autouse=True, params=["whole", "partial"])
def container_view(request, monkeypatch):
    """Every test twice: with the whole view a container of a small image keeps,
    and with the partial view of a large image's container (each operation
    loads the paths it reads; views export in partitions of two paths)."""
    if request.param == "partial":
        from layerdb.engine import tree as export
        from layerdb.engine.containers import container

        monkeypatch.setattr(container, "WHOLE_EVENTS", -1)
        monkeypatch.setattr(export, "WHOLE_EVENTS", 0)
        monkeypatch.setattr(export, "PARTITION_PATHS", 2)
    return request.param


@pytest.fixture
def sample(db):
    db.import_archive(str(SAMPLE))
    return db


class HostTwin:
    """The operations on a real directory."""

    def __init__(self, root: Path):
        self.root = root

    def _p(self, rel: str) -> Path:
        return self.root / rel

    def write(self, rel, data, mode=None):
        p = self._p(rel)
        new = not p.exists()
        with open(p, "wb") as f:
            f.write(data)
        if new or mode is not None:
            os.chmod(p, 0o644 if mode is None else mode)
        os.utime(p, (T, T))

    def append(self, rel, data):
        with open(self._p(rel), "ab") as f:
            f.write(data)
        os.utime(self._p(rel), (T, T))

    def chmod(self, rel, mode):
        os.chmod(self._p(rel), mode)

    def rm(self, rel):
        os.remove(self._p(rel))

    def rm_rf(self, rel):
        shutil.rmtree(self._p(rel))

    def mkdir(self, rel, mode=0o755):
        os.mkdir(self._p(rel))
        os.chmod(self._p(rel), mode)

    def symlink(self, rel, target):
        os.symlink(target, self._p(rel))
        os.utime(self._p(rel), (T, T), follow_symlinks=False)

    def link(self, rel, target):
        os.link(self._p(target), self._p(rel))


class ContainerTwin:
    """The same operations through LayerDB's Python API."""

    def __init__(self, db, name):
        self.db, self.name = db, name

    def write(self, rel, data, mode=None):
        self.db.write_file(self.name, "/" + rel, data, mode=mode, mtime=T)

    def append(self, rel, data):
        self.db.append_file(self.name, "/" + rel, io.BytesIO(data), mtime=T)

    def chmod(self, rel, mode):
        self.db.chmod(self.name, "/" + rel, mode)

    def rm(self, rel):
        self.db.remove_path(self.name, "/" + rel)

    def rm_rf(self, rel):
        self.db.remove_path(self.name, "/" + rel, recursive=True)

    def mkdir(self, rel, mode=0o755):
        self.db.mkdir(self.name, "/" + rel, mode, mtime=T)

    def symlink(self, rel, target):
        self.db.symlink(self.name, "/" + rel, target, mtime=T)

    def link(self, rel, target):
        self.db.link(self.name, "/" + rel, "/" + target)


def operations(t) -> None:
    t.write("etc/motd", b"welcome\n")  # overwrite: keeps its mode
    t.write("etc/new.conf", b"key=value\n", mode=0o600)
    t.append("app/VERSION", b"-patched\n")  # VERSION and version.txt are one file: both change
    t.chmod("app/run.sh", 0o700)
    t.chmod("app/settings.ini", 0o600)
    t.rm("etc/group")
    t.rm("bin/cat")  # a symlink
    t.rm_rf("app/cache")  # held app/cache/new; made again below: an opaque directory
    t.mkdir("app/cache")
    t.write("app/cache/fresh", b"fresh\n")
    t.symlink("app/current", "VERSION")
    t.link("app/config.hard", "app/config.ini")  # a second name for a lower file
    t.append("app/config.hard", b"[extra]\n")  # ... and a change through it
    t.mkdir("srv")
    t.mkdir("srv/data", 0o750)
    t.write("srv/data/a.bin", BIG)
    t.write("tmp/scratch", b"gone soon")  # the container's own write, then removed: no trace
    t.rm("tmp/scratch")


EXPECTED_DIFF = [
    ("C", "/app"), ("C", "/app/VERSION"), ("C", "/app/cache"), ("A", "/app/cache/fresh"), ("D", "/app/cache/new"),
    ("A", "/app/config.hard"), ("C", "/app/config.ini"), ("A", "/app/current"), ("C", "/app/run.sh"),
    ("C", "/app/settings.ini"), ("C", "/app/version.txt"), ("C", "/bin"), ("D", "/bin/cat"), ("C", "/etc"),
    ("D", "/etc/group"), ("C", "/etc/motd"), ("A", "/etc/new.conf"), ("A", "/srv"), ("A", "/srv/data"),
    ("A", "/srv/data/a.bin"),
]

# (name, type, hard link target): OCI whiteouts, an opaque marker, every parent, hard links together.
EXPECTED_LAYER = [
    ("app", "d", ""), ("app/VERSION", "f", ""), ("app/cache", "d", ""), ("app/cache/.wh..wh..opq", "f", ""),
    ("app/cache/fresh", "f", ""), ("app/config.hard", "f", ""), ("app/config.ini", "h", "app/config.hard"),
    ("app/current", "l", ""), ("app/run.sh", "f", ""), ("app/settings.ini", "f", ""),
    ("app/version.txt", "h", "app/VERSION"), ("bin", "d", ""), ("bin/.wh.cat", "f", ""), ("etc", "d", ""),
    ("etc/.wh.group", "f", ""), ("etc/motd", "f", ""), ("etc/new.conf", "f", ""), ("srv", "d", ""),
    ("srv/data", "d", ""), ("srv/data/a.bin", "f", ""),
]

TAR_TYPE = {tarfile.REGTYPE: "f", tarfile.DIRTYPE: "d", tarfile.SYMTYPE: "l", tarfile.LNKTYPE: "h"}


def layer_entries(data: bytes) -> list[tuple[str, str, str]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, TAR_TYPE.get(m.type, "?"), m.linkname if m.islnk() else "") for m in tar]


@pytest.fixture
def twins(sample, tmp_path):
    """The sample image exported to a directory and a container, both after `operations`."""
    host = tmp_path / "twin"
    sample.export_dir("sample:1.0", str(host))
    sample.container_create("sample:1.0", "box")
    operations(HostTwin(host))
    operations(ContainerTwin(sample, "box"))
    return sample, host


@root_only
def test_twin_operations_export_commit_and_layer(twins, tmp_path):
    db, host = twins
    want = manifest_of_dir(host)
    assert manifest_of_tar_bytes(export_bytes(db, "box"), tmp_path) == want

    assert [(r["change"], r["path"]) for r in db.container_diff("box")] == EXPECTED_DIFF

    res = db.commit("box", "sample:edited", "twin ops", ['CMD ["/app/run.sh", "--edited"]'])
    assert manifest_of_tar_bytes(export_bytes(db, "sample:edited"), tmp_path) == want

    layer = b"".join(db.layer_tar(res["diff_id"]))
    assert "sha256:" + hashlib.sha256(layer).hexdigest() == res["diff_id"]
    entries = layer_entries(layer)
    assert entries == EXPECTED_LAYER
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        members = {m.name: m for m in tar}
        assert tar.extractfile(members["srv/data/a.bin"]).read() == BIG
    assert members["app/run.sh"].mode == 0o700 and members["srv/data"].mode == 0o750
    assert members["srv"].mtime == members["app/cache"].mtime == T  # made, and filled, at T
    assert {members[n].mtime for n in ("etc/motd", "app/current", "srv/data/a.bin")} == {T}
    assert members["etc/.wh.group"].size == 0 and members["app/cache/.wh..wh..opq"].size == 0

    hist = db.history("sample:edited")
    assert (hist[0]["created_by"], hist[0]["comment"], hist[0]["position"]) == ("layerdb commit", "twin ops", 7)
    cfg = json.loads(db.store.scalar("SELECT config FROM image WHERE digest = ?", (res["id"],)))
    assert cfg["config"]["Cmd"] == ["/app/run.sh", "--edited"]
    assert cfg["rootfs"]["diff_ids"][-1] == res["diff_id"] and len(cfg["rootfs"]["diff_ids"]) == 7
    assert "sha256:" + hashlib.sha256(db.store.scalar("SELECT config FROM image WHERE digest = ?",
                                                      (res["id"],))).hexdigest() == res["id"]


@root_only
def test_commit_saves_for_skopeo_and_umoci(twins, tmp_path):
    db, host = twins
    res = db.commit("box", "sample:edited")
    archive = tmp_path / "edited.tar"
    with open(archive, "wb") as f:
        db.save(["sample:edited"], f)
    if shutil.which("skopeo"):
        info = json.loads(subprocess.run(["skopeo", "inspect", f"docker-archive:{archive}"], check=True,
                                         capture_output=True, text=True).stdout)
        assert info["Layers"][-1] == res["diff_id"] and len(info["Layers"]) == 7
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        saved = tar.extractfile(manifest[0]["Layers"][-1]).read()
    assert "sha256:" + hashlib.sha256(saved).hexdigest() == res["diff_id"]

    if not shutil.which("umoci"):
        pytest.skip("umoci is not installed: the OCI unpack cross-check needs it")
    oci = tmp_path / "edited.oci.tar"
    with open(oci, "wb") as f:
        db.save(["sample:edited"], f, "oci")
    layout = tmp_path / "layout"
    layout.mkdir()
    with tarfile.open(oci) as tar:
        tar.extractall(layout, filter="tar")
    ref = json.load(open(layout / "index.json"))["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"]
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{ref}", str(bundle)], check=True, capture_output=True)
    # umoci applies the whiteouts and the opaque marker by itself: the same tree as the twin directory.
    assert manifest_of_dir(bundle / "rootfs") == manifest_of_dir(host)


@root_only
def test_apply_from_dir_records_the_difference(twins, tmp_path):
    db, host = twins
    db.container_create("sample:1.0", "applied")
    n = db.container_apply("applied", str(host))
    assert n > 0
    assert manifest_of_tar_bytes(export_bytes(db, "applied"), tmp_path) == manifest_of_dir(host)
    assert db.container_apply("applied", str(host)) == 0  # nothing left to record
    a = db.container("applied").view
    # A directory in which the operations created or removed names has the host's new mtime; the
    # others kept the image's, as the host's did (export --dir sets them).  /tmp is the exception: the
    # host's changed when tmp/scratch came and went, but apply records net changes only.
    dirs = {p: n.mtime for p, n in a.walk() if n.type == "d"}
    assert dirs.pop(b"tmp") == BASE
    assert dirs == {p: int(os.lstat(os.path.join(host, os.fsdecode(p))).st_mtime) for p in dirs}
    assert dirs[b"etc"] != BASE and dirs[b"app/cache"] != BASE and dirs[b"root"] == BASE
    assert a.get(b"app/VERSION") is a.get(b"app/version.txt")  # the host's hard links stay links
    assert a.get(b"app/config.hard") is a.get(b"app/config.ini")
    res = db.commit("applied", "sample:applied")
    assert manifest_of_tar_bytes(export_bytes(db, "sample:applied"), tmp_path) == manifest_of_dir(host)
    names = {e[0] for e in layer_entries(b"".join(db.layer_tar(res["diff_id"])))}
    # apply whites out what the directory lacks; a directory it still has (app/cache) is not reopened.
    assert {"bin/.wh.cat", "etc/.wh.group", "app/cache/.wh.new"} <= names
    assert "app/cache/.wh..wh..opq" not in names


# Directory mtimes -----------------------------------------------------------------------

BASE = 1_700_000_000  # every mtime in sample:1.0 (tests/fixtures/build.sh: buildah --timestamp)
W = T + 3600  # the time of each write below


def _mkdir_root(c):
    c.mkdir("/srv", mtime=W)
    assert c.get(b"").mtime == W  # the root's mtime changes too; a layer never holds the root


def _touch_d(c):
    c.write_file("/etc/newfile", b"", mtime=W)
    c.utime("/etc/newfile", 1_000_000_000)  # touch -d: the file's mtime, not the directory's


# What a container does (each write at time W), then its `container diff` and the entries of the
# committed layer: (name, type, mtime, hard link target).  The reference is buildah 1.28 (vfs, chroot
# isolation): the command that names each case run in a container of sample:1.0, then `buildah commit`
# (its layer tar, read the same way) and `podman diff`.  They agree on every row and entry, with one
# difference: for `ln`, buildah's layer holds etc/motd2 as a plain file, since its naive diff does not
# see the link count change; layerdb puts both names, linked, as for every hard link it commits.
DIR_MTIME_CASES = {
    "touch /etc/newfile": (
        lambda c: c.write_file("/etc/newfile", b"", mtime=W),
        ["C /etc", "A /etc/newfile"],
        [("etc", "d", W, ""), ("etc/newfile", "f", W, "")]),
    "touch -d @1000000000 /etc/newfile": (
        _touch_d,
        ["C /etc", "A /etc/newfile"],
        [("etc", "d", W, ""), ("etc/newfile", "f", 1_000_000_000, "")]),
    "rm /etc/group": (
        lambda c: c.remove("/etc/group", mtime=W),
        ["C /etc", "D /etc/group"],
        [("etc", "d", W, ""), ("etc/.wh.group", "f", W, "")]),
    "rm -r /app/cache": (
        lambda c: c.remove("/app/cache", recursive=True, mtime=W),
        ["C /app", "D /app/cache"],
        [("app", "d", W, ""), ("app/.wh.cache", "f", W, "")]),
    "mv /etc/motd /app/motd": (
        lambda c: c.rename("/etc/motd", "/app/motd", mtime=W),
        ["C /app", "A /app/motd", "C /etc", "D /etc/motd"],
        [("app", "d", W, ""), ("app/motd", "f", BASE, ""), ("etc", "d", W, ""), ("etc/.wh.motd", "f", W, "")]),
    "mv /etc/motd /etc/group": (
        lambda c: c.rename("/etc/motd", "/etc/group", mtime=W),
        ["C /etc", "C /etc/group", "D /etc/motd"],
        [("etc", "d", W, ""), ("etc/.wh.motd", "f", W, ""), ("etc/group", "f", BASE, "")]),
    "mv /app/cache /etc/cache": (
        lambda c: c.rename("/app/cache", "/etc/cache", mtime=W),
        ["C /app", "D /app/cache", "C /etc", "A /etc/cache", "A /etc/cache/new"],
        [("app", "d", W, ""), ("app/.wh.cache", "f", W, ""), ("etc", "d", W, ""), ("etc/cache", "d", BASE, ""),
         ("etc/cache/new", "f", BASE, "")]),
    "mkdir -p /srv/a/b": (
        lambda c: c.mkdir("/srv/a/b", parents=True, mtime=W),
        ["A /srv", "A /srv/a", "A /srv/a/b"],
        [("srv", "d", W, ""), ("srv/a", "d", W, ""), ("srv/a/b", "d", W, "")]),
    "mkdir /srv": (
        _mkdir_root,
        ["A /srv"],
        [("srv", "d", W, "")]),
    "ln /etc/motd /etc/motd2": (
        lambda c: c.link("/etc/motd2", "/etc/motd", mtime=W),
        ["C /etc", "A /etc/motd2"],
        [("etc", "d", W, ""), ("etc/motd", "f", BASE, ""), ("etc/motd2", "h", BASE, "etc/motd")]),
    # Changes to an existing name leave its directory's mtime alone (the directory is in the layer as
    # the parent of an entry, with the image's mtime).  A directory whose mtime is all that changed is
    # no change at all, for buildah and podman as for layerdb (as for docker: moby/moby#9874).
    "touch /tmp/x; rm /tmp/x": (
        lambda c: (c.write_file("/tmp/x", b"", mtime=W), c.remove("/tmp/x", mtime=W + 1)),
        [],
        []),
    "touch -d @1000000000 /app": (
        lambda c: c.utime("/app", 1_000_000_000),
        [],
        []),
    "echo x >> /etc/motd": (
        lambda c: c.append_file("/etc/motd", b"x\n", mtime=W),
        ["C /etc", "C /etc/motd"],
        [("etc", "d", BASE, ""), ("etc/motd", "f", W, "")]),
    "echo x > /etc/motd": (
        lambda c: c.write_file("/etc/motd", b"x\n", mtime=W),
        ["C /etc", "C /etc/motd"],
        [("etc", "d", BASE, ""), ("etc/motd", "f", W, "")]),
    "chmod 600 /etc/motd": (
        lambda c: c.chmod("/etc/motd", 0o600),
        ["C /etc", "C /etc/motd"],
        [("etc", "d", BASE, ""), ("etc/motd", "f", BASE, "")]),
}


def layer_mtimes(data: bytes) -> list[tuple[str, str, int, str]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, TAR_TYPE.get(m.type, "?"), m.mtime, m.linkname if m.islnk() else "") for m in tar]


@pytest.mark.parametrize("case", list(DIR_MTIME_CASES))
def test_directory_mtimes_diff_and_commit_as_buildah(sample, case):
    do, want_diff, want_layer = DIR_MTIME_CASES[case]
    assert sample.lookup("sample:1.0", "/etc").mtime == BASE and sample.lookup("sample:1.0", "/app").mtime == BASE
    sample.container_create("sample:1.0", "c")
    do(sample.container("c"))
    assert [f"{r['change']} {r['path']}" for r in sample.container_diff("c")] == want_diff
    res = sample.commit("c", "sample:case")
    assert layer_mtimes(b"".join(sample.layer_tar(res["diff_id"]))) == want_layer
    for name, _, mtime, _ in want_layer:  # the committed image shows what the container showed
        if ".wh." not in name:
            assert sample.lookup("sample:case", "/" + name).mtime == mtime
    assert sample.lookup("sample:case", "/").mtime == sample.lookup("sample:1.0", "/").mtime


def test_directory_mtime_is_the_time_of_the_write(sample):
    import time

    sample.container_create("sample:1.0", "c")
    c = sample.container("c")
    before = int(time.time())
    sample.write_file("c", "/etc/newfile", b"", mtime=T)  # an explicit mtime is the write's time: both get it
    assert (c.get(b"etc/newfile").mtime, c.get(b"etc").mtime) == (T, T)
    sample.remove_path("c", "/etc/group")  # no mtime given: now
    etc = c.get(b"etc").mtime
    assert before <= etc <= int(time.time())
    assert c.get(b"").mtime is None  # nothing was created or removed in the root

    n = len(sample.store.execute("SELECT seq FROM event WHERE diff_id = ?", (c.diff_rowid,)).fetchall())
    sample.write_file("c", "/etc/newfile", b"again", mtime=T + 1)  # replaced in place (O_TRUNC)
    sample.append_file("c", "/etc/motd", b"more\n", mtime=T + 2)
    sample.chmod("c", "/etc/passwd", 0o600)
    sample.utime("c", "/etc/passwd", T + 3)
    sample.rename("c", "/app/VERSION", "/app/version.txt")  # two names of one file: nothing to do
    assert c.get(b"etc").mtime == etc and c.get(b"app").mtime == BASE
    events = sample.store.execute("SELECT seq FROM event WHERE diff_id = ?", (c.diff_rowid,)).fetchall()
    assert len(events) == n + 4  # one event per write, none for a directory
    sample.write_file("c", "/etc/a", b"", mtime=T + 5)
    sample.write_file("c", "/etc/b", b"", mtime=T + 5)  # /etc has that mtime already: one event
    events = sample.store.execute("SELECT seq FROM event WHERE diff_id = ?", (c.diff_rowid,)).fetchall()
    assert len(events) == n + 4 + 3 and c.get(b"etc").mtime == T + 5

    c.mknod("/etc/fifo", "p", mtime=T + 6)
    c.symlink("/etc/sh", "/bin/sh", mtime=T + 7)
    assert c.get(b"etc").mtime == T + 7
    sample.mkdir("c", "/app/cache", parents=True, mtime=T + 8)  # exists: no write
    assert c.get(b"app").mtime == BASE


def test_copy_in_keeps_host_directory_mtimes(sample, tmp_path):
    import time

    site = tmp_path / "site"
    (site / "css").mkdir(parents=True)
    (site / "css" / "a.css").write_bytes(b"body{}")
    os.utime(site / "css" / "a.css", (T, T))
    os.utime(site / "css", (T + 1, T + 1))
    os.utime(site, (T + 2, T + 2))
    page = tmp_path / "index.html"
    page.write_bytes(b"<p>\n")
    os.utime(page, (T + 3, T + 3))
    sample.container_create("sample:1.0", "c")
    c = sample.container("c")
    before = int(time.time())
    sample.copy_in(str(site), "c", "/srv")  # a new tree: it keeps the host's mtimes; the root gets now
    sample.copy_in(str(page), "c", "/etc")  # a new file in /etc: /etc gets now
    after = int(time.time())
    v = c.view
    assert [v.get(p).mtime for p in (b"srv", b"srv/css", b"srv/css/a.css", b"etc/index.html")] == [T + 2, T + 1, T,
                                                                                                  T + 3]
    assert before <= v.get(b"").mtime <= after and before <= v.get(b"etc").mtime <= after
    (site / "css" / "b.css").write_bytes(b"")
    os.utime(site / "css", (T + 10, T + 10))
    sample.copy_in(str(site / "css"), "c", "/srv")  # merged into /srv/css: a new name there, the host's mtime
    assert (c.get(b"srv/css").mtime, c.get(b"srv").mtime) == (T + 10, T + 2)
    res = sample.commit("c", "sample:site")
    assert [e for e in layer_mtimes(b"".join(sample.layer_tar(res["diff_id"]))) if e[0].startswith("srv")] == [
        ("srv", "d", T + 2, ""), ("srv/css", "d", T + 10, ""), ("srv/css/a.css", "f", T, ""),
        ("srv/css/b.css", "f", int(os.stat(site / "css" / "b.css").st_mtime), "")]


def test_log_order_replays_whiteouts_after_own_writes(sample):
    """A container's events replay in seq order: a whiteout removes the container's own
    earlier writes (ordered by kind, as for a tar, it would come first and hide nothing)."""
    sample.container_create("sample:1.0", "c")
    sample.mkdir("c", "/d")
    sample.write_file("c", "/d/x", b"x")
    sample.write_file("c", "/f", b"one")
    sample.remove_path("c", "/d", recursive=True)
    sample.remove_path("c", "/f")
    sample.write_file("c", "/f", b"two")
    sample.mkdir("c", "/d")
    sample.remove_path("c", "/etc/passwd")
    view = sample.view("c")
    assert view.get(b"d/x") is None and view.get(b"d").type == "d"
    assert b"".join(sample.cat("c", "/f")) == b"two"
    assert sample.lookup("c", "/d/x") is None  # the path-restricted replay agrees
    assert sample.lookup("c", "/etc/passwd") is None
    from layerdb.engine import audit

    rows = [(r["change"], r["path"]) for r in audit.diff(sample, "sample:1.0", "c")]
    assert rows == [("A", "/d"), ("D", "/etc/passwd"), ("A", "/f")]
    assert [(r["change"], r["path"]) for r in audit.diff(sample, "sample:1.0", "c", restrict=False)] == rows


def test_partial_view_holds_what_the_operations_touch(db, tmp_path, container_view, monkeypatch):
    """A container of a large image replays only the paths each operation reads:
    writes, a rename, an rm -r, a refused rmdir and a commit, on an image of
    1500 files, each replay a few dozen nodes, with the result the whole view gives."""
    from hostile.make_hostile import entry
    from test_export_memory import _stacked

    from layerdb.engine.containers import container
    from layerdb.engine.errors import PathError

    arch = _stacked(tmp_path, ("base", [entry(f"d{i % 7}/s{i % 3}/f{i}", b"%d\n" % i) for i in range(1500)]),
                    ("more", [entry(f"d{i % 7}/s{i % 3}/f{i}", b"v2 %d\n" % i) for i in range(0, 1500, 50)]))
    db.import_archive(str(arch), tag="t:1")
    db.container_create("t:1", "c")
    c = db.container("c")
    assert c.whole == (container_view == "whole")
    sizes = count_replays(monkeypatch, container)
    db.write_file("c", "/d1/s1/new", b"new\n", mtime=T)
    db.append_file("c", "/d0/s0/f0", b"more\n", mtime=T)  # a file the second layer changed
    db.rename("c", "/d2/s2/f2", "/d3/moved", mtime=T)
    db.remove_path("c", "/d4/s0", recursive=True, mtime=T)
    with pytest.raises(PathError, match="not empty"):
        db.remove_path("c", "/d5/s1", mtime=T)  # loads that directory's children: about 70
    assert c.get("/d0/s0/f0").size == len(b"v2 0\nmore\n")
    res = db.commit("c", "t:2")
    if container_view == "partial":
        assert len(sizes) > 8 and max(sizes) < 100, sizes
    else:
        assert max(sizes) > 1500, sizes
    rows = [(r["change"], r["path"]) for r in db.container_diff("c")]
    assert rows == [("C", "/d0"), ("C", "/d0/s0"), ("C", "/d0/s0/f0"), ("C", "/d1"), ("C", "/d1/s1"),
                    ("A", "/d1/s1/new"), ("C", "/d2"), ("C", "/d2/s2"), ("D", "/d2/s2/f2"), ("C", "/d3"),
                    ("A", "/d3/moved"), ("C", "/d4"), ("D", "/d4/s0")]
    assert export_bytes(db, "t:2") == export_bytes(db, "c")
    layer = layer_entries(b"".join(db.layer_tar(res["diff_id"])))
    assert layer == [("d0", "d", ""), ("d0/s0", "d", ""), ("d0/s0/f0", "f", ""), ("d1", "d", ""),
                     ("d1/s1", "d", ""), ("d1/s1/new", "f", ""), ("d2", "d", ""), ("d2/s2", "d", ""),
                     ("d2/s2/.wh.f2", "f", ""), ("d3", "d", ""), ("d3/moved", "f", ""), ("d4", "d", ""),
                     ("d4/.wh.s0", "f", "")]


def test_two_containers_of_one_image_differ(sample):
    sample.container_create("sample:1.0", "c1")
    sample.container_create("sample:1.0", "c2")
    sample.write_file("c1", "/x", b"1")
    sample.write_file("c2", "/y", b"2")
    from layerdb.engine import audit

    assert [(r["change"], r["path"]) for r in audit.diff(sample, "c1", "c2")] == [("D", "/x"), ("A", "/y")]


def test_deleted_tree_is_one_line_and_one_whiteout(sample):
    sample.container_create("sample:1.0", "c")
    sample.remove_path("c", "/app", recursive=True)
    assert [(r["change"], r["path"]) for r in sample.container_diff("c")] == [("D", "/app")]
    res = sample.commit("c", "sample:noapp")
    assert layer_entries(b"".join(sample.layer_tar(res["diff_id"]))) == [(".wh.app", "f", "")]
    assert sample.lookup("sample:noapp", "/app") is None and sample.lookup("sample:noapp", "/etc/passwd")
    assert sample.commit("c", "sample:noapp2")["diff_id"] == res["diff_id"]  # the layer tar is deterministic


def test_refs_name_id_and_tilde(sample, tmp_path):
    c = sample.container_create("sample:1.0", "web")
    sample.write_file("web", "/etc/motd", b"container\n")
    r = sample.resolve("web")
    assert r.container == "web" and r.position == 7 and r.chain_id == "container:" + c["id"]
    for ref in (c["id"][:8], "container:" + c["id"]):
        assert b"".join(sample.cat(ref, "/etc/motd")) == b"container\n"
    assert export_bytes(sample, "web~1") == export_bytes(sample, "sample:1.0")
    assert sample.resolve("web~1").container is None
    rows = sample.log("/etc/motd", image="web")
    assert [(x["op"], x["position"], x["layer_id"]) for x in rows][-1] == ("modify", 7, "container:" + c["id"])
    from layerdb.engine.errors import UsageError

    image_prefix = sample.images()[0]["id"][7:15]
    with pytest.raises(UsageError, match="already names an image"):
        sample.container_create("sample:1.0", image_prefix)
    with pytest.raises(UsageError, match="not an image"):
        sample.container_create("web", "c2")


def test_paths_follow_symlinks_like_a_chroot(sample):
    from layerdb.engine.errors import NotFound

    sample.container_create("sample:1.0", "c")
    sample.symlink("c", "/data", "/srv/real")
    sample.mkdir("c", "/srv/real", parents=True)
    sample.write_file("c", "/srv/../data/f", b"through the link")  # /data -> /srv/real, absolute
    with pytest.raises(NotFound):  # `..` after a symlink is the target's parent (/srv), as in Linux
        sample.write_file("c", "/data/../data/g", b"")
    assert b"".join(sample.cat("c", "/srv/real/f")) == b"through the link"
    sample.write_file("c", "/bin/app", b"#!/bin/sh\n")  # bin/app -> /app/run.sh: written through, mode kept
    node = sample.lookup("c", "/app/run.sh")
    assert (node.size, node.mode) == (10, 0o755) and sample.lookup("c", "/bin/app").type == "l"
    from layerdb.engine.containers.container import NoSuchPath, PathError

    with pytest.raises(NoSuchPath):
        sample.write_file("c", "/nope/f", b"")
    with pytest.raises(PathError, match="Is a directory"):
        sample.write_file("c", "/etc", b"")
    with pytest.raises(PathError, match="not empty"):
        sample.remove_path("c", "/etc")


def test_a_second_process_sees_writes_and_appends_after_them(sample, tmp_path):
    from layerdb.engine.api import LayerDB

    sample.container_create("sample:1.0", "c")
    sample.write_file("c", "/a", b"1", mtime=T)  # a new name: the root directory's mtime becomes T too
    other = LayerDB(sample.store.path)
    try:
        assert other.container("c").get(b"a").size == 1
        other.write_file("c", "/b", b"22", mtime=T)  # the root's mtime is T already: no event for it
        sample.append_file("c", "/b", b"3", mtime=T)  # sees the other's write before appending
        assert b"".join(other.cat("c", "/b")) == b"223"
        seqs = [r[0] for r in sample.store.execute(
            "SELECT e.seq FROM event e JOIN container c ON c.diff_id = e.diff_id ORDER BY e.seq")]
        assert seqs == list(range(len(seqs))) and len(seqs) == 4
    finally:
        other.close()


def test_every_event_has_a_time_in_order(sample):
    sample.container_create("sample:1.0", "c")
    for i in range(5):
        sample.write_file("c", f"/f{i}", b"x", mtime=T + i)  # each a file and the root's new mtime
    times = [r[0] for r in sample.store.execute(
        "SELECT e.time FROM event e JOIN container c ON c.diff_id = e.diff_id ORDER BY e.seq")]
    assert len(times) == 10 and all(t is not None for t in times) and times == sorted(times)


# CLI -------------------------------------------------------------------------------------


def test_cli_lifecycle_cp_diff_commit(tmp_path):
    dbp = tmp_path / "s.sqlite"
    assert run_cli("import", str(SAMPLE), db_path=dbp).exit_code == 0
    r = run_cli("container", "create", "sample:1.0", "--name", "web", "--json", db_path=dbp)
    created = json.loads(r.output)
    assert r.exit_code == 0 and created["name"] == "web" and created["image"] == "sample:1.0"
    hosted = tmp_path / "index.html"
    hosted.write_bytes(b"<h1>hi</h1>\n")
    os.chmod(hosted, 0o640)
    assert run_cli("cp", str(hosted), "web:/etc", db_path=dbp).exit_code == 0  # into the directory, by name
    site = tmp_path / "site"
    (site / "css").mkdir(parents=True)
    (site / "css" / "a.css").write_bytes(b"body{}")
    assert run_cli("cp", str(site), "web:/srv", db_path=dbp).exit_code == 0  # a tree, as /srv
    assert run_cli("cat", "--at", "web", "/etc/index.html", db_path=dbp).stdout_bytes == b"<h1>hi</h1>\n"
    out = tmp_path / "out.html"
    assert run_cli("cp", "web:/etc/index.html", str(out), db_path=dbp).exit_code == 0
    assert out.read_bytes() == b"<h1>hi</h1>\n" and (os.stat(out).st_mode & 0o777) == 0o640
    assert run_cli("cp", "web:/srv", str(tmp_path / "back"), db_path=dbp).exit_code == 0
    assert (tmp_path / "back" / "css" / "a.css").read_bytes() == b"body{}"

    r = run_cli("container", "diff", "web", db_path=dbp)
    assert r.output.splitlines() == ["C /etc", "A /etc/index.html", "A /srv", "A /srv/css", "A /srv/css/a.css"]
    rows = load_json_lines(run_cli("container", "diff", "web", "--json", db_path=dbp).output)
    assert [(x["path"], x["change"]) for x in rows][:2] == [("/etc", "C"), ("/etc/index.html", "A")]
    ls = load_json_lines(run_cli("container", "ls", "--json", db_path=dbp).output)
    # index.html and /etc's new mtime; /srv, /srv/css, a.css and the root's new mtime
    assert [(x["name"], x["id"], x["events"]) for x in ls] == [("web", created["id"], 6)]

    r = run_cli("commit", "web", "site:1", "-m", "add site", "-c", 'ENTRYPOINT ["httpd"]', "-c", "CMD -f /srv",
                "-c", "ENV A=1 B='two words'", "-c", "EXPOSE 8080", "-c", "LABEL k=v", "-c", "WORKDIR /srv",
                "-c", "USER nobody", "--json", db_path=dbp)
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    saved = tmp_path / "site.tar"
    assert run_cli("save", "site:1", "-o", str(saved), db_path=dbp).exit_code == 0
    with tarfile.open(saved) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        cfg = json.load(tar.extractfile(manifest[0]["Config"]))
    c = cfg["config"]
    assert c["Entrypoint"] == ["httpd"] and c["Cmd"] == ["/bin/sh", "-c", "-f /srv"]
    assert "A=1" in c["Env"] and "B=two words" in c["Env"] and c["ExposedPorts"] == {"8080/tcp": {}}
    assert (c["Labels"]["k"], c["WorkingDir"], c["User"]) == ("v", "/srv", "nobody")
    assert cfg["history"][-1]["comment"] == "add site" and cfg["rootfs"]["diff_ids"][-1] == res["diff_id"]
    assert manifest[0]["RepoTags"] == ["site:1"]

    r = run_cli("commit", "web", "x:1", "-c", "FROM scratch", db_path=dbp)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "supported instructions" in r.stderr
    r = run_cli("cp", str(hosted), str(out), db_path=dbp)
    assert r.exit_code == 2 and "one side must be NAME:/path" in r.stderr
    r = run_cli("container", "rm", "web", db_path=dbp)
    assert r.exit_code == 0 and r.output == "web\n"
    r = run_cli("cat", "--at", "web", "/etc/index.html", db_path=dbp)
    assert r.exit_code == 5 and r.stderr.startswith("layerdb: error: ")
    # The committed image does not depend on the container.
    assert run_cli("cat", "--at", "site:1", "/srv/css/a.css", db_path=dbp).stdout_bytes == b"body{}"


def test_gc_rm_and_fsck_respect_containers(tmp_path):
    """A container keeps its image's layers and its own writes through gc; rm of its
    image is refused with one line; fsck does not take its diff for a broken tar."""
    from conftest import REPO_FIXTURES, run_cli

    p = tmp_path / "s.sqlite"
    assert run_cli("import", str(REPO_FIXTURES / "images" / "opaque.oci.tar"), db_path=p).exit_code == 0
    assert run_cli("container", "create", "opaque:1.0", "--name", "c1", db_path=p).exit_code == 0
    host = tmp_path / "note.txt"
    host.write_bytes(b"kept through gc\n")
    assert run_cli("cp", str(host), "c1:/note.txt", db_path=p).exit_code == 0
    r = run_cli("rm", "opaque:1.0", db_path=p)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "c1" in r.stderr
    r = run_cli("gc", "--json", db_path=p)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["diffs"] == 0
    assert run_cli("cat", "--at", "c1", "/note.txt", db_path=p).stdout_bytes == b"kept through gc\n"
    r = run_cli("fsck", "--deep", db_path=p)
    assert r.exit_code == 0, r.stdout + r.stderr


@root_only
def test_copy_out_of_directories_matches_the_export(sample, tmp_path):
    """`cp CONTAINER:DIR` gives the tree that `export --dir` gives below DIR (a
    large subtree streams in tree order, as the partial mode forces here).
    Hard links inside the copied tree stay links; a file whose other name lies
    outside it is copied as a file."""
    sample.container_create("sample:1.0", "c")
    sample.link("c", "/etc/vlink", "/app/VERSION")  # a second name outside /app, first in tree order there
    sample.write_file("c", "/etc/new.conf", b"k=v\n", mtime=T)
    whole = tmp_path / "whole"
    sample.export_dir("c", str(whole))
    for top in ("app", "etc", ""):
        out = tmp_path / f"copy-{top or 'root'}"
        sample.copy_out("c", "/" + top, str(out))
        assert manifest_of_dir(out) == manifest_of_dir(whole / top if top else whole), top
    app, etc = tmp_path / "copy-app", tmp_path / "copy-etc"
    assert os.stat(app / "VERSION").st_ino == os.stat(app / "version.txt").st_ino
    assert os.stat(etc / "vlink").st_nlink == 1 and (etc / "vlink").read_bytes() == (app / "VERSION").read_bytes()
    root = tmp_path / "copy-root"
    assert os.stat(root / "etc" / "vlink").st_ino == os.stat(root / "app" / "VERSION").st_ino
