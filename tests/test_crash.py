"""SIGKILL at random points: `import`, `rm` and `gc` leave the store as before or as after.

Each run is a real `python -m layerdb.cli` subprocess killed with SIGKILL.  The
points are random: the test reads the command's JSON log lines (`-v
--log-format json`: one per layer stored, one per gc step) and kills after a
random number of them plus a random delay of a few milliseconds, so kills land
inside the write transaction (between layers, while a layer streams in, in the
commit, in VACUUM), not only before it starts.  Set LAYERDB_CRASH_SEED to
replay a run; the seed is in every failure message.

After every kill:
- the store's full logical dump equals the dump before the command or the one
  after an uninterrupted run (import timestamps masked), nothing in between;
- the store is consistent (SQL checks, and `layerdb fsck`);
- the image imported earlier (sample2) exports byte for byte as before, and its
  views still equal the containers/storage oracle;
- the command, run again, succeeds and gives the uninterrupted result.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from conftest import REPO_FIXTURES, export_bytes, manifest_of_tar_bytes, oracle_lines
from hostile.storecheck import argv, check_store, cli_env, copy_store, dump

IMAGES = REPO_FIXTURES / "images"
SEED = int(os.environ.get("LAYERDB_CRASH_SEED", random.randrange(1 << 32)))
EARLIER = "sample2:1.0"
MULTI_TAGS = ["localhost/sample:1.0", "localhost/opaque:1.0"]


def merge_docker_archives(sources: list[Path], dst: Path) -> Path:
    """One `docker save` archive holding every image of the sources (as `docker save a b` writes)."""
    manifest: list = []
    seen: set[str] = set()
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as out:
        for src in sources:
            with tarfile.open(src) as t:
                for m in t.getmembers():
                    if m.name == "manifest.json":
                        manifest += json.load(t.extractfile(m))
                    elif m.name != "repositories" and m.name not in seen:
                        seen.add(m.name)
                        out.addfile(m, t.extractfile(m) if m.isfile() else None)
        data = json.dumps(manifest).encode()
        ti = tarfile.TarInfo("manifest.json")
        ti.size = len(data)
        out.addfile(ti, io.BytesIO(data))
    return dst


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The stores and dumps every kill is judged against."""
    from layerdb.engine.api import LayerDB

    d = tmp_path_factory.mktemp("crash")
    multi = merge_docker_archives([IMAGES / "sample.docker.tar", IMAGES / "opaque.docker.tar"], d / "multi.tar")
    base = d / "base.sqlite"  # sample2 only
    with LayerDB(base) as db:
        db.import_archive(str(IMAGES / "sample2.oci.tar"))
        earlier = export_bytes(db, EARLIER)
    imported = copy_store(base, d / "imported.sqlite")  # + sample and opaque, from one archive
    with LayerDB(imported) as db:
        res = db.import_archive(str(multi))
    assert sorted(t for img in res.images for t in img["repo_tags"]) == sorted(MULTI_TAGS)
    removed = copy_store(imported, d / "removed.sqlite")  # sample and opaque removed, not collected
    with LayerDB(removed) as db:
        db.remove(MULTI_TAGS)
    collected = copy_store(removed, d / "collected.sqlite")
    with LayerDB(collected) as db:
        db.gc()
    assert manifest_of_tar_bytes(earlier, d) == oracle_lines(REPO_FIXTURES / "oracle" / "sample2", 3)
    return {"multi": multi, "earlier": earlier, "stores": {"base": base, "imported": imported, "removed": removed,
                                                            "collected": collected},
            "dumps": {k: dump(p) for k, p in {"base": base, "imported": imported, "removed": removed,
                                               "collected": collected}.items()}}


def kill_at(args: list[str], db: Path, events: int, delay: float) -> str:
    """Run the CLI; SIGKILL it `delay` seconds after its `events`-th log line.  Returns how it ended."""
    p = subprocess.Popen(argv(db, "-v", "--log-format", "json", *args), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=cli_env(db.parent))
    seen = 0
    while seen < events:
        line = p.stderr.readline()
        if not line:
            break
        if line.startswith(b"{") and json.loads(line).get("level") == "info":
            seen += 1
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.stderr.read()
    rc = p.wait(timeout=60)
    if rc == -signal.SIGKILL:
        return f"killed after {seen} events"
    assert rc == 0, f"exit {rc} without a kill (seed {SEED})"
    return "finished"


def judge(setup, db: Path, before: str, after: str, how: str) -> str:
    """The checks after a kill; returns which state the store was in."""
    from layerdb.engine.api import LayerDB

    where = f"{how}, seed {SEED}"
    d = dump(db)
    state = before if d == setup["dumps"][before] else after if d == setup["dumps"][after] else None
    assert state is not None, f"the store is neither {before} nor {after} ({where})"
    check_store(db)
    with LayerDB(db) as ldb:
        assert export_bytes(ldb, EARLIER) == setup["earlier"], f"{EARLIER} exports differently ({where})"
    return state


