"""The explorer's model (engine/explore) against independent answers: the fixture
oracles (each layer's view as umoci/containers-storage unpacked it) and the
engine's own `diff`, `log`, `waste`, `find` and `cat`."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath

import pytest

from conftest import REPO_FIXTURES, SHARED_FIXTURES, count_replays, manifest_of_dir, oracle_positions
from test_audit import oracle_diff, oracle_dir, oracle_view
from test_explore_efficiency import _open_layer, dive_score, images_of, trees_of

SAMPLE = REPO_FIXTURES / "images" / "sample.oci.tar"
SAMPLE2 = REPO_FIXTURES / "images" / "sample2.oci.tar"
OPAQUE = REPO_FIXTURES / "images" / "opaque.oci.tar"
needs_shared = pytest.mark.skipif(not SHARED_FIXTURES.is_dir(), reason="../shared/fixtures is absent (CI has it)")

# Images whose every layer is checked: opaque directories, whiteouts, replaced
# directories, hard links, odd names, type changes.
CASES = [pytest.param(SAMPLE, "sample", id="sample"), pytest.param(OPAQUE, "opaque", id="opaque")] + [
    pytest.param(SHARED_FIXTURES / "images" / f"{n}.oci.tar", n, id=n, marks=needs_shared)
    for n in ("fx-ops", "fx-links", "hc-opaque", "hc-type-change", "hc-wh-missing", "hc-hardlink-lower")]


def opened(ts):
    """Open every directory the tree shows, as a user pressing enter on each would."""
    while True:
        more = {r.entry.path for r in ts.rows if r.entry.opens} - ts.expanded
        if not more:
            return ts.rows
        ts.expanded |= more
        ts.refresh()


def rows_by_path(rows):
    out = {r.entry.shown: r.entry for r in rows}
    assert len(out) == len(rows), "a path shown twice"
    return out


def explored(db, archive, tag="t:1"):
    db.import_archive(str(archive), tag=tag)
    return db.explorer(tag)


@pytest.mark.parametrize("archive,oracle", CASES)
def test_tree_at_every_layer_is_the_oracle_view_and_marks_are_its_diff(db, archive, oracle):
    ex = explored(db, archive)
    odir = oracle_dir(archive, oracle)
    assert ex.top == len(oracle_positions(odir))
    for aggregated in (False, True):
        for t in range(1, ex.top + 1):
            ts = db.explorer_tree(ex, t, aggregated)
            shown = rows_by_path(opened(ts))
            view = oracle_view(odir, t)
            here = {p: e for p, e in shown.items() if e.mark != "R"}
            assert set(here) == set(view), (t, aggregated)
            for p, e in here.items():
                o = view[p]
                assert (e.type if e.type != "h" else "f") == o["type"], p
                assert "%04o" % e.mode == o["mode"] and (e.uid, e.gid) == (o["uid"], o["gid"]), p
                if o["type"] == "f":
                    assert e.size == o["size"] and e.sha256.hex() == o["sha256"], p
            b = ex.base(t, aggregated)
            want = {(p, {"A": "A", "D": "R", "C": "M"}[c]) for p, c, _ in oracle_diff(oracle_view(odir, b), view)}
            got = {(p, e.mark) for p, e in shown.items() if e.mark != "U"}
            # Directory mtimes are no change (the engine's diff and the oracles agree on that).
            assert got == want, (t, aggregated)


@pytest.mark.parametrize("archive,oracle", CASES[:3])
def test_hiding_unmodified_keeps_every_change_reachable(db, archive, oracle):
    ex = explored(db, archive)
    for t in range(2, ex.top + 1):
        ref = f"t:1~{ex.top - t}"
        want = {r["path"] for r in db.diff(f"t:1~{ex.top - t + 1}", ref)}
        ts = db.explorer_tree(ex, t)
        ts.toggle_mark("U")
        shown = rows_by_path(opened(ts))
        assert {p for p, e in shown.items() if e.mark != "U"} == want
        # What stays unmarked only leads to changes.
        assert all(e.opens and e.touched_below for e in shown.values() if e.mark == "U")
        for mark in ("A", "R", "M"):
            ts.toggle_mark(mark)
            left = [e for e in rows_by_path(opened(ts)).values() if e.mark == mark]
            assert all(mark == "M" and e.opens and e.touched_below for e in left), mark
            ts.toggle_mark(mark)


def test_layers_and_details_are_the_images_history(db):
    ex = explored(db, SAMPLE, "sample:1.0")
    index = json.loads((oracle_dir(SAMPLE, "sample") / "index.json").read_text())
    got = ex.layers()
    assert [(x["position"], x["layer_id"], x["diff_id"], x["created_by"]) for x in got] == [
        (x["position"], x["chain_id"], x["diff_id"], x["created_by"]) for x in index["layers"]]
    hist = {h["position"]: h for h in db.history("sample:1.0") if h["position"]}
    assert [x["size"] for x in got] == [hist[x["position"]]["size"] for x in got]
    top = ex.layer_details(ex.top)
    assert top["tags"] == ["sample:1.0"] and ex.layer_details(1)["tags"] == []
    assert top["created_by"] == index["layers"][-1]["created_by"]  # whole, not cut
    d = ex.image_details()
    want = dive_score(*trees_of(images_of(SAMPLE)[0][1]))  # dive's rules on the layer tars themselves
    assert (d["efficiency"], d["wasted_bytes"], d["user_wasted_percent"]) == (
        want["efficiency"], want["wasted_bytes"], want["wasted_user_percent"])
    assert d["total_size"] == sum(x["size"] for x in got) == want["size_bytes"]
    assert {(x["path"].encode(), x["count"], x["size"]) for x in d["top_wasted"]} == want["inefficient"]
    # /etc/passwd: 82 bytes in layer 1, 120 in layer 3: dive counts both
    assert d["top_wasted"][0] == {"path": "/etc/passwd", "count": 2, "size": 202, "base": True}
    # Marked as the base image's (dive #454): the files the bottom layer's own tar holds.
    with _open_layer(images_of(SAMPLE)[0][1][0]) as tf:
        in_base = {"/" + posixpath.normpath(m.name) for m in tf}
    base = [x["base"] for x in d["top_wasted"]]
    assert base == [x["path"] in in_base for x in d["top_wasted"]] and any(base) and not all(base)


def test_a_directory_listing_replays_that_directory_only(db, monkeypatch):
    from layerdb.engine.explore import model

    ex = explored(db, SAMPLE)
    sizes = count_replays(monkeypatch, model)
    ts = db.explorer_tree(ex)
    root = len(ts.rows)
    assert root == 9 and sizes and max(sizes) <= root + 1  # not the ~280 names of the image
    ts.select("/bin/sh")
    assert ts.current.shown == "/bin/sh"
    in_bin = [p for p in oracle_view(oracle_dir(SAMPLE, "sample"), 6) if p.startswith("/bin/")]
    assert max(sizes) <= root + len(in_bin) + 2  # the root's names, /bin's, and the two directories
    # rm -rf /app/cache && mkdir /app/cache && echo x > /app/cache/new
    assert ts.ex.touched(6, 5) == {b"", b"app", b"app/cache"}


def test_filter_glob_and_substring_against_the_oracle(db):
    ex = explored(db, SAMPLE)
    # What the tree at 6 shows: the view, and what layer 6 removed from the view at 5.
    view = {**oracle_view(oracle_dir(SAMPLE, "sample"), 5), **oracle_view(oracle_dir(SAMPLE, "sample"), 6)}
    ts = db.explorer_tree(ex)
    for pattern, want in (("passwd", [p for p in view if "passwd" in p]),
                          ("/app/c", [p for p in view if p.startswith("/app/c")]),
                          ("*.ini", [p for p in view if fnmatch.fnmatchcase(p, "*.ini")]),
                          ("cache/*", [p for p in view if fnmatch.fnmatchcase(p, "*/cache/*")])):
        ts.apply_filter(pattern)
        assert sorted(os.fsdecode(b"/" + p) for p in ts.matched) == sorted(want), pattern
        assert ts.current.shown == min(want, key=lambda p: p.replace("/", "\0")), pattern
        shown = {r.entry.shown for r in ts.rows}
        assert set(want) <= shown and all(any(w == s or w.startswith(s + "/") for w in want) for s in shown)
    ts.apply_filter("/app/c")
    order = sorted((p for p in view if p.startswith("/app/c")), key=lambda p: p.replace("/", "\0"))
    seen = [ts.current.shown]
    for _ in order:
        ts.next_match()
        seen.append(ts.current.shown)
    assert seen == order + order[:1]  # wraps
    ts.next_match(-1)
    assert ts.current.shown == order[-1]
    ts.clear_filter()
    assert ts.current.shown == order[-1] and len(ts.rows) > len(order)
    # Removed paths match too, in the layer that removed them.
    ts.set_layer(4)
    ts.apply_filter("docs")
    assert {r.entry.shown: r.entry.mark for r in ts.rows if "docs" in r.entry.shown} == {
        "/app/docs": "R", "/app/docs/README.txt": "R", "/app/docs/CHANGES.txt": "R"}


def test_sort_by_size_puts_the_largest_first_with_directory_totals(db):
    ex = explored(db, SAMPLE)
    view = oracle_view(oracle_dir(SAMPLE, "sample"), 6)
    ts = db.explorer_tree(ex)
    ts.toggle_sort()
    assert ts.sort == "size"
    tops = [r.entry for r in ts.rows]
    def total(d):
        return sum(e.get("size", 0) for p, e in view.items() if p.startswith(d + "/") and e["type"] == "f")
    assert [e.size for e in tops] == sorted((total(e.shown) for e in tops), reverse=True)
    assert tops[0].shown == "/bin"
    ts.toggle_sort()
    assert [r.entry.shown for r in ts.rows] == sorted(r.entry.shown for r in ts.rows)


def test_history_and_diffs_are_log_and_log_p(db):
    ex = explored(db, SAMPLE, "sample:1.0")
    rows = ex.history("/etc/passwd")
    assert rows == db.log("/etc/passwd", image="sample:1.0")
    with_patches = db.log("/etc/passwd", image="sample:1.0", patch=True)
    assert ex.diff("/etc/passwd", 6) == with_patches[1]["patch"]  # the version in force at 6 is 2
    assert ex.diff("/etc/passwd", 2) == with_patches[0]["patch"]  # at 2 it is 1, against nothing
    assert ex.diff("/etc/passwd", 6, 1, 2) == with_patches[1]["patch"]
    assert "+app:x:1000" in ex.diff("/etc/passwd", 6)
    gone = ex.history("/app/docs/README.txt")
    assert [r["op"] for r in gone] == ["add", "delete"]
    assert ex.diff("/app/docs/README.txt", 4).startswith("--- a/app/docs/README.txt\n+++ /dev/null")


def test_file_view_text_binary_and_link(db):
    ex = explored(db, SAMPLE)
    view = oracle_view(oracle_dir(SAMPLE, "sample"), 6)
    v = ex.file_view("/etc/passwd", 6)
    assert v["text"].encode() == b"".join(db.cat("t:1", "/etc/passwd")) and not v["binary"]
    assert v["sha256"] == view["/etc/passwd"]["sha256"] and v["size"] == view["/etc/passwd"]["size"]
    b = ex.file_view("/bin/busybox", 6)
    head = b"".join(db.cat("t:1", "/bin/busybox"))[:256]
    assert b["binary"] and b["text"] is None and b["truncated"]
    assert b["hex"].splitlines()[0] == "00000000  " + " ".join(f"{x:02x}" for x in head[:16]) + "  |.ELF" + "".join(
        chr(x) if 32 <= x < 127 else "." for x in head[4:16]) + "|"
    assert len(b["hex"].splitlines()) == 16
    assert b["sha256"] == view["/bin/busybox"]["sha256"]
    link = ex.file_view("/bin/sh", 6)
    assert link["type"] == "l" and link["link"] == view["/bin/sh"]["link"]
    assert hashlib.sha256(b"".join(ex.contents("/bin/busybox", 6))).hexdigest() == view["/bin/busybox"]["sha256"]


def test_extract_writes_under_the_directory_and_never_replaces(db, tmp_path):
    from layerdb.engine.errors import UsageError

    ex = explored(db, SAMPLE)
    out = tmp_path / "out"
    out.mkdir()
    assert ex.extract("/etc/passwd", 2, str(out)) == str(out / "passwd")
    assert (out / "passwd").read_bytes() == b"".join(db.cat("t:1~4", "/etc/passwd"))
    with pytest.raises(UsageError, match="already exists"):
        ex.extract("/etc/passwd", 6, str(out))
    with pytest.raises(UsageError):
        ex.extract("/", 6, str(out))
    ex.extract("/app", 6, str(out))
    view = oracle_view(oracle_dir(SAMPLE, "sample"), 6)
    got = {json.loads(x)["path"]: json.loads(x) for x in manifest_of_dir(out / "app")}
    want = {p[len("/app/"):]: e for p, e in view.items() if p.startswith("/app/")}
    assert set(got) == set(want)
    for p, e in want.items():
        assert {k: got[p].get(k) for k in ("type", "mode", "size", "sha256", "link")} == {
            k: e.get(k) for k in ("type", "mode", "size", "sha256", "link")}, p
    assert sorted(os.listdir(out)) == ["app", "passwd"]  # nothing beside it


def test_find_and_shared_layers_across_images(db):
    db.import_archive(str(SAMPLE2))
    ex = explored(db, SAMPLE, "sample:1.0")
    assert ex.find("passwd") == db.find(name="passwd")
    assert ex.find("/etc/pass*") == db.find(path="/etc/pass*")
    assert ex.find("cache/*") == db.find(path="*/cache/*")
    sha = db.find(name="passwd")[0]["sha256"]
    assert ex.find(sha[:12]) == db.find(sha256=sha[:12]) and ex.find(sha[:12])
    mine = json.loads((oracle_dir(SAMPLE, "sample") / "index.json").read_text())["layers"]
    other = json.loads((oracle_dir(SAMPLE2, "sample2") / "index.json").read_text())["layers"]
    shared = {x["chain_id"] for x in mine} & {x["chain_id"] for x in other}
    assert shared, "sample2 is built on sample's base"
    for t in range(1, ex.top + 1):
        rows = ex.sharing(t)
        assert bool(rows) == (mine[t - 1]["chain_id"] in shared), t
        for r in rows:
            assert r["layer_id"] == mine[t - 1]["chain_id"] and r["image"] != ex.r.image_digest
            other_ex = db.explorer(r["image"])
            assert other_ex.layers()[t - 1]["layer_id"] == r["layer_id"]


def test_other_commands_do_not_import_textual():
    import subprocess
    import sys

    code = ("import sys; from layerdb.cli.main import cli; from click.testing import CliRunner;"
            " CliRunner().invoke(cli, ['--help']); CliRunner().invoke(cli, ['explore', '--help']);"
            " print('textual' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("archive,oracle", CASES[:1] + CASES[2:4])
def test_a_range_of_layers_is_the_oracle_diff_of_its_ends(db, archive, oracle):
    ex = explored(db, archive)
    odir = oracle_dir(archive, oracle)
    ts = db.explorer_tree(ex, 1)
    for mark in range(1, ex.top + 1):
        ts.set_range(mark)
        for layer in range(1, ex.top + 1):
            ts.set_layer(layer)  # either way round: the range is min..max
            lo, hi = sorted((mark, layer))
            assert (ts.t, ts.b, ts.layer) == (hi, lo - 1, layer)
            shown = rows_by_path(opened(ts))
            want = {(p, {"A": "A", "D": "R", "C": "M"}[c])
                    for p, c, _ in oracle_diff(oracle_view(odir, lo - 1), oracle_view(odir, hi))}
            assert {(p, e.mark) for p, e in shown.items() if e.mark != "U"} == want, (lo, hi)
            assert {p for p, e in shown.items() if e.mark != "R"} == set(oracle_view(odir, hi)), (lo, hi)
    ts.set_layer(3, aggregated=False)  # a or l leave the range
    assert (ts.mark, ts.t, ts.b, ts.mode) == (None, 3, 2, "this layer")


def test_against_another_image_is_the_oracle_diff_of_the_two_views(db):
    ex = explored(db, SAMPLE, "sample:1.0")
    other = explored(db, SAMPLE2, "sample2:1.0")
    mine, theirs = oracle_dir(SAMPLE, "sample"), oracle_dir(SAMPLE2, "sample2")
    ts = db.explorer_tree(ex)
    ts.compare_with(other)
    assert ts.mode == "against sample2:1.0"
    for t in range(1, ex.top + 1):
        ts.set_layer(t)
        shown = rows_by_path(opened(ts))
        top = oracle_view(theirs, other.top)
        want = {(p, {"A": "A", "D": "R", "C": "M"}[c]) for p, c, _ in oracle_diff(top, oracle_view(mine, t))}
        assert {(p, e.mark) for p, e in shown.items() if e.mark != "U"} == want, t
        # Removed names show as the other image has them.
        for p, e in shown.items():
            if e.mark == "R" and top[p]["type"] == "f":
                assert (e.size, e.sha256.hex()) == (top[p]["size"], top[p]["sha256"]), p
    # The filter finds names of either view; the engine's diff agrees.
    ts.set_layer(ex.top)
    gone = sorted(p for p, c, _ in oracle_diff(oracle_view(theirs, other.top), oracle_view(mine, ex.top)) if c == "D")
    assert gone, "sample2 has files that sample lacks"
    ts.apply_filter(gone[0])
    assert gone[0] in {r.entry.shown for r in ts.rows}
    assert {(r["path"], r["change"]) for r in db.diff("sample2:1.0", "sample:1.0")} == {
        (p, c) for p, c, _ in oracle_diff(oracle_view(theirs, other.top), oracle_view(mine, ex.top))}
    ts.compare_with(None)
    assert ts.mode == "this layer" and ts.b == ex.top - 1
