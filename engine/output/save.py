"""Writing images back out: `docker save` archives and OCI image layouts.

Both are tar streams written to a stream the caller gives (a temporary file it
renames, or stdout).  Every layer tar is rebuilt from the store byte for byte
(engine/lossless.py) and hashed while it streams: a layer whose sha256 is not
its diff_id raises CorruptStore before the archive is complete, so a caller
that writes atomically never leaves a damaged archive behind.

Layers are keyed by diff_id, so images that share a layer (or an image that
lists one diff twice) store it once in the archive.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

from .. import refs
from ..content import BlobReader, ContentStore
from ..errors import CorruptStore, UsageError
from .lossless import iter_layer_tar
from ..store import Store

DOCKER, OCI = "docker", "oci"
FORMATS = (DOCKER, OCI)

OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

COPY_SIZE = 1 << 20
GZIP_LEVEL = 6  # gzip's own default, what docker and containers/image write


@dataclass
class LayerRef:
    diff_rowid: int
    diff_id: str
    tar_size: int


@dataclass
class SaveImage:
    digest: str  # the image id: sha256 of config
    config: bytes  # exactly as imported
    layers: list[LayerRef]  # bottom first; a diff may repeat
    top_chain_id: str | None
    tags: list[str]

    def summary(self) -> dict:
        return {"id": self.digest, "repo_tags": self.tags, "layers": len(self.layers)}


def collect(store: Store, names: Iterable[str]) -> list[SaveImage]:
    """Resolve image REFs to what an archive needs; each image once, in the order given."""
    out: list[SaveImage] = []
    seen: set[str] = set()
    for name in names:
        r = refs.resolve(store, name)
        row = None if r.image_rowid is None else store.one(
            "SELECT digest, config, top_layer FROM image WHERE id = ?", (r.image_rowid,))
        top_chain = None if row is None or row[2] is None else store.scalar(
            "SELECT chain_id FROM layer WHERE id = ?", (row[2],))
        if row is None or r.chain_id != top_chain:
            raise UsageError(f"{name}: names a layer, not an image; save writes whole images (see `layerdb images`)")
        digest, config, _ = row
        if digest in seen:
            continue
        seen.add(digest)
        if isinstance(config, str):  # damage: SQLite turned the blob into text; _check_config catches it
            config = config.encode("utf-8", "surrogateescape")
        img = SaveImage(digest, config, [], top_chain, refs.image_tags(store, r.image_rowid))
        for li in r.layers:
            size = store.scalar("SELECT tar_size FROM diff WHERE id = ?", (li.diff_rowid,))
            img.layers.append(LayerRef(li.diff_rowid, li.diff_id, size))
        _check_config(img)
        out.append(img)
    if not out:
        raise UsageError("save needs at least one image")
    return out


def _check_config(img: SaveImage) -> None:
    """An archive whose config disagrees with its layers would be refused by every loader."""
    got = _digest(img.config)
    if got != img.digest:
        raise CorruptStore(f"image {img.digest}: stored config hashes to {got}")
    try:
        diff_ids = json.loads(img.config)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError):
        raise CorruptStore(f"image {img.digest}: stored config has no rootfs.diff_ids") from None
    if diff_ids != [lr.diff_id for lr in img.layers]:
        raise CorruptStore(f"image {img.digest}: config diff_ids do not match the stored layer chain")


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def checked_layer(conn, content: ContentStore, layer: LayerRef) -> Iterator[bytes]:
    """The layer tar's pieces; raises CorruptStore at the end unless sha256 and size match."""
    h = hashlib.sha256()
    n = 0
    try:
        for piece in iter_layer_tar(conn, content, layer.diff_rowid):
            h.update(piece)
            n += len(piece)
            yield piece
    except CorruptStore as e:
        raise CorruptStore(f"layer {layer.diff_id} cannot be rebuilt: {e.message}") from None
    got = "sha256:" + h.hexdigest()
    if got != layer.diff_id or n != layer.tar_size:
        raise CorruptStore(
            f"layer {layer.diff_id} rebuilds to {n} bytes hashing to {got}; expected {layer.tar_size} bytes"
            " hashing to the diff_id: the store is damaged"
        )


class _Writer:
    """A tar stream of members with fixed metadata, so equal inputs give equal archives."""

    def __init__(self, out: BinaryIO):
        self.tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, size: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = size, 0o644, 0
        ti.uname = ti.gname = ""
        return ti

    def add_bytes(self, name: str, data: bytes) -> None:
        self.tar.addfile(self._info(name, len(data)), io.BytesIO(data))

    def add_stream(self, name: str, pieces: Iterator[bytes], size: int) -> None:
        """A member of known size from pieces; the pieces must come to exactly size bytes."""
        f = io.BufferedReader(BlobReader(pieces), buffer_size=COPY_SIZE)
        try:
            self.tar.addfile(self._info(name, size), f)
        except OSError as e:  # tarfile: "unexpected end of data"
            raise CorruptStore(f"{name}: the store gave fewer bytes than the layer's size ({e})") from None
        # Drain: the size and digest check runs when the pieces run out.
        while f.read(COPY_SIZE):
            pass

    def __enter__(self) -> "_Writer":
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.tar.close()
        else:
            # An incomplete archive: drop tarfile's buffer instead of flushing it into
            # a stream the caller is about to discard (or has closed).
            self.tar.fileobj.closed = True  # type: ignore[union-attr]
            self.tar.closed = True


