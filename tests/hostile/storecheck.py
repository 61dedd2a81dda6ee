"""Shared by the reliability tests (crash, concurrency, gc, hostile, fuzz).

- `layerdb(...)`: the real CLI in a subprocess (`python -m layerdb.cli`), never
  the user's store, warnings shown;
- `one_error_line(...)`: the error contract (one line on stderr, non-zero exit);
- `dump(db)`: a full logical dump (user_version, schema, every row of every
  table, sorted), with the import timestamps masked so that two imports of the
  same archive compare equal;
- `problems(db)`: consistency checked with SQL, independent of `layerdb fsck`;
- `check_store(db)`: both of those and `layerdb fsck` when this layerdb has it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import apsw

MASKED = ("imported",)  # wall-clock columns: the only ones two imports may differ in


def cli_env(home: Path) -> dict:
    env = dict(os.environ)
    env.pop("LAYERDB_DB", None)
    env["XDG_DATA_HOME"] = str(home / "xdg")  # never the user's store
    env["PYTHONWARNINGS"] = "default"
    return env


def argv(db: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "layerdb.cli", "--db", str(db), *args]


def layerdb(db: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv(db, *args), capture_output=True, env=cli_env(db.parent), timeout=timeout,
                          stdin=subprocess.DEVNULL)


def one_error_line(returncode: int, stdout: bytes | str, stderr: bytes | str) -> str:
    """The one line a refused command prints; asserts the error contract."""
    err = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    assert returncode not in (0, None), f"exit code {returncode} for bad input; stderr={err!r}"
    assert "Traceback" not in err, err
    assert not stdout, f"stdout not empty: {stdout!r}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerdb: error: "), f"not one error line: {err!r}"
    return lines[0]


def copy_store(src: Path, dst: Path) -> Path:
    for suffix in ("", "-wal", "-shm"):
        if Path(str(src) + suffix).exists():
            shutil.copyfile(str(src) + suffix, str(dst) + suffix)
    return dst


# Dumps -------------------------------------------------------------------------------


def _key(row: tuple) -> list:
    return [(v is None, type(v).__name__, 0 if v is None else v) for v in row]


def dump(db: Path) -> dict:
    conn = apsw.Connection(str(db))
    try:
        with conn:  # one snapshot
            schema = conn.execute("SELECT type, name, sql FROM sqlite_schema ORDER BY type, name").fetchall()
            rows = {}
            for typ, name, _ in schema:
                if typ != "table":
                    continue
                cols = [c[1] for c in conn.execute(f'PRAGMA table_info("{name}")')]
                masked = [i for i, c in enumerate(cols) if c in MASKED]
                got = []
                for r in conn.execute(f'SELECT * FROM "{name}"'):
                    r = list(r)
                    for i in masked:
                        r[i] = None
                    got.append(tuple(r))
                rows[name] = sorted(got, key=_key)
            return {"user_version": conn.execute("PRAGMA user_version").fetchone()[0], "schema": schema, "rows": rows}
    finally:
        conn.close()


def counts(d: dict) -> dict[str, int]:
    return {name: len(rows) for name, rows in d["rows"].items()}


# Consistency ---------------------------------------------------------------------------


def _sha(s: str) -> str:
    return "sha256:" + hashlib.sha256(s.encode()).hexdigest()


def problems(db: Path) -> list[str]:
    """What is inconsistent, by SQL alone: structure, references, chains, contents present."""
    conn = apsw.Connection(str(db))
    out: list[str] = []
    try:
        with conn:
            x = conn.execute
            if x("PRAGMA integrity_check").fetchall() != [("ok",)]:
                out.append("integrity_check fails")
            out += [f"foreign key: {r}" for r in x("PRAGMA foreign_key_check")]
            for chain_id, pos, diff_id, parent, ppos in x(
                "SELECT l.chain_id, l.position, d.diff_id, p.chain_id, p.position FROM layer l"
                " JOIN diff d ON d.id = l.diff_id LEFT JOIN layer p ON p.id = l.parent_id"
            ):
                want = diff_id if parent is None else _sha(f"{parent} {diff_id}")
                if chain_id != want or (parent is None) != (pos == 1) or (parent is not None and ppos != pos - 1):
                    out.append(f"layer {chain_id}: broken chain")
            for digest, config, top_pos in x(
                "SELECT i.digest, i.config, l.position FROM image i LEFT JOIN layer l ON l.id = i.top_layer"
            ):
                if "sha256:" + hashlib.sha256(config).hexdigest() != digest:
                    out.append(f"image {digest}: config does not hash to its id")
                n = len(json.loads(config)["rootfs"]["diff_ids"])
                if (top_pos or 0) != n:
                    out.append(f"image {digest}: chain of {top_pos} layers for {n} diff_ids")
            # A container's diff is a log of writes, not a tar: it has no framing.
            out += [f"diff {d}: no framing" for (d,) in x(
                "SELECT diff_id FROM diff WHERE framing IS NULL AND container = 0")]
            for d, entries, events in x(
                "SELECT d.diff_id, d.entries, (SELECT count(*) FROM event e WHERE e.diff_id = d.id AND e.kind != 2"
                " AND e.seq < d.entries) FROM diff d WHERE d.container = 0"
            ):
                if entries != events:
                    out.append(f"diff {d}: {entries} tar entries, {events} events")
            # Contents: every chunk a blob names is stored (packs for small ones, pieces for large ones).
            out += [f"blob {b}: pack chunk missing" for (b,) in x(
                "SELECT id FROM blob b WHERE chunk IS NOT NULL AND NOT EXISTS (SELECT 1 FROM chunk c WHERE c.sha256 = b.chunk)")]
            out += [f"blob {b}: piece missing" for (b,) in x(
                "SELECT DISTINCT blob_id FROM blob_chunk bc WHERE NOT EXISTS (SELECT 1 FROM chunk c WHERE c.sha256 = bc.chunk)")]
            out += [f"blob {b}: no content" for (b,) in x(
                "SELECT id FROM blob b WHERE size > 0 AND chunk IS NULL"
                " AND NOT EXISTS (SELECT 1 FROM blob_chunk bc WHERE bc.blob_id = b.id)")]
    finally:
        conn.close()
    return out


@functools.lru_cache(maxsize=1)
def have_fsck() -> bool:
    """Whether this layerdb has `fsck` (it came with another issue)."""
    p = subprocess.run([sys.executable, "-m", "layerdb.cli", "fsck", "--help"], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=60)
    return p.returncode == 0


def check_store(db: Path) -> None:
    assert problems(db) == []
    if have_fsck():
        from conftest import run_cli

        r = run_cli("fsck", db_path=db)
        assert r.exit_code == 0, f"fsck: {r.stdout}{r.stderr}"
