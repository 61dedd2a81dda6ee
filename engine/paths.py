"""Paths as the store keeps them: raw bytes, relative to the root, '/'-separated.

Every module that parses, shows, splits or joins a path uses these, so that the
rules (no leading '/', '' is the root, non-UTF-8 bytes survive) live in one place.
"""

from __future__ import annotations

import os
from typing import Iterator


def parse_path(path: str | bytes) -> bytes:
    """A user-given path (absolute or not) as the store's raw relative path."""
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    return b"/".join(p for p in raw.split(b"/") if p and p != b".")


def show_path(path: bytes) -> str:
    """Absolute, /-rooted, non-UTF-8 bytes as surrogate escapes (DESIGN.md)."""
    return "/" + path.decode("utf-8", "surrogateescape")


def parent(path: bytes) -> bytes:
    i = path.rfind(b"/")
    return path[:i] if i >= 0 else b""


def ancestors(path: bytes) -> Iterator[bytes]:
    """Proper ancestors, nearest first, without the root."""
    while True:
        i = path.rfind(b"/")
        if i < 0:
            return
        path = path[:i]
        yield path


def join(base: bytes, name: bytes) -> bytes:
    if not name:
        return base
    return base + b"/" + name if base else name


def add_with_ancestors(path: bytes, into: set[bytes]) -> None:
    """Add a path and its ancestors (the root b'' included) to a set that holds,
    with each member, all of its ancestors: the walk up stops at the first one
    there, so a deep tree costs a step per path, not one per component."""
    q = path
    while q not in into:
        into.add(q)
        if not q:
            return
        i = q.rfind(b"/")
        q = q[:i] if i >= 0 else b""
