"""Image references as docker writes them: [HOST[:PORT]/]REPO[:TAG|@sha256:HEX].

A name without a host is Docker Hub's (`alpine` is docker.io/library/alpine:latest),
whose API is served by registry-1.docker.io and whose credentials docker files
under https://index.docker.io/v1/.  The grammar is distribution's
reference/regexp.go: path components are lowercase, a host is the first
component when it has a '.' or a ':' or is 'localhost' (or an IPv6 literal).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_CRED_KEY = "https://index.docker.io/v1/"
_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HOST = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)"
    r"(?::[0-9]+)?$"
)
MAX_NAME = 255


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port] as written ('docker.io' for Docker Hub)
    repository: str  # 'library/alpine'
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """The host[:port] that serves the API."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def with_tag(self) -> str:
        """NAME:TAG (or NAME@DIGEST when there is no tag): how a pulled image is named."""
        if self.tag:
            return f"{self.name}:{self.tag}"
        if self.digest:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:latest"

    def __str__(self) -> str:
        s = self.name
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + self.digest
        return s


def is_hub(host: str) -> bool:
    return host in _HUB_ALIASES


def valid_host(s: str) -> bool:
    """HOST[:PORT] (an IPv6 literal in brackets), as a registry is named."""
    return bool(_HOST.match(s))


def _is_host(first: str) -> bool:
    return "." in first or ":" in first or first == "localhost" or first.startswith("[")


def short_name(ref: str) -> str | None:
    """The name as written, without tag or digest, when ref has no registry part
    (`alpine:3` -> 'alpine', `library/alpine` -> 'library/alpine'); None when it has one."""
    s = ref.partition("@")[0]
    slash, colon = s.rfind("/"), s.rfind(":")
    if colon > slash:
        s = s[:colon]
    host, sep, _ = s.partition("/")
    return None if sep and _is_host(host) else s


def parse(ref: str, default_tag: bool = True) -> Reference:
    """A reference as docker parses it; `default_tag` adds ':latest' when there is neither tag nor digest."""
    s = ref.strip()
    if not s or s != ref or any(c.isspace() for c in s):
        raise UsageError(f"invalid image reference {ref!r}")
    if "://" in s:
        raise UsageError(f"invalid image reference {ref!r}: give HOST/REPO[:TAG], without a scheme")
    digest = None
    if "@" in s:
        s, _, digest = s.partition("@")
        if not _DIGEST.match(digest):
            raise UsageError(f"invalid image reference {ref!r}: digest must be sha256: and 64 lowercase hex digits")
    tag = None
    slash = s.rfind("/")
    colon = s.rfind(":")
    if colon > slash:
        s, tag = s[:colon], s[colon + 1:]
        if not _TAG.match(tag):
            raise UsageError(f"invalid image reference {ref!r}: bad tag {tag!r}")
    host, sep, rest = s.partition("/")
    if sep and _is_host(host):
        if not _HOST.match(host):
            raise UsageError(f"invalid image reference {ref!r}: bad host {host!r}")
        if is_hub(host):
            host = DOCKER_HUB
        repo = rest
    else:
        host, repo = DOCKER_HUB, s
    if host == DOCKER_HUB and "/" not in repo:
        repo = "library/" + repo
    if not repo or not all(_COMPONENT.match(c) for c in repo.split("/")):
        raise UsageError(
            f"invalid image reference {ref!r}: repository names are lowercase letters, digits and separators (._-)"
        )
    if len(host) + 1 + len(repo) > MAX_NAME:
        raise UsageError(f"invalid image reference {ref!r}: name longer than {MAX_NAME} characters")
    if tag is None and digest is None and default_tag:
        tag = "latest"
    return Reference(host, repo, tag, digest)


def parse_registry(name: str) -> str:
    """A registry as `login`/`logout` take it: HOST[:PORT], optionally with a scheme or a path."""
    s = name.strip()
    for scheme in ("https://", "http://"):
        if s.startswith(scheme):
            s = s[len(scheme):]
    s = s.split("/", 1)[0]
    if not s or not _HOST.match(s):
        raise UsageError(f"invalid registry {name!r}: expected HOST[:PORT]")
    return DOCKER_HUB if is_hub(s) else s


def parse_login(name: str) -> tuple[str, str]:
    """What podman's login and logout take: (auth file key, registry host).

    A URL (`https://HOST/v2/`) is its HOST, the rest dropped, as docker does.
    Otherwise HOST[:PORT] or, as containers-auth.json(5) allows,
    HOST[:PORT]/NAMESPACE[/REPO] for credentials of that namespace only: kept as
    written (not `library/`-normalised), refused with a tag or digest, and the
    first component must be a registry host."""
    s = name.strip()
    if s.startswith(("https://", "http://")):
        return (host := parse_registry(s)), host
    first, sep, rest = s.partition("/")
    host = parse_registry(first)
    if not sep:
        return host, host
    if not _is_host(first):
        raise UsageError(f"invalid registry {name!r}: expected HOST[:PORT][/NAMESPACE], with a registry host first")
    r = parse(s, default_tag=False)
    if r.tag or r.digest:
        raise UsageError(f"invalid registry {name!r}: a login key must not contain a tag or digest")
    return f"{host}/{rest.rstrip('/')}", host
