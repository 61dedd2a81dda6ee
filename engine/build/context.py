"""The build context: files read straight from the directory (no context tarball).

A COPY or ADD source is a path relative to the context root, with Go
`filepath.Match` wildcards in any component.  What .dockerignore excludes is
not there.  A source that climbs out of the root (`../x`) or that reaches a
place outside it through a symlink is refused; a symlink inside a copied
directory is copied as the symlink it is, so it cannot leak anything.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import Iterator

from ..errors import ContextError
from .ignore import Ignore, translate

WILDCARD = re.compile(r"[*?\[]")


@dataclass
class Source:
    rel: str  # relative to the context root, `/`-separated ("" for the root itself)
    full: str  # the host path (symlinks of the source path itself followed)
    st: os.stat_result

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)


@dataclass
class Member:
    """One entry below a copied directory (or the copied file itself)."""

    rel: str  # relative to the source ("" for the source itself)
    full: str
    st: os.stat_result


class Context:
    def __init__(self, root: str, ignore: Ignore | None = None):
        if not os.path.isdir(root):
            raise ContextError(f"{root}: the build context is not a directory")
        self.root = os.path.realpath(root)
        self.ignore = ignore or Ignore()

    def _inside(self, full: str) -> bool:
        return full == self.root or full.startswith(self.root.rstrip("/") + "/")

    def _rel(self, full: str) -> str:
        return os.path.relpath(full, self.root).replace(os.sep, "/") if full != self.root else ""

    def clean(self, source: str) -> list[str]:
        """The components of a source path, `.` and `..` applied; refused if it climbs out."""
        parts: list[str] = []
        for p in source.split("/"):
            if p in ("", "."):
                continue
            if p == "..":
                if not parts:
                    raise ContextError(f"{source}: outside the build context")
                parts.pop()
                continue
            parts.append(p)
        return parts

    def sources(self, source: str) -> list[Source]:
        """Every context path a COPY/ADD source names (wildcards expanded, sorted)."""
        parts = self.clean(source)
        found = [self.root]
        for i, part in enumerate(parts):
            nxt: list[str] = []
            for base in found:
                if WILDCARD.search(part):
                    rx = translate(part)
                    try:
                        names = sorted(os.listdir(base))
                    except NotADirectoryError:
                        continue
                    nxt += [os.path.join(base, n) for n in names if rx.match(n)]
                else:
                    nxt.append(os.path.join(base, part))
            found = []
            for full in nxt:
                if not os.path.lexists(full):
                    continue
                real = os.path.realpath(full)
                if not self._inside(real):
                    raise ContextError(f"{source}: {self._rel(full) if self._inside(full) else full} leads outside"
                                       " the build context (a symlink)")
                if self.ignore.ignored(self._rel(real)) or self.ignore.ignored(self._rel(full)):
                    continue
                if os.path.exists(real):
                    found.append(real)
        if not found:
            raise ContextError(f"{source}: no such file or directory in the build context"
                               " (or excluded by .dockerignore)")
        out = []
        for full in found:
            out.append(Source(self._rel(full), full, os.stat(full)))
        return out

    def walk(self, src: Source) -> Iterator[Member]:
        """The source and everything below it (not following symlinks), parents first,
        each directory's entries sorted by name; ignored paths left out."""
        yield Member("", src.full, src.st)
        if not src.is_dir:
            return
        stack = [("", src.full)]
        while stack:
            rel, full = stack.pop()
            with os.scandir(full) as it:
                entries = sorted(it, key=lambda e: e.name)
            subdirs = []
            for e in entries:
                r = f"{rel}/{e.name}" if rel else e.name
                ctx_rel = f"{src.rel}/{r}" if src.rel else r
                st = e.stat(follow_symlinks=False)
                isdir = stat.S_ISDIR(st.st_mode)
                if self.ignore.ignored(ctx_rel):
                    if isdir and self.ignore.may_hold_included(ctx_rel):
                        subdirs.append((r, e.path, True))
                    continue
                yield Member(r, e.path, st)
                if isdir:
                    subdirs.append((r, e.path, False))
            # Depth first, in name order: reversed onto the stack.
            for r, path, _ in reversed(subdirs):
                stack.append((r, path))
