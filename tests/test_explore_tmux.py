"""`layerdb explore` in a real terminal: tmux runs it in a pty of a fixed size,
keys go in as a terminal sends them (Ctrl+Space arrives as ctrl+@, Ctrl+O as
0x0f), and the screen is read back with capture-pane."""

from __future__ import annotations

import contextlib
import itertools
import re
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO_FIXTURES

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
SAMPLE = REPO_FIXTURES / "images" / "sample.oci.tar"
SAMPLE2 = REPO_FIXTURES / "images" / "sample2.oci.tar"  # sample's base, then /srv (for comparing images)
WIDTH, HEIGHT = 120, 36
_ids = itertools.count()


def sample_store(tmp_path_factory):
    """A store holding sample:1.0 and sample2:1.0 (the explorer's tests share it)."""
    from layerdb.engine.api import LayerDB

    path = tmp_path_factory.mktemp("explore") / "store.sqlite"
    with LayerDB(path) as db:
        db.import_archive(str(SAMPLE))
        db.import_archive(str(SAMPLE2))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return sample_store(tmp_path_factory)


class Term:
    """One tmux server of our own (its own socket): other tmux users are untouched."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None):
        self.socket = f"layerdb-test-{os.getpid()}-{next(_ids)}"
        inner = " ".join(_quote(a) for a in argv)
        # The shell prints the exit code once the app has left and restored the screen.
        # COLUMNS and LINES, when the test's environment has them, would override the pty's size.
        command = f"env -u COLUMNS -u LINES {inner}; echo EXIT=$?; sleep 600"
        envs = [x for k, v in (env or {}).items() for x in ("-e", f"{k}={v}")]
        # The app starts in a pane that already has its size: a program started by
        # new-session itself can read the size before tmux has set it (80x24).
        self.tmux("new-session", "-d", "-s", "t", "-x", str(WIDTH), "-y", str(HEIGHT), "sleep 600")
        self.tmux("respawn-pane", "-k", "-t", "t", *envs, *(["-c", cwd] if cwd else []), command)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def screen(self, colours: bool = False) -> list[str]:
        out = self.tmux("capture-pane", "-p", *(["-e"] if colours else []), "-t", "t")
        return out.rstrip("\n").split("\n")

    def keys(self, *keys: str) -> None:
        for k in keys:
            self.tmux("send-keys", "-t", "t", k)
            time.sleep(0.05)

    def text(self, s: str) -> None:
        self.tmux("send-keys", "-t", "t", "-l", s)

    def wait(self, pred, timeout: float = 15.0) -> list[str]:
        end = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if pred(screen):
                return screen
            if time.monotonic() > end:
                size = self.tmux("display", "-p", "-t", "t", "#{window_width}x#{window_height}").strip()
                raise AssertionError(f"the screen ({size}) never showed what was expected:\n" + "\n".join(screen))
            time.sleep(0.1)

    def wait_for(self, text: str, timeout: float = 15.0) -> list[str]:
        return self.wait(lambda s: any(text in line for line in s), timeout)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        # kill-server leaves the socket file behind.
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(os.environ.get("TMUX_TMPDIR", "/tmp"), f"tmux-{os.getuid()}", self.socket))


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


@pytest.fixture
def term(store):
    opened: list[Term] = []

    def start(*args: str, env=None, cwd=None) -> Term:
        t = Term([sys.executable, "-m", "layerdb.cli.main", "--db", str(store), "explore", *args], env, cwd)
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


def tree(screen: list[str]) -> list[str]:
    """The tree pane's rows (inside its border, under its header), trailing blanks cut."""
    top = next((i for i, line in enumerate(screen) if "╭─ Layer " in line and " of " in line), None)
    if top is None:
        return []
    col = screen[top].index("╭─ Layer ")
    rows = []
    for line in screen[top + 2:]:
        if line[col:].startswith("╰"):
            break
        rows.append(line[col + 1:].rstrip().rstrip("│").rstrip())
    while rows and not rows[-1]:
        rows.pop()
    return rows


