"""push: an image from the store to a registry; blobs the registry has are not uploaded.

When every blob of a manifest the image was pulled with is at the destination,
or can be mounted there from a repository of the same registry where it was
seen, that manifest goes out byte for byte: the digest stays, and signatures
and attestations made for it stay valid.  Otherwise the missing layers are
compressed as `save --format oci` does (gzip level 6, mtime 0: the same layer
always gives the same blob), a new manifest is written and both digests are
reported; --preserve-digests refuses instead.  Uploads are POST then one
streamed PUT, with chunked PATCHes when the PUT is refused; every step follows
the latest Location.

An image pulled as part of an index goes back with that index when every entry
of it is stored (pulled with --all-platforms) or already at the destination:
each image by digest, then the index bytes under the tag, so the tag names the
index digest it named where it was pulled from.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable
from urllib.parse import urlencode, urljoin, urlsplit

from .. import refs
from ..content import ContentStore
from ..errors import (DigestMismatch, DigestWouldChange, RegistryAuthError, RegistryError, RegistryProtocolError,
                      UsageError)
from ..log import get_logger
from ..output.save import GZIP_LEVEL, LayerRef, checked_layer, collect
from ..store import Store
from . import manifest as mf, mirrors, records, reference
from .client import Client
from .auth import RegistryOptions

log = get_logger("layerdb.registry")

FORMATS = {"oci": mf.OCI_MANIFEST, "v2s2": mf.DOCKER_MANIFEST}
CONFIG_TYPE = {mf.OCI_MANIFEST: mf.OCI_CONFIG, mf.DOCKER_MANIFEST: mf.DOCKER_CONFIG}
GZIP_TYPE = {mf.OCI_MANIFEST: mf.OCI_LAYER_GZIP, mf.DOCKER_MANIFEST: mf.DOCKER_LAYER_GZIP}
GZIP_TYPES = (mf.OCI_LAYER_GZIP, mf.DOCKER_LAYER_GZIP)
CHUNK = 8 << 20  # PATCH size of the chunked fallback
COPY = 1 << 20

# progress(event, fields): "exists", "mounted", "upload", "uploaded" (fields: digest, size, what).
PushProgress = Callable[[str, dict], None]


@dataclass
class PushResult:
    destination: str
    digest: str
    previous: str | None  # the manifest digest the image had, when it changed
    kept: bool  # the original manifest went out unchanged
    uploaded: int = 0
    mounted: int = 0
    existed: int = 0
    bytes_uploaded: int = 0
    layers: list[dict] = field(default_factory=list)
    images: int = 1  # image manifests pushed (more than one: an index went with them)


def destination(store: Store, image: str, dest: str | None) -> reference.Reference:
    if dest:
        return reference.parse(dest)
    # IMAGE itself names a registry, or its one tag that does.
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return reference.parse(image)
    r = refs.resolve(store, image)
    tags = refs.image_tags(store, r.image_rowid) if r.image_rowid is not None else []
    named = [t for t in tags if "/" in t and ("." in t.split("/")[0] or ":" in t.split("/")[0])]
    if len(named) == 1:
        return reference.parse(named[0])
    raise UsageError(f"push {image}: give a destination (HOST/REPO[:TAG]); the image's tags name "
                     f"{'no registry' if not named else 'several: ' + ', '.join(named)}")


class _Pusher:
    def __init__(self, client: Client, dest: reference.Reference, store: Store, progress: PushProgress | None):
        self.c, self.dest, self.store, self.progress = client, dest, store, progress
        self.repo = dest.repository
        self.scope = f"repository:{self.repo}:pull,push"
        self.present: dict[str, bool] = {}
        self.result: PushResult | None = None
        self.counts = {"uploaded": 0, "mounted": 0, "existed": 0, "bytes": 0}

    def _p(self, event: str, **kw: Any) -> None:
        if self.progress:
            self.progress(event, kw)

    def exists(self, digest: str) -> bool:
        if digest in self.present:
            return self.present[digest]
        r = self.c.request("HEAD", f"/v2/{self.repo}/blobs/{digest}", scopes=[self.scope], ok=(),
                           what=f"blob {digest}")
        r.close()
        if r.status not in (200, 404):
            raise RegistryError(f"{self.c.host}: HEAD blob {digest}: the registry answered {r.status}")
        self.present[digest] = r.status == 200
        return r.status == 200

    def has_manifest(self, digest: str | None, media_type: str | None) -> bool:
        if not isinstance(digest, str):
            return False
        accept = ", ".join(dict.fromkeys([media_type or mf.OCI_MANIFEST, *mf.ACCEPT.split(", ")]))
        r = self.c.request("HEAD", f"/v2/{self.repo}/manifests/{digest}", scopes=[self.scope], ok=(),
                           headers={"Accept": accept}, what=f"manifest {digest}")
        r.close()
        if r.status not in (200, 404):
            raise RegistryError(f"{self.c.host}: HEAD manifest {digest}: the registry answered {r.status}")
        return r.status == 200

    def mount(self, digest: str) -> bool:
        """Cross-repository mount from a repository of this registry where the blob was seen."""
        for src in records.seen_in(self.store, digest, self.dest.registry):
            if src == self.repo:
                continue
            q = urlencode({"mount": digest, "from": src})
            try:
                r = self.c.request("POST", f"/v2/{self.repo}/blobs/uploads/?{q}",
                                   scopes=[self.scope, f"repository:{src}:pull"], headers={"Content-Length": "0"},
                                   ok=(201, 202), what=f"mount of {digest} from {src}")
            except RegistryAuthError:
                continue  # no pull access to the source: try another, or upload
            loc = r.headers.get("Location")
            r.read()
            if r.status == 201:
                self.present[digest] = True
                return True
            if loc:  # 202: an upload session instead of a mount; close it
                try:
                    self.c.request("DELETE", urljoin(self.c.base(), loc), scopes=[self.scope], ok=()).close()
                except RegistryError:
                    pass
        return False

    def available(self, digest: str, size: int, what: str) -> bool:
        if self.exists(digest):
            self.counts["existed"] += 1
            self._p("exists", digest=digest, size=size, what=what)
            return True
        if self.mount(digest):
            self.counts["mounted"] += 1
            self._p("mounted", digest=digest, size=size, what=what)
            return True
        return False

    def _start(self) -> str:
        r = self.c.request("POST", f"/v2/{self.repo}/blobs/uploads/", scopes=[self.scope],
                           headers={"Content-Length": "0"}, ok=(202,), what="upload start")
        loc = r.headers.get("Location")
        r.read()
        if not loc:
            raise RegistryProtocolError(f"{self.c.host}: upload start without a Location")
        return urljoin(self.c.base(), loc)

    @staticmethod
    def _with_digest(url: str, digest: str) -> str:
        return url + ("&" if urlsplit(url).query else "?") + urlencode({"digest": digest})

    def upload(self, digest: str, size: int, body: Callable[[], BinaryIO | bytes], what: str) -> None:
        """POST, then one streamed PUT; chunked PATCHes when the PUT is refused."""
        if self.available(digest, size, what):
            return
        self._p("upload", digest=digest, size=size, what=what)
        url = self._start()
        r = self.c.request("PUT", self._with_digest(url, digest), scopes=[self.scope],
                           headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                           body=body, ok=(), what=f"upload of {digest}")
        status = r.status
        if status in (401, 403):
            r.close()
            raise RegistryAuthError(f"{self.c.host}: {self.c.who()} may not upload to {self.repo} ({status})")
        if status != 201:
            detail = r.read(1 << 16)
            log.info("put refused, chunked upload", blob=digest, status=status, detail=detail[:200])
            self._chunked(digest, size, body)
        else:
            r.read()
        self._check_stored(digest)
        self.present[digest] = True
        self.counts["uploaded"] += 1
        self.counts["bytes"] += size
        self._p("uploaded", digest=digest, size=size, what=what)

    def _chunked(self, digest: str, size: int, body: Callable[[], BinaryIO | bytes]) -> None:
        url = self._start()
        src = body()
        f: Any = _BytesReader(src) if isinstance(src, bytes) else src
        off = 0
        while off < size:
            data = f.read(min(CHUNK, size - off))
            if not data:
                raise RegistryError(f"upload of {digest}: the source ended at {off} of {size} bytes")
            r = self.c.request("PATCH", url, scopes=[self.scope], body=data, ok=(202,),
                               headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data)),
                                        "Content-Range": f"{off}-{off + len(data) - 1}"},
                               what=f"chunked upload of {digest}")
            loc = r.headers.get("Location")
            r.read()
            if loc:
                url = urljoin(url, loc)
            off += len(data)
        r = self.c.request("PUT", self._with_digest(url, digest), scopes=[self.scope],
                           headers={"Content-Length": "0"}, body=b"", ok=(201,), what=f"upload of {digest}")
        r.read()

    def _check_stored(self, digest: str) -> None:
        self.present.pop(digest, None)
        if not self.exists(digest):
            raise RegistryError(f"{self.c.host}: upload of {digest} was accepted but the blob is not there")

    def put_manifest(self, data: bytes, media_type: str, tag: str) -> str:
        digest = mf.digest_of(data)
        r = self.c.request("PUT", f"/v2/{self.repo}/manifests/{tag}", scopes=[self.scope],
                           headers={"Content-Type": media_type, "Content-Length": str(len(data))}, body=data,
                           ok=(201,), what=f"manifest {self.dest}")
        said = r.headers.get("Docker-Content-Digest")
        r.read()
        if said and said != digest:
            raise DigestMismatch(f"manifest {self.dest}", digest, said)
        return digest


class _BytesReader:
    def __init__(self, b: bytes):
        self.b, self.pos = b, 0

    def read(self, n: int) -> bytes:
        out = self.b[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def _compress(store: Store, content: ContentStore, layer: LayerRef) -> tuple[Any, str, int]:
    """The layer as `save --format oci` compresses it, in an anonymous temporary file."""
    tmp = tempfile.TemporaryFile(prefix="layerdb-push-")
    z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    h = hashlib.sha256()
    size = 0
    for piece in checked_layer(store.conn, content, layer):
        b = z.compress(piece)
        if b:
            h.update(b)
            tmp.write(b)
            size += len(b)
    b = z.flush()
    h.update(b)
    tmp.write(b)
    size += len(b)
    tmp.flush()
    return tmp, "sha256:" + h.hexdigest(), size


def _file_body(tmp: Any) -> Callable[[], BinaryIO]:
    def body() -> BinaryIO:
        tmp.seek(0)
        return tmp
    return body


INDEX_FOR = {mf.OCI_MANIFEST: mf.OCI_INDEX, mf.DOCKER_MANIFEST: mf.DOCKER_LIST}


@dataclass
class _Sent:
    """One image manifest that went out."""

    manifest: mf.Fetched
    previous: str | None  # the stored manifest digest it replaces, when the digest changed
    kept: bool
    image_rowid: int
    img: Any  # output.save.SaveImage


def push(store: Store, content: ContentStore, image: str, dest: str | None, opts: RegistryOptions, *,
         fmt: str | None = None, preserve_digests: bool = False, progress: PushProgress | None = None) -> PushResult:
    """Push IMAGE; when it was pulled as part of an index (--all-platforms) whose
    every entry is stored or already at the destination, push that index with it,
    so the tag names the same index digest as where it came from."""
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose oci or v2s2")
    with store.read():
        ref = destination(store, image, dest)
        img = collect(store, [image])[0]
        image_rowid = store.scalar("SELECT id FROM image WHERE digest = ?", (img.digest,))
        indexes = records.indexes_of(store, image_rowid)
    if ref.digest is not None:
        raise UsageError(f"push {image}: the destination {ref} names a digest; give a tag")
    # registries.conf may rewrite the location or mark it insecure; mirrors are for pulls only.
    (where,) = mirrors.sources(ref, pull=False)
    ref = where.ref
    client = opts.client(ref.registry, ref.repository, ref.api_host, insecure=where.insecure)
    p = _Pusher(client, ref, store, progress)
    tag = ref.tag or "latest"
    want = FORMATS[fmt] if fmt else None
    try:
        with store.read():
            ix = _complete_index(p, indexes, want)
            if ix is None:
                one = _push_image(p, store, content, img, image_rowid, want, tag, preserve_digests, image)
                sent, index = [one], None
                res = _result(p, ref, one.manifest.digest, one.previous, one.kept)
            else:
                sent, index, res = _push_index(p, store, content, ix, want, tag, preserve_digests, image)
        with store.write():
            for one in sent:
                records.remember(store, ref.registry, ref.repository, one.manifest, index, one.image_rowid,
                                 one.manifest.doc["layers"], [lr.diff_id for lr in one.img.layers], one.img.digest)
    finally:
        client.close()
    return res


def _push_image(p: _Pusher, store: Store, content: ContentStore, img, image_rowid: int, want: str | None,
                reference_: str | None, preserve_digests: bool, name: str, prefer: str | None = None) -> _Sent:
    """One image manifest, under reference_ (a tag; None: its digest, as an index entry)."""
    origs = records.originals(store, image_rowid)
    cands = sorted((o for o in origs if want is None or o.media_type == want), key=lambda o: o.digest != prefer)
    # 1. The original manifest, unchanged, when every blob is there or mountable.
    for o in cands:
        if len(o.layers) == len(img.layers) and all(
                p.available(d["digest"], d["size"], f"layer {i + 1}") for i, d in enumerate(o.layers)):
            _config(p, img, o.media_type)
            p.put_manifest(o.data, o.media_type, reference_ or o.digest)
            return _Sent(mf.Fetched(o.data, o.media_type, o.digest, json.loads(o.data)), None, True, image_rowid, img)
    previous = cands[0].digest if cands else (origs[0].digest if origs else None)
    if preserve_digests and previous is not None:
        why = "its format changes" if not cands else "a blob is neither at the destination nor mountable"
        raise DigestWouldChange(f"push {name} to {p.dest}: {why}, so the manifest digest {previous} would change"
                                " (--preserve-digests)")
    mt = want or (origs[0].media_type if origs else mf.OCI_MANIFEST)
    layers = _layers(p, store, content, img, mt)
    cdesc = _config(p, img, mt)
    doc = {"schemaVersion": 2, "mediaType": mt, "config": cdesc, "layers": layers}
    data = json.dumps(doc, separators=(",", ":")).encode()
    digest = p.put_manifest(data, mt, reference_ or mf.digest_of(data))
    return _Sent(mf.Fetched(data, mt, digest, doc), previous if previous != digest else None, previous == digest,
                 image_rowid, img)


def _complete_index(p: _Pusher, indexes: list[records.StoredIndex], want: str | None) -> records.StoredIndex | None:
    """The newest stored index of the image whose every entry is stored or at the destination."""
    for ix in indexes:
        if want is not None and ix.media_type != INDEX_FOR[want]:
            continue
        missing = [d.get("digest") for d in ix.entries if d.get("digest") not in ix.children
                   and not p.has_manifest(d.get("digest"), d.get("mediaType"))]
        if not missing:
            return ix
        log.info("index not pushed", index=ix.digest, reason="entries neither stored nor at the destination",
                 missing=missing)
    return None


def _push_index(p: _Pusher, store: Store, content: ContentStore, ix: records.StoredIndex, want: str | None, tag: str,
                preserve_digests: bool, name: str) -> tuple[list[_Sent], mf.Fetched, PushResult]:
    """Each stored image of the index by digest, then the index under the tag: its
    original bytes when no entry changed, else a copy naming the new manifests."""
    sent: list[_Sent] = []
    changed: dict[str, _Sent] = {}
    for d in ix.entries:
        rowid = ix.children.get(d["digest"])
        if rowid is None:
            continue  # at the destination already
        img = collect(store, [store.scalar("SELECT digest FROM image WHERE id = ?", (rowid,))])[0]
        one = _push_image(p, store, content, img, rowid, want, None, preserve_digests, name, prefer=d["digest"])
        sent.append(one)
        if one.manifest.digest != d["digest"]:
            changed[d["digest"]] = one
    if not changed:
        digest = p.put_manifest(ix.data, ix.media_type, tag)
        res = _result(p, p.dest, digest, None, True)
        index = mf.Fetched(ix.data, ix.media_type, ix.digest, ix.doc)
    else:
        mt = INDEX_FOR[want] if want else ix.media_type
        doc = json.loads(ix.data)
        doc["mediaType"] = mt
        for d in doc["manifests"]:
            one = changed.get(d.get("digest"))
            if one is not None:
                d.update(mediaType=one.manifest.media_type, digest=one.manifest.digest, size=len(one.manifest.data))
        data = json.dumps(doc, separators=(",", ":")).encode()
        digest = p.put_manifest(data, mt, tag)
        res = _result(p, p.dest, digest, ix.digest, False)
        index = mf.Fetched(data, mt, digest, doc)
    res.images = len(sent)
    return sent, index, res


def _result(p: _Pusher, ref: reference.Reference, digest: str, previous: str | None, kept: bool) -> PushResult:
    return PushResult(str(ref), digest, previous, kept, p.counts["uploaded"], p.counts["mounted"],
                      p.counts["existed"], p.counts["bytes"])


def _config(p: _Pusher, img, mt: str) -> dict:
    p.upload(img.digest, len(img.config), lambda: img.config, "config")
    return {"mediaType": CONFIG_TYPE[mt], "digest": img.digest, "size": len(img.config)}


def _layers(p: _Pusher, store: Store, content: ContentStore, img, mt: str) -> list[dict]:
    """A descriptor per layer: a known gzip blob of it that the registry has or can
    mount (relabelled for the format), else the layer compressed and uploaded."""
    out = []
    done: dict[str, dict] = {}
    for i, lr in enumerate(img.layers):
        what = f"layer {i + 1}"
        if lr.diff_id in done:
            out.append(dict(done[lr.diff_id]))
            continue
        desc = None
        for known in records.blob_for_diff(store, lr.diff_id, GZIP_TYPES):
            if p.available(known["digest"], known["size"], what):
                desc = {"mediaType": GZIP_TYPE[mt], "digest": known["digest"], "size": known["size"]}
                break
        if desc is None:
            tmp, digest, size = _compress(store, content, lr)
            try:
                p.upload(digest, size, _file_body(tmp), what)
            finally:
                tmp.close()
            desc = {"mediaType": GZIP_TYPE[mt], "digest": digest, "size": size}
        done[lr.diff_id] = desc
        out.append(desc)
    return out
