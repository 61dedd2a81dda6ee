"""Shared test helpers.  Every test uses real archives and a real store file."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO_FIXTURES = HERE / "fixtures"
SHARED_FIXTURES = HERE.parent.parent / "shared" / "fixtures"

sys.path.insert(0, str(HERE))
import tree_manifest  # noqa: E402  (the shared manifest writer, vendored unchanged)


def oracle_positions(oracle_dir: Path) -> list[int]:
    return sorted(int(p.stem) for p in oracle_dir.glob("*.jsonl") if p.stem.isdigit())


def oracle_lines(oracle_dir: Path, pos: int) -> list[str]:
    return (oracle_dir / f"{pos}.jsonl").read_text().splitlines()


def manifest_of_tar_bytes(data: bytes, tmp_path: Path) -> list[str]:
    p = tmp_path / "view.tar"
    p.write_bytes(data)
    return list(tree_manifest.manifest_lines(str(p)))


def manifest_of_dir(path: Path) -> list[str]:
    return list(tree_manifest.manifest_lines(str(path)))


@pytest.fixture
def db(tmp_path):
    from layerdb.engine.api import LayerDB

    d = LayerDB(tmp_path / "store.sqlite")
    yield d
    d.close()


def export_bytes(db, ref: str) -> bytes:
    buf = io.BytesIO()
    db.export_tar(ref, buf)
    return buf.getvalue()


def run_cli(*args: str, db_path: Path | None = None, input: bytes | None = None):
    """The CLI in-process through click's CliRunner; returns the Result."""
    from click.testing import CliRunner

    from layerdb.cli.main import cli

    argv = (["--db", str(db_path)] if db_path else []) + list(args)
    return CliRunner().invoke(cli, argv, input=input, catch_exceptions=False)


def store_dump(path: Path) -> list:
    """Every row of every table, sorted: to prove a store did not change."""
    import apsw

    conn = apsw.Connection(str(path))
    try:
        out = []
        for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name").fetchall():
            rows = conn.execute(f'SELECT * FROM "{name}"').fetchall()
            out.append((name, sorted(rows, key=repr)))
        return out
    finally:
        conn.close()


def load_json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def replaying(m: pytest.MonkeyPatch, partition: int | None) -> None:
    """Within monkeypatch context m: replay views whole (partition None) or in
    partitions of that many paths (engine/export.py TreeEntries)."""
    from layerdb.engine import tree as export

    if partition is None:
        m.setattr(export, "WHOLE_EVENTS", 1 << 62)
    else:
        m.setattr(export, "WHOLE_EVENTS", 0)
        m.setattr(export, "PARTITION_PATHS", partition)


def count_replays(m: pytest.MonkeyPatch, module) -> list[int]:
    """Within monkeypatch m: every View that `module` replays appends its node
    count to the returned list (how much of an image an operation held)."""
    from layerdb.engine.replay import View

    sizes: list[int] = []

    class Counted(View):
        def replay(self, events):
            super().replay(events)
            sizes.append(len(self.nodes))
            return self

    m.setattr(module, "View", Counted)
    if hasattr(module, "chain_view"):  # a whole chain's replay
        from layerdb.engine import replay

        def counted_chain_view(conn, chain):
            view = replay.chain_view(conn, chain)
            sizes.append(len(view.nodes))
            return view

        m.setattr(module, "chain_view", counted_chain_view)
    return sizes


def fixture_archives(root: Path) -> list[Path]:
    """The image archives of a fixture tree (tests/fixtures or ../shared/fixtures)."""
    images = root / "images"
    return sorted(images.glob("*.tar")) if images.is_dir() else []
