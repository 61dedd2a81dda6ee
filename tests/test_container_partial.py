"""A container's partial view (engine/container.py, for large images) against its whole view.

Two containers of the sample image take the same random operations: one
through a handle that keeps the whole view, one through a handle that loads
only the paths each operation reads.  Every operation must succeed or fail
alike on both (the same error and errno), and in the end both logs must give
the same view (the same tar, byte for byte) and commit the same layer.  The
views themselves are checked against real directories in test_container.py;
this test is about the partial bookkeeping: what is loaded, reloaded after a
write, and listed.
"""

from __future__ import annotations

import hashlib
import io
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO_FIXTURES

SAMPLE = REPO_FIXTURES / "images" / "sample.oci.tar"
T = 1_700_086_400
EXAMPLES = int(os.environ.get("LAYERDB_FUZZ_EXAMPLES", "40"))

# Paths of the sample image (files, a hard-linked pair, a symlink, directories
# with and without children) and paths it lacks, some below files.
PATHS = ["etc", "etc/motd", "etc/passwd", "etc/group", "app", "app/VERSION", "app/version.txt", "app/cache",
         "app/cache/new", "app/run.sh", "bin", "bin/cat", "new", "new/a", "new/a/b", "etc/motd/x", "app/../etc/x"]

path = st.sampled_from(PATHS)
op = st.one_of(
    st.tuples(st.just("write"), path, st.binary(max_size=8)),
    st.tuples(st.just("append"), path, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("mkdir"), path, st.booleans()),
    st.tuples(st.just("remove"), path, st.sampled_from([None, True, False]), st.booleans()),
    st.tuples(st.just("rename"), path, path, st.booleans()),
    st.tuples(st.just("symlink"), path, st.sampled_from(["../etc", "/app", "motd", "missing"])),
    st.tuples(st.just("link"), path, path),
    st.tuples(st.just("chmod"), path, st.sampled_from([0o600, 0o755, 0o4755])),
)


def _apply(c, o) -> tuple:
    """Run one operation; its outcome as comparable data."""
    from layerdb.engine.errors import LayerdbError

    kind, *args = o
    try:
        if kind == "write":
            r = c.write_file("/" + args[0], args[1], mtime=T)
        elif kind == "append":
            r = c.append_file("/" + args[0], args[1], mtime=T)
        elif kind == "mkdir":
            r = c.mkdir("/" + args[0], parents=args[1], mtime=T)
        elif kind == "remove":
            r = c.remove("/" + args[0], recursive=args[2], want_dir=args[1], mtime=T)
        elif kind == "rename":
            r = c.rename("/" + args[0], "/" + args[1], noreplace=args[2], mtime=T)
        elif kind == "symlink":
            r = c.symlink("/" + args[0], args[1], mtime=T)
        elif kind == "link":
            r = c.link("/" + args[0], "/" + args[1], mtime=T)
        else:
            r = c.chmod("/" + args[0], args[1])
        return ("ok", r)
    except LayerdbError as e:
        return ("error", type(e).__name__, getattr(e, "errno", None))


@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="LAYERDB_FUZZ_EXAMPLES" not in os.environ)
@given(ops=st.lists(op, min_size=1, max_size=10))
def test_partial_view_acts_as_the_whole_view(tmp_path_factory, ops):
    from layerdb.engine.api import LayerDB
    from layerdb.engine.containers.container import Container

    db = LayerDB(tmp_path_factory.mktemp("partial") / "store.sqlite")
    try:
        db.import_archive(str(SAMPLE))
        db.container_create("sample:1.0", "whole")
        db.container_create("sample:1.0", "partial")
        w = Container(db.store, db.content, "whole", whole=True)
        p = Container(db.store, db.content, "partial", whole=False)
        for o in ops:
            assert _apply(p, o) == _apply(w, o), o
        assert not p.whole  # nothing here needed the whole view
        tars = []
        for name in ("whole", "partial"):
            buf = io.BytesIO()
            db.export_tar(name, buf)
            tars.append(buf.getvalue())
        assert tars[0] == tars[1]
        layers = [hashlib.sha256(b"".join(db.layer_tar(c.commit(None)["diff_id"]))).hexdigest() for c in (w, p)]
        assert layers[0] == layers[1]
    finally:
        db.close()