def status(screen: list[str]) -> str:
    return next((line for line in reversed(screen) if " │ " in line and "q quit" in line), "").strip()


ROOT = ["U drwxr-xr-x       0:0        -  ├── app/", "U drwxr-xr-x       0:0        -  ├── bin/",
        "U drwxr-xr-x       0:0        -  ├── dev/", "U drwxr-xr-x       0:0        -  ├── etc/",
        "U drwxr-xr-x       0:0        -  ├── proc/", "U drwx------       0:0        -  ├── root/",
        "U drwxr-xr-x       0:0        -  ├── run/", "U drwxr-xr-x       0:0        -  ├── sys/",
        "U drwxrwxrwt       0:0        -  └── tmp/"]


def test_first_frame_then_q_quits_with_0_and_restores_the_screen(term):
    t = term("sample:1.0")
    s = t.wait(lambda s: tree(s) == ROOT)
    assert s[0].startswith("╭─ Layers ") and "╭─ Layer 6 of 6: this layer's changes ─" in s[0]
    assert "│  Permission   UID:GID     Size  Filetree" in s[1]
    assert status(s) == "layer 6/6 │ this layer │ sort: name │ /app   ? help  q quit"
    s = t.wait_for("Image efficiency score: 99.99 %")  # dive's: 1982805 / 1983033 bytes
    at = next(i for i, line in enumerate(s) if "Potential wasted space" in line)
    assert [line[:54] for line in s[at:at + 8]] == [
        "│ Potential wasted space: 372B                       │",
        "│ Image efficiency score: 99.99 %                    │",
        "│ Count  Total Space  Path                           │",
        "│ B   2         202B  /etc/passwd                    │",  # B: its first version is in layer 1
        "│     2         125B  /app/config.ini                │",
        "│     2          20B  /app/cache/seed.txt            │",
        "│     2          16B  /app/old.log                   │",
        "│     2           9B  /app/cache/index.txt           │"]
    t.keys("q")
    s = t.wait_for("EXIT=")
    assert "EXIT=0" in s and not any("Layers" in line for line in s)  # the shell's screen is back


def test_filter_enter_n_and_escape(term):
    t = term("sample:1.0")
    t.wait_for("└── tmp/")
    t.keys("/")
    t.text("/app/c")
    t.keys("Enter")
    # Waiting for the exact screen: a capture can catch the terminal halfway through a frame.
    s = t.wait(lambda s: tree(s) == ["U drwxr-xr-x       0:0        -  └── app",
                                     "U drwxr-xr-x       0:0        -      ├── cache",
                                     "R -rw-r--r--       0:0       9B      │   ├── index.txt",
                                     "A -rw-r--r--       0:0       2B      │   ├── new",
                                     "R -rw-r--r--       0:0      20B      │   └── seed.txt",
                                     "U -rw-r--r--       0:0      63B      └── config.ini"]
                         and "filter" in status(s))  # the status bar may draw a frame later
    assert status(s) == "layer 6/6 │ this layer │ sort: name │ filter '/app/c': 5 matches │ /app/cache   ? help  q quit"
    t.keys("n", "n")  # focus is back on the tree: n moves to the next match
    assert status(t.wait_for("/app/cache/new ")).endswith("│ /app/cache/new   ? help  q quit")
    t.keys("N")
    t.wait_for("/app/cache/index.txt ")
    t.keys("Escape")
    s = t.wait(lambda s: "filter" not in status(s))
    assert status(s).endswith("│ /app/cache/index.txt   ? help  q quit")
    assert len(tree(s)) == len(ROOT) + 6 + 3  # app and cache stay open
    t.keys("q")
    assert "EXIT=0" in t.wait_for("EXIT=")


