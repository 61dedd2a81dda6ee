"""Shared by the bench scripts: where things live, how to run and time a command,
and how to print a result against its target.

Stdlib only, so that `python3 bench/...` works with any interpreter; the one
peer that needs `zstandard` (the zstd floor) is skipped when it is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
MiB = 1 << 20


def cache_dir() -> Path:
    """Images, unpacked trees and scratch stores: never inside the repository."""
    return Path(os.environ.get("LAYERDB_BENCH_DIR") or "/var/tmp/layerdb-bench")


# What a user's `pip install` has: every module compiled once, its bytecode kept.
# A machine that sets PYTHONDONTWRITEBYTECODE (this one does) would otherwise make
# an editable install compile its modules on every start of every command
# (bench/README.md, "export"); bench_export.py times that case too, as a figure.
# The bytecode goes under the cache, never into the repository.
if os.environ.get("PYTHONDONTWRITEBYTECODE"):
    os.environ.pop("PYTHONDONTWRITEBYTECODE")
    os.environ["PYTHONPYCACHEPREFIX"] = str(cache_dir() / "pycache")


def scratch(name: str) -> Path:
    """An empty scratch directory under the cache (emptied if it exists)."""
    d = cache_dir() / "scratch" / name
    rmtree(d)
    d.mkdir(parents=True)
    return d


def rmtree(path: Path) -> None:
    """rm -rf that refuses to descend into a directory with something mounted below it.

    The image builder bind-mounts /dev and /proc into chroots under the cache;
    a failed unmount must never turn into deleting the host's /dev.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    mounts = mounted_below(path)
    if mounts:
        raise RuntimeError(f"refusing to delete {path}: {mounts[0]} is mounted below it")
    subprocess.run(["chmod", "-R", "u+w", str(path)], check=False, stderr=subprocess.DEVNULL)
    shutil.rmtree(path)


def mounted_below(path: Path) -> list[str]:
    """Mount points at or below path."""
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        mnts = [line.split()[1].replace("\\040", " ") for line in f]
    return [m for m in mnts if m == real or m.startswith(real + "/")]


def layerdb_cmd() -> list[str]:
    """$LAYERDB (a command line), else `layerdb` on PATH, else the repo's .venv."""
    env = os.environ.get("LAYERDB")
    if env:
        return env.split()
    found = shutil.which("layerdb")
    if found:
        return [found]
    for cand in (REPO / ".venv/bin/layerdb", Path("/tmp/venv/bin/layerdb")):
        if cand.exists():
            return [str(cand)]
    sys.exit("bench: no layerdb: put it on PATH or set LAYERDB=/path/to/layerdb")


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


# Running and timing ---------------------------------------------------------


@dataclass
class Run:
    wall: float  # seconds
    rss: int  # peak RSS in bytes (the process and the children it waited for)
    rc: int
    stderr: str = ""


class CommandFailed(Exception):
    def __init__(self, cmd, run: Run):
        self.cmd, self.run = cmd, run
        super().__init__(f"exit {run.rc}: {shown(cmd)}\n{run.stderr.strip()[-2000:]}")


GNU_TIME = "/usr/bin/time"  # Debian package `time`


def shown(cmd) -> str:
    return cmd if isinstance(cmd, str) else " ".join(str(c) for c in cmd)


def run(cmd: Sequence[str] | str, *, stdout=None, stdin=None, env: dict | None = None, cwd=None,
        check: bool = True) -> Run:
    """Run a command (a string goes through sh -c); wall time and its own peak RSS.

    The peak comes from GNU time (`-f %M`), which forks the command from its
    own small process.  Measured from here instead, a child started by
    vfork/fork records this (bench) process's peak as its own when it execs,
    so every figure would read at least the bench's size: that is how a
    100-layer import once read 58 MiB instead of 30.  Without GNU time,
    os.wait4's figure is used, and it has that floor.
    """
    if isinstance(cmd, str):
        argv = ["/bin/sh", "-c", cmd]
    else:
        argv = [str(c) for c in cmd]
    rss_file = None
    if os.access(GNU_TIME, os.X_OK):
        fd, rss_file = tempfile.mkstemp(prefix="layerdb-bench-rss-")
        os.close(fd)
        argv = [GNU_TIME, "-f", "%M", "-o", rss_file, *argv]
    errf = tempfile.TemporaryFile()
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    out = subprocess.DEVNULL if stdout is None else stdout
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=out, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                         stderr=errf, env=full_env, cwd=cwd)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    errf.seek(0)
    err = errf.read().decode("utf-8", "replace")
    errf.close()
    rss = ru.ru_maxrss * 1024
    if rss_file is not None:
        with open(rss_file, encoding="utf-8") as f:
            lines = f.read().split()
        os.unlink(rss_file)
        if lines and lines[-1].isdigit():  # else the command died by a signal
            rss = int(lines[-1]) * 1024
    r = Run(wall, rss, p.returncode, err)
    if check and r.rc != 0:
        raise CommandFailed(cmd, r)
    return r


