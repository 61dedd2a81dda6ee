"""`layerdb explore` headless (Textual's App.run_test and Pilot): every key of
issue 15's table, and the mouse, on the fixture images in a real store.  What
the widgets hold is checked against the engine's own answers (listing, log,
diff, waste, find, cat), never against an earlier run of the app.

One app serves the whole module (a Pilot key costs about 45 ms, an app's start
far more): it runs on an event loop of its own thread, and each test starts
from the same state (`fresh`)."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from test_explore_tmux import sample_store

SIZE = (120, 40)
TOP = 6  # sample:1.0's layers


class Running:
    """An app under Pilot on a loop in another thread; `run(fn)` runs `await fn(pilot)` there."""

    def __init__(self, app, size=SIZE):
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        started = threading.Event()
        self.stop: asyncio.Event | None = None

        async def main():
            self.stop = asyncio.Event()
            async with app.run_test(size=size) as pilot:
                self.pilot = pilot
                started.set()
                await self.stop.wait()

        self.done = asyncio.run_coroutine_threadsafe(main(), self.loop)
        if not started.wait(60):
            raise AssertionError(f"the app did not start: {self.done}")

    def run(self, fn, timeout: float = 60):
        from textual._context import active_app

        async def in_app():
            # A task made from another thread starts in that thread's context: without
            # the app in it, a widget's refresh would not find its app.
            active_app.set(self.app)
            return await fn(self.pilot)

        return asyncio.run_coroutine_threadsafe(in_app(), self.loop).result(timeout)

    def close(self) -> None:
        if self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        try:
            self.done.result(60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture(scope="module")
def oracle(store):
    from layerdb.engine.api import LayerDB

    with LayerDB(store) as db:
        yield db


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return sample_store(tmp_path_factory)


@pytest.fixture(scope="module")
def running(store):
    from layerdb.cli.explore_cmds import _app_class
    from layerdb.engine.api import LayerDB

    db = LayerDB(store)
    app = _app_class()(db, db.explorer("sample:1.0"))
    r = Running(app)
    r.run(details_loaded)
    yield r
    r.close()
    db.close()


async def details_loaded(pilot):
    """The image details come from a worker thread: wait for them."""
    from layerdb.cli.explore_cmds import _app_class  # noqa: F401  (textual is loaded by now)

    for _ in range(600):
        if "Image efficiency score" in str(pilot.app.query_one("#image-summary").render()):
            return
        await pilot.pause(0.05)
    raise AssertionError("the image details never came")


@pytest.fixture
def app(running):
    """The module's app, back at sample:1.0's top layer, this layer's changes, nothing open."""
    running.run(fresh)
    return running.app


async def fresh(pilot):
    app = pilot.app
    while len(app.screen_stack) > 1:
        app.pop_screen()
    await pilot.pause()
    if app.ex.label != "sample:1.0":
        app.open_image("sample:1.0", TOP, "/")
        await details_loaded(pilot)
    for name in ("#filter", "#compare"):
        app.query_one(name).value = ""
        app.query_one(name).remove_class("on")
    s = app.state
    s.clear_filter()
    s.hidden.clear()
    s.sort = "name"
    s.expanded.clear()
    s.set_layer(TOP, False)
    app.query_one("#layers").move_cursor(row=TOP - 1, animate=False)
    app.show_layer()
    s.cursor = 0
    app.query_one("#tree").focus()
    app.tree_changed()
    await pilot.pause()


def act(running, *keys, then=None):
    """Press the keys, let the app settle, and return `then(app)` read on the app's loop."""

    async def go(pilot):
        await pilot.press(*keys)
        await pilot.pause()
        return then(pilot.app) if then else None

    return running.run(go)


def paths(app) -> list[str]:
    return [r.entry.shown for r in app.state.rows if not r.more]


def row_text(app, i: int) -> str:
    return app.query_one("#tree").line(i).plain


def selected(app) -> str | None:
    e = app.state.current
    return e.shown if e else None


def status(app) -> str:
    return str(app.query_one("#status").render())


def names(oracle, ref: str, path: str = "/") -> list[str]:
    return [e["path"] for e in oracle.listing(ref, path)]


def both(oracle, t: int, path: str) -> list[str]:
    """A directory's names in the view at t or at t - 1, in byte order."""
    return sorted(set(names(oracle, ref_at(t), path)) | set(names(oracle, ref_at(t - 1), path)),
                  key=lambda p: p.encode())


def ref_at(t: int) -> str:
    return f"sample:1.0~{TOP - t}"


