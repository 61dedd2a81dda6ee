"""registries.conf (containers-registries.conf(5), version 2): mirrors, rewritten
locations, insecure and blocked registries, as podman and skopeo read them.

The deprecated version 1 format ([registries.search], [registries.insecure],
[registries.block], each `registries = [...]`) is read as containers/image
converts it (sysregistriesv2 ConvertToV2): the search list becomes the
unqualified-search-registries, each insecure or blocked one a [[registry]]
whose prefix and location are that name.  As there, it may only be the main
file: a drop-in in it, or a file that mixes it with version 2 keys, is an error.

The file is $CONTAINERS_REGISTRIES_CONF, else ~/.config/containers/registries.conf
when it exists, else /etc/containers/registries.conf; then the drop-ins
FILE.d/*.conf in name order (for the system file, then also the user's
~/.config/containers/registries.conf.d, as containers-registries.conf.d(5)
says), whose [[registry]] tables replace earlier ones of the same prefix.
With $CONTAINERS_REGISTRIES_CONF only that file's own FILE.d is read, so a
test or a script gets exactly the files it names.  A reference matches the [[registry]] table with the longest
prefix (the prefix is its location unless given; `*.example.com` matches
subdomains).  A pull tries each mirror in order, then the location; the first
that serves the manifest serves the whole image.  A mirror with
`pull-from-mirror = "digest-only"` (or its registry's `mirror-by-digest-only`)
is skipped for a pull by tag, since a mirror's tags may lag.  Push goes to the
location only.  Short names ([aliases], unqualified-search-registries,
short-name-mode) are shortnames.py's, from the same files.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from ..errors import UsageError
from . import reference
from .reference import Reference, parse

SYSTEM = "/etc/containers/registries.conf"


@dataclass(frozen=True)
class Mirror:
    location: str
    insecure: bool = False
    pull_from: str = "all"  # all, digest-only, tag-only


@dataclass(frozen=True)
class Entry:
    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirrors: tuple[Mirror, ...] = ()


@dataclass(frozen=True)
class Source:
    """Where to ask for an image: the rewritten reference and whether it may be plain HTTP."""

    ref: Reference
    insecure: bool
    mirror: bool


MAX_CONF = 4 << 20  # bytes: registries.conf files are a few KiB; /dev/zero is not one


def _user_conf_dir() -> str:
    cfg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(cfg, "containers")


def config_path() -> str | None:
    env = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    if env:
        return env
    user = os.path.join(_user_conf_dir(), "registries.conf")
    if os.path.exists(user):
        return user
    return SYSTEM if os.path.exists(SYSTEM) else None


def _dropins(d: str) -> list[str]:
    # Only *.conf files: other files and directories are ignored, as in containers/image.
    return [f for f in sorted(glob.glob(os.path.join(glob.escape(d), "*.conf"))) if os.path.isfile(f)]


def conf_files() -> list[str]:
    """Every registries.conf file to read, in the order later ones override earlier ones."""
    env = os.environ.get("CONTAINERS_REGISTRIES_CONF")
    if env:
        return [env, *_dropins(env + ".d")]
    user = os.path.join(_user_conf_dir(), "registries.conf")
    if os.path.exists(user):
        return [user, *_dropins(user + ".d")]
    out = [SYSTEM] if os.path.exists(SYSTEM) else []
    return out + _dropins(SYSTEM + ".d") + _dropins(user + ".d")


def read_toml(path: str, what: str = "registries.conf") -> dict:
    """A TOML file as a dict ({} when it does not exist); anything wrong is one UsageError naming it."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise UsageError(f"{path}: reading {what} needs Python 3.11 or the tomli package") from None
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONF + 1)
        if len(data) > MAX_CONF:
            raise UsageError(f"{path}: cannot read it (more than {MAX_CONF >> 20} MiB, not a {what} file)")
        text = data.decode("utf-8")
        # A file nested thousands deep ends tomllib in a RecursionError, caught
        # below.  The collector must not run a finalizer at that depth: its error
        # would be printed (and pytest's hook fail) past the recursion limit.
        import gc

        was = gc.isenabled()
        gc.disable()
        try:
            return tomllib.loads(text)
        finally:
            if was:
                gc.enable()
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise UsageError(f"{path}: cannot read it (not UTF-8 text)") from None
    except RecursionError:
        raise UsageError(f"{path}: cannot read it (nested too deeply)") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"{path}: cannot read it ({e.__class__.__name__}: {e})") from None


