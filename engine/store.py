"""The SQLite store: connection, pragmas, schema versions, transactions."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator

import apsw

from .errors import SchemaTooNew, StoreError

SCHEMA_VERSION = 4

# Pragmas, chosen on purpose:
# - WAL: readers never block the importer and the importer never blocks
#   readers; a reader sees the last committed state, never half an import.
# - synchronous=FULL: an import is one transaction, so the cost is one extra
#   fsync per import, and a committed import survives power loss.
# - busy timeout 10 s: a second writer waits for the first one's transaction
#   instead of failing with "database is locked".  Imports of big images hold
#   the write lock for seconds, so milliseconds would not do.
# - foreign_keys: the schema's references are checked, not just documented.
# - cache 4 MiB: the cache is thousands of page-sized allocations made as it
#   fills, among an import's large transient buffers, so it costs the heap
#   about twice its size.  At 4 MiB instead of 8 (12-04, alternated, medians):
#   the family imported in 3.53 s against 3.59 and peaked at 87-95 MiB instead
#   of 94-101, a pull of py-app:1 at 86 (at most 92) instead of 96 (at most
#   101), an export of manyfiles:1 at 71 instead of 75; the 200k-file import
#   and export ran no slower (bench/README.md, "Pages, the page cache").
# - trusted_schema=OFF: a store file from elsewhere cannot run functions from
#   views or triggers it carries.
# - page_size 8 KiB (new stores only; a store keeps the page size it was made
#   with): an import writes every page twice, as a WAL frame and again when
#   the commit checkpoints it, one syscall or two per page, so half as many
#   pages took an import of py-app:1 from 2.33 to 2.24 s (8 alternating
#   rounds).  The store grows by the half-filled last page of each chunk:
#   +0.6% on py-app:1; 16 KiB pages bought no more time for +2%.
BUSY_TIMEOUT_MS = 10_000
PRAGMAS = (
    "PRAGMA foreign_keys = ON",
    "PRAGMA synchronous = FULL",
    "PRAGMA cache_size = -4096",
    "PRAGMA trusted_schema = OFF",
    "PRAGMA temp_store = FILE",
    "PRAGMA page_size = 8192",
)


def default_db_path() -> str:
    """$LAYERDB_DB, else $XDG_DATA_HOME/layerdb/layerdb.sqlite."""
    env = os.environ.get("LAYERDB_DB")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "layerdb", "layerdb.sqlite")


def schema_sql() -> str:
    # Package data beside this module (pyproject's package-data), read as a
    # file: importlib.resources took 11-15 ms to load, a new store's only
    # reason to load it.
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.sql"), encoding="utf-8") as f:
        return f.read()


def migration_sql(version: int) -> str:
    """The statements that take a store of `version` to SCHEMA_VERSION: the
    schema.sql sections marked '-- @version N' for every N above it."""
    out, keep = [], False
    for line in schema_sql().splitlines(keepends=True):
        if line.startswith("-- @version "):
            keep = int(line.split()[2].rstrip(":")) > version
        if keep:
            out.append(line)
    return "".join(out)


class Store:
    """One open store file.  Not thread-safe: one Store per thread."""

    def __init__(self, path: str | os.PathLike[str]):
        # A str, not a pathlib.Path: importing pathlib costs every command ~2 ms.
        self.path = os.fspath(path)
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.conn = apsw.Connection(self.path)
        except (OSError, apsw.CantOpenError) as e:
            raise StoreError(f"cannot open store {self.path}: {e}") from None
        self.lock_timeout = float(os.environ.get("LAYERDB_LOCK_TIMEOUT", "3600"))
        self.conn.setbusytimeout(int(min(BUSY_TIMEOUT_MS, self.lock_timeout * 1000)))
        self._depth = 0
        try:
            self._setup()
        except apsw.NotADBError:
            raise StoreError(f"{self.path} is not a layerdb store (not an SQLite database)") from None

    def _setup(self) -> None:
        for p in PRAGMAS:
            self.conn.execute(p)
        mode = self.conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode != "wal":
            self.conn.execute("PRAGMA journal_mode = WAL")
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{self.path} has schema version {version}; this layerdb knows up to {SCHEMA_VERSION}: upgrade layerdb"
            )
        if version == 0:
            with self.write():
                # Another process may have created it while we waited for the lock.
                if self.conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                    if self.conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
                        raise StoreError(f"{self.path} is an SQLite database but not a layerdb store")
                    self.conn.execute(schema_sql())
                    self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version < SCHEMA_VERSION:
            self._migrate()

    def _migrate(self) -> None:
        """Bring an older store to SCHEMA_VERSION in place: new tables and columns only, so
        nothing existing is rewritten, and all of it or nothing (one transaction)."""
        with self.write():
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have done it
            if version < SCHEMA_VERSION:
                self.conn.execute(migration_sql(version))
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                from .log import get_logger

                get_logger("layerdb.store").info("migrated", store=self.path, old=version, new=SCHEMA_VERSION)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Transactions ---------------------------------------------------------

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """A write transaction; nested calls become savepoints.

        BEGIN IMMEDIATE takes the write lock up front, so a second writer waits
        on the busy timeout instead of failing when it upgrades a read.
        """
        if self._depth:
            self._depth += 1
            try:
                with self.conn:  # apsw: a savepoint
                    yield
            finally:
                self._depth -= 1
            return
        self._begin_immediate()
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self.conn.execute("ROLLBACK")
            raise
        self._depth = 0
        self.conn.execute("COMMIT")

    def _begin_immediate(self) -> None:
        """Take the write lock, waiting as long as another writer holds it.

        A second `import` waits for the first one to finish, however long that
        takes (up to $LAYERDB_LOCK_TIMEOUT seconds, default one hour), instead
        of failing after the busy timeout.
        """
        deadline = time.monotonic() + self.lock_timeout
        waited = False
        while True:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                return
            except apsw.BusyError:
                if time.monotonic() >= deadline:
                    raise StoreError(f"{self.path}: another layerdb process is still writing; gave up waiting") from None
                if not waited:
                    from .log import get_logger

                    get_logger("layerdb.store").warning("waiting for another writer", store=str(self.path))
                    waited = True

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """A read transaction: every query inside sees one snapshot."""
        if self._depth:
            yield
            return
        self.conn.execute("BEGIN")
        self._depth = 1
        try:
            yield
        finally:
            self._depth = 0
            self.conn.execute("COMMIT")

    # Queries ----------------------------------------------------------------

    def execute(self, sql: str, bindings: Any = None) -> apsw.Cursor:
        return self.conn.execute(sql, bindings)

    def one(self, sql: str, bindings: Any = None) -> Any:
        """The first row, or None."""
        return self.conn.execute(sql, bindings).fetchone()

    def scalar(self, sql: str, bindings: Any = None) -> Any:
        row = self.conn.execute(sql, bindings).fetchone()
        return None if row is None else row[0]

    def path_id(self, path: bytes) -> int | None:
        return self.scalar("SELECT id FROM path WHERE path = ?", (path,))

    def intern_path(self, path: bytes) -> int:
        pid = self.scalar("SELECT id FROM path WHERE path = ?", (path,))
        if pid is None:
            name = path.rsplit(b"/", 1)[-1]
            # last_insert_rowid, not RETURNING: SQLite gives a RETURNING
            # statement a statement journal (see chunks.put_encoded).
            self.conn.execute("INSERT INTO path(path, name) VALUES (?, ?)", (path, name))
            pid = self.conn.last_insert_rowid()
        return pid