def marks_against(oracle, base: str, top: str) -> dict[str, str]:
    return {r["path"]: {"A": "A", "C": "M", "D": "R"}[r["change"]] for r in oracle.diff(base, top)}


def open_all(running):
    """Open every directory the tree shows (what enter on each would do)."""

    async def go(pilot):
        s = pilot.app.state
        while more := {r.entry.path for r in s.rows if r.entry.opens} - s.expanded:
            s.expanded |= more
            s.refresh()
        pilot.app.tree_changed()
        await pilot.pause()

    running.run(go)


def shown_marks(app) -> dict[str, str]:
    return {r.entry.shown: r.entry.mark for r in app.state.rows if not r.more and r.entry.mark != "U"}


def goto(running, path: str) -> None:
    async def go(pilot):
        assert pilot.app.state.select(path), path
        pilot.app.tree_changed()
        await pilot.pause()

    running.run(go)


# The first frame ----------------------------------------------------------------------


def test_first_frame_is_the_engines_answers(running, app, oracle):
    from layerdb.cli.render import trunc

    table = app.query_one("#layers")
    history = [h for h in oracle.history("sample:1.0") if h["position"] is not None]
    history.sort(key=lambda h: h["position"])
    assert table.row_count == TOP == len(history)
    for i, h in enumerate(history):
        row = table.get_row_at(i)
        assert str(row[1]) == str(h["position"]) and str(row[3]) == trunc(h["created_by"] or "", 80)
    assert table.cursor_row == TOP - 1 and app.focused is app.query_one("#tree")
    details = str(app.query_one("#layer-details").render())
    assert history[-1]["diff_id"] in details and history[-1]["layer_id"] in details
    # At the top layer, this layer's changes: the root's names, marked by the engine's diff.
    assert paths(app) == names(oracle, "sample:1.0")
    assert [row_text(app, i)[0] for i in range(len(paths(app)))] == ["U"] * len(paths(app))
    assert status(app) == "layer 6/6 │ this layer │ sort: name │ /app   ? help  q quit"
    w = oracle.waste("sample:1.0")
    summary = str(app.query_one("#image-summary").render())
    assert f"Image efficiency score: {100 * w['efficiency']:.2f} %" in summary
    assert f"Potential wasted space: {w['wasted_bytes']}B" in summary
    wasted = app.query_one("#wasted")
    assert [(r["path"], r["count"], r["size"]) for r in wasted.rows] == [
        (i["path"], i["count"], i["size"]) for i in w["inefficiencies"]]


# Panes and moving ---------------------------------------------------------------------


def test_tab_cycles_the_panes_and_shift_tab_goes_back(running, app):
    order = [act(running, "tab", then=lambda a: a.focused.id) for _ in range(3)]
    assert order == ["layers", "wasted", "tree"]
    assert act(running, "shift+tab", then=lambda a: a.focused.id) == "wasted"


def test_moving_in_the_tree_arrows_j_k_pages_home_end(running, app, oracle):
    root = names(oracle, "sample:1.0")
    assert act(running, "down", "j", then=selected) == root[2]
    assert act(running, "k", then=selected) == root[1]
    assert act(running, "up", then=selected) == root[0]
    assert act(running, "end", then=selected) == root[-1]
    assert act(running, "home", then=selected) == root[0]
    assert act(running, "pagedown", then=selected) == root[-1]  # the root fits in a page
    assert act(running, "pageup", then=selected) == root[0]


def test_moving_in_the_layers_pane_shows_each_layers_changes(running, app, oracle):
    act(running, "tab")
    for keys, t in ((("up",), 5), (("k", "k"), 3), (("j",), 4), (("down",), 5)):
        got = act(running, *keys, then=lambda a: (a.state.layer, a.state.t, a.query_one("#right").border_title))
        assert got == (t, t, f"Layer {t} of {TOP}: this layer's changes"), keys
        open_all(running)
        assert shown_marks(app) == marks_against(oracle, ref_at(t - 1), ref_at(t)), t
    assert act(running, "pageup", then=lambda a: a.state.layer) == 1  # the six layers fit in a page
    assert act(running, "pagedown", then=lambda a: a.state.layer) == TOP


