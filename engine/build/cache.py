"""The build's directory cache: materialised layers (overlay lower dirs), kept between builds
and collected.

`layers/<first 20 hex of the diff_id>` is one stored diff in overlay format;
beside it, `<name>.size` holds its size in bytes and the store it came from, and
its mtime is the last build that used it (the directory's own mtime is the
layer's root's, so it cannot say so).  At the end of a build, directories whose
diff their own store no longer holds (`rm` and `gc`) are removed, then the least
recently used ones until the cache is under its bound; never one this build
used.  (The cache is per user, shared by every store: a layer another store
made is left to that store's builds, unless the bound needs its room.)  Every build holds a shared
lock on `layers/.lock` while it may mount a lower dir, and collects only when
it can take the lock alone: a lower dir in use by another build is never removed.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat

DEFAULT_MAX = 8 << 30  # bytes of materialised layers kept between builds
NAME = re.compile(r"[0-9a-f]{20}")


def name_of(diff_id: str) -> str:
    return diff_id.removeprefix("sha256:")[:20]


def lock(layers: str) -> int:
    """A shared lock on the cache, held for the build (close the fd to drop it)."""
    os.makedirs(layers, exist_ok=True)
    fd = os.open(os.path.join(layers, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def note(path: str, origin: str, size: int | None = None) -> None:
    """Record a use of a cached layer dir (and its size and store, when it is new)."""
    side = path + ".size"
    if size is None and os.path.exists(side):
        os.utime(side)
        return
    if size is None:
        size = tree_size(path)
    with open(side + ".tmp", "w") as f:
        f.write(f"{size} {origin}")
    os.replace(side + ".tmp", side)


def tree_size(path: str) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        for n in files:
            st = os.lstat(os.path.join(root, n))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def collect(layers: str, fd: int, origin: str, live: set[str], used: set[str], bound: int) -> list[str]:
    """Remove what nothing can use (made from store `origin`, whose diffs are `live`) and
    what is over the bound; returns the names removed.  Does nothing while another
    build holds the lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return []
    try:
        entries = []
        for n in os.listdir(layers):
            if not NAME.fullmatch(n):
                continue
            path = os.path.join(layers, n)
            try:
                side = os.stat(path + ".size")
                with open(path + ".size") as f:
                    size_text, _, made_by = f.read().partition(" ")
                size, used_at = int(size_text), side.st_mtime
            except (OSError, ValueError):
                size, used_at, made_by = tree_size(path), 0.0, origin
            entries.append((used_at, n, size, made_by))
        removed = []
        total = sum(e[2] for e in entries)
        for used_at, n, size, made_by in sorted(entries):
            gone = made_by == origin and n not in live
            if n in used or not (gone or total > bound):
                continue
            shutil.rmtree(os.path.join(layers, n), ignore_errors=True)
            try:
                os.unlink(os.path.join(layers, n) + ".size")
            except FileNotFoundError:
                pass
            total -= size
            removed.append(n)
        return removed
    finally:
        fcntl.flock(fd, fcntl.LOCK_SH)


def clean_stale(d: str, prefixes: tuple[str, ...] = ("upper", "build"), tmp_files: bool = True) -> None:
    """Upper and scratch directories (PREFIX-PID-...) of builds that died (killed, power
    loss): their pid is gone; and with tmp_files, half-written `*.tmp` entries.  Mounts need no
    cleaning: each lived in its step's own mount namespace."""
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    for n in names:
        m = re.fullmatch(r"(?:" + "|".join(map(re.escape, prefixes)) + r")-(\d+)-.*", n)
        if m:
            try:
                os.kill(int(m.group(1)), 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        elif not (tmp_files and n.endswith(".tmp")):
            continue
        full = os.path.join(d, n)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            os.unlink(full)
