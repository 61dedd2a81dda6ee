"""The storage peers: ostree and casync, fed the images' top views (as unpacked by umoci).

Both store file trees, not layers: they keep only the views they are given and
no layer history, which is why layerdb keeping every layer's history and still
being smaller is the claim to test.
"""

from __future__ import annotations

from pathlib import Path

from common import du, have, rmtree, run


def ostree_sizes(repo: Path, trees: list[tuple[str, Path]]) -> list[int]:
    """Commit each tree to its own branch of an archive-mode repo; the repo's bytes after each."""
    if not have("ostree"):
        return []
    rmtree(repo)
    run(["ostree", f"--repo={repo}", "init", "--mode=archive"])
    sizes = []
    for branch, tree in trees:
        run(["ostree", f"--repo={repo}", "commit", f"--branch={branch}", f"--tree=dir={tree}",
             "--no-xattrs", "--timestamp=2024-01-01T00:00:00Z", "--subject=bench"])
        sizes.append(du(repo))
    return sizes


def casync_sizes(store: Path, trees: list[tuple[str, Path]]) -> list[int]:
    """`casync make` each tree into one chunk store (default chunk sizes); the store plus
    its indexes after each."""
    if not have("casync"):
        return []
    rmtree(store)
    store.mkdir(parents=True)
    chunks = store / "default.castr"
    sizes = []
    for name, tree in trees:
        run(["casync", "make", "--without=xattrs", f"--store={chunks}", store / f"{name}.caidx", tree])
        sizes.append(du(store))
    return sizes