def write_docker(store: Store, content: ContentStore, images: list[SaveImage], w: _Writer) -> None:
    """A `docker save` archive: <diff-hex>.tar layers, <config-hex>.json, manifest.json, repositories."""
    written: set[str] = set()
    manifest = []
    repositories: dict[str, dict[str, str]] = {}
    for img in images:
        names = []
        for lr in img.layers:
            name = lr.diff_id.split(":", 1)[1] + ".tar"
            if lr.diff_id not in written:
                w.add_stream(name, checked_layer(store.conn, content, lr), lr.tar_size)
                written.add(lr.diff_id)
            names.append(name)
        config_name = img.digest.split(":", 1)[1] + ".json"
        w.add_bytes(config_name, img.config)
        # RepoTags holds name:tag only: docker load refuses a digest reference there.
        tags = [t for t in img.tags if "@" not in t]
        manifest.append({"Config": config_name, "RepoTags": tags, "Layers": names})
        if img.top_chain_id is not None:
            # docker's legacy loader names the top layer by a v1 id; the chain id serves.
            for t in tags:
                repo, _, tag = t.rpartition(":")
                repositories.setdefault(repo, {})[tag] = img.top_chain_id.split(":", 1)[1]
    w.add_bytes("manifest.json", _json(manifest))
    w.add_bytes("repositories", _json(repositories))


def write_oci(store: Store, content: ContentStore, images: list[SaveImage], w: _Writer) -> None:
    """An OCI image layout: oci-layout, blobs/sha256/*, index.json; gzip layers."""
    w.add_bytes("oci-layout", OCI_LAYOUT)
    layer_desc: dict[str, dict] = {}
    blobs: set[str] = set()
    index = []

    def add_blob(data: bytes, media_type: str) -> dict:
        d = _digest(data)
        if d not in blobs:
            w.add_bytes("blobs/sha256/" + d.split(":", 1)[1], data)
            blobs.add(d)
        return {"mediaType": media_type, "digest": d, "size": len(data)}

    for img in images:
        for lr in img.layers:
            if lr.diff_id not in layer_desc:
                layer_desc[lr.diff_id] = _add_gzip_layer(w, checked_layer(store.conn, content, lr), blobs)
        config_desc = add_blob(img.config, OCI_CONFIG)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc,
            "layers": [layer_desc[lr.diff_id] for lr in img.layers],
        }
        mdesc = add_blob(_json(manifest), OCI_MANIFEST)
        # One index entry per name, as skopeo and buildah write them; an untagged image gets one without.
        for t in img.tags or [None]:
            entry = dict(mdesc)
            if t is not None:
                entry["annotations"] = {REF_NAME: t}
            index.append(entry)
    w.add_bytes("index.json", _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index}))


def _add_gzip_layer(w: _Writer, pieces: Iterator[bytes], blobs: set[str]) -> dict:
    """Compress to a temporary file first: the member's name is its digest and its header
    needs its size, neither known until the last byte.  Memory holds one piece."""
    with tempfile.TemporaryFile(prefix="layerdb-save-") as tmp:
        # wbits 31: a gzip wrapper with mtime 0, so the same layer gives the same blob.
        z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        h = hashlib.sha256()
        size = 0

        def put(b: bytes) -> None:
            nonlocal size
            h.update(b)
            tmp.write(b)
            size += len(b)

        for piece in pieces:
            put(z.compress(piece))
        put(z.flush())
        d = "sha256:" + h.hexdigest()
        if d not in blobs:
            tmp.seek(0)
            w.add_stream("blobs/sha256/" + d.split(":", 1)[1], iter(lambda: tmp.read(COPY_SIZE), b""), size)
            blobs.add(d)
    return {"mediaType": OCI_LAYER_GZIP, "digest": d, "size": size}


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def save(store: Store, content: ContentStore, names: Iterable[str], out: BinaryIO, fmt: str = DOCKER) -> list[dict]:
    """Write the named images as one archive to out; returns what was written."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown archive format {fmt!r} (choose {' or '.join(FORMATS)})")
    images = collect(store, names)
    with _Writer(out) as w:
        (write_oci if fmt == OCI else write_docker)(store, content, images, w)
    return [img.summary() for img in images]