def capture(cmd: Sequence[str] | str, **kw) -> str:
    if isinstance(cmd, str):
        return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True, **kw).stdout
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw).stdout


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(cases: dict[str, Callable[[], float]], runs: int, setup: Callable[[], None] | None = None
              ) -> dict[str, list[float]]:
    """Run each case once per round, rounds `runs` times, rotating the order so no
    case always goes first (cold caches, CPU boost) or last."""
    names = list(cases)
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(runs):
        order = names[i % len(names):] + names[: i % len(names)]
        for n in order:
            if setup:
                setup()
            out[n].append(cases[n]())
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# Store size ---------------------------------------------------------------------


def store_size(db: Path) -> int:
    """Bytes of the store file after folding the WAL back into it."""
    con = sqlite3.connect(str(db))
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        con.close()
    total = 0
    for suffix in ("", "-wal"):
        p = Path(str(db) + suffix)
        if p.exists():
            total += p.stat().st_size
    return total


def du(path: Path) -> int:
    """Bytes of the files below path (apparent sizes, like `du -sb` without directories)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for n in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except FileNotFoundError:
                pass
    return total


# Reporting ------------------------------------------------------------------


@dataclass
class Result:
    """One target: layerdb's figure, the peer's, their ratio, and the limit on it."""

    bench: str
    target: str  # what is measured, in words
    layerdb: float | None
    peer_name: str
    peer: float | None
    limit: float | None  # ratio layerdb/peer must be <= limit (None: figure only)
    unit: str = "s"
    note: str = ""
    extra: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    failed: bool = False  # the bench crashed before it had a figure

    @property
    def ratio(self) -> float | None:
        if self.layerdb is None or self.peer in (None, 0):
            return None
        return self.layerdb / self.peer

    @property
    def verdict(self) -> str:
        if self.failed:
            return "FAIL"
        if self.limit is None:
            return "-"
        if self.ratio is None:
            return "N/A"
        return "PASS" if self.ratio <= self.limit else "MISS"

    def as_dict(self) -> dict:
        return {"bench": self.bench, "target": self.target, "layerdb": self.layerdb, "peer_name": self.peer_name,
                "peer": self.peer, "unit": self.unit, "ratio": self.ratio, "limit": self.limit,
                "verdict": self.verdict, "note": self.note, "extra": self.extra, "samples": self.samples}


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "s":
        return f"{v:.3f} s" if v >= 0.1 else f"{v * 1000:.1f} ms"
    if unit == "B":
        return f"{v / MiB:.1f} MiB" if v >= MiB / 10 else f"{v / 1024:.1f} KiB"
    if unit == "B/s":
        return f"{v / 1e6:.0f} MB/s"
    return f"{v:g} {unit}"


def report(results: list[Result], as_json: bool) -> None:
    if as_json:
        for r in results:
            print(json.dumps(r.as_dict()))
        return
    for r in results:
        lim = f"<= {r.limit:g}x" if r.limit is not None else ""
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "n/a"
        print(f"[{r.verdict:4}] {r.target}")
        print(f"       layerdb {fmt(r.layerdb, r.unit)}  vs  {r.peer_name} {fmt(r.peer, r.unit)}"
              f"  ->  {ratio} {lim}")
        for k, v in r.extra.items():
            print(f"       {k}: {v}")
        if r.note:
            print(f"       note: {r.note}")
    sys.stdout.flush()


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    p.add_argument("--runs", type=int, default=3, help="rounds of layerdb/peer alternation (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON object a line")
    return p


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem / (1 << 30), 1),
            "kernel": platform.release(), "python": platform.python_version()}


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def ldb(db: Path, *args) -> list[str]:
    """A layerdb command line on store `db`."""
    return layerdb_cmd() + ["--db", str(db)] + [str(a) for a in args]


def layerdb_python() -> str:
    """The interpreter that runs layerdb (from its script's #! line), for cProfile."""
    exe = layerdb_cmd()[0]
    try:
        with open(exe, "rb") as f:
            first = f.readline().decode().strip()
        if first.startswith("#!") and "python" in first:
            return first[2:].split()[0]
    except OSError:
        pass
    return sys.executable


def python_with(module: str) -> str | None:
    """An interpreter that can import `module`: this one, else layerdb's."""
    for py in (sys.executable, layerdb_python()):
        if subprocess.run([py, "-c", f"import {module}"], capture_output=True).returncode == 0:
            return py
    return None


def layerdb_stats(db: Path) -> dict | None:
    """`layerdb stats --json` when this layerdb has it (a breakdown of the store's bytes)."""
    r = subprocess.run(ldb(db, "stats", "--json"), capture_output=True, text=True)
    if r.returncode != 0:
        return None
    try:
        return json.loads(r.stdout.splitlines()[0])
    except (ValueError, IndexError):
        return None


def code_fingerprint() -> str:
    """git HEAD plus a hash of the engine and CLI sources as they are on disk: the
    figures belong to this code, committed or not."""
    h = hashlib.sha256()
    for sub in ("engine", "cli"):
        for p in sorted((REPO / sub).rglob("*")):
            if p.suffix in (".py", ".sql") and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    try:
        head = capture(["git", "-C", REPO, "rev-parse", "--short", "HEAD"]).strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        head = "?"
    return f"{head}+src:{h.hexdigest()[:12]}"


def main_for(doc: str | None, run_bench) -> None:
    """The command line of a bench script: `--runs N`, `--json`, then the report."""
    a = parser(doc).parse_args()
    report(run_bench(a.runs), a.json)
