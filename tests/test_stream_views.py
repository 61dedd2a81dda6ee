"""`view -R` and `diff` stream both views in tree order (engine/export.py TreeEntries)
instead of replaying whole views: a large image replays partition by partition.

The streamed rows must be the rows the whole views give.  These tests compute
that expectation here from replay.View directly (a whole replay of each chain)
and compare, with partitions forced tiny (one or two paths each, so every
cross-partition relation is exercised) and with a whole replay, on every
fixture image at every layer position, every pair of positions within an
image and pairs across images.
"""

from __future__ import annotations

import pytest

from conftest import REPO_FIXTURES, SHARED_FIXTURES, count_replays, fixture_archives, load_json_lines, replaying, run_cli
from layerdb.engine import audit, refs, tree
from layerdb.engine.audit import common as audit_common, diffs as audit_diff
from layerdb.engine.api import node_dict
from layerdb.engine.errors import NotFound
from layerdb.engine.replay import View, chain_events, tree_key

MODES = (None, 1, 2)  # whole replay, partitions of 1 and of 2 paths






def _positions(db) -> list[list[str]]:
    """Per image, its refs at every layer position."""
    return [[f"{img['id']}~{k}" for k in range(img["layers"])] for img in db.images()]


def _whole(db, ref: str):
    with db.store.read():
        r = refs.resolve(db.store, ref)
        return r, View().replay(chain_events(db.store.conn, r.chain))


def _want_listing(db, ref: str, path: bytes) -> list[dict]:
    r, view = _whole(db, ref)
    chain_ids = {li.position: li.chain_id for li in r.layers}
    node = view.get(path)
    if node is None:
        raise NotFound(path)
    if node.type != "d":
        return [node_dict(path, node, chain_ids)]
    return [node_dict(q, n, chain_ids) for q, n in sorted(view.walk(path), key=lambda e: tree_key(e[0]))]


def _want_dir(db, ref: str, path: bytes) -> list[dict] | None:
    """`view` of one directory (not -R): its entries sorted by raw bytes, from the whole view."""
    r, view = _whole(db, ref)
    chain_ids = {li.position: li.chain_id for li in r.layers}
    node = view.get(path)
    if node is None:
        return None
    entries = [(path, node)] if node.type != "d" else view.list_dir(path)
    return [node_dict(q, n, chain_ids) for q, n in entries]


def _check_dirs(db, ref: str) -> None:
    """A directory's listing replays that directory and its children only: the
    same rows as the whole view, for every directory, some files, a missing path."""
    _, view = _whole(db, ref)
    dirs = sorted(p for p, n in view.nodes.items() if n.type == "d")
    others = sorted(p for p, n in view.nodes.items() if n.type != "d")[:3]
    for p in dirs[:400] + others + [b"no/such/path", b"etc/passwd/x"]:
        want = _want_dir(db, ref, p)
        if want is None:
            with pytest.raises(NotFound):
                db.listing(ref, p)
        else:
            assert db.listing(ref, p) == want, (ref, p)


def _want_diff(db, a: str, b: str) -> list[dict]:
    va, vb = _whole(db, a)[1], _whole(db, b)[1]
    rows = []
    for p in sorted(va.nodes.keys() | vb.nodes.keys(), key=tree_key):
        if p:
            c = audit.classify(audit_common.state(va.get(p)), audit_common.state(vb.get(p)))
            if c is not None:
                rows.append(audit_diff.change_row(p, va.get(p), vb.get(p), c))
    return rows


