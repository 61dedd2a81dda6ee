"""The store file: schema versioning, pragmas, refusals."""

from __future__ import annotations

import apsw
import pytest

from conftest import run_cli
from layerdb.engine.errors import SchemaTooNew, StoreError
from layerdb.engine.store import SCHEMA_VERSION, Store, default_db_path


def test_new_store_has_schema_and_pragmas(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        assert s.scalar("PRAGMA user_version") == SCHEMA_VERSION
        assert s.scalar("PRAGMA journal_mode") == "wal"
        assert s.scalar("PRAGMA foreign_keys") == 1
        assert s.scalar("PRAGMA page_size") == 8192
        tables = {r[0] for r in s.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
        assert {"chunk", "blob", "blob_chunk", "path", "diff", "event", "layer", "image", "tag", "history"} <= tables


def test_newer_schema_is_refused(tmp_path):
    p = tmp_path / "s.sqlite"
    Store(p).close()
    c = apsw.Connection(str(p))
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    c.close()
    with pytest.raises(SchemaTooNew, match="upgrade layerdb"):
        Store(p)


def test_newer_schema_is_one_error_line(tmp_path):
    p = tmp_path / "s.sqlite"
    Store(p).close()
    c = apsw.Connection(str(p))
    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 7}")
    c.close()
    r = run_cli("images", db_path=p)
    assert r.exit_code == 3
    assert r.output.strip().startswith("layerdb: error:") and len(r.output.strip().splitlines()) == 1


def test_not_a_database(tmp_path):
    p = tmp_path / "junk.sqlite"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a layerdb store"):
        Store(p)


def test_foreign_sqlite_database_is_refused(tmp_path):
    p = tmp_path / "other.sqlite"
    c = apsw.Connection(str(p))
    c.execute("CREATE TABLE t(x)")
    c.close()
    with pytest.raises(StoreError, match="not a layerdb store"):
        Store(p)


def test_default_path_env_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERDB_DB", str(tmp_path / "env.sqlite"))
    assert default_db_path() == str(tmp_path / "env.sqlite")
    monkeypatch.delenv("LAYERDB_DB")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == str(tmp_path / "xdg" / "layerdb" / "layerdb.sqlite")


def test_write_rolls_back_on_error(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        with pytest.raises(RuntimeError):
            with s.write():
                s.intern_path(b"a/b")
                raise RuntimeError("boom")
        assert s.scalar("SELECT count(*) FROM path") == 0


def test_second_writer_waits_then_gives_up_with_one_line(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from conftest import REPO_FIXTURES

    p = tmp_path / "s.sqlite"
    Store(p).close()
    holder = apsw.Connection(str(p))
    holder.execute("BEGIN IMMEDIATE")  # another writer, mid-transaction
    try:
        env = dict(os.environ, LAYERDB_LOCK_TIMEOUT="1.5")
        t = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "layerdb.cli", "--db", str(p), "import",
                            str(REPO_FIXTURES / "images" / "opaque.oci.tar")], capture_output=True, text=True, env=env)
        waited = time.monotonic() - t
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert r.returncode == StoreError.exit_code
    assert r.stderr.splitlines()[-1].startswith("layerdb: error: ") and "another layerdb process" in r.stderr
    assert "Traceback" not in r.stderr
    assert waited >= 1.5
    with Store(p) as s:
        assert s.scalar("SELECT count(*) FROM image") == 0


def test_second_writer_waits_for_the_first(tmp_path):
    import subprocess
    import sys
    import threading

    from conftest import REPO_FIXTURES

    p = tmp_path / "s.sqlite"
    Store(p).close()
    holder = apsw.Connection(str(p))
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(2.0, lambda: holder.execute("COMMIT"))
    release.start()
    r = subprocess.run([sys.executable, "-m", "layerdb.cli", "--db", str(p), "import",
                        str(REPO_FIXTURES / "images" / "opaque.oci.tar")], capture_output=True, text=True)
    release.join()
    holder.close()
    assert r.returncode == 0, r.stderr
    with Store(p) as s:
        assert s.scalar("SELECT count(*) FROM image") == 1


def test_a_store_keeps_the_page_size_it_was_made_with(tmp_path):
    """Stores made before 8 KiB pages have 4 KiB ones: they open, take writes
    and read back as before."""
    path = tmp_path / "s.sqlite"
    c = apsw.Connection(str(path))
    c.execute("PRAGMA page_size = 4096")
    c.execute("PRAGMA journal_mode = WAL")
    c.close()
    with Store(path) as s:
        assert s.scalar("PRAGMA page_size") == 4096
        with s.write():
            s.execute("INSERT INTO chunk(sha256, size, codec, data) VALUES (?, ?, 0, ?)", (b"x" * 32, 9000, b"y" * 9000))
    with Store(path) as s:
        assert s.scalar("PRAGMA page_size") == 4096
        assert s.scalar("SELECT data FROM chunk") == b"y" * 9000
