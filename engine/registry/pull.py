"""pull: a registry image into the store, one transaction, only the layers it lacks.

The manifest (and index) and the config come first; a layer whose diff_id the
store holds, or that an earlier layer of the pull has, is not downloaded.  The
others download in parallel (JOBS at a time, each into a Spool, see blobs.py)
and are imported in layer order by the importer, which hashes each blob once,
checking its digest and diff_id, on this thread, inside one write transaction: a refused or killed
pull leaves the store as it was, with no partial download behind it (issue 13
and DESIGN.md ask for exactly this).  The price is that the write lock is held
while the layers download; committing layer by layer would free it between
layers but leave diffs no image uses after a failed pull.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Callable

from ..content import ContentStore
from ..errors import (DigestMismatch, LayerdbError, RegistryAuthError, RegistryError,
                      RegistryNotFound, RegistryProtocolError, UsageError)
from ..ingest.importer import DiffResult, Importer
from ..log import get_logger
from ..store import Store
from . import blobs, manifest as mf, mirrors, reference, records, shortnames
from .auth import RegistryOptions
from .client import Client

log = get_logger("layerdb.registry")

JOBS = 3

# progress(event, fields): event is "skip", "start", "bytes", "done" for a layer
# (fields: index, count, digest, diff_id, size, done) or "image" (fields: id, tags).
PullProgress = Callable[[str, dict], None]


@dataclass
class ImagePlan:
    manifest: mf.Fetched
    config: bytes
    cfg: dict
    config_digest: str
    layers: list[dict]  # descriptors, manifest order
    diff_ids: list[str]
    index: mf.Fetched | None = None
    named: bool = True  # gets the pulled reference as its tag
    platform: str | None = None


@dataclass
class PullResult:
    images: list[dict] = field(default_factory=list)
    layers_fetched: int = 0
    layers_skipped: int = 0
    bytes_fetched: int = 0
    manifest_digest: str = ""
    source: str = ""  # where it was fetched: a mirror's reference, or the one asked for
    reference: str = ""  # the full reference the name resolved to (shortnames.py): the image's tag


def _config(client: Client, repo: str, m: mf.Fetched, what: str) -> tuple[bytes, dict, str, list[dict], list[str]]:
    doc = m.doc
    cdesc = doc.get("config")
    if not isinstance(cdesc, dict) or not isinstance(cdesc.get("digest"), str):
        raise RegistryProtocolError(f"manifest {what}: no config descriptor")
    cmt = cdesc.get("mediaType")
    if cmt not in mf.CONFIGS:
        raise RegistryProtocolError(f"manifest {what}: unsupported config media type {cmt!r} (not an image)")
    layers = doc.get("layers")
    if not isinstance(layers, list) or not all(isinstance(d, dict) and isinstance(d.get("digest"), str)
                                               and isinstance(d.get("size"), int) for d in layers):
        raise RegistryProtocolError(f"manifest {what}: malformed layers list")
    for d in layers:
        if d.get("mediaType") not in mf.LAYERS:
            raise RegistryProtocolError(f"manifest {what}: unsupported layer media type {d.get('mediaType')!r}")
        if not d["digest"].startswith("sha256:"):
            raise RegistryProtocolError(f"manifest {what}: unsupported digest {d['digest']!r}")
    size = cdesc.get("size")
    if not isinstance(size, int) or not 0 < size <= mf.MAX_CONFIG:
        raise RegistryProtocolError(f"manifest {what}: config size {size!r} is not between 1 and {mf.MAX_CONFIG}")
    buf = bytearray()
    blobs.fetch(client, repo, cdesc["digest"], size, buf.extend)
    data = bytes(buf)
    try:
        cfg = json.loads(data)
        diff_ids = cfg["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise RegistryProtocolError(f"config {cdesc['digest']}: not an image config (no rootfs.diff_ids)") from None
    if not isinstance(diff_ids, list) or not all(isinstance(x, str) and x.startswith("sha256:") for x in diff_ids):
        raise RegistryProtocolError(f"config {cdesc['digest']}: malformed rootfs.diff_ids")
    if len(diff_ids) != len(layers):
        raise RegistryProtocolError(
            f"manifest {what}: names {len(layers)} layers but its config lists {len(diff_ids)} diff_ids")
    return data, cfg, cdesc["digest"], layers, diff_ids


def plan(client: Client, ref: reference.Reference, platform: str | None, all_platforms: bool) -> list[ImagePlan]:
    """The images to store: manifests and configs fetched and checked, no layer yet."""
    repo = ref.repository
    top = mf.fetch(client, repo, ref.reference, str(ref))
    want = mf.parse_platform(platform) if platform else mf.machine()
    found: list[tuple[mf.Fetched, mf.Fetched | None, bool, str | None]] = []

    def walk(idx: mf.Fetched, depth: int, seen: tuple[str, ...], named: bool) -> None:
        if depth > mf.MAX_DEPTH:
            raise RegistryProtocolError(f"index {idx.digest}: indexes nested more than {mf.MAX_DEPTH} deep")
        what = f"{ref.name}@{idx.digest}"
        if all_platforms:
            descs = mf.entries(idx.doc, what)
            try:  # the image that gets the name: this machine's, when the index has it
                chosen = mf.select(idx.doc, want, what)
            except RegistryProtocolError:
                chosen = descs[0] if descs else None
        else:
            chosen = mf.select(idx.doc, want, what)
            descs = [chosen]
        for d in descs:
            if d["digest"] in seen:
                raise RegistryProtocolError(f"index {idx.digest}: points to itself (through {d['digest']})")
            child = mf.fetch(client, repo, d["digest"], f"{ref.name}@{d['digest']}")
            if child.data and d.get("size") not in (None, len(child.data)):
                raise RegistryProtocolError(f"index {idx.digest}: entry {d['digest']} has the wrong size")
            p = d.get("platform") if isinstance(d.get("platform"), dict) else None
            plat = mf.show(mf.normalize(str(p.get("os", "")), str(p.get("architecture", "")), p.get("variant"))) if p else None
            if child.media_type in mf.INDEXES:
                walk(child, depth + 1, seen + (child.digest,), named and d is chosen)
            else:
                found.append((child, idx, named and d is chosen, plat))

    if top.media_type in mf.INDEXES:
        walk(top, 1, (top.digest,), True)
    else:
        found.append((top, None, True, None))
    out = []
    for m, idx, named, plat in found:
        cfg_bytes, cfg, cdig, layers, diff_ids = _config(client, repo, m, f"{ref.name}@{m.digest}")
        out.append(ImagePlan(m, cfg_bytes, cfg, cdig, layers, diff_ids, idx, named, plat))
    return out


def pull(store: Store, content: ContentStore, source: str, opts: RegistryOptions, *,
         platform: str | None = None, all_platforms: bool = False, tags: list[str] | None = None,
         progress: PullProgress | None = None, jobs: int = JOBS) -> PullResult:
    if platform and all_platforms:
        raise UsageError("--platform and --all-platforms exclude each other")
    ref, client, src, images = _resolve_and_plan(source, opts, platform, all_platforms)
    try:
        result = PullResult(manifest_digest=images[0].index.digest if images[0].index else images[0].manifest.digest,
                            source=str(src), reference=str(ref))
        if ref.digest is None and images[0].index is not None:
            result.manifest_digest = images[0].index.digest
        content.reset()
        try:
            with store.write():
                store.execute("PRAGMA defer_foreign_keys = ON")
                _import(store, content, client, ref, src, images, tags or [], progress, jobs, result)
                content.flush()
        except BaseException:
            content.reset()
            raise
    finally:
        client.close()
    return result


def _resolve_and_plan(source: str, opts: RegistryOptions, platform: str | None, all_platforms: bool
                      ) -> tuple[reference.Reference, Client, reference.Reference, list[ImagePlan]]:
    """The first candidate of the name (shortnames.py) that serves the image.  As
    podman does, any failure moves on to the next candidate (Docker Hub answers 401,
    not 404, for a repository it lacks), and the error names every one tried."""
    res = shortnames.resolve(source)
    if len(res.candidates) == 1:
        ref = res.candidates[0]
        return (ref, *_plan_first(ref, opts, platform, all_platforms))
    failed: list[tuple[reference.Reference, LayerdbError]] = []
    for ref in res.candidates:
        try:
            return (ref, *_plan_first(ref, opts, platform, all_platforms))
        except (RegistryError, RegistryNotFound, DigestMismatch, UsageError) as e:
            log.info("candidate failed, trying the next", candidate=str(ref), error=e.message)
            failed.append((ref, e))
    why = "; ".join(f"{r}: {e.message}" for r, e in failed)
    msg = (f"{res.short}: no image in any of the unqualified-search-registries of {res.origin} "
           f"({', '.join(r.registry for r, _ in failed)}): {why}")
    kinds = {type(e) for _, e in failed}
    if all(isinstance(e, RegistryNotFound) for _, e in failed):
        raise RegistryNotFound(msg)
    if all(isinstance(e, RegistryAuthError) for _, e in failed):
        raise RegistryAuthError(msg)
    raise (UsageError if kinds == {UsageError} else RegistryError)(msg)


def _plan_first(ref: reference.Reference, opts: RegistryOptions, platform: str | None,
                all_platforms: bool) -> tuple[Client, reference.Reference, list[ImagePlan]]:
    """The first of registries.conf's sources (mirrors, then the location) that
    serves the manifest and config; it serves the layers too, as in containers/image."""
    cands = mirrors.sources(ref, pull=True)
    for i, s in enumerate(cands):
        client = opts.client(s.ref.registry, s.ref.repository, s.ref.api_host, insecure=s.insecure)
        try:
            return client, s.ref, plan(client, s.ref, platform, all_platforms)
        except (RegistryError, RegistryNotFound, DigestMismatch) as e:
            client.close()
            if i == len(cands) - 1:
                raise
            log.info("source failed, trying the next", source=str(s.ref), mirror=s.mirror, error=str(e))
    raise AssertionError("sources() always ends with the location")


def _import(store: Store, content: ContentStore, client: Client, ref: reference.Reference, src: reference.Reference,
            images: list[ImagePlan], extra_tags: list[str], progress: PullProgress | None, jobs: int,
            result: PullResult) -> None:
    """ref names the image (its tag); src is where it comes from (a mirror, or ref's registry)."""
    stored: dict[str, DiffResult] = {}
    todo: list[tuple[dict, str, str]] = []  # descriptor, diff_id, what
    planned: set[str] = set()
    count = sum(len(p.layers) for p in images)
    n = 0
    for p in images:
        for i, (desc, diff_id) in enumerate(zip(p.layers, p.diff_ids)):
            n += 1
            if diff_id in stored or diff_id in planned:
                continue
            row = store.one("SELECT id FROM diff WHERE diff_id = ?", (diff_id,))
            if row is not None:
                stored[diff_id] = DiffResult(row[0], diff_id, new=False)
                result.layers_skipped += 1
                if progress:
                    progress("skip", {"index": n, "count": count, "digest": desc["digest"], "diff_id": diff_id,
                                      "size": desc["size"]})
                continue
            planned.add(diff_id)
            todo.append((desc, diff_id, f"layer {i + 1} ({desc['digest']})"))
    running: dict[int, tuple[blobs.Spool, threading.Thread]] = {}
    lock = threading.Lock()

    def start(k: int) -> None:
        desc, diff_id, _ = todo[k]
        spool = blobs.Spool(desc["size"])

        def prog(done: int, k=k, desc=desc, diff_id=diff_id) -> None:
            if progress:
                with lock:
                    progress("bytes", {"index": k + 1, "count": len(todo), "digest": desc["digest"],
                                       "diff_id": diff_id, "size": desc["size"], "done": done})

        if progress:
            progress("start", {"index": k + 1, "count": len(todo), "digest": desc["digest"], "diff_id": diff_id,
                               "size": desc["size"]})
        # verify=False: the importer hashes the blob as it reads it (ingest_tar's blob_digest).
        t = threading.Thread(target=blobs.download_into, name=f"layerdb-pull-{k}",
                             args=(spool, client, src.repository, desc["digest"], desc["size"], prog, False),
                             daemon=True)
        t.start()
        running[k] = (spool, t)

    imp = Importer(store, content)
    try:
        for k in range(min(jobs, len(todo))):
            start(k)
        for k, (desc, diff_id, what) in enumerate(todo):
            spool, t = running[k]
            try:
                d = imp.ingest_tar(spool, diff_id, what, blob_digest=desc["digest"])
            except LayerdbError:
                # A damaged blob often fails to decompress, or gives another tar,
                # before its digest is known: let the download finish, and blame
                # the blob if it is bad (the download did not hash it: hash it now).
                t.join()
                bad = spool.error()
                if isinstance(bad, LayerdbError):
                    raise bad from None
                if bad is None and (got := spool.digest()) != desc["digest"]:
                    raise DigestMismatch(f"blob {desc['digest']}", desc["digest"], got) from None
                raise
            t.join()
            spool.close()
            del running[k]
            stored[diff_id] = d
            result.layers_fetched += 1
            result.bytes_fetched += desc["size"]
            if progress:
                with lock:
                    progress("done", {"index": k + 1, "count": len(todo), "digest": desc["digest"],
                                      "diff_id": diff_id, "size": desc["size"]})
            if k + jobs < len(todo):
                start(k + jobs)
    finally:
        for spool, t in running.values():
            spool.cancelled.set()
        for spool, t in running.values():
            t.join()
            spool.close()
    _store_images(store, imp, ref, src, images, extra_tags, progress, stored, result)


def _store_images(store: Store, imp: Importer, ref: reference.Reference, src: reference.Reference,
                  images: list[ImagePlan], extra_tags: list[str], progress: PullProgress | None,
                  stored: dict[str, DiffResult], result: PullResult) -> None:
    for p in images:
        tags = ([ref.with_tag()] + list(extra_tags)) if p.named else []
        info = imp.store_image(p.config_digest, p.config, p.cfg, [stored[d] for d in p.diff_ids], tags)
        image_rowid = store.scalar("SELECT id FROM image WHERE digest = ?", (p.config_digest,))
        records.remember_pull(store, src, p.manifest, p.index, image_rowid, p.layers, p.diff_ids, p.config_digest)
        info["manifest"] = p.manifest.digest
        info["platform"] = p.platform
        result.images.append(info)
        if progress:
            progress("image", {"id": p.config_digest, "tags": tags})