def _subpaths(db, ref: str) -> list[bytes]:
    """The root, a few directories and non-directories, and a missing path."""
    _, view = _whole(db, ref)
    paths = sorted((p for p in view.nodes if p), key=tree_key)
    dirs = [p for p in paths if view.nodes[p].type == "d"]
    others = [p for p in paths if view.nodes[p].type != "d"]
    return [b""] + dirs[:: max(1, len(dirs) // 4)][:5] + others[:2] + [b"no/such/path"]


def _check_listing(db, ref: str, monkeypatch, more: tuple[bytes, ...] = ()) -> None:
    for p in _subpaths(db, ref) + list(more):
        try:
            want = _want_listing(db, ref, p)
        except NotFound:
            want = None
        for mode in MODES:
            with monkeypatch.context() as m:
                replaying(m, mode)
                if want is None:
                    with pytest.raises(NotFound):
                        db.iter_listing(ref, p, recursive=True)  # raised before the first row
                    continue
                assert list(db.iter_listing(ref, p, recursive=True)) == want, (ref, p, mode)
                assert db.listing(ref, p, recursive=True) == want, (ref, p, mode)


def _check_diff(db, a: str, b: str, monkeypatch) -> None:
    want = _want_diff(db, a, b)
    for mode in MODES:
        with monkeypatch.context() as m:
            replaying(m, mode)
            assert audit.diff(db, a, b, restrict=False) == want, (a, b, mode)
            assert list(audit.iter_diff(db, a, b)) == want, (a, b, mode)
    with monkeypatch.context() as m:  # the restricted replay is bounded: beyond it, the streams
        m.setattr(audit_diff, "RESTRICTED_PATHS", 0)
        replaying(m, 2)
        assert audit.diff(db, a, b) == want, (a, b, "unrestricted")


def _check_store(db, monkeypatch, across: bool = True) -> None:
    images = _positions(db)
    assert images
    for positions in images:
        for ref in positions:
            _check_listing(db, ref, monkeypatch)
            _check_dirs(db, ref)
        for a in positions:
            for b in positions:
                _check_diff(db, a, b, monkeypatch)
    if across:
        for x in images:
            for y in images:
                if x is not y:
                    _check_diff(db, x[-1], y[0], monkeypatch)
                    _check_diff(db, x[0], y[-1], monkeypatch)


@pytest.mark.parametrize("archive", fixture_archives(REPO_FIXTURES) + [REPO_FIXTURES / "multiplatform" / "multi.oci.tar"],
                         ids=lambda p: p.name)
def test_repo_fixtures_stream_equals_whole(db, archive, monkeypatch):
    db.import_archive(str(archive))
    _check_store(db, monkeypatch)


@pytest.mark.skipif(not SHARED_FIXTURES.is_dir(), reason="../shared/fixtures is not beside the checkout (CI has it)")
@pytest.mark.parametrize("archive", fixture_archives(SHARED_FIXTURES), ids=lambda p: p.name)
def test_shared_fixtures_stream_equals_whole(db, archive, monkeypatch):
    db.import_archive(str(archive))
    _check_store(db, monkeypatch)


def test_diff_across_repo_images(db, monkeypatch):
    """Unrelated images in one store: every top against every other image's positions."""
    for archive in fixture_archives(REPO_FIXTURES):
        db.import_archive(str(archive))
    images = _positions(db)
    assert len(images) >= 3
    for x in images:
        for y in images:
            if x is not y:
                for b in y:
                    _check_diff(db, x[-1], b, monkeypatch)


def test_tree_order_links_and_files_turned_directories(db, tmp_path, monkeypatch):
    """Tree order puts `py/python3/` and its subtree before `py/python3.11`;
    hard links and a file that becomes a directory cross partition edges."""
    from hostile.make_hostile import entry
    from test_export_memory import D, H, L, _stacked

    arch = _stacked(
        tmp_path,
        ("files", [entry("t", b"was a file\n"), entry("lib", type=L, linkname="usr/lib"),
                   entry("usr/lib/x.so", b"so\n"), entry("py/python3.11", b"interpreter\n"),
                   entry("z/orig", b"shared\n")]),
        ("turn", [entry("f", b"a file\n"), entry("f/g.txt", b"g\n"), entry("t/child", b"c\n"),
                  entry("a/link", type=H, linkname="z/orig"), entry("t/", type=D),
                  entry("py/python3/", type=D), entry("py/python3/site.py", b"site\n"),
                  entry("lib/", type=D), entry("lib/y.so", b"y\n")]),
    )
    db.import_archive(str(arch), tag="t:1")
    _check_store(db, monkeypatch)
    paths = [r["path"] for r in db.listing("t:1", "/py", recursive=True)]
    assert paths == ["/py/python3", "/py/python3/site.py", "/py/python3.11"]
    assert [r["path"] for r in audit.diff(db, "t:1~1", "t:1") if r["path"].startswith("/py")] == \
        ["/py/python3", "/py/python3/site.py"]


def test_streams_hold_a_bounded_view(db, tmp_path, monkeypatch):
    """With partitions, no replay behind `view -R` or `diff` holds the whole image."""
    from hostile.make_hostile import entry
    from test_export_memory import _stacked

    arch = _stacked(tmp_path, ("base", [entry(f"d{i % 7}/s{i % 3}/f{i}", b"%d\n" % i) for i in range(1000)]),
                    ("more", [entry(f"e{i % 5}/g{i}", b"%d\n" % i) for i in range(500)]))
    db.import_archive(str(arch), tag="t:1")
    want_rows = _want_listing(db, "t:1", b"")
    want_diff = _want_diff(db, "t:1~1", "t:1")
    replaying(monkeypatch, 100)
    sizes = count_replays(monkeypatch, tree)
    monkeypatch.setattr(audit_diff, "RESTRICTED_PATHS", 0)
    assert db.listing("t:1", "/", recursive=True) == want_rows
    assert max(sizes) <= 110
    sizes.clear()
    assert audit.diff(db, "t:1~1", "t:1") == want_diff
    assert len(want_diff) == 505  # 500 files and their 5 directories
    assert len(sizes) >= 20 and max(sizes) <= 110


def test_cli_streams_the_same_rows(tmp_path, monkeypatch):
    from layerdb.engine.api import LayerDB

    store = tmp_path / "s.sqlite"
    archive = REPO_FIXTURES / "images" / "sample.oci.tar"
    assert run_cli("import", str(archive), db_path=store).exit_code == 0
    replaying(monkeypatch, 2)
    db = LayerDB(store)
    try:
        want = _want_listing(db, "sample:1.0", b"")
        want_app = _want_listing(db, "sample:1.0", b"app")
        want_diff = _want_diff(db, "sample:1.0~4", "sample:1.0")
    finally:
        db.close()
    assert load_json_lines(run_cli("view", "-R", "--at", "sample:1.0", "--json", db_path=store).stdout) == want
    text = run_cli("view", "-R", "--at", "sample:1.0", "/app", db_path=store).stdout.splitlines()
    assert text == [r["path"] + ("/" if r["type"] == "d" else "") for r in want_app]
    long = run_cli("view", "-R", "-l", "--at", "sample:1.0", db_path=store).stdout.splitlines()
    assert [line.rsplit(" ", 1)[-1] if " -> " not in line else line.split(" -> ")[0].rsplit(" ", 1)[-1]
            for line in long] == [r["path"] for r in want]
    r = run_cli("view", "-R", "--at", "sample:1.0", "/no/such", db_path=store)
    assert r.exit_code != 0 and "no such file or directory" in r.output
    got = load_json_lines(run_cli("diff", "sample:1.0~4", "sample:1.0", "--json", db_path=store).stdout)
    assert got == want_diff
    (stat,) = load_json_lines(run_cli("diff", "sample:1.0~4", "sample:1.0", "--stat", "--json",
                                      db_path=store).stdout)
    assert stat == audit.diff_stat(want_diff)


def test_containers_stream_and_agree(db, monkeypatch):
    """A container's view (its log replays in seq order) streams in partitions as an
    image's does, and agrees with the whole replay, against itself and its image."""
    db.import_archive(str(REPO_FIXTURES / "images" / "sample.oci.tar"))
    db.container_create("sample:1.0", "c")
    db.mkdir("c", "/d")
    db.write_file("c", "/d/x", b"x")
    db.write_file("c", "/f", b"one")
    db.remove_path("c", "/d", recursive=True)
    db.mkdir("c", "/d")
    db.write_file("c", "/d/y", b"y")
    db.remove_path("c", "/etc/passwd")
    _check_listing(db, "c", monkeypatch, more=(b"d", b"etc/passwd"))
    for a, b in (("sample:1.0", "c"), ("c", "sample:1.0"), ("sample:1.0~2", "c"), ("c", "c")):
        _check_diff(db, a, b, monkeypatch)
    assert [(r["change"], r["path"]) for r in audit.diff(db, "sample:1.0", "c")] == [
        ("A", "/d"), ("A", "/d/y"), ("D", "/etc/passwd"), ("A", "/f")]
