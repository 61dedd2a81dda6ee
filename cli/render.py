"""Rendering for the CLI: tables, JSON lines, human sizes and times."""

from __future__ import annotations

import datetime as _dt
import os
import stat
import sys
from typing import Any, Callable, Sequence

TYPE_CHAR = {"f": "-", "d": "d", "l": "l", "p": "p", "c": "c", "b": "b", "h": "h"}


def short(digest: str | None) -> str:
    """The 12-digit short form of 'sha256:<hex>' (or 'container:<hex>'), as docker prints ids."""
    return digest.partition(":")[2][:12] if digest else ""


def json_line(obj: Any) -> None:
    import json  # only --json output needs it: start-up stays short

    sys.stdout.write(json.dumps(obj, ensure_ascii=True, separators=(",", ":")) + "\n")


def table(headers: Sequence[str], rows: list[list[str]]) -> None:
    widths = [len(h) for h in headers]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    out = sys.stdout

    def line(cells):
        out.write("   ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() + "\n")

    line(headers)
    for r in rows:
        line(r)


def size(n: int | None) -> str:
    if n is None:
        return ""
    if n < 1000:
        return f"{n}B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000:
            return f"{n:.3g}{unit}"
    return f"{n:.3g}PB"


def ago(ts: str | None) -> str:
    if not ts:
        return ""
    try:
        t = _dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return ts
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    s = (_dt.datetime.now(_dt.timezone.utc) - t).total_seconds()
    for unit, secs in (("year", 365 * 86400), ("month", 30 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= secs:
            k = int(s // secs)
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return "just now"


def mtime(t: int | None) -> str:
    if t is None:
        return " " * 16
    try:
        return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, OSError, ValueError):
        return str(t)


def mode_string(type_: str, mode_octal: str) -> str:
    m = int(mode_octal, 8)
    return TYPE_CHAR.get(type_, "?") + stat.filemode(m)[1:]


def trunc(s: str, n: int) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def atomic_write(path: str, write: Callable[[Any], Any]) -> None:
    """Write a regular file through a temporary file and a rename: no partial
    file on error.  Anything else that exists already (/dev/null, a fifo, a
    terminal) is written in place: renaming over it would replace the device."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        with open(path, "wb") as f:
            write(f)
        return
    import tempfile

    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".layerdb-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, (st.st_mode & 0o7777) if st is not None else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