def test_ctrl_keys_as_a_terminal_sends_them(term):
    t = term("sample:1.0")
    t.wait_for("└── tmp/")
    t.keys("Tab", "Up", "Up", "BTab")  # to the layers pane, two layers down, back to the tree
    s = t.wait_for("Layer 4 of 6")
    t.keys("Enter")  # open /app at layer 4: rm /app/old.log && rm -rf /app/docs
    t.wait(lambda s: tree(s)[:6] == ["U drwxr-xr-x       0:0        -  ├── app",
                                     "U drwxr-xr-x       0:0        -  │   ├── cache/",
                                     "U -rw-r--r--       0:0      63B  │   ├── config.ini",
                                     "R drwxr-xr-x       0:0        -  │   ├── docs/",
                                     "R -rw-r--r--       0:0      16B  │   ├── old.log",
                                     "U -rwxr-xr-x       0:0     162B  │   └── run.sh"])
    # The colour each name is drawn in (SGR): removed ones share one, unmodified ones another.
    coloured = "\n".join(t.screen(colours=True))
    def sgr(name):
        return re.search(r"((?:\x1b\[[0-9;]+m)+)" + re.escape(name), coloured).group(1)
    assert sgr("old.log") == sgr("docs/") != sgr("config.ini")
    t.keys("C-r")  # dive: hide removed
    s = t.wait(lambda s: tree(s)[1:4] == ["U drwxr-xr-x       0:0        -  │   ├── cache/",
                                          "U -rw-r--r--       0:0      63B  │   ├── config.ini",
                                          "U -rwxr-xr-x       0:0     162B  │   └── run.sh"])
    assert "hidden: removed" in status(s)
    t.keys("2")  # the plain key shows them again
    t.wait(lambda s: any(r.endswith("── old.log") for r in tree(s)))
    t.keys("C-Space")  # arrives as ctrl+@: close every directory
    s = t.wait(lambda s: len(tree(s)) == len(ROOT))
    t.keys("C-o")  # dive: sort by size
    s = t.wait(lambda s: tree(s)[:1] == ["U drwxr-xr-x       0:0   1.98MB  ├── bin/"])
    assert "sort: size" in status(s)
    t.keys("a")
    s = t.wait_for("aggregated changes")
    assert "│ aggregated │" in status(s)
    t.keys("C-c")
    assert "EXIT=0" in t.wait_for("EXIT=")


def test_history_enter_jumps_to_the_layer_and_q_closes_views(term):
    t = term("sample:1.0")
    t.wait_for("└── tmp/")
    t.keys("j", "j", "j")
    t.wait_for("│ /etc ")
    t.keys("Enter", "j", "j", "j", "j", "j")  # open /etc: group hostname hosts motd passwd
    t.wait_for("│ /etc/passwd ")
    t.keys("h")
    s = t.wait_for("History of /etc/passwd")
    rows = [line.strip() for line in s if line.strip().startswith(("1 ", "2 "))]
    assert [r.split()[:4] for r in rows] == [["1", "1", "d05ffc551721", "add"], ["2", "3", "ed65f77383c3", "modify"]]
    t.keys("j", "d")  # version 2 against 1
    s = t.wait_for("version 1 -> 2")
    assert any(line.startswith("+app:x:1000:1000:demo app:/app:/bin/sh") for line in s)
    t.keys("q")  # closes the diff, back to the history
    t.wait_for("History of /etc/passwd")
    t.keys("k", "Enter")  # the first row: layer 1, /etc/passwd selected
    s = t.wait_for("Layer 1 of 6")
    assert status(s) == "layer 1/6 │ this layer │ sort: name │ /etc/passwd   ? help  q quit"
    assert "A -rw-r--r--       0:0      82B  │   └── passwd" in tree(s)
    t.keys("q")
    assert "EXIT=0" in t.wait_for("EXIT=")


def test_pager_gets_the_file_and_the_app_comes_back(term, tmp_path, store):
    from layerdb.engine.api import LayerDB

    stub = tmp_path / "pager.sh"
    marker = tmp_path / "paged"
    stub.write_text(f'#!/bin/sh\ncp "$1" {marker}\n')
    stub.chmod(0o755)
    t = term("sample:1.0", env={"PAGER": str(stub)}, cwd=str(tmp_path))
    t.wait_for("└── tmp/")
    t.keys("/")
    t.text("/etc/passwd")
    t.keys("Enter")
    t.wait_for("│ /etc/passwd ")
    t.keys("p")
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    with LayerDB(store) as db:
        assert marker.read_bytes() == b"".join(db.cat("sample:1.0", "/etc/passwd"))
    t.wait_for("│ /etc/passwd ")  # redrawn after the pager left
    t.keys("e")  # extract into the current directory
    t.wait(lambda s: (tmp_path / "passwd").exists())
    assert (tmp_path / "passwd").read_bytes() == marker.read_bytes()
    t.keys("q")
    assert "EXIT=0" in t.wait_for("EXIT=")


