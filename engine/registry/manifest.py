"""Manifests and indexes: media types, fetching with the full Accept list, platform choice.

distribution 2.8 answers a tag whose manifest is Docker v2s2 with a converted
schema1 when the Accept list lacks the v2 type, and a 404 for an OCI manifest
when it lacks the OCI types: always send all four.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
from dataclasses import dataclass

from ..errors import DigestMismatch, RegistryProtocolError, UsageError
from .client import Client

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
           "application/vnd.docker.distribution.manifest.v1+prettyjws")
ACCEPT = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST))
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES = (OCI_INDEX, DOCKER_LIST)

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
CONFIGS = (OCI_CONFIG, DOCKER_CONFIG)

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"  # seen in the wild (podman --compression none)
LAYERS = (OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, DOCKER_LAYER_GZIP, DOCKER_LAYER)

MAX_MANIFEST = 4 << 20  # what distribution itself accepts on PUT
MAX_CONFIG = 16 << 20
MAX_DEPTH = 2  # an index of indexes is as deep as images go in practice


@dataclass
class Fetched:
    data: bytes
    media_type: str
    digest: str
    doc: dict


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fetch(client: Client, repo: str, reference: str, what: str | None = None) -> Fetched:
    """GET a manifest or index by tag or digest, bounded and verified."""
    if what is None:
        what = f"{repo}@{reference}" if reference.startswith("sha256:") else f"{repo}:{reference}"
    r = client.request("GET", f"/v2/{repo}/manifests/{reference}", scopes=[f"repository:{repo}:pull"],
                       headers={"Accept": ACCEPT}, stream=True, what=f"manifest {what}")
    length = r.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > MAX_MANIFEST:
        r.close()
        raise RegistryProtocolError(f"manifest {what}: {int(length)} bytes, more than the {MAX_MANIFEST >> 20} MiB limit")
    try:
        data = r.read(MAX_MANIFEST)
    except RegistryProtocolError:
        raise RegistryProtocolError(f"manifest {what}: more than the {MAX_MANIFEST >> 20} MiB limit") from None
    ctype = (r.headers.get("Content-Type") or "").split(";")[0].strip()
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise RegistryProtocolError(f"manifest {what}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise RegistryProtocolError(f"manifest {what}: not a JSON object")
    mt = doc.get("mediaType") if isinstance(doc.get("mediaType"), str) else ctype
    if mt in SCHEMA1 or ctype in SCHEMA1 or doc.get("schemaVersion") == 1:
        raise RegistryProtocolError(
            f"manifest {what}: Docker schema 1, which layerdb does not pull (deprecated since 2017;"
            " push the image again with a current tool)")
    # (A schema 1 Docker-Content-Digest covers the payload without its signatures: checked after.)
    got = digest_of(data)
    if reference.startswith("sha256:"):
        if got != reference:
            raise DigestMismatch(f"manifest {what}", reference, got)
    else:
        said = r.headers.get("Docker-Content-Digest")
        if said and said.startswith("sha256:") and said != got:
            raise DigestMismatch(f"manifest {what}", said, got)
    if not mt and isinstance(doc.get("manifests"), list):
        mt = OCI_INDEX
    elif not mt and isinstance(doc.get("config"), dict):
        mt = OCI_MANIFEST
    if mt not in MANIFESTS + INDEXES:
        raise RegistryProtocolError(f"manifest {what}: unsupported media type {mt or ctype or 'none'!r}")
    return Fetched(data, mt, got, doc)


# Platforms -------------------------------------------------------------------

_ARCH = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm",
         "i386": "386", "i686": "386"}


def normalize(os_: str, arch: str, variant: str | None) -> tuple[str, str, str | None]:
    """containerd's platforms.Normalize: arm64 is arm64/v8, arm is arm/v7, amd64 is amd64(/v1)."""
    os_ = (os_ or "").lower()
    arch = _ARCH.get((arch or "").lower(), (arch or "").lower())
    variant = (variant or None) and variant.lower()
    if arch == "arm64" and variant in (None, "8", "v8"):
        variant = "v8"
    elif arch == "arm" and variant is None:
        variant = "v7"
    elif arch == "arm" and variant in ("5", "6", "7", "8"):
        variant = "v" + variant
    elif arch == "amd64" and variant in (None, "v1"):
        variant = None
    return os_, arch, variant


def machine() -> tuple[str, str, str | None]:
    m = _platform.machine().lower()
    if m in ("armv7l", "armv6l", "armv5tel"):
        return normalize("linux", "arm", "v" + m[4])
    return normalize("linux", m, None)


def parse_platform(s: str) -> tuple[str, str, str | None]:
    parts = s.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"--platform {s!r}: expected OS/ARCH[/VARIANT], e.g. linux/amd64")
    return normalize(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def show(p: tuple[str, str, str | None]) -> str:
    return "/".join(x for x in p if x)


def _plat(desc: dict) -> tuple[str, str, str | None] | None:
    p = desc.get("platform")
    if not isinstance(p, dict):
        return None
    return normalize(str(p.get("os") or ""), str(p.get("architecture") or ""), p.get("variant"))


def _is_attestation(desc: dict) -> bool:
    p = desc.get("platform")
    ann = desc.get("annotations") if isinstance(desc.get("annotations"), dict) else {}
    if ann.get("vnd.docker.reference.type") == "attestation-manifest":
        return True
    return isinstance(p, dict) and p.get("os") == "unknown" and p.get("architecture") == "unknown"


def entries(index: dict, what: str) -> list[dict]:
    ms = index.get("manifests")
    if not isinstance(ms, list):
        raise RegistryProtocolError(f"index {what}: no manifests list")
    out = []
    for d in ms:
        if not isinstance(d, dict) or not isinstance(d.get("digest"), str) or not isinstance(d.get("mediaType"), str):
            raise RegistryProtocolError(f"index {what}: an entry without digest or mediaType")
        if not _is_attestation(d):
            out.append(d)
    return out


def select(index: dict, want: tuple[str, str, str | None], what: str) -> dict:
    """The index entry for platform want (an exact normalised match, else the
    same OS and architecture when the user gave no variant)."""
    cands = entries(index, what)
    exact = [d for d in cands if _plat(d) == want]
    if exact:
        return exact[0]
    loose = [d for d in cands if (p := _plat(d)) is not None and p[:2] == want[:2]]
    if loose and want[1] != "arm":
        return loose[0]
    plain = [d for d in cands if _plat(d) is None]
    if len(cands) == 1 and plain:
        return plain[0]
    have = sorted({show(p) for d in cands if (p := _plat(d)) is not None})
    raise RegistryProtocolError(
        f"index {what}: no image for platform {show(want)} (has {', '.join(have) or 'none'}); use --platform")
