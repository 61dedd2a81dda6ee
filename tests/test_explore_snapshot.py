"""Screens of `layerdb explore`, pinned: the SVG Textual exports and its text,
byte for byte, at a fixed size.  Textual draws differently from version to
version, so each file names the version it was made with, and the test skips,
saying so, under another one.

After a change to the screens: LAYERDB_SNAPSHOT_UPDATE=1 rewrites the files;
read the new text files before keeping them."""

from __future__ import annotations

import io
import os

import pytest

from conftest import REPO_FIXTURES
from test_explore_pilot import Running, details_loaded, fresh
from test_explore_tmux import sample_store

SNAPSHOTS = REPO_FIXTURES / "explore"
PINNED = "8.2.8"  # the textual version the files were made with
SIZE = (110, 30)  # the README's screen


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return sample_store(tmp_path_factory)


@pytest.fixture(scope="module")
def running(store):
    import textual

    if textual.__version__ != PINNED:
        pytest.skip(f"the screens are pinned with textual {PINNED}; textual {textual.__version__} is installed")
    from layerdb.cli.explore_cmds import _app_class
    from layerdb.engine.api import LayerDB

    db = LayerDB(store)
    r = Running(_app_class()(db, db.explorer("sample:1.0")), size=SIZE)
    r.run(details_loaded)
    yield r
    r.close()
    db.close()


def shot(running, name: str, keys=(), then=None) -> str:
    """The screen after the keys as SVG and text, checked against the pinned files; the text."""
    from rich.console import Console

    async def go(pilot):
        await fresh(pilot)
        await pilot.press(*keys)
        await pilot.pause()
        if then:
            await then(pilot)
            await pilot.pause()
        app = pilot.app
        console = Console(width=SIZE[0], height=SIZE[1], file=io.StringIO(), force_terminal=True,
                          color_system="truecolor", record=True, legacy_windows=False, safe_box=False)
        console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
        text = console.export_text(clear=False)
        return console.export_svg(title="layerdb explore"), text

    svg, text = running.run(go)
    for ext, got in (("svg", svg), ("txt", text)):
        path = SNAPSHOTS / f"{name}.textual-{PINNED}.{ext}"
        if os.environ.get("LAYERDB_SNAPSHOT_UPDATE") == "1":
            SNAPSHOTS.mkdir(exist_ok=True)
            path.write_text(got)
        assert path.exists(), f"{path} is missing: LAYERDB_SNAPSHOT_UPDATE=1 makes it"
        assert got == path.read_text(), f"{name} ({ext}) differs from {path.name}"
    return text


def test_first_frame(running, store):
    from layerdb.engine.api import LayerDB

    text = shot(running, "sample-1.0-first-frame")
    with LayerDB(store) as db:
        w = db.waste("sample:1.0")
    assert f"Image efficiency score: {100 * w['efficiency']:.2f} %" in text
    assert "layer 6/6 │ this layer │ sort: name │ /app   ? help  q quit" in text


def test_layer_4_with_app_open(running):
    text = shot(running, "sample-1.0-layer-4-app", ("tab", "up", "up", "shift+tab", "enter"))
    assert "Layer 4 of 6: this layer's changes" in text and "R drwxr-xr-x       0:0        -  │   ├── docs/" in text


def test_history_from_the_inefficient_files(running):
    text = shot(running, "sample-1.0-history-passwd", ("tab", "tab", "enter"))
    assert "History of /etc/passwd" in text
