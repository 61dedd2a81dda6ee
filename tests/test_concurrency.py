"""Readers and writers in separate processes on one store.

Four reader processes loop over `view -R`, `cat`, `log`, `find` and `export` while a
writer process imports a 6-layer image.  The writer pauses inside its write
transaction, after it has stored rows for its first new layer, until every
reader has completed reads during that pause: so reads provably overlap a half
written import, without relying on timing.  Every read must give the old state
or the new one: the old image exactly as the oracle has it, the new image
either absent or complete (its export equal to the oracle's top view).

This file is also the readers' and the writer's program:
`python tests/test_concurrency.py reader|writer CONFIG.json`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import REPO_FIXTURES, load_json_lines, oracle_lines, run_cli  # noqa: E402
from hostile.storecheck import argv, check_store, cli_env  # noqa: E402

IMAGES, ORACLE = REPO_FIXTURES / "images", REPO_FIXTURES / "oracle"
OLD, NEW = "sample2:1.0", "sample:1.0"
READERS = 4
PAUSED_READS = 3  # reads each reader completes while the writer holds its transaction open
WAIT = 120  # seconds: a bound on waiting for another process, never an assertion on speed


def oracle_entry(image: str, pos: int, path: str) -> dict:
    return next(e for e in map(json.loads, oracle_lines(ORACLE / image, pos)) if e["path"] == path)


def tar_manifest(data: bytes, tmp: Path) -> list[str]:
    import tree_manifest

    tmp.write_bytes(data)
    return list(tree_manifest.manifest_lines(str(tmp)))


# The reader and writer programs ------------------------------------------------------------------


def reader(cfg: dict, me: int) -> None:
    """Loop until told to stop; write progress and every error to r<me>.json."""
    from layerdb.engine.api import LayerDB
    from layerdb.engine.audit import find
    from layerdb.engine.errors import NotFound

    work = Path(cfg["work"])
    tmp = work / f"r{me}.tar"
    old_view = oracle_lines(ORACLE / "sample2", 3)
    new_view = oracle_lines(ORACLE / "sample", 6)
    old_file = oracle_entry("sample2", 3, "srv/hello.txt")
    new_file = oracle_entry("sample", 6, "etc/passwd")
    st = {"iterations": 0, "paused_reads": 0, "old": 0, "new": 0, "errors": []}
    db = LayerDB(cfg["db"])
    def paused() -> bool:
        return (work / "paused").exists() and not (work / "resumed").exists()

    while not (work / "stop").exists():
        paused_at_start = paused()
        state = "?"
        try:
            ids = sorted(i["id"] for i in db.images())
            state = {tuple(cfg["old_ids"]): "old", tuple(cfg["new_ids"]): "new"}.get(tuple(ids), f"other {ids}")
            if "rows" in cfg:  # no layer, diff or image row of a half import is ever visible
                with db.store.read():
                    rows = [db.store.scalar(f"SELECT count(*) FROM {t}") for t in ("image", "layer", "diff")]
                assert rows in cfg["rows"].values(), f"rows {rows}"
            listing = db.listing(OLD, "/", recursive=True)
            assert len(listing) == len(old_view), "view -R of the old image"
            data = b"".join(db.cat(OLD, "/srv/hello.txt"))
            assert hashlib.sha256(data).hexdigest() == old_file["sha256"], "cat"
            assert [r["position"] for r in db.log("/srv/hello.txt", image=OLD)] == [2], "log"
            buf = io.BytesIO()
            db.export_tar(OLD, buf)
            assert tar_manifest(buf.getvalue(), tmp) == old_view, "export of the old image"
            if cfg.get("read_new", True):
                try:
                    db.resolve(NEW)
                except NotFound:
                    assert state == "old", "the images list shows the new image, its tag does not"
                else:
                    buf = io.BytesIO()
                    db.export_tar(NEW, buf)
                    assert tar_manifest(buf.getvalue(), tmp) == new_view, "export of the new image"
                    got = b"".join(db.cat(NEW, "/etc/passwd"))
                    assert hashlib.sha256(got).hexdigest() == new_file["sha256"], "cat of the new image"
                # Images only come in this test: what the list showed, find shows too.
                found = {t for row in find(db, name="passwd") for t in row["repo_tags"]}
                assert OLD in found and found <= {OLD, NEW} and (state == "old" or NEW in found), f"find: {found}"
        except Exception as e:  # every error is reported, none ends the loop
            st["errors"].append(f"{state}: {type(e).__name__}: {e}")
        st["iterations"] += 1
        st[state] = st.get(state, 0) + 1
        st["paused_reads"] += paused_at_start and paused()  # the whole read inside the writer's pause
        out = work / f"r{me}.json"
        out.with_suffix(".tmp").write_text(json.dumps(st))
        os.replace(out.with_suffix(".tmp"), out)
    db.close()


def reader_states(work: Path) -> list[dict]:
    out = []
    for i in range(READERS):
        p = work / f"r{i}.json"
        out.append(json.loads(p.read_text()) if p.exists() else {"iterations": 0, "paused_reads": 0})
    return out


def writer(cfg: dict) -> None:
    """Import; at the first progress report (inside the transaction) pause until released."""
    from layerdb.engine.api import LayerDB

    work = Path(cfg["work"])
    paused = False

    def progress(kind: str, done: int, total: int) -> None:
        nonlocal paused
        if paused:
            return
        paused = True
        (work / "paused").touch()
        deadline = time.monotonic() + WAIT
        while not (work / cfg["release"]).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
            if cfg["release"] == "readers-done" and all(
                s["paused_reads"] >= PAUSED_READS for s in reader_states(work)
            ):
                break
        (work / "resumed").touch()

    with LayerDB(cfg["db"]) as db:
        db.import_archive(cfg["archive"], progress=progress)
    assert paused, "the importer never reported progress inside its transaction"


def run_program(role: str, cfg_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, role, str(cfg_path), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=cli_env(cfg_path.parent))


def wait_for(what: str, cond) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def finish(p: subprocess.Popen, what: str) -> None:
    out, err = p.communicate(timeout=WAIT)
    assert p.returncode == 0, f"{what} failed: {err.decode(errors='replace')}"


# Tests --------------------------------------------------------------------------------------------


@pytest.fixture
def base(tmp_path):
    db = tmp_path / "s.sqlite"
    r = run_cli("import", str(IMAGES / "sample2.oci.tar"), db_path=db)
    assert r.exit_code == 0, r.stderr
    return db


def image_ids(*names: str) -> list[str]:
    return sorted(json.loads((ORACLE / n / "index.json").read_text())["config_digest"] for n in names)


def test_four_readers_during_an_import_see_old_or_new_never_half(base, tmp_path):
    work = tmp_path
    cfg = {"db": str(base), "work": str(work), "archive": str(IMAGES / "sample.oci.tar"), "release": "readers-done",
           "old_ids": image_ids("sample2"), "new_ids": image_ids("sample2", "sample"),
           # (images, layers, diffs): sample adds 5 layers on the bottom one it shares with sample2
           "rows": {"old": [1, 3, 3], "new": [2, 8, 8]}}
    cfg_path = work / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    readers = [run_program("reader", cfg_path, str(i)) for i in range(READERS)]
    wait_for("every reader's first read", lambda: all(s["iterations"] for s in reader_states(work)))
    w = run_program("writer", cfg_path)
    finish(w, "the import")
    committed = [s["iterations"] for s in reader_states(work)]
    wait_for("reads after the commit", lambda: all(s["iterations"] > c + 1 for s, c in zip(reader_states(work), committed)))
    (work / "stop").touch()
    for p in readers:
        finish(p, "a reader")
    states = reader_states(work)
    for s in states:
        assert s["errors"] == [], s["errors"][:5]
        assert s["paused_reads"] >= PAUSED_READS, "a reader did not read during the open import"
        assert s["old"] and s["new"] and s["old"] + s["new"] == s["iterations"], s
    print("reader iterations (old, new, during the open transaction):",
          [(s["old"], s["new"], s["paused_reads"]) for s in states])
    check_store(base)


def test_two_importers_at_once_both_succeed(base, tmp_path):
    ps = [subprocess.Popen(argv(base, "import", str(IMAGES / a)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           stdin=subprocess.DEVNULL, env=cli_env(tmp_path))
          for a in ("sample.oci.tar", "opaque.oci-zstd.tar")]
    for p in ps:
        finish(p, "an import")
    assert sorted(i["id"] for i in load_json_lines(run_cli("images", "--json", db_path=base).stdout)) == image_ids(
        "sample2", "sample", "opaque")
    assert_top_views(base)
    check_store(base)


def test_second_importer_waits_for_the_first(base, tmp_path):
    """The first import holds its write transaction open; the second starts, then the first goes on."""
    work = tmp_path
    cfg = {"db": str(base), "work": str(work), "archive": str(IMAGES / "sample.oci.tar"), "release": "go"}
    cfg_path = work / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    first = run_program("writer", cfg_path)
    wait_for("the first import to hold its transaction", (work / "paused").exists)
    second = subprocess.Popen(argv(base, "import", str(IMAGES / "opaque.oci-zstd.tar")), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=cli_env(tmp_path))
    time.sleep(0.5)  # let the second reach the lock: it has nothing to wait for otherwise
    assert second.poll() is None, "the second import finished while the first held the write lock"
    (work / "go").touch()
    finish(first, "the first import")
    finish(second, "the second import")
    assert_top_views(base)
    check_store(base)


def assert_top_views(db_path: Path) -> None:
    for ref, oracle, pos in ((OLD, "sample2", 3), (NEW, "sample", 6), ("opaque:1.0", "opaque", 3)):
        r = run_cli("export", "--at", ref, "-o", "-", db_path=db_path)
        assert r.exit_code == 0, r.stderr
        assert tar_manifest(r.stdout_bytes, db_path.parent / "v.tar") == oracle_lines(ORACLE / oracle, pos), ref


def test_readers_never_see_database_is_locked_during_gc(base, tmp_path):
    """gc rewrites the file (VACUUM) while a reader loops: no error, same bytes."""
    r = run_cli("import", str(IMAGES / "sample.oci.tar"), db_path=base)
    assert r.exit_code == 0
    # Only the image that stays is read: gc removes the other one under the readers' feet.
    cfg = {"db": str(base), "work": str(tmp_path), "old_ids": image_ids("sample2"),
           "new_ids": image_ids("sample2", "sample"), "read_new": False}
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    readers = [run_program("reader", cfg_path, str(i)) for i in range(2)]
    wait_for("the readers' first reads", lambda: all(s["iterations"] for s in reader_states(tmp_path)[:2]))
    for args in (("rm", NEW), ("gc",)):
        p = subprocess.run(argv(base, *args), capture_output=True, env=cli_env(tmp_path), timeout=WAIT)
        assert p.returncode == 0, p.stderr
    done = [s["iterations"] for s in reader_states(tmp_path)[:2]]
    wait_for("reads after gc", lambda: all(s["iterations"] > c + 1 for s, c in zip(reader_states(tmp_path), done)))
    (tmp_path / "stop").touch()
    for p in readers:
        finish(p, "a reader")
    for s in reader_states(tmp_path)[:2]:
        assert s["errors"] == [], s["errors"][:5]
        assert s["old"] and s["new"], s
    check_store(base)


if __name__ == "__main__":
    role, cfg_file = sys.argv[1], sys.argv[2]
    config = json.loads(Path(cfg_file).read_text())
    if role == "reader":
        reader(config, int(sys.argv[3]))
    else:
        writer(config)
