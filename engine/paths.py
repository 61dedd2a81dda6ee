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


def ancestors_to_root(path: bytes) -> Iterator[bytes]:
    """Proper ancestors of a path, nearest first, down to the root b''."""
    while path:
        i = path.rfind(b"/")
        path = path[:i] if i >= 0 else b""
        yield path


def join(base: bytes, name: bytes) -> bytes:
    if not name:
        return base
    return base + b"/" + name if base else name
