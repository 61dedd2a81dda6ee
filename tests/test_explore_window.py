"""Long directories in the explorer are read a window at a time.  The image is
made by GNU tar from real directories: /big holds 20k files in layer 1, and
layer 2 deletes some (whiteouts), rewrites one and adds others.  The expected
names are the real directories' own listings."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tracemalloc

import pytest

N = 20_000
# Names around the skip scan's bounds: 'sub' < 'sub-x' < 'sub/...' < 'sub0'.
ODD = ["sub-x", "sub0", "a0", "a-b"]
GONE = {"f00005", "f10000", "f19998", "sub0"}


def _tar(root, out) -> bytes:
    subprocess.run(["tar", "-C", str(root), "--sort=name", "--owner=0", "--group=0", "--numeric-owner",
                    "--mtime=@1700000000", "-cf", str(out), "."], check=True)
    return out.read_bytes()


def _archive(tmp, layers: list[bytes]) -> str:
    diff_ids = ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids},
                         "history": [{"created_by": f"step {i + 1}"} for i in range(len(layers))]}).encode()
    cname = hashlib.sha256(config).hexdigest() + ".json"
    names = [f"l{i}/layer.tar" for i in range(len(layers))]
    manifest = json.dumps([{"Config": cname, "RepoTags": ["big:1"], "Layers": names}]).encode()
    path = tmp / "big.tar"
    with tarfile.open(path, "w") as t:
        for name, data in [*zip(names, layers), (cname, config), ("manifest.json", manifest)]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return str(path)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """The archive, and /big's names at layer 1 and at layer 2 (from the real directories)."""
    tmp = tmp_path_factory.mktemp("window")
    one = tmp / "one"
    (one / "big" / "sub").mkdir(parents=True)
    for i in range(N):
        (one / "big" / f"f{i:05d}").write_bytes(b"%d\n" % i)
    for name in ODD:
        (one / "big" / name).write_bytes(name.encode())
    (one / "big" / "sub" / "inner").write_bytes(b"x")
    two = tmp / "two"
    (two / "big").mkdir(parents=True)
    for name in GONE:
        (two / "big" / (".wh." + name)).write_bytes(b"")
    (two / "big" / "f00010").write_bytes(b"changed\n")
    (two / "big" / "zz-new").write_bytes(b"new\n")
    layers = [_tar(one, tmp / "1.tar"), _tar(two, tmp / "2.tar")]
    before = sorted(os.listdir(one / "big"))
    shutil.rmtree(one)
    after = sorted(set(before) - GONE | {"zz-new"})
    return _archive(tmp, layers), before, after


def listing(ts):
    return [(r.entry.shown, r.entry.mark) for r in ts.rows if r.depth == 1 and not r.more]


def on_big(db, big):
    """The tree of big:1 with the cursor on /big (closed), and /big's names of both layers."""
    archive, before, after = big
    db.import_archive(archive)
    ts = db.explorer_tree(db.explorer("big:1"))
    ts.select("/big")
    return ts, sorted(set(before) | set(after))


def test_a_long_directory_opens_one_window_and_reading_on_gives_all_of_it(db, big):
    from layerdb.engine.explore import model

    ts, names = on_big(db, big)
    tracemalloc.start()
    ts.toggle()  # open /big
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    first = listing(ts)
    assert len(first) == model.WINDOW and ts.rows[-1].more and ts.rows[-1].depth == 1
    # A window of names, not 20k: each name costs some hundreds of bytes while read.
    assert peak < 4 * model.WINDOW * 1024, peak
    assert [p for p, _ in first] == ["/big/" + n for n in names[:model.WINDOW]]
    reads = 0
    while ts.rows[-1].more:
        assert ts.read_more(len(ts.rows) - 1)
        reads += 1
    assert reads == len(names) // model.WINDOW
    want = {"/big/" + n: ("R" if n in GONE else "A" if n == "zz-new" else "M" if n == "f00010" else "U")
            for n in names}
    got = listing(ts)
    assert [p for p, _ in got] == sorted(want) and dict(got) == want
    assert not ts.read_more(0)  # no `more` row there


def test_the_cursor_stays_on_the_more_row_s_place_and_jumps_need_no_window(db, big):
    from layerdb.engine.explore import model

    ts, names = on_big(db, big)
    ts.toggle()
    at = len(ts.rows) - 1
    ts.cursor = at
    assert ts.current is None  # a `more` row selects nothing
    ts.read_more(at)
    assert ts.cursor == at and ts.current.shown == "/big/" + names[model.WINDOW]
    # A name far down the directory is selected without reading the windows before it.
    ts2 = db.explorer_tree(db.explorer("big:1"))
    assert ts2.select("/big/f19990") and ts2.current.shown == "/big/f19990"
    assert len(listing(ts2)) == model.WINDOW + 1 and ts2.current.mark == "U"
    assert ts2.select("/big/f19998") and ts2.current.mark == "R"
    # The filter finds matches beyond the first window and shows only them.
    ts2.apply_filter("/big/f1999")
    assert [r.entry.shown for r in ts2.rows] == ["/big"] + [f"/big/f1999{i}" for i in range(10)]
    assert ts2.current.shown == "/big/f19990" and not any(r.more for r in ts2.rows)
    ts2.clear_filter()
    assert ts2.rows[-1].more