_toml = read_toml

# What makes a file version 2 (containers/image's V2RegistriesConf fields) or version 1.
V2_KEYS = ("registry", "unqualified-search-registries", "credential-helpers", "short-name-mode",
           "additional-layer-store-auth-helper", "aliases")
V1_LISTS = ("search", "insecure", "block")


def read_conf(path: str) -> dict:
    """One registries.conf file (main or drop-in) as a version 2 document; a
    version 1 main file is converted.  Like containers/image, a v1 list set to []
    still makes the file v1, and a v2 key set to [] still makes it v2."""
    doc = read_toml(path)
    v1 = _v1_lists(path, doc)
    if v1 is None:
        return doc
    if path != config_path():
        raise UsageError(f"{path}: a drop-in must be in the version 2 format, not [registries.search], "
                         "[registries.insecure] or [registries.block] (version 1)")
    mixed = [k for k in V2_KEYS if k in doc]
    if mixed:
        raise UsageError(f"{path}: mixes the version 1 format ([registries.{'/'.join(v1)}]) with version 2 "
                         f"keys ({', '.join(mixed)}): mixing sysregistry v1/v2 is not supported")
    regs: dict[str, dict] = {}  # location -> [[registry]], in the order first named
    for kind, flag in (("block", "blocked"), ("insecure", "insecure")):
        for name in v1.get(kind, []):
            loc = name.rstrip("/")
            if not loc or loc.startswith(("http://", "https://")):
                raise UsageError(f"{path}: [registries.{kind}] {name!r}: expected a registry, without a URI scheme")
            regs.setdefault(loc, {"prefix": loc, "location": loc})[flag] = True
    out: dict = {"registry": list(regs.values())}
    if "search" in v1:
        for name in v1["search"]:
            if not reference.valid_host(name.rstrip("/")):
                raise UsageError(f"{path}: [registries.search] {name!r} is not a host[:port]")
        out["unqualified-search-registries"] = v1["search"]
    return out


def _v1_lists(path: str, doc: dict) -> dict[str, list[str]] | None:
    """The version 1 lists a file sets ({} never: None when it sets none)."""
    top = doc.get("registries")
    if top is None:
        return None
    if not isinstance(top, dict):
        raise UsageError(f"{path}: registries must be the [registries.search], [registries.insecure] and "
                         "[registries.block] tables of the version 1 format")
    out: dict[str, list[str]] = {}
    for kind in V1_LISTS:
        t = top.get(kind)
        if t is None:
            continue
        v = t.get("registries") if isinstance(t, dict) else None
        if not isinstance(t, dict) or ("registries" in t and not (
                isinstance(v, list) and all(isinstance(x, str) for x in v))):
            raise UsageError(f"{path}: [registries.{kind}] must hold registries = [\"host[:port]\", ...]")
        if "registries" in t:
            out[kind] = v
    return out or None


def _bool(v: object, path: str, what: str) -> bool:
    if v is None:
        return False
    if not isinstance(v, bool):
        raise UsageError(f"{path}: {what} must be true or false")
    return v


def _host_part(s: str) -> str:
    return s.split("/", 1)[0]


