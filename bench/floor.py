#!/usr/bin/env python3
"""The import floor: the least work any importer must do on an OCI archive.

    python3 bench/floor.py ARCHIVE.oci.tar               # gunzip + sha256 of every layer, one thread
    python3 bench/floor.py --zstd ARCHIVE.oci.tar        # ... + zstd-3 of the tar stream, one thread
    python3 bench/floor.py --two-thread ARCHIVE.oci.tar  # gunzip + sha256 on one thread, zstd-3 on another
    python3 bench/floor.py --verified ARCHIVE.oci.tar    # + the blob's sha256 | + a content sha256 (figure)

The two-thread floor is issue 16's: on two cores an importer can at best run
the inflater and the hashes on one core and the compressor on the other, so
its wall time is the longer of the two, plus the hand-over.  Gunzip is ISA-L
(python-isal) when it is installed, as layerdb's, else zlib; zstd-3 runs over
the whole tar stream in 1 MiB pieces, as one stream, which is less work than
layerdb's per-pack frames.  isal, hashlib and zstandard release the GIL on
these buffers, so the two threads do run at once.  Streaming 1 MiB at a time;
the hand-over queue holds at most 8 pieces.

The verified floor is the same two threads doing what any importer that checks
every digest and addresses contents by sha256 must do besides: the first also
hashes the compressed blob (its digest), the second hashes the tar's bytes once
more before compressing them (a sha256 for every file's contents, which are
most of a tar).  It still parses nothing and stores nothing.
"""

from __future__ import annotations

import hashlib
import json
import queue
import sys
import tarfile
import threading
import zlib

try:
    from isal import isal_zlib as inflate
except ImportError:
    inflate = zlib

READ = 1 << 20


def _layers(archive: str):
    """(blob file object, diff_id) of each distinct layer of every image, in index order."""
    with tarfile.open(archive, "r:") as tar:
        members = {m.name: m for m in tar.getmembers()}

        def blob(digest: str):
            return tar.extractfile(members["blobs/sha256/" + digest.split(":", 1)[1]])

        index = json.load(tar.extractfile(members["index.json"]))
        done: set[str] = set()
        for desc in index["manifests"]:
            manifest = json.load(blob(desc["digest"]))
            config = json.load(blob(manifest["config"]["digest"]))
            for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]):
                if layer["digest"] not in done:
                    done.add(layer["digest"])
                    yield blob(layer["digest"]), diff_id


def _inflated(f):
    """The layer's tar stream in pieces of at most READ bytes (multi-member gzip too)."""
    z = inflate.decompressobj(wbits=47)
    while True:
        b = f.read(READ)
        if not b:
            break
        while b:
            out = z.decompress(b, READ)
            if out:
                yield out
            b = z.unconsumed_tail
            if z.eof and not b:
                b, z = z.unused_data, inflate.decompressobj(wbits=47)
                if not b.strip(b"\0"):
                    b = b""
    out = z.flush()
    if out:
        yield out


class _HashedFile:
    def __init__(self, f) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        return b


def floor(archive: str, zstd: bool, two_thread: bool = False, verified: bool = False) -> tuple[int, int]:
    """(layers, uncompressed bytes); raises if a diff_id does not match the config."""
    import zstandard

    two_thread = two_thread or verified
    cctx = zstandard.ZstdCompressor(level=3) if zstd or two_thread else None
    q: queue.Queue = queue.Queue(maxsize=8)
    compressor = None
    if two_thread:
        def compress() -> None:
            comp = cctx.compressobj()
            content = hashlib.sha256()
            while (piece := q.get()) is not None:
                if piece is EOF:
                    comp.flush()
                    comp = cctx.compressobj()
                else:
                    if verified:
                        content.update(piece)
                    comp.compress(piece)

        compressor = threading.Thread(target=compress)
        compressor.start()
    n = total = 0
    try:
        for f, diff_id in _layers(archive):
            if verified:
                f = _HashedFile(f)
            h = hashlib.sha256()
            comp = cctx.compressobj() if zstd and not two_thread else None
            for raw in _inflated(f):
                h.update(raw)
                total += len(raw)
                if compressor:
                    q.put(raw)
                elif comp:
                    comp.compress(raw)
            if compressor:
                q.put(EOF)
            elif comp:
                comp.flush()
            if "sha256:" + h.hexdigest() != diff_id:
                raise SystemExit(f"floor: diff_id mismatch ({diff_id})")
            n += 1
    finally:
        if compressor:
            q.put(None)
            compressor.join()
    return n, total


EOF = b""  # a layer's end, on the hand-over queue


def main() -> None:
    args = sys.argv[1:]
    zstd = "--zstd" in args
    two = "--two-thread" in args
    verified = "--verified" in args
    paths = [a for a in args if a not in ("--zstd", "--two-thread", "--verified")]
    if len(paths) != 1:
        raise SystemExit(__doc__)
    n, total = floor(paths[0], zstd, two, verified)
    print(f"{n} layers, {total} bytes")


if __name__ == "__main__":
    main()
