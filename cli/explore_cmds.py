"""`layerdb explore`: an image explorer in the terminal (Textual).

The widgets are thin: what they show comes from the library's model
(engine/explore, reached through api.LayerDB.explorer).  Textual costs about
0.4 s to import, so it is imported inside the command only: no other command
pays for it.
"""

from __future__ import annotations

import os

import click

from .base import cli

HELP = """\
Panes: Layers, Layer Details, Image Details (left); the file tree (right).

tab / shift+tab      next / previous pane: layers, the inefficient files, the tree
up down j k          move; pgup pgdn home end
mouse                a click selects a layer or a row, and opens or closes a
                     directory; a double click on an inefficient file opens its
                     history; the wheel scrolls
enter h (image       the history of an inefficient file; B marks one whose first
  details)           version came with the base layer (the image's steps only changed it)
enter space          open or close a directory (tree)
ctrl+space           close every directory (a terminal sends ctrl+@)
/  ctrl+f            filter the tree by path (glob with * ? [, else a substring;
                     a leading / anchors it at the root); enter applies it
n  N                 next / previous match
esc                  clear the filter
a  ctrl+a (layers)   aggregated changes (against the base layer)
l  ctrl+l            this layer's changes
v                    a range of layers: v marks the selected layer, then moving
                     shows the changes of every layer between the two; v again
                     (or a, l) ends it
c                    compare with another image (a REF): its top view is the
                     base; enter on an empty REF ends it
1 2 3 4              show or hide added, removed, modified, unmodified
                     (tree: ctrl+a ctrl+r ctrl+u; ctrl+m is enter in a terminal)
s  ctrl+o            sort by name or by size (largest first); a long directory is
                     read 1000 names at a time as you scroll, and sorts what is read
h                    history of the selected path; enter jumps to that layer,
                     space marks a version, d diffs it against the cursor's
d                    diff of the selected file against its previous version
o                    view the file (text capped, binary as a hex head)
p                    open the file in $PAGER
e  ctrl+e            extract the file or directory into the current directory
y  Y                 copy the path / the sha256 (OSC 52)
i                    the images that share the selected layer; enter jumps there
:                    find across all stored images: a name or path glob, or a sha256
T                    next theme: dark, light, ansi (--theme picks any; NO_COLOR=1 or
                     --theme none draws without colour)
?                    this help
q                    close the top view, or quit
"""


# --theme: ours, then any of Textual's by name (catppuccin-mocha, solarized-light, ...).
THEMES = {"dark": "textual-dark", "light": "textual-light", "ansi": "ansi-dark"}


@cli.command()
@click.argument("target", metavar="REF|ARCHIVE.tar")
@click.option("--compare", "against", metavar="REF", help="Mark the tree against another image's top view (key c).")
@click.option("--theme", metavar="NAME",
              help="dark (the default), light, ansi (the terminal's own colours), none (no colour, as NO_COLOR=1 "
                   "gives), or a Textual theme's name; T switches between the first three.")
@click.pass_context
def explore(ctx, target, against, theme):
    """Explore an image in the terminal: layers, the file tree per layer with its
    changes, wasted space, a path's history, file diffs, and search across images.

    TARGET is a REF, or an archive (docker save, OCI), which is imported into a
    temporary store first.  Press ? in the explorer for its keys.
    """
    from layerdb.engine.api import LayerDB

    if theme == "none":
        os.environ["NO_COLOR"] = "1"  # Textual then draws without colour (its NoColor filter)
        theme = None
    elif theme is not None:
        from textual.theme import BUILTIN_THEMES

        theme = THEMES.get(theme, theme)
        if theme not in BUILTIN_THEMES:
            raise click.BadParameter(f"{theme!r}: not dark, light, ansi, none, nor one of "
                                     f"{', '.join(sorted(BUILTIN_THEMES))}", param_hint="--theme")
    if os.path.isfile(target):
        import tempfile  # here, not at the top: every other command would load it (and shutil, random) too

        with tempfile.TemporaryDirectory(prefix="layerdb-explore-") as tmp:
            db = LayerDB(os.path.join(tmp, "store.sqlite"))
            try:
                res = db.import_archive(target)
                if not res.images:
                    raise click.ClickException(f"{target}: no image in the archive")
                code = _run(db, res.images[0]["id"], against, theme)
            finally:
                db.close()
    else:
        from .base import open_db

        code = _run(open_db(ctx), target, against, theme)
    ctx.exit(code)


