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
    assert default_db_path() == tmp_path / "env.sqlite"
    monkeypatch.delenv("LAYERDB_DB")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_db_path() == tmp_path / "xdg" / "layerdb" / "layerdb.sqlite"


def test_write_rolls_back_on_error(tmp_path):
    with Store(tmp_path / "s.sqlite") as s:
        with pytest.raises(RuntimeError):
            with s.write():
                s.intern_path(b"a/b")
                raise RuntimeError("boom")
        assert s.scalar("SELECT count(*) FROM path") == 0