def test_an_archive_opens_from_a_temporary_store(tmp_path):
    t = Term([sys.executable, "-m", "layerdb.cli.main", "--db", str(tmp_path / "untouched.sqlite"), "explore",
              str(SAMPLE)])
    try:
        t.wait(lambda s: tree(s) == ROOT)
        t.keys("q")
        assert "EXIT=0" in t.wait_for("EXIT=")
        assert not (tmp_path / "untouched.sqlite").exists()
    finally:
        t.close()


def test_a_bad_ref_is_one_line_and_no_screen(term):
    t = term("nosuch:1")
    s = t.wait_for("EXIT=")
    assert any(line.startswith("layerdb: error: no image, layer or container matches") for line in s)
    assert "EXIT=0" not in s


def cmp_column(screen: list[str]) -> list[str]:
    """The layers whose Cmp cell is marked: the compared range."""
    return [m.group(1) for line in screen if (m := re.match(r"│ █ +(\d+) ", line))]


def test_a_range_of_layers_v_then_move(term):
    t = term("sample:1.0")
    t.wait_for("└── tmp/")
    t.keys("Tab", "Up", "v")  # layer 5 is one end
    s = t.wait(lambda s: "range from 5" in status(s))
    assert status(s) == "layer 5/6 │ range from 5: move to its other end │ sort: name │ /app   ? help  q quit"
    t.keys("Up", "BTab", "Enter")  # layer 4 the other: the changes of layers 4 and 5, the view at 5
    s = t.wait(lambda s: tree(s)[:11] == [
        "U drwxr-xr-x       0:0        -  ├── app",
        "A -rw-r--r--       0:0       4B  │   ├── VERSION",  # layer 5: echo 1.0 > /app/VERSION
        "U drwxr-xr-x       0:0        -  │   ├── cache/",
        "U -rw-r--r--       0:0      63B  │   ├── config.ini",
        "R drwxr-xr-x       0:0        -  │   ├── docs/",  # layer 4: rm /app/old.log && rm -rf /app/docs
        "R -rw-r--r--       0:0      16B  │   ├── old.log",
        "U -rwxr-xr-x       0:0     162B  │   ├── run.sh",
        "A -rw-r--r--       0:0      63B  │   ├── settings.ini",
        "A -rw-r--r--       0:0       4B  │   └── version.txt",
        "U drwxr-xr-x       0:0        -  ├── bin/",
        "U drwxr-xr-x       0:0        -  ├── dev/"] and "layers 4-5" in status(s) and len(cmp_column(s)) == 2)
    assert "╭─ Layer 5 of 6: changes of layers 4-5 ─" in s[0]
    assert status(s) == "layer 4/6 │ layers 4-5 │ sort: name │ /app   ? help  q quit"
    assert cmp_column(s) == ["4", "5"]
    t.keys("Tab", "Down", "Down")  # back in the layers pane, past the mark: layers 5-6
    s = t.wait(lambda s: "changes of layers 5-6" in s[0] and "5-6" in status(s) and "4" not in cmp_column(s))
    assert cmp_column(s) == ["5", "6"] and "│ layers 5-6 │" in status(s)
    marked = [r for r in tree(s) if r[0] in "ARM"]
    assert marked == ["A -rw-r--r--       0:0       4B  │   ├── VERSION",  # layer 4's removals are gone
                      "A -rw-r--r--       0:0      63B  │   ├── settings.ini",
                      "A -rw-r--r--       0:0       4B  │   └── version.txt"]
    t.keys("v")  # v again ends the range: this layer's changes
    s = t.wait(lambda s: "╭─ Layer 6 of 6: this layer's changes ─" in s[0] and len(cmp_column(s)) == 1)
    assert cmp_column(s) == ["6"] and status(s).startswith("layer 6/6 │ this layer │")
    t.keys("q")
    assert "EXIT=0" in t.wait_for("EXIT=")