def _run(db, ref: str, against: str | None = None, theme: str | None = None) -> int:
    explorer = db.explorer(ref)  # a bad REF fails here, before the screen is taken
    other = db.explorer(against) if against else None
    app = _app_class()(db, explorer, other, theme)
    app.run()
    return app.return_code or 0


def _app_class():
    """The Textual app, defined here so that Textual loads with the command only."""
    import shlex
    import subprocess

    from rich.segment import Segment
    from rich.text import Text
    from textual.app import App, ComposeResult, SuspendNotSupported
    from textual.binding import Binding
    from textual.containers import Horizontal, Vertical, VerticalScroll
    from textual.geometry import Size
    from textual.screen import Screen
    from textual.scroll_view import ScrollView
    from textual.strip import Strip
    from textual.widgets import DataTable, Input, Static

    from layerdb.engine.errors import LayerdbError

    from . import render

    def mark_styles(theme) -> dict[str, str]:
        # The theme's own success/warning/error colours: ANSI yellow on a light
        # background is what dive's users could not read (dive #680, #695).
        return {"A": theme.success or "green", "M": theme.warning or "yellow", "R": theme.error or "red", "U": ""}
    MARK_NAMES = {"A": "added", "R": "removed", "M": "modified", "U": "unmodified"}

    def human(n):
        return render.size(n) if n is not None else "-"

    class LineList(ScrollView, can_focus=True):
        """Rows drawn one line at a time, only the visible ones, with a cursor; a
        click puts the cursor on its row, the wheel scrolls (ScrollView's own)."""

        BINDINGS = [
            # No j/k-style letters for pages: d and u are the app's (diff) keys.
            Binding("up,k", "move(-1)", "up", show=False),
            Binding("down,j", "move(1)", "down", show=False),
            Binding("pageup", "page(-1)", show=False),
            Binding("pagedown", "page(1)", show=False),
            Binding("home", "move(-1000000000)", show=False),
            Binding("end", "move(1000000000)", show=False),
        ]

        def count(self) -> int:
            raise NotImplementedError

        def line(self, i: int) -> Text:
            raise NotImplementedError

        cursor = 0

        def moved(self) -> None:
            """The cursor has moved (a key or a click)."""

        def sync(self) -> None:
            h = self.scrollable_content_region.height or 1
            c, y = self.cursor, self.scroll_offset.y
            y = c if c < y else c - h + 1 if c >= y + h else y
            self.virtual_size = Size(self.size.width, self.count())
            if y != self.scroll_offset.y:
                self.scroll_to(y=y, animate=False)
            self.refresh()

        def on_resize(self, event) -> None:
            self.sync()

        def render_line(self, y: int) -> Strip:
            width = self.size.width
            i = self.scroll_offset.y + y
            if i >= self.count():
                return Strip.blank(width, self.rich_style)
            text = self.line(i)
            if i == self.cursor:
                text.stylize("reverse" if self.has_focus else "underline")
            # Unstyled text gives segments whose style is None, which NO_COLOR's filter cannot take.
            segs = list(Segment.apply_style(text.render(self.app.console), self.rich_style))
            return Strip(segs).crop(0, width).extend_cell_length(width, self.rich_style)

        def on_focus(self) -> None:
            self.refresh()

        def on_blur(self) -> None:
            self.refresh()

        def action_move(self, n: int) -> None:
            if self.count():
                self.cursor = max(0, min(self.count() - 1, self.cursor + n))
            self.sync()
            self.moved()

        def action_page(self, n: int) -> None:
            self.action_move(n * max(1, self.scrollable_content_region.height - 1))

        def on_click(self, event) -> None:
            i = self.scroll_offset.y + event.y
            if 0 <= i < self.count():
                self.action_move(i - self.cursor)
                self.clicked(event.chain)

        def clicked(self, chain: int) -> None:
            """A click (chain 2: a double click) landed on the cursor's row."""

    class TreeView(LineList):
        """The file tree: renders only the visible rows of the model's TreeState."""

        BINDINGS = [
            Binding("enter,space", "toggle", "open/close"),
            Binding("ctrl+space,ctrl+@", "collapse_all", show=False),
            Binding("ctrl+a", "app.mark('A')", show=False),
            Binding("ctrl+r", "app.mark('R')", show=False),
            Binding("ctrl+u", "app.mark('U')", show=False),
        ]

        def __init__(self, state, **kw):
            super().__init__(**kw)
            self.state = state

        def count(self) -> int:
            return len(self.state.rows)

        @property
        def cursor(self) -> int:
            return self.state.cursor

        @cursor.setter
        def cursor(self, i: int) -> None:
            self.state.cursor = i

        def sync(self) -> None:
            super().sync()
            self.read_shown_more()

        def watch_scroll_y(self, old_value: float, new_value: float) -> None:
            super().watch_scroll_y(old_value, new_value)
            self.call_later(self.read_shown_more)  # the wheel, or a scroll bar drag

        def read_shown_more(self) -> None:
            """A directory's next names are read when its `more` row comes into view."""
            y, h = self.scroll_offset.y, self.scrollable_content_region.height or 1
            for i in range(max(0, y), min(len(self.state.rows), y + h)):
                if self.state.rows[i].more:
                    self.app.guard(self.state.read_more, i)
                    self.virtual_size = Size(self.size.width, self.count())
                    self.refresh()
                    break

        def line(self, i: int) -> Text:
            row = self.state.rows[i]
            if row.more:
                t = Text(" " * 33)
                t.append(row.guides, style="dim")
                t.append("… reading more names", style="dim italic")
                return t
            e = row.entry
            if e.mode is None:
                perm = "-" * 10
            else:
                perm = render.mode_string(e.type, "%o" % e.mode)
            owner = f"{e.uid}:{e.gid}"
            size = human(e.size) if (e.type == "f" or e.size is not None) else "-"
            name = e.name + ("/" if e.opens and not row.expanded else "")
            if e.link is not None and e.type == "l":
                name += " -> " + e.link.decode("utf-8", "surrogateescape")
            t = Text(f"{e.mark} {perm} {owner:>9} {size:>8}  ")
            t.append(row.guides, style="dim")
            style = mark_styles(self.app.current_theme)[e.mark]
            t.append(name, style=style or ("bold" if e.is_dir else ""))
            t.stylize(style, 0, 1)
            return t

        def moved(self) -> None:
            self.app.cursor_moved()

        def clicked(self, chain: int) -> None:
            e = self.state.current
            if e is not None and e.opens and chain == 1:  # a double click would close it again
                self.action_toggle()

        def action_toggle(self) -> None:
            self.app.guard(self.state.toggle)
            self.sync()

        def action_collapse_all(self) -> None:
            self.state.collapse_all()
            self.sync()

    class WastedList(LineList):
        """The image details' inefficient files (dive's list); enter or h opens a
        file's history.  B marks a file whose first version came with the base layer."""

        BINDINGS = [Binding("enter,h", "open", "history")]

        rows: list[dict] = []

        def show(self, rows: list[dict]) -> None:
            self.rows, self.cursor = rows, 0
            self.can_focus = bool(rows)  # tab skips an empty list
            self.styles.height = len(rows)
            self.sync()

        def count(self) -> int:
            return len(self.rows)

        def line(self, i: int) -> Text:
            w = self.rows[i]
            return Text(f"{'B' if w['base'] else ' '}{w['count']:>4}  {human(w['size']):>11}  {w['path']}")

        def action_open(self) -> None:
            if self.rows:
                self.app.open_history(self.rows[self.cursor]["path"])

        def clicked(self, chain: int) -> None:
            if chain == 2:
                self.action_open()

    class LayersTable(DataTable):
        BINDINGS = [
            Binding("j", "cursor_down", show=False),
            Binding("k", "cursor_up", show=False),
            Binding("ctrl+a", "app.aggregated(True)", show=False),
            Binding("ctrl+l", "app.aggregated(False)", show=False),
        ]

    class TextScreen(Screen):
        """A text (a file, a diff, the help) in a scrolling pane; q or esc closes it."""

        BINDINGS = [Binding("q,escape", "app.pop_screen", "close"),
                    Binding("j", "scroll(1)", show=False), Binding("k", "scroll(-1)", show=False)]

        def __init__(self, title: str, body: Text):
            super().__init__()
            self.title_text, self.body = title, body

        def compose(self) -> ComposeResult:
            yield Static(Text(self.title_text, style="bold"), id="text-title")
            with VerticalScroll(id="text-scroll"):
                yield Static(self.body, id="text-body")

        def on_mount(self) -> None:
            self.query_one("#text-scroll").focus()

        def action_scroll(self, n: int) -> None:
            self.query_one("#text-scroll").scroll_relative(y=n, animate=False)

    def diff_text(patch: str) -> Text:
        t = Text()
        for line in patch.splitlines(keepends=True):
            style = ("bold" if line.startswith(("+++", "---")) else "green" if line.startswith("+")
                     else "red" if line.startswith("-") else "cyan" if line.startswith("@@") else "")
            t.append(line, style=style)
        return t

    class TableScreen(Screen):
        """A table of rows (history, find hits, shared images); enter acts on the row."""

        BINDINGS = [Binding("q,escape", "app.pop_screen", "close"),
                    Binding("j", "down", show=False), Binding("k", "up", show=False)]

        def __init__(self, title: str, columns: list[str], rows: list[list[str]], on_enter):
            super().__init__()
            self.title_text, self.columns, self.rows, self.on_enter = title, columns, rows, on_enter

        def compose(self) -> ComposeResult:
            yield Static(Text(self.title_text, style="bold"), id="table-title")
            yield DataTable(id="table", cursor_type="row", zebra_stripes=True)
            yield Static("", id="table-status")

        def on_mount(self) -> None:
            t = self.query_one("#table", DataTable)
            t.add_columns(*self.columns)
            for r in self.rows:
                t.add_row(*(Text(c) for c in r))
            t.focus()

        def action_down(self) -> None:
            self.query_one("#table", DataTable).action_cursor_down()

        def action_up(self) -> None:
            self.query_one("#table", DataTable).action_cursor_up()

        def on_data_table_row_selected(self, event) -> None:
            event.stop()
            self.on_enter(event.cursor_row)

    class HistoryScreen(TableScreen):
        BINDINGS = [Binding("space", "pick", "mark a version"), Binding("d", "diff", "diff")]

        def __init__(self, path: str, rows: list[dict], on_enter, on_diff):
            cells = [[str(r["version"]), str(r["position"]), render.short(r["layer_id"] or ""), r["op"]
                      + (f" ({r['via']})" if r["via"] else ""), r["type"] or "", r["mode"] or "",
                      f"{r['uid']}:{r['gid']}" if r["uid"] is not None else "", human(r["size"]) if r["size"]
                      is not None else "", (r["sha256"] or "")[:12], render.trunc(r["created_by"] or "", 60)]
                     for r in rows]
            super().__init__(f"History of {path}", ["#", "POS", "LAYER", "OP", "TYPE", "MODE", "OWNER", "SIZE",
                                                    "SHA256", "CREATED BY"], cells, on_enter)
            self.on_diff = on_diff
            self.picked: int | None = None

        def action_pick(self) -> None:
            self.picked = self.query_one("#table", DataTable).cursor_row + 1
            self.query_one("#table-status", Static).update(f"version {self.picked} marked: d diffs it against the cursor's")

        def action_diff(self) -> None:
            v = self.query_one("#table", DataTable).cursor_row + 1
            old = self.picked if self.picked is not None else v - 1
            self.on_diff(min(old, v), max(old, v)) if old != v else self.on_diff(v - 1, v)

    class ExplorerApp(App):
        TITLE = "layerdb explore"
        CSS = """
        #left { width: 45%; }
        #layers { height: 1fr; min-height: 8; border: round $secondary; scrollbar-size-horizontal: 0; }
        #layer-details { height: auto; max-height: 10; border: round $secondary; padding: 0 1; }
        #image-details { height: auto; max-height: 12; border: round $secondary; padding: 0 1; }
        #image-summary { height: auto; }
        #wasted { height: 0; max-height: 5; }  /* the rest scrolls: the layers pane keeps its rows */
        #right { border: round $secondary; }
        #tree-head { height: 1; color: $text-muted; }
        #tree { height: 1fr; }
        #filter, #compare { height: 1; border: none; padding: 0; display: none; }
        #filter.on, #compare.on { display: block; }
        #status { height: 1; background: $panel; }
        #layers:focus, #right:focus-within, #image-details:focus-within { border: round $accent; }
        #text-title, #table-title { height: 1; background: $panel; }
        #table-status { height: 1; }
        """
        AUTO_FOCUS = "#tree"
        BINDINGS = [
            Binding("q", "quit_or_close", "quit"),
            Binding("ctrl+c", "quit_now", show=False, priority=True),
            Binding("slash,ctrl+f,ctrl+underscore", "filter", "filter"),
            Binding("escape", "clear_filter", show=False),
            Binding("n", "next_match(1)", show=False),
            Binding("N", "next_match(-1)", show=False),
            Binding("a", "aggregated(True)", "aggregated"),
            Binding("l", "aggregated(False)", "layer"),
            Binding("v", "range", "range"),
            Binding("c", "compare", "compare"),
            Binding("1", "mark('A')", show=False),
            Binding("2", "mark('R')", show=False),
            Binding("3", "mark('M')", show=False),
            Binding("4", "mark('U')", show=False),
            Binding("s,ctrl+o", "sort", "sort"),
            Binding("h", "history", "history"),
            Binding("d", "diff", "diff"),
            Binding("o", "view", "view"),
            Binding("p", "pager", "pager"),
            Binding("e,ctrl+e", "extract", "extract"),
            Binding("y", "copy('path')", show=False),
            Binding("Y", "copy('sha256')", show=False),
            Binding("i", "shared", "shared"),
            Binding("colon", "find", "find"),
            Binding("question_mark", "help", "help"),
            Binding("T", "next_theme", show=False),
        ]

        def __init__(self, db, explorer, against=None, theme=None):
            super().__init__()
            if theme:
                self.theme = theme
            self.db = db
            self.ex = explorer
            self.state = db.explorer_tree(explorer)
            if against is not None:
                self.state.compare_with(against)

        # Layout ------------------------------------------------------------------

        def compose(self) -> ComposeResult:
            with Horizontal():
                with Vertical(id="left"):
                    yield LayersTable(id="layers", cursor_type="row")
                    yield Static(id="layer-details")
                    with Vertical(id="image-details"):
                        yield Static("computing…", id="image-summary")
                        yield WastedList(id="wasted")
                with Vertical(id="right"):
                    yield Static(f"  {'Permission':10} {'UID:GID':>9} {'Size':>8}  Filetree", id="tree-head")
                    yield TreeView(self.state, id="tree")
            yield Input(placeholder="path filter: glob or substring; enter applies, esc clears", id="filter")
            yield Input(placeholder="compare with the image (REF); enter applies, empty ends it, esc cancels",
                        id="compare")
            yield Static(id="status")

        def on_mount(self) -> None:
            self.query_one("#layers").border_title = "Layers"
            self.query_one("#layer-details").border_title = "Layer Details"
            self.query_one("#image-details").border_title = "Image Details"
            self.fill_layers()
            # After the first frame: the pass over every layer's events would share the GIL with it.
            self.call_after_refresh(self.run_worker, self.load_image_details, thread=True, exclusive=True,
                                    group="details")

        def fill_layers(self) -> None:
            table = self.query_one("#layers", LayersTable)
            table.clear(columns=True)
            table.add_column("Cmp", key="cmp")
            table.add_column("#", key="pos")
            table.add_column("Size", key="size")
            table.add_column("Command", key="cmd")
            self.cmp_cells = set()  # the layers whose Cmp cell is marked
            for layer in self.ex.layers():
                # Text, not str: a cell string is markup, and `app:x:1000` would show an emoji.
                table.add_row(" ", str(layer["position"]), human(layer["size"]),
                              Text(render.trunc(layer["created_by"], 80)), key=str(layer["position"]))
            table.move_cursor(row=self.state.layer - 1, animate=False)
            self.show_layer()

        def load_image_details(self) -> None:
            ex = self.ex.reopen()  # its own connection: this runs on a worker thread
            try:
                details = ex.image_details()
            except LayerdbError as e:
                details = {"error": e.message}
            finally:
                ex.db.close()
            self.call_from_thread(self.show_image_details, details)

        def show_image_details(self, d: dict) -> None:
            summary = self.query_one("#image-summary", Static)
            if "error" in d:
                summary.update(d["error"])
                return
            t = Text(f"Image name: {d['image']}\nTotal Image size: {human(d['total_size'])}\n"
                     f"Potential wasted space: {human(d['wasted_bytes'])}\n"
                     f"Image efficiency score: {100 * d['efficiency']:.2f} %")
            if d["top_wasted"]:  # dive's list: paths seen twice or more, all their bytes
                t.append(f"\n{'Count':>5}  {'Total Space':>11}  Path", style="bold")
            summary.update(t)
            self.query_one(WastedList).show(d["top_wasted"])
            self.query_one("#image-details").border_subtitle = (
                "B: from the base layer" if any(w["base"] for w in d["top_wasted"]) else None)

        def show_layer(self) -> None:
            s = self.state
            d = self.ex.layer_details(s.layer)
            text = Text()
            for label, value in (("Tags", ", ".join(d["tags"]) or "(none)"), ("Id", d["layer_id"]),
                                 ("Diff id", d["diff_id"]), ("Size", human(d["size"]))):
                text.append(f"{label}: ", style="bold")
                text.append(f"{value}\n")
            text.append("Command:\n", style="bold")
            text.append(d["created_by"] or "(none)")
            self.query_one("#layer-details", Static).update(text)
            table = self.query_one("#layers", LayersTable)
            lo = 0 if s.against is not None else s.b  # another image: the whole view at t is compared
            marked = set(range(lo + 1, s.t + 1))
            for layer in marked ^ self.cmp_cells:  # each update re-measures the table: only the changes
                table.update_cell(str(layer), "cmp", "█" if layer in marked else " ")
            self.cmp_cells = marked
            self.query_one("#right").border_title = f"Layer {s.t} of {self.ex.top}: " + {
                "aggregated": "aggregated changes", "this layer": "this layer's changes"}.get(
                s.mode, "changes of " + s.mode if s.mark is not None else s.mode)
            self.tree_changed()

        def tree_changed(self) -> None:
            self.query_one(TreeView).sync()
            self.cursor_moved()

        def cursor_moved(self) -> None:
            s = self.state
            parts = [f"layer {s.layer}/{self.ex.top}", s.mode, f"sort: {s.sort}"]
            if s.mark is not None and s.mark == s.layer:
                parts[1] = f"range from {s.mark}: move to its other end"
            if s.hidden:
                parts.append("hidden: " + ",".join(MARK_NAMES[m] for m in "ARMU" if m in s.hidden))
            if s.filter:
                more = "+" if s.more_matches else ""
                parts.append(f"filter {s.filter!r}: {len(s.matched)}{more} matches")
            if s.current is not None:
                parts.append(s.current.shown)
            self.query_one("#status", Static).update(" │ ".join(parts) + "   ? help  q quit")

        def guard(self, fn, *args):
            """Run a model call; a store error becomes a notification, not a crash."""
            try:
                return fn(*args)
            except LayerdbError as e:
                self.notify(e.message, severity="error")
                return None

        # Layers ----------------------------------------------------------------------

        def on_data_table_row_highlighted(self, event) -> None:
            if event.data_table.id != "layers" or event.cursor_row != event.data_table.cursor_row:
                return  # another table's, or stale: the cursor has moved on since (the first highlight on mount)
            t = int(event.row_key.value)
            if t != self.state.layer:
                self.state.set_layer(t)
                self.show_layer()

        def selected_layer(self) -> int:
            """The layers pane's cursor: a key typed right after a move can come before
            the table's highlight message, so the state may not have it yet."""
            t = self.query_one("#layers", LayersTable).cursor_row + 1
            if 1 <= t <= self.ex.top and t != self.state.layer:
                self.state.set_layer(t)
            return self.state.layer

        def action_aggregated(self, on: bool) -> None:
            self.state.set_layer(self.selected_layer(), on)
            self.show_layer()

        def action_range(self) -> None:
            s = self.state
            s.set_range(None if s.mark is not None else self.selected_layer())
            self.show_layer()

        def action_compare(self) -> None:
            f = self.query_one("#compare", Input)
            f.value = ""
            f.add_class("on")
            f.focus()

        def compare_with(self, ref: str) -> None:
            if not ref:
                self.state.compare_with(None)
            else:
                other = self.guard(self.db.explorer, ref)
                if other is None:
                    return
                self.guard(self.state.compare_with, other)
            self.show_layer()

        # Tree ------------------------------------------------------------------------

        def action_mark(self, mark: str) -> None:
            self.state.toggle_mark(mark)
            self.tree_changed()

        def action_sort(self) -> None:
            self.guard(self.state.toggle_sort)
            self.tree_changed()

        def action_filter(self) -> None:
            f = self.query_one("#filter", Input)
            f.add_class("on")
            f.focus()

        def on_input_submitted(self, event) -> None:
            if event.input.id == "compare":
                event.input.remove_class("on")
                self.query_one(TreeView).focus()
                self.compare_with(event.value.strip())
                return
            if event.input.id != "filter":
                return
            self.guard(self.state.apply_filter, event.value.strip())
            if not self.state.filter:
                event.input.remove_class("on")
            self.query_one(TreeView).focus()
            self.tree_changed()

        def action_clear_filter(self) -> None:
            c = self.query_one("#compare", Input)
            if c.has_class("on"):  # esc cancels the compare prompt only
                c.remove_class("on")
                self.query_one(TreeView).focus()
                return
            f = self.query_one("#filter", Input)
            f.value = ""
            f.remove_class("on")
            if self.state.filter:
                self.state.clear_filter()
            self.query_one(TreeView).focus()
            self.tree_changed()

        def action_next_match(self, step: int) -> None:
            self.state.next_match(step)
            self.tree_changed()

        def selected(self):
            e = self.state.current
            if e is None:
                self.notify("nothing selected", severity="warning")
            return e

        def action_history(self) -> None:
            e = self.selected()
            if e is not None:
                self.open_history(e.shown)

        def open_history(self, path: str) -> None:
            """The path's history (from the tree, or a wasted file); enter jumps to a row's layer."""
            rows = self.guard(self.ex.history, path)
            if rows is None:
                return

            def enter(i: int) -> None:
                self.pop_screen()
                self.jump(rows[i]["position"], path)

            def diff(old: int, new: int) -> None:
                text = self.guard(self.ex.diff, path, self.state.t, old, new)
                if text is not None:
                    self.push_screen(TextScreen(f"{path}: version {old} -> {new}", diff_text(text or "(no change)\n")))

            self.push_screen(HistoryScreen(path, rows, enter, diff))

        def jump(self, t: int, path: bytes | str) -> None:
            table = self.query_one("#layers", LayersTable)
            self.state.set_layer(t)
            table.move_cursor(row=t - 1, animate=False)
            if not self.state.select(path):
                self.notify(f"{path if isinstance(path, str) else path.decode('utf-8', 'replace')}: not shown at layer {t}",
                            severity="warning")
            self.show_layer()
            self.query_one(TreeView).focus()

        def action_diff(self) -> None:
            e = self.selected()
            if e is None:
                return
            text = self.guard(self.ex.diff, e.path, self.state.t)
            if text is not None:
                self.push_screen(TextScreen(f"{e.shown}: against its previous version", diff_text(text or "(no change)\n")))

        def action_view(self) -> None:
            e = self.selected()
            if e is None:
                return
            v = self.guard(self.ex.file_view, e.path, self.state.t)
            if v is None:
                return
            if v["type"] != "f":
                body = Text(f"type {v['type']}" + (f"\n-> {v['link']}" if v["link"] is not None else ""))
            elif v["binary"]:
                body = Text(f"binary file, {v['size']} bytes\nsha256 {v['sha256']}\n\n{v['hex']}\n")
            else:
                body = Text(v["text"])
                if v["truncated"]:
                    body.append(f"\n… the first {len(v['text'].encode())} of {v['size']} bytes: p opens all of it in "
                                "the pager\n", style="dim")
            self.push_screen(TextScreen(f"{v['path']} at layer {self.state.t}", body))

        def action_pager(self) -> None:
            e = self.selected()
            if e is None:
                return
            pager = os.environ.get("PAGER") or "less"
            import tempfile

            with tempfile.TemporaryDirectory(prefix="layerdb-explore-") as tmp:
                name = os.path.join(tmp, e.name or "file")
                try:
                    with open(name, "wb") as f:
                        for chunk in self.ex.contents(e.path, self.state.t):
                            f.write(chunk)
                except LayerdbError as err:
                    self.notify(err.message, severity="error")
                    return
                try:
                    with self.suspend():
                        subprocess.run([*shlex.split(pager), name])
                except SuspendNotSupported:  # in a browser (textual-serve) there is no terminal to lend
                    self.notify("no terminal for the pager here: o views the file", severity="warning")

        def action_extract(self) -> None:
            e = self.selected()
            if e is None:
                return
            where = self.guard(self.ex.extract, e.path, self.state.t, os.getcwd())
            if where is not None:
                self.notify(f"extracted {e.shown} to {where}")

        def action_copy(self, what: str) -> None:
            e = self.selected()
            if e is None:
                return
            value = e.shown if what == "path" else (e.sha256.hex() if e.sha256 else None)
            if value is None:
                self.notify("no sha256: not a regular file", severity="warning")
                return
            self.copy_to_clipboard(value)
            self.notify(f"copied {value}")

        # Across images -------------------------------------------------------------------

        def open_image(self, ref: str, t: int, path: str) -> None:
            ex = self.guard(self.db.explorer, ref)
            if ex is None:
                return
            self.ex = ex
            self.state = self.db.explorer_tree(ex, t, self.state.aggregated)
            self.query_one(TreeView).state = self.state
            self.fill_layers()
            self.query_one("#image-summary", Static).update("computing…")
            self.query_one(WastedList).show([])
            self.run_worker(self.load_image_details, thread=True, exclusive=True, group="details")
            self.jump(t, path)

        def action_shared(self) -> None:
            e = self.state.current
            rows = self.ex.sharing(self.state.layer)
            if not rows:
                self.notify(f"no other image holds layer {self.state.layer}")
                return

            def enter(i: int) -> None:
                self.pop_screen()
                self.open_image(rows[i]["image"], rows[i]["position"], e.shown if e else "/")

            self.push_screen(TableScreen(f"Images that share layer {self.state.layer}", ["IMAGE", "POS", "LAYER"],
                                         [[r["label"], str(r["position"]), render.short(r["layer_id"])] for r in rows],
                                         enter))

        def action_find(self) -> None:
            app = self

            class FindScreen(Screen):
                BINDINGS = [Binding("escape", "app.pop_screen", "close")]

                def compose(self) -> ComposeResult:
                    yield Static(Text("Find in every stored image: a name or path glob, or a sha256", style="bold"))
                    yield Input(placeholder="e.g. passwd, *.conf, /etc/*, 7a8a6ad7", id="find-input")
                    yield DataTable(id="find-table", cursor_type="row")
                    yield Static("", id="find-status")

                def on_mount(self) -> None:
                    self.hits = []
                    t = self.query_one("#find-table", DataTable)
                    t.add_columns("IMAGE", "POS", "LAYER", "PATH", "TYPE", "SIZE", "SHA256", "VISIBLE")
                    self.query_one("#find-input").focus()

                def on_input_submitted(self, event) -> None:
                    event.stop()
                    hits = app.guard(app.ex.find, event.value)
                    if hits is None:
                        return
                    self.hits = hits[:2000]  # a table of this many rows still draws at once
                    t = self.query_one("#find-table", DataTable)
                    t.clear()
                    for h in self.hits:
                        t.add_row(*(Text(c) for c in (
                            (h["repo_tags"] or [render.short(h["image"])])[0], str(h["position"]),
                            render.short(h["layer_id"]), h["path"], h["type"], human(h["size"]),
                            (h["sha256"] or "")[:12], "yes" if h["visible"] else "no")))
                    more = f" (first {len(self.hits)} shown)" if len(hits) > len(self.hits) else ""
                    self.query_one("#find-status", Static).update(f"{len(hits)} hits{more}: enter jumps")
                    t.focus()

                def key_q(self) -> None:
                    if not isinstance(self.focused, Input):
                        app.pop_screen()

                def on_data_table_row_selected(self, event) -> None:
                    event.stop()
                    h = self.hits[event.cursor_row]
                    app.pop_screen()
                    if h["image"] is None:
                        app.notify("no image holds that layer", severity="warning")
                        return
                    app.open_image(h["image"], h["position"], h["path"])

            self.push_screen(FindScreen())

        # Help and leaving ---------------------------------------------------------------

        def action_next_theme(self) -> None:
            names = list(THEMES.values())
            self.theme = names[(names.index(self.theme) + 1) % len(names)] if self.theme in names else names[0]
            self.query_one(TreeView).refresh()
            self.notify(f"theme {self.theme}")

        def action_help(self) -> None:
            self.push_screen(TextScreen("layerdb explore: keys", Text(HELP)))

        def action_quit_or_close(self) -> None:
            if isinstance(self.focused, Input):
                return
            if len(self.screen_stack) > 1:
                self.pop_screen()
            else:
                self.exit(0)

        def action_quit_now(self) -> None:
            self.exit(0)

        def check_action(self, action: str, parameters) -> bool | None:
            # Typing into the filter must not fire the tree's letter keys.
            if isinstance(self.focused, Input) and action not in ("quit_now", "clear_filter"):
                return False
            return True

    return ExplorerApp
