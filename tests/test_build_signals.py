"""Ctrl-C and SIGKILL in the middle of a RUN: the store stays as it was (fsck passes, no
new layer, image or cache entry), no mount and no process of the step is left, and the
next build cleans what the killed one left on disk and succeeds.  The real CLI in a
subprocess, a real RUN in its namespaces."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_FIXTURES, run_cli, store_dump

BASE = REPO_FIXTURES / "images" / "sample.oci.tar"
LAYERDB = Path(sys.executable).with_name("layerdb")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="RUN needs root (namespaces, overlayfs)")


def _step_processes(marker: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            continue
    return out


def _mounts_below(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln for ln in f if str(path) in ln]


def _group_state(pgid: int) -> str:
    """What each process of the group is doing: to tell a lost signal from a stuck wait."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            if not pid.isdigit() or os.getpgid(int(pid)) != pgid:
                continue
            with open(f"/proc/{pid}/status") as f:
                st = dict(ln.split(":", 1) for ln in f if ":" in ln)
            with open(f"/proc/{pid}/wchan") as f:
                wchan = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            continue
        out.append(f"{pid} {st['State'].strip()} wchan={wchan} SigBlk={st['SigBlk'].strip()} "
                   f"SigIgn={st['SigIgn'].strip()} SigCgt={st['SigCgt'].strip()} {cmd}")
    return "\n".join(out)


def _interrupted_build(tmp_path: Path, how: str):
    store = tmp_path / "store.sqlite"
    assert run_cli("import", str(BASE), db_path=store).exit_code == 0
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    marker = f"{os.getpid() % 1000 + 3000}.{'7' if how == 'int' else '9'}"  # a sleep no one else runs
    (ctx / "Dockerfile").write_text(
        "FROM sample:1.0\n"
        f"RUN --mount=type=bind,target=/c echo started && if [ ! -e /c/go ]; then sleep {marker}; fi"
        " && echo done > /done\n")
    cache = tmp_path / "cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    before = store_dump(store)
    # A terminal's foreground job takes Ctrl-C; a test run started in the background
    # (`pytest &` in a shell without job control) ignores SIGINT, and every exec
    # down to the step's sleep keeps that: the builder is started as from a terminal.
    was = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        p = subprocess.Popen([str(LAYERDB), "--db", str(store), "build", "-t", "sig:1", str(ctx)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    finally:
        if was is not None:
            signal.signal(signal.SIGINT, was)
    seen = b""
    deadline = time.monotonic() + 60
    while b"started" not in seen:
        assert time.monotonic() < deadline, seen
        chunk = os.read(p.stderr.fileno(), 4096)
        assert chunk, seen + p.stdout.read()
        seen += chunk
    while not _step_processes(f"sleep\0{marker}"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    if how == "int":
        os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    else:
        os.kill(p.pid, signal.SIGKILL)  # the builder alone, as the OOM killer would
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        state = _group_state(p.pid)
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"the builder did not end within 60 s of the signal; its process group:\n{state}")
    for _ in range(100):  # the step's processes die with their namespace, at once but not in this instant
        if not _step_processes(f"sleep\0{marker}"):
            break
        time.sleep(0.1)
    assert _step_processes(f"sleep\0{marker}") == []
    assert _mounts_below(tmp_path) == []
    assert store_dump(store) == before
    r = run_cli("fsck", db_path=store)
    assert r.exit_code == 0, r.output
    return p.returncode, (seen + err).decode(), store, ctx, cache, env


def _rerun_succeeds(store: Path, ctx: Path, cache: Path, env: dict) -> None:
    (ctx / "go").write_text("")
    r = subprocess.run([str(LAYERDB), "--db", str(store), "build", "-q", "-t", "sig:1", str(ctx)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert run_cli("cat", "--at", "sig:1", "/done", db_path=store).stdout == "done\n"
    # Nothing of the interrupted build is left on disk: no upper dir, no scratch dir.
    assert [n for n in os.listdir(cache / "layerdb" / "layers") if n.startswith("upper-")] == []
    assert os.listdir(cache / "layerdb" / "tmp") == []


def test_ctrl_c_during_run(tmp_path):
    code, err, store, ctx, cache, env = _interrupted_build(tmp_path, "int")
    assert code == 130 and err.rstrip().splitlines()[-1] == "layerdb: aborted"
    assert "Traceback" not in err
    _rerun_succeeds(store, ctx, cache, env)


def test_sigkill_during_run(tmp_path):
    code, err, store, ctx, cache, env = _interrupted_build(tmp_path, "kill")
    assert code == -signal.SIGKILL
    left = [n for n in os.listdir(cache / "layerdb" / "layers") if n.startswith("upper-")]
    assert len(left) == 1  # the killed step's upper dir, until the next build
    _rerun_succeeds(store, ctx, cache, env)
