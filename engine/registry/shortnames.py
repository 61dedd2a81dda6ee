"""Short names (a reference without a registry part), as containers-registries.conf(5)
defines them and podman resolves them.

A reference with a registry part is never changed.  For a short name, an alias
wins: `[aliases]` tables of the registries.conf files (mirrors.conf_files(),
later files override earlier ones, a value "" erases an alias), overridden in
turn by the machine-written short-name-aliases.conf cache (root's is in
/var/cache/containers, other users' in $XDG_CACHE_HOME or ~/.cache/containers).
The alias key is the name as written without tag or digest (`alpine:3` looks up
"alpine"; "library/alpine" is another key); the tag or digest goes onto the
alias's target.

Without an alias, `unqualified-search-registries` (the last file that sets it
wins; a version 1 file's [registries.search], see mirrors.py) gives the candidates, tried in order by pull.  When no file sets it the
name is Docker Hub's, as docker normalises it (DESIGN.md), where podman would
refuse: a machine without any registries.conf keeps working as it did.

`short-name-mode`: podman prompts to choose among several candidates when it
runs on a terminal, and without one `enforcing` fails while `permissive` (the
default) and `disabled` try every candidate.  layerdb never prompts, so it acts
as podman without a terminal.  Nothing is written to the alias cache: podman
records an alias only after a prompt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import UsageError
from . import mirrors, reference
from .reference import Reference

MODES = ("enforcing", "permissive", "disabled")
CACHE_FILE = os.path.join("containers", "short-name-aliases.conf")


@dataclass
class Settings:
    # short name -> (target NAME, or None when a later file erased it; the file that said so)
    aliases: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    cache: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    search: list[str] | None = None
    search_origin: str | None = None
    mode: str = "permissive"
    mode_origin: str | None = None


@dataclass
class Resolved:
    """What a name may mean, in the order pull tries it."""

    candidates: list[Reference]
    how: str  # qualified, alias, search, docker-hub
    origin: str | None = None  # the file the alias or the search list came from
    short: str | None = None


def alias_cache_path() -> str:
    """Where podman records short-name aliases; root's is apart from human-edited files."""
    if os.geteuid() == 0:
        return os.path.join("/var/cache", CACHE_FILE)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, CACHE_FILE)


def _aliases(path: str, table: object) -> dict[str, tuple[str | None, str]]:
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [aliases] must be a table of \"short-name\" = \"registry/repository\"")
    out: dict[str, tuple[str | None, str]] = {}
    for key, value in table.items():
        what = f"{path}: [aliases] {key!r}"
        short = reference.short_name(key)
        if short is None:
            raise UsageError(f"{what}: an alias name must not contain a registry")
        if short != key:
            raise UsageError(f"{what}: an alias name must not contain a tag or digest")
        try:
            reference.parse(key, default_tag=False)
        except UsageError as e:
            raise UsageError(f"{what}: {e.message}") from None
        if not isinstance(value, str):
            raise UsageError(f"{what}: the value must be a string \"registry/repository\"")
        if value == "":
            out[key] = (None, path)
            continue
        if reference.short_name(value) is not None:
            raise UsageError(f"{what}: {value!r} must name a registry and a repository")
        try:
            target = reference.parse(value, default_tag=False)
        except UsageError as e:
            raise UsageError(f"{what}: {e.message}") from None
        if target.tag or target.digest:
            raise UsageError(f"{what}: {value!r} must not contain a tag or digest")
        out[key] = (target.name, path)
    return out


def _search(path: str, value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{path}: unqualified-search-registries must be a list of \"host[:port]\" strings")
    out = []
    for v in value:
        host = v.rstrip("/")
        if not reference.valid_host(host):
            raise UsageError(f"{path}: unqualified-search-registries: {v!r} is not a host[:port]")
        out.append(host)
    return out


def settings() -> Settings:
    s = Settings()
    for path in mirrors.conf_files():
        doc = mirrors.read_conf(path)
        s.aliases.update(_aliases(path, doc.get("aliases")))
        if "unqualified-search-registries" in doc:
            s.search, s.search_origin = _search(path, doc["unqualified-search-registries"]), path
        mode = doc.get("short-name-mode")
        if mode is not None:
            if not isinstance(mode, str) or mode not in MODES + ("",):
                raise UsageError(f"{path}: short-name-mode {mode!r}: expected enforcing, permissive or disabled")
            if mode:
                s.mode, s.mode_origin = mode, path
    cache = alias_cache_path()
    s.cache = _aliases(cache, mirrors.read_toml(cache, "short-name-aliases.conf").get("aliases"))
    return s


def resolve(name: str) -> Resolved:
    """The references a pull of name tries, first to last."""
    short = reference.short_name(name)
    if short is None:
        return Resolved([reference.parse(name)], "qualified")
    asked = reference.parse(name, default_tag=False)  # the grammar, and the tag or digest as written
    suffix = (f":{asked.tag}" if asked.tag else "") + (f"@{asked.digest}" if asked.digest else "")
    s = settings()
    # The cache wins, even where it erases an alias (containers/image reads it first).
    hit = s.cache[short] if short in s.cache else s.aliases.get(short)
    if hit is not None and hit[0] is not None:
        return Resolved([reference.parse(hit[0] + suffix)], "alias", hit[1], short)
    if s.search is None:
        return Resolved([reference.parse(name)], "docker-hub", None, short)
    if not s.search:
        raise UsageError(f"short name {short!r} has no alias, and unqualified-search-registries in "
                         f"{s.search_origin} is empty: give HOST/REPO[:TAG]")
    cands: list[Reference] = []
    for reg in s.search:
        r = reference.parse(f"{reg}/{name}")
        if r not in cands:
            cands.append(r)
    if len(cands) > 1 and s.mode == "enforcing":
        raise UsageError(f"short name {short!r} is ambiguous: short-name-mode is enforcing ({s.mode_origin}) and "
                         f"unqualified-search-registries ({s.search_origin}) lists {', '.join(s.search)}; "
                         "layerdb does not prompt: give HOST/REPO[:TAG] or add an [aliases] entry")
    return Resolved(cands, "search", s.search_origin, short)