def test_enter_and_space_open_and_close_a_directory_ctrl_space_closes_all(running, app, oracle):
    # This layer's changes show the names of the view below too: the removed ones.
    assert act(running, "enter", then=paths) == ["/app", *both(oracle, TOP, "/app"), *names(oracle, "sample:1.0")[1:]]
    act(running, "j", "j")  # /app/cache
    assert selected(app) == "/app/cache"
    got = act(running, "space", then=paths)
    at = got.index("/app/cache")
    inside = both(oracle, TOP, "/app/cache")
    assert got[at + 1:at + 1 + len(inside)] == inside and len(inside) == 3
    assert act(running, "space", then=lambda a: "/app/cache/new" in paths(a)) is False
    assert act(running, "ctrl+@", then=paths) == names(oracle, "sample:1.0")
    assert selected(app) == "/app"  # the cursor's top directory


# Filter -----------------------------------------------------------------------------


def test_filter_enter_n_N_and_escape(running, app, oracle):
    act(running, "slash")
    assert app.focused.id == "filter"
    act(running, *"passwd", "enter")
    hits = sorted({h["path"] for h in oracle.find(path="*passwd*") if h["image"] and "sample:1.0" in h["repo_tags"]})
    assert hits == ["/etc/passwd"]
    assert app.focused.id == "tree" and selected(app) == "/etc/passwd"
    assert paths(app) == ["/etc", "/etc/passwd"]
    assert "filter 'passwd': 1 matches" in status(app)
    act(running, "slash", *"/app/c", "enter")  # a leading / anchors it at the root
    want = sorted(p for p in [*names(oracle, "sample:1.0", "/app"), *names(oracle, ref_at(5), "/app/cache"),
                              *names(oracle, "sample:1.0", "/app/cache")] if p.startswith("/app/c"))
    assert app.state.matched == [p.encode().lstrip(b"/") for p in sorted(set(want))]
    assert selected(app) == "/app/cache"
    assert act(running, "n", "n", then=selected) == "/app/cache/new"
    assert act(running, "N", then=selected) == "/app/cache/index.txt"
    got = act(running, "escape", then=lambda a: (a.state.filter, a.query_one("#filter").has_class("on"), selected(a)))
    assert got == ("", False, "/app/cache/index.txt")
    assert "/app/run.sh" in paths(app)  # the whole tree again, the opened directories kept


# Modes, marks, sort ---------------------------------------------------------------------


def test_a_aggregated_and_l_this_layer(running, app, oracle):
    act(running, "a")
    open_all(running)
    assert app.state.mode == "aggregated" and "│ aggregated │" in status(app)
    assert shown_marks(app) == marks_against(oracle, ref_at(1), "sample:1.0")
    act(running, "l")
    open_all(running)
    assert shown_marks(app) == marks_against(oracle, ref_at(TOP - 1), "sample:1.0")
    act(running, "tab", "ctrl+a")  # dive's keys, in the layers pane
    assert app.state.mode == "aggregated"
    act(running, "ctrl+l")
    assert app.state.mode == "this layer"


def test_1_2_3_4_hide_and_show_added_removed_modified_unmodified(running, app, oracle):
    # Removals show at layer 4 (rm /app/old.log, rm -rf /app/docs), the rest aggregated at the top.
    for key, mark, keys in (("1", "A", "a"), ("2", "R", ("tab", "up", "up", "l", "shift+tab")), ("3", "M", "a"),
                            ("4", "U", "a")):
        running.run(fresh)
        act(running, *keys)
        open_all(running)
        before = {r.entry.shown: r.entry for r in app.state.rows}
        assert mark in {e.mark for e in before.values()}, mark
        act(running, key)
        after = {r.entry.shown: r.entry.mark for r in app.state.rows}
        gone = set(before) - set(after)
        tops = {p for p in gone if p.rsplit("/", 1)[0] not in gone}
        assert tops and {before[p].mark for p in tops} == {mark}, key
        assert after == {p: e.mark for p, e in before.items() if p not in gone}
        # A hidden name's subtree goes with it; a directory that leads to changes stays.
        assert all(p.startswith(tuple(q + "/" for q in tops)) for p in gone - tops)
        assert all(before[p].opens and before[p].touched_below for p, m in after.items() if m == mark)
        label = dict(A="added", R="removed", M="modified", U="unmodified")[mark]
        assert f"hidden: {label}" in act(running, then=status)
        act(running, key)
        assert {r.entry.shown: r.entry.mark for r in app.state.rows} == {p: e.mark for p, e in before.items()}, key