AGAINST_SAMPLE2 = ["A drwxr-xr-x       0:0        -  ├── app/", "U drwxr-xr-x       0:0        -  ├── bin/",
                   "U drwxr-xr-x       0:0        -  ├── dev/", "U drwxr-xr-x       0:0        -  ├── etc/",
                   "U drwxr-xr-x       0:0        -  ├── proc/", "U drwx------       0:0        -  ├── root/",
                   "U drwxr-xr-x       0:0        -  ├── run/", "R drwxr-xr-x       0:0        -  ├── srv/",
                   "U drwxr-xr-x       0:0        -  ├── sys/", "U drwxrwxrwt       0:0        -  └── tmp/"]


def test_compare_with_another_image_c_and_compare_option(term):
    t = term("sample:1.0")
    t.wait_for("└── tmp/")
    t.keys("c")
    t.text("nosuch:1")
    t.keys("Enter")  # a bad REF: a notice, the comparison unchanged
    s = t.wait_for("no image, layer or container matches 'nosuch:1'")
    assert tree(s)[:len(ROOT)] == ROOT and status(s).startswith("layer 6/6 │ this layer │")  # the notice overlays below
    t.keys("c")
    t.text("sample2:1.0")
    t.keys("Enter")
    s = t.wait(lambda s: tree(s) == AGAINST_SAMPLE2 and "against" in status(s))
    assert "╭─ Layer 6 of 6: against sample2:1.0 ─" in s[0]
    assert status(s) == "layer 6/6 │ against sample2:1.0 │ sort: name │ /app   ? help  q quit"
    t.keys("j", "j", "j", "Enter")  # /etc: sample's motd and passwd against sample2's
    s = t.wait(lambda s: "│ /etc " in status(s) and len(tree(s)) > len(AGAINST_SAMPLE2))
    assert [r for r in tree(s) if r.startswith(("A", "R", "M"))] == [
        "A drwxr-xr-x       0:0        -  ├── app/", "A -rw-r--r--       0:0      37B  │   ├── motd",
        "M -rw-r--r--       0:0     120B  │   ├── passwd", "R drwxr-xr-x       0:0        -  ├── srv/"]
    t.keys("c", "Enter")  # an empty REF ends the comparison
    s = t.wait(lambda s: status(s).startswith("layer 6/6 │ this layer │") and "this layer's" in s[0])
    t.keys("q")
    assert "EXIT=0" in t.wait_for("EXIT=")
    u = term("sample:1.0", "--compare", "sample2:1.0")
    s = u.wait(lambda s: tree(s) == AGAINST_SAMPLE2 and "against" in status(s))
    assert "│ against sample2:1.0 │" in status(s)
    u.keys("?")
    s = u.wait_for("layerdb explore: keys")
    assert any(line.startswith("v                    a range of layers") for line in s)
    assert any(line.startswith("c                    compare with another image") for line in s)
    u.keys("q", "q")
    assert "EXIT=0" in u.wait_for("EXIT=")


def _colours(screen: list[str]) -> tuple[dict[str, str], set[str]]:
    """The SGR colour codes drawn just before each root name, and every colour code on the screen."""
    text = "\n".join(screen)
    before = {name: ";".join(re.findall(r"\x1b\[([0-9;]*)m", m.group(1)))
              for name in ("app/", "bin/", "srv/") if (m := re.search(r"((?:\x1b\[[0-9;]*m)+)" + name, text))}
    codes = set()
    for sgr in re.findall(r"\x1b\[([0-9;]*)m", text):
        parts = sgr.split(";")
        for i, p in enumerate(parts):
            if p in ("38", "48") and i + 1 < len(parts):
                codes.add(";".join(parts[i:i + (3 if parts[i + 1] == "5" else 5)]))
    return before, codes


