"""RUN --mount: the flag's text -> a checked MountSpec (no I/O).

The keys are the Dockerfile reference's (BuildKit), as buildah 1.28 reads
them: `type` (bind, the default; cache; tmpfs; secret), `target` (also `dst`,
`destination`), `source`/`src`, `from`, `ro`/`readonly`, `rw`/`readwrite`,
`id`, `sharing`, `mode`, `uid`, `gid`, `size`, `required`.  A relative
target is below WORKDIR.
"""

from __future__ import annotations

import csv
import posixpath
import re
from dataclasses import dataclass

from ..errors import DockerfileError

TYPES = ("bind", "cache", "tmpfs", "secret")
KEYS = {"type", "target", "dst", "destination", "source", "src", "from", "ro", "readonly", "rw", "readwrite", "id",
        "sharing", "mode", "uid", "gid", "size", "required"}
ALLOWED = {
    "bind": {"target", "source", "from", "ro", "rw"},
    "cache": {"target", "source", "from", "ro", "rw", "id", "sharing", "mode", "uid", "gid"},
    "tmpfs": {"target", "size"},
    "secret": {"target", "id", "mode", "uid", "gid", "required"},
}
SIZE = re.compile(r"(\d+)([kmg]?)b?", re.I)


@dataclass
class MountSpec:
    type: str
    target: str  # absolute, normalised
    source: str = ""  # bind/cache: the path in the context or in `from`
    from_: str | None = None
    readonly: bool = True
    id: str = ""
    sharing: str = "shared"
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    size: int = 0  # tmpfs bytes; 0: the kernel's default
    required: bool = False

    def key(self) -> dict:
        """What of the mount joins the step's cache key (a cache's or secret's contents never do)."""
        return {k: v for k, v in vars(self).items() if k not in ("sharing",)}


def _bool(key: str, value: str | None) -> bool:
    if value is None or value.lower() in ("true", "1", ""):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise DockerfileError(f"RUN --mount: {key}={value}: expected true or false")


def parse(text: str, workdir: str) -> MountSpec:
    try:
        fields = next(csv.reader([text]))
    except (csv.Error, StopIteration):
        raise DockerfileError(f"RUN --mount={text}: cannot read it (a comma-separated list of key=value)") from None
    kv: dict[str, str | None] = {}
    for f in fields:
        k, eq, v = f.partition("=")
        k = k.strip().lower()
        k = {"dst": "target", "destination": "target", "src": "source", "readonly": "ro", "readwrite": "rw"}.get(k, k)
        if k not in KEYS:
            raise DockerfileError(f"RUN --mount: unknown key {k!r} (in --mount={text})")
        kv[k] = v if eq else None
    kind = (kv.pop("type", None) or "bind").lower()
    if kind not in TYPES:
        raise DockerfileError(f"RUN --mount: type={kind} is not supported (use bind, cache, tmpfs or secret)")
    extra = set(kv) - ALLOWED[kind]
    if extra:
        raise DockerfileError(f"RUN --mount: type={kind} takes no {', '.join(sorted(extra))}")
    target = kv.get("target") or ""
    m = MountSpec(kind, "")
    if kind == "secret":
        m.id = kv.get("id") or (posixpath.basename(target) if target else "")
        if not m.id:
            raise DockerfileError("RUN --mount=type=secret: needs an id (or a target to name it)")
        target = target or "/run/secrets/" + m.id
        m.mode = 0o400
        m.required = _bool("required", kv.get("required")) if "required" in kv else False
    if not target:
        raise DockerfileError(f"RUN --mount: type={kind} needs a target")
    m.target = posixpath.normpath(posixpath.join(workdir or "/", target))
    if m.target == "/":
        raise DockerfileError("RUN --mount: the target cannot be /")
    m.source = kv.get("source") or ""
    m.from_ = kv.get("from") or None
    if kind in ("bind", "cache"):
        if "ro" in kv and "rw" in kv:
            raise DockerfileError("RUN --mount: ro and rw exclude each other")
        default_ro = kind == "bind"
        m.readonly = _bool("ro", kv["ro"]) if "ro" in kv else (not _bool("rw", kv["rw"]) if "rw" in kv else default_ro)
    else:
        m.readonly = kind == "secret"
    if kind == "cache":
        m.id = kv.get("id") or m.target
        m.sharing = (kv.get("sharing") or "shared").lower()
        if m.sharing not in ("shared", "private", "locked"):
            raise DockerfileError(f"RUN --mount: sharing={m.sharing}: use shared, private or locked")
        if m.source and not m.from_:
            raise DockerfileError("RUN --mount=type=cache: source= names a path in from=; give from= too")
        m.mode = 0o755
    for k in ("mode", "uid", "gid"):
        v = kv.get(k)
        if v is None:
            continue
        try:
            n = int(v, 8) if k == "mode" else int(v)
        except ValueError:
            raise DockerfileError(f"RUN --mount: {k}={v}: not a number") from None
        if n < 0 or (k == "mode" and n > 0o7777):
            raise DockerfileError(f"RUN --mount: {k}={v}: out of range")
        setattr(m, k, n)
    if kind == "tmpfs" and kv.get("size"):
        sm = SIZE.fullmatch(kv["size"] or "")
        if not sm:
            raise DockerfileError(f"RUN --mount: size={kv['size']}: not a size (bytes, or with k, m or g)")
        m.size = int(sm.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[sm.group(2).lower()]
    return m