def test_s_sorts_by_size_and_back(running, app, oracle):
    sizes = {}
    for e in oracle.listing("sample:1.0", "/", recursive=True):
        if e["type"] == "f":
            top = "/" + e["path"].split("/")[1]
            sizes[top] = sizes.get(top, 0) + e["size"]
    want = sorted(names(oracle, "sample:1.0"), key=lambda p: (-sizes.get(p, 0), p.encode()))
    assert act(running, "s", then=paths) == want
    assert "sort: size" in status(app)
    assert act(running, "ctrl+o", then=paths) == names(oracle, "sample:1.0")
    assert "sort: name" in status(app)


# One path: history, diff, view, pager, extract, copy ------------------------------------------


def test_h_history_then_enter_jumps_to_the_layer(running, app, oracle):
    goto(running, "/etc/passwd")
    act(running, "h")
    table = app.screen.query_one("#table")
    log = oracle.log("/etc/passwd", image="sample:1.0")
    assert table.row_count == len(log) == 2
    for i, r in enumerate(log):
        cells = [str(c) for c in table.get_row_at(i)]
        assert cells[:4] == [str(r["version"]), str(r["position"]), r["layer_id"][7:19], r["op"]]
        assert cells[8] == r["sha256"][:12]
    got = act(running, "enter", then=lambda a: (len(a.screen_stack), a.state.layer, selected(a)))
    assert got == (1, log[0]["position"], "/etc/passwd")
    assert app.query_one("#layers").cursor_row == log[0]["position"] - 1


def test_d_diffs_against_the_previous_version_and_two_picked_in_the_history(running, app, oracle):
    log = oracle.log("/etc/passwd", image="sample:1.0", patch=True)
    goto(running, "/etc/passwd")
    act(running, "d")
    assert str(app.screen.query_one("#text-body").render()) == log[1]["patch"]
    act(running, "q", "h", "space")  # version 1 marked
    act(running, "j", "d")
    assert "version 1 -> 2" in str(app.screen.query_one("#text-title").render())
    assert str(app.screen.query_one("#text-body").render()) == log[1]["patch"]
    assert act(running, "q", "q", then=lambda a: len(a.screen_stack)) == 1


def test_o_views_the_file_as_cat_gives_it(running, app, oracle):
    goto(running, "/app/config.ini")
    act(running, "o")
    assert str(app.screen.query_one("#text-body").render()) == b"".join(oracle.cat("sample:1.0", "/app/config.ini")).decode()
    assert "/app/config.ini at layer 6" in str(app.screen.query_one("#text-title").render())
    act(running, "q")
    [busybox] = [e for e in oracle.listing("sample:1.0", "/bin") if e["path"] == "/bin/busybox"]
    head = b"".join(oracle.cat("sample:1.0", "/bin/busybox"))[:16]
    goto(running, "/bin/busybox")
    act(running, "o")
    body = str(app.screen.query_one("#text-body").render()).splitlines()
    assert body[:4] == [f"binary file, {busybox['size']} bytes", f"sha256 {busybox['sha256']}", "",
                        "00000000  " + " ".join(f"{b:02x}" for b in head) + "  |"
                        + "".join(chr(b) if 32 <= b < 127 else "." for b in head) + "|"]
    act(running, "q")
    link = next(e for e in oracle.listing("sample:1.0", "/bin") if e["type"] == "l")
    goto(running, link["path"])
    act(running, "o")
    assert str(app.screen.query_one("#text-body").render()) == f"type l\n-> {link['link']}"


@pytest.fixture
def can_suspend(monkeypatch):
    """The headless driver has no terminal to lend; pretend it has one, as a real
    terminal's driver does (that suspending a real terminal works is test_explore_tmux's)."""
    from textual.drivers.headless_driver import HeadlessDriver

    monkeypatch.setattr(HeadlessDriver, "can_suspend", property(lambda self: True), raising=False)
    monkeypatch.setattr(HeadlessDriver, "suspend_application_mode", lambda self: None, raising=False)
    monkeypatch.setattr(HeadlessDriver, "resume_application_mode", lambda self: None, raising=False)