def _grey(code: str) -> bool:
    parts = [int(x) for x in code.split(";")[1:]]
    if parts[0] == 5:
        return parts[1] in (0, 7, 8, 15, 16, 231) or 232 <= parts[1] <= 255
    return parts[1] == parts[2] == parts[3]


def test_themes_light_and_no_colour(term):
    shots = {}
    for name, args, env in (("dark", [], None), ("light", ["--theme", "light"], None),
                            ("none", ["--theme", "none"], None), ("NO_COLOR", [], {"NO_COLOR": "1"})):
        t = term("sample:1.0", "--compare", "sample2:1.0", *args, env=env)
        t.wait(lambda s: tree(s) == AGAINST_SAMPLE2)  # the same rows in every theme
        time.sleep(0.3)
        shots[name] = _colours(t.screen(colours=True))
        if name == "dark":
            t.keys("T")  # the next theme, in place
            t.wait_for("theme textual-light")
            time.sleep(0.3)
            shots["T"] = _colours(t.screen(colours=True))
        t.keys("q")
        assert "EXIT=0" in t.wait_for("EXIT=")
    dark, light = shots["dark"], shots["light"]
    # Added, removed and unmarked names are told apart by colour, in both themes.
    for before, _ in (dark, light):
        assert len({before["app/"], before["srv/"], before["bin/"]}) == 3
    assert any(not _grey(c) for c in dark[1]) and any(not _grey(c) for c in light[1])
    backgrounds = [{c for c in codes if c.startswith("48")} for _, codes in (dark, light, shots["T"])]
    assert backgrounds[0] != backgrounds[1] and backgrounds[2] & backgrounds[1] - backgrounds[0]
    # No colour: only greys, as NO_COLOR asks; the marks' letters still say what changed.
    for name in ("none", "NO_COLOR"):
        assert shots[name][1] and all(_grey(c) for c in shots[name][1]), name
    assert shots["none"] == shots["NO_COLOR"]


def test_a_bad_theme_is_one_line(term):
    t = term("sample:1.0", "--theme", "nosuch")
    s = t.wait_for("EXIT=")
    assert any(line.startswith("layerdb: error: Invalid value for --theme: 'nosuch'") for line in s)
    assert "EXIT=2" in s


def test_an_inefficient_file_opens_its_history_and_enter_jumps(term):
    t = term("sample:1.0")
    t.wait_for("Image efficiency score: 99.99 %")
    t.keys("Tab", "Tab", "j", "Enter")  # the layers, then the inefficient files: the second one
    s = t.wait_for("History of /app/config.ini")
    rows = [line.split() for line in s if line.strip().startswith(("1 ", "2 "))]
    # `layerdb log /app/config.ini --image sample:1.0`: COPY added it, the sed of layer 3 changed it.
    assert [r[:8] for r in rows] == [["1", "2", "eb68952c48ed", "add", "f", "0644", "0:0", "62B"],
                                     ["2", "3", "ed65f77383c3", "modify", "f", "0644", "0:0", "63B"]]
    t.keys("j", "Enter")
    s = t.wait(lambda s: "╭─ Layer 3 of 6: this layer's changes ─" in s[0] and "config.ini" in status(s))
    assert status(s) == "layer 3/6 │ this layer │ sort: name │ /app/config.ini   ? help  q quit"
    # /app at layer 3 (`view --at sample:1.0~3 /app`), its config.ini changed there (`diff sample:1.0~4 sample:1.0~3`).
    assert tree(s)[:6] == ["U drwxr-xr-x       0:0        -  ├── app",
                           "U drwxr-xr-x       0:0        -  │   ├── cache/",
                           "M -rw-r--r--       0:0      63B  │   ├── config.ini",
                           "U drwxr-xr-x       0:0        -  │   ├── docs/",
                           "U -rw-r--r--       0:0      16B  │   ├── old.log",
                           "U -rwxr-xr-x       0:0     162B  │   └── run.sh"]
    t.keys("q")
    assert "EXIT=0" in t.wait_for("EXIT=")
