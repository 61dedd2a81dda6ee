"""Hostile archives: refused with one clear error, or a documented safe behaviour.

The archives are checked in under tests/hostile/ and made by
tests/hostile/make_hostile.py from the repo's fixture images; README.md there
lists what each plants and which behaviours are documented-safe rather than
errors.  (Damage to the fixtures' own members, such as flipped or cut layer
blobs, missing members, bad manifest.json/index.json and lying diff_ids, is
tests/test_corrupt.py's.)

A refusal must raise exactly the expected LayerdbError subclass from
`LayerDB.import_archive`, print exactly one line "layerdb: error: <that
message>" from the CLI with that class's exit code and nothing on stdout, and
leave the store's full logical dump unchanged.  The store already holds
sample2, an image the hostile ones share no layer with, so the importer has
written rows for the hostile image's first layers before it meets the fault.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import tarfile

import pytest

from conftest import REPO_FIXTURES, export_bytes, load_json_lines, run_cli
from hostile.make_hostile import CASES
from hostile.storecheck import check_store, copy_store, dump, one_error_line
from layerdb.engine.errors import ArchiveError, DigestMismatch, LayerdbError, LayerFormatError, UsageError

HOSTILE = REPO_FIXTURES.parent / "hostile"
TAG = "hostile/case:1"

L4 = r"^layer 4 \(blobs/sha256/[0-9a-f]{64}\): "  # the message says which layer
REFUSED: dict[str, tuple[type[LayerdbError], str]] = {
    "truncated-tar-header": (LayerFormatError, L4 + r"tar: unexpected end of data inside a header"),
    "truncated-gzip-middle": (LayerFormatError, L4 + r"gzip stream is truncated"),
    "truncated-gzip-trailer": (LayerFormatError, L4 + r"gzip stream is truncated"),
    "truncated-zstd-middle": (LayerFormatError, L4 + r"zstd stream is truncated"),
    "truncated-zstd-checksum": (LayerFormatError, L4 + r"zstd stream is truncated"),
    "size-beyond-data": (LayerFormatError, L4 + r"tar: unexpected end of data \(truncated layer\)"),
    "pax-negative-size": (LayerFormatError, L4 + r"tar: negative PAX size"),
    "pax-huge-number": (LayerFormatError, L4 + r"tar: PAX uid 18446744073709551616 does not fit in 64 bits"),
    "duplicate-blob-bad-last": (DigestMismatch, L4 + r"diff_id: digest mismatch"),
    "manifest-not-json": (ArchiveError, r"^manifest: blobs/sha256/[0-9a-f]{64} is not valid JSON"),
    "manifest-without-layers": (ArchiveError, r"^manifest sha256:[0-9a-f]{64}: has no layers list"),
    "archive-symlink-loop": (ArchiveError, r"^layer 1 \(loop-a/layer.tar\): symlink loop"),
    "path-dotdot": (LayerFormatError, L4 + r"tar entry escapes the root: '\.\./\.\./escape\.txt'"),
    "path-dotdot-inner": (LayerFormatError, L4 + r"tar entry escapes the root: 'cfg/\.\./\.\./escape\.txt'"),
    "hardlink-dotdot": (LayerFormatError, L4 + r"tar entry escapes the root: '\.\./\.\./\.\./etc/passwd'"),
    "whiteout-bare": (LayerFormatError, L4 + r"whiteout entry with an empty name"),
    "path-nul": (LayerFormatError, L4 + r"tar entry name contains a NUL byte"),
    "path-10000-components": (LayerFormatError, L4 + r"tar entry path has 10000 components \(limit \d+\)"),
    "bomb-gzip": (LayerFormatError, L4 + r"tar: too much data after the end-of-archive marker"),
    "bomb-zstd": (LayerFormatError, L4 + r"tar: too much data after the end-of-archive marker"),
    "bomb-zstd-known-diff": (DigestMismatch, L4 + r"diff_id: digest mismatch"),
    "data-behind-symlink": (LayerFormatError, L4 + r"tar: 1073741824 bytes of data behind the non-file entry"),
    "sparse-gnu": (LayerFormatError, L4 + r"tar: sparse files are not supported"),
    "sparse-pax": (LayerFormatError, L4 + r"tar: sparse files are not supported"),
}
SAFE = {  # documented-safe behaviours, each tested below
    "tar-without-end-blocks", "duplicate-blob-bad-first", "manifest-empty-layers", "path-absolute",
    "hardlink-missing", "symlink-loop", "export-symlink-escape", "export-hardlink-absolute", "export-devices",
    "uid-out-of-range",
    "path-4096-components",  # every path walk at that depth: tests/test_deep_paths.py
}


def archive(name: str) -> str:
    return str(HOSTILE / f"{name}.tar")


@pytest.fixture(scope="session")
def base_store(tmp_path_factory):
    from layerdb.engine.api import LayerDB

    path = tmp_path_factory.mktemp("hostile-base") / "base.sqlite"
    with LayerDB(path) as db:
        db.import_archive(str(REPO_FIXTURES / "images" / "sample2.oci.tar"))
    return path


@pytest.fixture
def store(base_store, tmp_path):
    return copy_store(base_store, tmp_path / "s.sqlite")


def test_every_case_has_its_archive_and_one_expectation():
    on_disk = {p.name[: -len(".tar")] for p in HOSTILE.glob("*.tar")}
    assert set(CASES) == on_disk, "run tests/hostile/make_hostile.py"
    assert set(REFUSED) | SAFE == set(CASES) and not set(REFUSED) & SAFE


# Refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_with_one_error_and_the_store_unchanged(store, name):
    from layerdb.engine.api import LayerDB

    cls, pattern = REFUSED[name]
    before = dump(store)
    with LayerDB(store) as db:
        with pytest.raises(LayerdbError) as ei:
            db.import_archive(archive(name))
    assert type(ei.value) is cls, f"{type(ei.value).__name__}: {ei.value.message}"
    assert re.search(pattern, ei.value.message), ei.value.message
    assert dump(store) == before, "a refused import changed the store"

    r = run_cli("import", archive(name), db_path=store)
    line = one_error_line(r.exit_code, r.stdout, r.stderr)
    assert line == f"layerdb: error: {ei.value.message}"
    assert r.exit_code == cls.exit_code
    assert dump(store) == before
    check_store(store)


def test_bomb_claiming_a_stored_diff_is_not_read_whole(store):
    from layerdb.engine.api import LayerDB

    # bomb-zstd is the same blob under its true diff_id: what hashing all of it gives.
    with tarfile.open(archive("bomb-zstd")) as t:
        index = json.load(t.extractfile("index.json"))
        mani = json.load(t.extractfile("blobs/sha256/" + index["manifests"][0]["digest"][7:]))
        cfg = json.load(t.extractfile("blobs/sha256/" + mani["config"]["digest"][7:]))
    whole = cfg["rootfs"]["diff_ids"][-1]
    with LayerDB(store) as db:
        with pytest.raises(DigestMismatch) as ei:
            db.import_archive(archive("bomb-zstd-known-diff"))
    assert whole not in ei.value.message, "the importer read the whole bomb"


# Documented-safe behaviours ------------------------------------------------------------------


def import_ok(store, name: str) -> dict:
    r = run_cli("import", archive(name), "--tag", TAG, "--json", db_path=store)
    assert r.exit_code == 0, r.stderr
    (img,) = load_json_lines(r.stdout)
    check_store(store)
    return img


def cat(store, path: str) -> bytes:
    r = run_cli("cat", "--at", TAG, path, db_path=store)
    assert r.exit_code == 0, r.stderr
    return r.stdout_bytes


def listing(store, path: str, ref: str = TAG) -> list[tuple]:
    r = run_cli("view", "--at", ref, path, "-l", "-R", "--json", db_path=store)
    assert r.exit_code == 0, r.stderr
    return [(e["path"], e["type"], e["link"]) for e in load_json_lines(r.stdout)]


def top_layer_rebuilds_exactly(store) -> None:
    from layerdb.engine.api import LayerDB

    with LayerDB(store) as db:
        diff_id = db.history(TAG)[0]["diff_id"]
        h = hashlib.sha256()
        for piece in db.layer_tar(diff_id):
            h.update(piece)
    assert "sha256:" + h.hexdigest() == diff_id


def test_tar_without_end_blocks_is_accepted_like_gnu_tar(store):
    """A tar that stops after its last entry is what a cut at an entry boundary gives too:
    nothing tells them apart but the digests, which match here."""
    import_ok(store, "tar-without-end-blocks")
    assert cat(store, "/noend/f") == b"ok\n"
    top_layer_rebuilds_exactly(store)


def test_duplicate_blob_member_last_copy_wins_and_is_verified(store):
    """As `tar x` and `docker load`: the later copy is the member; it is checked against its digest."""
    import_ok(store, "duplicate-blob-bad-first")
    assert cat(store, "/dup/file") == b"the good copy\n"


def test_manifest_naming_no_layers_is_an_empty_image(store, tmp_path):
    img = import_ok(store, "manifest-empty-layers")
    assert img["layers"] == 0
    assert listing(store, "/") == []
    r = run_cli("history", TAG, "--json", db_path=store)
    assert [(h["position"], h["empty_layer"]) for h in load_json_lines(r.stdout)] == [(None, True)]
    from layerdb.engine.api import LayerDB

    with LayerDB(store) as db:
        with tarfile.open(fileobj=io.BytesIO(export_bytes(db, TAG))) as t:
            assert t.getmembers() == []


def test_absolute_names_are_taken_relative_to_the_root(store):
    import_ok(store, "path-absolute")
    assert listing(store, "/abs") == [("/abs/dir", "d", None), ("/abs/file.txt", "f", None), ("/abs/link", "f", None)]
    assert cat(store, "/abs/file.txt") == cat(store, "/abs/link") == b"absolute\n"
    top_layer_rebuilds_exactly(store)


def test_hard_link_to_a_missing_path_is_left_out_of_views(store):
    """The event stays (the layer tar rebuilds byte for byte); no view shows a link to nothing."""
    import_ok(store, "hardlink-missing")
    assert listing(store, "/links") == []
    r = run_cli("cat", "--at", TAG, "/links/orphan", db_path=store)
    assert one_error_line(r.exit_code, r.stdout, r.stderr).endswith("/links/orphan: no such file at " + TAG)
    top_layer_rebuilds_exactly(store)


LOOPS = [("/loop/a", "l", "b"), ("/loop/b", "l", "a"), ("/loop/self", "l", "self"), ("/loop/up", "l", "../loop/up")]


def test_symlink_loops_are_stored_verbatim_and_never_followed(store, tmp_path):
    import_ok(store, "symlink-loop")
    assert listing(store, "/loop") == LOOPS
    r = run_cli("cat", "--at", TAG, "/loop/a", db_path=store)
    assert one_error_line(r.exit_code, r.stdout, r.stderr).endswith("is a symlink, not a regular file, at " + TAG)
    out = tmp_path / "out"
    assert run_cli("export", "--at", TAG, "--dir", str(out), db_path=store).exit_code == 0
    assert sorted(os.listdir(out / "loop")) == ["a", "b", "self", "up"]
    for path, _, link in LOOPS:
        assert os.readlink(out / path.lstrip("/")) == link


# export --dir never writes outside DIR ---------------------------------------------------------


def host_file(path: str) -> tuple:
    st = os.lstat(path)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_mode


def export_dir(store, ref: str, out) -> None:
    r = run_cli("export", "--at", ref, "--dir", str(out), db_path=store)
    assert r.exit_code == 0, r.stderr


def test_export_dir_symlink_to_etc_then_a_file_below_it(store, tmp_path):
    """Layer 4: a -> /etc, b -> ../escaped.  Layer 5: a/passwd, b/canary.

    layerdb's rule (DESIGN.md) is that a path's ancestors are directories in the view, so
    layer 5's implied parents replace the symlinks.  (Docker and umoci resolve a/passwd
    through the symlink inside the root, i.e. they would change the image's /etc/passwd;
    either way nothing may land outside DIR.)
    """
    import_ok(store, "export-symlink-escape")
    etc_passwd = host_file("/etc/passwd")
    out4, out5 = tmp_path / "out" / "l4", tmp_path / "out" / "l5"

    export_dir(store, TAG + "~1", out4)
    assert os.readlink(out4 / "a") == "/etc" and os.readlink(out4 / "b") == "../escaped"
    export_dir(store, TAG, out5)
    assert not (out5 / "a").is_symlink() and (out5 / "a").is_dir()
    assert (out5 / "a" / "passwd").read_bytes() == b"root::0:0::/:/bin/sh\n"
    assert (out5 / "b" / "canary").read_bytes() == b"escaped\n"

    assert host_file("/etc/passwd") == etc_passwd
    assert not (tmp_path / "out" / "escaped").exists() and not (tmp_path / "escaped").exists()
    for root in (out4, out5):
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                if not os.path.islink(p):
                    assert os.path.realpath(p).startswith(str(root) + os.sep), p


def test_export_dir_never_follows_a_symlink_even_in_an_impossible_view(tmp_path):
    """Defence in depth: a view no replay produces (a file below a symlink) cannot escape either."""
    from layerdb.engine.output.export import write_dir
    from layerdb.engine.replay import Node, View

    outside = tmp_path / "outside"
    outside.mkdir()
    view = View()
    view.nodes[b"a"] = Node("l", 0o777, 0, 0, 0, None, None, None, str(outside).encode(), None, None, None, 1)
    view.nodes[b"a/f"] = Node("f", 0o644, 0, 0, 0, 0, None, None, None, None, None, None, 1)
    with pytest.raises(LayerdbError):
        write_dir(view, None, str(tmp_path / "out"))
    assert os.listdir(outside) == []
    assert os.readlink(tmp_path / "out" / "a") == str(outside)


def test_export_dir_hard_link_to_an_absolute_path_links_inside(store, tmp_path):
    import_ok(store, "export-hardlink-absolute")
    etc_passwd = host_file("/etc/passwd")
    out = tmp_path / "out"
    export_dir(store, TAG, out)
    h, p = os.lstat(out / "h"), os.lstat(out / "etc" / "passwd")
    assert (h.st_ino, h.st_nlink) == (p.st_ino, 2)
    assert (out / "h").read_bytes() == b"image's own passwd\n"
    assert host_file("/etc/passwd") == etc_passwd


def test_export_dir_refuses_device_files_unless_allowed(store, tmp_path):
    import_ok(store, "export-devices")
    out = tmp_path / "out"
    r = run_cli("export", "--at", TAG, "--dir", str(out), db_path=store)
    line = one_error_line(r.exit_code, r.stdout, r.stderr)
    assert r.exit_code == UsageError.exit_code and "--allow-devices" in line and "/dev/" in line
    assert not out.exists() or os.listdir(out) == []

    # A tar carries device files as headers: nothing is created.
    from layerdb.engine.api import LayerDB

    with LayerDB(store) as db:
        with tarfile.open(fileobj=io.BytesIO(export_bytes(db, TAG))) as t:
            devs = {m.name: (m.type, m.devmajor, m.devminor) for m in t.getmembers() if m.name.startswith("dev/")}
    assert devs == {"dev/mem": (tarfile.CHRTYPE, 1, 3), "dev/sda": (tarfile.BLKTYPE, 8, 0),
                    "dev/fifo": (tarfile.FIFOTYPE, 0, 0)}

    if os.geteuid() != 0:
        pytest.skip("creating device files needs root")
    allowed = tmp_path / "allowed"
    export_dir_args = ("export", "--at", TAG, "--dir", str(allowed), "--allow-devices")
    r = run_cli(*export_dir_args, db_path=store)
    assert r.exit_code == 0, r.stderr
    mem, sda, fifo = (os.lstat(allowed / "dev" / n) for n in ("mem", "sda", "fifo"))
    assert stat.S_ISCHR(mem.st_mode) and (os.major(mem.st_rdev), os.minor(mem.st_rdev)) == (1, 3)
    assert stat.S_ISBLK(sda.st_mode) and (os.major(sda.st_rdev), os.minor(sda.st_rdev)) == (8, 0)
    assert stat.S_ISFIFO(fifo.st_mode)


def test_ids_out_of_linux_range_are_stored_and_exported_to_tar(store):
    """A PAX uid of 2**40 and a gid of -5 are valid tar; they survive import and tar export."""
    import_ok(store, "uid-out-of-range")
    r = run_cli("view", "--at", TAG, "/ids/f", "-l", "--json", db_path=store)
    (e,) = load_json_lines(r.stdout)
    assert (e["uid"], e["gid"]) == (1 << 40, -5)
    from layerdb.engine.api import LayerDB

    with LayerDB(store) as db:
        with tarfile.open(fileobj=io.BytesIO(export_bytes(db, TAG))) as t:
            m = t.getmember("ids/f")
    assert (m.uid, m.gid) == (1 << 40, -5)
    top_layer_rebuilds_exactly(store)


@pytest.mark.skipif(os.geteuid() != 0, reason="export --dir sets owners only as root")
def test_export_dir_with_ids_out_of_range_fails_with_one_error_line(store, tmp_path):
    import_ok(store, "uid-out-of-range")
    r = run_cli("export", "--at", TAG, "--dir", str(tmp_path / "out"), db_path=store)
    line = one_error_line(r.exit_code, r.stdout, r.stderr)
    assert line.startswith(f"layerdb: error: export to {tmp_path / 'out'}: "), line


def test_implied_parents_are_the_unnamed_ones_only(tmp_path):
    """A layer naming x/y/z but not x or x/y implies both; a directory it names is
    not implied; a file that is also some entry's parent is named, so not implied
    either (replay turns it into a directory, as tar extraction does)."""
    from hostile.make_hostile import entry, one_layer

    from layerdb.engine.api import LayerDB
    from layerdb.engine.kinds import IMPLIED

    arch = one_layer(entry("x/y/z.txt", b"z"), entry("named/", type=tarfile.DIRTYPE), entry("named/n.txt", b"n"),
                     entry("f", b"a file"), entry("f/g.txt", b"g"), why="COPY . /").write(tmp_path / "i.oci.tar")
    with LayerDB(tmp_path / "s.sqlite") as db:
        db.import_archive(str(arch), tag="implied:1")
        top = db.store.scalar("SELECT max(id) FROM diff")
        got = [bytes(p) for (p,) in db.store.execute(
            "SELECT p.path FROM event e JOIN path p ON p.id = e.path_id WHERE e.diff_id = ? AND e.kind = ?"
            " ORDER BY e.seq", (top, IMPLIED))]
        assert got == [b"x", b"x/y"]
        view = {p: n.type for p, n in db.view("implied:1").walk() if p.split(b"/")[0] in (b"x", b"named", b"f")}
    assert view == {b"x": "d", b"x/y": "d", b"x/y/z.txt": "f", b"named": "d", b"named/n.txt": "f", b"f": "d",
                    b"f/g.txt": "f"}


def test_cat_and_log_see_a_file_that_a_later_entry_turned_into_a_directory(tmp_path):
    """A tar naming f as a file and then f/g.txt leaves f a directory (mkdir -p, as
    the full replay does): the per-path lookups must agree with the view."""
    from hostile.make_hostile import entry, one_layer

    from layerdb.engine.api import LayerDB
    from layerdb.engine.errors import UsageError

    arch = one_layer(entry("f", b"a file"), entry("f/g.txt", b"g"), why="COPY . /").write(tmp_path / "i.oci.tar")
    with LayerDB(tmp_path / "s.sqlite") as db:
        db.import_archive(str(arch), tag="implied:1")
        assert db.view("implied:1").get(b"f").type == "d"
        assert db.lookup("implied:1", "/f").type == "d"
        with pytest.raises(UsageError, match="is a directory"):
            b"".join(db.cat("implied:1", "/f"))
        assert b"".join(db.cat("implied:1", "/f/g.txt")) == b"g"
    r = run_cli("log", "/f", "--image", "implied:1", "--json", db_path=tmp_path / "s.sqlite")
    rows = load_json_lines(r.stdout)
    assert r.exit_code == 0 and rows[-1]["type"] == "d", rows


def test_export_dir_device_check_follows_whiteouts_and_hard_links(tmp_path):
    """The special-file check looks up only the paths that ever held one: a device
    deleted by a later layer is no obstacle; one still reachable through a hard
    link is refused under the link's name."""
    from hostile.make_hostile import entry, layer, on_top, tar_bytes

    from layerdb.engine.api import LayerDB

    dev = entry("d/mem", type=tarfile.CHRTYPE)
    dev[0].devmajor, dev[0].devminor = 1, 3
    gone = on_top([layer(tar_bytes([entry("d/", type=tarfile.DIRTYPE), dev]), "mknod"),
                   layer(tar_bytes([entry("d/.wh.mem")]), "rm d/mem")]).write(tmp_path / "gone.oci.tar")
    linked = on_top([layer(tar_bytes([entry("d/", type=tarfile.DIRTYPE), dev,
                                      entry("e/m2", type=tarfile.LNKTYPE, linkname="d/mem")]), "mknod; ln"),
                     layer(tar_bytes([entry("d/.wh.mem")]), "rm d/mem")]).write(tmp_path / "linked.oci.tar")
    with LayerDB(tmp_path / "s.sqlite") as db:
        db.import_archive(str(gone), tag="gone:1")
        db.import_archive(str(linked), tag="linked:1")
        db.export_dir("gone:1", str(tmp_path / "a"))
        assert not (tmp_path / "a" / "d" / "mem").exists() and (tmp_path / "a" / "d").is_dir()
        with pytest.raises(UsageError, match=r"a device file \(/e/m2\)"):
            db.export_dir("linked:1", str(tmp_path / "b"))
        assert not (tmp_path / "b").exists() or not os.listdir(tmp_path / "b")
        with pytest.raises(UsageError, match=r"a device file \(/d/mem\)"):
            db.export_dir("linked:1~1", str(tmp_path / "c"))