def test_the_skip_scan_reads_names_next_to_a_subtree(db, big):
    """'sub-x' and 'sub0' sort around 'sub/inner'; both are read, once."""
    archive, before, _ = big
    db.import_archive(archive)
    ex = db.explorer("big:1")
    got = [e.name for e in ex.children(b"big", 1, 0)]
    while ex.more_names(b"big", 1, 0):
        ex.read_more(b"big", 1, 0)
        got = [e.name for e in ex.children(b"big", 1, 0)]
    assert got == before


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_in_a_terminal_scrolling_to_the_end_reads_the_next_window(big, tmp_path):
    import sys

    from test_explore_tmux import Term, status, tree
    from layerdb.engine.api import LayerDB
    from layerdb.engine.explore.model import WINDOW

    archive, before, after = big
    names = sorted(set(before) | set(after))
    store = tmp_path / "store.sqlite"
    with LayerDB(store) as db:
        db.import_archive(archive)
    t = Term([sys.executable, "-m", "layerdb.cli.main", "--db", str(store), "explore", "big:1"])
    try:
        t.wait(lambda s: tree(s) == ["U drwxr-xr-x       0:0        -  └── big/"])
        t.keys("Enter")
        s = t.wait(lambda s: len(tree(s)) > 10)
        assert tree(s)[:3] == ["U drwxr-xr-x       0:0        -  └── big",
                               "U -rw-r--r--       0:0       3B      ├── a-b",
                               "U -rw-r--r--       0:0       2B      ├── a0"]
        t.keys("End")  # the `more` row comes into view: the next window is read, the cursor on its first name
        s = t.wait(lambda s: status(s).endswith(f"/big/{names[WINDOW]}   ? help  q quit"))
        rows = tree(s)
        at = rows.index(f"U -rw-r--r--       0:0       4B      ├── {names[WINDOW]}")
        assert rows[at - 1:at + 1] == [f"U -rw-r--r--       0:0       4B      ├── {n}" for n in names[WINDOW - 1:WINDOW + 1]]
        assert not any("reading more names" in r for r in rows)
        t.keys("End")
        s = t.wait(lambda s: status(s).endswith(f"/big/{names[2 * WINDOW]}   ? help  q quit"))
        t.keys("q")
        assert "EXIT=0" in t.wait_for("EXIT=")
    finally:
        t.close()


def test_the_mouse_wheel_scrolls_the_tree_and_reads_the_next_window(tmp_path, big):
    """Headless (Pilot): the wheel moves the view, not the cursor, and a `more` row
    scrolled into view reads the next names, as the keys do."""
    import asyncio

    from textual.events import MouseScrollDown, MouseScrollUp

    from layerdb.cli.explore_cmds import _app_class
    from layerdb.engine.api import LayerDB
    from layerdb.engine.explore.model import WINDOW

    archive, before, after = big
    names = sorted(set(before) | set(after))
    with LayerDB(tmp_path / "store.sqlite") as db:
        db.import_archive(archive)
        app = _app_class()(db, db.explorer("big:1"))

        async def main():
            async with app.run_test(size=(120, 40)) as pilot:
                tree = app.query_one("#tree")
                await pilot.press("enter")  # open /big: its first window
                await pilot.pause()
                assert listing(app.state) == [("/big/" + n, m) for n, m in listing_marks(names[:WINDOW], after, before)]
                assert app.state.rows[-1].more and tree.scroll_offset.y == 0
                h = tree.scrollable_content_region.height
                for _ in range(3):
                    await pilot._post_mouse_events([MouseScrollDown], tree, offset=(5, 5))
                await pilot.pause()
                y = tree.scroll_offset.y
                assert y > 0 and app.state.cursor == 0 and tree.cursor == 0  # the view moved, the cursor did not
                await pilot._post_mouse_events([MouseScrollUp], tree, offset=(5, 5))
                await pilot.pause()
                assert 0 <= tree.scroll_offset.y < y
                # Near the end of the window, the wheel brings the `more` row into view: the next names are read.
                tree.scroll_to(y=len(app.state.rows) - h - 1, animate=False)
                await pilot.pause()
                assert len(listing(app.state)) == WINDOW
                for _ in range(3):
                    await pilot._post_mouse_events([MouseScrollDown], tree, offset=(5, 5))
                await pilot.pause()
                assert [p for p, _ in listing(app.state)] == ["/big/" + n for n in names[:2 * WINDOW]]
                await pilot.press("q")

        asyncio.run(main())
    assert app.return_code == 0


def listing_marks(shown, after, before):
    """This layer's marks for names of /big at layer 2: R for the deleted, A for the new, M the rewritten one."""
    gone, new = set(before) - set(after), set(after) - set(before)
    return [(n, "R" if n in gone else "A" if n in new else "M" if n == "f00010" else "U") for n in shown]
