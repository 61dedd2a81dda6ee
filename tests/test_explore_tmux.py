"""`layerdb explore` in a real terminal: tmux runs it in a pty of a fixed size,
keys go in as a terminal sends them (Ctrl+Space arrives as ctrl+@, Ctrl+O as
0x0f), and the screen is read back with capture-pane."""

from __future__ import annotations

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
WIDTH, HEIGHT = 120, 36
_ids = itertools.count()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from layerdb.engine.api import LayerDB

    path = tmp_path_factory.mktemp("explore") / "store.sqlite"
    with LayerDB(path) as db:
        db.import_archive(str(SAMPLE))
    return path


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
    t.wait_for("Image efficiency score: 99.99 %")
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
                                     "U -rw-r--r--       0:0      63B      └── config.ini"])
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
    t.keys("Tab", "Up", "Up", "Tab")  # to the layers pane, two layers down, back to the tree
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
