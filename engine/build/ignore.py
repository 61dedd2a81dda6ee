""".dockerignore: which context paths a build cannot see.

As docker and buildah read it: one pattern a line; `#` lines are comments;
each pattern is cleaned (`a//b/../c` is `a/c`) and loses a leading `/`;
`*` and `?` never match `/`, `[...]` is a class (`[^...]` negates), `\\`
escapes, and `**` matches any number of directories, none included; a
pattern that matches a directory matches everything below it; `!` re-includes;
of the patterns that match a path, the last one decides.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

from ..errors import ContextError


@dataclass
class Pattern:
    text: str
    exclude: bool  # False for `!` (re-include)
    regex: re.Pattern

    def matches(self, path: str) -> bool:
        """The path or one of its parents matches."""
        if self.regex.match(path):
            return True
        while "/" in path:
            path = path.rsplit("/", 1)[0]
            if self.regex.match(path):
                return True
        return False


def translate(pattern: str) -> re.Pattern:
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):  # `**/`: any directories, or none
                    i += 1
                    out.append("(?:.*/)?")
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 2)
            if j < 0:
                raise ContextError(f".dockerignore: bad pattern {pattern!r}: unterminated [")
            body = pattern[i + 1:j]
            neg = body[:1] in ("^", "!")
            body = "".join("\\" + ch if ch in "\\[]^" else ch for ch in (body[1:] if neg else body))
            out.append("[" + ("^/" if neg else "") + body + "]")
            i = j
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    out.append("$")
    return re.compile("".join(out), re.S)


def compile_pattern(line: str) -> Pattern | None:
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    exclude = True
    if line.startswith("!"):
        exclude, line = False, line[1:].strip()
    line = posixpath.normpath(line).lstrip("/") if line else line
    if line in ("", "."):
        return None
    return Pattern(line, exclude, translate(line))


class Ignore:
    def __init__(self, lines: list[str] = ()):  # type: ignore[assignment]
        self.patterns = [p for p in (compile_pattern(ln) for ln in lines) if p is not None]
        self.has_reincludes = any(not p.exclude for p in self.patterns)

    @classmethod
    def for_build(cls, context: str, dockerfile: str | None) -> "Ignore":
        """`<Dockerfile>.dockerignore` beside the Dockerfile when there is one (as BuildKit),
        else the context's `.dockerignore`, else `.containerignore` (buildah's name)."""
        candidates = []
        if dockerfile:
            candidates.append(dockerfile + ".dockerignore")
        candidates += [os.path.join(context, ".dockerignore"), os.path.join(context, ".containerignore")]
        for c in candidates:
            if os.path.isfile(c):
                with open(c, encoding="utf-8", errors="surrogateescape") as f:
                    return cls(f.read().splitlines())
        return cls()

    def ignored(self, path: str) -> bool:
        """Whether a context path (relative, `/`-separated) is excluded."""
        path = path.strip("/")
        if not path:
            return False
        out = False
        for p in self.patterns:
            if p.matches(path):
                out = p.exclude
        return out

    def may_hold_included(self, directory: str) -> bool:
        """Whether an excluded directory can still hold a path a `!` pattern re-includes
        (then a walk must go into it)."""
        return self.has_reincludes
