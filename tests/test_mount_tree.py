"""The tree a read-only mount serves (engine/fusefs.py ImageTree) against the whole view.

ImageTree loads a path, or a directory's children, with the events that
decide them, and keeps only an LRU of nodes.  For every fixture image at
every layer, with the LRU forced down to a few nodes and directories loaded
child by child (so everything is loaded again and again), and at its defaults
(small subtrees load at once): every path shows the whole view's node,
every directory lists the whole view's children, hard-linked names share one
inode and count their names, other paths have inodes of their own, and the
totals are the view's.  No FUSE needed: test_fuse.py mounts it for real.
"""

from __future__ import annotations

import pytest

from conftest import REPO_FIXTURES, SHARED_FIXTURES, fixture_archives
from layerdb.engine import refs
from layerdb.engine.containers.container import names_by_node
from layerdb.engine.containers.fusefs import ImageTree
from layerdb.engine.replay import View, chain_events

FIELDS = ("type", "mode", "uid", "gid", "mtime", "size", "blob_id", "sha256", "link", "devmajor", "devminor", "xattrs")


def _check(db, ref: str, nodes: int, monkeypatch, whole: bool = False) -> None:
    """nodes: the LRU's size; a tiny one also keeps one listing and loads
    directories child by child (no subtree at once)."""
    monkeypatch.setattr(ImageTree, "NODES", nodes)
    if nodes < 10:
        monkeypatch.setattr(ImageTree, "SUBTREE", 0)
        monkeypatch.setattr(ImageTree, "LISTINGS", 1)
    with db.store.read():
        chain = refs.resolve(db.store, ref).chain
        whole = View().replay(chain_events(db.store.conn, chain))
    tree = ImageTree(db.store, chain, whole=whole)
    paths = sorted(whole.nodes)
    for p in paths:  # directories first: their listings load their children together
        if whole.nodes[p].type == "d":
            assert tree.list_dir(p) == sorted(whole.children[p]), (ref, p)
    links = names_by_node(whole)
    inos: dict[int, bytes] = {}
    for p in reversed(paths):
        want, got = whole.nodes[p], tree.get(p)
        assert got is not None and [getattr(got, f) for f in FIELDS] == [getattr(want, f) for f in FIELDS], (ref, p)
        names = links.get(id(want), [p])
        assert tree.nlink(got) == (len(names) if want.type != "d" else 1), (ref, p)
        ino = tree.ino(p, got)
        first = inos.setdefault(ino, p)
        assert first == p or whole.nodes[first] is want, (ref, p, first)  # one inode: one file
        assert tree.path_of(ino) in names, (ref, p)
    assert len(inos) == len({id(n) for n in whole.nodes.values()})
    for p in (b"no/such/path", b"etc/passwd/below-a-file"):
        assert tree.get(p) is None
    used = sum(n.size or 0 for n in whole.nodes.values() if n.type == "f")
    assert tree.totals() == (used, len(whole.nodes))


@pytest.mark.parametrize("nodes", [3, ImageTree.NODES, "whole"], ids=["lru-3-children", "lru-default-subtrees", "whole"])
@pytest.mark.parametrize("archive", fixture_archives(REPO_FIXTURES) + fixture_archives(SHARED_FIXTURES),
                         ids=lambda p: p.name)
def test_mount_tree_shows_the_whole_view(db, archive, nodes, monkeypatch):
    """Loaded path by path (an LRU of 3 nodes, or the default), or replayed once
    whole, as a mount of a small chain does."""
    db.import_archive(str(archive))
    for img in db.images():
        for k in range(img["layers"]):
            _check(db, f"{img['id']}~{k}", ImageTree.NODES if nodes == "whole" else nodes, monkeypatch,
                   whole=nodes == "whole")


def test_mount_tree_on_chains_built_to_break_it(db, tmp_path, monkeypatch):
    """Hard links across directories and layers, a file turned directory, a
    link to a name that a later layer replaces."""
    from hostile.make_hostile import entry
    from test_export_memory import D, H, L, _stacked

    arch = _stacked(
        tmp_path,
        ("files", [entry("t", b"was a file\n"), entry("lib", type=L, linkname="usr/lib"),
                   entry("usr/lib/x.so", b"so\n"), entry("z/orig", b"shared\n"), entry("z/other", b"o\n")]),
        ("turn", [entry("f", b"a file\n"), entry("f/g.txt", b"g\n"), entry("t/child", b"c\n"),
                  entry("a/link", type=H, linkname="z/orig"), entry("m/link2", type=H, linkname="a/link"),
                  entry("t/", type=D), entry("lib/", type=D), entry("lib/y.so", b"y\n")]),
        ("replace", [entry("z/orig", b"replaced\n"), entry("q/l3", type=H, linkname="z/other")]),
    )
    db.import_archive(str(arch), tag="t:1")
    for k in range(3):
        for nodes in (1, 2, 50):
            _check(db, f"t:1~{k}", nodes, monkeypatch)