def test_p_runs_the_pager_on_the_file(running, app, oracle, tmp_path, monkeypatch, can_suspend):
    stub = tmp_path / "pager.sh"
    marker = tmp_path / "paged"
    stub.write_text(f'#!/bin/sh\ncp "$1" {marker}\necho "$#" > {marker}.argc\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PAGER", f"{stub}")
    goto(running, "/etc/passwd")
    act(running, "p")
    assert marker.read_bytes() == b"".join(oracle.cat("sample:1.0", "/etc/passwd"))
    assert (tmp_path / "paged.argc").read_text() == "1\n"
    assert len(app.screen_stack) == 1 and selected(app) == "/etc/passwd"


def test_p_without_a_terminal_says_so(running, app, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGER", str(tmp_path / "never-run"))
    goto(running, "/etc/passwd")
    act(running, "p")
    assert any("no terminal for the pager" in n.message for n in app._notifications)


def test_e_extracts_under_the_cwd_only(running, app, oracle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    goto(running, "/etc/passwd")
    act(running, "e")
    assert (tmp_path / "passwd").read_bytes() == b"".join(oracle.cat("sample:1.0", "/etc/passwd"))
    goto(running, "/app/cache")
    act(running, "ctrl+e")
    assert sorted(os.listdir(tmp_path / "cache")) == [p.rsplit("/", 1)[1] for p in names(oracle, "sample:1.0", "/app/cache")]
    # /bin holds an absolute symlink (app -> /app/run.sh): it lands as a symlink, never followed.
    goto(running, "/bin")
    act(running, "e")
    links = [e for e in oracle.listing("sample:1.0", "/bin") if e["type"] == "l"]
    assert links and all(os.readlink(tmp_path / "bin" / e["path"].rsplit("/", 1)[1]) == e["link"] for e in links)


def test_e_never_writes_through_what_the_cwd_holds(running, app, tmp_path, monkeypatch):
    """A hostile cwd: the target name is a symlink to a file outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_bytes(b"keep me\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "passwd").symlink_to(outside / "passwd")
    (cwd / "cache").symlink_to(outside)
    monkeypatch.chdir(cwd)
    goto(running, "/etc/passwd")
    act(running, "e")
    goto(running, "/app/cache")
    act(running, "e")
    assert (outside / "passwd").read_bytes() == b"keep me\n" and sorted(os.listdir(outside)) == ["passwd"]
    errors = [n.message for n in app._notifications if n.severity == "error"]
    assert f"{cwd}/passwd: already exists" in errors and f"{cwd}/cache: already exists" in errors


def test_y_copies_the_path_and_Y_the_sha256(running, app, oracle):
    goto(running, "/app/config.ini")
    assert act(running, "y", then=lambda a: a.clipboard) == "/app/config.ini"
    [entry] = [e for e in oracle.listing("sample:1.0", "/app") if e["path"] == "/app/config.ini"]
    assert act(running, "Y", then=lambda a: a.clipboard) == entry["sha256"]


# Across images -------------------------------------------------------------------------


def test_colon_finds_across_images_and_enter_jumps(running, app, oracle):
    act(running, "colon", *"passwd", "enter")
    table = app.screen.query_one("#find-table")
    hits = oracle.find(name="passwd")
    assert table.row_count == len(hits) >= 3
    got = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
    assert [(r[0], r[1], r[3]) for r in got] == [((h["repo_tags"] or ["?"])[0], str(h["position"]), h["path"])
                                                 for h in hits]
    i = next(i for i, h in enumerate(hits) if h["repo_tags"] == ["sample2:1.0"])
    act(running, *["down"] * i, "enter")
    assert (app.ex.label, app.state.layer, selected(app)) == ("sample2:1.0", hits[i]["position"], "/etc/passwd")


def test_i_lists_the_images_sharing_the_layer_and_enter_opens_one(running, app, oracle):
    act(running, "tab", *["up"] * (TOP - 1))  # layer 1: sample2 is built on it
    assert app.state.layer == 1
    goto(running, "/etc/passwd")
    act(running, "i")
    table = app.screen.query_one("#table")
    assert [str(c) for c in table.get_row_at(0)][:2] == ["sample2:1.0", "1"] and table.row_count == 1
    act(running, "enter")
    assert (app.ex.label, app.state.layer, selected(app)) == ("sample2:1.0", 1, "/etc/passwd")


def test_v_a_range_of_layers_and_c_another_image(running, app, oracle):
    act(running, "tab", "up", "v", "up", "up")  # layers 3 to 5
    open_all(running)
    assert app.state.mode == "layers 3-5" and app.state.t == 5
    assert shown_marks(app) == marks_against(oracle, ref_at(2), ref_at(5))
    act(running, "v", "c", *"sample2:1.0", "enter")
    open_all(running)
    assert app.state.mode == "against sample2:1.0"
    assert shown_marks(app) == marks_against(oracle, "sample2:1.0", ref_at(3))


# Mouse -------------------------------------------------------------------------------------


def click_row(running, widget_id: str, row: int, header: int = 0, times: int = 1):
    """A click on a widget's row: Pilot's offsets are the screen's."""

    async def go(pilot):
        w = pilot.app.query_one(f"#{widget_id}")
        r = w.content_region
        await pilot.click(offset=(r.x + 2, r.y + header + row - int(w.scroll_offset.y)), times=times)
        await pilot.pause()

    running.run(go)


def test_a_click_on_a_layer_selects_it_and_on_a_directory_toggles_it(running, app, oracle):
    click_row(running, "layers", 2, header=1)
    assert (app.state.layer, app.focused.id) == (3, "layers")
    open_all(running)
    assert shown_marks(app) == marks_against(oracle, ref_at(2), ref_at(3))
    running.run(fresh)
    root = names(oracle, "sample:1.0")
    click_row(running, "tree", root.index("/etc"))
    assert app.focused.id == "tree" and selected(app) == "/etc"
    assert paths(app) == root[:root.index("/etc") + 1] + names(oracle, "sample:1.0", "/etc") + root[root.index("/etc") + 1:]
    click_row(running, "tree", root.index("/etc"))
    assert paths(app) == root
    click_row(running, "tree", root.index("/etc"), times=2)  # a double click leaves it open
    assert "/etc/passwd" in paths(app)
    click_row(running, "tree", root.index("/etc"))
    click_row(running, "tree", 0)  # opens /app; a click on a file then selects it
    click_row(running, "tree", 4)
    inside = both(oracle, TOP, "/app")
    assert selected(app) == inside[3] and app.state.current.type == "f" and paths(app)[1:1 + len(inside)] == inside


# The inefficient files: drilling into their history (dive #454) -----------------------------------


def test_enter_or_h_on_an_inefficient_file_opens_its_history_base_files_marked(running, app, oracle):
    w = oracle.waste("sample:1.0")["inefficiencies"]
    wasted = app.query_one("#wasted")
    for i, item in enumerate(w):
        first = oracle.log(item["path"], image="sample:1.0")[0]["position"]
        assert wasted.line(i).plain[0] == ("B" if first == 1 else " "), item["path"]
    assert [wasted.line(i).plain[0] for i in range(len(w))] == ["B", " ", " ", " ", " "]  # /etc/passwd came with it
    act(running, "tab", "tab", "j")
    assert app.focused is wasted and wasted.cursor == 1
    act(running, "enter")
    table = app.screen.query_one("#table")
    log = oracle.log(w[1]["path"], image="sample:1.0")
    assert f"History of {w[1]['path']}" in str(app.screen.query_one("#table-title").render())
    assert [[str(c) for c in table.get_row_at(i)][:4] for i in range(table.row_count)] == [
        [str(r["version"]), str(r["position"]), r["layer_id"][7:19], r["op"]] for r in log]
    act(running, "j", "enter")  # the second version's layer, the path selected
    assert (app.state.layer, selected(app), app.focused.id) == (log[1]["position"], w[1]["path"], "tree")
    act(running, "shift+tab", "k", "h")
    assert f"History of {w[0]['path']}" in str(app.screen.query_one("#table-title").render())
    act(running, "q")
    click_row(running, "wasted", 3)  # a click selects a row, a double click opens its history
    assert (len(app.screen_stack), wasted.cursor, app.focused) == (1, 3, wasted)
    click_row(running, "wasted", 2, times=2)
    assert f"History of {w[2]['path']}" in str(app.screen.query_one("#table-title").render())


# Help, themes, leaving ---------------------------------------------------------------------------


def test_question_mark_help_and_T_themes(running, app):
    from layerdb.cli.explore_cmds import HELP

    act(running, "question_mark")
    assert str(app.screen.query_one("#text-body").render()) == HELP
    assert "mouse" in HELP and act(running, "q", then=lambda a: len(a.screen_stack)) == 1
    themes = [act(running, "T", then=lambda a: a.theme) for _ in range(3)]
    assert themes == ["textual-light", "ansi-dark", "textual-dark"]


def test_q_closes_the_top_view_then_quits_with_0(running, app):
    """The module's last test: the app ends here."""
    goto(running, "/etc/passwd")
    act(running, "h", "d")
    assert len(app.screen_stack) == 3
    assert act(running, "q", then=lambda a: len(a.screen_stack)) == 2
    assert act(running, "q", then=lambda a: len(a.screen_stack)) == 1
    async def quit(pilot):
        await pilot.press("q")
        for _ in range(200):
            if not pilot.app.is_running:
                return
            await asyncio.sleep(0.05)

    running.run(quit)
    assert not app.is_running and app.return_code == 0