def _entries(path: str, doc: dict) -> list[Entry]:
    regs = doc.get("registry", [])
    if not isinstance(regs, list):
        raise UsageError(f"{path}: [[registry]] must be a list of tables")
    out = []
    for r in regs:
        if not isinstance(r, dict):
            raise UsageError(f"{path}: [[registry]] must be a list of tables")
        location = r.get("location") or ""
        prefix = r.get("prefix") or location
        if not isinstance(location, str) or not isinstance(prefix, str) or not prefix:
            raise UsageError(f"{path}: a [[registry]] needs a location or a prefix")
        if not location and not prefix.startswith("*."):
            location = prefix
        by_digest = _bool(r.get("mirror-by-digest-only"), path, "mirror-by-digest-only")
        mirrors = []
        for m in r.get("mirror", []) or []:
            if not isinstance(m, dict) or not isinstance(m.get("location"), str) or not m["location"]:
                raise UsageError(f"{path}: a [[registry.mirror]] of {prefix} needs a location")
            pull_from = m.get("pull-from-mirror") or ("digest-only" if by_digest else "all")
            if pull_from not in ("all", "digest-only", "tag-only"):
                raise UsageError(f"{path}: pull-from-mirror {pull_from!r}: expected all, digest-only or tag-only")
            mirrors.append(Mirror(m["location"].rstrip("/"), _bool(m.get("insecure"), path, "insecure"), pull_from))
        out.append(Entry(prefix.rstrip("/"), location.rstrip("/"), _bool(r.get("insecure"), path, "insecure"),
                         _bool(r.get("blocked"), path, "blocked"), tuple(mirrors)))
    return out


def load() -> list[Entry]:
    by_prefix: dict[str, Entry] = {}
    for f in conf_files():
        for e in _entries(f, read_conf(f)):
            by_prefix[e.prefix] = e
    return list(by_prefix.values())


def _matches(prefix: str, name: str) -> int:
    """How long a match prefix is for the name host/repo (0: none)."""
    if prefix.startswith("*."):
        host = _host_part(name)
        return len(prefix) if host.endswith(prefix[1:]) else 0
    if name == prefix or (name.startswith(prefix) and name[len(prefix)] in "/:@"):
        return len(prefix)
    return 0


def match(ref: Reference, entries: list[Entry] | None = None) -> Entry | None:
    return _longest(ref.name, entries)


def for_host(host: str, entries: list[Entry] | None = None) -> Entry | None:
    """The [[registry]] table of a bare HOST[:PORT] (what login checks): a prefix
    with a path is a namespace's, not the host's, as containers/image matches it."""
    return _longest(host, entries)


def _longest(name: str, entries: list[Entry] | None) -> Entry | None:
    """The entry whose prefix matches name longest, as containers/image picks it."""
    best, n = None, 0
    for e in load() if entries is None else entries:
        k = _matches(e.prefix, name)
        if k > n:
            best, n = e, k
    return best


def _rewrite(ref: Reference, prefix: str, location: str) -> Reference:
    if prefix.startswith("*."):
        return ref  # a wildcard entry sets options; its location is the host itself
    out = parse(location + ref.name[len(prefix):], default_tag=False)
    return Reference(out.registry, out.repository, ref.tag, ref.digest)


def sources(ref: Reference, *, pull: bool) -> list[Source]:
    """Where to fetch (pull: mirrors first) or send (push: the location) ref."""
    e = match(ref)
    if e is None:
        return [Source(ref, False, False)]
    if e.blocked:
        raise UsageError(f"{ref.name} is blocked by registries.conf ({config_path()}, prefix {e.prefix})")
    out = []
    if pull:
        for m in e.mirrors:
            if (m.pull_from == "digest-only" and ref.digest is None) or (m.pull_from == "tag-only" and ref.digest):
                continue
            out.append(Source(_rewrite(ref, e.prefix, m.location), m.insecure, True))
    main = _rewrite(ref, e.prefix, e.location) if e.location else ref
    out.append(Source(main, e.insecure, False))
    return out