def rerun(db: Path, setup, after: str, *args: str) -> None:
    from conftest import run_cli

    r = run_cli(*args, db_path=db)
    assert r.exit_code == 0, f"{args} after a kill: {r.stderr} (seed {SEED})"
    assert dump(db) == setup["dumps"][after], f"{args} after a kill gives another store (seed {SEED})"


def run_kills(setup, tmp_path, n: int, start: str, end: str, args: list[str], max_events: int, max_delay: float):
    rng = random.Random(f"{SEED}-{args[0]}")
    outcomes: dict[str, int] = {}
    for i in range(n):
        db = copy_store(setup["stores"][start], tmp_path / f"k{i}.sqlite")
        how = kill_at(args, db, rng.randint(0, max_events), rng.uniform(0, max_delay))
        state = judge(setup, db, start, end, how)
        outcomes[f"{how} -> {state}"] = outcomes.get(f"{how} -> {state}", 0) + 1
        if state == start or args[0] != "rm":  # a second rm of the same image is an error
            rerun(db, setup, end, *args)
    return outcomes


def test_import_killed_at_20_random_points(setup, tmp_path):
    # 8 new layers (the busybox layer of sample is stored already, with sample2).
    out = run_kills(setup, tmp_path, 20, "base", "imported", ["import", str(setup["multi"])],
                    max_events=9, max_delay=0.02)
    print(f"import kills (seed {SEED}): {out}")


def test_rm_killed_at_random_points(setup, tmp_path):
    out = run_kills(setup, tmp_path, 6, "imported", "removed", ["rm", *MULTI_TAGS], max_events=2, max_delay=0.005)
    print(f"rm kills (seed {SEED}): {out}")


def test_gc_killed_at_random_points(setup, tmp_path):
    out = run_kills(setup, tmp_path, 10, "removed", "collected", ["gc"], max_events=5, max_delay=0.01)
    print(f"gc kills (seed {SEED}): {out}")


def test_commit_killed_at_random_points(tmp_path):
    """`commit` seals a container in one transaction: killed anywhere, the store
    has either no new image or the whole of it, and a rerun commits."""
    from conftest import manifest_of_tar_bytes, run_cli

    from layerdb.engine.api import LayerDB

    rng = random.Random(f"{SEED}-commit")
    base = tmp_path / "base.sqlite"
    with LayerDB(base) as db:
        db.import_archive(str(IMAGES / "sample2.oci.tar"))
    payload = tmp_path / "big.bin"
    payload.write_bytes(random.Random(7).randbytes(24 << 20))  # big enough that kills land mid-commit
    for args in (["container", "create", "sample2:1.0", "--name", "c1"], ["cp", str(payload), "c1:/srv/big.bin"]):
        r = run_cli(*args, db_path=base)
        assert r.exit_code == 0, r.stderr
    before = dump(base)
    ref = copy_store(base, tmp_path / "ref.sqlite")
    t = time.monotonic()  # timed as the killed runs are: a process, start-up included
    assert subprocess.run(argv(ref, "commit", "c1", "new:1"), env=cli_env(ref.parent),
                          capture_output=True).returncode == 0
    took = time.monotonic() - t
    with LayerDB(ref) as db:
        want = manifest_of_tar_bytes(export_bytes(db, "new:1"), tmp_path)
    outcomes: dict[str, int] = {}
    for i in range(8):
        db_path = copy_store(base, tmp_path / f"c{i}.sqlite")
        p = subprocess.Popen(argv(db_path, "commit", "c1", "new:1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=cli_env(db_path.parent))
        time.sleep(rng.uniform(took * 0.3, took * 1.1))
        p.send_signal(signal.SIGKILL)
        how = "killed" if p.wait(timeout=60) == -signal.SIGKILL else "finished"
        check_store(db_path)
        with LayerDB(db_path) as db:
            tags = {t for img in db.images() for t in img["repo_tags"]}
        if "new:1:latest" in tags or "new:1" in tags:
            state = "after"
        else:
            assert dump(db_path) == before, f"killed commit left a partial store (seed {SEED})"
            state = "before"
            r = run_cli("commit", "c1", "new:1", db_path=db_path)
            assert r.exit_code == 0, f"commit after a kill: {r.stderr} (seed {SEED})"
        with LayerDB(db_path) as db:
            assert manifest_of_tar_bytes(export_bytes(db, "new:1"), tmp_path) == want, f"seed {SEED}"
        outcomes[f"{how} -> {state}"] = outcomes.get(f"{how} -> {state}", 0) + 1
    print(f"commit kills (seed {SEED}): {outcomes}")
